"""FLUX.2 (Black Forest Labs, late 2025): dev (32B, Mistral Small 3.1 text encoder) and klein 4B / 9B (Qwen3
4B / 8B), klein as step-distilled and base models.

Layouts that load, offline: diffusers folders (Flux2Pipeline, Flux2KleinPipeline) and BFL / ComfyUI single
files with `text_encoder` and `vae` job keys (musubi's names). The transformer is diffusers'
Flux2Transformer2DModel (q/k/v fused as diffusers' fuse_projections does), so kohya's LoRA names
(`lora_unet_double_blocks_0_img_attn_qkv`, musubi's) are one module each; names.py maps the layouts.

This module stays light (no torch import): the registry imports it to build the job schema.
"""

from __future__ import annotations

import json
from pathlib import Path

NAMES = ("flux2",)
TITLE = "FLUX.2"


def detect_folder(path: Path, index: dict | None = None) -> str | None:
    """"flux2" for a Flux2Pipeline / Flux2KleinPipeline folder (registered before FLUX.1, which claims Flux*)."""
    if index is None:
        try:
            index = json.loads((Path(path) / "model_index.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
    return "flux2" if str(index.get("_class_name", "")).startswith("Flux2") else None


def detect_single_file(keys, metadata: dict[str, str] | None = None) -> str | None:
    """BFL's FLUX.2 layout: global modulation outside the blocks (ComfyUI's test, `double_stream_modulation_img`)."""
    bare = {k.split("diffusion_model.", 1)[-1] for k in keys}
    return "flux2" if "double_stream_modulation_img.lin.weight" in bare else None


def load(path, *, family: str = "flux2", dtype=None, allow_pickle: bool = False, prediction_type=None,
         clip_skip=None, checkpoint=None, zero_terminal_snr=None, job=None, **options):
    """The registry's loader: the job's FLUX.2 keys (models/flux2/options.py) and the shared FLUX keys set the
    files and options; `options` (text_encoder, vae, tokenizer, model_version, fp8_base) override them."""
    import torch

    from ...errors import UserError
    from ..flow_matching import FlowMatchOptions
    from .files import load_diffusers_folder, load_single_file
    from .model import Flux2Options

    dtype = dtype or torch.float32
    if prediction_type not in (None, "flow"):
        raise UserError(f"FLUX.2 is a flow-matching model; prediction type {prediction_type!r} does not apply",
                        path=path)
    if clip_skip:
        raise UserError("clip_skip does not apply to FLUX.2 (its text input is fixed hidden layers)", path=path)
    opts = Flux2Options()
    if job is not None:
        if job.mixed_precision == "bf16" or job.fp8_base:
            dtype = torch.bfloat16
        set_keys = job.model_fields_set
        flow = opts.flow
        opts.flow = FlowMatchOptions(
            job.timestep_sampling if "timestep_sampling" in set_keys else flow.timestep_sampling,
            job.sigmoid_scale, job.discrete_flow_shift,
            job.model_prediction_type if "model_prediction_type" in set_keys else flow.model_prediction_type)
        if "guidance_scale" in set_keys:
            opts.guidance_scale = job.guidance_scale
        opts.train_blocks = job.train_blocks
        opts.max_token_length = job.text_encoder_max_token_length
        base = {"text_encoder": job.text_encoder, "vae": job.vae, "tokenizer": job.tokenizer,
                "model_version": job.model_version, "fp8_base": job.fp8_base}
        options = {**base, **{k: v for k, v in options.items() if v is not None}}
    options = {k: v for k, v in options.items() if v is not None}
    path = Path(path)
    if path.is_dir():
        given = sorted(k for k in ("text_encoder", "vae", "model_version") if options.get(k))
        if given:
            raise UserError(f"{', '.join(given)} apply to a FLUX.2 single file; this diffusers folder has its own",
                            path=path)
        model = load_diffusers_folder(path, dtype=dtype, options=opts)
    else:
        model = load_single_file(path, checkpoint=checkpoint, dtype=dtype, options=opts,
                                 **{k: v for k, v in options.items() if k != "fp8_base"})
    if options.get("fp8_base"):
        model.store_base_fp8()
    if job is not None and job.nf4_base:
        model.store_base_nf4()
    return model
