"""Where a restricted job may read and write: `train --restrict-paths DIR [--allow-path DIR]` and the UI.

One rule for every path-typed key of the job schema (options.ReadPath / WritePath, found in the
schema, so a key added later is covered): the value, with symlinks, '..', '~' and absolute paths
resolved, must lie inside the restricted folder; an input may also lie inside a folder the user
chose to trust with `--allow-path`. A folder that is read whole (a pair folder, a model folder) is
looked into: a symlink in it that leads outside, or a weights index (`*.index.json`) naming a
file outside, is refused as the key itself would be.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import UserError

# Folders read whole are looked into this deep (a kohya train_data_dir/<n>_<name>/image, a model
# folder/component/file); a folder with more entries than this is refused rather than walked forever.
_DEPTH = 3
_MAX_ENTRIES = 200_000


class PathPolicy:
    def __init__(self, root: str | os.PathLike, allowed=()):
        self.root = Path(os.path.realpath(root))
        self.allowed = [Path(os.path.realpath(a)) for a in allowed]

    def _inside(self, real: Path, role: str) -> bool:
        roots = [self.root] + (self.allowed if role == "read" else [])
        return any(real.is_relative_to(r) for r in roots)

    def _refuse(self, key: str, value, real: Path, config, role: str, how: str = "resolves to") -> UserError:
        trusted = f" or a folder given with --allow-path ({', '.join(map(str, self.allowed))})" \
            if role == "read" and self.allowed else ""
        return UserError(f"'{key}' = {os.fspath(value)!r} {how} {real}, outside the allowed folder {self.root}{trusted}",
                         path=config, hint="paths here must stay inside that folder; trust another folder with "
                                           "--allow-path DIR" if role == "read" else "outputs stay inside that folder")

    def check(self, value: str | os.PathLike | None, key: str, role: str, config) -> None:
        """Refuse `value` (already resolved against its job file) when it leads outside; look into a folder it names."""
        if value is None:
            return
        real = Path(os.path.realpath(value))
        if not self._inside(real, role):
            raise self._refuse(key, value, real, config, role)
        if role == "read" and real.is_dir():
            self._check_folder(real, key, value, config)

    def _check_folder(self, folder: Path, key: str, value, config) -> None:
        seen = 0
        base_depth = len(folder.parts)
        for current, dirs, files in os.walk(folder, followlinks=False):
            here = Path(current)
            if len(here.parts) - base_depth >= _DEPTH:
                dirs[:] = []
            seen += len(dirs) + len(files)
            if seen > _MAX_ENTRIES:
                raise UserError(f"'{key}' names a folder with more than {_MAX_ENTRIES} entries", path=config,
                                hint="point it at the folder that holds the data")
            for name in dirs + files:
                entry = here / name
                if entry.is_symlink():
                    real = Path(os.path.realpath(entry))
                    if not self._inside(real, "read"):
                        raise self._refuse(key, value, real, config, "read", how=f"holds {entry}, a symlink to")
                elif name.endswith(".index.json") and name in files:
                    self._check_index(entry, key, value, config)

    def _check_index(self, index: Path, key: str, value, config) -> None:
        """A sharded-weights index names its shard files: they must be inside too."""
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        except (OSError, UnicodeDecodeError, ValueError, AttributeError):
            raise UserError("not a readable weights index (JSON with a weight_map)", path=index) from None
        if not isinstance(weight_map, dict):
            raise UserError("the weights index's weight_map is not an object", path=index)
        for shard in set(map(str, weight_map.values())):
            real = Path(os.path.realpath(index.parent / shard))
            if not real.is_relative_to(index.parent) or not self._inside(real, "read"):
                raise self._refuse(key, value, real, config, "read",
                                   how=f"has a weights index {index.name} naming {shard!r}, which is")

    def resolve(self, text: str, base: Path, what: str, role: str = "write") -> Path:
        """A path typed in the UI (relative to `base`, or absolute) as a real path the policy allows."""
        text = text.strip()
        if not text:
            raise UserError(f"{what}: empty path")
        if "\x00" in text:
            raise UserError(f"{what}: path contains a NUL character")
        p = Path(text).expanduser()
        full = p if p.is_absolute() else base / p
        real = Path(os.path.realpath(full))
        if not self._inside(real, role):
            raise self._refuse(what, text, real, Path(text), role)
        return real
