"""Adapter files: kohya/LyCORIS layout on disk, kohya, LyCORIS and peft/diffusers layouts accepted on read.

Writing: `<name>.lora_down.weight`, `<name>.lora_up.weight`, `<name>.alpha` (LoHa `hada_*`, LoKr
`lokr_*`, DoRA `dora_scale` in LyCORIS' layout), cast to the save dtype (alpha too, as kohya and
LyCORIS do), with kohya's `ss_*` metadata, the sd-webui-additional-networks hashes
(`sshs_model_hash`, `sshs_legacy_hash`) and SAI ModelSpec keys.

Reading: kohya and LyCORIS files as they are (each module's algorithm from its keys, checked
by its adapter class); peft/diffusers files (`...lora_A.weight` / `lora_B.weight`, optional
`.default` adapter segment, `unet.` / `text_encoder.` prefixes) are renamed to kohya names,
their alpha taken from the adapter metadata when present, else alpha = rank.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save as st_save

from ..dtypes import dtype_named
from ..errors import UserError
from ..fileio import PICKLE_SUFFIXES, atomic_path, load_safetensors, require_finite
from .adapters import (KOHYA_LORA_MODULE, LYCORIS_MODULE, Adapter, by_module, detect, group_modules, is_kohya_lora,
                       module_rank_alpha, module_shapes)
from .metadata import describe_plain_lora

log = logging.getLogger(__name__)

def save_dtype(name: str | None) -> torch.dtype | None:
    """save_precision: None keeps the tensors' own dtype."""
    return None if name is None else dtype_named(name)


@dataclass
class LoraFile:
    tensors: dict[str, torch.Tensor]  # kohya / LyCORIS names
    metadata: dict[str, str] = field(default_factory=dict)
    path: str = ""
    source_format: str = "kohya"  # or "peft"

    @property
    def modules(self) -> dict[str, tuple[type[Adapter], dict[str, torch.Tensor]]]:
        """Per module: its adapter class and its tensors by key suffix (checked on load)."""
        cached = self.__dict__.get("_modules")
        if cached is None:
            cached = self.__dict__["_modules"] = group_modules(self.tensors, self.path)
        return cached

    def module_names(self) -> list[str]:
        return sorted(self.modules)

    def adapter(self, name: str) -> type[Adapter]:
        return self.modules[name][0]

    def is_plain_lora(self) -> bool:
        """Every module a kohya LoRA/LoCon without DoRA or Tucker core: the form kohya's tools take."""
        return all(is_kohya_lora(cls, parts) for cls, parts in self.modules.values())

    def rank_alpha(self, name: str) -> tuple[int, float]:
        cls, parts = self.modules[name]
        rank, alpha, _ = module_rank_alpha(cls, parts)
        return rank, alpha

    def scale(self, name: str) -> float:
        cls, parts = self.modules[name]
        return module_rank_alpha(cls, parts)[2]


