"""Every case of the bad-input corpus (tests/bad_inputs) through the real CLI.

An error case: exit code 2, one line on stderr starting with "difflora: error: " that names the
file and the problem, and the output folder exactly as it was. A handled case: exit code 0, its
warning in the log, files already in the output folder untouched, and its own check.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "bad_inputs"))
from make_corpus import CASES, Workspace, readme_table  # noqa: E402


def _snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Every entry under `folder` (symlinks as themselves, never followed: cases hold loops) with its content."""
    out = {}
    for current, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = Path(current) / name
            if p.is_symlink():
                out[str(p.relative_to(folder))] = ("link " + os.readlink(p), p.lstat().st_mtime_ns)
            else:
                # a folder's own mtime moves when a lock or temporary file comes and goes: its entries are compared
                out[str(p.relative_to(folder))] = ((hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
                                                   if p.is_file() else ("dir", 0))
    return out


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_corpus_case(case, tmp_path, tiny_sd1_dir, run_cli, caplog, monkeypatch):
    ws = Workspace(tmp_path, tiny_sd1_dir)
    monkeypatch.chdir(tmp_path)
    args = case.build(ws)
    before = _snapshot(ws.out)
    everything = _snapshot(ws.root)  # the inputs too: a refused command reads, never writes
    model_before = _snapshot(tiny_sd1_dir)
    with caplog.at_level(logging.WARNING):
        code, out, err = run_cli(*args)
    warnings = " | ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    if case.outcome == "error":
        assert code == 2, (code, err, out)
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1, err
        line = lines[0]
        assert line.startswith("difflora: error: "), line
        assert case.names in line, (case.names, line)
        for needle in case.needles:
            assert needle.lower() in line.lower(), (needle, line)
        assert "Traceback" not in err
        assert _snapshot(ws.out) == before  # nothing written, nothing touched, no lock left behind
        assert _snapshot(ws.root) == everything  # no input changed, no report or caption written anywhere
    else:
        assert code == 0, err
        for needle in case.log:
            assert needle in warnings, (needle, warnings)
        after = _snapshot(ws.out)
        assert {k: v for k, v in after.items() if k in before} == before  # earlier results untouched
        if case.check:
            case.check(ws)
    assert _snapshot(tiny_sd1_dir) == model_before


def test_corpus_is_large_and_covers_both_outcomes():
    assert len(CASES) >= 210
    assert len({c.name for c in CASES}) == len(CASES)
    assert {c.outcome for c in CASES} == {"error", "ok"}
    for c in CASES:
        assert c.what
        if c.outcome == "error":
            assert c.names and c.needles, c.name


def test_readme_lists_every_case():
    readme = (Path(__file__).parent / "bad_inputs" / "README.md").read_text(encoding="utf-8")
    assert readme_table() in readme, "run: python tests/bad_inputs/make_corpus.py --readme"


# ---------------------------------------------------------------------------- security
class _Evil:
    """Unpickling this creates a marker file: proof that a pickle was loaded."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_is_never_loaded_unless_allowed(tmp_path, tiny_sd1_dir, run_cli, monkeypatch):
    import shutil

    import torch

    monkeypatch.chdir(tmp_path)
    ws = Workspace(tmp_path, tiny_sd1_dir)
    marker = tmp_path / "UNPICKLED"
    for name in ("evil.ckpt", "evil.pt", "evil.pth", "evil.bin", "evil.safetensors"):
        torch.save({"state_dict": _Evil(marker)}, tmp_path / name)
    pickled_model = tmp_path / "pickled_model"
    shutil.copytree(tiny_sd1_dir, pickled_model)
    for f in (pickled_model / "unet").glob("*.safetensors"):
        f.unlink()
    torch.save({"w": _Evil(marker)}, pickled_model / "unet" / "diffusion_pytorch_model.bin")

    attempts = {
        "train model": ["train", ws.job(model=f'"{tmp_path / "evil.ckpt"}"')],
        "train model folder": ["train", ws.job(model=f'"{pickled_model}"')],
        "network_weights": ["train", ws.job(network_weights=f'"{tmp_path / "evil.pt"}"')],
        "preset_loras": ["train", ws.job(extra=f'[[preset_loras]]\npath = "{tmp_path / "evil.pth"}"\n')],
        "generate model": ws.generate()[:2] + [tmp_path / "evil.pt"] + ws.generate()[3:],
        "generate lora": ws.generate("--lora", tmp_path / "evil.ckpt"),
        "inspect": ["inspect", tmp_path / "evil.bin"],
        "pickle named .safetensors": ["inspect", tmp_path / "evil.safetensors"],
        # allowed, but torch.load(weights_only=True) still refuses to run code
        "allow-pickle, weights_only": ws.generate("--allow-pickle")[:2] + [tmp_path / "evil.ckpt"] +
                                      ws.generate("--allow-pickle")[3:],
    }
    for what, args in attempts.items():
        code, _, err = run_cli(*args)
        assert code == 2, (what, err)
        assert err.startswith("difflora: error: ") and len(err.strip().splitlines()) == 1, (what, err)
        assert not marker.exists(), f"{what}: a pickle was loaded"
        if what not in ("pickle named .safetensors", "allow-pickle, weights_only"):
            assert "pickle" in err, (what, err)
    assert "weights_only" in run_cli(*attempts["allow-pickle, weights_only"])[2]


def test_an_absurd_safetensors_header_is_refused_before_allocating(tmp_path):
    import struct
    import tracemalloc

    from difflora.errors import UserError
    from difflora.fileio import MAX_HEADER_BYTES, load_safetensors
    from difflora.network.files import load_lora

    claims = {"2^60": 2**60, "2^64-1": 2**64 - 1, "just under the limit": MAX_HEADER_BYTES - 1,
              "over the limit": MAX_HEADER_BYTES + 1}
    for what, n in claims.items():
        path = tmp_path / "h.safetensors"
        path.write_bytes(struct.pack("<Q", n) + b'{"__metadata__": {}}')
        tracemalloc.start()
        for reader in (load_lora, load_safetensors):
            with pytest.raises(UserError, match=f"declared header of {n} bytes"):
                reader(path)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 1 << 20, (what, peak)  # nothing near the claimed size was allocated
    # a tensor claiming 2^60 elements inside a small file
    header = b'{"w": {"dtype": "F32", "shape": [1152921504606846976], "data_offsets": [0, 16]}}'
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    with pytest.raises(UserError):
        load_safetensors(path)


def _layout(root: Path) -> Path:
    """root/served/{cfg/sub/job.toml, data/1_x/, ds/dataset.toml, ds/imgs/, lora.safetensors}, root/outside/."""
    served = root / "served"
    for d in ("cfg/sub", "data/1_x", "ds/imgs", "out"):
        (served / d).mkdir(parents=True, exist_ok=True)
    (root / "outside").mkdir(exist_ok=True)
    (served / "lora.safetensors").write_bytes(b"x")
    (served / "ds" / "dataset.toml").write_text('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "imgs"\n')
    return served


def test_paths_in_a_config_resolve_against_its_own_folder(tmp_path, monkeypatch):
    from difflora.config import load_job

    served = _layout(tmp_path)
    job = served / "cfg" / "sub" / "job.toml"
    job.write_text('train_data_dir = "../../data"\noutput_dir = "../../out"\nnetwork_weights = "../../lora.safetensors"\n'
                   'logging_dir = "logs"\n[[preset_loras]]\npath = "../../lora.safetensors"\n', encoding="utf-8")
    elsewhere = tmp_path / "outside"
    monkeypatch.chdir(elsewhere)  # the working folder plays no part
    j = load_job(job)
    assert Path(j.train_data_dir) == served / "data"
    assert Path(j.output_dir) == served / "out"
    assert Path(j.network_weights) == served / "lora.safetensors"
    assert Path(j.preset_loras[0].path) == served / "lora.safetensors"
    assert Path(j.logging_dir) == served / "cfg" / "sub" / "logs"
    # a dataset_config's image_dir is relative to the dataset file, not to the job
    job.write_text('dataset_config = "../../ds/dataset.toml"\n', encoding="utf-8")
    j = load_job(Path("..") / "served" / "cfg" / "sub" / "job.toml")  # a relative job path, too
    assert Path(j.datasets[0].subsets[0].image_dir) == served / "ds" / "imgs"


@pytest.mark.parametrize("body,key", [
    ('train_data_dir = "../../../outside"\n', "train_data_dir"),
    ('train_data_dir = "{outside}"\n', "train_data_dir"),
    ('train_data_dir = "../../data"\noutput_dir = "{outside}"\n', "output_dir"),
    ('train_data_dir = "../../data"\nmodel = "../../link_out"\n', "model"),
    ('train_data_dir = "../../data"\nnetwork_weights = "../../file_link"\n', "network_weights"),
    ('train_data_dir = "../../data"\n[[preset_loras]]\npath = "../../../outside/p.safetensors"\n', "preset_loras[0].path"),
    ('train_data_dir = "../../data"\nlogging_dir = "~"\n', "logging_dir"),
    ('train_data_dir = "../../data"\nsample_prompts = "{served}2/prompts.txt"\n', "sample_prompts"),  # a prefix, not inside
    ('dataset_config = "../../ds/escape.toml"\n', "image_dir"),
    ('dataset_config = "{outside}/dataset.toml"\n', "dataset_config"),
    ('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "../../link_out"\n', "image_dir"),
])
def test_restrict_paths_to_refuses_paths_outside(tmp_path, body, key):
    import os

    from difflora.config import load_job
    from difflora.errors import UserError

    served = _layout(tmp_path)
    outside = tmp_path / "outside"
    os.symlink(outside, served / "link_out")
    (outside / "w.safetensors").write_bytes(b"x")
    os.symlink(outside / "w.safetensors", served / "file_link")
    (outside / "dataset.toml").write_text('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "."\n')
    (served / "ds" / "escape.toml").write_text('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "../../outside"\n')
    job = served / "cfg" / "sub" / "job.toml"
    job.write_text(body.format(outside=outside, served=served), encoding="utf-8")
    load_job(job)  # without a restriction every one of these loads
    with pytest.raises(UserError, match="outside the allowed folder") as e:
        load_job(job, restrict_paths_to=served)
    assert key in str(e.value) and str(served) in str(e.value)


def test_restrict_paths_to_accepts_paths_inside(tmp_path):
    import os

    from difflora.config import load_job
    from difflora.errors import UserError

    served = _layout(tmp_path)
    os.symlink(served / "data", served / "link_in")  # a symlink that stays inside is fine
    job = served / "cfg" / "sub" / "job.toml"
    job.write_text('train_data_dir = "../../link_in"\noutput_dir = "../../out"\nnetwork_weights = "../../lora.safetensors"\n'
                   f'logging_dir = "{served}/logs"\n[[preset_loras]]\npath = "../../lora.safetensors"\n',
                   encoding="utf-8")
    j = load_job(job, restrict_paths_to=served)
    assert j.model is None  # the embedded default model is not a user path
    job.write_text('dataset_config = "../../ds/dataset.toml"\n', encoding="utf-8")
    load_job(job, restrict_paths_to=served)
    # the config file itself must be inside, too
    outside_job = tmp_path / "outside" / "job.toml"
    outside_job.write_text(f'train_data_dir = "{served / "data"}"\n', encoding="utf-8")
    with pytest.raises(UserError, match="config file.*outside the allowed folder"):
        load_job(outside_job, restrict_paths_to=served)
