"""The project's own error type.

A `UserError` is a problem with what the user gave us (a file, a key, a value). The CLI
prints it as one line and exits with code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os


class UserError(Exception):
    """Bad input. `str(e)` is the whole one-line message shown to the user."""

    exit_code = 2

    def __init__(self, message: str, path: str | os.PathLike | None = None, hint: str | None = None):
        text = " ".join(str(message).split())  # one line, always
        if path is not None:
            text = f"{os.fspath(path)}: {text}"
        if hint:
            text = f"{text} ({' '.join(hint.split())})"
        super().__init__(text)
        self.path = None if path is None else os.fspath(path)


class TrainingStopped(UserError):
    """Training stopped on purpose (non-finite loss, interrupted); what was saved is intact."""

    requested = False  # the user asked for the stop (a signal, a UI's button): not an error


# Failures of the machine or of a library, not of a file: loaders that turn a library's exception about a file
# into a UserError let these through (the CLI: one line, exit 1, -v for the traceback).
_INTERNAL = (MemoryError, ImportError, AttributeError, NotImplementedError, AssertionError, RecursionError)


def is_internal_failure(e: BaseException) -> bool:
    """Whether an exception raised while reading a user's file is ours or the machine's (memory ran out, a CUDA
    error, a library missing or broken) rather than a sign that the file is wrong."""
    text = str(e).lower()
    return isinstance(e, _INTERNAL) or "out of memory" in text or "cuda error" in text  # torch's OOM: RuntimeError
