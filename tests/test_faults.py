"""Faults during training: non-finite loss, kill -9, SIGTERM/SIGINT, a full disk, a second run, a crash mid-save.

What must hold every time: the process ends with a clear one-line error (exit code 2) or is
resumable, every LoRA and training state already on disk stays loadable, and a resumed run ends
with exactly the LoRA an uninterrupted run gives.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import write_job
from difflora.errors import UserError
from difflora.network.files import load_lora, save_lora
from difflora import statefile
from difflora.statefile import load_state, save_state

ENV = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1", PYTHONUNBUFFERED="1")


def _job(model, data, out, **extra) -> str:
    keys = {"model": json.dumps(str(model)), "train_data_dir": json.dumps(str(data)), "resolution": 16,
            "network_dim": 2, "network_alpha": 2, "learning_rate": 2e-3, "max_train_steps": 8, "train_batch_size": 1,
            "output_dir": json.dumps(str(out)), "output_name": '"r"', "log_with": '"none"', "seed": 5}
    keys.update(extra)
    return "".join(f"{k} = {v}\n" for k, v in keys.items())


def _tensors(path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def _equal(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("difflora: error: "), lines[0]
    return lines[0]


def _visible(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------- non-finite loss
@pytest.mark.parametrize("kind", ["loss", "gradient"])
def test_non_finite_loss_stops_with_the_last_good_lora_and_state(kind, tmp_path, tiny_sd1_dir, faces16, run_cli,
                                                                   monkeypatch):
    """A NaN at step 3 (injected into the denoiser's output): exit 2, the weights after step 2 are saved."""
    from difflora.models.sd.model import StableDiffusion

    out = tmp_path / "out"
    out.mkdir()
    (out / "previous.safetensors").write_bytes(b"an earlier result")
    body = _job(tiny_sd1_dir, faces16, out, max_train_steps=4, save_every_n_steps=1, save_state_every_n_steps=2)
    job = write_job(tmp_path / "job.toml", body)
    real_predict = StableDiffusion.predict
    calls = {"n": 0, "fault_at": 3}

    def predict(self, noisy, t, cond):
        pred = real_predict(self, noisy, t, cond)
        calls["n"] += 1
        if calls["n"] == calls["fault_at"]:
            if kind == "loss":
                return pred * float("nan")
            return pred + torch.sqrt(pred * 0.0)  # value unchanged, gradient 0 * inf = NaN
        return pred

    monkeypatch.setattr(StableDiffusion, "predict", predict)
    code, _, err = run_cli("train", job)
    assert code == 2
    line = _one_line(err)
    assert f"non-finite {kind} at step 3" in line
    assert "learning_rate" in line and "--resume" in line and "r-last-good.safetensors" in line
    assert sorted(p.name for p in out.iterdir()) == ["previous.safetensors", "r-last-good.safetensors", "r-state",
                                                     "r-step00000001.safetensors", "r-step00000002.safetensors"]
    assert (out / "previous.safetensors").read_bytes() == b"an earlier result"
    step1 = (out / "r-step00000001.safetensors").read_bytes()
    last_good = _tensors(out / "r-last-good.safetensors")
    assert all(torch.isfinite(v).all() for v in last_good.values())
    assert _equal(last_good, _tensors(out / "r-step00000002.safetensors"))  # the weights before the failing step
    state = load_state(out / "r-state")
    assert state["step"] == 2 and state["params"] == "before the failing step"
    load_lora(out / "r-last-good.safetensors")
    if kind == "gradient":
        return

    # the fault was transient: resuming from the saved state ends where an uninterrupted run ends
    calls["fault_at"] = -1
    code, _, err = run_cli("train", job, "--resume")
    assert code == 0, err
    assert (out / "r-step00000001.safetensors").read_bytes() == step1  # earlier saves untouched
    resumed = _tensors(out / "r.safetensors")
    shutil.rmtree(out)
    code, _, err = run_cli("train", job)
    assert code == 0, err
    assert _equal(resumed, _tensors(out / "r.safetensors"))


# ---------------------------------------------------------------------------- kill -9, SIGTERM, SIGINT
KILL_STEPS = 24


def _spawn(job: Path, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "difflora", "-q", "train", str(job), *args], cwd=job.parent,
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _saved_step(state_dir: Path) -> int:
    """The step of the state on disk (either copy), -1 while there is none."""
    for d in (state_dir, state_dir.with_name(state_dir.name + ".old")):
        try:
            return int(json.loads((d / "state.json").read_text())["tree"]["step"])
        except (OSError, ValueError, KeyError):
            continue
    return -1


def _wait_for_step(proc: subprocess.Popen, state_dir: Path, step: int, timeout: float = 240) -> None:
    end = time.time() + timeout
    while _saved_step(state_dir) < step:
        if proc.poll() is not None:
            raise AssertionError(f"training ended (rc {proc.returncode}) before step {step}: {proc.stderr.read()[-2000:]}")
        if time.time() > end:
            proc.kill()
            raise AssertionError(f"no state for step {step} after {timeout} s")
        time.sleep(0.005)


@pytest.fixture(scope="module")
def kill_setup(tmp_path_factory, tiny_sd1_dir, faces16):
    """The job every crash test runs, and the LoRAs of one uninterrupted run of it."""
    root = tmp_path_factory.mktemp("kill")

    def job_in(folder: Path, **extra) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        keys = dict(max_train_steps=KILL_STEPS, save_state_every_n_steps=1, save_every_n_steps=5)
        keys.update(extra)
        return write_job(folder / "job.toml", _job(tiny_sd1_dir, faces16, folder / "out", **keys))

    from difflora.cli import main

    ref = job_in(root / "reference")
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # in-process, one thread: bit for bit what the subprocesses compute
    try:
        assert main(["-q", "train", str(ref)]) == 0
    finally:
        torch.set_num_threads(n)
    ref_out = root / "reference" / "out"
    loras = {p.name: _tensors(p) for p in ref_out.glob("*.safetensors")}
    assert "r.safetensors" in loras and "r-step00000020.safetensors" in loras
    return job_in, loras


def _check_loadable(out: Path) -> None:
    """Every LoRA on disk (not the temp files of an interrupted write) and the state load."""
    for p in out.glob("*.safetensors"):
        load_lora(p)
    load_state(out / "r-state")


def test_kill_9_at_a_random_step_then_resume_gives_the_same_lora(kill_setup, tmp_path, run_cli, caplog):
    job_in, reference = kill_setup
    # one kill (each costs a whole run): after step 11, 128 ms into what follows (a later step or a save)
    rng = np.random.default_rng([1, 4])
    kill_after = int(rng.integers(1, KILL_STEPS - 6))
    job = job_in(tmp_path)
    out = tmp_path / "out"
    proc = _spawn(job)
    try:
        _wait_for_step(proc, out / "r-state", kill_after)
        time.sleep(float(rng.uniform(0, 0.15)))  # anywhere inside a later step or save
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "r.safetensors").exists()
    _check_loadable(out)
    for p in out.glob("r-step*.safetensors"):  # LoRAs saved before the kill are the uninterrupted run's
        assert _equal(_tensors(p), reference[p.name]), p.name
    killed_at = _saved_step(out / "r-state")
    assert killed_at >= kill_after

    with caplog.at_level(logging.WARNING):
        code, _, err = run_cli("train", job, "--resume")  # the dead run's lock is stale: taken over with a warning
    assert code == 0, err
    assert f"stale lock left by pid {proc.pid}" in caplog.text
    assert _equal(_tensors(out / "r.safetensors"), reference["r.safetensors"])
    for name, tensors in reference.items():
        assert _equal(_tensors(out / name), tensors), name
    assert not (out / "r.lock").exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_sigterm_and_sigint_save_and_exit_2_with_how_to_resume(sig, kill_setup, tmp_path, run_cli):
    job_in, reference = kill_setup
    job = job_in(tmp_path)
    out = tmp_path / "out"
    proc = _spawn(job if sig == signal.SIGTERM else job_in(tmp_path, max_train_steps=400))
    try:
        _wait_for_step(proc, out / "r-state", 3)
        if sig == signal.SIGINT:
            # meanwhile a second run on the same output folder refuses to start
            lock = json.loads((out / "r.lock").read_text())
            assert lock["pid"] == proc.pid
            code, _, err = run_cli("train", job)
            line = _one_line(err)
            assert code == 2 and "r.lock" in line and f"pid {proc.pid}" in line and "--ignore-lock" in line
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 2, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("difflora: stopped at step ") and "continue with --resume" in last, err  # not an error
    stopped_at = int(last.split("stopped at step ")[1].split()[0])
    assert f"signal {int(sig)}" in err  # the warning when the request arrived
    assert not (out / "r.lock").exists()
    state = load_state(out / "r-state")
    assert state["step"] == stopped_at and state["params"] == "current"
    interrupted = _tensors(out / "r-interrupted.safetensors")
    if stopped_at % 5 == 0:
        assert _equal(interrupted, reference[f"r-step{stopped_at:08d}.safetensors"])
    if sig == signal.SIGTERM:
        code, _, err = run_cli("train", job, "--resume")
        assert code == 0, err
        assert _equal(_tensors(out / "r.safetensors"), reference["r.safetensors"])


