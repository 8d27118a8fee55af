"""ComfyUI's single-file conventions the transformer families share: the `model.diffusion_model.` key prefix and
the scaled fp8 layouts (weights stored as float8 with a per-tensor or per-row scale beside them)."""

from __future__ import annotations

import torch

from ..errors import UserError

COMFY_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
# `<layer>.scale_weight`: the older files with the `scaled_fp8` marker; `<layer>.weight_scale`: QUANTIZATION.md's
SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
# activation scales and per-layer format markers: nothing a weight needs
_DROPPED_SUFFIXES = (".scale_input", ".input_scale", ".comfy_quant")


def strip_comfy_prefix(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys without ComfyUI's `model.diffusion_model.` / `diffusion_model.`; keys without it are kept as they are."""
    out = {}
    for k, v in sd.items():
        for p in COMFY_PREFIXES:
            if k.startswith(p):
                k = k[len(p):]
                break
        out[k] = v
    return out


def dequantize_scaled_fp8(sd: dict[str, torch.Tensor], path, dtype: torch.dtype | None = None
                          ) -> dict[str, torch.Tensor]:
    """ComfyUI's fp8 files as ComfyUI loads them: each fp8 weight times its `scale_weight` / `weight_scale` (per
    tensor, or per output row), in float32; the markers and activation scales dropped; an fp8 weight without a scale
    counts as scaled by 1 (ComfyUI's rule; plain `_fp8_e4m3fn` files have no scales at all).
    dtype=None: every other tensor passes unchanged, and a file with no scale and no marker is returned as it is;
    a dtype: every floating tensor, de-scaled or not, is cast to it.
    Formats ComfyUI computes in another way (block-wise scales, double scales) and scales on weights that are not
    fp8 are refused with a UserError naming `path`."""
    scales = {k[: -len(s)] + ".weight": v for k, v in sd.items() for s in SCALE_SUFFIXES if k.endswith(s)}
    if dtype is None and not scales and "scaled_fp8" not in sd:
        return sd
    out = {}
    for k, v in sd.items():
        if k == "scaled_fp8" or k.endswith(SCALE_SUFFIXES + _DROPPED_SUFFIXES):
            continue
        if k.endswith(".weight_scale_2") or (k in scales and v.dtype not in FP8_DTYPES):
            what = "a double-scaled weight" if k.endswith("_2") else f"a scaled {str(v.dtype).replace('torch.', '')}"
            raise UserError(f"{k}: {what} (only ComfyUI's scaled float8 weights are read; give the bf16 original)",
                            path=path)
        if k in scales:
            scale = scales[k].float()
            if scale.numel() not in (1, v.shape[0]):
                raise UserError(f"{k}: a block-wise fp8 scale of shape {tuple(scale.shape)} (only per-tensor or "
                                "per-row scales are read; give the bf16 original)", path=path)
            v = v.float() * (scale.reshape(-1, *[1] * (v.dim() - 1)) if scale.numel() > 1 else scale.reshape(()))
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        out[k] = v
    return out
