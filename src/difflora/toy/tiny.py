"""Tiny SD1/SD2 models built offline, for tests and benchmarks.

`layout="sd15"` has SD1.5's block structure (4 blocks, 2 layers each, attention in the first
three), so LoRA module names and counts are those of the real model; `layout="small"` is
smaller still. `real_config` gives the true SD1.5 / SD2.1 configs (build them on the meta
device to enumerate modules without allocating 3 GB).
"""

from __future__ import annotations

import torch
from transformers import CLIPTextConfig, CLIPTextModel

from ..models.sd.model import SD_SCHEDULER_CONFIG, StableDiffusion
from . import base_model

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768, attention_head_dim=8,
)
SD21_UNET = dict(SD15_UNET, sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                 use_linear_projection=True)
SD15_TE = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
               num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")
SD21_TE = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
               num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu")
SD_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
              layers_per_block=2, latent_channels=4, sample_size=512, scaling_factor=0.18215)


def real_config(variant: str) -> tuple[dict, dict]:
    """(unet config, text encoder config) of the real SD1.5 or SD2.1."""
    return (SD15_UNET, SD15_TE) if variant == "sd1" else (SD21_UNET, SD21_TE)


def build_real_architecture(variant: str, device: str = "meta"):
    """The real SD1.5/SD2.1 U-Net and text encoder (random weights; meta device by default)."""
    from diffusers import UNet2DConditionModel

    unet_cfg, te_cfg = real_config(variant)
    with torch.device(device):
        unet = UNet2DConditionModel(**unet_cfg)
        te = CLIPTextModel(CLIPTextConfig(**te_cfg))
    return unet, te


def tiny_configs(variant: str = "sd1", layout: str = "sd15") -> dict:
    sd2 = variant == "sd2"
    if layout == "sd15":
        unet = dict(
            sample_size=8, in_channels=4, out_channels=4,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            block_out_channels=(16, 32, 64, 64), layers_per_block=2, cross_attention_dim=32,
            attention_head_dim=(2, 2, 4, 4) if sd2 else 8, use_linear_projection=sd2, norm_num_groups=8,
        )
        vae = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                   up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(16, 16, 32, 32),
                   layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=64, scaling_factor=0.18215)
    else:
        unet = dict(
            sample_size=8, in_channels=4, out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(16, 32), layers_per_block=1, cross_attention_dim=16,
            attention_head_dim=(2, 4) if sd2 else 4, use_linear_projection=sd2, norm_num_groups=8,
        )
        vae = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                   up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                   layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=16, scaling_factor=0.18215)
    te = dict(hidden_size=unet["cross_attention_dim"], intermediate_size=2 * unet["cross_attention_dim"],
              num_hidden_layers=3 if sd2 else 2, num_attention_heads=4, max_position_embeddings=77,
              hidden_act="gelu" if sd2 else "quick_gelu")
    sched = dict(SD_SCHEDULER_CONFIG, prediction_type="v_prediction" if sd2 else "epsilon")
    return {"unet": unet, "vae": vae, "text_encoder": te, "scheduler": sched}


def build_tiny_sd(variant: str = "sd1", layout: str = "sd15", seed: int = 0,
                  prediction_type: str | None = None) -> StableDiffusion:
    """A randomly initialised tiny SD1/SD2 model with a tokenizer built in code."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    cfg = tiny_configs(variant, layout)
    tok = base_model.build_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**cfg["unet"])
    vae = AutoencoderKL(**cfg["vae"])
    te = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                      pad_token_id=tok.pad_token_id, **cfg["text_encoder"]))
    # Random init gives a near-zero U-Net output; scale it so LoRA effects and losses are visible.
    with torch.no_grad():
        for p in unet.parameters():
            p.mul_(1.5)
    sched = dict(cfg["scheduler"])
    model = StableDiffusion(unet, vae, te, tok, sched, variant=variant,
                            prediction_type=prediction_type or sched["prediction_type"], source=f"tiny-{variant}-{layout}")
    model.freeze()
    return model
