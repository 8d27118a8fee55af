"""Model families and the one entry point to load a model from a local path."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import torch

from ..dtypes import dtype_named
from ..errors import UserError


def default_model_path() -> Path:
    """The embedded toy base model shipped with the package."""
    return Path(str(resources.files("difflora").joinpath("assets/toy_base")))


def load_model(path: str | os.PathLike | None = None, *, dtype: str | torch.dtype = "fp32", allow_pickle: bool = False,
               family: str | None = None, prediction_type: str | None = None, clip_skip: int | None = None):
    """Load a model from a diffusers folder or a single-file checkpoint; None means the embedded default."""
    from .._quiet import quiet_libraries

    quiet_libraries()
    if path is None:
        path = default_model_path()
        if not (path / "model_index.json").exists():
            raise UserError("the embedded default model is missing from this installation; pass --model PATH",
                            path=path)
    if isinstance(dtype, str):
        dtype = dtype_named(dtype)
    if family not in (None, "sd1", "sd2"):
        raise UserError(f"model family {family!r} is not supported yet; supported: sd1, sd2")
    from .sd import load_stable_diffusion

    return load_stable_diffusion(path, dtype=dtype, allow_pickle=allow_pickle, variant=family,
                                 prediction_type=prediction_type, clip_skip=clip_skip)
