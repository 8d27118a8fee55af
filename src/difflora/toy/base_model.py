"""The embedded default model: an SD1-architecture diffusion model for the procedural faces.

Components (all standard diffusers / transformers classes, so every loader works on it):
- CLIPTokenizer whose vocabulary is the caption words plus the byte-level alphabet,
  built deterministically (no trainer, no hub);
- CLIPTextModel (2 layers, width 64), trained jointly with the U-Net;
- AutoencoderKL 64x64x3 <-> 16x16x4;
- UNet2DConditionModel with cross-attention at 8x8 and 4x4 (not at 16x16: 4x cheaper);
- DDPM-style scaled-linear schedule, epsilon objective, as SD1.
"""

from __future__ import annotations

from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
from tokenizers import pre_tokenizers

from ..models.sd.model import SD_SCHEDULER_CONFIG
from . import faces

MAX_LENGTH = 77


def caption_words() -> list[str]:
    words = {"a", "face", ","}
    for attribute, values in faces.ATTRIBUTES.items():
        for value in values:
            words.update(faces.phrase(attribute, value).split())
    return sorted(words)


def build_tokenizer(words: list[str] | None = None) -> CLIPTokenizer:
    """A CLIP BPE tokenizer in which each caption word is (normally) one token.

    Any other text still tokenizes, character by character, through the byte alphabet.
    Merges chain each word left to right; longer words get the lower ranks so a short
    word's merge does not split them.
    """
    words = caption_words() if words is None else sorted(set(words))
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in alphabet:
        vocab.setdefault(ch, len(vocab))
    for ch in alphabet:
        vocab.setdefault(ch + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    for word in sorted(words, key=lambda w: (-len(w), w)):
        if len(word) < 2:
            continue
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        left = symbols[0]
        for right in symbols[1:]:
            pair = (left, right)
            if pair not in merges:
                merges.append(pair)
            left = left + right
            vocab.setdefault(left, len(vocab))
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_LENGTH)
    tok.model_max_length = MAX_LENGTH
    return tok


def text_encoder_config(tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=64,
    )


VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(32, 48, 64),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=16,
    sample_size=faces.SIZE,
)

UNET_CONFIG = dict(
    sample_size=faces.SIZE // 4,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(64, 128, 128),
    layers_per_block=1,
    cross_attention_dim=64,
    attention_head_dim=4,
    norm_num_groups=32,
)

SCHEDULER_CONFIG = SD_SCHEDULER_CONFIG  # SD1's: DDPM scaled-linear, epsilon


def build_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    return CLIPTextModel(text_encoder_config(tokenizer))