# ---------------------------------------------------------------------------- crash between the renames of save_state
def test_state_of_a_crash_between_the_two_renames_loads_from_old(tmp_path, monkeypatch):
    d = tmp_path / "r-state"
    save_state(d, {"step": 1, "w": torch.ones(3)})
    real_replace = os.replace

    def replace(src, dst):
        real_replace(src, dst)
        if Path(dst).name == "r-state.old":  # r-state -> r-state.old done; killed before tmp -> r-state
            raise KeyboardInterrupt

    monkeypatch.setattr(statefile.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        save_state(d, {"step": 2, "w": torch.zeros(3)})
    monkeypatch.setattr(statefile.os, "replace", real_replace)
    assert not d.exists() and (tmp_path / "r-state.old" / "state.json").exists()
    state = load_state(d)
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(3))
    save_state(d, {"step": 3, "w": torch.full((3,), 3.0)})  # the next save works and wins
    assert load_state(d)["step"] == 3


def test_resume_after_a_crash_between_the_renames_gives_the_same_lora(tmp_path, tiny_sd1_dir, faces16, run_cli,
                                                                       monkeypatch):
    out = tmp_path / "out"
    job = write_job(tmp_path / "job.toml", _job(tiny_sd1_dir, faces16, out, max_train_steps=5,
                                                save_state_every_n_steps=2))

    real_replace = os.replace

    def replace(src, dst):  # the 2nd state save (step 4): killed after moving step 2's state aside
        real_replace(src, dst)
        if Path(dst).name == "r-state.old":
            raise KeyboardInterrupt

    monkeypatch.setattr(statefile.os, "replace", replace)
    code, _, err = run_cli("train", job)
    assert code == 130, err
    monkeypatch.setattr(statefile.os, "replace", real_replace)
    assert not (out / "r-state").exists() and load_state(out / "r-state")["step"] == 2  # from r-state.old
    code, _, err = run_cli("train", job, "--resume")
    assert code == 0, err
    resumed = _tensors(out / "r.safetensors")
    shutil.rmtree(out)
    assert run_cli("train", job)[0] == 0
    assert _equal(resumed, _tensors(out / "r.safetensors"))


