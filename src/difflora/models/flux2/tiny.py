"""Tiny FLUX.2 models built offline (tests, CPU benchmarks): the real block counts, module names and text
taps of each size (dev 8 + 48 blocks, klein-4B 5 + 20, klein-9B 8 + 24) at narrow widths, with diffusers'
and transformers' own classes. `write_tiny` writes the diffusers folder and the single files users have.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .model import Flux2Model, Flux2Options, patchify
from .variants import LATENT_CHANNELS, SIZES

WIDTH = 32  # 2 heads of 16
HEAD_DIM = 16
TEXT_WIDTH = 16
_WORDS = ("a face, red hair, blue background, eyes open, smiling, glasses, closed eyes, brown hair, green "
          "background, black hair, yellow, white, frowning, no glasses, portrait")
_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
# Qwen3's chat template for what the klein pipeline sends: user turns, a generation prompt, no thinking
QWEN3_TEMPLATE = (
    "{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}")
# Mistral Small 3.1's layout for the dev pipeline's messages: [SYSTEM_PROMPT]...[/SYSTEM_PROMPT][INST]...[/INST]
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{%- for message in messages %}{%- set text = message['content'][0]['text'] %}"
    "{%- if message['role'] == 'system' %}{{ '[SYSTEM_PROMPT]' + text + '[/SYSTEM_PROMPT]' }}"
    "{%- elif message['role'] == 'user' %}{{ '[INST]' + text + '[/INST]' }}{%- endif %}{%- endfor %}")


def tiny_qwen3_tokenizer():
    """A byte-level Qwen2 tokenizer (no merges) with Qwen3's special tokens and chat template."""
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token="<|endoftext|>", eos_token="<|im_end|>",
                         pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": _SPECIAL[1:]})
    tok.chat_template = QWEN3_TEMPLATE
    return tok


def tiny_mistral_tokenizer():
    """A byte-level tokenizer with Mistral's control tokens and a chat template for the dev pipeline's system +
    user messages (the real folder's processor wraps such a tokenizer; text prompts use only the tokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    special = ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[IMG]"]
    vocab = {t: i for i, t in enumerate(special)}
    for c in bytes_to_unicode().values():
        vocab[c] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<pad>")
    tok.add_special_tokens({"additional_special_tokens": special[4:]})
    tok.chat_template = MISTRAL_TEMPLATE
    return tok


def tiny_text_encoder(size_name: str, vocab: int):
    """Qwen3 (klein: 36 layers, tapped at 9/18/27) or Mistral 3 (dev: 40 layers, tapped at 10/20/30), 16 wide."""
    if SIZES[size_name].text_encoder == "qwen3":
        from transformers import Qwen3Config, Qwen3ForCausalLM

        return Qwen3ForCausalLM(Qwen3Config(vocab_size=vocab, hidden_size=TEXT_WIDTH, intermediate_size=32,
                                            num_hidden_layers=36, num_attention_heads=2, num_key_value_heads=1,
                                            head_dim=8, max_position_embeddings=1024, tie_word_embeddings=False))
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig

    text = MistralConfig(vocab_size=vocab, hidden_size=TEXT_WIDTH, intermediate_size=32, num_hidden_layers=40,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=1024)
    vision = PixtralVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 head_dim=8, image_size=32, patch_size=16)
    return Mistral3ForConditionalGeneration(Mistral3Config(text_config=text, vision_config=vision,
                                                           image_token_index=8, spatial_merge_size=2,
                                                           projector_hidden_act="gelu"))


def tiny_transformer_config(size_name: str) -> dict:
    s = SIZES[size_name]
    return dict(patch_size=1, in_channels=4 * LATENT_CHANNELS, out_channels=None, num_layers=s.double,
                num_single_layers=s.single, attention_head_dim=HEAD_DIM, num_attention_heads=WIDTH // HEAD_DIM,
                joint_attention_dim=3 * TEXT_WIDTH, timestep_guidance_channels=256, mlp_ratio=3.0,
                axes_dims_rope=[HEAD_DIM // 4] * 4, rope_theta=2000, eps=1e-6, guidance_embeds=s.guidance_embeds)


def tiny_vae():
    """AutoencoderKLFlux2 with 32 latent channels and the real 8x (4 blocks), 8 wide; BatchNorm statistics
    measured on random images (as BFL's are on real ones: normalised latents of about unit variance, away from
    (0, 1) so the normalisation is exercised); near-zero latent variance (an untrained VAE's sampling noise
    would swamp the tiny images)."""
    from diffusers import AutoencoderKLFlux2

    vae = AutoencoderKLFlux2(block_out_channels=(8, 8, 8, 8), layers_per_block=1, latent_channels=LATENT_CHANNELS,
                             norm_num_groups=4, sample_size=32)
    with torch.no_grad():
        c = LATENT_CHANNELS
        vae.quant_conv.weight[c:] = 0  # the log-variance half of the moments (after the encoder's quant conv)
        vae.quant_conv.bias[c:] = -30.0
        pixels = torch.rand(8, 3, 64, 64, generator=torch.Generator().manual_seed(7)) * 2 - 1
        z = patchify(vae.encode(pixels).latent_dist.mode())
        vae.bn.running_mean.copy_(z.mean(dim=(0, 2, 3)))
        vae.bn.running_var.copy_(z.var(dim=(0, 2, 3)))
    return vae


def build_tiny_flux2(size_name: str = "klein-4b", seed: int = 0, distilled: bool = False,
                     options: Flux2Options | None = None) -> Flux2Model:
    """A random tiny FLUX.2 of one size ("dev", "klein-4b", "klein-9b")."""
    from .files import build_transformer

    torch.manual_seed(seed)
    size = SIZES[size_name]
    tr = build_transformer(tiny_transformer_config(size_name))
    with torch.no_grad():  # diffusers' default init is small; give every layer a visible effect
        for p in tr.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    tok = tiny_qwen3_tokenizer() if size.text_encoder == "qwen3" else tiny_mistral_tokenizer()
    te = tiny_text_encoder(size_name, len(tok))
    options = options or Flux2Options(max_token_length=32)
    options.distilled = distilled
    model = Flux2Model(tr, tiny_vae(), te, tok, size, source=f"tiny-flux2-{size_name}", options=options)
    model.freeze()
    return model


def write_tiny(folder: str | Path, size_name: str = "klein-4b", seed: int = 0, distilled: bool = False) -> dict:
    """The tiny model as a diffusers folder, a BFL single file and the text_encoder / vae / tokenizer files."""
    from .files import save_component_files

    folder = Path(folder)
    model = build_tiny_flux2(size_name, seed, distilled)
    model.save(folder / "diffusers")
    model.save(folder / f"flux2-{size_name}.safetensors")
    files = save_component_files(model, folder / "components")
    return {"folder": folder / "diffusers", "single": folder / f"flux2-{size_name}.safetensors",
            **{k: v for k, v in files.items()}}
