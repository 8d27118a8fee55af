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


@dataclass
class FlowMatchOptions:
    timestep_sampling: str = "sigma"
    sigmoid_scale: float = 1.0
    discrete_flow_shift: float = 3.0
    model_prediction_type: str = "sigma_scaled"

    def check(self) -> "FlowMatchOptions":
        if self.timestep_sampling not in TIMESTEP_SAMPLING:
            raise UserError(f"timestep_sampling must be one of {', '.join(TIMESTEP_SAMPLING)}, "
                            f"got {self.timestep_sampling!r}")
        if self.model_prediction_type not in MODEL_PREDICTION_TYPES:
            raise UserError(f"model_prediction_type must be one of {', '.join(MODEL_PREDICTION_TYPES)}, "
                            f"got {self.model_prediction_type!r}")
        if self.discrete_flow_shift <= 0:
            raise UserError(f"discrete_flow_shift must be > 0, got {self.discrete_flow_shift}")
        return self


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
            idx = (torch.rand(n, generator=generator) * self.num_train_timesteps).long()
            return self.scheduler_sigmas()[idx]
        if mode == "uniform":
            return torch.rand(n, generator=generator)
        sig = torch.sigmoid(o.sigmoid_scale * torch.randn(n, generator=generator))
        if mode == "shift":
            return shift_sigma(sig, o.discrete_flow_shift)
        if mode == "flux_shift":
            h, w = latent_hw
            return flux_time_shift(sig, flux_time_shift_mu((h // 2) * (w // 2)))
        return sig  # sigmoid

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


def squeeze_to_window(t: torch.Tensor, window: tuple[int, int], scale: int = 1000) -> torch.Tensor:
    """Timesteps drawn over [0, scale] mapped linearly into the job's [min_timestep, max_timestep] (musubi-tuner's
    rule for flow models); the full window leaves them untouched."""
    low, high = window
    return t if (low, high) == (0, scale) else low + t * ((high - low) / scale)
