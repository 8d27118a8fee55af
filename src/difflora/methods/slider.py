"""Image-pair slider (Concept Sliders' image slider).

Targets: each image's own objective target with the shared noise: ε (epsilon), v (v-prediction), or for
flow matching (FLUX) the velocities ε - after at +s and ε - before at -s (after model_prediction_type).

One noise draw for both images; the LoRA at +s denoises the "after" image and at -s the
"before" image, each regressed onto its true target. Both passes run as one batch with
per-sample multipliers. By default both images are conditioned on the tags their captions
share: with each image's own caption ("eyes closed" / "eyes open") the text already explains
the difference and the LoRA learns little of it (measured in the README).
"""

from __future__ import annotations

import torch
from pydantic import Field

from ..options import Strict
from .base import Batch, CaptionMode, DataSizes, Method, Stage, StepContext, branch_captions, pair_caption_keys, per_sample_mse


class SliderOptions(Strict):
    """`[slider]`: +s on "after", -s on "before", both onto the true noise."""

    scale: float = Field(1.0, gt=0)
    # "common": both images get the tags their captions share, so the LoRA, not the text, must carry
    # the difference (Concept Sliders gives both images one prompt); "own": each image its own caption.
    captions: CaptionMode = "common"


def slider_loss(ctx: StepContext, batch: Batch) -> torch.Tensor:
    s = ctx.job.slider.scale
    x_before, x_after, noise, t = batch.latents["x"], batch.latents["after"], batch.noise, batch.timesteps
    obj = ctx.model.objective
    n = len(batch)
    x0 = torch.cat([x_after, x_before])
    tt = torch.cat([t, t])
    noisy = obj.add_noise(x0, torch.cat([noise, noise]), tt)
    before, after = branch_captions(batch, ctx.job.slider.captions)
    cond = ctx.encode(after + before)
    multiplier = torch.tensor([s] * n + [-s] * n)
    pred = ctx.predict(noisy, tt, cond, multiplier)
    loss = per_sample_mse(obj.prediction(pred, noisy, tt), obj.target(x0, torch.cat([noise, noise]), tt))
    loss = loss * ctx.timestep_weight(tt)
    return loss[:n] + loss[n:]


class Slider(Method):
    name = "slider"
    trains_both_directions = True
    purpose = "Concept Sliders' image slider: +s on 'after', -s on 'before'. A symmetric slider from pairs."
    options = SliderOptions
    needs_pairs = True
    unet_only = True
    defaults = {"max_train_steps": 200, "learning_rate": 1e-3, "lr_scheduler": "cosine", "min_snr_gamma": 5.0,
                "network_dim": 4, "network_alpha": 4.0}

    def caption_keys(self):
        return pair_caption_keys(self.job.slider.captions)

    def stages(self, data: DataSizes) -> list[Stage]:
        return [Stage("main", self.main_steps(data), self.spec(), slider_loss, init_from_job_weights=True)]
