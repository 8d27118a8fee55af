"""Model families and the one entry point to load a model from a local path."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import UserError
from .registry import detect_folder, detect_single_file, family_options, plugin_for


def default_model_path() -> Path:
    """The embedded toy base model shipped with the package."""
    return Path(str(resources.files("difflora").joinpath("assets/toy_base")))


def pixels_per_latent(path: str | os.PathLike | None) -> int:
    """Pixels per latent cell of a model's VAE without loading it (diffusers folders: 2 ** (VAE blocks - 1));
    the embedded model for None, 8 (every supported family's VAE) when a file or folder does not say."""
    import json

    folder = Path(path) if path else default_model_path()
    try:
        cfg = json.loads((folder / "vae" / "config.json").read_text(encoding="utf-8"))
        return 2 ** (len(cfg["block_out_channels"]) - 1)
    except (OSError, ValueError, KeyError, TypeError):
        return 8


def load_model(path: str | os.PathLike | None = None, *, dtype: "str | torch.dtype" = "fp32", allow_pickle: bool = False,
               family: str | None = None, prediction_type: str | None = None, clip_skip: int | None = None,
               zero_terminal_snr: bool | None = None, options: Mapping[str, Any] | None = None,
               options_source: str | os.PathLike | None = None, key_label: Callable[[str], str] = str,
               mixed_precision: str = "no"):
    """Load a model from a diffusers folder or a single-file checkpoint; None means the embedded default.

    The family is detected from the files (models/registry.py); `family` may name a variant of the
    detected family (sd1 vs sd2) but not another family. `options` are family keys (of any family: a job's
    `registry.family_options_of(job)`, generate's flags): the detected family's become its option table, a
    key of another family with a value other than its default is refused with a line naming `options_source`
    (the job file; the model's path by default) and the key as `key_label` spells it.
    """
    from .._quiet import quiet_libraries
    from ..dtypes import dtype_named

    quiet_libraries()
    if path is None:
        path = default_model_path()
        if not (path / "model_index.json").exists():
            raise UserError("the embedded default model is missing from this installation; pass --model PATH",
                            path=path)
    path = Path(path)
    if isinstance(dtype, str):
        dtype = dtype_named(dtype)
    if family is not None:
        plugin_for(family)  # an unknown name fails here, before any file is read
    if not path.exists():
        raise UserError("model not found", path=path)
    checkpoint = None
    if path.is_dir():
        found = detect_folder(path)
    else:
        from ..fileio import load_state_dict_file

        checkpoint = load_state_dict_file(path, allow_pickle=allow_pickle)
        found = detect_single_file(set(checkpoint[0]), checkpoint[1], path)
    plugin = plugin_for(found)
    if family is not None and family not in plugin.names:
        raise UserError(f"model_family = {family!r} but this is a {plugin.title} model ({found}); "
                        "remove model_family or give a model of that family", path=path)
    table = family_options(plugin, options, options_source or path, key_label)
    plugin.check_files(path, table)
    return plugin.load(path, family=family or found, dtype=dtype, allow_pickle=allow_pickle, checkpoint=checkpoint,
                       options=table, prediction_type=prediction_type, clip_skip=clip_skip,
                       zero_terminal_snr=zero_terminal_snr, mixed_precision=mixed_precision)

