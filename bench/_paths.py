"""Paths as bench results record them: relative to the repository, so no machine's folders end up in a result."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def portable(path) -> str | None:
    """`path` relative to the repository when inside it, else "<outside>/NAME" (a model built in a temp folder)."""
    if path is None:
        return None
    p = Path(os.fspath(path)).resolve()
    try:
        return p.relative_to(REPO).as_posix()
    except ValueError:
        return f"<outside>/{p.name}"
