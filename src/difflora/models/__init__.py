"""Model families and the one entry point to load a model from a local path."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import torch

from ..errors import UserError

DTYPES = {"fp32": torch.float32, "float": torch.float32, "float32": torch.float32, "fp16": torch.float16,
          "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def default_model_path() -> Path:
    """The embedded toy base model shipped with the package."""
    return Path(str(resources.files("difflora").joinpath("assets/toy_base")))


def _is_flux(path: Path) -> bool:
    from ..fileio import read_safetensors_header
    from .flux import detect_folder, detect_single_file

    if path.is_dir():
        return detect_folder(path) is not None
    if path.suffix.lower() == ".safetensors" and path.is_file():
        return detect_single_file(read_safetensors_header(path)[0]) is not None
    return False


def load_model(path: str | os.PathLike | None = None, *, dtype: str | torch.dtype = "fp32", allow_pickle: bool = False,
               family: str | None = None, prediction_type: str | None = None, clip_skip: int | None = None,
               job=None, **family_options):
    """Load a model from a diffusers folder or a single-file checkpoint; None means the embedded default.

    `job` and `family_options` reach the family's loader (FLUX: clip_l, t5xxl, ae, fp8_base, ...).
    """
    from .._quiet import quiet_libraries

    quiet_libraries()
    if path is None:
        path = default_model_path()
        if not (path / "model_index.json").exists():
            raise UserError("the embedded default model is missing from this installation; pass --model PATH",
                            path=path)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise UserError(f"unknown precision {dtype!r}; use fp32, fp16 or bf16")
        dtype = DTYPES[dtype]
    from . import flux

    if family == "flux" or _is_flux(Path(path)):
        return flux.load(path, dtype=dtype, allow_pickle=allow_pickle, prediction_type=prediction_type, job=job,
                         **family_options)
    if family not in (None, "sd1", "sd2"):
        raise UserError(f"model family {family!r} is not supported yet; supported: sd1, sd2, flux")
    from .sd import load_stable_diffusion

    return load_stable_diffusion(path, dtype=dtype, allow_pickle=allow_pickle, variant=family,
                                 prediction_type=prediction_type, clip_skip=clip_skip)
