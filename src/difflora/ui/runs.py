"""Runs: a queue persisted in the workspace, executed one at a time in a separate process.

Each run is a folder `runs/<id>/` holding `run.json` (its record, written atomically), the
command's inputs (`job.toml`, `prompts.txt`), `events.jsonl` (progress events appended by
`difflora train --events`), `log.txt` (the process's stdout and stderr) and its outputs.
Nothing lives only in the server's memory: after a page reload or a server restart the same
records are read back, and a run that was executing when the server went away is marked
"interrupted" and can be resumed (`--resume`).

Stop sends SIGTERM, on which training saves its LoRA and state and exits. The child also gets
SIGTERM when the server process dies (PR_SET_PDEATHSIG), so a killed server leaves a saved state
behind rather than an orphan that keeps writing.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import UserError
from ..fileio import write_json_atomic

log = logging.getLogger(__name__)

QUEUED, RUNNING, STOPPING = "queued", "running", "stopping"
FINISHED, STOPPED, FAILED, INTERRUPTED, CANCELLED = "finished", "stopped", "failed", "interrupted", "cancelled"
ACTIVE = (RUNNING, STOPPING)
RESUMABLE = (STOPPED, INTERRUPTED, FAILED)


@dataclass
class Run:
    id: str
    kind: str  # "train" or "eval"
    title: str
    argv: list[str]  # arguments after `python -m difflora`
    status: str = QUEUED
    created: float = field(default_factory=time.time)
    started: float | None = None
    ended: float | None = None
    pid: int | None = None
    returncode: int | None = None
    error: str | None = None
    result: str | None = None  # the LoRA (train) or the results folder (eval)
    resume: bool = False
    attempts: int = 0
    info: dict = field(default_factory=dict)  # page-specific: sample grid layout, eval task, ...

    @classmethod
    def from_dict(cls, d: dict) -> "Run":
        """A run record read back; ValueError naming the first field of the wrong type (a damaged record)."""
        if not isinstance(d, dict):
            raise ValueError("not a JSON object")
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        for name, value in known.items():
            kinds = _FIELD_TYPES[name]
            if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
                raise ValueError(f"field {name!r} holds {type(value).__name__} {str(value)[:40]!r}")
        if not all(isinstance(a, str) for a in known.get("argv", [])):
            raise ValueError("field 'argv' holds a value that is not a string")
        return cls(**known)


_NUMBER = (int, float)
_FIELD_TYPES = {"id": (str,), "kind": (str,), "title": (str,), "argv": (list,), "status": (str,),
                "created": _NUMBER, "started": (*_NUMBER, type(None)), "ended": (*_NUMBER, type(None)),
                "pid": (int, type(None)), "returncode": (int, type(None)), "error": (str, type(None)),
                "result": (str, type(None)), "resume": (bool,), "attempts": (int,), "info": (dict,)}


def new_run_id(title: str) -> str:
    from .workspace import safe_name

    return time.strftime("%Y%m%d-%H%M%S") + "-" + safe_name(title)[:40] + "-" + uuid.uuid4().hex[:4]


class RunStore:
    """Run records in `<workspace>/runs/<id>/run.json`."""

    def __init__(self, runs_dir: Path):
        self.dir = runs_dir
        self.lock = threading.RLock()

    def folder(self, run_id: str) -> Path:
        if "/" in run_id or "\\" in run_id or run_id.startswith(".") or not run_id:
            raise UserError(f"not a run id: {run_id!r}")
        return self.dir / run_id

    def save(self, run: Run) -> None:
        with self.lock:
            write_json_atomic(self.folder(run.id) / "run.json", asdict(run))

    def get(self, run_id: str) -> Run:
        path = self.folder(run_id) / "run.json"
        try:
            return Run.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            raise UserError("no such run", path=path.parent) from None
        except (ValueError, TypeError) as e:
            raise UserError(f"damaged run record ({e})", path=path) from None

    def all(self) -> list[Run]:
        runs = []
        for p in sorted(self.dir.glob("*/run.json")):
            try:
                runs.append(self.get(p.parent.name))
            except UserError as e:
                log.warning("%s", e)
        return sorted(runs, key=lambda r: r.created, reverse=True)

    def update(self, run_id: str, **changes) -> Run:
        with self.lock:
            run = self.get(run_id)
            for k, v in changes.items():
                setattr(run, k, v)
            self.save(run)
            return run


def queue_position(runs: list[Run], run_id: str) -> int | None:
    """1 for the next queued run to start, 2 for the one after, ...; None for a run that is not queued."""
    queued = sorted((r for r in runs if r.status == QUEUED), key=lambda r: r.created)
    return next((i for i, r in enumerate(queued, 1) if r.id == run_id), None)


def status_text(runs: list[Run], run: Run) -> str:
    """A run's status as the pages show it: a queued run says where it is in the queue."""
    position = queue_position(runs, run.id)
    if position is None:
        return run.status
    ahead = position - 1 + sum(r.status in ACTIVE for r in runs)
    return f"queued ({'next' if not ahead else f'{ahead} run(s) ahead'})"