# ------------------------------------------------------------------ hashes
def sshs_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) as sd-webui-additional-networks computes them.

    Only the immutable `ss_*` metadata takes part, so later user metadata does not change them:
    the model hash is the sha256 of the data section of that serialization, the legacy hash the
    first 8 hex digits of the sha256 of 64 KiB at offset 1 MiB.
    """
    blob = st_save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    n = int.from_bytes(blob[:8], "little")
    model_hash = hashlib.sha256(blob[8 + n:]).hexdigest()
    legacy_hash = hashlib.sha256(blob[0x100000:0x100000 + 0x10000]).hexdigest()[:8]
    return model_hash, legacy_hash


def _modelspec(metadata: dict[str, str], title: str, resolution: str | None) -> dict[str, str]:
    spec = {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.title": title,
        "modelspec.date": _dt.datetime.now().replace(microsecond=0).isoformat(),
        "modelspec.implementation_version": "difflora/0.1.0",
    }
    if resolution:
        spec["modelspec.resolution"] = resolution
    spec.update({k: v for k, v in metadata.items() if k.startswith("modelspec.")})
    return spec


def save_lora(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None,
              dtype: torch.dtype | None = None, title: str | None = None) -> dict[str, str]:
    """Atomically write a kohya-format LoRA file; returns the metadata written."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise UserError("LoRA files are written as .safetensors", path=path)
    out = {k: (v.to(dtype) if dtype is not None else v).detach().to("cpu").contiguous() for k, v in tensors.items()}
    require_finite(out, path, "LoRA")
    md = {k: str(v) for k, v in (metadata or {}).items()}
    modules = [(detect(parts), parts) for parts in by_module(out).values()]
    dims = {cls.rank_of(module_shapes(parts)) for cls, parts in modules if cls is not None}
    alphas = {float(out[k].float()) for k in out if k.endswith(".alpha")}
    plain = all(cls is not None and is_kohya_lora(cls, parts) for cls, parts in modules)
    if plain and md.get("ss_network_module") == LYCORIS_MODULE:  # the tensors decide what the file is
        describe_plain_lora(md)
    md.setdefault("ss_network_module", KOHYA_LORA_MODULE if plain else LYCORIS_MODULE)
    md.setdefault("ss_network_dim", str(dims.pop()) if len(dims) == 1 else "Dynamic")
    md.setdefault("ss_network_alpha", _fmt_alpha(alphas.pop()) if len(alphas) == 1 else "Dynamic")
    md.setdefault("ss_output_name", path.stem)
    md.update(_modelspec(md, title or md.get("ss_output_name", path.stem), md.get("modelspec.resolution")))
    model_hash, legacy_hash = sshs_hashes(out, md)
    md["sshs_model_hash"] = model_hash
    md["sshs_legacy_hash"] = legacy_hash
    with atomic_path(path) as tmp:
        tmp.write_bytes(st_save(out, md))
    return md


def _fmt_alpha(a: float) -> str:
    return str(int(a)) if float(a).is_integer() else str(a)


