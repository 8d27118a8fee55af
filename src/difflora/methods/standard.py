"""Standard LoRA training: predict the noise (or v / flow target) of a noised training image.

Targets: epsilon ε; v-prediction √ᾱ·ε - √(1-ᾱ)·x0; flow matching (FLUX) the velocity ε - x0, compared with
the model output after kohya's model_prediction_type (raw v, v + x_t, or x_t - σ·v) at kohya's sampled σ.
"""

from __future__ import annotations

import torch

from .base import Batch, DataSizes, Method, Stage, StepContext, pair_captions, per_sample_mse


def denoising_loss(ctx: StepContext, batch: Batch, image: str = "x", caption: str = "x") -> torch.Tensor:
    """`caption`: "x", "after", or "common" (the tags a pair's captions share)."""
    x0, noise, t = batch.latents[image], batch.noise, batch.timesteps
    objective = ctx.model.objective
    noisy = objective.add_noise(x0, noise, t)
    pred = ctx.predict(noisy, t, ctx.encode(pair_captions(batch, caption)), multiplier=1.0)
    loss = per_sample_mse(objective.prediction(pred, noisy, t), objective.target(x0, noise, t))
    return loss * batch.loss_weight * ctx.timestep_weight(t)


class Standard(Method):
    name = "standard"
    purpose = "Plain LoRA training (kohya train_network.py): character or style LoRAs, or a baseline."

    def stages(self, data: DataSizes) -> list[Stage]:
        return [Stage("main", self.main_steps(data), self.spec(), denoising_loss, init_from_job_weights=True)]
