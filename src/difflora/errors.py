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
