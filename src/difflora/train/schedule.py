"""When to write samples, LoRA checkpoints and training states: kohya's every-n-steps/epochs rules, in one place.

Sampling is cheap by default: a job with sample prompts and no sample_every_n_steps/epochs samples
the finished LoRA, and in between only as often as keeps every pass together under
`SAMPLING_SHARE` of the run (estimated from the prompts, not timed, so the same job samples at the
same steps everywhere). No step is sampled twice: the last step of a stage is left to the end-of-run
pass. "Sample now" / "save now" (`OnDemand`, SIGUSR1 / SIGUSR2 from a UI) are served after the current step.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
from dataclasses import dataclass

from .stop import signal_handlers

log = logging.getLogger(__name__)

SAMPLING_SHARE = 0.2  # at most this part of a run's wall time goes to the default sampling
# One sampler call (a prompt's images in one batch, CFG included) costs about one training step on the toy world
# (0.6 s vs 0.5 s on one CPU thread); on a GPU a step (forward and backward) costs more, so this errs towards
# fewer samples.
STEPS_PER_SAMPLER_CALL = 1.0


@dataclass
class Due:
    sample: bool = False
    lora_tag: str | None = None  # save the stage's LoRA as <name>[-<stage>]-<tag>.safetensors
    state: bool = False  # save the training state


class OnDemand:
    """'Sample now' and 'save now' asked from outside the loop (any thread or a signal handler)."""

    def __init__(self):
        self.sample = threading.Event()
        self.save = threading.Event()

    @staticmethod
    def take(flag: threading.Event) -> bool:
        asked = flag.is_set()
        flag.clear()
        return asked


@contextlib.contextmanager
def signals_on_demand(on_demand: OnDemand):
    """While inside, SIGUSR1 asks for samples and SIGUSR2 for a saved LoRA and state. Main thread only."""
    handlers = {signal.SIGUSR1: lambda *_: on_demand.sample.set(), signal.SIGUSR2: lambda *_: on_demand.save.set()}
    with signal_handlers(handlers):
        yield on_demand


def sampler_calls(prompts) -> int:
    """Sampler calls of one sampling pass: each prompt is one batch (its sweep's multipliers included) per step."""
    return sum(max(1, int(p.steps)) for p in prompts)


def auto_sample_every(total_steps: int, calls: int, accumulation: int = 1) -> int | None:
    """Steps between sample passes so that all of them, the final one included, take at most SAMPLING_SHARE
    of the run; None when only the final pass fits."""
    pass_steps = calls * STEPS_PER_SAMPLER_CALL / max(1, accumulation)
    if pass_steps <= 0 or total_steps <= 0:
        return None
    passes = int(SAMPLING_SHARE / (1 - SAMPLING_SHARE) * total_steps / pass_steps)
    return math.ceil(total_steps / passes) if passes >= 2 else None


class SaveSchedule:
    def __init__(self, job, prompts=(), total_steps: int = 0, on_demand: OnDemand | None = None):
        self.job = job
        self.has_prompts = bool(prompts)
        self.on_demand = on_demand
        self.sample_every = job.sample_every_n_steps
        self.auto = self.has_prompts and not (job.sample_every_n_steps or job.sample_every_n_epochs)
        if self.auto:
            self.sample_every = auto_sample_every(total_steps, sampler_calls(prompts), job.gradient_accumulation_steps)
            log.info("sampling %s (set sample_every_n_steps to choose)",
                     f"every {self.sample_every} steps and the finished LoRA" if self.sample_every
                     else "the finished LoRA only, which keeps sampling under a fifth of the run")

    def sample_before_training(self, stage_index: int, start_step: int) -> bool:
        return self.has_prompts and self.job.sample_at_first and stage_index == 0 and start_step == 0

    def after_step(self, done: int, steps: int, per_epoch: int) -> Due:
        """What is due after optimizer step `done` (1-based) of a stage of `steps` steps."""
        j = self.job
        epoch_end = done % per_epoch == 0
        epoch = done // per_epoch
        due = Due()
        due.sample = self.has_prompts and done < steps and bool(  # the end of a stage: the final pass samples it
            (self.sample_every and done % self.sample_every == 0)
            or (j.sample_every_n_epochs and epoch_end and epoch % j.sample_every_n_epochs == 0))
        if self.on_demand is not None and done < steps and OnDemand.take(self.on_demand.sample):
            if self.has_prompts:
                due.sample = True
            else:
                log.warning("sample now: this job has no sample prompts (sample_prompts)")
        if done < steps:  # the end of a stage has its own saves
            if j.save_every_n_steps and done % j.save_every_n_steps == 0:
                due.lora_tag = f"step{done:08d}"
            if j.save_every_n_epochs and epoch_end and epoch % j.save_every_n_epochs == 0:
                due.lora_tag = f"{epoch:06d}"
            due.state = (j.save_state and due.lora_tag is not None) or bool(
                j.save_state_every_n_steps and done % j.save_state_every_n_steps == 0)
            if self.on_demand is not None and OnDemand.take(self.on_demand.save):
                due.lora_tag, due.state = f"step{done:08d}", True
        return due

    def sample_at_end(self) -> bool:
        return self.has_prompts and bool(self.auto or self.job.sample_every_n_steps or self.job.sample_every_n_epochs)

    def state_at_end(self) -> bool:
        return self.job.save_state
