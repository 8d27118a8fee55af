"""FLUX.2's own job keys (musubi's names). The flow-matching keys (timestep_sampling, ...), train_blocks,
fp8_base, nf4_base, blocks_to_swap and gradient checkpointing are the FLUX keys FLUX.2 shares."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ...options import Strict


class Flux2JobOptions(Strict):
    model_version: Literal["dev", "klein-4b", "klein-base-4b", "klein-9b", "klein-base-9b"] | None = Field(
        None, description="FLUX.2: which model a single file is (klein base and distilled share their weights); "
                          "a diffusers folder says it itself")
    text_encoder: str | None = Field(
        None, description="FLUX.2: text encoder of a single-file transformer (a Qwen3 file or folder for klein, "
                          "the Mistral Small folder for dev)")
    vae: str | None = Field(None, description="FLUX.2: the VAE of a single-file transformer (flux2-vae.safetensors "
                                              "or a diffusers vae/ folder)")
    tokenizer: str | None = Field(None, description="FLUX.2: the text encoder's tokenizer folder when it is not "
                                                    "beside the text encoder (never downloaded)")
    text_encoder_max_token_length: int = Field(512, ge=1, description="FLUX.2: prompt tokens (the pipelines' 512)")


FLUX2_ONLY_KEYS = tuple(Flux2JobOptions.model_fields)
