"""Training, as an outline: prepare -> take the lock -> cache -> run the method's stages -> save the result.

The parts: run.py (processes, model, presets, data), stages.py (the step loop of each stage),
batches.py (deterministic batches), schedule.py (when to sample and save), checkpoint.py (what
is saved), metadata.py (what the files say), sampling.py, lock.py, stop.py, events.py (progress
for listeners). Nothing here knows a method or a stage by name.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import time
from pathlib import Path

import numpy as np

from .. import validate
from ..errors import TrainingStopped, UserError
from ..statefile import load_state
from .checkpoint import Checkpointer, check_resumable
from .curve import LossCurve
from .distributed import is_peer_lost
from .events import EventBus, Failed, Finished, Listener
from .listeners import LogLines, ProgressBar, TensorBoard
from .lock import OutputLock
from .metadata import RunMetadata, job_fingerprint
from .run import prepare
from .sampling import Samples
from .schedule import OnDemand, SaveSchedule, signals_on_demand
from .stages import StageRunner
from .stop import StopRequest, signals_request
from .validation import ValidationReport, Validator

log = logging.getLogger(__name__)


def train(job, resume: str | None = None, ignore_lock: bool = False, listeners: list[Listener] = (),
          stop: StopRequest | None = None) -> Path | None:
    """Train a LoRA for `job`; returns the saved file (None on non-main processes).

    `listeners` receive progress events (train/events.py) besides the progress bar, the log and
    TensorBoard; `stop.request()` (any thread) or SIGINT/SIGTERM save the LoRA and the state and end
    with TrainingStopped; `resume` ("auto" or a state folder) continues such a run exactly.
    """
    stop = stop or StopRequest()
    on_demand = OnDemand()  # "sample now" / "save now": SIGUSR1 / SIGUSR2
    events = EventBus(listeners)
    try:
        validate.job(job, getattr(job, "_source", None))  # every value, path and prompt, before anything is loaded
        # The lock first, held to the end: the output-exists check in prepare() and every write happen under it,
        # so a second run cannot pass the check, wait, and then replace this run's LoRA.
        main = int(os.environ.get("RANK", "0")) == 0
        with OutputLock(Path(job.output_dir), job.output_name, ignore_lock) if main else contextlib.nullcontext(), \
                signals_request(stop), signals_on_demand(on_demand):
            state_dir = Path(job.output_dir) / f"{job.output_name}-state" if resume == "auto" else resume
            state = load_state(state_dir) if state_dir else None  # a state that cannot be resumed stops here
            if state is not None:
                check_resumable(state, job, state_dir)
            run = prepare(job, resume)
            # a disk cache is written once, by the main process; the others then read it
            with run.accelerator.main_process_first() if job.cache_latents_to_disk else contextlib.nullcontext():
                run.data.cache_latents(run.model, run.out_dir / "latent_cache" if job.cache_latents_to_disk else None,
                                       encode=job.cache_latents or job.cache_latents_to_disk)
            if state is not None and state.get("fingerprint") != job_fingerprint(job):
                log.warning("resuming with changed settings; the result will differ from an uninterrupted run")
            started = float(state["started"]) if state else time.time()
            session_id = int(state["session_id"]) if state else int(np.random.SeedSequence().entropy % 2**31)
            validator = Validator.for_run(run)
            events.listeners = default_listeners(job, run.out_dir, started) + list(listeners) if run.is_main else []
            if validator is not None and run.is_main:
                events.listeners.append(ValidationReport(run.out_dir / "sample" / f"{job.output_name}_validation.png"))
            stages = run.method.stages(run.data_sizes())
            metadata = RunMetadata(job, run.model, run.data, run.method, stages, started, session_id)
            checkpointer = Checkpointer(run, metadata, events, job_fingerprint(job))
            prompts = _sample_prompts(job)
            # a request seen by one process alone would send the ranks different ways
            schedule = SaveSchedule(job, prompts, sum(s.steps for s in stages), on_demand if run.world == 1 else None)
            samples = Samples(run, prompts, events)
            runner = StageRunner(run, stages, state, checkpointer, schedule, samples, events, stop, validator)
            results = runner.run_all()

            final = run.method.finalize(results)
            global_step, per_epoch = runner.total_steps, runner.last.per_epoch if runner.last else 1
            checkpointer.save_result(final, global_step, per_epoch)
            if run.is_main and schedule.sample_at_end():
                samples.write_result(final, list(results.values()), global_step)
            if schedule.state_at_end() and runner.last is not None:
                checkpointer.save(runner.last, results, runner.last.stage.steps, None, with_state=True)
            for net in results.values():
                net.remove()
            for preset in run.presets:
                preset.unfuse()
            run.accelerator.wait_for_everyone()
        if not run.is_main:
            return None
        events.emit(Finished(lora=str(run.final_path)))
        return run.final_path
    except BaseException as e:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not isinstance(e, UserError) and is_peer_lost(e):
            e = TrainingStopped(f"another process of this run ended ({' '.join(str(e).split())[:120]}); this one "
                                f"stopped too; saved files and the last state in {job.output_dir} are intact "
                                "(continue with --resume)")
            events.emit(Failed(error=str(e), kind="internal"))
            raise e from None
        if isinstance(e, TrainingStopped) and stop.requested:
            e.requested = True
        else:
            events.emit(Failed(error=str(e) or type(e).__name__, kind="user" if isinstance(e, (UserError, KeyboardInterrupt)) else "internal"))
        raise
    finally:
        events.close()


def default_listeners(job, out_dir: Path, started: float) -> list[Listener]:
    """The progress bar, log lines, the loss curve (<output_name>-loss.png beside the LoRA) and TensorBoard
    (log_with) in <logging_dir>/<output_name>_<start time>."""
    listeners: list[Listener] = [ProgressBar(), LogLines(),
                                 LossCurve(out_dir / f"{job.output_name}-loss.png", f"{job.output_name}: training loss")]
    if job.log_with == "tensorboard":
        run_name = f"{job.output_name}_{dt.datetime.fromtimestamp(started):%Y%m%d-%H%M%S}"
        listeners.append(TensorBoard(Path(job.logging_dir or out_dir / "logs") / run_name))
    return listeners


def _sample_prompts(job):
    if not job.sample_prompts:
        return []
    from ..prompts import load_prompt_file

    return load_prompt_file(job.sample_prompts)
