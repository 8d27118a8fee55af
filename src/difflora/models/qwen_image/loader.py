"""Building a QwenImageModel from a folder or ComfyUI's files and the job's keys."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ...errors import UserError
from ..flow_matching import FlowMatchOptions
from . import files
from .model import QwenImageModel, QwenImageOptions
from .options import DEFAULT_DISCRETE_FLOW_SHIFT, DEFAULT_TIMESTEP_SAMPLING

log = logging.getLogger(__name__)


def options_from_job(job, variant: str) -> QwenImageOptions:
    """The job's flow keys (musubi's names); unset ones take Qwen-Image's defaults, not FLUX's."""
    if job is None:
        return QwenImageOptions(variant=variant)
    given = job.model_fields_set
    sampling = job.timestep_sampling if "timestep_sampling" in given else DEFAULT_TIMESTEP_SAMPLING
    shift = job.discrete_flow_shift if "discrete_flow_shift" in given else DEFAULT_DISCRETE_FLOW_SHIFT
    return QwenImageOptions(variant=variant, flow=FlowMatchOptions(sampling, job.sigmoid_scale, shift, "raw"))


def load_qwen_image(path: Path, *, dtype=None, checkpoint=None, job=None, text_encoder=None, vae=None,
                    qwen_tokenizer=None, model_variant=None, fp8_base=None) -> QwenImageModel:
    dtype = dtype or torch.float32
    if job is not None:
        if job.mixed_precision == "bf16" or job.fp8_base:
            dtype = torch.bfloat16  # the frozen model in the mixed-precision dtype; LoRA weights stay fp32
        text_encoder = text_encoder or job.text_encoder
        vae = vae or job.vae
        qwen_tokenizer = qwen_tokenizer or job.qwen_tokenizer
        model_variant = model_variant or job.model_variant
        fp8_base = fp8_base if fp8_base is not None else job.fp8_base
    if path.is_dir():
        for key, value in (("text_encoder", text_encoder), ("vae", vae), ("qwen_tokenizer", qwen_tokenizer)):
            if value:
                raise UserError(f"{key} is for a single-file transformer; this is a diffusers folder with its own "
                                f"{key.replace('qwen_', '')}", path=path)
        found = files.variant_of_folder(path, files.read_index(path))
        variant = files.resolve_variant(found, model_variant, path, can_tell=True)
        parts = files.load_folder(path, variant, dtype)
    else:
        marker = files.MARKER_2511 in checkpoint[0]
        variant = files.resolve_variant("edit_2511" if marker else None, model_variant, path, can_tell=False)
        parts = files.load_single_files(path, checkpoint, variant=variant, dtype=dtype, text_encoder=text_encoder,
                                        vae=vae, tokenizer=qwen_tokenizer)
    log.info("Qwen-Image variant: %s", variant)
    model = QwenImageModel(*parts, source=str(path), options=options_from_job(job, variant))
    model.freeze()
    if fp8_base:
        model.store_base_fp8()
    if job is not None and job.nf4_base:
        model.store_base_nf4()
    return model
