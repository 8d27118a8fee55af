"""Z-Image job keys (musubi-tuner's names where it has one), top-level in the job TOML.

Z-Image also honours the shared flow-matching and low-VRAM keys (models/shared_options.py), with musubi's
Z-Image training defaults where the job leaves them unset: timestep_sampling "shift", discrete_flow_shift 2.0,
model_prediction_type "raw". guidance_scale (FLUX.1-dev's embedded guidance) has no meaning here: a job
setting it is refused.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ...options import ReadPath
from ..shared_options import FlowMatchingKeys, LowVramKeys


class ZImageJobOptions(FlowMatchingKeys, LowVramKeys):
    zimage_variant: Literal["turbo", "base"] | None = Field(
        None, description="Z-Image: turbo (distilled, 8 steps, no CFG) or base (CFG); the weights cannot tell")
    text_encoder: ReadPath | None = Field(
        None, description="Z-Image: Qwen3-4B text-encoder file for a single-file transformer (musubi's text_encoder)")
    vae: ReadPath | None = Field(None, description="Z-Image: FLUX.1 autoencoder file (ae.safetensors) for a single file")
    qwen3_tokenizer: ReadPath | None = Field(
        None, description="Z-Image: folder with Qwen3's tokenizer.json (beside a text_encoder file when unset)")
