"""Cooperative stop: the loop saves the LoRA and the state after the current step, then ends.

`StopRequest.request()` may be called from any thread (a UI's stop button); SIGINT/SIGTERM call
the same request while training runs. A second Ctrl-C (SIGINT) stops at once (KeyboardInterrupt); a repeated
SIGTERM does not, so a supervisor that dies after asking (a UI server: PR_SET_PDEATHSIG) cannot cut the save short.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading

log = logging.getLogger(__name__)


class StopRequest:
    def __init__(self):
        self._event = threading.Event()
        self.reason: str | None = None

    def request(self, reason: str = "requested") -> None:
        if not self._event.is_set():
            self.reason = reason
            log.warning("stop %s: saving after this step", reason)
        self._event.set()

    @property
    def requested(self) -> bool:
        return self._event.is_set()


@contextlib.contextmanager
def signals_request(stop: StopRequest):
    """While inside, SIGINT/SIGTERM request `stop` (a second one interrupts at once). Main thread only."""

    def handle(signum, frame):
        if stop.requested:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return  # already stopping: let the save finish
        stop.request(f"requested by signal {signum}")

    with signal_handlers({signal.SIGINT: handle, signal.SIGTERM: handle}):
        yield stop


@contextlib.contextmanager
def signal_handlers(handlers: dict):
    """`handlers` installed while inside, the previous ones back after; outside the main thread nothing is
    installed (the caller's thread owns signals)."""
    old = {}
    for sig, handler in handlers.items():
        try:
            old[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread
            pass
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
