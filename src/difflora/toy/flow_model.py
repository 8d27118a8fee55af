"""The flow world's base model: a narrow, shallow Z-Image for the procedural faces, which can also edit.

Components (the classes a Z-Image diffusers folder holds, so the zimage family loads it like any other):
- a Qwen2 byte-level BPE tokenizer whose vocabulary is the caption and instruction words plus the byte
  alphabet and Qwen's chat tokens, built deterministically (no trainer, no hub), with Qwen3's chat template;
- a Qwen3Model text encoder (3 layers, width 64; Z-Image reads the second-to-last hidden state, so the last
  layer is unused, as in the release), trained jointly with the transformer;
- the SD world's toy AutoencoderKL (64x64x3 <-> 16x16x4), reused frozen; shift_factor 0, its scaling factor;
- ZImageTransformer2DModel with the release's module names (layers.N, noise_refiner.N, context_refiner.N),
  patch 2 -> 64 image tokens, flow matching in Z-Image's convention (models/zimage/model.py).

Edit (Z-Image Omni's layout without SigLIP): the transformer is called with nested lists, x = [[reference,
target]] and image_noise_mask = [[0, 1]]; the reference latents are extra clean tokens (timestep embedding of
a clean image) with their own position ids, and the output is the target's alone. The captions are the Omni
pipeline's three segments around the two images.
"""

from __future__ import annotations

import torch

from . import faces

# Changes named by (attribute, after value) that edit training never shows: an edit LoRA can teach them.
# Every change TO these values is held out (any before value), so the instruction is never seen in an edit;
# the opposite direction stays in training (the model edits that attribute, just not towards this value).
HELD_OUT_EDITS: tuple[tuple[str, str], ...] = (("eyes", "open"), ("glasses", "glasses"), ("hair", "black"),
                                               ("skin", "dark"))
INSTRUCTION = "change to {}"
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>")
# Qwen3's chat template as diffusers' ZImagePipeline applies it (models/zimage/model.py PROMPT_TEMPLATE).
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEXT_WIDTH = 64
QWEN3_CONFIG = dict(hidden_size=TEXT_WIDTH, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, rms_norm_eps=1e-6,
                    rope_theta=1000000.0, tie_word_embeddings=True, hidden_act="silu")


def transformer_config(dim: int = 96, n_layers: int = 4, n_refiner_layers: int = 1, n_heads: int = 4) -> dict:
    head = dim // n_heads
    third = (head // 3) // 2 * 2  # rope axes (frame/caption position, row, column): even widths summing to head
    axes = [head - 2 * third, third, third]
    return dict(dim=dim, n_layers=n_layers, n_refiner_layers=n_refiner_layers, n_heads=n_heads, n_kv_heads=n_heads,
                cap_feat_dim=TEXT_WIDTH, in_channels=4, axes_dims=axes, axes_lens=[512, 32, 32], siglip_feat_dim=None)


def instruction(attribute: str, value: str) -> str:
    return INSTRUCTION.format(faces.phrase(attribute, value))


def prompt_words() -> list[str]:
    words = {"a", "face", ",", "user", "assistant"} | set(INSTRUCTION.format("").split())
    for attribute, values in faces.ATTRIBUTES.items():
        for value in values:
            words.update(faces.phrase(attribute, value).split())
    return sorted(words)


def build_tokenizer():
    """A Qwen2 byte-level BPE tokenizer in which each prompt word (with or without its leading space) is one
    token; anything else still tokenizes byte by byte."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import Qwen2Tokenizer

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    vocab: dict[str, int] = {}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    merges: list[tuple[str, str]] = []
    pieces = sorted({p for w in prompt_words() for p in ((w, "Ġ" + w) if w.isalpha() else (w,))},
                    key=lambda w: (-len(w), w))

    def chain(parts: list[str]) -> None:
        left = parts[0]
        for right in parts[1:]:
            if (left, right) not in merges:
                merges.append((left, right))
            left = left + right
            vocab.setdefault(left, len(vocab))

    for word in pieces:
        if len(word) > 1:
            chain(list(word))

    def build():
        bpe = Tokenizer(models.BPE(vocab=dict(vocab), merges=list(merges)))
        bpe.pre_tokenizer = byte_level
        bpe.decoder = decoders.ByteLevel()
        return bpe

    # A higher-ranked merge of a longer word can split a shorter one ("assistant"'s "ass" inside "glasses"):
    # merge each such word's leftover pieces at the end of the list, until every word is one token.
    for _ in range(10):
        bpe = build()
        split = [(w, bpe.encode(w.replace("Ġ", " ")).tokens) for w in pieces]
        split = [(w, t) for w, t in split if len(t) > 1]
        if not split:
            break
        for _, parts in split:
            chain(parts)
    else:
        raise RuntimeError(f"prompt words that stay split: {[w for w, _ in split]}")
    for tok in SPECIAL_TOKENS:
        vocab[tok] = len(vocab)
    bpe = build()
    tok = Qwen2Tokenizer(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
                         additional_special_tokens=list(SPECIAL_TOKENS[1:]))
    tok.chat_template = CHAT_TEMPLATE
    tok.padding_side = "right"
    return tok


def build_text_encoder(tokenizer):
    from transformers import Qwen3Config, Qwen3Model

    return Qwen3Model(Qwen3Config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                  eos_token_id=tokenizer.eos_token_id, **QWEN3_CONFIG))


def build_transformer(config: dict):
    from diffusers import ZImageTransformer2DModel

    return ZImageTransformer2DModel(**config)


def encode_segments(tokenizer, text_encoder, texts: list[str]) -> list[torch.Tensor]:
    """Each text's Qwen3 second-to-last hidden state over its own tokens (what ZImageModel.encode_prompts
    hands the transformer; the encoder is causal and padding is on the right, so padding to the batch's
    longest text instead of 512 gives the same rows)."""
    tok = tokenizer(texts, padding="longest", return_tensors="pt")
    device = next(text_encoder.parameters()).device
    mask = tok.attention_mask.to(device).bool()
    hidden = text_encoder(input_ids=tok.input_ids.to(device), attention_mask=mask,
                          output_hidden_states=True).hidden_states[-2]
    return [h[m] for h, m in zip(hidden, mask)]


def t2i_text(prompt: str) -> str:
    return f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"


def edit_texts(prompt: str) -> list[str]:
    """Z-Image Omni's caption segments for one reference image: before it, between it and the target, after."""
    return ["<|im_start|>user\n<|vision_start|>",
            f"<|vision_end|>{prompt}<|im_end|>\n<|im_start|>assistant\n<|vision_start|>",
            "<|vision_end|><|im_end|>"]