# ---------------------------------------------------------------------------- a full disk
def _enospc_on_write(monkeypatch):
    """Writes of temp files fail half-way with ENOSPC (as a full disk does)."""
    real = pathlib.Path.write_bytes

    def write_bytes(self, data):
        if self.name.endswith(".tmp"):
            real(self, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real(self, data)

    monkeypatch.setattr(pathlib.Path, "write_bytes", write_bytes)


def _enospc_on_fsync(monkeypatch):
    """The data went to the page cache; the disk is full when it is flushed."""
    def fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.parametrize("fault", [_enospc_on_write, _enospc_on_fsync], ids=["write", "fsync"])
def test_disk_full_on_save_keeps_the_previous_lora(fault, tmp_path, tiny_sd1_dir, faces16, run_cli, monkeypatch):
    out = tmp_path / "out"
    job = write_job(tmp_path / "job.toml", _job(tiny_sd1_dir, faces16, out, max_train_steps=2))
    assert run_cli("train", job)[0] == 0
    before = _snapshot(out)
    fault(monkeypatch)
    code, _, err = run_cli("train", job, "--set", "overwrite=true", "--set", "seed=6")
    monkeypatch.undo()
    line = _one_line(err)
    assert code == 2
    assert "r.safetensors" in line and "no space left on device" in line and "previous file" in line and "intact" in line
    assert _snapshot(out) == before  # the earlier LoRA byte for byte, no temp file left behind
    assert sorted(p.name for p in out.iterdir()) == ["r-loss.png", "r.safetensors"]  # the first run's LoRA and loss curve
    load_lora(out / "r.safetensors")


def test_disk_full_on_state_save_keeps_the_previous_state(tmp_path, tiny_sd1_dir, faces16, run_cli, monkeypatch):
    from difflora import fileio

    out = tmp_path / "out"
    job = write_job(tmp_path / "job.toml", _job(tiny_sd1_dir, faces16, out, save_state_every_n_steps=2))
    real_save = fileio.save_file
    count = {"n": 0}

    def save_file(tensors, filename, metadata=None):
        count["n"] += 1
        if count["n"] == 2:  # the state at step 4
            Path(filename).write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device", filename)
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(fileio, "save_file", save_file)
    code, _, err = run_cli("train", job)
    line = _one_line(err)
    assert code == 2
    assert "r-state" in line and "training state" in line and "no space left on device" in line and "intact" in line
    assert _visible(out) == ["r-state"] and sorted(p.name for p in out.iterdir()) == ["r-state"]  # no temp folder
    assert load_state(out / "r-state")["step"] == 2


def test_save_lora_over_an_existing_file_on_a_full_disk(tmp_path, monkeypatch):
    path = tmp_path / "a.safetensors"
    save_lora({"lora_unet_x.lora_down.weight": torch.ones(2, 4), "lora_unet_x.lora_up.weight": torch.ones(4, 2)}, path)
    before = path.read_bytes()
    _enospc_on_write(monkeypatch)
    with pytest.raises(UserError, match="no space left on device; the previous file .if any. is intact") as e:
        save_lora({"lora_unet_x.lora_down.weight": torch.zeros(2, 4), "lora_unet_x.lora_up.weight": torch.zeros(4, 2)},
                  path)
    assert "a.safetensors" in str(e.value)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]


