"""The standard progress listeners: progress bar, log lines, TensorBoard, a JSON-lines file."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from .events import (CheckpointWritten, Event, Failed, Finished, SampleWritten, StageEnded, StageStarted, Step, Stopped,
                     Validation)

log = logging.getLogger(__name__)


class ProgressBar:
    """One tqdm bar per stage, with the running loss and learning rate."""

    def __init__(self, **tqdm_args):
        self.tqdm_args = tqdm_args
        self.bar = None

    def __call__(self, event: Event) -> None:
        if isinstance(event, StageStarted):
            from tqdm import tqdm

            self.close()
            self.bar = tqdm(total=event.steps, initial=event.start_step, desc=event.stage, dynamic_ncols=True,
                            **self.tqdm_args)
        elif isinstance(event, Step) and self.bar is not None:
            self.bar.update(event.step - self.bar.n)
            self.bar.set_postfix(loss=f"{event.loss_avg:.4f}", lr=f"{event.lr:.2e}", refresh=False)
        elif isinstance(event, (StageEnded, Stopped, Failed)):
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class LogLines:
    """Log lines for what is not a step: stages, samples, saves, the end."""

    def __call__(self, event: Event) -> None:
        if isinstance(event, StageStarted) and event.stages > 1:
            log.info("stage %d/%d: %s, %d steps", event.index + 1, event.stages, event.stage, event.steps)
        elif isinstance(event, StageStarted) and event.start_step:
            log.info("resuming stage %s at step %d", event.stage, event.start_step)
        elif isinstance(event, StageEnded):
            log.info("stage %s done in %.1f s", event.stage, event.seconds)
        elif isinstance(event, Validation):
            log.info("step %d: validation loss %.5f (%s)", event.global_step, event.loss, event.stage)
        elif isinstance(event, SampleWritten):
            log.info("step %d: wrote %d sample(s) to %s", event.step, len(event.paths),
                     Path(event.paths[0]).parent if event.paths else "-")
        elif isinstance(event, CheckpointWritten):
            saved = [p for p in (event.lora, event.state_dir) if p]
            log.info("step %d: saved %s", event.step, " and ".join(saved))
        elif isinstance(event, Stopped):
            log.warning("stopped at step %d; continue with --resume (state: %s)", event.step, event.state_dir)
        elif isinstance(event, Finished):
            log.info("saved %s", event.lora)


class TensorBoard:
    """loss/<stage>, lr/<stage>/<group> and loss/validation/<stage> scalars at the global step, in LOGDIR/RUN_NAME."""

    def __init__(self, logdir: str | os.PathLike):
        self.logdir = Path(logdir)
        self.writer = None

    def __call__(self, event: Event) -> None:
        if not isinstance(event, (Step, Validation)):
            return
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.logdir))
        if isinstance(event, Validation):
            self.writer.add_scalar(f"loss/validation/{event.stage}", event.loss, event.global_step)
            return
        self.writer.add_scalar(f"loss/{event.stage}", event.loss, event.global_step)
        for group, lr in (event.lrs or {"group": event.lr}).items():
            self.writer.add_scalar(f"lr/{event.stage}/{group}", lr, event.global_step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class JsonLines:
    """Appends each event as one JSON object per line to FILE, flushed per line (`difflora train --events`)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a", encoding="utf-8")  # appended live; not an atomic whole-file write

    def __call__(self, event: Event) -> None:
        self.file.write(json.dumps(event.to_dict()) + "\n")
        self.file.flush()

    def close(self) -> None:
        if not self.file.closed:
            self.file.close()
