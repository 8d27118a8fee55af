"""Running a method's stages: each trains one LoRA network, step by step, and reports as it goes."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..data.dataset import seed_of
from ..errors import TrainingStopped, UserError
from ..methods import Batch, Stage
from ..network.lora import LoRANetwork
from .batches import batch_at, make_batch, step_context
from .checkpoint import check_global_batch
from .distributed import TrainingStep, any_process, mean_over_processes, share_from
from .events import StageEnded, StageStarted, Step, Stopped, Validation
from ..optim import make_optimizer, make_scheduler, param_groups

# Steps between copies of the weights a step verified (finite loss and gradient). The copy is restored only when
# an update ruins the weights; copying every step cost as much as the LoRA's forward on a CPU.
GOOD_COPY_EVERY = 20
# On an accelerator the step losses stay on the device and are read (all of them at once) this often, and before
# any other event; on the CPU reading one waits for nothing, so every step's is read at once.
LOSS_READ_EVERY_S = 1.0


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
    trainer: torch.nn.Module  # the network inside TrainingStep, as accelerator.prepare wrapped it (DDP, FSDP, ...)
    solo: bool = False  # trained by this process alone (per-pair fan-out): world 1, nothing shared per step
    verified: list | None = None  # a copy of weights a step computed a finite loss and gradient from...
    verified_step: int = 0  # ...the weights after this many steps
    update_finite: torch.Tensor | None = None  # whether the last update left every weight finite (not read yet)


@dataclass
class PendingStep:
    """A finished step whose loss is still on the device."""

    step: int
    loss: torch.Tensor
    lrs: dict[str, float]
    seconds: float  # since the stage (or resumed run) started


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
        self.next_batch: tuple[tuple[int, int, int], Batch] | None = None  # ((stage, step, micro), its batch)
        self.pending: list[PendingStep] = []  # finished steps whose losses were not read yet
        self.t0, self.last_read, self.loss_avg = 0.0, 0.0, None
        self.stages_started = 0  # the first has nothing of an earlier stage to free (the accelerator is new)

    def run_all(self) -> dict[str, LoRANetwork]:
        owners = fan_out(self.stages, self.run.world)
        saved, offset = self.state, 0
        done = set(saved["completed"]) if saved is not None else set()
        for index, stage in enumerate(self.stages):
            owner = owners[index]
            if owner is not None and owner != self.run.rank:
                offset += stage.steps
                continue  # another process trains it; shared below
            for name, net in self.results.items():
                net.set_multiplier(1.0 if name in stage.keep_active else 0.0)
            resuming = saved is not None and index == saved["stage_index"]
            if stage.name in done and not resuming:
                self._restore_finished(stage)
            elif saved is not None and index < saved["stage_index"] and owner is None:
                raise UserError(f"training state is damaged: it has no weights for the finished stage {stage.name}",
                                path=self.run.resume, hint="start again without --resume")
            else:  # (a fan-out state holds only its main process's finished pairs: the others train again)
                self.state = saved if resuming else None
                self._train(self._start(index, stage, offset, solo=owner is not None))
            offset += stage.steps
        self.state = None
        if any(o is not None for o in owners):
            self._gather_fan_out(owners)
        return self.results

    def _gather_fan_out(self, owners: list[int | None]) -> None:
        """Every process gets the LoRAs the others trained alone, in stage order (the same collectives on all)."""
        run = self.run
        results = {}
        for index, stage in enumerate(self.stages):
            owner = owners[index]
            if owner is None or owner == run.rank:
                results[stage.name] = self.results[stage.name]
                continue
            net = LoRANetwork.create(run.lora_targets(conv=bool(stage.spec.conv_dim)), stage.spec)
            net.to(run.device, dtype=torch.bfloat16 if run.job.full_bf16 else None).apply_to()
            net.requires_grad_(False).eval()
            results[stage.name] = net
        for index, stage in enumerate(self.stages):
            if owners[index] is not None:
                with torch.no_grad():
                    share_from(owners[index], results[stage.name].state_dict(keep_vars=True))
        self.results = results

    def _restore_finished(self, stage: Stage) -> None:
        if stage.name not in self.state["completed"]:
            raise UserError(f"training state is damaged: it has no weights for the finished stage {stage.name}",
                            path=self.run.resume, hint="start again without --resume")
        net = LoRANetwork.from_weights(self.run.lora_targets(conv=True), self.state["completed"][stage.name])
        self.results[stage.name] = net.to(self.run.device).apply_to()
        net.requires_grad_(False)

    def _start(self, index: int, stage: Stage, offset: int, solo: bool = False) -> StageProgress:
        run, job = self.run, self.run.job
        torch.manual_seed(seed_of(job.seed, "init", index))
        network = LoRANetwork.create(run.lora_targets(conv=bool(stage.spec.conv_dim)), stage.spec)
        if stage.init_from_job_weights and run.initial_weights is not None:
            network.load_weights(run.initial_weights.tensors, source=run.initial_weights.path, strict=False)
        network.to(run.device, dtype=torch.bfloat16 if job.full_bf16 else None).apply_to().train()
        optimizer = make_optimizer(job.optimizer_type, param_groups(network, job, stage.learning_rate),
                                   job.optimizer_args, run.device)
        scheduler = make_scheduler(job.lr_scheduler, optimizer, stage.steps, job.lr_warmup_steps,
                                   job.lr_scheduler_num_cycles, job.lr_scheduler_power)
        if self.state is not None:  # resuming inside this stage
            check_global_batch(self.state, run, solo, run.resume)
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
        world = 1 if solo else run.world
        per_epoch = max(1, len(run.data.epoch_batches(0, world, allowed)) // job.gradient_accumulation_steps)
        accelerator = run.accelerator
        if self.stages_started:  # (a full garbage collection: ~0.3 s a stage)
            accelerator.free_memory()  # the previous stage's wrappers, and the accumulation count from 0
        self.stages_started += 1
        trainer = TrainingStep(network)
        if not solo:
            trainer, optimizer, scheduler = accelerator.prepare(trainer, optimizer, scheduler)
        return StageProgress(index, stage, network, optimizer, scheduler, per_epoch, offset, len(self.stages) > 1,
                             allowed, [p for p in network.parameters() if p.requires_grad], trainer, solo)

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
        self.t0, self.loss_avg, self.pending, self.last_read = time.perf_counter(), None, [], 0.0
        for step in range(start, stage.steps):
            loss = self._step(sp, step)
            done = step + 1
            lrs = {g.get("name", f"group{i}"): g["lr"] for i, g in enumerate(sp.optimizer.param_groups)}
            self.pending.append(PendingStep(done, loss, lrs, time.perf_counter() - self.t0))
            validate = self.validator is not None and self.validator.due(done, stage.steps)
            due = self.schedule.after_step(done, stage.steps, sp.per_epoch)
            if validate or due.sample or due.lora_tag or due.state or done == stage.steps:
                self._confirm_update(sp, step)  # nothing is validated, sampled or saved from non-finite weights
                self._report_steps(sp, start)
            elif self.run.device.type == "cpu" or time.perf_counter() - self.last_read >= LOSS_READ_EVERY_S:
                self._report_steps(sp, start)
            # (a listener of this step may ask); a process training its own pairs stops on its own
            stop = self.stop.requested if sp.solo else any_process(self.run.accelerator, self.stop.requested)
            if stop:
                self._confirm_update(sp, step)
                self._report_steps(sp, start)
            if validate:
                self._validate(sp, done)
            if due.sample and main:
                self.samples.write([sp.network] + list(self.results.values()), sp.offset + done)
            if stop:
                self.checkpointer.save(sp, self.results, done, "interrupted", with_state=True)
                self.events.emit(Stopped(step=sp.offset + done, state_dir=str(self.run.state_dir)))
                raise TrainingStopped(f"stopped at step {done} of stage {stage.name}; the LoRA and training state "
                                      f"were saved to {self.run.out_dir}; continue with --resume")
            if due.lora_tag or due.state:
                self.checkpointer.save(sp, self.results, done, due.lora_tag, due.state)
        self.events.emit(StageEnded(stage=stage.name, seconds=time.perf_counter() - self.t0))
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

    def _report_steps(self, sp: StageProgress, start: int) -> None:
        """Step events for the steps whose losses are still on the device: one read for all of them."""
        if not self.pending:
            return
        losses = torch.stack([p.loss for p in self.pending]).tolist()
        for p, loss in zip(self.pending, losses):
            self.loss_avg = loss if self.loss_avg is None else 0.95 * self.loss_avg + 0.05 * loss
            rate = (p.step - start) / max(p.seconds, 1e-9)
            self.events.emit(Step(stage=sp.stage.name, step=p.step, steps=sp.stage.steps,
                                  global_step=sp.offset + p.step, total_steps=self.total_steps, loss=loss,
                                  loss_avg=self.loss_avg, lr=next(iter(p.lrs.values())), steps_per_s=rate,
                                  eta_s=(self.total_steps - sp.offset - p.step) / rate, lrs=p.lrs))
        self.pending = []
        self.last_read = time.perf_counter()

    def _step(self, sp: StageProgress, step: int) -> torch.Tensor:
        """One optimizer step (gradient accumulation, gradient averaging, clipping); returns the step's mean loss,
        unread.

        Through accelerate: the micro-batches under `accumulate` (DDP averages the gradients once, in buckets
        during the last backward), `backward`, `clip_grad_norm_`, and the prepared optimizer and scheduler. The
        step reads the device once: whether its loss and gradient, and the previous update's weights, are finite.
        The next micro-batch is assembled while the device still runs this one's backward.
        """
        run, job, stage, accelerator = self.run, self.run.job, sp.stage, self.run.accelerator
        rank = 0 if sp.solo else run.rank
        torch.manual_seed(seed_of(job.seed, "dropout", sp.index, step, rank))  # network dropouts
        sp.optimizer.zero_grad(set_to_none=True)
        step_loss = torch.zeros((), device=run.device)
        accumulation = job.gradient_accumulation_steps
        max_norm = job.max_grad_norm if job.max_grad_norm > 0 else float("inf")
        for micro in range(accumulation):
            batch = self._batch(sp, step, micro)
            ctx = step_context(run, sp.network, step, batch)
            if sp.solo:
                with accelerator.autocast():
                    loss = sp.trainer(stage.loss, ctx, batch)
                (loss / accumulation).backward()
            else:
                with accelerator.accumulate(sp.trainer), accelerator.autocast():
                    loss = sp.trainer(stage.loss, ctx, batch)
                    accelerator.backward(loss)  # divided by gradient_accumulation_steps
            step_loss += loss.detach().float() / accumulation
            self._prefetch(sp, step, micro + 1)
        if sp.solo:
            grad_norm = torch.nn.utils.clip_grad_norm_(sp.params, max_norm)
        else:
            step_loss = mean_over_processes(accelerator, step_loss)
            grad_norm = accelerator.clip_grad_norm_(sp.params, max_norm)
            # DeepSpeed clips inside its engine (gradient_clipping) and reports its norm as a number, or nothing
            grad_norm = torch.as_tensor(0.0 if grad_norm is None else grad_norm, device=run.device)
        finite = torch.isfinite(step_loss) & torch.isfinite(grad_norm).to(step_loss.device)
        if sp.update_finite is not None:
            finite = finite & sp.update_finite
        if not bool(finite):
            self._confirm_update(sp, step - 1)
            self._stop_non_finite(sp, step, "loss" if not bool(torch.isfinite(step_loss)) else "gradient")
        if sp.verified is None or step - sp.verified_step >= GOOD_COPY_EVERY:
            self._keep_verified(sp, step)
        sp.optimizer.step()
        sp.scheduler.step()
        sp.update_finite = weights_finite(sp.params)
        return step_loss

    def _batch(self, sp: StageProgress, step: int, micro: int) -> Batch:
        """The micro-batch at (step, micro) of this stage: the one prefetched, else assembled now."""
        ready, self.next_batch = self.next_batch, None
        if ready is not None and ready[0] == (sp.index, step, micro):
            return ready[1]
        run, job = self.run, self.run.job
        epoch, global_batch = batch_at(run.data, step * job.gradient_accumulation_steps + micro,
                                       1 if sp.solo else run.world, sp.allowed)
        rank, world = (0, 1) if sp.solo else (run.rank, run.world)
        return make_batch(run.data, global_batch, rank, world, job, sp.index, step, micro, epoch,
                          sp.stage.timesteps, run.model)

    def _prefetch(self, sp: StageProgress, step: int, micro: int) -> None:
        if micro == self.run.job.gradient_accumulation_steps:
            step, micro = step + 1, 0
        if step < sp.stage.steps:
            self.next_batch = ((sp.index, step, micro), self._batch(sp, step, micro))

    def _keep_verified(self, sp: StageProgress, step: int) -> None:
        """Copy the weights this step verified (into the same buffers each time: nothing is allocated)."""
        with torch.no_grad():
            if sp.verified is None:
                sp.verified = [p.detach().clone() for p in sp.params]
            else:
                torch._foreach_copy_(sp.verified, [p.detach() for p in sp.params])
        sp.verified_step = step

    def _confirm_update(self, sp: StageProgress, step: int) -> None:
        """Stop when the update of step `step` (0-based) left a weight non-finite."""
        if sp.update_finite is not None and not bool(sp.update_finite):
            self._stop_non_finite(sp, step, "weights after the update", updated=True)
        sp.update_finite = None

    def _stop_non_finite(self, sp: StageProgress, step: int, what: str, updated: bool = False) -> None:
        """Save the last weights known to be good as <name>-last-good, then stop.

        The weights before a failing step are kept (with the state, so --resume continues) when
        they still give a finite loss, as after a one-off fault. When they do not (the previous
        update ruined them: a learning rate far too high), or the update itself made them
        non-finite, the last copy of weights that computed a finite loss is saved instead (at most
        GOOD_COPY_EVERY steps old), and the state on disk stays the last regular one.
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
            torch._foreach_copy_([p.detach() for p in sp.params], sp.verified)
        good_step = sp.verified_step
        self.checkpointer.save(sp, self.results, good_step, "last-good", with_state=False)
        raise TrainingStopped(
            f"non-finite {what} at step {step + 1} of stage {sp.stage.name}; training stopped and the last weights "
            f"that gave a finite loss (from before step {good_step + 1}) were saved as {name}; the state for "
            f"--resume is the last regular save. {tips}")

    @torch.no_grad()
    def _loss_is_finite(self, sp: StageProgress, step: int) -> bool:
        """The current weights' loss on the failing step's first batch, computed again."""
        if not bool(weights_finite(sp.params)):
            return False
        batch = self._batch(sp, step, 0)
        with self.run.accelerator.autocast():
            return bool(torch.isfinite(sp.stage.loss(step_context(self.run, sp.network, step, batch), batch).mean()))


def weights_finite(params: list[torch.Tensor]) -> torch.Tensor:
    """Whether every weight is finite, as one boolean on the device (the largest magnitude of each tensor)."""
    return torch.isfinite(torch.stack(torch._foreach_norm([p.detach() for p in params], float("inf")))).all()


def fan_out(stages: list[Stage], world: int) -> list[int | None]:
    """The process that trains each stage alone, or None where all train it together.

    Per-pair stages (one dataset item each, and only their own pair's LoRAs kept active) go to the processes in
    turn, pair i to process i mod N: each trains its pairs at the per-process batch, exactly as one process
    would, and the LoRAs are shared at the end.
    """
    if world == 1:
        return [None] * len(stages)
    pair = {s.name: s.items[0] for s in stages if s.items is not None and len(s.items) == 1}
    if len(pair) != len(stages) or any(pair.get(k) != pair[s.name] for s in stages for k in s.keep_active):
        return [None] * len(stages)
    return [pair[s.name] % world for s in stages]