# ---------------------------------------------------------------------------- the output lock
@pytest.fixture
def lock_job(tmp_path, tiny_sd1_dir, faces16):
    out = tmp_path / "out"
    out.mkdir()
    return write_job(tmp_path / "job.toml", _job(tiny_sd1_dir, faces16, out, max_train_steps=2)), out


def _write_lock(out: Path, pid: int, host: str | None = None) -> Path:
    lock = out / "r.lock"
    lock.write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(), "started": time.time()}))
    return lock


def test_a_live_lock_refuses_a_second_run(lock_job, run_cli):
    job, out = lock_job
    lock = _write_lock(out, os.getpid())  # a live process on this host holds it
    before = lock.read_bytes()
    code, _, err = run_cli("train", job)
    line = _one_line(err)
    assert code == 2 and "r.lock" in line and f"pid {os.getpid()}" in line and "--ignore-lock" in line
    assert lock.read_bytes() == before and _visible(out) == ["r.lock"]


def test_ignore_lock_trains_anyway(lock_job, run_cli):
    job, out = lock_job
    _write_lock(out, os.getpid())
    code, _, err = run_cli("train", job, "--ignore-lock")
    assert code == 0, err
    load_lora(out / "r.safetensors")


def test_a_stale_lock_is_taken_over_with_a_warning(lock_job, run_cli, caplog):
    job, out = lock_job
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _write_lock(out, dead.pid)
    with caplog.at_level(logging.WARNING):
        code, _, err = run_cli("train", job)
    assert code == 0, err
    assert f"removing a stale lock left by pid {dead.pid}" in caplog.text
    assert _visible(out) == ["r-loss.png", "r.safetensors"]  # and the lock is released at the end


