"""Qwen-Image job keys (musubi-tuner's names), top-level in the job TOML.

Qwen-Image also honours the shared flow-matching and low-VRAM keys (models/shared_options.py). Where the job
leaves them unset it uses musubi's recommended `timestep_sampling = "shift"` with `discrete_flow_shift = 2.2`
(docs/qwen_image.md), not FLUX's sigma / 3.0, and always the raw velocity (musubi has no model_prediction_type);
guidance_scale (FLUX.1-dev's embedded guidance) has no meaning here. text_encoder and vae are declared as Z-Image
declares them (one key, one meaning: a single file's companion files).
"""

from __future__ import annotations

from pydantic import Field

from ...options import ReadPath
from ..shared_options import FlowMatchingKeys, LowVramKeys, ModelVariantKeys


class QwenImageJobOptions(FlowMatchingKeys, LowVramKeys, ModelVariantKeys):
    # model_variant (ModelVariantKeys): unset, a single file without the 2511 marker is qwen_image
    text_encoder: ReadPath | None = Field(
        None, description="Qwen-Image: Qwen2.5-VL-7B file for a single-file transformer (musubi's --text_encoder, "
                          "ComfyUI's qwen_2.5_vl_7b.safetensors)")
    vae: ReadPath | None = Field(None, description="Qwen-Image: VAE file for a single-file transformer (musubi's --vae, "
                                              "ComfyUI's qwen_image_vae.safetensors)")
    qwen_tokenizer: ReadPath | None = Field(
        None, description="Qwen-Image: folder with Qwen2.5-VL's tokenizer.json (a Qwen-Image folder's tokenizer/; "
                          "unset: tokenizer/ beside the text_encoder file; never downloaded)")


DEFAULT_TIMESTEP_SAMPLING = "shift"
DEFAULT_DISCRETE_FLOW_SHIFT = 2.2