def default_run(runs: list[Run]) -> Run | None:
    """The run a page shows first: the one training now, else the next queued, else the newest."""
    for wanted in (ACTIVE, (QUEUED,)):
        found = sorted((r for r in runs if r.status in wanted), key=lambda r: r.created)
        if found:
            return found[0]
    return runs[0] if runs else None


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _alive(pid: int | None, run_dir: Path) -> bool:
    """Is `pid` still this run's process (not a reused pid)?"""
    if not pid:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False
    return str(run_dir) in cmdline


class Runner:
    """Starts queued runs one at a time and follows them to their end."""

    def __init__(self, store: RunStore, workspace_root: Path, poll_s: float = 0.3):
        self.store = store
        self.root = workspace_root
        self.poll_s = poll_s
        self.proc: subprocess.Popen | None = None
        self.current: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.recover()

    # -- lifecycle
    def recover(self) -> None:
        """Runs left executing by a previous server become "interrupted" (their process ended first)."""
        for run in self.store.all():
            if run.status not in ACTIVE:
                continue
            folder = self.store.folder(run.id)
            if _alive(run.pid, folder):
                os.kill(run.pid, signal.SIGTERM)  # saves its state and exits
                deadline = time.time() + 120
                while _alive(run.pid, folder) and time.time() < deadline:
                    time.sleep(0.2)
            self._finish(run, None, interrupted=True)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="difflora-ui-runner", daemon=True)
        self._thread.start()

    def shutdown(self, wait_s: float = 120) -> None:
        """Stop the current run (it saves its state) and mark it interrupted."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)  # no tick may settle the run while we do
        proc, run_id = self.proc, self.current
        if proc is not None:
            was_running = proc.poll() is None
            if was_running:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(wait_s)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            self._finish(self.store.get(run_id), proc.returncode, interrupted=was_running)

    # -- commands from the pages
    def submit(self, run: Run) -> Run:
        run.status = QUEUED
        self.store.save(run)
        return run

    def stop(self, run_id: str) -> Run:
        with self.store.lock:
            run = self.store.get(run_id)
            if run.status == QUEUED:
                return self.store.update(run_id, status=CANCELLED, ended=time.time())
            if run.status != RUNNING:
                raise UserError(f"run {run_id} is {run.status}, not running")
            run = self.store.update(run_id, status=STOPPING)
        if self.current == run_id and self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return run

    def request(self, run_id: str, what: str) -> None:
        """'sample' or 'save' now: the training serves it after its current step (SIGUSR1 / SIGUSR2)."""
        signals = {"sample": signal.SIGUSR1, "save": signal.SIGUSR2}
        run = self.store.get(run_id)
        if run.kind != "train" or run.status != RUNNING or self.current != run_id or self.proc is None \
                or self.proc.poll() is not None:
            raise UserError(f"run {run_id} is {run.status}; only a running training samples or saves on request")
        from .progress import read_events

        # before its loop starts the process has no handler yet, and SIGUSR1/2 would end it
        started = [e for e in read_events(self.store.folder(run_id) / "events.jsonl") if e.get("type") == "stage_started"
                   and e.get("time", 0) >= (run.started or 0) - 1]
        if not started:
            raise UserError("the run is still loading; ask again once its first step is logged")
        self.proc.send_signal(signals[what])

    def resume(self, run_id: str) -> Run:
        run = self.store.get(run_id)
        if run.kind != "train" or run.status not in RESUMABLE:
            raise UserError(f"run {run_id} is {run.status}; only a stopped, interrupted or failed training run resumes")
        return self.store.update(run_id, status=QUEUED, resume=True, error=None, returncode=None)

    # -- the loop
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._tick()
            except Exception:  # the server must outlive any one run
                log.exception("run queue")
            self._stop.wait(self.poll_s)

    def _tick(self) -> None:
        if self.proc is not None:
            code = self.proc.poll()
            if code is None:
                return
            run_id, self.proc, self.current = self.current, None, None
            self._finish(self.store.get(run_id), code)
        queued = [r for r in self.store.all() if r.status == QUEUED]
        if queued:
            self._launch(min(queued, key=lambda r: r.created))

    def _launch(self, run: Run) -> None:
        folder = self.store.folder(run.id)
        argv = [sys.executable, "-m", "difflora", *run.argv]
        if run.resume:
            argv.append("--resume")
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        with open(folder / "log.txt", "ab") as logf:
            logf.write(f"$ difflora {' '.join(argv[3:])}\n".encode())
            logf.flush()
            try:
                self.proc = subprocess.Popen(argv, cwd=folder, stdout=logf, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, env=env, preexec_fn=_die_with_parent)
            except OSError as e:
                self.store.update(run.id, status=FAILED, error=f"could not start: {e}", ended=time.time())
                return
        self.current = run.id
        self.store.update(run.id, status=RUNNING, pid=self.proc.pid, started=time.time(), ended=None,
                          attempts=run.attempts + 1)

    def _finish(self, run: Run, code: int | None, interrupted: bool = False) -> None:
        """Settle a run's status from its last event, exit code and log."""
        from .progress import read_events

        folder = self.store.folder(run.id)
        events = read_events(folder / "events.jsonl")
        last = next((e for e in reversed(events) if e.get("type") in ("finished", "stopped", "failed")), None)
        # events of an earlier attempt do not describe this one
        if last is not None and run.started and last.get("time", 0) < run.started - 1:
            last = None
        changes: dict = {"ended": time.time(), "returncode": code, "pid": None}
        if last and last["type"] == "finished":
            changes.update(status=FINISHED, result=last.get("lora"), error=None)
        elif interrupted:
            changes.update(status=INTERRUPTED, error="the server stopped during this run; resume it to continue")
        elif last and last["type"] == "stopped":
            changes.update(status=STOPPED, error=None)
        elif last and last["type"] == "failed":
            changes.update(status=FAILED, error=last.get("error") or "failed")
        elif code == 0:
            changes.update(status=FINISHED, error=None, result=run.info.get("expected_result"))
        else:
            changes.update(status=FAILED, error=failure_reason(code, folder / "log.txt"))
        self.store.update(run.id, **changes)


def failure_reason(code: int | None, log_path: Path) -> str:
    """The CLI's one-line error from the log, or what killed the process."""
    tail = log_tail(log_path, 40)
    for line in reversed(tail):
        if line.startswith("difflora: error:"):
            return line[len("difflora: error:"):].strip()
    if code is not None and code < 0:
        name = signal.Signals(-code).name
        hint = " (out of memory?)" if -code == signal.SIGKILL else ""
        return f"the process was killed by {name}{hint}"
    last = next((l for l in reversed(tail) if l.strip()), "")
    return f"exit code {code}: {last.strip()[:300]}"


def log_tail(path: Path, n: int = 30) -> list[str]:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 64 * 1024))
            text = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    # tqdm redraws with carriage returns; keep the latest state of each line
    lines = [l.rsplit("\r", 1)[-1] for l in text.replace("\r\n", "\n").split("\n")]
    return [l for l in lines if l.strip()][-n:]
