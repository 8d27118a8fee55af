"""A training run never loses or corrupts a result: the lock, a full disk, the NaN guard, resume checks.

- The output lock is taken before the output-exists check and held to the end: a second run that
  is held between its checks cannot replace the first run's LoRA (overwrite = false).
- A full disk while the lock is written leaves no lock, so the next run starts without --ignore-lock.
- A learning rate far too high stops training with one line; what is saved as "-last-good" is the
  last verified weights: it loads, and generates a normal (not black) image.
- --resume with a job whose shapes differ, or a damaged state, is refused naming what differs.
"""

from __future__ import annotations

import errno
import json
import os
import threading

import numpy as np
import pytest
from PIL import Image

from conftest import write_job
from difflora.errors import UserError
from difflora.network.files import load_lora


def _job(model, data, out, **extra) -> str:
    keys = {"model": json.dumps(str(model)), "train_data_dir": json.dumps(str(data)), "resolution": 16,
            "network_dim": 2, "network_alpha": 2, "learning_rate": 2e-3, "max_train_steps": 3,
            "output_dir": json.dumps(str(out)), "output_name": '"r"', "log_with": '"none"', "seed": 5}
    keys.update(extra)
    return "".join(f"{k} = {v}\n" for k, v in keys.items())


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("difflora: error: ") and "Traceback" not in err, err
    return lines[0]


def test_a_second_run_held_between_its_checks_cannot_replace_the_first_runs_lora(tmp_path, tiny_sd1_dir, faces16,
                                                                                  monkeypatch):
    """Run A is held just before saving its LoRA; run B starts, and is held (if it gets that far) after its
    checks, while A saves and ends. B must never write r.safetensors: it is refused by A's lock."""
    from difflora.config import load_job
    from difflora.train import checkpoint, loop
    from difflora.train import run as run_module

    out = tmp_path / "out"
    path = write_job(tmp_path / "job.toml", _job(tiny_sd1_dir, faces16, out))
    job_a, job_b = load_job(path), load_job(path, ["seed=7"])
    a_saving, a_may_save = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    real_save_result = checkpoint.Checkpointer.save_result

    def save_result(self, *args, **kwargs):
        if threading.current_thread() is thread_a:
            a_saving.set()
            assert a_may_save.wait(120)
        return real_save_result(self, *args, **kwargs)

    real_load_model = run_module.load_model
    b_reached_model = threading.Event()

    def load_model(*args, **kwargs):
        if threading.current_thread() is threading.main_thread():  # B, past its checks: A finishes meanwhile
            b_reached_model.set()
            a_may_save.set()
            thread_a.join(120)
        return real_load_model(*args, **kwargs)

    monkeypatch.setattr(checkpoint.Checkpointer, "save_result", save_result)
    monkeypatch.setattr(run_module, "load_model", load_model)

    def run_a():
        try:
            loop.train(job_a)
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    thread_a = threading.Thread(target=run_a)
    thread_a.start()
    try:
        assert a_saving.wait(180), "run A never reached its save"
        with pytest.raises(UserError, match="another training run") as e:
            loop.train(job_b)
        assert "r.lock" in str(e.value)
        assert not b_reached_model.is_set()  # refused at once, before loading anything
    finally:
        a_may_save.set()
        thread_a.join(180)
    assert not errors, errors
    lora = load_lora(out / "r.safetensors")
    assert lora.metadata["ss_seed"] == "5"  # run A's LoRA, not B's (seed 7)
    assert sorted(p.name for p in out.iterdir()) == ["r-loss.png", "r.safetensors"]  # and no lock left behind

    # after A ended, a run with overwrite = false is refused by the output check, taken under the lock
    with pytest.raises(UserError, match="already exists"):
        loop.train(job_b)
    assert load_lora(out / "r.safetensors").metadata["ss_seed"] == "5"


