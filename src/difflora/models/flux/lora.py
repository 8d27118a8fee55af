"""FLUX LoRA files: kohya names <-> diffusers / ai-toolkit (peft) names.

kohya names follow BFL's fused modules; diffusers splits q/k/v (double blocks) and
q/k/v/proj_mlp (single-block linear1). Both directions are exact:
- kohya -> diffusers: each split piece gets the whole `lora_down` and its rows of `lora_up`,
  with alpha/rank baked into lora_B (so peft's default alpha = r applies scale 1);
- diffusers -> kohya: the pieces' downs are stacked (rank = sum of ranks) and their ups placed
  block-diagonally, scales baked in, alpha = the new rank. ΔW = up·down equals the pieces' deltas
  stacked, so alpha/rank scaling applies the trained delta exactly (unlike sd-scripts' split_qkv
  files, which keep the per-piece alpha and load at 1/3 or 1/4 strength).
"""

from __future__ import annotations

import logging
import re

import torch

from ...errors import UserError
from .convert import module_map, split_sizes
from .transformer import FluxParams

log = logging.getLogger(__name__)

_PEFT = re.compile(r"^(?P<mod>.+?)\.(?:lora_(?P<ab>[AB])|lora\.(?P<du>down|up)|lora_linear_layer\.(?P<du2>down|up))"
                   r"(?:\.default)?\.weight$")
_TE_PREFIXES = ("text_encoder.", "text_encoders.clip_l.transformer.")


def _scale(tensors: dict[str, torch.Tensor], name: str) -> float:
    rank = tensors[f"{name}.lora_down.weight"].shape[0]
    a = tensors.get(f"{name}.alpha")
    return (float(a) if a is not None else float(rank)) / rank


def kohya_to_diffusers(tensors: dict[str, torch.Tensor], params: FluxParams) -> dict[str, torch.Tensor]:
    """kohya FLUX LoRA -> peft keys (`transformer.` / `text_encoder.` prefixes), scale baked into lora_B.

    T5 (`lora_te3_`) modules have no diffusers counterpart (diffusers drops them): refused here
    rather than lost silently.
    """
    bfl_of = {("lora_unet_" + b.replace(".", "_")): (b, targets) for b, targets in module_map(params).items()}
    out: dict[str, torch.Tensor] = {}
    names = sorted({k.split(".", 1)[0] for k in tensors if k.endswith(".lora_down.weight")})
    for name in names:
        down = tensors[f"{name}.lora_down.weight"].float()
        up = tensors[f"{name}.lora_up.weight"].float() * _scale(tensors, name)
        if name.startswith("lora_te3_"):
            raise UserError("diffusers has no T5 LoRA support: save T5-trained LoRAs in the kohya format")
        if name.startswith("lora_te1_"):
            module = "text_encoder." + name[len("lora_te1_"):].replace("_", ".")
            module = _fix_clip_path(module)
            out[f"{module}.lora_A.weight"], out[f"{module}.lora_B.weight"] = down, up
            continue
        if name not in bfl_of:
            raise UserError(f"module {name} has no diffusers FLUX counterpart")
        bfl, targets = bfl_of[name]
        pieces = torch.split(up, split_sizes(bfl, params), dim=0) if len(targets) > 1 else [up]
        for t, piece in zip(targets, pieces):
            out[f"transformer.{t}.lora_A.weight"] = down.clone()
            out[f"transformer.{t}.lora_B.weight"] = piece.contiguous()
    return out


_CLIP_PATH = re.compile(r"^text_encoder\.text\.model\.encoder\.layers\.(\d+)\.(self\.attn\.[qkvout]+\.proj|mlp\.fc[12])$")


def _fix_clip_path(module: str) -> str:
    m = _CLIP_PATH.match(module)
    if not m:
        raise UserError(f"unexpected CLIP LoRA module {module}")
    role = m.group(2).replace("self.attn", "self_attn").replace(".proj", "_proj")
    return f"text_encoder.text_model.encoder.layers.{m.group(1)}.{role}"


def is_diffusers_flux_lora(keys) -> bool:
    return any(k.startswith(("transformer.", "base_model.model.")) or ".transformer_blocks." in k
               or k.startswith(("single_transformer_blocks.", "transformer_blocks.")) for k in keys)


def diffusers_to_kohya(tensors: dict[str, torch.Tensor], params: FluxParams, path: str = "",
                       lora_alpha: float | None = None) -> dict[str, torch.Tensor]:
    """peft / diffusers / ai-toolkit FLUX LoRA -> kohya names with fused, exactly-scaled modules."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    alphas: dict[str, float] = {}
    for k, v in tensors.items():
        if k.endswith(".alpha"):
            alphas[k[: -len(".alpha")]] = float(v)
            continue
        m = _PEFT.match(k)
        if not m:
            raise UserError(f"unrecognised key {k!r} in a diffusers-format FLUX LoRA", path=path)
        part = "A" if (m["ab"] == "A" or m["du"] == "down" or m["du2"] == "down") else "B"
        pairs.setdefault(m["mod"], {})[part] = v.float()
    split_owner = {}
    for bfl, targets in module_map(params).items():
        for t in targets:
            split_owner[t] = (bfl, targets)
    fused: dict[str, dict[str, torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    for mod, ab in pairs.items():
        if "A" not in ab or "B" not in ab:
            raise UserError(f"module {mod} has only lora_{'A' if 'A' in ab else 'B'}", path=path)
        rank = ab["A"].shape[0]
        scale = (alphas.get(mod, lora_alpha if lora_alpha is not None else rank)) / rank
        inner = mod
        for prefix in ("base_model.model.", "transformer."):
            if inner.startswith(prefix):
                inner = inner[len(prefix):]
        if mod.startswith(_TE_PREFIXES):
            rest = mod.split("text_model.", 1)[-1] if "text_model." in mod else mod.split(".", 1)[1]
            name = "lora_te1_text_model_" + rest.replace(".", "_")
            out[f"{name}.lora_down.weight"], out[f"{name}.lora_up.weight"] = ab["A"], ab["B"] * scale
            out[f"{name}.alpha"] = torch.tensor(float(rank))
            continue
        if inner not in split_owner:
            raise UserError(f"module {mod} is not part of a FLUX.1 transformer", path=path)
        bfl, targets = split_owner[inner]
        fused.setdefault(bfl, {})[inner] = (ab["A"], ab["B"] * scale)
    for bfl, pieces in fused.items():
        targets = module_map(params)[bfl]
        sizes = split_sizes(bfl, params) if len(targets) > 1 else None
        name = "lora_unet_" + bfl.replace(".", "_")
        if len(targets) == 1:
            down, up = pieces[targets[0]]
        else:
            downs, ups = [], []
            for t, size in zip(targets, sizes):
                if t in pieces:
                    downs.append(pieces[t][0])
            rank = sum(d.shape[0] for d in downs)
            down = torch.cat(downs, 0)
            up = torch.zeros(sum(sizes), rank)
            row, col = 0, 0
            for t, size in zip(targets, sizes):
                if t in pieces:
                    d, u = pieces[t]
                    up[row:row + size, col:col + d.shape[0]] = u
                    col += d.shape[0]
                row += size
        out[f"{name}.lora_down.weight"] = down
        out[f"{name}.lora_up.weight"] = up
        out[f"{name}.alpha"] = torch.tensor(float(down.shape[0]))
    return out
