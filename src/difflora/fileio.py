"""Safe file handling: atomic writes, checked safetensors reads, explicit pickle opt-in."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import secrets
import shutil
import struct
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file, save_file

from .errors import UserError, is_internal_failure

log = logging.getLogger(__name__)

# A safetensors header larger than this is refused before it is read (real files: < 1 MiB).
MAX_HEADER_BYTES = 64 * 1024 * 1024
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


# Temporary files and folders: `.<final name>.difflora-<pid>-<random>.tmp` beside the final path, so
# that the next run can recognise (and remove) the leftovers of a process that was killed mid-save.
_TEMP_NAME = re.compile(r"^\..*\.difflora-(\d+)-[0-9a-z]+\.tmp$")
_cleaned_folders: set[str] = set()


def temp_sibling(final: Path) -> Path:
    """A fresh temporary name next to `final` (the final name shortened, so it fits the file system)."""
    return final.with_name(f".{final.name[:80]}.difflora-{os.getpid()}-{secrets.token_hex(4)}.tmp")


def pid_alive(pid: int) -> bool:
    """Whether a process of this id runs on this machine."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files and folders a killed difflora process left in `folder`.

    Only names difflora makes (see `temp_sibling`) are touched, and only when the process that
    made them is gone; done once per folder per process. Returns what was removed.
    """
    folder = Path(folder)
    key = os.fspath(folder.resolve()) if folder.exists() else os.fspath(folder)
    if key in _cleaned_folders:
        return []
    _cleaned_folders.add(key)
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    for entry in entries:
        m = _TEMP_NAME.match(entry.name)
        if not m or int(m.group(1)) == os.getpid() or pid_alive(int(m.group(1))):
            continue
        path = Path(entry.path)
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError as e:
            log.debug("could not remove stale temporary %s: %s", path, e)
            continue
        log.info("removed %s, left by an interrupted save (pid %s)", path.name, m.group(1))
        removed.append(path)
    return removed


def _disk_full(e: BaseException | None) -> bool:
    """A full disk or quota, as an OSError, as the Rust writers' errors (safetensors: "... (os error 28)"), or
    as the UserError an inner save made of one."""
    if e is None:
        return False
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    if isinstance(e, UserError):
        return _disk_full(e.__cause__)
    text = str(e)
    return f"(os error {errno.ENOSPC})" in text or f"(os error {errno.EDQUOT})" in text or "No space left" in text


def make_parent(final: Path) -> None:
    """Create `final`'s folder, as a UserError naming the path when that is impossible."""
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UserError("cannot create this folder: a file of that name exists", path=final.parent) from None
    except NotADirectoryError:
        raise UserError("cannot create this folder: a file stands where a folder on its path should be",
                        path=final.parent) from None
    except OSError as e:
        raise UserError(f"cannot create this folder ({e.strerror})", path=final.parent) from None


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `final`; on success rename it over `final`.

    On any failure the temporary file is removed and `final` is untouched. A full disk
    becomes a UserError that says the previous file is intact. The file is created with the
    permissions the umask gives (as `open` would), not mkstemp's 0600.
    """
    final = Path(final)
    make_parent(final)
    clean_stale_temps(final.parent)
    tmp_path = temp_sibling(final)
    try:
        os.close(os.open(tmp_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        mode = tmp_path.stat().st_mode & 0o777  # 0o666 less the umask
    except OSError as e:
        raise UserError(f"cannot write here ({e.strerror})", path=final) from None
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp_path, mode)  # a writer that replaced the file (safetensors does) made it 0600
        os.replace(tmp_path, final)
    except BaseException as e:
        tmp_path.unlink(missing_ok=True)
        if _disk_full(e):
            raise UserError(
                "could not save: no space left on device; the previous file (if any) is intact", path=final
            ) from e
        if isinstance(e, OSError):
            raise UserError(f"could not save ({e.strerror or e}); the previous file (if any) is intact",
                            path=final) from e
        raise


def make_temp_dir(final: str | os.PathLike) -> Path:
    """An empty temporary folder next to `final`, to be renamed onto it when complete (umask permissions)."""
    final = Path(final)
    make_parent(final)
    clean_stale_temps(final.parent)
    tmp = temp_sibling(final)
    tmp.mkdir(mode=0o777)
    return tmp


@contextlib.contextmanager
def atomic_folder(final: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside `final`, renamed onto it once complete (all or nothing).

    `final` must not exist. The folder has the umask's permissions and a name `clean_stale_temps`
    knows, so the leftovers of a killed save are removed by the next one. On failure it is removed;
    a full disk becomes one line naming `final`.
    """
    final = Path(final)
    if final.exists():
        raise UserError("output folder already exists; choose another path", path=final)
    tmp = make_temp_dir(final)
    try:
        yield tmp
        if final.exists():
            raise UserError("output folder already exists; choose another path", path=final)
        _follow_umask(tmp)
        os.replace(tmp, final)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if _disk_full(e):
            raise UserError("could not save: no space left on device; nothing was written", path=final) from e
        raise


def _follow_umask(folder: Path) -> None:
    """Give everything inside `folder` the umask's permissions: libraries writing through temporary files
    (safetensors, huggingface's savers) leave them 0600. `folder` was made 0o777 less the umask."""
    dir_mode = folder.stat().st_mode & 0o777
    for current, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(current, name), dir_mode)
        for name in files:
            path = os.path.join(current, name)
            if not os.path.islink(path):
                os.chmod(path, dir_mode & 0o666)


