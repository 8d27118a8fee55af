"""Z-Image job keys (musubi-tuner's names where it has one), top-level in the job TOML.

Z-Image also reads these keys of the FLUX table (same meaning, musubi's Z-Image defaults when unset):
timestep_sampling ("shift"), discrete_flow_shift (2.0), sigmoid_scale, model_prediction_type ("raw"),
fp8_base, nf4_base, blocks_to_swap, cpu_offload_checkpointing, save_format.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ...options import Strict

VARIANTS = ("turbo", "base")
# keys of models/flux_options.py that Z-Image reads too
SHARED_FLOW_KEYS = ("timestep_sampling", "discrete_flow_shift", "sigmoid_scale", "model_prediction_type", "fp8_base",
                    "nf4_base", "blocks_to_swap", "cpu_offload_checkpointing")


class ZImageJobOptions(Strict):
    zimage_variant: Literal["turbo", "base"] | None = Field(
        None, description="Z-Image: turbo (distilled, 8 steps, no CFG) or base (CFG); the weights cannot tell")
    text_encoder: str | None = Field(
        None, description="Z-Image: Qwen3-4B text-encoder file for a single-file transformer (musubi's text_encoder)")
    vae: str | None = Field(None, description="Z-Image: FLUX.1 autoencoder file (ae.safetensors) for a single file")
    qwen3_tokenizer: str | None = Field(
        None, description="Z-Image: folder with Qwen3's tokenizer.json (beside a text_encoder file when unset)")


ZIMAGE_ONLY_KEYS = tuple(ZImageJobOptions.model_fields)
