"""Running a short difflora command (generate, merge, inspect, ...) for a page and reporting its result."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ..errors import UserError


def run_cli(argv: list[str], cwd: Path, timeout_s: float = 900) -> str:
    """stdout of `python -m difflora ARGV`; its one-line error as a UserError when it fails."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    try:
        done = subprocess.run([sys.executable, "-m", "difflora", "-q", *argv], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise UserError(f"`difflora {argv[0]}` took longer than {timeout_s:.0f} s and was stopped") from None
    if done.returncode != 0:
        lines = [l for l in done.stderr.splitlines() if l.strip()]
        error = next((l for l in reversed(lines) if l.startswith("difflora: error:")), None)
        raise UserError(error[len("difflora: error:"):].strip() if error else
                        f"`difflora {argv[0]}` failed (exit {done.returncode}): {lines[-1] if lines else ''}")
    return done.stdout.strip()
