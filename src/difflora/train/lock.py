"""`<output_dir>/<output_name>.lock`: a second run writing the same outputs refuses to start."""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

from ..errors import UserError
from ..fileio import create_exclusive, pid_alive

log = logging.getLogger(__name__)


class OutputLock:
    """The lock is created atomically with its content (fileio.create_exclusive). A lock whose process is gone (same host) is
    stale and taken over; a lock from another host is respected, since its process cannot be checked.
    With ignore=True (--ignore-lock) the run proceeds without taking the lock and leaves the other run's alone.
    """

    def __init__(self, out_dir: Path, name: str, ignore: bool):
        self.path = Path(out_dir) / f"{name}.lock"
        self.ignore = ignore
        self.held = False

    def _holder(self) -> tuple[bool, dict]:
        try:
            info = json.loads(self.path.read_text())
        except (ValueError, OSError):
            return True, {}  # unreadable: assume it is held
        if info.get("host") != socket.gethostname():
            return True, info
        return pid_alive(int(info.get("pid", -1))), info

    def __enter__(self):
        if self.ignore:
            log.warning("--ignore-lock: not taking %s", self.path)
            return self
        payload = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}).encode()
        for _ in range(2):
            if create_exclusive(self.path, payload):  # never half-written: a full disk leaves no lock
                self.held = True
                return self
            alive, info = self._holder()
            if alive:
                raise UserError(f"another training run (pid {info.get('pid', '?')} on {info.get('host', '?')}) is "
                                "writing to this folder; wait for it, choose another output_dir/output_name, or "
                                "pass --ignore-lock", path=self.path) from None
            log.warning("removing a stale lock left by pid %s", info.get("pid"))
            self.path.unlink(missing_ok=True)
        raise UserError("could not take the output lock (another run keeps creating it)", path=self.path)

    def __exit__(self, *exc):
        if self.held:
            self.path.unlink(missing_ok=True)
