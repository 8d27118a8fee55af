"""Building a QwenImageModel from a folder or ComfyUI's files and the job's Qwen-Image table."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..flow_matching import FlowMatchOptions, weighting_of
from . import files
from .model import QwenImageModel, QwenImageOptions
from .options import DEFAULT_DISCRETE_FLOW_SHIFT, DEFAULT_TIMESTEP_SAMPLING, QwenImageJobOptions

log = logging.getLogger(__name__)


def options_from_table(options: QwenImageJobOptions, variant: str) -> QwenImageOptions:
    """The job's flow keys (musubi's names); unset ones take Qwen-Image's defaults, not FLUX's."""
    given = options.model_fields_set
    sampling = options.timestep_sampling if "timestep_sampling" in given else DEFAULT_TIMESTEP_SAMPLING
    shift = options.discrete_flow_shift if "discrete_flow_shift" in given else DEFAULT_DISCRETE_FLOW_SHIFT
    return QwenImageOptions(variant=variant, flow=FlowMatchOptions(sampling, options.sigmoid_scale, shift, "raw",
                                                                   **weighting_of(options)))


def load_qwen_image(path: Path, *, dtype=None, checkpoint=None, options: QwenImageJobOptions | None = None,
                    mixed_precision: str = "no") -> QwenImageModel:
    options = options or QwenImageJobOptions()
    dtype = dtype or torch.float32
    if mixed_precision == "bf16" or options.fp8_base:
        dtype = torch.bfloat16  # the frozen model in the mixed-precision dtype; LoRA weights stay fp32
    if path.is_dir():
        found = files.variant_of_folder(path, files.read_index(path))
        variant = files.resolve_variant(found, options.model_variant, path, can_tell=True)
        parts = files.load_folder(path, variant, dtype)
    else:
        marker = files.MARKER_2511 in checkpoint[0]
        variant = files.resolve_variant("edit_2511" if marker else None, options.model_variant, path, can_tell=False)
        parts = files.load_single_files(path, checkpoint, variant=variant, dtype=dtype,
                                        text_encoder=options.text_encoder, vae=options.vae,
                                        tokenizer=options.qwen_tokenizer)
    log.info("Qwen-Image variant: %s", variant)
    model = QwenImageModel(*parts, source=str(path), options=options_from_table(options, variant))
    model.freeze()
    if options.fp8_base:
        model.store_base_fp8()
    if options.nf4_base:
        model.store_base_nf4()
    return model
