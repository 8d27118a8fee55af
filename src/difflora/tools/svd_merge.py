"""SVD merge: Σ ratio_i · ΔW_i per module, brought to a chosen rank; any adapter in, LoRA out.

Exact mode (default, no clamp): the best rank-k approximation of the sum is computed from the
factors (`network.lowrank.lowrank_svd`: thin QRs of the stacked ups and downs and the SVD of a
Σr x Σr matrix), which equals the truncated SVD of the dense sum, at a fraction of the cost. A
module's rank is min(new_rank, Σ r_i, in, out): where the inputs' total rank is below the asked
rank, the real rank is written and a warning says so (a merge at rank ≥ Σ r_i is exact).

kohya mode (`clamp_quantile`, e.g. kohya's 0.99): kohya svd_merge_lora.py step for step
(`network.lowrank.kohya_svd_merge`): dense sum, full SVD, k = min(new_rank, in, out) padded with
zero directions where the sum's rank is lower, both factors clamped to ±the quantile of their
joint signed values. Its output equals kohya's to float32 rounding.

LoHa, LoKr and DoRA inputs enter through their dense ΔW (exact SVD), so they can be converted
to a LoRA of any rank; DoRA (whose delta depends on the base weights) and LyCORIS convs (whose
files flatten the kernel) need the base model (`model`). Ratios act linearly, alpha = rank (scale 1).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from ..errors import UserError
from ..network import lowrank
from ..network.files import LoraFile, save_dtype, save_lora
from .common import (base_weights, check_lora_output, check_rank, check_ratios, load_loras, merged_metadata,
                     network_args, resolve_device, states)

log = logging.getLogger(__name__)

State = dict[str, torch.Tensor]


def svd_merge(loras: list[LoraFile], ratios: list[float], new_rank: int, new_conv_rank: int | None = None,
              clamp_quantile: float | None = None, device: str | torch.device = "cpu",
              base: dict[str, torch.Tensor] | None = None) -> tuple[State, dict[str, int]]:
    """The merged LoRA as a kohya state dict (on CPU), and the modules whose inputs' total rank is
    below the asked rank, with that rank."""
    check_rank(new_rank, "--new-rank")
    check_rank(new_conv_rank, "--new-conv-rank")
    if clamp_quantile is not None and not 0.0 < clamp_quantile <= 1.0:
        raise UserError(f"--clamp-quantile must be in (0, 1], got {clamp_quantile}")
    device = resolve_device(str(device))
    conv_rank = new_conv_rank or new_rank
    sds = states(loras, device)
    if base is not None:
        base = {k: v.to(device) for k, v in base.items()}
    try:
        if clamp_quantile is not None:
            out, short = lowrank.kohya_svd_merge(sds, ratios, new_rank, conv_rank, clamp_quantile, base)
        else:
            out = lowrank.svd_rerank(sds, ratios, new_rank, conv_rank, base)
            short = {}
            for name in lowrank.module_names(out):
                down = out[f"{name}.lora_down.weight"]
                asked = conv_rank if down.dim() == 4 and tuple(down.shape[2:]) != (1, 1) else new_rank
                full = min(out[f"{name}.lora_up.weight"].shape[0], down[0].numel())
                if down.shape[0] < min(asked, full):
                    short[name] = down.shape[0]
    except ValueError as e:
        raise UserError(str(e)) from None
    return {k: v.to("cpu") for k, v in out.items()}, short


def svd_merge_files(models: list[str | os.PathLike], ratios: list[float] | None, save_to: str | os.PathLike, *,
                    new_rank: int = 4, new_conv_rank: int | None = None, clamp_quantile: float | None = None,
                    device: str = "cpu", save_precision: str | None = None, model: str | os.PathLike | None = None,
                    allow_pickle: bool = False) -> dict:
    """`difflora svd-merge`. Returns a summary."""
    ratios = check_ratios(models, ratios)
    out_dtype = save_dtype(save_precision or "float")
    save_to = check_lora_output(save_to)
    loras = load_loras(models)
    base = base_weights(model, loras, allow_pickle)
    merged, short = svd_merge(loras, ratios, new_rank, new_conv_rank, clamp_quantile, device, base)
    real = ""
    if short:
        lowest = min(short.values())
        what = ("kohya's clamp mode pads them with zero directions to the asked rank" if clamp_quantile is not None
                else "they are written at their real rank")
        log.warning("--new-rank %d is above the inputs' total rank in %d module(s) (e.g. %s: rank %d); %s",
                    new_rank, len(short), next(iter(short)), short[next(iter(short))], what)
        real = f"; real rank {lowest}-{max(short.values())} in {len(short)} module(s) whose inputs' total rank is lower"
    md = merged_metadata(loras)
    md.update(network_args(new_conv_rank or new_rank))
    md["ss_training_comment"] = (
        f"svd-merged by difflora to rank {new_rank} (conv {new_conv_rank or new_rank}){real}, "
        f"{'kohya clamp quantile ' + format(clamp_quantile, 'g') if clamp_quantile is not None else 'no clamp'}: "
        + ", ".join(f"{Path(lf.path).name} x {r:g}" for lf, r in zip(loras, ratios)))
    written = save_lora(merged, save_to, md, dtype=out_dtype)
    return {"output": str(save_to), "modules": len(lowrank.module_names(merged)),
            "network_dim": written["ss_network_dim"], "network_alpha": written["ss_network_alpha"],
            "below_asked_rank": short}
