"""Safe file handling: atomic writes, checked safetensors reads, explicit pickle opt-in."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file, save_file

from .errors import UserError

# A safetensors header larger than this is refused before it is read (real files: < 1 MiB).
MAX_HEADER_BYTES = 64 * 1024 * 1024
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `final`; on success rename it over `final`.

    On any failure the temporary file is removed and `final` is untouched. A full disk
    becomes a UserError that says the previous file is intact.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, final)
    except OSError as e:
        tmp_path.unlink(missing_ok=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(
                "could not save: no space left on device; the previous file (if any) is intact", path=final
            ) from e
        raise
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> None:
    """Atomically write a safetensors file (tensors made contiguous, on CPU)."""
    data = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(data, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict, dict[str, str]]:
    """Return (tensor entries, metadata) after checking the header is sane.

    Checks the declared header size against the file size and a hard limit before
    allocating anything, and that every tensor's byte range lies inside the file.
    """
    path = Path(path)
    if not path.exists():
        raise UserError("file not found", path=path)
    if path.is_dir():
        raise UserError("is a folder, expected a .safetensors file", path=path)
    size = path.stat().st_size
    if size < 8:
        raise UserError(f"not a safetensors file ({size} bytes; truncated or empty)", path=path)
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        if n > MAX_HEADER_BYTES or n + 8 > size:
            raise UserError(
                f"not a valid safetensors file (declared header of {n} bytes, file has {size}); "
                "truncated or another format",
                path=path,
            )
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not an object")
    except (UnicodeDecodeError, ValueError) as e:
        raise UserError(f"not a valid safetensors file (bad header: {e})", path=path) from None
    except RecursionError:
        raise UserError("not a valid safetensors file (bad header: nested too deeply)", path=path) from None
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise UserError("not a valid safetensors file (bad __metadata__)", path=path)
    data_len = size - 8 - n
    for key, entry in header.items():
        try:
            start, end = entry["data_offsets"]
            ok = 0 <= start <= end <= data_len
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise UserError(f"truncated or corrupt safetensors file (tensor {key!r} lies outside the file)", path=path)
    return header, {str(k): str(v) for k, v in metadata.items()}


def load_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load all tensors and the metadata of a checked safetensors file."""
    _, metadata = read_safetensors_header(path)
    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types
        raise UserError(f"could not read safetensors file ({e})", path=path) from None
    return tensors, metadata


def load_state_dict_file(path: str | os.PathLike, allow_pickle: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load a weights file. Pickle-based files need `allow_pickle` and load with weights_only=True."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        return load_safetensors(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise UserError(
                f"refusing to load a pickle-based {path.suffix} file",
                path=path,
                hint="convert it to .safetensors, or pass --allow-pickle if you trust it",
            )
        if not path.exists():
            raise UserError("file not found", path=path)
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"could not load checkpoint with weights_only=True ({e})", path=path) from None
        if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise UserError("checkpoint does not hold a state dict", path=path)
        return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}, {}
    raise UserError(f"unsupported file type {path.suffix or '(none)'}; expected .safetensors", path=path)
