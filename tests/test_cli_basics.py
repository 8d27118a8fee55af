"""--version, and -v showing difflora's debug lines but not the libraries'."""

from __future__ import annotations

import logging
import subprocess
import sys

import difflora
from difflora.cli import setup_logging


def test_version_prints_the_package_version():
    r = subprocess.run([sys.executable, "-m", "difflora", "--version"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == f"difflora {difflora.__version__}"


def test_verbose_is_difflora_debug_only():
    root, ours = logging.getLogger(), logging.getLogger("difflora")
    saved = (root.level, ours.level)
    try:
        setup_logging(verbose=True)
        assert logging.getLogger("difflora.train.loop").isEnabledFor(logging.DEBUG)
        for lib in ("diffusers.models", "transformers.modeling_utils", "accelerate.state", "PIL.PngImagePlugin"):
            assert not logging.getLogger(lib).isEnabledFor(logging.DEBUG), lib
        setup_logging()
        assert logging.getLogger("difflora.x").isEnabledFor(logging.INFO)
        assert not logging.getLogger("difflora.x").isEnabledFor(logging.DEBUG)
        setup_logging(quiet=True)
        assert not logging.getLogger("difflora.x").isEnabledFor(logging.INFO)
    finally:
        root.setLevel(saved[0])
        ours.setLevel(saved[1])
