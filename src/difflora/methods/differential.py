"""Differential merge as one command: overfit A on "before", B on "after", result = B - A.

By default A and B are both conditioned on the tags the pair's captions share, so each must
learn its images' side of the difference instead of leaning on a caption that names it
(`differential.captions = "own"` gives each image its own caption).

The subtraction is exact (ranks concatenated, so the file's delta is ΔW_B - ΔW_A), optionally
brought back to a chosen rank by SVD. kohya's merge_lora.py does not compute B - A (its ratios
act squared and it adds cross terms); see network/lowrank.py. With LoHa, LoKr or DoRA the
difference is no longer of the adapter's form: it is written as a LoRA, through the deltas' exact
SVD (at their numerical rank, or `rerank`).

Targets: the objective's own (ε, v, or for flow matching the velocity ε - x0), A on x0 = before, B on x0 = after.
"""

from __future__ import annotations

import functools
from typing import Literal

from pydantic import Field

from ..options import Strict
from ..network.lowrank import combine_exact, svd_rerank
from .base import DataSizes, Method, Stage
from .standard import denoising_loss


class DifferentialOptions(Strict):
    """`[differential]`: overfit LoRAs on "before" and on "after", result = B - A."""

    before_steps: int = Field(400, ge=1)
    after_steps: int = Field(400, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    rerank: int | None = Field(None, ge=1)  # SVD back to this rank; None keeps the exact (concatenated) rank
    save_parts: bool = False  # also save A and B
    captions: Literal["common", "own"] = "common"  # A and B on the pair's shared tags, or each on its own caption


class Differential(Method):
    name = "differential"
    purpose = ("Overfit A on 'before' and B on 'after'; the result is B - A exactly (kohya's differential merge "
               "without its maths errors).")
    options = DifferentialOptions
    needs_pairs = True
    defaults = {"network_dim": 8, "network_alpha": 8.0, "min_snr_gamma": 5.0}

    def caption_keys(self):
        return ("common",) if self.job.differential.captions == "common" else ("x", "after")

    def stages(self, data: DataSizes) -> list[Stage]:
        d = self.job.differential
        own = d.captions == "own"
        return [
            Stage("before", d.before_steps, self.spec(),
                  functools.partial(denoising_loss, image="x", caption="x" if own else "common"),
                  learning_rate=d.learning_rate, save_as="before" if d.save_parts else None),
            Stage("after", d.after_steps, self.spec(),
                  functools.partial(denoising_loss, image="after", caption="after" if own else "common"),
                  learning_rate=d.learning_rate, save_as="after" if d.save_parts else None),
        ]

    def finalize(self, results):
        a, b = results["before"].kohya_state_dict(), results["after"].kohya_state_dict()
        base = results["after"].base_weights()  # LoHa/LoKr/DoRA deltas need the layers
        rank = self.job.differential.rerank
        if rank:
            return svd_rerank([b, a], [1.0, -1.0], rank, conv_rank=rank, base=base)
        return combine_exact([b, a], [1.0, -1.0], base=base)
