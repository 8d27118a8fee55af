"""Running a method's stages: each trains one LoRA network, step by step, and reports as it goes."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..data.dataset import seed_of
from ..errors import TrainingStopped, UserError
from ..methods import Stage, StepContext
from ..network.lora import LoRANetwork
from .batches import all_reduce, any_process, batch_at, make_batch
from .events import StageEnded, StageStarted, Step, Stopped, Validation
from ..optim import make_optimizer, make_scheduler, param_groups


@dataclass
class StageProgress:
    """The stage being trained: its network, optimizer and schedule, and where it sits in the run."""

    index: int
    stage: Stage
    network: LoRANetwork
    optimizer: object
    scheduler: object
    per_epoch: int  # optimizer steps per epoch of this stage's data
    offset: int  # global steps before this stage
    multi_stage: bool
    allowed: set[int] | None  # ids of the unique items this stage sees (None: all)
    params: list
    verified: list | None = None  # the weights a step last computed a finite loss and gradient from


class StageRunner:
    def __init__(self, run, stages: list[Stage], state: dict | None, checkpointer, schedule, samples, events, stop,
                 validator=None):
        self.run, self.stages, self.state = run, stages, state
        self.validator = validator  # train/validation.py's Validator, or None
        self.checkpointer, self.schedule, self.samples = checkpointer, schedule, samples
        self.events, self.stop = events, stop
        self.results: dict[str, LoRANetwork] = {}
        self.total_steps = sum(s.steps for s in stages)
        self.last: StageProgress | None = None

    def run_all(self) -> dict[str, LoRANetwork]:
        offset = 0
        for index, stage in enumerate(self.stages):
            for name, net in self.results.items():
                net.set_multiplier(1.0 if name in stage.keep_active else 0.0)
            if self.state is not None and index < self.state["stage_index"]:
                self._restore_finished(stage)
            else:
                self._train(self._start(index, stage, offset))
                self.state = None  # later stages start fresh
            offset += stage.steps
        return self.results

    def _restore_finished(self, stage: Stage) -> None:
        if stage.name not in self.state["completed"]:
            raise UserError(f"training state is damaged: it has no weights for the finished stage {stage.name}",
                            path=self.run.resume, hint="start again without --resume")
        net = LoRANetwork.from_weights(self.run.model.lora_targets(conv=True), self.state["completed"][stage.name])
        self.results[stage.name] = net.to(self.run.device).apply_to()
        net.requires_grad_(False)

    def _start(self, index: int, stage: Stage, offset: int) -> StageProgress:
        run, job = self.run, self.run.job
        torch.manual_seed(seed_of(job.seed, "init", index))
        network = LoRANetwork.create(run.model.lora_targets(conv=bool(stage.spec.conv_dim)), stage.spec)
        if stage.init_from_job_weights and run.initial_weights is not None:
            network.load_weights(run.initial_weights.tensors, source=run.initial_weights.path, strict=False)
        network.to(run.device, dtype=torch.bfloat16 if job.full_bf16 else None).apply_to().train()
        optimizer = make_optimizer(job.optimizer_type, param_groups(network, job, stage.learning_rate),
                                   job.optimizer_args, run.device)
        scheduler = make_scheduler(job.lr_scheduler, optimizer, stage.steps, job.lr_warmup_steps,
                                   job.lr_scheduler_num_cycles, job.lr_scheduler_power)
        if self.state is not None:  # resuming inside this stage
            try:
                network.load_state_dict(self.state["network"])
                optimizer.load_state_dict(self.state["optimizer"])
                scheduler.load_state_dict(self.state["scheduler"])
            except (RuntimeError, ValueError, KeyError) as e:
                raise UserError(f"cannot resume: the state does not fit this job's LoRA or optimizer "
                                f"({' '.join(str(e).split())[:300]})", path=run.resume,
                                hint="resume with the job it was made with, or start again without --resume") from None
        # Text-encoder LoRAs in training: encode every step. Otherwise cache (earlier stages' TE LoRAs are fixed).
        run.encode.reset(trains_text_encoder=any(
            p.requires_grad for n, lora in network.named_children()
            if network.components.get(n) != "unet" for p in lora.parameters()))
        unique = run.data.unique_items()
        allowed = {id(unique[i]) for i in stage.items} if stage.items is not None else None
        per_epoch = max(1, len(run.data.epoch_batches(0, run.world, allowed)) // job.gradient_accumulation_steps)
        return StageProgress(index, stage, network, optimizer, scheduler, per_epoch, offset, len(self.stages) > 1,
                             allowed, [p for p in network.parameters() if p.requires_grad])

    def _train(self, sp: StageProgress) -> None:
        stage, main = sp.stage, self.run.is_main
        start = int(self.state["step"]) if self.state is not None else 0
        if start > stage.steps:  # e.g. a state saved under a longer default, resumed after it changed
            raise UserError(f"cannot resume: the state is at step {start} of stage {stage.name}, but this job trains "
                            f"it for {stage.steps} steps", path=self.run.resume,
                            hint="set max_train_steps to the length the state was made with, or start again without "
                                 "--resume")
        if main and self.schedule.sample_before_training(sp.index, start):
            self.samples.write([sp.network], 0)
        self.events.emit(StageStarted(stage=stage.name, index=sp.index, stages=len(self.stages), steps=stage.steps,
                                      start_step=start))
        if start == 0:
            self._validate(sp, 0)  # the starting point of the curve
        t0, loss_avg = time.perf_counter(), None
        for step in range(start, stage.steps):
            loss = self._step(sp, step)
            done = step + 1
            loss_avg = loss if loss_avg is None else 0.95 * loss_avg + 0.05 * loss
            rate = (done - start) / max(time.perf_counter() - t0, 1e-9)
            lrs = {g.get("name", f"group{i}"): g["lr"] for i, g in enumerate(sp.optimizer.param_groups)}
            self.events.emit(Step(stage=stage.name, step=done, steps=stage.steps, global_step=sp.offset + done,
                                  total_steps=self.total_steps, loss=loss, loss_avg=loss_avg, lr=next(iter(lrs.values())),
                                  steps_per_s=rate, eta_s=(self.total_steps - sp.offset - done) / rate, lrs=lrs))
            if self.validator is not None and self.validator.due(done, stage.steps):
                self._validate(sp, done)
            due = self.schedule.after_step(done, stage.steps, sp.per_epoch)
            if due.sample and main:
                self.samples.write([sp.network] + list(self.results.values()), sp.offset + done)
            if any_process(self.stop.requested, self.run.world):
                self.checkpointer.save(sp, self.results, done, "interrupted", with_state=True)
                self.events.emit(Stopped(step=sp.offset + done, state_dir=str(self.run.state_dir)))
                raise TrainingStopped(f"stopped at step {done} of stage {stage.name}; the LoRA and training state "
                                      f"were saved to {self.run.out_dir}; continue with --resume")
            if due.lora_tag or due.state:
                self.checkpointer.save(sp, self.results, done, due.lora_tag, due.state)
        self.events.emit(StageEnded(stage=stage.name, seconds=time.perf_counter() - t0))
        sp.network.eval().requires_grad_(False)
        self.results[stage.name] = sp.network
        self.last = sp
        if stage.save_as:
            self.checkpointer.save_stage_result(stage.save_as, sp.network, sp.offset + stage.steps)

    def _validate(self, sp: StageProgress, done: int) -> None:
        if self.validator is None:
            return
        loss = self.validator.loss(sp.stage, sp.network)
        self.events.emit(Validation(stage=sp.stage.name, step=done, global_step=sp.offset + done, loss=loss))

    def _step(self, sp: StageProgress, step: int) -> float:
        """One optimizer step (gradient accumulation, all-reduce, clipping); returns the step's mean loss."""
        run, job, stage = self.run, self.run.job, sp.stage
        torch.manual_seed(seed_of(job.seed, "dropout", sp.index, step, run.rank))  # network dropouts
        sp.optimizer.zero_grad(set_to_none=True)
        step_loss = torch.zeros(())
        for micro in range(job.gradient_accumulation_steps):
            position = step * job.gradient_accumulation_steps + micro
            epoch, global_batch = batch_at(run.data, position, run.world, sp.allowed)
            batch = make_batch(run.data, global_batch, run.rank, run.world, job, sp.index, step, micro, epoch,
                               stage.timesteps, run.model)
            ctx = StepContext(model=run.model, network=sp.network, job=job, step=step, encode=run.encode,
                              sample_cond=run.model.sample_conditioning(batch.sizes))
            with run.accelerator.autocast():
                loss = stage.loss(ctx, batch).mean() / job.gradient_accumulation_steps
            loss.backward()
            step_loss += loss.detach().float()
        step_loss = all_reduce(sp.params, step_loss, run.world)
        grad_norm = torch.nn.utils.clip_grad_norm_(sp.params, job.max_grad_norm if job.max_grad_norm > 0 else float("inf"))
        if not torch.isfinite(step_loss) or not torch.isfinite(grad_norm):
            self._stop_non_finite(sp, step, "loss" if not torch.isfinite(step_loss) else "gradient")
        sp.verified = [p.detach().clone() for p in sp.params]  # a finite loss and gradient came from these
        sp.optimizer.step()
        sp.scheduler.step()
        if not all(bool(torch.isfinite(p).all()) for p in sp.params):
            self._stop_non_finite(sp, step, "weights after the update", updated=True)
        return float(step_loss)

    def _stop_non_finite(self, sp: StageProgress, step: int, what: str, updated: bool = False) -> None:
        """Save the last weights known to be good as <name>-last-good, then stop.

        The weights before a failing step are kept (with the state, so --resume continues) when
        they still give a finite loss, as after a one-off fault. When they do not (the previous
        update ruined them: a learning rate far too high), or the update itself made them
        non-finite, the weights of the last step that computed a finite loss are saved instead,
        and the state on disk stays the last regular one.
        """
        name = f"{self.run.job.output_name}-last-good.safetensors"
        tips = "Try a lower learning_rate, max_grad_norm = 1.0, or mixed_precision = 'no'/'bf16'"
        if not updated and self._loss_is_finite(sp, step):
            self.checkpointer.save(sp, self.results, step, "last-good", with_state=True,
                                   params_are="before the failing step")
            raise TrainingStopped(
                f"non-finite {what} at step {step + 1} of stage {sp.stage.name}; training stopped and the weights "
                f"before that step were saved ({name} and the state for --resume); earlier saves are untouched. {tips}")
        if sp.verified is None:
            raise TrainingStopped(f"non-finite {what} at step {step + 1} of stage {sp.stage.name}, from the starting "
                                  f"weights; nothing was saved. {tips}")
        with torch.no_grad():
            for p, good in zip(sp.params, sp.verified):
                p.copy_(good)
        good_step = step if updated else step - 1
        self.checkpointer.save(sp, self.results, good_step, "last-good", with_state=False)
        raise TrainingStopped(
            f"non-finite {what} at step {step + 1} of stage {sp.stage.name}; training stopped and the last weights "
            f"that gave a finite loss (from before step {good_step + 1}) were saved as {name}; the state for "
            f"--resume is the last regular save. {tips}")

    @torch.no_grad()
    def _loss_is_finite(self, sp: StageProgress, step: int) -> bool:
        """The current weights' loss on the failing step's first batch, computed again."""
        run, job = self.run, self.run.job
        if not all(bool(torch.isfinite(p).all()) for p in sp.params):
            return False
        epoch, global_batch = batch_at(run.data, step * job.gradient_accumulation_steps, run.world, sp.allowed)
        batch = make_batch(run.data, global_batch, run.rank, run.world, job, sp.index, step, 0, epoch,
                           sp.stage.timesteps, run.model)
        ctx = StepContext(model=run.model, network=sp.network, job=job, step=step, encode=run.encode)
        with run.accelerator.autocast():
            return bool(torch.isfinite(sp.stage.loss(ctx, batch).mean()))