def create_exclusive(path: str | os.PathLike, data: bytes) -> bool:
    """Create `path` holding `data`, only if it does not exist; False when it does.

    The content is written to a temporary file first and then hard-linked to
    `path` (atomic, and failing when `path` exists), so `path` never exists half-written: a full
    disk leaves nothing behind. File systems without hard links fall back to O_EXCL, removing
    the file again when its write fails.
    """
    path = Path(path)
    make_parent(path)
    clean_stale_temps(path.parent)
    tmp = temp_sibling(path)
    try:
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        try:
            _write_all(fd, data)  # complete before it is linked: no fsync, a lock need not outlive a power cut
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise
            return _create_exclusive_no_link(path, data)
        return True
    except OSError as e:
        if _disk_full(e):
            raise UserError("could not create the file: no space left on device; nothing was left behind",
                            path=path) from e
        raise
    finally:
        tmp.unlink(missing_ok=True)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _create_exclusive_no_link(path: Path, data: bytes) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    except FileExistsError:
        return False
    try:
        _write_all(fd, data)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)
    return True


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name the same file or folder (through symlinks and hard links)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def _identity(path: str | os.PathLike) -> str:
    """One key for every name of a file: the real path (symlinks, '..'), case-folded, so that a case
    variant counts as the same file (it is one on case-insensitive file systems)."""
    return os.path.normcase(os.path.realpath(path)).casefold()


def _inode(path: str | os.PathLike) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def check_writes(writes, reads, option: str = "--save-to") -> None:
    """Refuse, before the first write, a command whose outputs would touch what it reads.

    `writes`: the paths it will write, each a path or (path, option naming it). `reads`: the files it
    reads, and the folders it reads whole (a model folder: nothing may be written inside one; pass
    the files, not the folder, where a command writes beside its inputs, as prep does).
    An output is refused when it is an input (also through symlinks, hard links and case variants),
    lies inside an input folder, or is the output of two inputs (`face.png` and `face.jpg` cropped to
    `face.png`).
    """
    read_keys: dict[str, Path] = {}
    read_inodes: dict[tuple[int, int], Path] = {}
    read_folders: list[tuple[str, Path]] = []
    for given in reads:
        if given is None:
            continue
        src = Path(given)
        read_keys[_identity(src)] = src
        inode = _inode(src)
        if inode is not None:
            read_inodes[inode] = src
        if src.is_dir():
            read_folders.append((_identity(src) + os.sep, src))
    seen: dict[str, str] = {}
    for item in writes:
        out, what = (item if isinstance(item, tuple) else (item, option))
        out = Path(out)
        key = _identity(out)
        src = read_keys.get(key) or read_inodes.get(_inode(out))
        if src is None:
            src = next((folder for prefix, folder in read_folders if key.startswith(prefix)), None)
        if src is not None:
            raise UserError(f"{what} would overwrite the input {src}; nothing was written", path=out,
                            hint="choose another output path; inputs are never replaced")
        if key in seen:
            raise UserError(f"{seen[key]} and {what} would both be written to this one file (names that differ "
                            "only by extension or case); nothing was written", path=out, hint="rename one of them")
        seen[key] = what


def refuse_overwriting_inputs(output: str | os.PathLike, inputs, option: str = "--save-to") -> None:
    """A command never writes over one of its own inputs, nor into an input folder."""
    check_writes([(output, option)], inputs)


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


def read_text_file(path: Path, what: str, expected: str) -> str:
    """The UTF-8 text of a file the user named (`what`: "config file"; `expected`: what a folder there should have
    been); a missing file, a folder, other bytes than UTF-8 or a failed read: one line naming the file."""
    if not path.exists():
        raise UserError(f"{what} not found", path=path)
    if path.is_dir():
        raise UserError(f"is a folder, expected {expected}", path=path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{what} is not UTF-8 text (byte {e.start}); re-save it as UTF-8", path=path) from None
    except OSError as e:
        raise UserError(f"cannot read the {what} ({e.strerror or e})", path=path) from None


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
        if is_internal_failure(e):
            raise
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
            if is_internal_failure(e):
                raise
            raise UserError(f"could not load checkpoint with weights_only=True ({e})", path=path) from None
        if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise UserError("checkpoint does not hold a state dict", path=path)
        return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}, {}
    raise UserError(f"unsupported file type {path.suffix or '(none)'}; expected .safetensors", path=path)


def require_finite(tensors: dict[str, torch.Tensor], path: str | os.PathLike, what: str = "file") -> None:
    """Refuse to write a result holding NaN/inf, naming the module that overflowed and why.

    `tensors` are the values as they will be written (after any cast to a smaller dtype).
    """
    for key, t in tensors.items():
        if not t.is_floating_point() or bool(torch.isfinite(t).all()):
            continue
        module = key.rsplit(".", 2)[0] if key.endswith(".weight") else key.rsplit(".", 1)[0]
        kind = "NaN" if bool(torch.isnan(t).any()) else "inf"
        module = module if module == key else f"{module} ({key})"
        if t.dtype in (torch.float16, torch.bfloat16):
            limit = torch.finfo(t.dtype).max
            raise UserError(f"module {module} overflows to {kind} when saved as {str(t.dtype)[6:]} "
                            f"(it holds values beyond ±{limit:g}); nothing was written", path=path,
                            hint="save as float (--save-precision float), or use smaller ratios")
        raise UserError(f"the {what} would hold {kind} in module {module}; nothing was written", path=path,
                        hint="the inputs or ratios overflow float32; use smaller ratios")
