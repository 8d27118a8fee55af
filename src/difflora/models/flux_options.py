"""FLUX.1 job keys, with kohya's names and defaults (flux_train_network.py and lora_flux's network_args).

They are top-level job keys, as in kohya's FLUX TOML files; a job on another model family that
sets one of them is refused (config.py) rather than silently ignoring it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..options import Strict


class FluxJobOptions(Strict):
    # the files FLUX users have (kohya: --clip_l --t5xxl --ae); unused with a diffusers folder
    clip_l: str | None = None
    t5xxl: str | None = None
    ae: str | None = None
    t5xxl_tokenizer: str | None = None  # folder with tokenizer.json / spiece.model (difflora never downloads one)
    # flow matching (kohya's defaults)
    guidance_scale: float = 3.5  # dev's guidance embedding during training
    t5xxl_max_token_length: int | None = Field(None, ge=1)  # None: 512 dev, 256 schnell
    apply_t5_attn_mask: bool = False
    timestep_sampling: Literal["sigma", "uniform", "sigmoid", "shift", "flux_shift"] = "sigma"
    sigmoid_scale: float = 1.0
    discrete_flow_shift: float = Field(3.0, gt=0)
    model_prediction_type: Literal["raw", "additive", "sigma_scaled"] = "sigma_scaled"
    # which modules (kohya network_args)
    train_blocks: Literal["all", "double", "single"] = "all"
    in_dims: list[int] | None = None  # ranks of img_in, time_in, vector_in, guidance_in, txt_in (0: none)
    train_t5xxl: bool = False
    # low VRAM
    fp8_base: bool = False
    nf4_base: bool = False  # CUDA + bitsandbytes
    blocks_to_swap: int | None = Field(None, ge=0)
    cpu_offload_checkpointing: bool = False
    cache_text_encoder_outputs: bool = False
    cache_text_encoder_outputs_to_disk: bool = False
    # LoRA file layout
    save_format: Literal["kohya", "diffusers"] = "kohya"


FLUX_ONLY_KEYS = tuple(k for k in FluxJobOptions.model_fields if k not in ("save_format",))
