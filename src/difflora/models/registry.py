"""The model families difflora can load, and how a model on disk is matched to one.

Each family is one module under `models/` exposing:

- `detect_folder(path: Path, index: dict) -> str | None`: the family name (one of its `names`)
  when the diffusers folder at `path` (whose `model_index.json` is `index`) is one of its models;
- `detect_single_file(keys: set[str], metadata: dict[str, str]) -> str | None`: the same for a
  single-file checkpoint, from its tensor names (and safetensors metadata);
- `load(path, *, family, dtype, allow_pickle, prediction_type, clip_skip) -> ModelFamily`.

Detection may raise a UserError when a model is clearly of the family but unusable (an SDXL
refiner, a checkpoint missing a text encoder), so the message names what was found. Adding a
family is its module plus one `register_family` line below; `family_names()` feeds the job
config's `model_family` choices.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from ..errors import UserError


@dataclass(frozen=True)
class FamilyEntry:
    names: tuple[str, ...]  # model_family values this module loads (e.g. "sd1", "sd2")
    module_path: str  # import path of the family module
    title: str  # what users call it, for messages

    @property
    def module(self) -> ModuleType:
        return importlib.import_module(self.module_path)


FAMILIES: list[FamilyEntry] = []


def register_family(names: tuple[str, ...] | str, module_path: str, title: str) -> None:
    names = (names,) if isinstance(names, str) else tuple(names)
    FAMILIES.append(FamilyEntry(names, module_path, title))


register_family("flux", "difflora.models.flux", "FLUX.1")  # before SDXL: FLUX folders have a text_encoder_2 too
register_family(("sd1", "sd2"), "difflora.models.sd", "Stable Diffusion 1.x / 2.x")
register_family("sdxl", "difflora.models.sdxl", "SDXL")
register_family("qwen_image", "difflora.models.qwen_image", "Qwen-Image / Qwen-Image-Edit")


def family_names() -> tuple[str, ...]:
    """Every accepted `model_family` value, in registry order."""
    return tuple(n for e in FAMILIES for n in e.names)


def entry_for(name: str) -> FamilyEntry:
    for e in FAMILIES:
        if name in e.names:
            return e
    raise UserError(f"unknown model family {name!r}; choose one of: {', '.join(family_names())}")


def supported_titles() -> str:
    return ", ".join(e.title for e in FAMILIES)


# ------------------------------------------------------------------ detection
# Models of families difflora does not (yet) train, recognised only to say what they are.
_FOREIGN_KEYS = (
    ("double_blocks.", "FLUX"), ("model.diffusion_model.double_blocks.", "FLUX"),
    ("joint_blocks.", "Stable Diffusion 3"), ("model.diffusion_model.joint_blocks.", "Stable Diffusion 3"),
)


def read_model_index(path: Path) -> dict:
    index = path / "model_index.json"
    if not index.exists():
        raise UserError("not a diffusers model folder (model_index.json is missing)", path=path)
    try:
        info = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise UserError(f"unreadable model_index.json ({e})", path=path) from None
    if not isinstance(info, dict):
        raise UserError("model_index.json is not a JSON object", path=path)
    return info


def detect_folder(path: Path) -> str:
    """The family name of a diffusers folder, or a UserError naming what the folder is."""
    index = read_model_index(path)
    for e in FAMILIES:
        found = e.module.detect_folder(path, index)
        if found:
            return found
    cls = index.get("_class_name") or "an unknown pipeline"
    raise UserError(f"model_index.json describes {cls}, which difflora does not support "
                    f"(supported: {supported_titles()})", path=path)


def detect_single_file(keys: set[str], metadata: dict[str, str], path) -> str:
    """The family name of a single-file checkpoint, or a UserError naming what the file is."""
    for e in FAMILIES:
        found = e.module.detect_single_file(keys, metadata)
        if found:
            return found
    if any(k.startswith("lora_") or ".lora_down." in k or ".lora_A." in k for k in keys):
        raise UserError("this is a LoRA file, not a model checkpoint", path=path)
    for prefix, title in _FOREIGN_KEYS:
        if any(k.startswith(prefix) for k in keys):
            raise UserError(f"this looks like a {title} checkpoint, which difflora does not support "
                            f"(supported: {supported_titles()})", path=path)
    raise UserError(f"not a checkpoint of a supported model family ({supported_titles()}): none of their "
                    "tensor names were found", path=path)


def family_job_keys() -> frozenset[str]:
    """The job keys that belong to some families only (a model honours its `honoured_job_keys`)."""
    from .flux_options import FLUX_ONLY_KEYS
    from .qwen_image.options import QWEN_IMAGE_KEYS

    return frozenset(FLUX_ONLY_KEYS) | frozenset(QWEN_IMAGE_KEYS)


def method_defaults(family: str | None, method: str) -> dict:
    """A family's recommended values for a method (its module's METHOD_DEFAULTS), e.g. ADDifT on SDXL."""
    if family is None:
        return {}
    return dict(getattr(entry_for(family).module, "METHOD_DEFAULTS", {}).get(method, {}))
