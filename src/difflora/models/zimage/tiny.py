"""A tiny Z-Image built offline (tests, benchmarks): the real 30 layers + 2 noise refiners + 2 context refiners
and module names (diffusers' ZImageTransformer2DModel), 32 wide, 4 latent channels (every tiny family's);
a 3-layer Qwen3; a FLUX-style ae;
a byte-level BPE tokenizer trained on the toy captions with Qwen's chat tokens."""

from __future__ import annotations

from pathlib import Path

import torch

from ..flux.model import tiny_ae
from .model import ZImageModel
from .transformer import fuse_attention

TINY_TRANSFORMER = dict(dim=32, n_layers=30, n_refiner_layers=2, n_heads=2, n_kv_heads=2, cap_feat_dim=16,
                        in_channels=4, axes_dims=[4, 6, 6], axes_lens=[1024, 64, 64])
TINY_QWEN3 = dict(vocab_size=320, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=8, max_position_embeddings=1024, rms_norm_eps=1e-6,
                  rope_theta=1000000.0, tie_word_embeddings=True)
_TEXTS = ["a face, red hair, blue background, eyes open, smiling, glasses, closed eyes, brown hair, green background,"
          " black hair, yellow, white, frowning, no glasses, portrait, user, assistant, a photo of a cat"] * 4
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_qwen_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(_TEXTS, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = Qwen2Tokenizer(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None)
    tok.chat_template = CHAT_TEMPLATE  # what the diffusers pipeline applies
    return tok


def build_tiny_zimage(variant: str = "turbo", seed: int = 0) -> ZImageModel:
    from diffusers import ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(seed)
    tr = ZImageTransformer2DModel(**TINY_TRANSFORMER)
    with torch.no_grad():  # the release zero-initialises nothing that matters here; give every layer an effect
        for p in tr.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    fuse_attention(tr)
    vae = tiny_ae()
    te = Qwen3Model(Qwen3Config(**TINY_QWEN3))
    model = ZImageModel(tr, vae, te, tiny_qwen_tokenizer(), variant=variant, source=f"tiny-zimage-{variant}")
    model.freeze()
    return model


def write_tiny_zimage(folder: Path, variant: str = "turbo", seed: int = 0) -> dict[str, Path]:
    """The layouts users have: a diffusers folder, and ComfyUI's three files (transformer, qwen_3_4b, ae)."""
    from .files import save_component_files

    folder = Path(folder)
    model = build_tiny_zimage(variant, seed)
    model.save(folder / "diffusers")
    paths = {"folder": folder / "diffusers", "transformer": folder / "comfyui" / "z_image_tiny.safetensors"}
    paths.update(save_component_files(model, folder / "comfyui"))
    model.save(paths["transformer"])
    return paths
