"""Saving what a run has made: LoRA checkpoints, the training state, the stages' own files, the result."""

from __future__ import annotations

from ..errors import UserError
from ..network.files import save_dtype, save_lora
from ..statefile import save_state
from .events import CheckpointWritten, EventBus
from .metadata import RunMetadata
from ..config import SHAPE_KEYS



# What a state must hold to be resumed from.
_STATE_KEYS = ("stage_index", "stage_name", "step", "network", "optimizer", "scheduler", "completed")


def shape_settings(job) -> dict:
    """The job's values that fix the shapes of what is trained (the method table's ranks included)."""
    out = {key: getattr(job, key, None) for key in SHAPE_KEYS}
    table = getattr(job, str(job.method), None)
    if table is not None and hasattr(table, "model_dump"):
        out.update({f"{job.method}.{k}": v for k, v in table.model_dump().items() if "dim" in k or "rank" in k})
    return out


def check_resumable(state: dict, job, state_dir) -> None:
    """Refuse a state this job cannot continue: parts missing, or made with settings that change shapes."""
    missing = [k for k in _STATE_KEYS if k not in state]
    if missing:
        raise UserError(f"training state is damaged: it has no {', '.join(missing)}", path=state_dir,
                        hint="start again without --resume")
    saved = state.get("shapes")
    if not isinstance(saved, dict):
        return  # a state from before this check: the shapes are compared when its tensors are loaded
    now = shape_settings(job)
    differ = [k for k in now if k in saved and saved[k] != now[k]]
    if differ:
        what = "; ".join(f"{k} = {saved[k]!r} there, {now[k]!r} in this job" for k in differ)
        raise UserError(f"cannot resume: the state was made with other settings that change what is trained ({what})",
                        path=state_dir, hint="resume with the job it was made with, or start again without --resume")


def global_batch(run, solo: bool) -> list[int]:
    """Each dataset's global batch (per-process batch x processes; a stage trained alone: its own batch)."""
    return [b * (1 if solo else run.world) for b in run.data.batch_sizes]


def check_global_batch(state: dict, run, solo: bool, state_dir) -> None:
    """The batch order is drawn per global batch: another process count continues the same run only at the same
    global batch."""
    saved, now = state.get("global_batch"), global_batch(run, solo)
    if saved is not None and list(saved) != now:
        raise UserError(f"cannot resume: the state was trained at a global batch of {saved} (per-process batch x "
                        f"processes); this run's is {now} with {run.world} process(es)", path=state_dir,
                        hint="set train_batch_size (or the datasets' batch_size) so that batch x processes is the "
                             "same, or start again without --resume")


class Checkpointer:
    """Writes files on the main process only (other ranks hold the same weights), each atomically."""

    def __init__(self, run, metadata: RunMetadata, events: EventBus, fingerprint: str):
        self.run = run
        self.metadata = metadata
        self.events = events
        self.fingerprint = fingerprint
        self.dtype = save_dtype(run.job.save_precision)

    def _lora(self, tensors, name: str, steps: int, epoch: int):
        path = self.run.out_dir / f"{name}.safetensors"
        tensors = self.run.model.export_lora(tensors, self.run.job.save_format)  # kohya, or diffusers (FLUX)
        save_lora(tensors, path, self.metadata.for_lora(steps, epoch), dtype=self.dtype)
        return path

    def save(self, progress, results: dict, step: int, tag: str | None, with_state: bool,
             params_are: str = "current") -> None:
        """The current stage's LoRA as <name>[-<stage>]-<tag> (when tagged) and/or the state to resume from."""
        if not self.run.is_main:
            return
        name = lora = state_dir = None
        global_step = progress.offset + step
        if tag is not None:
            label = f"-{progress.stage.name}" if progress.multi_stage else ""
            name = f"{self.run.job.output_name}{label}-{tag}"
            lora = self._lora(progress.network.kohya_state_dict(), name, global_step, step // progress.per_epoch)
        if with_state:
            save_state(self.run.state_dir, {
                "stage_index": progress.index, "stage_name": progress.stage.name, "step": step,
                "network": progress.network.state_dict(), "optimizer": progress.optimizer.state_dict(),
                "scheduler": progress.scheduler.state_dict(),
                "completed": {k: v.state_dict() for k, v in results.items()},
                "fingerprint": self.fingerprint, "session_id": self.metadata.session_id,
                "started": self.metadata.started, "params": params_are, "shapes": shape_settings(self.run.job),
                "global_batch": global_batch(self.run, progress.solo),
            })
            state_dir = self.run.state_dir
        self.events.emit(CheckpointWritten(step=global_step, lora=str(lora) if lora else None,
                                           state_dir=str(state_dir) if state_dir else None))

    def save_stage_result(self, suffix: str, network, global_step: int) -> None:
        """A stage's own LoRA (the copier's A, the differential's parts) as <name>-<suffix>."""
        if self.run.is_main:
            path = self._lora(network.kohya_state_dict(), f"{self.run.job.output_name}-{suffix}", global_step, 0)
            self.events.emit(CheckpointWritten(step=global_step, lora=str(path), state_dir=None))

    def save_result(self, tensors, global_step: int, per_epoch: int) -> None:
        if self.run.is_main:
            self._lora(tensors, self.run.job.output_name, global_step, global_step // max(1, per_epoch))
