"""FLUX.1 job keys, with kohya's names and defaults (flux_train_network.py and lora_flux's network_args).

They are top-level job keys, as in kohya's FLUX TOML files; a job on another model family that
sets one of them to something other than its default is refused (train/run.py) rather than
silently ignoring it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..options import Strict


def _f(default, description: str, **kw):
    return Field(default, description=description, **kw)


class FluxJobOptions(Strict):
    # the files FLUX users have (kohya: --clip_l --t5xxl --ae); unused with a diffusers folder
    clip_l: str | None = _f(None, "FLUX: CLIP-L text encoder file for a single-file transformer (kohya's clip_l)")
    t5xxl: str | None = _f(None, "FLUX: T5-XXL encoder file for a single-file transformer (kohya's t5xxl)")
    ae: str | None = _f(None, "FLUX: autoencoder file for a single-file transformer (kohya's ae)")
    t5xxl_tokenizer: str | None = _f(None, "FLUX: folder with T5's tokenizer.json or spiece.model (never downloaded)")
    # flow matching (kohya's defaults)
    guidance_scale: float = _f(3.5, "FLUX.1-dev: the guidance embedding's value during training")
    t5xxl_max_token_length: int | None = _f(None, "FLUX: T5 tokens (unset: 512 dev, 256 schnell)", ge=1)
    apply_t5_attn_mask: bool = _f(False, "FLUX: mask T5 padding in the T5 encoder and the transformer's attention")
    timestep_sampling: Literal["sigma", "uniform", "sigmoid", "shift", "flux_shift", "qwen_shift"] = _f(
        "sigma", "FLUX / Qwen-Image: how σ is drawn (sigma, uniform, sigmoid, shift; flux_shift on FLUX, qwen_shift "
        "on Qwen-Image; unset on Qwen-Image: shift)")
    sigmoid_scale: float = _f(1.0, "FLUX: scale of the normal draw for sigmoid / shift / flux_shift sampling")
    discrete_flow_shift: float = _f(3.0, "FLUX / Qwen-Image: shift of the sigma and shift samplings (unset on "
                                    "Qwen-Image: 2.2)", gt=0)
    model_prediction_type: Literal["raw", "additive", "sigma_scaled"] = _f(
        "sigma_scaled", "FLUX: model output as the loss sees it (raw, additive: +x_t, sigma_scaled: x_t - σ·out)")
    # which modules (kohya network_args)
    train_blocks: Literal["all", "double", "single"] = _f("all", "FLUX: LoRA on all, double or single blocks")
    in_dims: list[int] | None = _f(None, "FLUX: ranks of img_in, time_in, vector_in, guidance_in, txt_in (0: none)")
    train_t5xxl: bool = _f(False, "FLUX: also a T5-XXL LoRA (lora_te3_)")
    # low VRAM
    fp8_base: bool = _f(False, "FLUX: frozen transformer stored in float8_e4m3fn, computed in bf16")
    nf4_base: bool = _f(False, "FLUX: frozen transformer blocks in 4-bit NF4 (CUDA, bitsandbytes)")
    blocks_to_swap: int | None = _f(None, "FLUX: transformer blocks kept on the CPU, brought in per forward", ge=0)
    cpu_offload_checkpointing: bool = _f(False, "FLUX: gradient checkpointing with the saved inputs on the CPU")
    # LoRA file layout
    save_format: Literal["kohya", "diffusers", "comfyui"] = _f(
        "kohya", "LoRA file layout: kohya, diffusers (transformer. peft keys) or comfyui (Qwen-Image: diffusion_model.)")


FLUX_ONLY_KEYS = tuple(k for k in FluxJobOptions.model_fields if k != "save_format")
