"""SVD merge: Σ ratio_i · ΔW_i per module, brought to a chosen rank.

The best rank-k approximation of the sum is computed from the factors (`lora_math.lowrank_svd`:
thin QRs of the stacked ups and downs and the SVD of a Σr x Σr matrix), which equals the
truncated SVD of the dense sum that kohya's svd_merge_lora.py computes, at a fraction of the cost.

Differences from kohya, on purpose:
- No clamping by default, so a merge at rank ≥ Σ r_i is exact. `clamp_quantile=0.99` gives
  kohya's clamp (both factors clamped to ±the 0.99 quantile of their joint signed values).
- A module's rank is min(new_rank, Σ r_i, in, out): when the sum has a lower rank than asked,
  kohya pads with directions whose singular values are zero; difflora leaves them out (same delta).
Ratios act linearly (a negative ratio subtracts), alpha = rank (scale 1).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import UserError
from ..network.files import LoraFile, save_dtype, save_lora
from . import lora_math
from .common import (check_lora_output, check_rank, check_ratios, load_loras, merged_metadata, network_args,
                     resolve_device, states)

State = dict[str, torch.Tensor]


def svd_merge(loras: list[LoraFile], ratios: list[float], new_rank: int, new_conv_rank: int | None = None,
              clamp_quantile: float | None = None, device: str | torch.device = "cpu") -> State:
    """The merged LoRA as a kohya state dict (on CPU)."""
    check_rank(new_rank, "--new-rank")
    check_rank(new_conv_rank, "--new-conv-rank")
    if clamp_quantile is not None and not 0.0 < clamp_quantile <= 1.0:
        raise UserError(f"--clamp-quantile must be in (0, 1], got {clamp_quantile}")
    device = resolve_device(str(device))
    try:
        out = lora_math.svd_rerank(states(loras, device), ratios, new_rank, new_conv_rank or new_rank, clamp_quantile)
    except ValueError as e:
        raise UserError(str(e)) from None
    return {k: v.to("cpu") for k, v in out.items()}


def svd_merge_files(models: list[str | os.PathLike], ratios: list[float] | None, save_to: str | os.PathLike, *,
                    new_rank: int = 4, new_conv_rank: int | None = None, clamp_quantile: float | None = None,
                    device: str = "cpu", save_precision: str | None = None) -> dict:
    """`difflora svd-merge`. Returns a summary."""
    ratios = check_ratios(models, ratios)
    out_dtype = save_dtype(save_precision or "float")
    save_to = check_lora_output(save_to)
    loras = load_loras(models)
    merged = svd_merge(loras, ratios, new_rank, new_conv_rank, clamp_quantile, device)
    md = merged_metadata(loras)
    md.update(network_args(new_conv_rank or new_rank))
    md["ss_training_comment"] = (
        f"svd-merged by difflora to rank {new_rank} (conv {new_conv_rank or new_rank}), "
        f"{'clamp quantile ' + format(clamp_quantile, 'g') if clamp_quantile is not None else 'no clamp'}: "
        + ", ".join(f"{Path(lf.path).name} x {r:g}" for lf, r in zip(loras, ratios)))
    written = save_lora(merged, save_to, md, dtype=out_dtype)
    return {"output": str(save_to), "modules": len(lora_math.module_names(merged)),
            "network_dim": written["ss_network_dim"], "network_alpha": written["ss_network_alpha"]}