def edit_forward(transformer, reference: torch.Tensor, noisy: torch.Tensor, model_t: torch.Tensor,
                 segments: list[list[torch.Tensor]]) -> torch.Tensor:
    """The transformer's raw output (x0 − ε, Z-Image's clock) for the target latents (B, C, h, w) given clean
    reference latents of the same shape and each sample's three caption segments."""
    x = [[r.unsqueeze(1), n.unsqueeze(1)] for r, n in zip(reference, noisy)]
    out = transformer(x, model_t, segments, siglip_feats=[None] * len(x), image_noise_mask=[[0, 1]] * len(x),
                      return_dict=False)[0]
    return torch.stack(out).squeeze(2)


def t2i_forward(transformer, noisy: torch.Tensor, model_t: torch.Tensor, caps: list[torch.Tensor]) -> torch.Tensor:
    out = transformer(list(noisy.unsqueeze(2).unbind(0)), model_t, caps, return_dict=False)[0]
    return torch.stack(out).squeeze(2)


@torch.no_grad()
def sample_edit(model, reference: torch.Tensor, prompts: list[str], seeds: list[int], steps: int = 20,
                guidance: float = 4.0) -> torch.Tensor:
    """Edited latents from clean reference latents (B, C, h, w) with a ZImageModel's transformer, text encoder
    and sampling schedule: Euler over the pipeline's shifted sigmas, CFG against the empty instruction with the
    same reference (as the Omni pipeline does)."""
    tr, te, tok = model.transformer, model.text_encoders["text_encoder"], model.tokenizer
    n = model.objective.num_train_timesteps
    texts = [s for p in prompts + [""] * len(prompts) for s in edit_texts(p)]
    flat = encode_segments(tok, te, texts)
    segments = [flat[3 * k:3 * k + 3] for k in range(2 * len(prompts))]
    x = torch.stack([torch.randn(reference.shape[1:], generator=torch.Generator().manual_seed(int(s)))
                     for s in seeds]).to(reference.device)
    sig = model.sampling_sigmas(steps)
    for cur, nxt in zip(sig[:-1], sig[1:]):
        t = (1 - cur).expand(2 * len(prompts)).to(x.device)
        raw = edit_forward(tr, reference.repeat(2, 1, 1, 1), x.repeat(2, 1, 1, 1), t, segments)
        v = -raw  # the velocity ε − x0
        cond, uncond = v.chunk(2)
        x = x + (nxt - cur).to(x.device) * (cond + guidance * (cond - uncond))
    return x
