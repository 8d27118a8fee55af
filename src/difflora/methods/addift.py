"""ADDifT: Alternating Direct Difference Training (TrainTrain), with its evident intent.

Both images of a pair get the same noise ε and timestep t. Even steps: the LoRA at +m denoises
the noised "after" image and is regressed onto the frozen model's prediction for the noised
"before" image. Odd steps swap the images and use -m·|alt_ratio|. There is no ground-truth
noise: the target is the frozen model on the other image, so the LoRA learns "the base model
shifted by (after - before)" and nothing else about the images.

Strength at inference: the LoRA is trained at multiplier m, so loading it at weight w applies
w/m times the trained shift; `m` (default 0.25, as TrainTrain) is stored in the file's metadata
and a file saved with `network_strength` baked in is not needed: use weight = m·k for k× the
trained effect.

Fixes over TrainTrain (reference B1-B3): timesteps are stratified random (a fresh uniform draw
in group (step // 2) mod k of [min, max), so a +/- pair of steps shares a group); the pair's
own captions reach the model; the difference mask is the real pixel difference.

Targets, written out (q(x) = noised x with the shared ε and t; f = frozen model, f_m = with the LoRA at m):
- epsilon / v models: f_{+m}(q(after)) → f(q(before)) in the model's own output space;
- flow matching (FLUX): q(x) = (1-σ)x + σε with t = σ·1000, and the outputs are velocities:
  v_{+m}((1-σ)·after + σε) → v((1-σ)·before + σε), odd steps the other way at -m. The window
  [min_timestep, max_timestep) is σ·1000 (default: σ ∈ [0.5, 1), or [0.7, 1) for a global change);
  model_prediction_type does not apply (both sides are raw velocities of one model).

Window: `min_timestep = "auto"` (the default) starts it at 700 when the pairs differ over at least a
fifth of the latent cells (colour, texture), else at 500; chosen on the quality suite's tune subset.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
from pydantic import Field, field_validator, model_validator

from ..options import Strict
from .base import (Batch, CaptionMode, DataSizes, Method, Stage, StepContext, branch_captions, pair_caption_keys,
                   per_sample_mse)
from .edit import edit_conditioning, require_control

log = logging.getLogger(__name__)


class AddiftOptions(Strict):
    """`[addift]`. Defaults follow TrainTrain's Action preset (m 0.25, 500-1000 for a local change) but for
    the "auto" window (see the module docstring and README)."""

    multiplier: float = Field(0.25, gt=0)  # m: +m on even steps, -m·|alt_ratio| on odd steps
    alt_ratio: float = 1.0
    # "auto": 700 when the pairs differ over >= 20% of the latent cells (a global change: colour, texture),
    # else 500 (a local one: TrainTrain's window). Measured on the quality suite (README, "Measured comparison").
    min_timestep: int | Literal["auto"] = Field("auto")
    max_timestep: int = Field(1000, ge=1, le=1000)
    timestep_groups: int = Field(10, ge=1)  # stratified: one uniform draw from each of k groups in turn
    replicate_traintrain_timesteps: bool = False  # the shipped width-1 windows (bug B1), for comparison
    captions: CaptionMode = "common"  # "own": "before" caption to the frozen model, "after" to the LoRA
    diff_mask: bool = False  # weight the loss by where the pair differs
    diff_mask_threshold: float = Field(10.0, ge=0)  # sum of |RGB| difference (0-765) counted as changed
    diff_mask_dilate: int = Field(2, ge=0)  # pixels
    mask_floor: float = Field(0.0, ge=0, le=1)  # loss weight outside the mask
    revert_direction: bool = False  # learn after -> before instead
    # Keep the LoRA output equal to the base where the pair does not differ. Acts on nothing when the pair
    # differs everywhere (style); elsewhere the main loss already asks for almost no change there
    # (bench/selfreg_mask.py), so its measured effect is small (README, "Measured comparison").
    self_reg_weight: float = Field(0.0, ge=0)
    batch_both_directions: bool = False  # run +m and -m in one forward pass (per-sample multipliers)
    # edit models (methods/edit.py): both passes conditioned on the pair's "before" image as the control
    control: bool = False

    @field_validator("min_timestep", mode="before")
    @classmethod
    def _auto_or_int(cls, v):
        if isinstance(v, str) and v != "auto" and not v.strip().lstrip("-").isdigit():
            raise ValueError(f'addift.min_timestep must be a timestep (0-999) or "auto", got {v!r}')
        return v

    @model_validator(mode="after")
    def _range(self):
        if self.min_timestep == "auto":
            if self.max_timestep <= LOCAL_MIN_TIMESTEP:
                raise ValueError(f'addift.min_timestep = "auto" needs addift.max_timestep above {LOCAL_MIN_TIMESTEP}; '
                                 "set addift.min_timestep")
            return self
        if not 0 <= self.min_timestep <= 999:
            raise ValueError("addift.min_timestep must be between 0 and 999 (or \"auto\")")
        if self.min_timestep >= self.max_timestep:
            raise ValueError("addift.min_timestep must be smaller than addift.max_timestep")
        return self


# min_timestep = "auto": the window by how much of the image the pairs change (bench/results/selfreg_mask.md:
# eyes, mouth, glasses 5-13% of the latent cells; hair and skin 31-32%, background 86%, style 100%).
LOCAL_MIN_TIMESTEP, GLOBAL_MIN_TIMESTEP, GLOBAL_COVERAGE = 500, 700, 0.2


def window_start(opts: AddiftOptions, coverage: float | None) -> tuple[int, str]:
    """The window's first timestep and why: the option's value, or the "auto" choice from `coverage`
    (mean share of latent cells where a pair differs; None when unknown)."""
    if opts.min_timestep != "auto":
        return opts.min_timestep, "addift.min_timestep"
    if coverage is None:
        return LOCAL_MIN_TIMESTEP, "auto: pair coverage unknown"
    why = f"auto: the pairs differ over {coverage:.0%} of the image, a {'global' if coverage >= GLOBAL_COVERAGE else 'local'} change"
    if coverage < GLOBAL_COVERAGE:
        return LOCAL_MIN_TIMESTEP, why
    if GLOBAL_MIN_TIMESTEP >= opts.max_timestep:
        return LOCAL_MIN_TIMESTEP, f"{why}, but addift.max_timestep leaves no room above {GLOBAL_MIN_TIMESTEP}"
    return GLOBAL_MIN_TIMESTEP, why


def addift_loss(ctx: StepContext, batch: Batch) -> torch.Tensor:
    o = ctx.job.addift
    obj = ctx.model.objective
    x_o, x_t, eps, t = batch.latents["x"], batch.latents["after"], batch.noise, batch.timesteps
    c_o, c_t = branch_captions(batch, o.captions)
    if o.revert_direction:
        x_o, x_t, c_o, c_t = x_t, x_o, c_t, c_o
    odd_m = -o.multiplier * abs(o.alt_ratio)
    q = lambda x: obj.add_noise(x, eps, t)  # noqa: E731 - same ε and t for both images
    forward = (q(x_o), q(x_t), o.multiplier)  # (frozen input, LoRA input, multiplier)
    backward = (q(x_t), q(x_o), odd_m) if o.alt_ratio >= 0 else (eps, eps, odd_m)
    if o.batch_both_directions:
        directions = [forward, backward]
    else:
        directions = [forward if batch.step % 2 == 0 else backward]
    n = len(batch)
    frozen_in = torch.cat([d[0] for d in directions])
    lora_in = torch.cat([d[1] for d in directions])
    m = torch.cat([torch.full((n,), float(d[2])) for d in directions])
    tt = t.repeat(len(directions))
    if o.control:  # ADDifT for edit models: the "before" image (and the pair's references) for both passes
        cond_o = edit_conditioning(ctx, batch, c_o, "x").repeat(len(directions))
        cond_t = cond_o if c_t == c_o else edit_conditioning(ctx, batch, c_t, "x").repeat(len(directions))
    else:
        cond_o, cond_t = ctx.encode(c_o * len(directions)), ctx.encode(c_t * len(directions))
    target = ctx.predict_frozen(frozen_in, tt, cond_o)
    pred = ctx.predict(lora_in, tt, cond_t, multiplier=m)
    weight = None
    masks = batch.difference_masks(o.diff_mask_threshold, o.diff_mask_dilate) if (o.diff_mask or o.self_reg_weight) else None
    if masks is not None:
        mask = masks.repeat(len(directions), 1, 1, 1)
        if o.diff_mask:
            weight = mask + o.mask_floor * (1 - mask)
    loss = per_sample_mse(pred, target, weight) * ctx.timestep_weight(tt)
    if o.self_reg_weight and masks is not None:
        # Where the pair does not differ, the LoRA must not change the model's prediction for its own input.
        same = ctx.predict_frozen(lora_in, tt, cond_t)
        loss = loss + o.self_reg_weight * per_sample_mse(pred, same, 1 - mask)
    return loss.view(len(directions), n).mean(dim=0)


def addift_timesteps(opts, t_min: int, t_max: int):
    """Timestep schedule: stratified groups over [t_min, t_max), or TrainTrain's shipped sequence."""

    def draw(step: int, n: int, gen: torch.Generator) -> torch.Tensor:
        span = (t_max - t_min) / (10 if opts.replicate_traintrain_timesteps else opts.timestep_groups)
        if opts.replicate_traintrain_timesteps:  # B1: width-1 windows at indices 1,3,5,7,9
            index = (step - step % 2) % 10 + 1
            return torch.full((n,), int(min(t_min + span * index, 999)), dtype=torch.long)
        group = (step // 2) % opts.timestep_groups
        lo = t_min + span * group
        u = torch.rand(n, generator=gen)
        return (lo + u * span).long().clamp(t_min, t_max - 1)

    return draw


class Addift(Method):
    name = "addift"
    trains_both_directions = True
    purpose = ("The default for any difference: the LoRA at +m on the noised 'after' image is regressed onto the "
               "frozen model on the noised 'before' image. Fast; a few pairs are enough.")
    options = AddiftOptions
    needs_pairs = True
    unet_only = True  # the text encoder only runs to make conditions; a TE LoRA would get no gradient (B7)
    t_min: int | None = None  # the window's start that ran (set by stages())
    # 40 steps at lr 6e-3 with the "auto" window: chosen on the tune subset of the quality suite, where it
    # met as many bars as the first defaults (100 steps, lr 3e-3, 500-1000) in 2.5x fewer steps; 40 steps
    # at 500-1000 lost colour changes, 700-1000 lost small local ones (README, "Measured comparison").
    defaults = {"max_train_steps": 40, "learning_rate": 6e-3, "lr_scheduler": "cosine", "min_snr_gamma": 5.0,
                "network_dim": 4, "network_alpha": 4.0}

    def caption_keys(self):
        return pair_caption_keys(self.job.addift.captions)

    def samples_take_control(self) -> bool:
        return self.job.addift.control

    def check_inputs(self, model, data) -> None:
        if self.job.addift.control:
            require_control(model, "addift with addift.control", self.job, data)

    def stages(self, data: DataSizes) -> list[Stage]:
        o = self.job.addift
        t_min, why = window_start(o, data.difference_coverage() if data.difference_coverage else None)
        if self.t_min != t_min:  # once, not once per pair of a per-pair average
            log.info("ADDifT timesteps %d-%d (%s)", t_min, o.max_timestep, why)
        self.t_min = t_min
        return [Stage("main", self.main_steps(data), self.spec(), addift_loss,
                      timesteps=addift_timesteps(o, self.t_min, o.max_timestep), init_from_job_weights=True)]

    def metadata(self) -> dict[str, str]:
        o = self.job.addift
        t_min = self.t_min if self.t_min is not None else o.min_timestep
        return {"ss_training_method": "addift", "difflora_addift_multiplier": str(o.multiplier),
                "difflora_addift_timesteps": f"{t_min}-{o.max_timestep}",
                # the window that ran, where kohya's readers look for it (not the job's unused 0-1000)
                "ss_min_timestep": str(t_min), "ss_max_timestep": str(o.max_timestep)}
