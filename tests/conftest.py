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


def watch_placement(monkeypatch) -> list[tuple[str, object]]:
    """The order in which train.run.prepare's model moves and encodes, recorded as it happens:
    ("encode", prompts) for each text-encoder call, ("denoiser", device) and ("te", device) for each move of the
    denoiser or a text encoder to a device, ("drop", None) when the model frees its text encoders."""
    import difflora.train.run as run_module

    events: list[tuple[str, object]] = []
    real_load = run_module.load_model

    def spy_moves(kind: str, module) -> None:
        real_to = module.to

        def to(*args, **kwargs):
            device = kwargs.get("device", args[0] if args else None)
            if device is not None and not isinstance(device, torch.dtype):
                events.append((kind, torch.device(device)))
            return real_to(*args, **kwargs)

        module.to = to

    def load(*args, **kwargs):
        model = real_load(*args, **kwargs)
        spy_moves("denoiser", model.denoiser)
        for te in model.text_encoders.values():
            spy_moves("te", te)
        real_encode, real_drop = model.encode_prompts, model.drop_text_encoders

        def encode(prompts, *a, **k):
            if not model.text_encoders_dropped:  # (afterwards the model answers from its table)
                events.append(("encode", list(prompts)))
            return real_encode(prompts, *a, **k)

        def drop(*a, **k):
            events.append(("drop", None))
            return real_drop(*a, **k)

        model.encode_prompts, model.drop_text_encoders = encode, drop
        return model

    monkeypatch.setattr(run_module, "load_model", load)
    return events


def check_encoded_first(events, captions: set[str]) -> int:
    """With cached text-encoder outputs: every caption was encoded, by the text encoders moved to the device,
    before the denoiser first moved to the device, and the text encoders never ran again. Returns the index of
    the denoiser's move."""
    moved = next(i for i, (kind, _) in enumerate(events) if kind == "denoiser")
    encodes = [i for i, (kind, _) in enumerate(events) if kind == "encode"]
    assert encodes and max(encodes) < moved, events
    te_moves = [i for i, (kind, _) in enumerate(events) if kind == "te"]
    assert te_moves and min(te_moves) < min(encodes), events  # to the device for encoding
    encoded = {p for kind, prompts in events[:moved] if kind == "encode" for p in prompts}
    assert captions | {""} <= encoded, captions - encoded
    return moved


def pytest_collection_modifyitems(session, config, items):
    """Modules with a test marked `slow` run first, each module's tests kept together and in order (its module
    fixtures are built once): under `pytest -n 2` a minutes-long test collected last would otherwise run alone on
    one worker after the other has finished."""
    has_slow = {item.module.__name__ for item in items if item.get_closest_marker("slow") is not None}
    items.sort(key=lambda item: item.module.__name__ not in has_slow)  # stable: the rest keep collection order
