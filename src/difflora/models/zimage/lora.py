"""Z-Image LoRA names: what difflora writes, and every peer's spelling it reads.

difflora's modules are the model's own (models/zimage/transformer.py): `layers.N.attention.qkv` (fused),
`attention.to_out.0`, `feed_forward.w1/w2/w3`, named in kohya's style after the native layout:
`lora_unet_layers_0_attention_qkv`, `lora_unet_layers_0_attention_out`, `lora_unet_layers_0_feed_forward_w1`
(what musubi's convert_z_image_lora_to_comfy.py writes). ComfyUI maps all of them (musubi's own split names
`..._attention_to_q` lose every attention module there: 90 of 210 apply) and diffusers' Z-Image converter
splits `qkv` (210 of 210).

save_format:
- "kohya" (default): the names above, any adapter;
- "musubi": musubi-tuner's own names (its model splits q/k/v: `lora_unet_layers_0_attention_to_q/_to_k/_to_v`,
  `..._attention_to_out_0`, `..._feed_forward_w1`; 210 modules), which its loader applies whole and diffusers'
  converter too, but ComfyUI's key map only in part (90 of 210: no `lora_unet_` diffusers names there, ComfyUI
  issue #11487). The fused qkv module splits exactly by output rows: LoRA's up, LoHa's w1_a / w2_a, LoKr's w1 (when
  its rows divide by 3), the other factors and alpha shared. No DoRA (musubi has none);
- "comfyui": `diffusion_model.<native path>.lora_A/.lora_B.weight` + `.alpha` (LoRA only);
- "diffusers": `transformer.<diffusers path>.lora_A/.lora_B.weight` with `qkv` split into to_q/to_k/to_v
  (the shared down matrix, each its rows of up) and the scale baked in; DoRA (trained per output row for this
  format) as peft's `lora_magnitude_vector`, split with the rows. LoRA and DoRA only.

Read: those four, musubi's split kohya names, ai-toolkit's and musubi-converted `diffusion_model.<diffusers>`
(no alpha: scale 1), DiffSynth's bare `<diffusers>.lora_A.default.weight`, SimpleTuner's `lycoris_` names;
split q/k/v modules are fused exactly: pieces sharing every factor but their output rows (difflora's "musubi" and
"diffusers" files, a per-row DoRA magnitude included) back to the module that wrote them (Adapter.stack_output_rows),
other LoRA / LoHa pieces block-diagonally (rank summed, scale baked).
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
    from ...network.adapters import group_modules

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
        split.setdefault(target, {})[index] = (cls, parts)
    for target, pieces in split.items():
        if any(k.startswith(target + ".") for k in out):
            raise UserError(f"the file has both {target} and its split to_q/to_k/to_v modules", path=path)
        out.update(fuse_split(pieces, target, path))
    return out, len(split)


def fuse_split(pieces: dict[int, tuple[type, dict[str, torch.Tensor]]], target: str, path) -> dict[str, torch.Tensor]:
    """to_q / to_k / to_v modules (index -> (adapter class, tensors)) of one projection -> one exact module on the
    fused qkv: pieces sharing their other factors (difflora's musubi and diffusers files) back to the module that
    wrote them; other LoRA / LoHa pieces block-diagonally."""
    from ...network.adapters import LoHa, is_kohya_lora

    classes = {cls for cls, _ in pieces.values()}
    if len(classes) > 1:
        raise UserError(f"{target}: its split q/k/v modules are of different adapters", path=path)
    cls = classes.pop()
    parts = {i: p for i, (_, p) in sorted(pieces.items())}
    if len(parts) == 3:
        stacked = cls.stack_output_rows(list(parts.values()))
        if stacked is not None:
            return {f"{target}.{k}": v for k, v in stacked.items()}
    if any("dora_scale" in p for p in parts.values()):
        raise UserError(f"{target}: split q/k/v DoRA modules fuse into Z-Image's qkv only when they share lora_down "
                        "and keep the magnitude per output row (as difflora's diffusers-format files do)", path=path)
    if all(is_kohya_lora(cls, p) for p in parts.values()):
        return fuse_split_lora(parts, target)
    if cls is LoHa and not any(k in p for p in parts.values() for k in cls.tucker_keys):
        return _fuse_split_loha(parts, target)
    raise UserError(f"{target}: split q/k/v {cls.title} modules that do not share their other factors (or have Tucker "
                    "cores) have no exact fused form on Z-Image's qkv", path=path)


def _fuse_split_loha(parts: dict[int, dict[str, torch.Tensor]], target: str) -> dict[str, torch.Tensor]:
    """LoHa pieces: ΔW's rows are (w1_a_i w1_b_i) ⊙ (w2_a_i w2_b_i) · scale_i, so w1_a / w2_a go block-diagonal
    (zero rows for a missing piece), w1_b / w2_b stack, and each piece's scale is baked into its w1_a."""
    any_part = next(iter(parts.values()))
    d_out = any_part["hada_w1_a"].shape[0]
    rank = sum(p["hada_w1_b"].shape[0] for p in parts.values())
    w1a, w2a = torch.zeros(3 * d_out, rank), torch.zeros(3 * d_out, rank)
    w1b, w2b, col = [], [], 0
    for i, p in sorted(parts.items()):
        r = p["hada_w1_b"].shape[0]
        scale = float(p["alpha"]) / r if "alpha" in p else 1.0
        w1a[i * d_out:(i + 1) * d_out, col:col + r] = p["hada_w1_a"].float() * scale
        w2a[i * d_out:(i + 1) * d_out, col:col + r] = p["hada_w2_a"].float()
        w1b.append(p["hada_w1_b"].float())
        w2b.append(p["hada_w2_b"].float())
        col += r
    return {f"{target}.hada_w1_a": w1a, f"{target}.hada_w1_b": torch.cat(w1b), f"{target}.hada_w2_a": w2a,
            f"{target}.hada_w2_b": torch.cat(w2b), f"{target}.alpha": torch.tensor(float(rank))}


def _musubi_module(parts: dict[str, torch.Tensor], name: str) -> type:
    """The adapter of a module musubi-tuner's loader can apply (it has no DoRA)."""
    from ...network.adapters import detect

    if "dora_scale" in parts:
        raise UserError(f'save_format = "musubi" cannot hold {name}\'s DoRA (musubi-tuner has none: its loader '
                        'would apply the LoRA part only); save_format = "kohya" keeps it (ComfyUI applies it)')
    return detect(parts)


def split_fused(parts: dict[str, torch.Tensor], name: str) -> list[dict[str, torch.Tensor]]:
    """One module on the fused qkv -> its to_q / to_k / to_v modules, exactly (musubi's split model)."""
    cls = _musubi_module(parts, name)
    pieces = cls.split_output_rows(parts, 3)
    if pieces is None:
        raise UserError(f'save_format = "musubi": {cls.title} module {name} does not split exactly into q, k and v '
                        "(a Tucker core, or LoKr's w1 with rows that do not divide by 3: its Kronecker product "
                        "interleaves them; choose network_factor as a multiple of 3, or -1 on the real model); "
                        'save_format = "kohya" keeps it')
    return pieces


def to_musubi(tensors: dict[str, torch.Tensor], table: NameTable) -> dict[str, torch.Tensor]:
    """difflora's kohya tensors under musubi-tuner's names (its split model's `lora_unet_<diffusers path>`)."""
    from ...network.adapters import by_module

    out = {}
    for name, parts in by_module(tensors).items():
        path = table.diffusers[name]
        if path.endswith(".attention.qkv"):
            stem = path[: -len("qkv")]
            for part, piece in zip(_SPLIT, split_fused(parts, name)):
                out.update({f"lora_unet_{stem + part}".replace(".", "_") + f".{k}": v for k, v in piece.items()})
            continue
        _musubi_module(parts, name)
        out.update({f"lora_unet_{path}".replace(".", "_") + f".{k}": v for k, v in parts.items()})
    return out


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
    if save_format == "musubi":
        return to_musubi(tensors, table)
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
        from ...network.adapters import by_module
        from ...network.files import peft_lora_parts

        out = {}
        for name, parts in by_module(tensors).items():
            down, up, magnitude = peft_lora_parts(parts, name)
            path = table.diffusers[name]
            pieces = [path]
            if path.endswith(".attention.qkv"):  # diffusers' split q/k/v: the whole A, each its rows of B
                pieces = [path[: -len("qkv")] + part for part in _SPLIT]
            for i, piece in enumerate(pieces):
                rows = slice(i * up.shape[0] // len(pieces), (i + 1) * up.shape[0] // len(pieces))
                out[f"transformer.{piece}.lora_A.weight"] = down.clone() if len(pieces) > 1 else down
                out[f"transformer.{piece}.lora_B.weight"] = up[rows].contiguous()
                if magnitude is not None:
                    out[f"transformer.{piece}.lora_magnitude_vector"] = magnitude[rows].contiguous()
        return out
    raise UserError(f"save_format = {save_format!r} is not a Z-Image LoRA layout (kohya, musubi, comfyui or diffusers)")


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

