"""The top-level error guard, and file handling that never loses or corrupts a result.

The guard: an exception that escapes a command is one line naming the command and its file,
exit code 1 (-v adds the traceback); the line starts on a fresh line after a progress bar; a
reader closing our stdout ends us quietly. Files: created as the umask says, temporary files of
a killed save cleaned at the next run, a lock-style exclusive file never left half-written by a
full disk, and results holding NaN/inf refused, naming the module.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from difflora import fileio
from difflora.errors import UserError
from difflora.network.files import load_lora, save_lora

TINY_LORA = {"lora_unet_x.lora_down.weight": torch.ones(2, 4), "lora_unet_x.lora_up.weight": torch.ones(4, 2),
             "lora_unet_x.alpha": torch.tensor(2.0)}


# ---------------------------------------------------------------------------- the guard
def _boom(*args, **kwargs):
    raise ZeroDivisionError("integer division or modulo by zero")


def test_an_escaping_exception_is_one_line_naming_command_and_file_exit_1(tmp_path, run_cli, monkeypatch):
    monkeypatch.setattr("difflora.commands.inspect.load_lora", _boom)
    code, out, err = run_cli("inspect", tmp_path / "x.safetensors")
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0] == (f"difflora: error: internal error in difflora inspect ({tmp_path / 'x.safetensors'}): "
                        "ZeroDivisionError: integer division or modulo by zero "
                        "(run with -v for the traceback; please report it)")

    code, out, err = run_cli("-v", "inspect", tmp_path / "x.safetensors")
    assert code == 1
    assert err.startswith("Traceback (most recent call last):") and "in _boom" in err
    assert err.strip().splitlines()[-1].startswith("difflora: error: internal error in difflora inspect")


def test_an_os_error_names_its_file(tmp_path, run_cli, monkeypatch):
    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", "/some/where.bin")

    monkeypatch.setattr("difflora.commands.inspect.load_lora", denied)
    code, _, err = run_cli("inspect", tmp_path / "x.safetensors")
    assert code == 1
    assert err.startswith("difflora: error: /some/where.bin: internal error in difflora inspect") and \
        "PermissionError" in err and len(err.strip().splitlines()) == 1


def test_the_error_line_starts_on_a_fresh_line_after_a_progress_bar(tmp_path, run_cli, monkeypatch):
    from tqdm import tqdm

    def work(path):
        bar = tqdm(total=10, desc="resize", file=sys.stderr, disable=False)
        bar.update(3)  # the bar's line is open: no newline yet
        raise UserError("something wrong", path=path)

    monkeypatch.setattr("difflora.commands.inspect.load_lora", work)
    code, _, err = run_cli("inspect", tmp_path / "x.safetensors")
    assert code == 2
    head, sep, tail = err.partition("difflora: error: ")
    assert sep and "resize" in head and "3/10" in head, err
    assert head.endswith("\n"), repr(err)  # the bar's line was ended first
    assert tail == f"{tmp_path / 'x.safetensors'}: something wrong\n"


def test_argparse_errors_are_one_line_in_the_house_style(run_cli):
    code, out, err = run_cli("generate", "--steps", "ten")
    assert code == 2 and out == ""
    assert err == ("difflora: error: argument --steps: invalid int value: 'ten' "
                   "(see 'difflora generate --help')\n")


def test_a_closed_pipe_ends_quietly(tmp_path):
    """`difflora inspect X --all-metadata | head -1`: no traceback, no 'Exception ignored' at exit."""
    path = tmp_path / "big.safetensors"
    save_lora(TINY_LORA, path, {f"key{i:04d}": "x" * 400 for i in range(600)})  # ~250 KB printed: over a pipe buffer
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1] / "src"), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "difflora", "inspect", str(path), "--all-metadata"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert proc.stdout.readline().startswith(b"file:")
    proc.stdout.close()  # the reader goes away, as `head -1` does
    err = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert proc.returncode == 141, err
    assert "Traceback" not in err and "Exception ignored" not in err and "BrokenPipe" not in err, err


# ---------------------------------------------------------------------------- files
@pytest.mark.parametrize("umask,file_mode,dir_mode", [(0o022, 0o644, 0o755), (0o002, 0o664, 0o775),
                                                     (0o077, 0o600, 0o700)])
def test_files_and_folders_follow_the_umask(tmp_path, umask, file_mode, dir_mode):
    from difflora.statefile import save_state

    old = os.umask(umask)
    try:
        save_lora(TINY_LORA, tmp_path / "a.safetensors")
        fileio.write_text_atomic(tmp_path / "b.txt", "x")
        save_state(tmp_path / "r-state", {"step": 1, "w": torch.ones(2)})
    finally:
        os.umask(old)
    assert (tmp_path / "a.safetensors").stat().st_mode & 0o777 == file_mode
    assert (tmp_path / "b.txt").stat().st_mode & 0o777 == file_mode
    assert (tmp_path / "r-state").stat().st_mode & 0o777 == dir_mode
    assert (tmp_path / "r-state" / "state.json").stat().st_mode & 0o777 == file_mode


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_temporary_files_of_a_killed_save_are_cleaned_at_the_next_save(tmp_path, caplog):
    dead = _dead_pid()
    stale_file = tmp_path / f".r.safetensors.difflora-{dead}-0a1b2c3d.tmp"
    stale_file.write_bytes(b"half a LoRA")
    stale_dir = tmp_path / f".r-state.difflora-{dead}-0a1b2c3e.tmp"
    stale_dir.mkdir()
    (stale_dir / "tensors.safetensors").write_bytes(b"half a state")
    live = tmp_path / f".r.safetensors.difflora-{os.getppid()}-0a1b2c3f.tmp"  # a running process's save
    live.write_bytes(b"being written")
    other = tmp_path / ".notes.tmp"  # not one of ours
    other.write_bytes(b"someone else's")
    # what a killed save looks like: the temp name comes from the same function every save uses
    assert fileio._TEMP_NAME.match(fileio.temp_sibling(tmp_path / "r.safetensors").name)

    with caplog.at_level("INFO", logger="difflora.fileio"):
        save_lora(TINY_LORA, tmp_path / "r.safetensors")
    assert not stale_file.exists() and not stale_dir.exists()
    assert live.read_bytes() == b"being written" and other.read_bytes() == b"someone else's"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name, "r.safetensors"])
    assert f"left by an interrupted save (pid {dead})" in caplog.text
    load_lora(tmp_path / "r.safetensors")


def test_create_exclusive_on_a_full_disk_leaves_nothing(tmp_path, monkeypatch):
    lock = tmp_path / "r.lock"
    real_write = os.write

    def write(fd, data):
        real_write(fd, bytes(data[:3]))  # part of it reached the disk, then it was full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", write)
    with pytest.raises(UserError, match="no space left on device; nothing was left behind") as e:
        fileio.create_exclusive(lock, b'{"pid": 1}')
    assert str(lock) in str(e.value)
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []  # no lock, no temporary file
    assert fileio.create_exclusive(lock, b'{"pid": 2}') is True  # the next try takes it
    assert lock.read_bytes() == b'{"pid": 2}'
    assert fileio.create_exclusive(lock, b'{"pid": 3}') is False  # and it is exclusive
    assert lock.read_bytes() == b'{"pid": 2}' and [p.name for p in tmp_path.iterdir()] == ["r.lock"]


def test_create_exclusive_without_hard_links(tmp_path, monkeypatch):
    def no_link(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_link)
    assert fileio.create_exclusive(tmp_path / "r.lock", b"a") is True
    assert fileio.create_exclusive(tmp_path / "r.lock", b"b") is False
    assert (tmp_path / "r.lock").read_bytes() == b"a" and [p.name for p in tmp_path.iterdir()] == ["r.lock"]


# ---------------------------------------------------------------------------- finiteness where results are made
def test_save_lora_refuses_nan_and_fp16_overflow_naming_the_module(tmp_path):
    bad = dict(TINY_LORA, **{"lora_unet_y.lora_down.weight": torch.full((2, 4), 1e6),
                             "lora_unet_y.lora_up.weight": torch.ones(4, 2), "lora_unet_y.alpha": torch.tensor(2.0)})
    with pytest.raises(UserError, match="module lora_unet_y .*overflows to inf when saved as float16"):
        save_lora(bad, tmp_path / "a.safetensors", dtype=torch.float16)
    save_lora(bad, tmp_path / "a.safetensors", dtype=torch.bfloat16)  # bf16 holds 1e6
    nan = dict(TINY_LORA, **{"lora_unet_x.lora_up.weight": torch.tensor([[1.0, float("nan")]] * 4)})
    with pytest.raises(UserError, match="would hold NaN in module lora_unet_x"):
        save_lora(nan, tmp_path / "b.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]


def test_a_non_finite_image_is_refused_naming_the_module(tiny_sd1_dir, tmp_path):
    """Finite factors whose product overflows: the image would be all black; generate() says which module."""
    from difflora.generate import GenerationRequest, NonFiniteImage, generate
    from difflora.models import load_model
    from difflora.network.apply import network_from_file

    model = load_model(tiny_sd1_dir)
    tensors = {k: v.clone() for k, v in load_lora_tensors(model).items()}
    name = sorted(k for k in tensors if k.endswith(".lora_down.weight") and "unet" in k)[0][:-len(".lora_down.weight")]
    tensors[f"{name}.lora_up.weight"].fill_(1e20)
    tensors[f"{name}.lora_down.weight"].fill_(1e20)
    from safetensors.torch import save_file

    save_file(tensors, str(tmp_path / "huge.safetensors"))
    net = network_from_file(model, tmp_path / "huge.safetensors")
    req = GenerationRequest(prompts=["a face"], seeds=[0], steps=2)
    with pytest.raises(NonFiniteImage, match=f"LoRA module {name}: scale \\* lora_up @ lora_down overflows") as e:
        generate(model, [net], req)
    assert e.value.network == 0
    net.set_multiplier(0.0)  # the same network switched off: a finite image
    img = generate(model, [net], req)[0]
    assert img.std() > 0


def load_lora_tensors(model) -> dict[str, torch.Tensor]:
    from difflora.network.lora import LoRANetwork, NetworkSpec

    torch.manual_seed(0)
    net = LoRANetwork.create(model.lora_targets(), NetworkSpec(network_dim=2, network_alpha=1.0))
    return net.kohya_state_dict()
