"""Flow-matching training options of kohya's FLUX trainer (flux_train_utils), with its names and defaults.

Timesteps are t = σ·1000 as floats (kohya passes σ·1000 to the model, which divides by 1000).
x_t = (1-σ)·x0 + σ·ε, the model predicts the velocity ε - x0.

timestep_sampling:
- "sigma" (kohya's default): σ drawn uniformly from the 1000 sigmas of diffusers'
  FlowMatchEulerDiscreteScheduler(shift=discrete_flow_shift): s = (1000 - i)/1000, σ = shift·s/(1 + (shift-1)·s);
- "uniform": σ ~ U(0, 1);
- "sigmoid": σ = sigmoid(sigmoid_scale·n), n ~ N(0, 1);
- "shift": σ = sigmoid(sigmoid_scale·n), then σ ← shift·σ / (1 + (shift-1)·σ);
- "flux_shift": σ = sigmoid(sigmoid_scale·n), then BFL's resolution-dependent shift
  exp(μ)/(exp(μ) + 1/σ - 1), μ linear in the packed token count (0.5 at 256, 1.15 at 4096).

weighting_scheme (musubi-tuner's, from diffusers' SD3 trainer): "sigma_sqrt" weights each sample's loss by σ⁻²,
"cosmap" by 2/(π(1 - 2σ + 2σ²)) (σ clamped to the scheduler's smallest, 1/1000, as musubi reads σ from the
scheduler's table); "logit_normal" (sigmoid of N(logit_mean, logit_std)) and "mode" (mode_scale) change the density
of the "sigma" sampling's index instead; "none" (the default) leaves both uniform.

model_prediction_type (applied to the model output before the loss of ground-truth methods):
"raw" (the velocity as is), "additive" (output + x_t), "sigma_scaled" (kohya's default:
-σ·output + x_t). The target stays ε - x0 in every case, as in kohya.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import UserError
from .objectives import FlowMatchingObjective

TIMESTEP_SAMPLING = ("sigma", "uniform", "sigmoid", "shift", "flux_shift")
MODEL_PREDICTION_TYPES = ("raw", "additive", "sigma_scaled")
WEIGHTING_SCHEMES = ("none", "logit_normal", "mode", "cosmap", "sigma_sqrt")
WEIGHTING_KEYS = ("weighting_scheme", "logit_mean", "logit_std", "mode_scale")  # job keys = FlowMatchOptions fields


@dataclass
class FlowMatchOptions:
    timestep_sampling: str = "sigma"
    sigmoid_scale: float = 1.0
    discrete_flow_shift: float = 3.0
    model_prediction_type: str = "sigma_scaled"
    weighting_scheme: str = "none"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29

    def check(self) -> "FlowMatchOptions":
        if self.timestep_sampling not in TIMESTEP_SAMPLING:
            raise UserError(f"timestep_sampling must be one of {', '.join(TIMESTEP_SAMPLING)}, "
                            f"got {self.timestep_sampling!r}")
        if self.model_prediction_type not in MODEL_PREDICTION_TYPES:
            raise UserError(f"model_prediction_type must be one of {', '.join(MODEL_PREDICTION_TYPES)}, "
                            f"got {self.model_prediction_type!r}")
        if self.weighting_scheme not in WEIGHTING_SCHEMES:
            raise UserError(f"weighting_scheme must be one of {', '.join(WEIGHTING_SCHEMES)}, "
                            f"got {self.weighting_scheme!r}")
        if self.discrete_flow_shift <= 0:
            raise UserError(f"discrete_flow_shift must be > 0, got {self.discrete_flow_shift}")
        return self


def weighting_of(options) -> dict:
    """The loss-weighting keys of a job's option table (models/shared_options.FlowMatchingKeys), for
    FlowMatchOptions(..., **weighting_of(table))."""
    return {k: getattr(options, k) for k in WEIGHTING_KEYS}


def shift_sigma(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * sigma / (1 + (shift - 1) * sigma)


def flux_time_shift_mu(image_tokens: int, base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """BFL's μ: linear in the packed image token count, 0.5 at 256 tokens and 1.15 at 4096."""
    slope = (max_shift - base_shift) / (4096 - 256)
    return base_shift + slope * (image_tokens - 256)


