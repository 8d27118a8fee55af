"""What the U-Net families share: SD1/SD2 (sd.py) and SDXL (sdxl.py).

A diffusers `UNet2DConditionModel` denoising `AutoencoderKL` latents: image sizes follow from the
two down factors, the VAE's scaling (and shift) maps latents to and from pixels, and kohya's LoRA
targets are the Linear/Conv2d layers inside the same block classes. A family adds its text
encoders, its extra U-Net inputs (`added_conditions`) and its names.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .base import Conditioning, ModelFamily

# kohya's create_modules: the block classes whose Linear/Conv2d layers a LoRA attaches to
UNET_TARGETS = ("Transformer2DModel",)
UNET_CONV_TARGETS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")  # with conv_dim (LoCon, "c3lier")


def unet_lora_modules(unet: nn.Module, conv: bool) -> list[tuple[str, nn.Module]]:
    """(diffusers module path, layer) of every layer kohya's LoRA targets in a U-Net, in module order."""
    classes = UNET_TARGETS + (UNET_CONV_TARGETS if conv else ())
    out = []
    for name, module in unet.named_modules():
        if type(module).__name__ not in classes:
            continue
        for child_name, child in module.named_modules():
            if isinstance(child, (nn.Linear, nn.Conv2d)) and child_name:
                out.append((f"{name}.{child_name}", child))
    return out


class UNetFamily(ModelFamily):
    """A model whose denoiser is a diffusers U-Net over VAE latents."""

    toy = False  # a model of the embedded toy world (its LoRAs carry their own base model version)

    @property
    def unet(self):
        return self.denoiser

    @property
    def v_prediction(self) -> bool:
        return self.objective.prediction_type == "v_prediction"

    @property
    def resolution(self) -> int:
        return int(self.unet.config.sample_size) * self.latent_downscale

    @property
    def latent_downscale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_multiple(self) -> int:
        return self.latent_downscale * 2 ** (len(self.unet.config.block_out_channels) - 1)

    def use_plain_attention(self) -> None:
        from diffusers.models.attention_processor import AttnProcessor

        self.unet.set_attn_processor(AttnProcessor())

    # ---- prediction
    def added_conditions(self, noisy: torch.Tensor, cond: Conditioning) -> dict[str, torch.Tensor] | None:
        """The U-Net's `added_cond_kwargs` (SDXL's pooled text and time_ids); None for SD1/SD2."""
        return None

    def predict(self, noisy, timesteps, cond):
        hs = cond.tensors["encoder_hidden_states"].to(noisy.dtype)
        return self.unet(noisy, timesteps, encoder_hidden_states=hs,
                         added_cond_kwargs=self.added_conditions(noisy, cond)).sample

    def pipeline_embeddings(self, cond: Conditioning, uncond: Conditioning) -> dict[str, torch.Tensor]:
        return {"prompt_embeds": cond.tensors["encoder_hidden_states"],
                "negative_prompt_embeds": uncond.tensors["encoder_hidden_states"]}

    # ---- VAE
    def encode_images(self, pixels, sample=True, generator=None):
        cfg = self.vae.config
        dist = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist
        z = dist.sample(generator=generator) if sample else dist.mode()
        shift = getattr(cfg, "shift_factor", None) or 0.0
        return (z.float() - shift) * cfg.scaling_factor

    def decode_latents(self, latents):
        cfg = self.vae.config
        shift = getattr(cfg, "shift_factor", None) or 0.0
        return self.vae.decode(latents.to(self.vae.dtype) / cfg.scaling_factor + shift).sample
