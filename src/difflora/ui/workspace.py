"""The workspace: the one folder the UI reads and writes.

Every path that comes from the browser goes through `Workspace.resolve`, which applies the CLI's
`--restrict-paths` rule (pathpolicy.py: symlinks, '..', absolute paths and '~' resolved, then
required to lie inside the root; inputs also inside the folders trusted with `--allow-path`), so
nothing outside the workspace is written or served.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import UserError
from ..pathpolicy import PathPolicy

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class Workspace:
    def __init__(self, root: str | os.PathLike, allowed=()):
        from ..fileio import make_parent

        trusted = [self.trusted_folder(a) for a in allowed]  # checked before anything is made
        self.root = make_root(root)
        self.policy = PathPolicy(self.root, trusted)
        for sub in ("pairs", "runs", "jobs", "compare", "tools", "eval", ".gradio"):
            make_parent(self.root / sub / "x")

    @staticmethod
    def trusted_folder(folder) -> Path:
        if not Path(folder).is_dir():
            raise UserError("--allow-path: not a folder", path=folder)
        return Path(folder)

    def restrict_arguments(self) -> list[str]:
        """The CLI options that give a child command this workspace's path policy."""
        out = ["--restrict-paths", str(self.root)]
        for folder in self.policy.allowed:
            out += ["--allow-path", str(folder)]
        return out

    def lock(self) -> "ServerLock":
        return ServerLock.of(self.root)

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def pairs(self) -> Path:
        return self.root / "pairs"

    def resolve(self, value: str | os.PathLike, what: str = "path", role: str = "write") -> Path:
        """A user-given path (relative to the workspace, or absolute) as a real path inside it (role "read":
        or inside a folder trusted with --allow-path)."""
        return self.policy.resolve(os.fspath(value), self.root, what, role)

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

    def new_folder(self, parent: str, name: str, create: bool = True) -> Path:
        if not _SAFE_NAME.match(name):
            raise UserError(f"folder name {name!r}: use letters, digits, '.', '_' and '-' only")
        folder = self.resolve(f"{parent}/{name}", "folder")
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        return folder


def safe_name(name: str) -> str:
    """A file-name-safe version of a user label."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")[:80]
    return cleaned or "untitled"


def make_root(root: str | os.PathLike) -> Path:
    """The workspace folder, made if missing, as a real path; one line naming it when it is a file or cannot be made."""
    from ..fileio import make_parent

    root = Path(root).expanduser()
    make_parent(root / "x")
    return Path(os.path.realpath(root))


class ServerLock:
    """`<workspace>/.server.lock`: one `difflora ui` per workspace (two would both launch its queued runs).

    Created atomically with the server's pid; a lock whose process is gone is stale and taken over.
    """

    def __init__(self, path: Path):
        self.path = path
        self.held = False

    @classmethod
    def of(cls, root: Path) -> "ServerLock":
        return cls(root / ".server.lock")

    def __enter__(self):
        from ..fileio import create_exclusive, pid_alive

        for _ in range(2):
            if create_exclusive(self.path, f"{os.getpid()}\n".encode()):
                self.held = True
                return self
            try:
                pid = int(self.path.read_text(encoding="utf-8").strip())
            except (OSError, ValueError):
                pid = -1
            if pid_alive(pid):
                raise UserError(f"another difflora ui (pid {pid}) serves this workspace", path=self.path.parent,
                                hint="open that one, stop it, or choose another --workspace")
            self.path.unlink(missing_ok=True)
        raise UserError("could not take the workspace lock (another server keeps creating it)", path=self.path)

    def __exit__(self, *exc):
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
