"""Progress events: what the training loop tells the outside world, and to whom.

The loop emits event objects to any number of listeners (callables taking one event): the
progress bar, the log, TensorBoard, a JSON-lines file, a web UI. Every event has `.type` and
`to_dict()` (JSON-able, with "type" and "time" in unix seconds). Listeners only observe; a
listener that raises is logged once and dropped, so a broken UI never stops a training run.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable

log = logging.getLogger(__name__)


@dataclass
class Event:
    type: ClassVar[str] = "event"
    time: float = field(default_factory=time.time, kw_only=True)

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, **{k: _jsonable(v) for k, v in dataclasses.asdict(self).items()}}


def _jsonable(value):
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


@dataclass
class StageStarted(Event):
    type: ClassVar[str] = "stage_started"
    stage: str
    index: int  # 0-based position among the method's stages
    stages: int  # how many stages the method has
    steps: int  # optimizer steps in this stage
    start_step: int  # > 0 when resumed


@dataclass
class Step(Event):
    type: ClassVar[str] = "step"
    stage: str
    step: int  # 1-based, within the stage
    steps: int
    global_step: int  # 1-based, over all stages
    total_steps: int
    loss: float
    loss_avg: float  # exponential moving average (0.95)
    lr: float  # the first parameter group's
    steps_per_s: float
    eta_s: float  # for the whole run
    lrs: dict[str, float] = field(default_factory=dict)  # every parameter group's, by name


@dataclass
class Validation(Event):
    type: ClassVar[str] = "validation"
    stage: str
    step: int
    global_step: int
    loss: float


@dataclass
class SampleWritten(Event):
    type: ClassVar[str] = "sample_written"
    step: int  # global step
    paths: list[str]
    control: list[list[str] | None] | None = None  # per prompt: the control images an edit sample edited


@dataclass
class CheckpointWritten(Event):
    type: ClassVar[str] = "checkpoint_written"
    step: int  # global step
    lora: str | None  # the LoRA file written, if any
    state_dir: str | None  # the training state written, if any


@dataclass
class StageEnded(Event):
    type: ClassVar[str] = "stage_ended"
    stage: str
    seconds: float


@dataclass
class Stopped(Event):
    type: ClassVar[str] = "stopped"
    step: int  # global step
    state_dir: str | None


@dataclass
class Finished(Event):
    type: ClassVar[str] = "finished"
    lora: str | None


@dataclass
class Failed(Event):
    type: ClassVar[str] = "failed"
    error: str
    kind: str  # "user" (bad input, stopped on purpose) or "internal" (a bug)


Listener = Callable[[Event], None]


class EventBus:
    """Delivers each event to every listener, in order."""

    def __init__(self, listeners: Iterable[Listener] = ()):
        self.listeners = list(listeners)

    def emit(self, event: Event) -> None:
        for listener in list(self.listeners):
            try:
                listener(event)
            except Exception:  # a listener must not end the run; its failure is reported once
                log.exception("progress listener %r failed and was removed", listener)
                self.listeners.remove(listener)

    def close(self) -> None:
        for listener in self.listeners:
            close = getattr(listener, "close", None)
            if close is not None:
                close()
