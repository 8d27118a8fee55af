"""Plumbing shared by the LoRA tools: reading and cross-checking LoRA files, ratios, devices, metadata."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from ..errors import UserError
from ..models.plugin import FamilyPlugin
from ..network.adapters import module_shapes
from ..models.registry import family_of_version, lora_owner
from ..network.files import LoraFile, load_lora

# modelspec keys describing the base model, carried from the inputs to a merged LoRA
_MODELSPEC_BASE_KEYS = ("modelspec.architecture", "modelspec.implementation", "modelspec.prediction_type",
                        "modelspec.resolution")


def check_ratios(models: list, ratios: list[float] | None) -> list[float]:
    """One ratio per model (all 1.0 when none are given), finite."""
    if ratios is None:
        return [1.0] * len(models)
    if len(ratios) != len(models):
        raise UserError(f"{len(ratios)} ratio(s) given for {len(models)} model file(s); "
                        "give exactly one --ratios value per --models file")
    for r in ratios:
        if not math.isfinite(r):
            raise UserError(f"ratio {r} is not a finite number")
    return [float(r) for r in ratios]


def check_rank(value: int | None, option: str) -> None:
    if value is not None and value < 1:
        raise UserError(f"{option} must be at least 1, got {value}")


def check_lora_output(path: str | os.PathLike) -> Path:
    """Fail before any work when the LoRA output path cannot be written as asked."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise UserError("LoRA files are written as .safetensors; give --save-to a .safetensors path", path=path)
    if path.is_dir():
        raise UserError("is a folder; --save-to needs a file path", path=path)
    return path


def resolve_device(name: str | None) -> torch.device:
    name = name or "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"unknown device {name!r}; use cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for, but CUDA is not available on this machine")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"unsupported device {name!r}; use cpu or cuda")
    return device


def _layout(lora: LoraFile, name: str) -> tuple[int, int]:
    """(out, in·kh·kw) of a module's delta, whatever its algorithm."""
    cls, parts = lora.modules[name]
    return cls.flat_shape(module_shapes(parts))


def check_compatible(loras: list[LoraFile]) -> None:
    """Refuse LoRA files made for different architectures, naming the file that disagrees."""
    first_version: tuple[str, LoraFile] | None = None
    first_naming: tuple[FamilyPlugin, LoraFile] | None = None
    for lora in loras:
        v = lora.metadata.get("ss_base_model_version")
        if v:
            if first_version is None:
                first_version = (v, lora)
            elif (family_of_version(v) or v) != (family_of_version(first_version[0]) or first_version[0]):
                raise UserError(f"LoRA is for {v} but {Path(first_version[1].path).name} is for {first_version[0]} "
                                "(ss_base_model_version); LoRAs of different model families cannot be combined",
                                path=lora.path)
        owner = lora_owner(set(lora.module_names()), lora.metadata)  # None: no family's names (the shapes decide)
        if owner is None:
            continue
        if first_naming is None:
            first_naming = (owner, lora)
        elif owner is not first_naming[0]:
            raise UserError(f"LoRA uses {owner.title} module names but {Path(first_naming[1].path).name} uses "
                            f"{first_naming[0].title} names; LoRAs of different architectures cannot be combined",
                            path=lora.path)
    seen: dict[str, tuple[tuple[int, int], LoraFile]] = {}
    for lora in loras:
        for name in lora.module_names():
            lay = _layout(lora, name)
            if name in seen and seen[name][0] != lay:
                (o, i), other = seen[name]
                raise UserError(
                    f"module {name} is {lay[0]} out x {lay[1]} in (kernel included) here but {o} out x {i} in in "
                    f"{Path(other.path).name}; the LoRAs were made for different architectures", path=lora.path)
            seen.setdefault(name, (lay, lora))


def load_loras(paths: list[str | os.PathLike]) -> list[LoraFile]:
    """Read every file (kohya or peft layout) and check that they belong to one architecture."""
    if not paths:
        raise UserError("no LoRA files given (--models)")
    loras = [load_lora(p) for p in paths]
    check_compatible(loras)
    return loras


def states(loras: list[LoraFile], device: torch.device | str = "cpu") -> list[dict[str, torch.Tensor]]:
    """Float32 kohya state dicts on `device` (the LoRA maths is done in float32 or float64)."""
    return [{k: v.to(device=device, dtype=torch.float32) for k, v in lf.tensors.items()} for lf in loras]


def merged_metadata(loras: list[LoraFile], extra_sources: list[str] | None = None) -> dict[str, str]:
    """kohya's minimum metadata for a LoRA built from others, plus ModelSpec `merged_from`.

    ss_v2 / ss_base_model_version and the base-model ModelSpec keys come from the first file that
    has them; ss_network_dim / ss_network_alpha are left to `save_lora` (value or "Dynamic").
    """
    # a family's own sd-scripts module (networks.lora_flux) when every input says it; plain kohya LoRA otherwise
    modules = {lf.metadata.get("ss_network_module") for lf in loras}
    module = modules.pop() if len(modules) == 1 else None
    md: dict[str, str] = {"ss_network_module": module if module and module.startswith("networks.lora_") else
                          "networks.lora"}
    for key in ("ss_v2", "ss_base_model_version", *_MODELSPEC_BASE_KEYS):
        for lf in loras:
            if key in lf.metadata:
                md[key] = lf.metadata[key]
                break
    sources = list(extra_sources or []) + [Path(lf.path).stem for lf in loras]
    md["modelspec.merged_from"] = ", ".join(sources)
    return md


def network_args(conv_rank: int | None) -> dict[str, str]:
    if not conv_rank:
        return {}
    return {"ss_network_args": json.dumps({"conv_dim": str(conv_rank), "conv_alpha": str(conv_rank)})}


def is_kxk(down_shape: tuple[int, ...]) -> bool:
    return len(down_shape) == 4 and tuple(down_shape[2:]) != (1, 1)


def base_weights(model_path: str | os.PathLike | None, loras: list[LoraFile], allow_pickle: bool = False
                 ) -> dict[str, torch.Tensor] | None:
    """The frozen weights of the modules the LoRAs touch, from `--model` (None without one).

    Converting LoHa/LoKr/DoRA to LoRA needs them: DoRA's delta depends on the base weight, and
    LyCORIS files flatten a conv's kernel, so only the model knows the layer's shape.
    """
    if model_path is None:
        return None
    from ..models import load_model
    from ..network.apply import check_lora_fits

    model = load_model(model_path, allow_pickle=allow_pickle)
    for lora in loras:
        check_lora_fits(model, model.adapt_lora_file(lora))
    wanted = {n for lora in loras for n in lora.module_names()}
    return {t.name: t.module.weight.detach().float() for t in model.lora_targets(conv=True) if t.name in wanted}
