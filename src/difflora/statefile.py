"""Training state without pickle: nested dicts/lists of tensors and JSON values.

Used by LoRA training (train/checkpoint.py) and the toy base-model trainer (toy/train_base.py).

`to_tensors_and_json` splits a nested state (an optimizer's state_dict, say) into a flat
tensor dict for safetensors and a JSON tree in which each tensor is replaced by a
reference; `from_tensors_and_json` puts it back together.
"""

from __future__ import annotations

import errno
import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from .errors import UserError
from .fileio import load_safetensors, make_temp_dir, save_safetensors, write_json_atomic

_REF = "__tensor__"
_TUPLE = "__tuple__"
_INTKEYS = "__intkeys__"


def to_tensors_and_json(obj: Any, prefix: str = "s") -> tuple[dict[str, torch.Tensor], Any]:
    tensors: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()

    def walk(x: Any, path: str) -> Any:
        if isinstance(x, torch.Tensor):
            key = (x.untyped_storage().data_ptr(), x.storage_offset()) if x.numel() else (id(x), 0)
            if key in seen:  # safetensors refuses shared storage: store a copy
                x = x.detach().clone()
            seen.add(key)
            tensors[path] = x
            return {_REF: path}
        if isinstance(x, dict):
            if x and all(isinstance(k, int) for k in x):
                return {_INTKEYS: [[k, walk(v, f"{path}.{k}")] for k, v in x.items()]}
            return {str(k): walk(v, f"{path}.{k}") for k, v in x.items()}
        if isinstance(x, tuple):
            return {_TUPLE: [walk(v, f"{path}.{i}") for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [walk(v, f"{path}.{i}") for i, v in enumerate(x)]
        if isinstance(x, float) and not math.isfinite(x):
            return {"__float__": repr(x)}
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise TypeError(f"cannot serialize {type(x).__name__} at {path}")

    return tensors, walk(obj, prefix)


class MissingTensor(KeyError):
    """The JSON tree refers to a tensor the tensor file does not hold."""


def from_tensors_and_json(tensors: dict[str, torch.Tensor], tree: Any) -> Any:
    def walk(x: Any) -> Any:
        if isinstance(x, dict):
            if _REF in x:
                if x[_REF] not in tensors:
                    raise MissingTensor(x[_REF])
                return tensors[x[_REF]]
            if _TUPLE in x:
                return tuple(walk(v) for v in x[_TUPLE])
            if _INTKEYS in x:
                return {int(k): walk(v) for k, v in x[_INTKEYS]}
            if "__float__" in x:
                return float(x["__float__"])
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, list):
            return [walk(v) for v in x]
        return x

    return walk(tree)


def save_state(directory: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write `state` into DIRECTORY (tensors.safetensors + state.json) as one atomic step.

    The files are written into a temporary sibling folder that is then renamed, so a
    reader sees either the complete new state or none; an existing DIRECTORY is replaced
    only after the new one is complete.
    """
    import shutil

    directory = Path(directory)
    tmp = make_temp_dir(directory)
    try:
        tensors, tree = to_tensors_and_json(state)
        save_safetensors(tensors, tmp / "tensors.safetensors")
        write_json_atomic(tmp / "state.json", {"format": "difflora-state-1", "tree": tree})
        if directory.exists():
            old = directory.with_name(directory.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    except UserError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        cause = e.__cause__
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):  # name the state, not its temp file
            raise UserError("could not save the training state: no space left on device; the previous state (if any) "
                            "is intact", path=directory) from cause
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_state(directory: str | os.PathLike) -> dict[str, Any]:
    directory = Path(directory)
    old = directory.with_name(directory.name + ".old")
    if not (directory / "state.json").exists() and (old / "state.json").exists():
        directory = old  # killed between the two renames of save_state: the previous state is complete
    index = directory / "state.json"
    if not index.exists() or not (directory / "tensors.safetensors").exists():
        raise UserError("training state is missing or incomplete (expected state.json and tensors.safetensors)",
                        path=directory)
    try:
        meta = json.loads(index.read_text(encoding="utf-8"))
        tree = meta["tree"]
    except (OSError, ValueError, KeyError, UnicodeDecodeError) as e:
        raise UserError(f"training state index is unreadable ({e})", path=index) from None
    tensors, _ = load_safetensors(directory / "tensors.safetensors")
    try:
        return from_tensors_and_json(tensors, tree)
    except MissingTensor as e:
        raise UserError(f"training state is damaged: state.json refers to tensor {e.args[0]!r}, which "
                        "tensors.safetensors does not hold", path=directory,
                        hint="resume from another state, or start again without --resume") from None
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise UserError(f"training state is damaged: state.json does not have the expected structure ({e})",
                        path=directory, hint="start again without --resume") from None
