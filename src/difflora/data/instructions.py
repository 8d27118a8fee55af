"""Per-pair edit instructions: `NAME.instruction.txt` next to a pair's images.

A pair is `NAME.png` ("before") and `NAME_after.png` (or the subset's after_dir / after_suffix); its edit
instruction ("make the hair red") is the text file named after the "before" image's stem plus
`.instruction.txt`. The edit methods (methods/edit.py) use it as the prompt; without it they fall back to the
job's `edit_instruction`, then to the pair's caption. The web UI's Pairs page reads and writes it through these
helpers, so the convention lives in one place.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..fileio import write_text_atomic
from .captions import read_caption

INSTRUCTION_SUFFIX = ".instruction.txt"


def instruction_path(before_image: str | Path) -> Path:
    """Where the instruction of the pair whose "before" image is `before_image` lives."""
    p = Path(before_image)
    return p.with_name(p.stem + INSTRUCTION_SUFFIX)


def read_instruction(before_image: str | Path) -> str | None:
    """The pair's instruction (first non-empty line, UTF-8), or None when it has no instruction file or the file
    is blank."""
    path = instruction_path(before_image)
    if not path.is_file():
        return None
    return read_caption(path) or None


def write_instruction(before_image: str | Path, text: str) -> Path:
    """Save (atomically) or, for blank `text`, delete the pair's instruction file; returns its path. One line:
    an instruction with a line break is refused (only the first line would be read back)."""
    path = instruction_path(before_image)
    text = text.strip()
    if "\n" in text or "\r" in text:
        raise UserError("an edit instruction is one line of text", path=path)
    if not text:
        path.unlink(missing_ok=True)
        return path
    write_text_atomic(path, text + "\n")
    return path


def instruction_for(own: str | None, job_wide: str | None, after_caption: str) -> str:
    """The prompt of a pair for the edit methods: its instruction file, else the job's edit_instruction, else the
    "after" image's caption (as processed)."""
    return own or job_wide or after_caption
