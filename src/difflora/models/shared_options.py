"""Job-key tables several families include (kohya's / musubi-tuner's names), so that one key means one thing
whichever family reads it: a family's option table subclasses the ones it honours. The registry refuses two
families declaring one key differently (models/registry.py: register_family)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..options import Strict


class FlowMatchingKeys(Strict):
    """Training a flow-matching model (kohya's flux_train_network / musubi-tuner, their defaults)."""

    guidance_scale: float = Field(3.5, description="guidance-distilled models (FLUX.1-dev): the guidance "
                                                   "embedding's value during training")
    timestep_sampling: Literal["sigma", "uniform", "sigmoid", "shift", "flux_shift", "qwen_shift"] = Field(
        "sigma", description="how σ is drawn (sigma, uniform, sigmoid, shift, flux_shift; qwen_shift on Qwen-Image)")
    sigmoid_scale: float = Field(1.0, description="scale of the normal draw for sigmoid / shift / flux_shift sampling")
    discrete_flow_shift: float = Field(3.0, description="shift of the sigma and shift samplings", gt=0)
    model_prediction_type: Literal["raw", "additive", "sigma_scaled"] = Field(
        "sigma_scaled", description="model output as the loss sees it (raw, additive: +x_t, sigma_scaled: x_t - σ·out)")
    # musubi-tuner's (and kohya's SD3 / FLUX) names, values and defaults
    weighting_scheme: Literal["none", "logit_normal", "mode", "cosmap", "sigma_sqrt"] = Field(
        "none", description="loss weight per σ (sigma_sqrt: σ⁻², cosmap: 2/(π(1-2σ+2σ²))) or, with "
                            "timestep_sampling = sigma, the σ density (logit_normal, mode); none: uniform")
    logit_mean: float = Field(0.0, description="mean of the logit_normal weighting scheme")
    logit_std: float = Field(1.0, description="std of the logit_normal weighting scheme", gt=0)
    mode_scale: float = Field(1.29, description="scale of the mode weighting scheme")


class LowVramKeys(Strict):
    """Fitting a large frozen transformer in little memory (models/low_vram.py)."""

    fp8_base: bool = Field(False, description="frozen transformer stored in float8_e4m3fn, computed in bf16")
    nf4_base: bool = Field(False, description="frozen transformer blocks in 4-bit NF4 (CUDA, bitsandbytes)")
    blocks_to_swap: int | None = Field(None, description="transformer blocks kept on the CPU, brought in per forward",
                                       ge=0)
    cpu_offload_checkpointing: bool = Field(False, description="gradient checkpointing with the saved inputs on the CPU")


class ModelVariantKeys(Strict):
    """Which model the weights are, where the files cannot tell (a single file of an edit model has the keys of its
    text-to-image sibling). Each family accepts its own values (FamilyPlugin.model_variants); the registry refuses
    the others with one line."""

    model_variant: Literal["qwen_image", "edit", "edit_2509", "edit_2511", "kontext"] | None = Field(
        None, description="which model the weights are: Qwen-Image (qwen_image, edit, edit_2509, edit_2511), FLUX.1 "
                          "(kontext: FLUX.1 Kontext [dev]); unset: what the files say")
