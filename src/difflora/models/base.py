"""The interface every model family implements.

A family owns loading, prompt encoding, the noise objective and its LoRA target map. The
training loop and the methods only talk to this interface, so SDXL or FLUX can be added as
new modules without touching them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from ..network.lora import LoRATarget
from .objectives import Objective


@dataclass
class Conditioning:
    """What the denoiser needs besides the noisy latent: tensors batched along dim 0."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def __getitem__(self, index) -> "Conditioning":
        return Conditioning({k: v[index] for k, v in self.tensors.items()})

    def to(self, *args, **kwargs) -> "Conditioning":
        return Conditioning({k: v.to(*args, **kwargs) for k, v in self.tensors.items()})

    @staticmethod
    def cat(items: list["Conditioning"]) -> "Conditioning":
        """Batched along dim 0; tensors of unequal length along dim 1 (Qwen-Image's unpadded text and its mask)
        are right-padded with zeros to the longest."""
        keys = items[0].tensors.keys()
        return Conditioning({k: torch.cat(_pad_dim1([c.tensors[k] for c in items])) for k in keys})

    def repeat(self, n: int) -> "Conditioning":
        return Conditioning({k: v.repeat(n, *([1] * (v.dim() - 1))) for k, v in self.tensors.items()})

    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def merged(self, other: "Conditioning | None") -> "Conditioning":
        """These tensors plus `other`'s (tiled to this batch size when `other` is a divisor of it)."""
        if other is None or not other.tensors:
            return self
        n, m = len(self), len(other)
        if n % m:
            raise ValueError(f"cannot merge conditioning of {m} samples into a batch of {n}")
        extra = other.repeat(n // m) if n != m else other
        return Conditioning({**self.tensors, **extra.tensors})


def _pad_dim1(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    if len({t.shape[1:] for t in tensors}) <= 1 or any(t.dim() < 2 for t in tensors):
        return tensors
    n = max(t.shape[1] for t in tensors)
    return [torch.nn.functional.pad(t, [0, 0] * (t.dim() - 2) + [0, n - t.shape[1]]) for t in tensors]


@dataclass(frozen=True)
class SampleSize:
    """Where a training image came from, as kohya reports it for SDXL's micro-conditioning.

    All pairs are (height, width) / (top, left) in pixels: the image's size before resizing, the
    crop's top-left corner, and the bucket it was cut to.
    """

    original_hw: tuple[int, int]
    crop_top_left: tuple[int, int]
    target_hw: tuple[int, int]


class ModelFamily(ABC):
    """A loaded diffusion model of one family (SD1, SD2, later SDXL, FLUX)."""

    family: str  # "sd1", "sd2", ...
    objective: Objective
    source: str  # where it was loaded from
    denoiser: nn.Module  # the U-Net / transformer
    vae: nn.Module
    text_encoders: dict[str, nn.Module]  # component name -> module ("text_encoder", ...)
    # generation when neither the command nor the prompt names them (FLUX: Euler, no true CFG)
    default_sampler: str = "ddim"
    default_cfg: float = 7.5

    # ---- identity and metadata
    @property
    @abstractmethod
    def base_model_version(self) -> str:
        """kohya's ss_base_model_version (sd_v1, sd_v2, sd_v2_v, sdxl_base_v1-0, ...)."""

    @property
    @abstractmethod
    def modelspec_architecture(self) -> str:
        """SAI ModelSpec architecture for a LoRA of this model (stable-diffusion-v1/lora, ...)."""

    @property
    def resolution(self) -> int:
        return 512

    def lora_metadata(self) -> dict[str, str]:
        """Model-dependent metadata of a LoRA trained on this model."""
        return {}

    # ---- LoRA
    @abstractmethod
    def lora_targets(self, conv: bool = False) -> list[LoRATarget]:
        """Modules a LoRA can attach to, with kohya names. conv=True adds the ResNet/sampler convs."""

    # ---- conditioning and prediction
    @abstractmethod
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """Text conditioning (runs the text encoders, LoRA hooks included)."""

    @abstractmethod
    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The denoiser's output (epsilon, v or flow velocity, per `objective`)."""

    @abstractmethod
    def encode_images(self, pixels: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
        """Pixels in [-1, 1] (B,3,H,W) -> scaled latents."""

    @abstractmethod
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> pixels in [-1, 1]."""

    @property
    def latent_downscale(self) -> int:
        """Pixels per latent cell (the VAE's down factor)."""
        return 8

    @property
    @abstractmethod
    def latent_multiple(self) -> int:
        """Image sides must be multiples of this: pixels per latent cell × the denoiser's own down factor."""

    @abstractmethod
    def pipeline_embeddings(self, cond: Conditioning, uncond: Conditioning) -> dict[str, torch.Tensor]:
        """Keyword arguments that hand encoded prompts (and negative prompts) to `pipeline()`'s __call__."""

    def sample_conditioning(self, sizes: list["SampleSize"]) -> Conditioning | None:
        """Per-sample conditioning from image geometry (SDXL's time_ids); None for families without it."""
        return None

    # ---- edit models: control ("before") images the output is conditioned on (the edit methods, generate --control)
    # How many control images one sample may carry; 0: the model cannot take a control image (not an edit model).
    max_control_images: int = 0
    # Whether the control images also reach the text encoder with the instruction (Qwen-Image-Edit's Qwen2.5-VL);
    # False: the instruction is encoded alone, as encode_prompts does (cached like any prompt).
    controls_reach_text_encoder: bool = False

    def encode_prompts_with_controls(self, prompts: list[str], controls: list[list]) -> Conditioning:
        """Each prompt encoded with its control images (PIL, as the family's pipeline sees them); by default the
        controls do not reach the text encoder and this is encode_prompts."""
        return self.encode_prompts(prompts)

    def control_conditioning(self, controls: list[torch.Tensor]) -> Conditioning:
        """Clean control latents (each (B, C, h, w), from encode_images) as conditioning tensors that `predict`
        packs the way the family's edit pipeline does (reference tokens after the target's, with offset position
        ids); the prediction stays the target's alone, so a loss covers the target tokens only."""
        from ..errors import UserError

        raise UserError(f"this {self.family} model ({self.modelspec_architecture}) cannot take a control image: the "
                        "edit methods and generate --control need an edit model (Qwen-Image-Edit, FLUX.1 Kontext, "
                        "FLUX.2)", path=getattr(self, "source", None) or None)

    def control_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) a control image of this size is resized to before encoding, as the family's edit
        pipeline does; by default unchanged."""
        return width, height

    def resize_control(self, image):
        """A control image (PIL) as the family's edit pipeline resizes it before encoding: by default straight to
        control_size with Lanczos (diffusers' VaeImageProcessor.resize, which Kontext and Qwen-Image-Edit use)."""
        from PIL import Image

        size = self.control_size(*image.size)
        return image if image.size == size else image.resize(size, Image.LANCZOS)

    def encode_with_controls(self, prompts: list[str], controls: list[list] | None) -> Conditioning:
        """Generation's conditioning (generate --control): the prompts, each with its control images (PIL, already at
        control_size) through the text encoder where the family does that, and their clean latents (the VAE's mode)
        packed by control_conditioning. Without controls: encode_prompts."""
        if not controls:
            return self.encode_prompts(prompts)
        import numpy as np

        text = self.encode_prompts_with_controls(prompts, controls) if self.controls_reach_text_encoder \
            else self.encode_prompts(prompts)
        latents = []
        for j in range(len(controls[0])):
            pixels = torch.stack([torch.from_numpy(np.asarray(c[j], dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
                                  for c in controls])
            latents.append(self.encode_images(pixels.to(self.device), sample=False))
        return text.merged(self.control_conditioning(latents))

    # ---- generation and saving
    @abstractmethod
    def pipeline(self, scheduler: str = "ddim") -> Any:
        """A diffusers pipeline over these components (LoRA hooks stay active)."""

    @abstractmethod
    def save(self, path: str, single_file: bool | None = None, dtype: torch.dtype | None = None) -> None:
        """Save the model (diffusers folder, or original-layout single file)."""

    def check_complete(self) -> None:
        """Raise a UserError when a component that training and generation need was not loaded."""

    # ---- training hooks (defaults: nothing family-specific)
    def use_plain_attention(self) -> None:
        """sdpa = false: the denoiser's attention without scaled_dot_product_attention (diffusers' AttnProcessor);
        a family whose denoiser has only one attention keeps it."""

    def prepare_training(self, job, device) -> None:
        """Family-specific training settings (FLUX: block swap, offloaded checkpointing), before the denoiser
        moves to `device`: `to` then leaves on the CPU what the family keeps there (FLUX's swapped blocks)."""

    # cache_text_encoder_outputs: True for a family whose text encoders are too big to keep once the run's
    # prompts are encoded (FLUX's T5-XXL, 9.5 GB); the others move theirs off the GPU.
    drops_cached_text_encoders = False
    text_encoders_dropped = False  # set by drop_text_encoders

    def drop_text_encoders(self, cached: dict[str, Conditioning]) -> list[str]:
        """Free the text encoders; `cached` (every prompt the run will encode) answers encode_prompts from now
        on. Returns the LoRA components that are gone."""
        raise NotImplementedError(f"{self.family} keeps its text encoders (drops_cached_text_encoders is False)")

    def sample_timesteps(self, n: int, generator: torch.Generator | None, latent_hw: tuple[int, int],
                         window: tuple[int, int]) -> torch.Tensor:
        """Training timesteps for `n` samples: integers drawn uniformly from the job's [min_timestep, max_timestep)
        `window`; a family with its own sampling (FLUX: timestep_sampling, on the latent size) overrides it."""
        return torch.randint(window[0], window[1], (n,), generator=generator)

    def check_sampler(self, name: str) -> None:
        """Raise a UserError when this family cannot sample with `name` (validate.sampler checked the name)."""

    def generate_request(self, networks, req, batch_size: int = 64, output: str = "uint8",
                         progress=None) -> list | None:
        """Images for a `generate.GenerationRequest` from the family's own sampler (FLUX: flow-matching Euler),
        or None: `generate()` then runs the diffusers pipeline (`pipeline`, `pipeline_embeddings`)."""
        return None

    def adapt_lora_file(self, lora):
        """Check a LoRA file (network/files.LoraFile) belongs to this family and bring it to kohya names. By
        default: refused when its ss_base_model_version names another family than this model's."""
        from ..errors import UserError
        from .registry import family_of_version

        version = lora.metadata.get("ss_base_model_version")
        lora_family, model_family = family_of_version(version or ""), family_of_version(self.base_model_version)
        if lora_family and model_family and lora_family != model_family:
            raise UserError(f"LoRA was trained for {version} (ss_base_model_version) but the model is "
                            f"{self.base_model_version}", path=lora.path)
        return lora

    def check_save_format(self, save_format: str, adapter) -> None:
        """Before training: refuse a save_format (with the job's AdapterOptions `adapter`) whose target loader could
        not apply the file whole, with one line saying why. By default: what `export_lora` refuses, tried on one
        module of the job's adapter, so a layout that holds plain LoRA only is refused before training, not at the
        first save."""
        from ..network.lora import LoRANetwork, NetworkSpec

        sample = next(([t] for t in self.lora_targets() if not t.is_conv_kxk), [])
        tensors = LoRANetwork.create(sample, NetworkSpec(network_dim=1, adapter=adapter)).state_dict() if sample else {}
        self.export_lora(tensors, save_format)

    def export_lora(self, tensors: dict[str, torch.Tensor], save_format: str = "kohya") -> dict[str, torch.Tensor]:
        """A kohya state dict in the layout the job asked for (save_format)."""
        if save_format != "kohya":
            from ..errors import UserError

            raise UserError(f"save_format = {save_format!r} is not available for {self.family} models (kohya is)")
        return tensors

    def freeze(self) -> None:
        """The whole base model frozen, in eval mode (a component a family loaded without, None, is skipped)."""
        for m in [self.denoiser, self.vae, *self.text_encoders.values()]:
            if m is not None:
                m.requires_grad_(False)
                m.eval()

    def to(self, device=None, dtype=None, text_encoders: bool = True) -> "ModelFamily":
        """Move (and cast) the denoiser, the VAE and, unless `text_encoders` is False, the text encoders."""
        for m in [self.denoiser, self.vae, *(self.text_encoders.values() if text_encoders else ())]:
            m.to(device=device, dtype=dtype)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device
