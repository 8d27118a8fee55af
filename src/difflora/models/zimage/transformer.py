"""diffusers' ZImageTransformer2DModel with ComfyUI's fused attention projection, and the two weight layouts.

The model is diffusers' class; only each block's `attention.to_q/to_k/to_v` become one `attention.qkv`
Linear (ComfyUI's and the original release's layout). A LoRA then trains the fused projection itself, which
is what ComfyUI applies a `..._attention_qkv` module to: every adapter (LoHa, LoKr, DoRA too) is exact there,
where three separately trained modules fuse exactly only when they share their input factors (models/zimage/lora.py).

Layouts: "native" (ComfyUI / Tongyi single files: `layers.N.attention.qkv`, `attention.out`, `q_norm`,
`x_embedder`, `final_layer`) and "diffusers" (split `to_q/k/v`, `to_out.0`, `norm_q`, `all_x_embedder.2-1`).
"""

from __future__ import annotations

import torch
import torch.nn as nn

# diffusers path segment -> native path segment (outside the attention projections)
_RENAMES = (
    ("all_x_embedder.2-1.", "x_embedder."),
    ("all_final_layer.2-1.", "final_layer."),
    ("attention.to_out.0.", "attention.out."),
    ("attention.norm_q.", "attention.q_norm."),
    ("attention.norm_k.", "attention.k_norm."),
)
BLOCK_LISTS = ("noise_refiner", "context_refiner", "layers")


def in_blocks(path: str) -> bool:
    """A module path inside the 34 transformer blocks, where difflora puts LoRA modules. Outside them: the token
    embedders see every sample's tokens concatenated (a per-sample multiplier cannot apply), diffusers' LoRA
    converter loses the final layer's names, and no peer's default set goes there."""
    return path.startswith(tuple(b + "." for b in BLOCK_LISTS))


class _SplitView:
    """What diffusers' ZSingleStreamAttnProcessor reads from its `attn`, with q/k/v cut from one fused matmul."""

    def __init__(self, attn, hidden: torch.Tensor):
        self.heads, self.norm_q, self.norm_k, self.to_out = attn.heads, attn.norm_q, attn.norm_k, attn.to_out
        q, k, v = attn.qkv(hidden).chunk(3, dim=-1)
        self.to_q, self.to_k, self.to_v = (lambda _h: q), (lambda _h: k), (lambda _h: v)


class FusedQKVProcessor:
    """diffusers' own Z-Image attention processor, fed from the fused `qkv` projection."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, freqs_cis=None):
        return self.inner(_SplitView(attn, hidden_states), hidden_states, encoder_hidden_states, attention_mask,
                          freqs_cis)


def blocks(transformer) -> list[nn.Module]:
    """Every transformer block in run order: 2 noise refiners, 2 context refiners, the 30 layers."""
    return [b for name in BLOCK_LISTS for b in getattr(transformer, name)]


def fuse_attention(transformer) -> None:
    """Replace each block's to_q/to_k/to_v by one `qkv` Linear holding their weights (rows q | k | v)."""
    for block in blocks(transformer):
        attn = block.attention
        q, k, v = attn.to_q, attn.to_k, attn.to_v
        fused = nn.Linear(q.in_features, q.out_features * 3, bias=False, device=q.weight.device, dtype=q.weight.dtype)
        with torch.no_grad():
            fused.weight.copy_(torch.cat([q.weight, k.weight, v.weight]))
        del attn.to_q, attn.to_k, attn.to_v
        attn.qkv = fused
        attn.set_processor(FusedQKVProcessor(attn.processor))


def native_name(diffusers_path: str) -> str:
    """A diffusers module or weight path in the native layout (`to_q/k/v` paths map to `qkv`)."""
    n = f".{diffusers_path}."
    for old, new in _RENAMES:
        n = n.replace("." + old, "." + new)
    for part in ("to_q", "to_k", "to_v"):
        n = n.replace(f".attention.{part}.", ".attention.qkv.")
    return n[1:-1]


def diffusers_name(native_path: str) -> str:
    """The inverse of native_name for every path but `qkv` (which is three diffusers modules)."""
    n = f".{native_path}."
    for old, new in _RENAMES:
        n = n.replace("." + new, "." + old)
    return n[1:-1]


def native_to_fused_model_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A native state dict (ComfyUI file) -> this module's keys (diffusers names, fused `attention.qkv`)."""
    out = {}
    for k, v in sd.items():
        if k == "norm_final.weight":  # an unused leftover of the original release
            continue
        out[k if ".attention.qkv." in k else diffusers_name(k)] = v
    return out


def fused_model_to_native_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {native_name(k): v for k, v in sd.items()}


def split_fused_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This module's state dict -> diffusers' (to_q/to_k/to_v cut from each qkv)."""
    out = {}
    for k, v in sd.items():
        if k.endswith(".attention.qkv.weight"):
            for part, w in zip(("to_q", "to_k", "to_v"), v.chunk(3, dim=0)):
                out[k.replace(".qkv.", f".{part}.")] = w
        else:
            out[k] = v
    return out


def fuse_split_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' state dict -> this module's (the inverse of split_fused_keys)."""
    out = {}
    for k, v in sd.items():
        if ".attention.to_k." in k or ".attention.to_v." in k:
            continue
        if k.endswith(".attention.to_q.weight"):
            base = k[: -len("to_q.weight")]
            out[base + "qkv.weight"] = torch.cat([v, sd[base + "to_k.weight"], sd[base + "to_v.weight"]])
        else:
            out[k] = v
    return out