def flux_time_shift(sigma: torch.Tensor, mu: float) -> torch.Tensor:
    return math.exp(mu) / (math.exp(mu) + (1 / sigma - 1))


class FluxFlowObjective(FlowMatchingObjective):
    """Rectified flow with kohya's FLUX timestep sampling and prediction types."""

    def __init__(self, options: FlowMatchOptions | None = None, num_train_timesteps: int = 1000):
        super().__init__(num_train_timesteps)
        self.options = (options or FlowMatchOptions()).check()

    def scheduler_sigmas(self) -> torch.Tensor:
        """The 1000 shifted sigmas of FlowMatchEulerDiscreteScheduler(shift=discrete_flow_shift), high to low."""
        n = self.num_train_timesteps
        s = torch.arange(n, 0, -1, dtype=torch.float32) / n
        return shift_sigma(s, self.options.discrete_flow_shift)

    def sample_sigmas(self, n: int, generator: torch.Generator | None, latent_hw: tuple[int, int]) -> torch.Tensor:
        o = self.options
        mode = o.timestep_sampling
        if mode == "sigma":
            idx = (self._index_density(n, generator) * self.num_train_timesteps).long()
            return self.scheduler_sigmas()[idx.clamp(0, self.num_train_timesteps - 1)]
        if mode == "uniform":
            return torch.rand(n, generator=generator)
        sig = torch.sigmoid(o.sigmoid_scale * torch.randn(n, generator=generator))
        if mode == "shift":
            return shift_sigma(sig, o.discrete_flow_shift)
        if mode == "flux_shift":
            h, w = latent_hw
            return flux_time_shift(sig, flux_time_shift_mu((h // 2) * (w // 2)))
        return sig  # sigmoid

    def _index_density(self, n: int, generator: torch.Generator | None) -> torch.Tensor:
        """u in [0, 1) for the "sigma" sampling's index: weighting_scheme's density (musubi, SD3)."""
        o = self.options
        if o.weighting_scheme == "logit_normal":
            return torch.sigmoid(o.logit_mean + o.logit_std * torch.randn(n, generator=generator))
        u = torch.rand(n, generator=generator)
        if o.weighting_scheme == "mode":
            return 1 - u - o.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
        return u

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor | float:
        """weighting_scheme's per-sample loss weight (sigma_sqrt, cosmap); 1.0 for the others."""
        scheme = self.options.weighting_scheme
        if scheme not in ("sigma_sqrt", "cosmap"):
            return 1.0
        s = self.sigma(t).clamp(1 / self.num_train_timesteps, 1.0)
        if scheme == "sigma_sqrt":
            return s ** -2.0
        return 2 / (math.pi * (1 - 2 * s + 2 * s ** 2))

    def sample_timesteps(self, n: int, generator: torch.Generator | None = None,
                         latent_hw: tuple[int, int] = (128, 128)) -> torch.Tensor:
        """t = σ·1000 as float32 (not rounded: kohya keeps the continuous value)."""
        return self.sample_sigmas(n, generator, latent_hw) * self.num_train_timesteps

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return t.float() / self.num_train_timesteps

    def prediction(self, model_output: torch.Tensor, noisy: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The model output as the loss sees it (kohya's apply_model_prediction_type)."""
        kind = self.options.model_prediction_type
        if kind == "raw":
            return model_output
        if kind == "additive":
            return model_output + noisy
        s = self.sigma(t).to(model_output.device, model_output.dtype).view(-1, *([1] * (model_output.dim() - 1)))
        return model_output * (-s) + noisy


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2·w/2, 4C): 2x2 patches, channel-major inside a patch (BFL's, diffusers'
    FLUX.1 and Qwen-Image pipelines')."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    b, _, d = x.shape
    c = d // 4
    return x.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def squeeze_to_window(t: torch.Tensor, window: tuple[int, int], scale: int = 1000) -> torch.Tensor:
    """Timesteps drawn over [0, scale] mapped linearly into the job's [min_timestep, max_timestep] (musubi-tuner's
    rule for flow models); the full window leaves them untouched."""
    low, high = window
    return t if (low, high) == (0, scale) else low + t * ((high - low) / scale)
