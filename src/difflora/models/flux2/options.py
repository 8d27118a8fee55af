"""FLUX.2 job keys (musubi-tuner's names), top-level in the job TOML.

FLUX.2 also honours the shared flow-matching and low-VRAM keys (models/shared_options.py), with musubi's
FLUX.2 defaults where a job leaves them unset: timestep_sampling "flux_shift" (musubi's flux2_shift: the
shift follows the token count), model_prediction_type "raw", guidance_scale 1.0 for dev (musubi trains dev
at guidance 1). text_encoder, vae and qwen3_tokenizer are declared as Z-Image declares them (one key, one
meaning: a single file's companion files); train_blocks as FLUX.1 declares it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ...options import ReadPath
from ..shared_options import FlowMatchingKeys, LowVramKeys


class Flux2JobOptions(FlowMatchingKeys, LowVramKeys):
    model_version: Literal["dev", "klein-4b", "klein-base-4b", "klein-9b", "klein-base-9b"] | None = Field(
        None, description="FLUX.2: which model a single file is (klein base and distilled share their weights); "
                          "a diffusers folder says it itself")
    text_encoder: ReadPath | None = Field(
        None, description="FLUX.2: text encoder of a single-file transformer (a Qwen3 file or folder for klein, "
                          "the Mistral Small 3.1 folder for dev)")
    vae: ReadPath | None = Field(None, description="FLUX.2: its VAE (flux2-vae.safetensors or a diffusers vae/ folder) "
                                              "for a single-file transformer")
    qwen3_tokenizer: ReadPath | None = Field(
        None, description="FLUX.2 klein: folder with Qwen3's tokenizer.json (beside a text_encoder file when unset)")
    text_encoder_max_token_length: int = Field(512, ge=1, description="FLUX.2: prompt tokens (the pipelines' 512)")
    train_blocks: Literal["all", "double", "single"] = Field("all", description="FLUX: LoRA on all, double or "
                                                                                "single blocks")
