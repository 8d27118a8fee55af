"""FLUX.1 job keys, with kohya's names and defaults (flux_train_network.py and lora_flux's network_args).

They are top-level job keys, as in kohya's FLUX TOML files; a job on another model family that
sets one of them to something other than its default is refused rather than
silently ignoring it (models/registry.py: family_options).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ...options import ReadPath
from ..shared_options import FlowMatchingKeys, LowVramKeys, ModelVariantKeys


def _f(default, description: str, **kw):
    return Field(default, description=description, **kw)


class FluxJobOptions(FlowMatchingKeys, LowVramKeys, ModelVariantKeys):
    # model_variant = "kontext": a single-file FLUX.1 Kontext [dev] (its keys are FLUX.1-dev's); a folder says it
    # the files FLUX users have (kohya: --clip_l --t5xxl --ae); unused with a diffusers folder
    clip_l: ReadPath | None = _f(None, "FLUX: CLIP-L text encoder file for a single-file transformer (kohya's clip_l)")
    t5xxl: ReadPath | None = _f(None, "FLUX: T5-XXL encoder file for a single-file transformer (kohya's t5xxl)")
    ae: ReadPath | None = _f(None, "FLUX: autoencoder file for a single-file transformer (kohya's ae)")
    t5xxl_tokenizer: ReadPath | None = _f(None, "FLUX: folder with T5's tokenizer.json or spiece.model (never downloaded)")
    t5xxl_max_token_length: int | None = _f(None, "FLUX: T5 tokens (unset: 512 dev, 256 schnell)", ge=1)
    apply_t5_attn_mask: bool = _f(False, "FLUX: mask T5 padding in the T5 encoder and the transformer's attention")
    # which modules (kohya network_args)
    train_blocks: Literal["all", "double", "single"] = _f("all", "FLUX: LoRA on all, double or single blocks")
    in_dims: list[int] | None = _f(None, "FLUX: ranks of img_in, time_in, vector_in, guidance_in, txt_in (0: none)")
    train_t5xxl: bool = _f(False, "FLUX: also a T5-XXL LoRA (lora_te3_)")
