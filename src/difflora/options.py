"""The base of every option table (the job, the dataset levels, each method's table).

Its own module so that the method modules, which own their option tables, and config.py,
which assembles the job schema from them, do not import each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Iterator, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator


def _accepts(annotation, kind: type) -> bool:
    """Whether a field's annotation takes a value of `kind` as itself (Any, the type, a Literal of one)."""
    if annotation is Any or annotation is kind:
        return True
    if get_origin(annotation) is Literal:
        return any(isinstance(v, kind) for v in get_args(annotation))
    if get_origin(annotation) in (list, tuple, dict, set):
        return False
    return any(_accepts(a, kind) for a in get_args(annotation))


class Strict(BaseModel):
    """Unknown keys are refused (a misspelt key never silently does nothing); assignments are validated.

    Booleans are not numbers (pydantic would read `min_timestep = true` as 1), and a boolean key takes
    a TOML boolean, not a word (kohya would read `flip_aug = "no"` as true).
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _typed(cls, value, info: ValidationInfo):
        annotation = cls.model_fields[info.field_name].annotation
        if isinstance(value, bool) and not _accepts(annotation, bool):
            raise ValueError(f"takes {'a number' if _accepts(annotation, int) or _accepts(annotation, float) else 'a value'}"
                             f", not the boolean {str(value).lower()}")
        if isinstance(value, str) and _accepts(annotation, bool) and not _accepts(annotation, str):
            raise ValueError(f"takes true or false (a TOML boolean, unquoted), not the text {value!r}")
        return value


@dataclass(frozen=True)
class PathOption:
    """Marks an option whose value names a file or folder (see `ReadPath`, `WritePath`).

    config.py finds every marked key in the job schema, so a key a family or method adds later is
    resolved against the job file's folder and kept inside `--restrict-paths` (and the UI's
    workspace) without being listed anywhere. `role` "read": an input, which may also lie in a
    folder given with `--allow-path`; "write": an output, always inside the restricted folder.
    """

    role: str


ReadPath = Annotated[str, PathOption("read")]
WritePath = Annotated[str, PathOption("write")]


def path_role(annotation) -> str | None:
    """The PathOption role inside a field's annotation (through Optional / unions), or None."""
    for meta in getattr(annotation, "__metadata__", ()):
        if isinstance(meta, PathOption):
            return meta.role
    for arg in get_args(annotation):
        role = path_role(arg)
        if role is not None:
            return role
    return None


def field_path_role(field) -> str | None:
    """A schema field's path role: pydantic keeps a bare `ReadPath`'s marker in `metadata`, an optional one in the annotation."""
    return next((m.role for m in field.metadata if isinstance(m, PathOption)), None) or path_role(field.annotation)


def _tables(annotation) -> list[type[BaseModel]]:
    """Option tables a field holds (itself, in a list, or optional)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [t for arg in get_args(annotation) for t in _tables(arg)]


def path_keys(table: type[BaseModel], prefix: str = "") -> list[tuple[str, str]]:
    """(dotted key, role) of every path-typed key of a schema, nested tables included ('datasets.subsets.image_dir')."""
    out = []
    for name, field in table.model_fields.items():
        role = field_path_role(field)
        if role is not None:
            out.append((prefix + name, role))
        for sub in _tables(field.annotation):
            out += path_keys(sub, f"{prefix}{name}.")
    return out


def path_values(table: BaseModel, prefix: str = "") -> Iterator[tuple[str, BaseModel, str, str]]:
    """(key as written in errors, owner, field name, role) of every path-typed key of a loaded job."""
    for name, field in type(table).model_fields.items():
        role = field_path_role(field)
        value = getattr(table, name)
        if role is not None:
            yield prefix + name, table, name, role
        elif isinstance(value, BaseModel):
            yield from path_values(value, f"{prefix}{name}.")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, BaseModel):
                    yield from path_values(item, f"{prefix}{name}[{i}].")