# ------------------------------------------------------------------ reading
_PEFT_KEY = re.compile(r"^(?P<mod>.+?)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
# DoRA's magnitude per output row (peft saves it without `.weight`; transformers' text encoders with it)
_PEFT_MAGNITUDE = re.compile(r"^(?P<mod>.+?)\.lora_magnitude_vector(?:\.(?P<adapter>[^.]+))?(?:\.weight)?$")


def warn_dora_for_diffusers(adapter) -> None:
    """Once before training: DoRA saved for diffusers trains the output-axis magnitude (adapter.dora_on_output)."""
    if adapter.dora_wd:
        log.warning('DoRA with save_format = "diffusers": the magnitude is trained per output row, as peft\'s '
                    "lora_magnitude_vector that diffusers loads; ComfyUI applies DoRA per input channel (the kohya "
                    "files' axis), so save the kohya format for it")


def peft_lora_parts(parts: dict[str, torch.Tensor], name: str, save_format: str = "diffusers"
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A kohya module as peft holds it: (lora_A, lora_B with alpha/rank baked in, DoRA's lora_magnitude_vector or
    None). peft's magnitude is one per output row, so only an output-axis `dora_scale` (O, 1) has that form (DoRA
    trained with save_format = "diffusers"); LoHa, LoKr and Tucker cores have none. A UserError otherwise."""
    cls = detect(parts)
    plain = {k: v for k, v in parts.items() if k != "dora_scale"}
    if cls is None or not is_kohya_lora(cls, plain):
        raise UserError(f"save_format = {save_format!r} holds LoRA (and DoRA) modules only; {name} is "
                        f"{cls.title if cls else 'not a LoRA module'} (save it as kohya)")
    down, up = plain["lora_down.weight"], plain["lora_up.weight"]
    rank = down.shape[0]
    scale = (float(plain["alpha"]) if "alpha" in plain else float(rank)) / rank
    magnitude = parts.get("dora_scale")
    if magnitude is not None:
        if magnitude.shape[0] != up.shape[0] or magnitude.numel() != up.shape[0]:
            raise UserError(f"module {name}: DoRA's dora_scale {tuple(magnitude.shape)} is per input channel "
                            "(A1111/ComfyUI's axis); diffusers' lora_magnitude_vector is per output row: train with "
                            'save_format = "diffusers" from the start, or save the kohya format')
        magnitude = magnitude.reshape(-1)
    return down, (up.float() * scale).to(down.dtype), magnitude


def peft_module_to_kohya(module_path: str) -> str:
    """'unet.down_blocks.0...to_q' / 'text_encoder.encoder.layers.0.self_attn.q_proj' -> kohya name."""
    p = module_path
    for prefix in ("base_model.model.", "model."):
        if p.startswith(prefix):
            p = p[len(prefix):]
    if p.startswith("text_encoder_2."):
        rest, prefix = p[len("text_encoder_2."):], "lora_te2"
    elif p.startswith("text_encoder."):
        rest, prefix = p[len("text_encoder."):], "lora_te"
    else:
        rest, prefix = (p[len("unet."):] if p.startswith("unet.") else p), "lora_unet"
    if prefix.startswith("lora_te") and not rest.startswith("text_model."):
        rest = "text_model." + rest
    return f"{prefix}.{rest}".replace(".", "_")


def _from_peft(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: str) -> dict[str, torch.Tensor]:
    alpha_cfg = {}
    raw = metadata.get("lora_adapter_metadata")
    if raw:
        try:
            alpha_cfg = json.loads(raw)
        except ValueError:
            alpha_cfg = {}
    out: dict[str, torch.Tensor] = {}
    for k, v in tensors.items():
        m = _PEFT_KEY.match(k)
        magnitude = None if m else _PEFT_MAGNITUDE.match(k)
        if magnitude:
            out[peft_module_to_kohya(magnitude["mod"]) + ".dora_scale"] = v.reshape(-1, 1)
            continue
        if not m:
            if k.endswith(".alpha"):
                out[peft_module_to_kohya(k[: -len(".alpha")]) + ".alpha"] = v
                continue
            raise UserError(f"unrecognised key {k!r} in a peft-format LoRA", path=path)
        name = peft_module_to_kohya(m["mod"])
        out[f"{name}.{'lora_down' if m['ab'] == 'A' else 'lora_up'}.weight"] = v
    for name in {k.split(".", 1)[0] for k in out}:
        if f"{name}.alpha" not in out and f"{name}.lora_down.weight" in out:
            down = out[f"{name}.lora_down.weight"]
            if down.dim() == 0:
                raise UserError(f"module {name} has a scalar lora_A weight; the file is damaged", path=path)
            rank = down.shape[0]
            try:
                alpha = float(alpha_cfg.get("lora_alpha", rank)) if isinstance(alpha_cfg, dict) else float(rank)
            except (TypeError, ValueError):
                raise UserError("bad lora_alpha in the lora_adapter_metadata", path=path) from None
            out[f"{name}.alpha"] = torch.tensor(alpha)
    return out


def load_lora(path: str | os.PathLike) -> LoraFile:
    """Read and check a LoRA file (kohya or peft layout) into kohya names."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UserError(f"refusing to load a pickle-based {path.suffix} LoRA file (pickle can run code)", path=path,
                        hint="LoRA files are read only as .safetensors; convert it")
    tensors, metadata = load_safetensors(path)
    if not tensors:
        raise UserError("file holds no tensors", path=path)
    fmt = "kohya"
    if any(".lora_A." in k or ".lora_B." in k or k.endswith(".lora_A.weight") for k in tensors):
        tensors = _from_peft(tensors, metadata, str(path))
        fmt = "peft"
    lora = LoraFile(dict(tensors), metadata, str(path), fmt)
    alpha_zero = []
    for n, (cls, parts) in lora.modules.items():
        a = parts.get("alpha")
        if a is not None and float(a) == 0.0:
            # kohya: alpha 0 means alpha = rank (no scaling); say so rather than guess silently
            lora.tensors[f"{n}.alpha"] = parts["alpha"] = torch.tensor(float(cls.rank_of(
                {k: tuple(v.shape) for k, v in parts.items() if k not in ("alpha", "dora_scale")})))
            alpha_zero.append(n)
    if alpha_zero:
        import logging

        logging.getLogger(__name__).warning("%s: %d module(s) (%s%s) have alpha 0; using alpha = rank (kohya's rule)",
                                            path, len(alpha_zero), alpha_zero[0], ", ..." if len(alpha_zero) > 1 else "")
    return lora


def read_metadata_only(path: str | os.PathLike) -> dict[str, str]:
    from ..fileio import read_safetensors_header

    _, md = read_safetensors_header(path)
    return md


