"""FLUX.2's variants: dev (32B, Mistral Small 3.1 text encoder, guidance-distilled) and klein 4B / 9B (Qwen3
text encoders), each klein size as a step-distilled and a base model with identical weights' names.

The sizes are BFL's published configs (diffusers `Flux2Transformer2DModel`, musubi's Flux2Params /
Klein4BParams / Klein9BParams agree). Distilled and base klein cannot be told apart from the weights:
a diffusers folder says it (`is_distilled` in model_index.json), a single file needs `model_version`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Size:
    """One transformer size: what tells it apart in a file, and its text encoder."""

    name: str  # "dev", "klein-4b", "klein-9b"
    double: int
    single: int
    hidden: int
    text_encoder: str  # "mistral3" or "qwen3"
    text_layers: tuple[int, ...]  # hidden states stacked into the transformer's text input
    text_hidden: int  # the encoder's width (txt_in takes 3x this)
    guidance_embeds: bool
    architecture: str  # musubi's modelspec.architecture

    @property
    def context_dim(self) -> int:
        return len(self.text_layers) * self.text_hidden


SIZES = {s.name: s for s in (
    Size("dev", 8, 48, 6144, "mistral3", (10, 20, 30), 5120, True, "Flux.2-dev"),
    Size("klein-4b", 5, 20, 3072, "qwen3", (9, 18, 27), 2560, False, "Flux.2-klein-4b"),
    Size("klein-9b", 8, 24, 4096, "qwen3", (9, 18, 27), 4096, False, "Flux.2-klein-9b"),
)}

# musubi's --model_version values: the size, and for klein whether it is the step-distilled model
MODEL_VERSIONS = {"dev": ("dev", False), "klein-4b": ("klein-4b", True), "klein-base-4b": ("klein-4b", False),
                  "klein-9b": ("klein-9b", True), "klein-base-9b": ("klein-9b", False)}

HEAD_DIM = 128
LATENT_CHANNELS = 32  # the VAE's; the transformer sees 2x2 patches of them: 128 channels
MAX_TOKENS = 512  # the pipelines' text length

# Sampling defaults of BFL / musubi's FLUX2_MODEL_INFO: (steps, guidance)
SAMPLING = {"dev": (50, 4.0), "distilled": (4, 1.0), "base": (50, 4.0)}


def size_of(double: int, single: int, hidden: int) -> Size | None:
    """The published size with these block counts and width, else None (a fine-tune keeps them)."""
    for s in SIZES.values():
        if (s.double, s.single, s.hidden) == (double, single, hidden):
            return s
    return None


def size_from_counts(double: int, single: int, context_dim: int, guidance: bool) -> Size:
    """The size whose layout a (possibly narrow, test-sized) transformer follows: block counts and guidance."""
    for s in SIZES.values():
        if (s.double, s.single, s.guidance_embeds) == (double, single, guidance):
            return s
    return SIZES["dev"] if guidance else SIZES["klein-4b"]


def version_name(size: Size, distilled: bool) -> str:
    if size.name == "dev":
        return "dev"
    return size.name if distilled else size.name.replace("klein-", "klein-base-")
