"""FLUX LoRA files: kohya names <-> diffusers / ai-toolkit (peft) names.

kohya names follow BFL's fused modules; diffusers splits q/k/v (double blocks) and
q/k/v/proj_mlp (single-block linear1). Both directions are exact:
- kohya -> diffusers: each split piece gets the whole `lora_down` and its rows of `lora_up`,
  with alpha/rank baked into lora_B (so peft's default alpha = r applies scale 1);
- diffusers -> kohya: the pieces' downs are stacked (rank = sum of ranks) and their ups placed
  block-diagonally, scales baked in, alpha = the new rank. ΔW = up·down equals the pieces' deltas
  stacked, so alpha/rank scaling applies the trained delta exactly (unlike sd-scripts' split_qkv
  files, which keep the per-piece alpha and load at 1/3 or 1/4 strength).
DoRA travels as peft's `lora_magnitude_vector` (one magnitude per output row, so a fused module's vector splits
and stacks with the rows of lora_up); only the output-axis `dora_scale` (O, 1) has that form.
"""

from __future__ import annotations

import re

import torch

from ...errors import UserError
from .convert import module_map, split_sizes
from .transformer import FluxParams

_PEFT = re.compile(r"^(?P<mod>.+?)\.(?:lora_(?P<ab>[AB])|lora\.(?P<du>down|up)|lora_linear_layer\.(?P<du2>down|up))"
                   r"(?:\.default)?\.weight$")
_TE_PREFIXES = ("text_encoder.", "text_encoders.clip_l.transformer.")
_MAGNITUDE = re.compile(r"^(?P<mod>.+?)\.lora_magnitude_vector(?:\.default)?(?:\.weight)?$")


def kohya_to_diffusers(tensors: dict[str, torch.Tensor], params: FluxParams) -> dict[str, torch.Tensor]:
    """kohya FLUX LoRA -> peft keys (`transformer.` / `text_encoder.` prefixes), scale baked into lora_B.

    T5 (`lora_te3_`) modules have no diffusers counterpart (diffusers drops them): refused here
    rather than lost silently.
    """
    from ...network.adapters import by_module
    from ...network.files import peft_lora_parts

    bfl_of = {("lora_unet_" + b.replace(".", "_")): (b, targets) for b, targets in module_map(params).items()}
    out: dict[str, torch.Tensor] = {}
    for name, parts in sorted(by_module(tensors).items()):
        if name.startswith("lora_te3_"):
            raise UserError("diffusers has no T5 LoRA support: save T5-trained LoRAs in the kohya format")
        down, up, magnitude = peft_lora_parts(parts, name)
        if name.startswith("lora_te1_"):
            module = "text_encoder." + name[len("lora_te1_"):].replace("_", ".")
            module = _fix_clip_path(module)
            out[f"{module}.lora_A.weight"], out[f"{module}.lora_B.weight"] = down, up
            if magnitude is not None:  # transformers' peft loading wants the parameter's `.weight` here
                out[f"{module}.lora_magnitude_vector.weight"] = magnitude
            continue
        if name not in bfl_of:
            raise UserError(f"module {name} has no diffusers FLUX counterpart")
        bfl, targets = bfl_of[name]
        sizes = split_sizes(bfl, params) if len(targets) > 1 else [up.shape[0]]
        pieces = torch.split(up, sizes, dim=0)
        magnitudes = torch.split(magnitude, sizes) if magnitude is not None else [None] * len(targets)
        for t, piece, m in zip(targets, pieces, magnitudes):
            out[f"transformer.{t}.lora_A.weight"] = down.clone()
            out[f"transformer.{t}.lora_B.weight"] = piece.contiguous()
            if m is not None:
                out[f"transformer.{t}.lora_magnitude_vector"] = m.contiguous()
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
        magnitude = _MAGNITUDE.match(k)
        if magnitude:
            pairs.setdefault(magnitude["mod"], {})["M"] = v.float().reshape(-1)
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
            if "M" in ab:
                out[f"{name}.dora_scale"] = ab["M"].reshape(-1, 1)
            continue
        if inner not in split_owner:
            raise UserError(f"module {mod} is not part of a FLUX.1 transformer", path=path)
        bfl, targets = split_owner[inner]
        fused.setdefault(bfl, {})[inner] = (ab["A"], ab["B"] * scale, ab.get("M"))
    for bfl, pieces in fused.items():
        targets = module_map(params)[bfl]
        sizes = split_sizes(bfl, params) if len(targets) > 1 else None
        name = "lora_unet_" + bfl.replace(".", "_")
        magnitudes = [pieces[t][2] if t in pieces else None for t in targets]
        if any(m is not None for m in magnitudes) and any(m is None for m in magnitudes):
            raise UserError(f"module {bfl}: DoRA's lora_magnitude_vector is given for some of "
                            f"{', '.join(targets)} only; the fused module needs all of them", path=path)
        if len(targets) == 1:
            down, up, _ = pieces[targets[0]]
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
                    d, u, _ = pieces[t]
                    up[row:row + size, col:col + d.shape[0]] = u
                    col += d.shape[0]
                row += size
        out[f"{name}.lora_down.weight"] = down
        out[f"{name}.lora_up.weight"] = up
        out[f"{name}.alpha"] = torch.tensor(float(down.shape[0]))
        if magnitudes[0] is not None:  # rows stack as lora_up's do
            out[f"{name}.dora_scale"] = torch.cat(magnitudes).reshape(-1, 1)
    return out
