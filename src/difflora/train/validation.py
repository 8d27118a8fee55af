"""Validation loss during training: held-out images (or pairs) at fixed noise and timesteps.

kohya's names: `validation_split` (share of each dataset's images held out, chosen with
`validation_seed`), `validate_every_n_steps`; difflora adds `validation_data_dir` (a folder laid
out like the training data, used instead of a split). The loss is the stage's own objective (the
denoising loss, or for ADDifT, the slider, the copier... their loss on held-out pairs) with every
random draw fixed: noise and timesteps depend only on (validation_seed, item, draw), so the value
at step 200 is comparable with the value at step 100. Methods that draw timesteps their own way
(ADDifT's stratified range) are validated at `DRAWS` draws of that rule; the others at kohya's
fixed timesteps.

`ValidationReport` (a progress listener) draws the curve into the samples folder and ends the run
with one line that reads it, by the rules in `advice` (seed 004's overfitting / underfitting advice).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import torch

from ..data.captions import process_caption
from ..data.instructions import instruction_for
from ..data.dataset import seed_of
from ..methods import Batch
from .batches import Sample, assemble, step_context
from .events import Event, Finished, StageStarted, Validation

log = logging.getLogger(__name__)

KOHYA_TIMESTEPS = (10, 350, 500, 650, 990)  # kohya's fixed validation timesteps
DRAWS = 20  # draws of a method's own timestep rule (ADDifT: both directions in each of 10 groups)


class Validator:
    """Computes the validation loss of the stage being trained (called by the stage runner)."""

    def __init__(self, run, items, every: int | None, seed: int):
        self.run, self.items, self.every, self.seed = run, items, every, seed

    @classmethod
    def for_run(cls, run) -> "Validator | None":
        job = run.job
        if not run.data.validation_items:
            return None
        every = job.validate_every_n_steps
        if every is None:
            log.warning("%d validation image(s) held out but validate_every_n_steps is not set: validating at the "
                        "start and end of each stage only", len(run.data.validation_items))
        return cls(run, run.data.validation_items, every, job.seed if job.validation_seed is None else job.validation_seed)

    def due(self, done: int, steps: int) -> bool:
        return done == steps or bool(self.every) and done % self.every == 0

    @torch.no_grad()
    def loss(self, stage, network) -> float:
        run = self.run
        was_training = network.training
        network.eval()  # dropouts off: the value must not depend on the step's random draws
        try:
            draws = DRAWS if stage.timesteps is not None else len(KOHYA_TIMESTEPS)
            total, count = torch.zeros((), dtype=torch.float64), 0  # summed on the device: one read at the end
            groups: dict[tuple, list[int]] = {}
            for i, it in enumerate(self.items):
                groups.setdefault(tuple(it.bucket), []).append(i)
            for s in range(draws):
                for idx in groups.values():
                    batch = self._batch(idx, s, stage)
                    ctx = step_context(run, network, s, batch)
                    with run.accelerator.autocast():
                        per_sample = stage.loss(ctx, batch)
                    total += per_sample.detach().double().sum().cpu()
                    count += len(idx)
            return float(total) / max(count, 1)
        finally:
            network.train(was_training)

    def _batch(self, idx: list[int], draw: int, stage) -> Batch:
        samples = []
        for i in idx:
            it = self.items[i]
            rules = dataclasses.replace(it.rules, shuffle_caption=False, caption_dropout_rate=0.0,
                                        caption_dropout_every_n_epochs=0, caption_tag_dropout_rate=0.0)
            rng = np.random.default_rng(0)  # unused: the rules draw nothing
            captions = {"x": process_caption(it.caption, rules, rng)}
            if it.is_pair:
                captions["after"] = process_caption(it.after_caption, rules, rng)
                captions["instruction"] = instruction_for(it.instruction, self.run.job.edit_instruction,
                                                          captions["after"])
            samples.append(Sample(it, False, captions,
                                  noise_gen=torch.Generator().manual_seed(seed_of(self.seed, "validation", i, draw)),
                                  latent_gen=torch.Generator().manual_seed(seed_of(self.seed, "validation-latent", i))))
        if stage.timesteps is not None:
            timestep = lambda index, gen, latent_hw: stage.timesteps(draw, 1, gen)[0]  # noqa: E731
        else:
            timestep = lambda index, gen, latent_hw: torch.tensor(KOHYA_TIMESTEPS[draw])  # noqa: E731
        return assemble(self.run.data, samples, self.run.model, draw, timestep)


# ---------------------------------------------------------------------------- reading the curve
def advice(steps: list[int], losses: list[float]) -> str:
    """One line on the validation curve, by seed 004's rules (SeaArt's LoRA training guide):

    - overfitting (the loss was lowest before 80% of training and has risen more than 3% above that
      minimum since): lower the learning rate, shorten training (or keep the checkpoint nearest the
      minimum), lower network_dim / raise network_alpha, fewer repeats, regularisation images, more data;
    - underfitting (still falling: the last quarter of the curve lowered it by more than 2%): raise
      the learning rate, train longer, raise network_dim / lower network_alpha, more repeats;
    - no progress (the whole run moved it less than 0.5% and the end is not below the start): the
      LoRA is not learning the held-out images: raise the learning rate or train longer, check captions;
    - otherwise the curve has flattened near its minimum: the training length fits.
    """
    if len(losses) < 3:
        return "validation: too few points to read the curve (lower validate_every_n_steps)"
    arr = np.asarray(losses, dtype=np.float64)
    first, last = arr[0], arr[-1]
    k = int(np.argmin(arr))
    low = arr[k]
    if k < 0.8 * (len(arr) - 1) and last > low * 1.03:
        return (f"validation: looks overfitted: lowest at step {steps[k]} ({low:.4f}), {100 * (last / low - 1):.1f}% "
                f"higher at the end ({last:.4f}); lower learning_rate, train fewer steps/epochs (or use the step "
                f"{steps[k]} checkpoint), lower network_dim or raise network_alpha, fewer repeats, add "
                "regularisation images or more data")
    q = arr[int(round(0.75 * (len(arr) - 1)))]
    if last < q * 0.98:
        return (f"validation: looks underfitted: still falling ({q:.4f} -> {last:.4f} over the last quarter); "
                "raise learning_rate, train more steps/epochs, raise network_dim or lower network_alpha, more repeats")
    if abs(last - first) < 0.005 * first:
        return (f"validation: no progress on held-out data ({first:.4f} -> {last:.4f}): raise learning_rate or "
                "train longer; check that the captions name what should stay variable")
    return f"validation: the curve has flattened near its minimum ({low:.4f} at step {steps[k]}); the length fits"


STAGE_COLOURS = [(31, 111, 209), (209, 73, 31), (46, 158, 68), (138, 63, 193)]


def plot_curve(points: dict[str, list[tuple[int, float]]], path: Path, size=(640, 360)) -> None:
    """A line chart of the validation loss per stage, a dot per validation."""
    from ..fileio import atomic_path
    from .curve import Series, draw_chart

    series = [Series(stage, pts, STAGE_COLOURS[n % len(STAGE_COLOURS)], markers=True)
              for n, (stage, pts) in enumerate(points.items())]
    img = draw_chart(series, "validation loss by global step", size=size)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


class ValidationReport:
    """Listener: collects validation events; at the end writes the plot and logs the advice line."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.points: dict[str, list[tuple[int, float]]] = {}
        self.last_stage: str | None = None
        self.line: str | None = None

    def __call__(self, event: Event) -> None:
        if isinstance(event, StageStarted):
            self.last_stage = event.stage
        elif isinstance(event, Validation):
            self.points.setdefault(event.stage, []).append((event.global_step, event.loss))
        elif isinstance(event, Finished) and self.points:
            plot_curve(self.points, self.path)
            pts = self.points.get(self.last_stage) or next(iter(self.points.values()))
            self.line = advice([p[0] for p in pts], [p[1] for p in pts])
            log.info("%s (curve: %s)", self.line, self.path)
