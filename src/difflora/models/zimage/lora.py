"""Z-Image LoRA names: what difflora writes, and every peer's spelling it reads.

difflora's modules are the model's own (models/zimage/transformer.py): `layers.N.attention.qkv` (fused),
`attention.to_out.0`, `feed_forward.w1/w2/w3`, named in kohya's style after the native layout:
`lora_unet_layers_0_attention_qkv`, `lora_unet_layers_0_attention_out`, `lora_unet_layers_0_feed_forward_w1`
(what musubi's convert_z_image_lora_to_comfy.py writes). ComfyUI maps all of them (musubi's own split names
`..._attention_to_q` lose every attention module there: 90 of 210 apply) and diffusers' Z-Image converter
splits `qkv` (210 of 210).

save_format:
- "kohya" (default): the names above, any adapter;
- "comfyui": `diffusion_model.<native path>.lora_A/.lora_B.weight` + `.alpha` (LoRA only);
- "diffusers": `transformer.<diffusers path>.lora_A/.lora_B.weight` with `qkv` split into to_q/to_k/to_v
  (the shared down matrix, each its rows of up) and the scale baked in (LoRA only).

Read: those three, musubi's split kohya names, ai-toolkit's and musubi-converted `diffusion_model.<diffusers>`
(no alpha: scale 1), DiffSynth's bare `<diffusers>.lora_A.default.weight`, SimpleTuner's `lycoris_` names;
split q/k/v LoRAs are fused exactly (down rows stacked, up block-diagonal, alpha baked).
"""

from __future__ import annotations

import torch

from ...errors import UserError
from .transformer import in_blocks, native_name

PREFIXES = ("transformer_", "diffusion_model_", "lycoris_")
_SPLIT = ("to_q", "to_k", "to_v")


def kohya_name(module_path: str) -> str:
    """Model module path (diffusers names, fused qkv) -> difflora's kohya name."""
    return "lora_unet_" + native_name(module_path).replace(".", "_")


class NameTable:
    """Every spelling of every module of one model, underscored: -> (kohya name, q/k/v index or None)."""

    def __init__(self, module_paths: list[str]):
        self.by_spelling: dict[str, tuple[str, int | None]] = {}
        self.native: dict[str, str] = {}  # kohya name -> native dotted path
        self.diffusers: dict[str, str] = {}  # kohya name -> diffusers dotted path (qkv: "...attention.qkv")
        for path in module_paths:
            name = kohya_name(path)
            self.native[name] = native_name(path)
            self.diffusers[name] = path
            self.by_spelling[native_name(path).replace(".", "_")] = (name, None)
            self.by_spelling[path.replace(".", "_")] = (name, None)
            if path.endswith(".attention.qkv"):
                for i, part in enumerate(_SPLIT):
                    self.by_spelling[path[: -len("qkv")].replace(".", "_") + part] = (name, i)

    def lookup(self, file_name: str) -> tuple[str, int | None] | None:
        n = file_name[len("lora_unet_"):] if file_name.startswith("lora_unet_") else file_name
        for p in PREFIXES:
            if n.startswith(p):
                n = n[len(p):]
                break
        return self.by_spelling.get(n)


def to_model_names(tensors: dict[str, torch.Tensor], table: NameTable, path) -> tuple[dict[str, torch.Tensor], int]:
    """A file's modules (kohya-style names as network/files.py reads them) -> this model's kohya names.

    Returns the renamed tensors and how many split q/k/v modules were fused."""
    from ...network.adapters import group_modules, is_kohya_lora

    modules = group_modules(tensors, str(path))
    out: dict[str, torch.Tensor] = {}
    split: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for name, (cls, parts) in modules.items():
        hit = table.lookup(name)
        if hit is None:
            raise UserError(f"module {name} is not a Z-Image module; the LoRA was made for another model", path=path)
        target, index = hit
        if not in_blocks(table.diffusers[target]):
            raise UserError(f"module {name} ({native_name(table.diffusers[target])}) is outside Z-Image's 34 "
                            "transformer blocks, where difflora applies LoRAs (no peer's default set goes there)",
                            path=path)
        if index is None:
            if any(k.startswith(target + ".") for k in out):
                raise UserError(f"module {target} appears twice in the file (as {name} too)", path=path)
            out.update({f"{target}.{k}": v for k, v in parts.items()})
            continue
        if not is_kohya_lora(cls, parts):
            raise UserError(f"{cls.title} module {name} is one of a split q/k/v projection; only plain LoRA can be "
                            "fused into Z-Image's qkv", path=path)
        split.setdefault(target, {})[index] = parts
    for target, parts in split.items():
        if any(k.startswith(target + ".") for k in out):
            raise UserError(f"the file has both {target} and its split to_q/to_k/to_v modules", path=path)
        out.update(fuse_split_lora(parts, target))
    return out, len(split)


