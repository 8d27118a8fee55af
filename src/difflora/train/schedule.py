"""When to write samples, LoRA checkpoints and training states: kohya's every-n-steps/epochs rules, in one place."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Due:
    sample: bool = False
    lora_tag: str | None = None  # save the stage's LoRA as <name>[-<stage>]-<tag>.safetensors
    state: bool = False  # save the training state


class SaveSchedule:
    def __init__(self, job, has_prompts: bool):
        self.job = job
        self.has_prompts = has_prompts

    def sample_before_training(self, stage_index: int, start_step: int) -> bool:
        return self.has_prompts and self.job.sample_at_first and stage_index == 0 and start_step == 0

    def after_step(self, done: int, steps: int, per_epoch: int) -> Due:
        """What is due after optimizer step `done` (1-based) of a stage of `steps` steps."""
        j = self.job
        epoch_end = done % per_epoch == 0
        epoch = done // per_epoch
        due = Due()
        due.sample = self.has_prompts and bool(
            (j.sample_every_n_steps and done % j.sample_every_n_steps == 0)
            or (j.sample_every_n_epochs and epoch_end and epoch % j.sample_every_n_epochs == 0))
        if done < steps:  # the end of a stage has its own saves
            if j.save_every_n_steps and done % j.save_every_n_steps == 0:
                due.lora_tag = f"step{done:08d}"
            if j.save_every_n_epochs and epoch_end and epoch % j.save_every_n_epochs == 0:
                due.lora_tag = f"{epoch:06d}"
            due.state = (j.save_state and due.lora_tag is not None) or bool(
                j.save_state_every_n_steps and done % j.save_state_every_n_steps == 0)
        return due

    def sample_at_end(self) -> bool:
        return self.has_prompts and bool(self.job.sample_every_n_steps or self.job.sample_every_n_epochs)

    def state_at_end(self) -> bool:
        return self.job.save_state
