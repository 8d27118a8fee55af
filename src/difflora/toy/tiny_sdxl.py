"""Tiny SDXL models built offline, for tests and benchmarks.

`build_tiny_sdxl()` has SDXL's exact block structure (3 U-Net blocks of 2 layers, transformer
depths 1/2/10, a 10-deep middle block, CLIP-L's 12 and bigG's 32 text-encoder layers), so kohya
module names and counts are those of the real model, at narrow widths. `build_real_sdxl()` is the
real architecture with random weights (the meta device enumerates its modules without memory).
"""

from __future__ import annotations

import torch

from ..models.sdxl.model import (SCHEDULER_CONFIG, TEXT_ENCODER_2_CONFIG, TEXT_ENCODER_CONFIG, UNET_CONFIG, VAE_CONFIG,
                           StableDiffusionXL)
from . import base_model


def tiny_configs(width: int = 16, text_widths: tuple[int, int] = (16, 24)) -> dict[str, dict]:
    """Narrow SDXL-layout configs; attention heads are width // 64 (at least 1), as SDXL's 64-wide heads.

    The two text encoders differ in width as CLIP-L and bigG do (diffusers' single-file loader tells
    them apart by width).
    """
    chans = (width, 2 * width, 4 * width)
    w1, w2 = text_widths
    unet = dict(UNET_CONFIG, sample_size=16, block_out_channels=chans,
                attention_head_dim=tuple(max(1, c // 64) for c in chans), cross_attention_dim=w1 + w2,
                addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + w2,
                norm_num_groups=min(8, width))
    vae = dict(VAE_CONFIG, down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
               block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=8, sample_size=64)

    def te(w: int) -> dict:
        return dict(hidden_size=w, intermediate_size=2 * w, num_attention_heads=max(1, w // 64), projection_dim=w)

    return {"unet": unet, "vae": vae, "text_encoder": dict(TEXT_ENCODER_CONFIG, **te(w1)),
            "text_encoder_2": dict(TEXT_ENCODER_2_CONFIG, **te(w2)), "scheduler": dict(SCHEDULER_CONFIG)}


def _tokenizers():
    from transformers import CLIPTokenizer

    tok1 = base_model.build_tokenizer()
    tok2 = CLIPTokenizer(vocab=tok1.get_vocab(), merges=_merges(tok1), pad_token="!", model_max_length=77)
    tok2.model_max_length = 77
    return tok1, tok2


def _merges(tok) -> list[tuple[str, str]]:
    import json

    model = json.loads(tok.backend_tokenizer.to_str())["model"]
    return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]


def build_tiny_sdxl(seed: int = 0, prediction_type: str = "epsilon", width: int = 16,
                    zero_terminal_snr: bool = False) -> StableDiffusionXL:
    """A randomly initialised tiny SDXL model (64x64 images, 16x16 latents) with in-code tokenizers."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = tiny_configs(width)
    tok1, tok2 = _tokenizers()
    ids = dict(vocab_size=len(tok1), bos_token_id=tok1.bos_token_id, eos_token_id=tok1.eos_token_id)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**cfg["unet"])
    vae = AutoencoderKL(**cfg["vae"])
    te1 = CLIPTextModel(CLIPTextConfig(**{**cfg["text_encoder"], **ids, "pad_token_id": tok1.pad_token_id}))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**{**cfg["text_encoder_2"], **ids,
                                                        "pad_token_id": tok2.pad_token_id}))
    # Random init gives a near-zero U-Net output; scale it so LoRA effects and losses are visible.
    with torch.no_grad():
        for p in unet.parameters():
            p.mul_(1.5)
    model = StableDiffusionXL(unet, vae, te1, te2, tok1, tok2, cfg["scheduler"], prediction_type=prediction_type,
                              source="tiny-sdxl", zero_terminal_snr=zero_terminal_snr)
    model.freeze()
    return model


def build_sdxl_components(width: int | None = None):
    """(unet, vae, text_encoder, text_encoder_2, scheduler config) with random weights: the real SDXL
    (width None) or its layout at U-Net width `width`, for the bundled CLIP vocabulary."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = {"unet": UNET_CONFIG, "vae": VAE_CONFIG, "text_encoder": TEXT_ENCODER_CONFIG,
           "text_encoder_2": TEXT_ENCODER_2_CONFIG, "scheduler": SCHEDULER_CONFIG}
    if width is not None:
        cfg = tiny_configs(width, (width, width * 3 // 2))
    return (UNet2DConditionModel(**cfg["unet"]), AutoencoderKL(**cfg["vae"]),
            CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"])),
            CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder_2"])), dict(cfg["scheduler"]))


def build_real_sdxl(device: str = "meta"):
    """The real SDXL U-Net and text encoders with random weights (meta device by default)."""
    with torch.device(device):
        unet, _, te1, te2, _ = build_sdxl_components(None)
    return unet, te1, te2
