"""A tiny FLUX.1-layout model built offline (tests, CPU demos): real block structure, tiny widths.

Tokenizers are built in code: a character-level CLIP BPE (no merges) and a small Unigram T5
tokenizer trained on the toy-world caption vocabulary.
"""

from __future__ import annotations

import torch

from ..models.flux.model import FluxModel, FluxOptions, tiny_ae
from ..models.flux.transformer import FluxParams, FluxTransformer

_T5_TEXTS = ["a face, red hair, blue background, eyes open, smiling, glasses, closed eyes, "
             "brown hair, green background, black hair, yellow, white, frowning, no glasses, portrait"] * 4


def tiny_clip_tokenizer():
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = list(bytes_to_unicode().values())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for a in alphabet + [a + "</w>" for a in alphabet]:
        vocab[a] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    tok.model_max_length = 77
    return tok


def tiny_t5_tokenizer():
    from transformers import T5TokenizerFast

    tok = T5TokenizerFast(extra_ids=0).train_new_from_iterator(_T5_TEXTS, vocab_size=100)
    return tok


def tiny_flux_params(guidance_embed: bool = True, depth: int = 1, depth_single: int = 1, in_channels: int = 16) -> FluxParams:
    return FluxParams(in_channels=in_channels, out_channels=in_channels, vec_in_dim=32, context_in_dim=32,
                      hidden_size=32, mlp_ratio=4.0, num_heads=2, depth=depth, depth_single_blocks=depth_single,
                      axes_dim=[4, 4, 8], guidance_embed=guidance_embed)


def build_tiny_flux(variant: str = "dev", depth: int = 1, depth_single: int = 1, seed: int = 0,
                    options: FluxOptions | None = None) -> FluxModel:
    """Random tiny FLUX (dev with the guidance embedder, schnell, or kontext: dev's layout taking a control image):
    4 latent channels, 8x VAE, 32-wide."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    params = tiny_flux_params(variant != "schnell", depth, depth_single)
    tr = FluxTransformer(params)
    with torch.no_grad():  # BFL zero-initialises nothing; give every layer a visible effect
        for p in tr.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    vae = tiny_ae()
    clip_tok = tiny_clip_tokenizer()
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(clip_tok), hidden_size=32, intermediate_size=37,
                                        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=32))
    t5_tok = tiny_t5_tokenizer()
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                 relative_attention_num_buckets=8, feed_forward_proj="gated-gelu",
                                 is_encoder_decoder=False, use_cache=False))
    model = FluxModel(tr, vae, clip, t5, clip_tok, t5_tok, source=f"tiny-flux-{variant}", options=options,
                      kontext=variant == "kontext")
    model.freeze()
    return model
