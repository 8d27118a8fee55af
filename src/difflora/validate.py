"""Checks that run before any model is loaded or any work is done.

Every value a command or job takes is checked here for what the code after it can use (a
finite number, a size the model can make, a path that can be written), so that a bad value
stops the command at once with one line naming the value, instead of a traceback minutes
later or a result thrown away at the end.
"""

from __future__ import annotations

import errno
import math
import os
from pathlib import Path

from .errors import UserError

# Pixel sizes handed to the diffusers pipelines must be multiples of this.
SIZE_MULTIPLE = 8
MAX_SIZE = 16384
MAX_SEED = 2**63 - 1


# ---------------------------------------------------------------------------- numbers
def finite(value: float, option: str, path=None) -> float:
    if not math.isfinite(value):
        raise UserError(f"{option} must be a finite number, got {value}", path=path)
    return value


def at_least(value: int, minimum: int, option: str, path=None) -> int:
    if value < minimum:
        raise UserError(f"{option} must be at least {minimum}, got {value}", path=path)
    return value


def seed(value: int, option: str = "--seed", path=None) -> int:
    if not 0 <= value <= MAX_SEED:
        raise UserError(f"{option} must be between 0 and 2^63-1, got {value}", path=path)
    return value


def image_size(value: int | None, option: str, path=None) -> int | None:
    """A width or height: positive, a multiple of 8, not absurd (None: the model's default)."""
    if value is None:
        return None
    if value < SIZE_MULTIPLE or value > MAX_SIZE or value % SIZE_MULTIPLE:
        raise UserError(f"{option} must be a multiple of {SIZE_MULTIPLE} between {SIZE_MULTIPLE} and {MAX_SIZE}, "
                        f"got {value}", path=path)
    return value


def sampler(name: str, option: str = "--sampler", path=None) -> str:
    from .models.sd import SCHEDULERS

    if name.lower() not in SCHEDULERS:
        raise UserError(f"{option}: unknown sampler {name!r}; choose one of: {', '.join(SCHEDULERS)}", path=path)
    return name


def sample_prompts(prompts, source, default_sampler: str | None = None) -> None:
    """Dry-run a prompt list: every size, seed, scale, step count, sampler and multiplier usable."""
    for i, sp in enumerate(prompts, 1):
        what = f"prompt {i} ({sp.prompt[:40]!r})"
        image_size(sp.width, f"{what}: width (--w)", source)
        image_size(sp.height, f"{what}: height (--h)", source)
        if sp.seed is not None:
            seed(sp.seed, f"{what}: seed (--d)", source)
        finite(sp.cfg, f"{what}: guidance scale (--l)", source)
        at_least(sp.steps, 1, f"{what}: steps (--s)", source)
        if sp.sampler or default_sampler:
            sampler(sp.sampler or default_sampler, f"{what}: sampler (--ss)", source)
        if "multiplier" in sp.extra:
            finite(sp.extra["multiplier"], f"{what}: multiplier (--m)", source)


# ---------------------------------------------------------------------------- paths
def _name_max(folder: Path) -> int:
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def _nearest_existing(path: Path) -> Path:
    p = path
    while not os.path.lexists(p) and p != p.parent:
        p = p.parent
    return p


def path_text(path: str | os.PathLike, option: str) -> Path:
    """No NUL byte and no component longer than the file system takes."""
    text = os.fspath(path)
    if "\0" in text:
        raise UserError(f"{option} holds a NUL character", path=text.replace("\0", "\\0"))
    p = Path(text)
    limit = _name_max(p.parent if p.parent != p else p)
    for part in p.parts:
        if len(os.fsencode(part)) > limit:
            raise UserError(f"{option}: the name {part[:20]}... is {len(os.fsencode(part))} bytes, longer than the "
                            f"file system allows ({limit})", path=text[:60] + "...", hint="choose a shorter name")
    return p


def output_folder(path: str | os.PathLike, option: str) -> Path:
    """A folder we will write into: an existing folder we can write, or one we can create."""
    p = path_text(path, option)
    if p.exists() and not p.is_dir():
        raise UserError(f"{option} is an existing file, not a folder", path=p, hint="choose a folder path")
    base = _nearest_existing(p)
    if not base.is_dir():
        raise UserError(f"{option}: cannot create a folder here, {base} is a file", path=p)
    if base == p:  # an existing folder: ask, without touching it
        read_only = bool(os.statvfs(p).f_flag & os.ST_RDONLY)
        if read_only or not os.access(p, os.W_OK | os.X_OK):
            raise UserError(f"{option}: cannot write in this folder "
                            f"({'read-only file system' if read_only else 'permission denied'})", path=p)
    else:
        _probe_writable(base, p, option)
    return p


def _probe_writable(folder: Path, wanted: Path, option: str) -> None:
    """Make and remove a folder where ours will be made: the sure test of writing there (as root too)."""
    from .fileio import temp_sibling

    probe = temp_sibling(folder / "probe")
    try:
        probe.mkdir()
    except OSError as e:
        raise UserError(f"{option}: cannot write in {folder} ({e.strerror})", path=wanted) from None
    probe.rmdir()


def output_file(path: str | os.PathLike, option: str) -> Path:
    """A file we will write: not a folder, its folder writable or creatable, its name short enough."""
    p = path_text(path, option)
    if p.is_dir():
        raise UserError(f"{option} is a folder; give a file path", path=p)
    output_folder(p.parent if str(p.parent) else Path("."), f"{option}'s folder")
    return p


def name_part(text: str, option: str, path=None) -> str:
    """A piece of a file name (an output_name, a suffix): no separator, no NUL, not too long."""
    if not text or text in (".", ".."):
        raise UserError(f"{option} must be a file name, got {text!r}", path=path)
    if "\0" in text:
        raise UserError(f"{option} holds a NUL character", path=path)
    bad = [c for c in ("/", os.sep, os.altsep) if c and c in text]
    if bad:
        raise UserError(f"{option} {text!r} contains the path separator {bad[0]!r}; it must be a name, not a path",
                        path=path, hint="put the folder in output_dir")
    if len(os.fsencode(text)) > 200:  # room for the suffixes a run adds (-step00000010, .safetensors)
        raise UserError(f"{option} is {len(os.fsencode(text))} bytes long; names up to 200 bytes leave room for "
                        "the suffixes added to it", path=path)
    return text


def input_folder(path: str | os.PathLike, option: str) -> Path:
    """A folder we read: it exists, is a folder and can be listed (a symlink loop cannot)."""
    p = path_text(path, option)
    try:
        os.listdir(p)
    except FileNotFoundError:
        raise UserError(f"{option}: folder not found", path=p) from None
    except NotADirectoryError:
        raise UserError(f"{option} is a file, not a folder", path=p) from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UserError(f"{option} is a symlink loop", path=p, hint="point it at a real folder") from None
        raise UserError(f"{option} cannot be read ({e.strerror})", path=p) from None
    return p


# ---------------------------------------------------------------------------- against a loaded model
def clip_skip(model, value: int | None, option: str = "--clip-skip", path=None) -> None:
    """clip_skip n uses the n-th text-encoder layer from the end: n must name a layer the encoder has."""
    if value is None:
        return
    at_least(value, 1, option, path)
    for name, encoder in getattr(model, "text_encoders", {}).items():
        layers = getattr(getattr(encoder, "config", None), "num_hidden_layers", None)
        if layers is not None and value > layers:
            raise UserError(f"{option} {value} is beyond the {layers} layers of the model's {name}", path=path,
                            hint=f"use 1 to {layers}")
