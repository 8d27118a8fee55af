"""Qwen-Image job keys, with musubi-tuner's names (qwen_image_train_network.py).

Top-level keys as in musubi's command lines. The flow-matching and low-VRAM keys Qwen-Image shares with FLUX
(timestep_sampling, sigmoid_scale, discrete_flow_shift, fp8_base, nf4_base, blocks_to_swap, save_format) are the
ones in models/flux_options.py; `SHARED_KEYS` lists those this family honours. Where the job leaves them unset,
Qwen-Image uses musubi's recommended `timestep_sampling = "shift"` with `discrete_flow_shift = 2.2`
(docs/qwen_image.md), not FLUX's sigma / 3.0.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ...options import Strict


class QwenImageJobOptions(Strict):
    model_variant: Literal["qwen_image", "edit", "edit_2509", "edit_2511"] | None = Field(
        None, description="Qwen-Image: which model the weights are (qwen_image, edit, edit_2509, edit_2511); "
                          "unset: what the files say (a single file without the 2511 marker: qwen_image)")
    text_encoder: str | None = Field(None, description="Qwen-Image: Qwen2.5-VL-7B file for a single-file transformer "
                                                       "(musubi's --text_encoder, ComfyUI's qwen_2.5_vl_7b.safetensors)")
    vae: str | None = Field(None, description="Qwen-Image: VAE file for a single-file transformer (musubi's --vae, "
                                              "ComfyUI's qwen_image_vae.safetensors)")
    qwen_tokenizer: str | None = Field(None, description="Qwen-Image: folder with Qwen2.5-VL's tokenizer.json (e.g. a "
                                                         "Qwen-Image folder's tokenizer/; unset: tokenizer/ beside "
                                                         "the text_encoder file; never downloaded)")


QWEN_IMAGE_KEYS = tuple(QwenImageJobOptions.model_fields)
SHARED_KEYS = ("timestep_sampling", "sigmoid_scale", "discrete_flow_shift", "fp8_base", "nf4_base", "blocks_to_swap")
DEFAULT_TIMESTEP_SAMPLING = "shift"
DEFAULT_DISCRETE_FLOW_SHIFT = 2.2
