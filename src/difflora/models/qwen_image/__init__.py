"""Qwen-Image, Qwen-Image-Edit, Edit-2509 and Edit-2511 (one family: `model_family = "qwen_image"`, the variant
from the files or `model_variant`). Light on purpose: the job schema imports this package's options; the
torch-heavy modules load when a model does."""

from __future__ import annotations

import json
from pathlib import Path

from ...errors import UserError

METHOD_DEFAULTS: dict[str, dict] = {}


def detect_folder(path: Path, index: dict | None = None) -> str | None:
    """"qwen_image" for a diffusers folder of QwenImagePipeline / QwenImageEditPipeline / QwenImageEditPlusPipeline."""
    from .files import PIPELINE_VARIANTS

    if index is None:
        try:
            index = json.loads((Path(path) / "model_index.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
    cls = str(index.get("_class_name", ""))
    if cls.startswith("QwenImage") and cls not in PIPELINE_VARIANTS:
        raise UserError(f"this is a {cls} folder; difflora trains Qwen-Image, Qwen-Image-Edit, Edit-2509 and "
                        "Edit-2511 (QwenImagePipeline, QwenImageEditPipeline, QwenImageEditPlusPipeline)", path=path)
    return "qwen_image" if cls in PIPELINE_VARIANTS else None


def detect_single_file(keys, metadata: dict[str, str] | None = None) -> str | None:
    from .files import is_qwen_image_transformer

    return "qwen_image" if is_qwen_image_transformer(keys) else None


def load(path, *, family: str = "qwen_image", dtype=None, allow_pickle: bool = False, prediction_type=None,
         clip_skip=None, checkpoint=None, zero_terminal_snr=None, job=None, **options):
    """The registry's loader: the job's Qwen-Image keys (options.py) name the files and the variant; `options`
    (text_encoder, vae, qwen_tokenizer, model_variant, fp8_base) override them (difflora generate's flags)."""
    from .loader import load_qwen_image

    if prediction_type not in (None, "flow"):
        raise UserError(f"Qwen-Image is a flow-matching model; prediction type {prediction_type!r} does not apply",
                        path=path)
    if clip_skip is not None:
        raise UserError("clip_skip applies to CLIP text encoders; Qwen-Image uses Qwen2.5-VL's last hidden state",
                        path=path)
    return load_qwen_image(Path(path), dtype=dtype, checkpoint=checkpoint, job=job, **options)
