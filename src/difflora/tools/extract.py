"""Extract a LoRA approximating (tuned − original) from two models of one family.

Per target module (the family's kohya targets, `lora_targets(conv=bool(conv_dim))`):
diff = W_tuned − W_org, flattened to (out, in·kh·kw); truncated SVD; up = U_k·S_k, down = V_kᵀ,
alpha = k, with k = min(conv_dim if kxk conv else dim, in, out).

kohya's text-encoder rule: if max |diff| over all text-encoder modules is ≤ min_diff, the text
encoders are declared unchanged and all their modules are dropped (a warning says so). min_diff
is not applied to denoiser modules; they are all extracted.

Clamping: none by default (the best rank-k approximation); `clamp_quantile=0.99` is kohya's
default behaviour. Only the ModelFamily interface is used (lora_targets, text_encoders,
base_model_version, lora_metadata), so other families plug in without changes here.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import UserError
from ..models.registry import family_of_version, plugin_for
from ..network.files import save_dtype, save_lora
from ..network import lowrank
from .common import check_lora_output, check_rank, network_args, resolve_device

log = logging.getLogger(__name__)

State = dict[str, torch.Tensor]


@dataclass
class ExtractResult:
    tensors: State
    metadata: dict[str, str]
    text_encoder_dropped: bool = False
    text_encoder_max_diff: float = 0.0
    modules: list[str] = field(default_factory=list)


def _weight(module: nn.Module) -> torch.Tensor:
    return module.weight.detach()


def _is_text_encoder(model, target) -> bool:
    return target.component in model.text_encoders


def _check_pair(org, tuned, targets_o, targets_t) -> None:
    fo, ft = (family_of_version(m.base_model_version) or m.base_model_version for m in (org, tuned))
    if fo != ft:
        raise UserError(f"the tuned model is {tuned.base_model_version} but the original is {org.base_model_version}; "
                        "both models must be of one family", path=tuned.source)
    names_o, names_t = [t.name for t in targets_o], [t.name for t in targets_t]
    if names_o != names_t:
        missing = sorted(set(names_o) ^ set(names_t))
        raise UserError(f"the two models have different module layouts (e.g. {missing[0] if missing else 'order'}); "
                        "they are not the same architecture", path=tuned.source)
    for a, b in zip(targets_o, targets_t):
        if tuple(a.module.weight.shape) != tuple(b.module.weight.shape):
            raise UserError(f"module {a.name} is {tuple(b.module.weight.shape)} in the tuned model but "
                            f"{tuple(a.module.weight.shape)} in the original; they are not the same architecture",
                            path=tuned.source)


def truncated_svd_factors(diff: torch.Tensor, rank: int, clamp_quantile: float | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) 2-D with up @ down = best rank-k approximation of the 2-D `diff` (then clamped)."""
    mat = diff.float()
    k = max(1, min(rank, mat.shape[0], mat.shape[1]))
    u, s, vh = torch.linalg.svd(mat, full_matrices=False)
    up = u[:, :k] * s[:k]
    down = vh[:k]
    if clamp_quantile is not None:
        up, down = lowrank.clamp_factors(up, down, clamp_quantile)
    return up, down