def test_disk_full_while_writing_the_lock_leaves_no_lock(tmp_path, tiny_sd1_dir, faces16, run_cli, monkeypatch):
    out = tmp_path / "out"
    job = write_job(tmp_path / "job.toml", _job(tiny_sd1_dir, faces16, out, max_train_steps=1))
    real_write = os.write

    def write(fd, data):
        real_write(fd, bytes(data[:5]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", write)
    code, _, err = run_cli("train", job)
    monkeypatch.undo()
    line = _one_line(err)
    assert code == 2 and "r.lock" in line and "no space left on device" in line and "nothing was left behind" in line
    assert list(out.iterdir()) == []  # no lock, no temporary file
    code, _, err = run_cli("train", job)  # no --ignore-lock needed
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["r-loss.png", "r.safetensors"]


def test_a_learning_rate_far_too_high_stops_and_last_good_generates_a_normal_image(tmp_path, tiny_sd1_dir, faces16,
                                                                                     run_cli):
    out = tmp_path / "out"
    job = write_job(tmp_path / "job.toml", _job(tiny_sd1_dir, faces16, out, learning_rate=1e30, max_train_steps=20))
    code, _, err = run_cli("train", job)
    line = _one_line(err)
    assert code == 2 and "non-finite" in line and "r-last-good.safetensors" in line, line
    step = int(line.split(" at step ")[1].split()[0])
    assert step <= 2, line  # the first update ruins the weights; the next step sees it
    saved = sorted(p.name for p in out.iterdir())
    assert saved == ["r-last-good.safetensors"], saved
    last_good = load_lora(out / "r-last-good.safetensors")  # load_lora refuses NaN/inf
    assert last_good.metadata["ss_steps"] == "0"  # the last weights that gave a finite loss: the start

    gen = tmp_path / "gen"
    code, _, err = run_cli("generate", "--model", tiny_sd1_dir, "--lora", out / "r-last-good.safetensors",
                           "--prompt", "a face", "--steps", "4", "--out", gen)
    assert code == 0, err
    img = np.asarray(Image.open(gen / "000_0.png"), dtype=np.float32)
    assert img.mean() > 20 and img.std() > 5  # not black, not flat


def test_learning_rate_inf_is_refused_before_anything_is_loaded(tmp_path, tiny_sd1_dir, faces16, run_cli,
                                                                monkeypatch):
    from difflora.train import run as run_module

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(run_module, "load_model", no_model)
    out = tmp_path / "out"
    job = write_job(tmp_path / "job.toml", _job(tiny_sd1_dir, faces16, out, learning_rate="inf"))
    code, _, err = run_cli("train", job)
    line = _one_line(err)
    assert code == 2 and "job.toml" in line and "learning_rate" in line and "finite" in line
    assert not out.exists() or list(out.iterdir()) == []


def test_resume_with_another_network_dim_is_refused_naming_it(tmp_path, tiny_sd1_dir, faces16, run_cli):
    out = tmp_path / "out"
    job = write_job(tmp_path / "job.toml", _job(tiny_sd1_dir, faces16, out, max_train_steps=4,
                                                save_state_every_n_steps=2))
    code, _, err = run_cli("train", job, "--set", "max_train_steps=2", "--set", "save_state=true")
    assert code == 0, err
    before = {p.name: p.read_bytes() for p in (out / "r-state").iterdir()}
    code, _, err = run_cli("train", job, "--resume", "--set", "network_dim=4")
    line = _one_line(err)
    assert code == 2 and "r-state" in line and "network_dim = 2 there, 4 in this job" in line
    assert {p.name: p.read_bytes() for p in (out / "r-state").iterdir()} == before
    code, _, err = run_cli("train", job, "--resume")  # the job it was made with continues
    assert code == 0, err


def test_resume_past_the_end_of_a_shorter_job_is_refused(tmp_path, tiny_sd1_dir, faces16, run_cli):
    """A state saved at step 4 resumed by a job of 2 steps (a shorter default since, or a typo) stops with
    one line instead of saving a LoRA that claims 2 steps."""
    out = tmp_path / "out"
    job = write_job(tmp_path / "job.toml", _job(tiny_sd1_dir, faces16, out, max_train_steps=4))
    code, _, err = run_cli("train", job, "--set", "save_state=true")
    assert code == 0, err
    lora = next(out.glob("*.safetensors")).read_bytes()
    code, _, err = run_cli("train", job, "--resume", "--set", "max_train_steps=2")
    line = _one_line(err)
    assert code == 2 and "r-state" in line and "state is at step 4" in line and "for 2 steps" in line, err
    assert next(out.glob("*.safetensors")).read_bytes() == lora