def test_an_unreadable_lock_counts_as_held(lock_job, run_cli):
    job, out = lock_job
    (out / "r.lock").write_bytes(b"\xff\xfe garbage")
    code, _, err = run_cli("train", job)
    line = _one_line(err)
    assert code == 2 and "r.lock" in line and "--ignore-lock" in line


# ---------------------------------------------------------------------------- folder saves, model files, the umask
def _safetensors_disk_full(monkeypatch):
    """safetensors' Rust writer on a full disk (its message, measured on a 64 KiB tmpfs)."""
    import safetensors.torch
    from safetensors import SafetensorError

    def save_file(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)


@pytest.mark.parametrize("family,form", [("sdxl", "model.safetensors"), ("flux", "folder"), ("sd1", "folder")])
def test_disk_full_while_saving_a_model_is_one_line_and_leaves_nothing(family, form, tmp_path, monkeypatch):
    from difflora.fileio import atomic_path

    if family == "sdxl":
        from difflora.toy.tiny_sdxl import build_tiny_sdxl as build
    elif family == "flux":
        from difflora.toy.tiny_flux import build_tiny_flux as build
    else:
        from difflora.toy.tiny import build_tiny_sd as build
    model = build()
    out = tmp_path / "out"
    out.mkdir()
    target = out / form
    with atomic_path(out / "model.safetensors") as tmp:  # an earlier save that must survive
        tmp.write_bytes(b"an earlier model")
    if form == "model.safetensors":
        _safetensors_disk_full(monkeypatch)
    else:
        _enospc_on_fsync(monkeypatch)
        _safetensors_disk_full(monkeypatch)
    with pytest.raises(UserError, match="no space left on device") as e:
        model.save(target)
    monkeypatch.undo()
    assert "\n" not in str(e.value) and str(target) in str(e.value)
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]  # no temporary file or folder left
    assert (out / "model.safetensors").read_bytes() == b"an earlier model"


@pytest.mark.parametrize("family", ["flux", "sd1"])
def test_folder_saves_follow_the_umask_and_a_killed_saves_folder_is_cleaned(family, tmp_path):
    from difflora.fileio import clean_stale_temps

    if family == "flux":
        from difflora.toy.tiny_flux import build_tiny_flux as build
    else:
        from difflora.toy.tiny import build_tiny_sd as build
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = tmp_path / f".model.difflora-{int(dead.stdout)}-0000abcd.tmp"  # a folder save killed half-way
    (leftover / "transformer").mkdir(parents=True)
    old = os.umask(0o027)
    try:
        build().save(tmp_path / "model")
    finally:
        os.umask(old)
    assert not leftover.exists()
    modes = {p.relative_to(tmp_path).as_posix(): p.stat().st_mode & 0o777 for p in (tmp_path / "model").rglob("*")}
    assert (tmp_path / "model").stat().st_mode & 0o777 == 0o750
    wrong = {path: oct(mode) for path, mode in modes.items() if mode != (0o750 if (tmp_path / path).is_dir() else 0o640)}
    assert modes and not wrong, wrong
