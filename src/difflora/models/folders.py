"""Writing diffusers model folders that every reader loads.

transformers >= 5.6 saves `CLIPTextModel` without the `text_model.` key prefix. transformers 4
(kohya's pin), ComfyUI's diffusers loader and most other tools then find none of the text
encoder's weights and leave it randomly initialised, without an error. Every folder difflora
writes therefore stores the text encoder in the layout published SD checkpoints use
(`text_model.encoder.layers.0...`); transformers 5 reads that layout too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..fileio import atomic_folder

TEXT_MODEL_PREFIX = "text_model."
_CLIP_ARCHITECTURES = ("CLIPTextModel",)  # CLIPTextModelWithProjection still saves text_model.*


def prefix_text_encoder_keys(folder: Path) -> list[Path]:
    """Rewrite every CLIPTextModel weight file under `folder` with `text_model.` keys; returns the files changed."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    changed = []
    for cfg in sorted(Path(folder).glob("*/config.json")):
        try:
            arch = json.loads(cfg.read_text(encoding="utf-8")).get("architectures") or []
        except (OSError, ValueError):
            continue
        if not any(a in _CLIP_ARCHITECTURES for a in arch):
            continue
        for weights in sorted(cfg.parent.glob("*.safetensors")):
            with safe_open(str(weights), framework="pt") as f:
                keys = list(f.keys())
                if all(k.startswith(TEXT_MODEL_PREFIX) for k in keys):
                    continue
                metadata = f.metadata() or {}
                tensors = {(k if k.startswith(TEXT_MODEL_PREFIX) else TEXT_MODEL_PREFIX + k): f.get_tensor(k)
                           for k in keys}
            tmp = weights.with_name(f".{weights.name}.tmp")
            save_file(tensors, str(tmp), metadata=metadata)
            os.replace(tmp, weights)
            changed.append(weights)
    return changed


def save_pipeline_folder(pipe, path: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
    """`pipe.save_pretrained` into a new folder, text encoders in the published layout, all or nothing."""
    with atomic_folder(path) as tmp:  # beside the target, umask permissions; stale ones from killed saves are removed
        if dtype is not None:
            pipe.to(dtype=dtype)
        pipe.save_pretrained(tmp, safe_serialization=True)
        if dtype is not None:
            pipe.to(dtype=torch.float32)
        prefix_text_encoder_keys(tmp)


def save_model(model, path: str | os.PathLike, single_file: bool | None, dtype: torch.dtype | None,
               write_single_file, scheduler_class: str) -> None:
    """A family's `save`: `write_single_file(model, path, dtype)` for a .safetensors path (or single_file),
    else a diffusers folder whose scheduler is `scheduler_class` over the model's noise schedule."""
    import diffusers

    path = Path(path)
    if single_file is None:
        single_file = path.suffix.lower() == ".safetensors"
    if single_file:
        write_single_file(model, path, dtype=dtype)
        return
    pipe = model.pipeline("ddim")
    pipe.scheduler = getattr(diffusers, scheduler_class).from_config(model.scheduler_config)
    save_pipeline_folder(pipe, path, dtype)