def fuse_split_lora(parts: dict[int, dict[str, torch.Tensor]], target: str) -> dict[str, torch.Tensor]:
    """LoRAs on to_q / to_k / to_v (any subset, any ranks) -> one exact LoRA on the fused qkv."""
    any_part = next(iter(parts.values()))
    d_in = any_part["lora_down.weight"].shape[1]
    d_out = any_part["lora_up.weight"].shape[0]
    downs, ups = [], []
    for i in range(3):
        p = parts.get(i)
        if p is None:
            continue
        down, up = p["lora_down.weight"].float(), p["lora_up.weight"].float()
        rank = down.shape[0]
        scale = float(p["alpha"]) / rank if "alpha" in p else 1.0
        block = torch.zeros(3 * d_out, rank)
        block[i * d_out:(i + 1) * d_out] = up * scale
        downs.append(down.reshape(rank, d_in))
        ups.append(block)
    down, up = torch.cat(downs), torch.cat(ups, dim=1)
    return {f"{target}.lora_down.weight": down, f"{target}.lora_up.weight": up,
            f"{target}.alpha": torch.tensor(float(down.shape[0]))}


def _plain_lora_modules(tensors: dict[str, torch.Tensor], save_format: str) -> dict[str, dict[str, torch.Tensor]]:
    from ...network.adapters import by_module, detect, is_kohya_lora

    modules = by_module(tensors)
    for name, parts in modules.items():
        if not is_kohya_lora(detect(parts), parts):
            raise UserError(f"save_format = {save_format!r} holds plain LoRA modules only ({name} is not); use "
                            "save_format = \"kohya\", which ComfyUI loads for every adapter")
    return modules


def export(tensors: dict[str, torch.Tensor], table: NameTable, save_format: str) -> dict[str, torch.Tensor]:
    """difflora's kohya tensors in the layout save_format names."""
    if save_format == "kohya":
        return tensors
    if save_format == "comfyui":
        out = {}
        for name, parts in _plain_lora_modules(tensors, save_format).items():
            base = "diffusion_model." + table.native[name]
            out[f"{base}.lora_A.weight"] = parts["lora_down.weight"]
            out[f"{base}.lora_B.weight"] = parts["lora_up.weight"]
            if "alpha" in parts:
                out[f"{base}.alpha"] = parts["alpha"]
        return out
    if save_format == "diffusers":
        out = {}
        for name, parts in _plain_lora_modules(tensors, save_format).items():
            down, up = parts["lora_down.weight"], parts["lora_up.weight"]
            rank = down.shape[0]
            scale = float(parts["alpha"]) / rank if "alpha" in parts else 1.0
            up = (up.float() * scale).to(up.dtype)
            path = table.diffusers[name]
            if path.endswith(".attention.qkv"):
                stem = path[: -len("qkv")]
                for part, rows in zip(_SPLIT, up.chunk(3, dim=0)):
                    out[f"transformer.{stem}{part}.lora_A.weight"] = down.clone()
                    out[f"transformer.{stem}{part}.lora_B.weight"] = rows.contiguous()
            else:
                out[f"transformer.{path}.lora_A.weight"] = down
                out[f"transformer.{path}.lora_B.weight"] = up
        return out
    raise UserError(f"save_format = {save_format!r} is not a Z-Image LoRA layout (kohya, comfyui or diffusers)")


def looks_like_zimage(names: list[str]) -> bool:
    """A LoRA's module names are Z-Image's (layers / refiners with feed_forward or attention.qkv/to_out)."""
    table_markers = ("layers_", "noise_refiner_", "context_refiner_")
    for n in names:
        bare = n[len("lora_unet_"):] if n.startswith("lora_unet_") else n
        for p in PREFIXES:
            if bare.startswith(p):
                bare = bare[len(p):]
        if bare.startswith(table_markers) and ("_feed_forward_w" in bare or "_attention_" in bare):
            return True
    return False

