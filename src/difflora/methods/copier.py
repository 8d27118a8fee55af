"""The copier ("copy machine") method, in one command.

Stage 1 overfits LoRA A on the "before" images, so the model with A copies them whatever the
noise. Stage 2 trains LoRA B on the "after" images with A active at multiplier 1: B can only
learn what A's copies lack, i.e. the difference. B is the result; A is saved on request.
Both stages are conditioned on the "before" caption, as TrainTrain's Difference mode does, so B
learns the image difference and not a caption difference.

Targets: the objective's own (ε, v, or for flow matching the velocity ε - x0): stage 1 on x0 = before,
stage 2 on x0 = after with A on.
"""

from __future__ import annotations

import functools

from pydantic import Field

from ..options import Strict
from .base import DataSizes, Method, Stage
from .standard import denoising_loss


class CopierOptions(Strict):
    """`[copier]`: stage 1 overfits A on "before", stage 2 trains B on "after" with A on."""

    stage1_steps: int = Field(400, ge=1)
    stage1_learning_rate: float = Field(1e-3, gt=0)
    stage1_network_dim: int = Field(16, ge=1)
    stage1_network_alpha: float = 16.0
    stage2_steps: int = Field(400, ge=1)
    stage2_learning_rate: float = Field(1e-3, gt=0)
    stage2_network_dim: int | None = Field(None, ge=1)  # None: network_dim
    stage2_network_alpha: float | None = None
    save_copier: bool = False


class Copier(Method):
    name = "copier"
    purpose = "The copy-machine workflow: stage 1 overfits A on 'before', stage 2 trains B on 'after' with A on."
    options = CopierOptions
    needs_pairs = True
    defaults = {"network_dim": 4, "network_alpha": 4.0, "min_snr_gamma": 5.0}

    def stages(self, data: DataSizes) -> list[Stage]:
        c = self.job.copier
        copier = Stage("copier", c.stage1_steps, self.spec(c.stage1_network_dim, c.stage1_network_alpha),
                       functools.partial(denoising_loss, image="x", caption="x"), learning_rate=c.stage1_learning_rate,
                       save_as="copier" if c.save_copier else None)
        diff = Stage("difference", c.stage2_steps,
                     self.spec(c.stage2_network_dim, c.stage2_network_alpha),
                     functools.partial(denoising_loss, image="after", caption="x"),
                     learning_rate=c.stage2_learning_rate, keep_active=["copier"], init_from_job_weights=True)
        return [copier, diff]
