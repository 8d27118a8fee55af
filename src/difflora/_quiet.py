"""Keep the libraries we call from printing progress bars and advice meant for their own users."""

from __future__ import annotations

import logging
import warnings

_done = False


def quiet_libraries() -> None:
    global _done
    if _done:
        return
    _done = True
    try:
        import diffusers.utils.logging as dlog

        dlog.disable_progress_bar()
        dlog.set_verbosity_error()
    except Exception:  # pragma: no cover - optional
        pass
    try:
        import transformers.utils.logging as tlog

        tlog.disable_progress_bar()
        tlog.set_verbosity_error()
    except Exception:  # pragma: no cover
        pass
    warnings.filterwarnings("ignore", message=".*should be kept in float32.*")
    logging.getLogger("diffusers").setLevel(logging.ERROR)
