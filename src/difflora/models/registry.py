"""The model families difflora can load, and how a model on disk is matched to one.

A family is one package under `models/` whose light `__init__.py` defines `PLUGIN`, a
`models/plugin.py:FamilyPlugin`; adding a family is its package plus one `register_family` line
below. `family_names()` feeds the job config's `model_family` choices, `option_tables()` its
family keys.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..options import Strict
from .plugin import FamilyPlugin

FAMILIES: list[FamilyPlugin] = []


def register_family(module_path: str) -> None:
    """Register the family package at `module_path` (its `PLUGIN`). Detection asks families in this order."""
    plugin = importlib.import_module(module_path).PLUGIN
    if not isinstance(plugin, FamilyPlugin):
        raise TypeError(f"{module_path}.PLUGIN is not a FamilyPlugin")
    taken = set(family_names()) & set(plugin.names)
    if taken:
        raise ValueError(f"{module_path}: model_family {', '.join(sorted(taken))} is already registered")
    for other in FAMILIES:
        for key in set(plugin.options.model_fields) & set(other.options.model_fields):
            if _definition(plugin.options, key) != _definition(other.options, key):
                raise ValueError(f"{module_path}: job key {key} differs from {other.title}'s; one key means one "
                                 "thing (declare it once, in a table of models/shared_options.py both include)")
    FAMILIES.append(plugin)


def _definition(table: type[Strict], key: str) -> tuple:
    field = table.model_fields[key]
    return field.annotation, field.default, tuple(map(repr, field.metadata))


def family_names() -> tuple[str, ...]:
    """Every accepted `model_family` value, in registry order."""
    return tuple(n for p in FAMILIES for n in p.names)


def plugin_for(name: str) -> FamilyPlugin:
    for p in FAMILIES:
        if name in p.names:
            return p
    raise UserError(f"unknown model family {name!r}; choose one of: {', '.join(family_names())}")


def supported_titles() -> str:
    return ", ".join(p.title for p in FAMILIES)


register_family("difflora.models.flux2")  # before FLUX.1, whose detection claims every Flux* folder
register_family("difflora.models.flux")  # before SDXL: FLUX folders have a text_encoder_2 too
register_family("difflora.models.zimage")
register_family("difflora.models.qwen_image")
register_family("difflora.models.sd")
register_family("difflora.models.sdxl")


# ------------------------------------------------------------------ family options
def option_tables() -> list[tuple[FamilyPlugin, type[Strict]]]:
    """Each family with its option table (the job schema holds every family's keys, top-level)."""
    return [(p, p.options) for p in FAMILIES]


def family_keys() -> set[str]:
    return {k for _, table in option_tables() for k in table.model_fields}


def family_options_of(job) -> dict[str, Any]:
    """The family keys a job sets (the others keep their tables' defaults)."""
    return {k: getattr(job, k) for k in family_keys() & job.model_fields_set}


def family_options(plugin: FamilyPlugin, values: Mapping[str, Any] | None, path=None,
                   key_label: Callable[[str], str] = str) -> Strict:
    """`plugin`'s option table from `values` (family keys of any family). A key only other families have,
    given a value other than its default, is refused with one line naming it and the families it belongs to;
    `key_label` spells a key as the user wrote it (a job key, or generate's --flag)."""
    values = dict(values or {})
    own = plugin.options.model_fields
    for key in sorted(set(values) - set(own)):
        owners = [(p, table) for p, table in option_tables() if key in table.model_fields]
        if not owners:
            raise ValueError(f"{key} is no model family's option")
        if values[key] == owners[0][1].model_fields[key].default:
            continue  # the value it would have anyway changes nothing
        titles = " / ".join(p.title for p, _ in owners)
        raise UserError(f"{key_label(key)} applies to {titles} models only; this model is {plugin.title}", path=path)
    from pydantic import ValidationError

    try:
        table = plugin.options.model_validate({k: v for k, v in values.items() if k in own})
    except ValidationError as e:
        first = e.errors()[0]
        key = ".".join(str(x) for x in first["loc"])
        raise UserError(f"{key_label(key)}: {first['msg']}", path=path) from None
    variant = values.get("model_variant")
    if variant is not None and "model_variant" in own and variant not in plugin.model_variants:
        raise UserError(f"{key_label('model_variant')} = {variant!r} is not a {plugin.title} model; this family's "
                        f"variants: {', '.join(plugin.model_variants)}", path=path)
    return table


# ------------------------------------------------------------------ LoRA files
def lora_owner(names: set[str], metadata: dict[str, str]) -> FamilyPlugin | None:
    """The family whose kohya module names a LoRA file uses (first in registry order), None when none does."""
    return next((p for p in FAMILIES if p.owns_lora_names(names, metadata)), None)


def family_of_version(version: str) -> str | None:
    """The model_family a kohya ss_base_model_version names ("sd_v1" -> "sd1"), None when no family knows it."""
    return next((f for p in FAMILIES if (f := p.family_of_version(version))), None)


# ------------------------------------------------------------------ detection
# Models of families difflora does not (yet) train, recognised only to say what they are.
_FOREIGN_KEYS = (
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
    for p in FAMILIES:
        found = p.detect_folder(path, index)
        if found:
            return found
    cls = index.get("_class_name") or "an unknown pipeline"
    raise UserError(f"model_index.json describes {cls}, which difflora does not support "
                    f"(supported: {supported_titles()})", path=path)


def detect_single_file(keys: set[str], metadata: dict[str, str], path) -> str:
    """The family name of a single-file checkpoint, or a UserError naming what the file is."""
    for p in FAMILIES:
        found = p.detect_single_file(keys, metadata)
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


def method_defaults(family: str | None, method: str) -> dict:
    """A family's recommended values for a method (its plugin's method_defaults), e.g. ADDifT on SDXL."""
    if family is None:
        return {}
    return dict(plugin_for(family).method_defaults.get(method, {}))
