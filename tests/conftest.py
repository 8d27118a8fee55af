"""Shared fixtures: tiny offline models, tiny face datasets, quiet and deterministic settings."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

# Tiny models and `pytest -n 2`: one thread per worker; more only oversubscribes the cores.
torch.set_num_threads(1)


def _write_faces(folder: Path, n: int, size: int, seed: int = 0) -> None:
    from difflora.toy import faces as F

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        a = F.sample_attributes(rng, held_out=None)
        Image.fromarray(F.render(a, seed * 1000 + i)).resize((size, size), Image.BILINEAR).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(F.caption(a), encoding="utf-8")


def _write_pairs(folder: Path, n: int, size: int, change=("eyes", "open", "closed"), seed: int = 0) -> None:
    from difflora.toy import faces as F

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        ab, aa, x, y = F.make_pair(seed * 1000 + i, *change)
        Image.fromarray(x).resize((size, size), Image.BILINEAR).save(folder / f"{i:03d}.png")
        Image.fromarray(y).resize((size, size), Image.BILINEAR).save(folder / f"{i:03d}_after.png")
        (folder / f"{i:03d}.txt").write_text(F.caption(ab), encoding="utf-8")
        (folder / f"{i:03d}_after.txt").write_text(F.caption(aa), encoding="utf-8")


@pytest.fixture(scope="session")
def tiny_sd1_dir(tmp_path_factory) -> Path:
    """A small SD1 model (2 blocks) saved as a diffusers folder; 16x16 images."""
    from difflora.toy.tiny import build_tiny_sd

    d = tmp_path_factory.mktemp("models") / "tiny_sd1"
    build_tiny_sd("sd1", layout="small").save(d)
    return d


@pytest.fixture(scope="session")
def sd15_layout_dirs(tmp_path_factory) -> dict[str, Path]:
    """Tiny SD1 and SD2 models with SD1.5's block layout (real LoRA names), diffusers folders."""
    from difflora.toy.tiny import build_tiny_sd

    base = tmp_path_factory.mktemp("models15")
    out = {}
    for variant in ("sd1", "sd2"):
        build_tiny_sd(variant, layout="sd15").save(base / variant)
        out[variant] = base / variant
    return out


@pytest.fixture(scope="session")
def faces16(tmp_path_factory) -> Path:
    """kohya layout: <root>/2_face/NNN.png + .txt, 16x16."""
    root = tmp_path_factory.mktemp("faces16")
    _write_faces(root / "2_face", 4, 16)
    return root


@pytest.fixture(scope="session")
def pairs16(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pairs16")
    _write_pairs(root, 4, 16)
    return root


def write_job(path: Path, body: str) -> Path:
    path.write_text(body, encoding="utf-8")
    return path


@pytest.fixture
def run_cli(capsys):
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    from difflora.cli import main

    def run(*args):
        code = main([str(a) for a in args])
        out = capsys.readouterr()
        return code, out.out, out.err

    return run