@torch.no_grad()
def extract_lora(org, tuned, dim: int = 4, conv_dim: int | None = None, clamp_quantile: float | None = None,
                 min_diff: float = 0.01, device: str | torch.device = "cpu") -> ExtractResult:
    """A kohya-layout LoRA with ΔW ≈ W_tuned − W_org on the family's target modules."""
    from tqdm import tqdm

    check_rank(dim, "--dim")
    check_rank(conv_dim, "--conv-dim")
    if clamp_quantile is not None and not 0.0 < clamp_quantile <= 1.0:
        raise UserError(f"--clamp-quantile must be in (0, 1], got {clamp_quantile}")
    device = resolve_device(str(device))
    targets_o = org.lora_targets(conv=bool(conv_dim))
    targets_t = tuned.lora_targets(conv=bool(conv_dim))
    _check_pair(org, tuned, targets_o, targets_t)

    te_max = 0.0
    te_names = [a.name for a in targets_o if _is_text_encoder(org, a)]
    for a, b in zip(targets_o, targets_t):
        if _is_text_encoder(org, a):
            te_max = max(te_max, float((_weight(b.module).float() - _weight(a.module).float()).abs().max()))
    drop_te = bool(te_names) and te_max <= min_diff
    if drop_te:
        log.warning("text encoder is the same in both models (max |diff| %.3g <= min_diff %g); "
                    "the LoRA holds the denoiser only", te_max, min_diff)

    out: State = {}
    modules: list[str] = []
    pairs = [(a, b) for a, b in zip(targets_o, targets_t) if not (drop_te and _is_text_encoder(org, a))]
    for a, b in tqdm(pairs, desc="extract", leave=False):
        w_o, w_t = _weight(a.module), _weight(b.module)
        diff = (w_t.to(device, torch.float32) - w_o.to(device, torch.float32))
        shape = tuple(diff.shape)
        rank = conv_dim if (a.is_conv_kxk and conv_dim) else dim
        up, down = truncated_svd_factors(diff.reshape(shape[0], -1), rank, clamp_quantile)
        k = down.shape[0]
        if isinstance(a.module, nn.Conv2d):
            down = down.reshape(k, *shape[1:])
            up = up.reshape(shape[0], k, 1, 1)
        out[f"{a.name}.lora_down.weight"] = down.contiguous().cpu()
        out[f"{a.name}.lora_up.weight"] = up.contiguous().cpu()
        out[f"{a.name}.alpha"] = torch.tensor(float(k))
        modules.append(a.name)
    if not modules:
        raise UserError("nothing to extract: the models have no target modules left")

    md = {k: str(v) for k, v in tuned.lora_metadata().items()}
    md["ss_network_module"] = plugin_for(tuned.family).kohya_network_module  # networks.lora_flux for FLUX
    md.update(network_args(conv_dim))
    md["ss_training_comment"] = (f"extracted by difflora: {Path(str(tuned.source)).name} - {Path(str(org.source)).name}, "
                                 f"dim {dim}{f', conv_dim {conv_dim}' if conv_dim else ''}, "
                                 f"{'clamp quantile ' + format(clamp_quantile, 'g') if clamp_quantile is not None else 'no clamp'}"
                                 f"{', text encoder unchanged (dropped)' if drop_te else ''}")
    return ExtractResult(out, md, drop_te, te_max, modules)


def extract_files(model_org: str | os.PathLike, model_tuned: str | os.PathLike, save_to: str | os.PathLike | None, *,
                  dim: int = 4, conv_dim: int | None = None, clamp_quantile: float | None = None,
                  min_diff: float = 0.01, device: str = "cpu", load_precision: str | None = None,
                  save_precision: str | None = None, allow_pickle: bool = False) -> dict:
    """`difflora extract`. Returns a summary."""
    from ..models import load_model

    if save_to is None:
        save_to = Path(f"{Path(model_tuned).stem}-extracted-r{dim}.safetensors")
    save_to = check_lora_output(save_to)
    out_dtype = save_dtype(save_precision or "float")
    load_dtype = save_dtype(load_precision or "float")
    check_rank(dim, "--dim")
    check_rank(conv_dim, "--conv-dim")
    resolve_device(device)
    org = load_model(model_org, dtype=load_dtype, allow_pickle=allow_pickle)
    tuned = load_model(model_tuned, dtype=load_dtype, allow_pickle=allow_pickle)
    res = extract_lora(org, tuned, dim, conv_dim, clamp_quantile, min_diff, device)
    written = save_lora(res.tensors, save_to, res.metadata, dtype=out_dtype)
    return {"output": str(save_to), "modules": len(res.modules), "text_encoder_dropped": res.text_encoder_dropped,
            "text_encoder_max_diff": res.text_encoder_max_diff, "network_dim": written["ss_network_dim"],
            "network_args": json.loads(written.get("ss_network_args", "{}"))}
