"""The workspace: the one folder the UI reads and writes.

Every path that comes from the browser goes through `Workspace.resolve`, which applies the CLI's
`--restrict-paths` rule (symlinks, '..', absolute paths and '~' resolved, then required to lie
inside the root), so nothing outside the workspace is read, written or served.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..config import check_inside
from ..errors import UserError

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class Workspace:
    def __init__(self, root: str | os.PathLike):
        root = Path(root).expanduser()
        root.mkdir(parents=True, exist_ok=True)
        self.root = Path(os.path.realpath(root))
        for sub in ("pairs", "runs", "jobs", "compare", "tools", "eval", ".gradio"):
            (self.root / sub).mkdir(exist_ok=True)

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def pairs(self) -> Path:
        return self.root / "pairs"

    def resolve(self, value: str | os.PathLike, what: str = "path") -> Path:
        """A user-given path (relative to the workspace, or absolute) as a real path inside it."""
        text = os.fspath(value).strip()
        if not text:
            raise UserError(f"{what}: empty path")
        if "\x00" in text:
            raise UserError(f"{what}: path contains a NUL character")
        p = Path(text).expanduser()
        full = p if p.is_absolute() else self.root / p
        check_inside(str(full), self.root, Path(text), what)
        return Path(os.path.realpath(full))

    def relative(self, path: str | os.PathLike) -> str:
        """How the UI shows a workspace path."""
        try:
            return Path(os.path.realpath(path)).relative_to(self.root).as_posix() or "."
        except ValueError:
            return os.fspath(path)

    def folders(self, under: str = "") -> list[str]:
        """Sub-folders (relative paths) that hold images, for pickers."""
        from ..data.images import is_image_file

        base = self.resolve(under or ".", "folder")
        out = []
        for d in sorted(p for p in base.rglob("*") if p.is_dir()):
            rel = self.relative(d)
            if rel.startswith(".") or "/." in rel or rel.startswith("runs/"):
                continue
            if any(is_image_file(f) for f in d.iterdir() if f.is_file()):
                out.append(rel)
        return out

    def files(self, suffix: str, under: str = ".") -> list[str]:
        base = self.resolve(under, "folder")
        return sorted(self.relative(p) for p in base.rglob(f"*{suffix}")
                      if p.is_file() and not any(part.startswith(".") for part in p.relative_to(base).parts))

    def new_folder(self, parent: str, name: str) -> Path:
        if not _SAFE_NAME.match(name):
            raise UserError(f"folder name {name!r}: use letters, digits, '.', '_' and '-' only")
        folder = self.resolve(f"{parent}/{name}", "folder")
        folder.mkdir(parents=True, exist_ok=True)
        return folder


def safe_name(name: str) -> str:
    """A file-name-safe version of a user label."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")[:80]
    return cleaned or "untitled"
