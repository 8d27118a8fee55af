"""Noise objectives: how to noise a latent, what the model should predict, and SNR weights.

Timesteps are integers in [0, num_train_timesteps). Epsilon and v use a DDPM beta
schedule (SD's scaled_linear by default); flow matching (FLUX, SD3) uses
x_t = (1 - σ) x + σ ε with σ = t / T and the velocity ε - x as target.
"""

from __future__ import annotations

import torch


class Objective:
    prediction_type: str = ""
    num_train_timesteps: int = 1000

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def prediction(self, model_output: torch.Tensor, noisy: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The model output as a ground-truth loss compares it with `target` (FLUX: model_prediction_type)."""
        return model_output

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor | float:
        """The family's own per-sample loss weight at timesteps t (flow matching: weighting_scheme); 1.0 here."""
        return 1.0

    def min_snr_weight(self, t: torch.Tensor, gamma: float) -> torch.Tensor:
        """Min-SNR-γ loss weight (Hang et al.), per sample."""
        snr = self.snr(t)
        return torch.clamp(snr, max=gamma) / snr


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.to(like.device, like.dtype).view(-1, *([1] * (like.dim() - 1)))


class DDPMObjective(Objective):
    def __init__(self, betas: torch.Tensor):
        self.betas = betas.double()
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0).float()
        self.num_train_timesteps = len(betas)

    @classmethod
    def from_scheduler_config(cls, config: dict) -> "DDPMObjective":
        n = int(config.get("num_train_timesteps", 1000))
        b0, b1 = float(config.get("beta_start", 0.00085)), float(config.get("beta_end", 0.012))
        schedule = config.get("beta_schedule", "scaled_linear")
        if schedule == "scaled_linear":
            betas = torch.linspace(b0**0.5, b1**0.5, n, dtype=torch.float32) ** 2
        elif schedule == "linear":
            betas = torch.linspace(b0, b1, n, dtype=torch.float32)
        else:
            raise ValueError(f"unsupported beta_schedule {schedule!r}")
        if config.get("rescale_betas_zero_snr"):
            betas = zero_terminal_snr_betas(betas)
        return cls(betas)

    def _ab(self, t: torch.Tensor) -> torch.Tensor:
        return self.alphas_cumprod[t.long().cpu()]

    def add_noise(self, x0, noise, t):
        ab = self._ab(t)
        return _bcast(ab.sqrt(), x0) * x0 + _bcast((1 - ab).sqrt(), x0) * noise

    def snr(self, t):
        ab = self._ab(t)
        return ab / (1 - ab)


def zero_terminal_snr_betas(betas: torch.Tensor) -> torch.Tensor:
    """Rescale betas so the last timestep has zero SNR (Lin et al. 2023), as kohya's --zero_terminal_snr.

    sqrt(ᾱ) is shifted to end at 0 and rescaled to keep its first value; betas are recovered from it.
    """
    ab_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = ab_sqrt[0].clone(), ab_sqrt[-1].clone()
    ab_sqrt = (ab_sqrt - last) * (first / (first - last))
    ab = ab_sqrt**2
    alphas = torch.cat([ab[0:1], ab[1:] / ab[:-1]])
    return 1.0 - alphas


class EpsilonObjective(DDPMObjective):
    prediction_type = "epsilon"

    def target(self, x0, noise, t):
        return noise


class VPredictionObjective(DDPMObjective):
    prediction_type = "v_prediction"

    def target(self, x0, noise, t):
        ab = self._ab(t)
        return _bcast(ab.sqrt(), x0) * noise - _bcast((1 - ab).sqrt(), x0) * x0

    def min_snr_weight(self, t, gamma):
        snr = self.snr(t)
        return torch.clamp(snr, max=gamma) / (snr + 1)


class FlowMatchingObjective(Objective):
    """Rectified flow: x_t = (1-σ)x + σε, target ε - x, σ = t/T."""

    prediction_type = "flow"

    def __init__(self, num_train_timesteps: int = 1000):
        self.num_train_timesteps = num_train_timesteps

    def _sigma(self, t):
        return t.float() / self.num_train_timesteps

    def add_noise(self, x0, noise, t):
        s = _bcast(self._sigma(t), x0)
        return (1 - s) * x0 + s * noise

    def target(self, x0, noise, t):
        return noise - x0

    def snr(self, t):
        s = self._sigma(t).clamp(1e-4, 1 - 1e-4)
        return ((1 - s) / s) ** 2


def objective_for(prediction_type: str, scheduler_config: dict) -> Objective:
    if prediction_type == "epsilon":
        return EpsilonObjective.from_scheduler_config(scheduler_config)
    if prediction_type in ("v_prediction", "v"):
        return VPredictionObjective.from_scheduler_config(scheduler_config)
    if prediction_type == "flow":
        return FlowMatchingObjective(int(scheduler_config.get("num_train_timesteps", 1000)))
    raise ValueError(f"unknown prediction type {prediction_type!r}")
