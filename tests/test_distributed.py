"""Several processes on accelerate's engine (DDP over gloo on the CPU), on the tiny SD1 model.

Launched as users launch: `torchrun`, `accelerate launch --multi_gpu` (which starts CPU ranks through
torch.distributed.run on a machine without GPUs) and `accelerate launch --config_file FILE --cpu` with an MPI
hostfile in FILE (ranks through mpirun; without a hostfile accelerate starts one process, which is refused).
N processes at per-process batch b must train the LoRA one process trains at batch N*b. Tolerance: the inputs are
identical (tests/test_sdxl_train.py checks the split), but float sums run in another order (CPU kernels depend on
the batch size; DDP averages the gradients in its all-reduce instead of inside one batch mean): last-bit noise,
which SGD at a stable learning rate passes through (weights move by ~1e-1; measured 5e-8). That DDP itself works
the same for every family is the contract suite's part (one process there).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import _write_pairs, write_job
from difflora.config import load_job
from difflora.errors import UserError
from difflora.train.batches import batch_at, make_batch
from difflora.train.loop import train
from difflora.train.stages import StageRunner

pytestmark = pytest.mark.slow  # multi-process launches: started first under pytest -n 2

SRC = str(Path(__file__).resolve().parents[1] / "src")  # this checkout, for the launched processes too


def _env(tmp_path) -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1", DIFFLORA_TEST_RUN=str(tmp_path),
                PYTHONPATH=os.pathsep.join(p for p in (SRC, os.environ.get("PYTHONPATH", "")) if p))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(how: str, job: Path, *args: str, quiet: bool = True) -> list[str]:
    train_args = ["-m", "difflora", *(["-q"] if quiet else []), "train", str(job), *args]
    if how == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *train_args]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--main_process_port", str(_free_port()), "--mixed_precision", "no",
            "--dynamo_backend", "no", *train_args]


def _standard(tmp_path, tiny_sd1_dir, faces16, **keys) -> Path:
    body = {"model": f'"{tiny_sd1_dir}"', "train_data_dir": f'"{faces16}"', "resolution": 16, "network_dim": 4,
            "network_alpha": 4, "optimizer_type": '"SGD"', "learning_rate": 0.05, "max_train_steps": 6,
            "train_batch_size": 1, "output_dir": f'"{tmp_path / "out"}"', "log_with": '"none"', "seed": 3, **keys}
    return write_job(tmp_path / "job.toml", "".join(f"{k} = {v}\n" for k, v in body.items()))


def _one_process(job: Path, name: str, batch: int, **more) -> dict[str, torch.Tensor]:
    overrides = [f"train_batch_size={batch}", f"output_name='{name}'"] + [f"{k}={v}" for k, v in more.items()]
    return load_file(str(train(load_job(job, overrides))))


@contextlib.contextmanager
def _as_ranks(ranks: int):
    """One process computes, one after another, the micro-batches `ranks` processes compute side by side: run with
    gradient_accumulation_steps = ranks * a and the per-rank batch, its micro-batch m of a step is rank m // a's
    micro-batch m % a (the same global batch of a `ranks`-process order, the same slice and random draws). Its fp32
    gradient sum is then the processes' (by DDP) up to the order of the sum, whatever the precision of each
    micro-batch's forward and backward."""
    def per_rank(runner: StageRunner, sp, step: int, micro: int):
        run = runner.run
        accumulation = run.job.gradient_accumulation_steps // ranks
        rank, micro = divmod(micro, accumulation)
        epoch, global_batch = batch_at(run.data, step * accumulation + micro, ranks, sp.allowed)
        return make_batch(run.data, global_batch, rank, ranks, run.job, sp.index, step, micro, epoch,
                          sp.stage.timesteps, run.model)

    real, StageRunner._batch = StageRunner._batch, per_rank
    try:
        yield
    finally:
        StageRunner._batch = real


def _max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_two_processes_train_the_lora_of_one_process_at_the_same_global_batch(tmp_path, tiny_sd1_dir, faces16):
    """torchrun, with gradient accumulation (accelerate's accumulate: DDP's no_sync on the first micro-batch) and
    fsdp = true (the frozen U-Net's blocks sharded with FSDP2 over gloo; the LoRA whole on each process, saved
    once): the LoRA of one process to 1e-6; then `accelerate launch --cpu` (ranks through mpirun) the same way.
    `accelerate launch --multi_gpu` (DDP's static graph, no accumulation, no sharding) is the killed-rank test's."""
    job = _standard(tmp_path, tiny_sd1_dir, faces16, gradient_accumulation_steps=2)
    r = subprocess.run(_launch("torchrun", job, "--set", "output_name='two'", "--set", "fsdp=true", quiet=False),
                       cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("saved ") == 1  # the main process saves (and says so) once
    assert r.stderr.count("fsdp: the denoiser sharded over 2 processes (7 blocks and the rest)") == 1, r.stderr
    two = load_file(str(tmp_path / "out" / "two.safetensors"))
    one = _one_process(job, "one", 2)
    ups = [k for k in one if k.endswith("lora_up.weight")]
    assert max(one[k].abs().max().item() for k in ups) > 1e-3  # it trained
    assert _max_diff(two, one) < 1e-6
    single = _one_process(job, "single", 1)  # and it really ran as two ranks: one process at batch 1 ends elsewhere
    assert max((single[k] - one[k]).abs().max().item() for k in ups) > 1e-4

    # `accelerate launch --config_file FILE --num_processes 2 --cpu -m difflora train JOB`, FILE as `accelerate
    # config` writes it for this machine, multi-CPU, mpirun with a hostfile: accelerate starts the ranks through
    # mpirun (the test extra's mpich). Without --config_file, --cpu reads no config: one process, refused in
    # test_accelerate_cpu_launch_... (the hostfile on the command, --mpirun_hostfile, is the same path in accelerate).
    # fp32 with fsdp and gradient checkpointing (each block runs again in the backward, its weights gathered
    # again): the LoRA of one process to 1e-6 too.
    bin_dir = str(Path(sys.executable).parent)
    search = os.pathsep.join((bin_dir, os.environ.get("PATH", "")))
    if shutil.which("mpirun", path=search) is None:
        pytest.skip("no mpirun (the test extra's mpich) for `accelerate launch --cpu`")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost:2\n")  # MPICH's host:slots form
    config = tmp_path / "accelerate.yaml"
    config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_CPU\nuse_cpu: true\n"
                      "num_machines: 1\nnum_processes: 2\nmachine_rank: 0\nmixed_precision: 'no'\n"
                      f"main_process_port: {_free_port()}\nmpirun_config:\n  mpirun_hostfile: {hostfile}\n")
    r = subprocess.run([shutil.which("accelerate", path=search), "launch", "--config_file", str(config),
                        "--num_processes", "2", "--cpu", "-m", "difflora", "train", str(job),
                        "--set", "output_name='mpi'", "--set", "fsdp=true", "--set", "gradient_checkpointing=true"],
                       cwd=tmp_path, env=dict(_env(tmp_path), PATH=search), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("saved ") == 1
    assert r.stderr.count("fsdp: the denoiser sharded over 2 processes (7 blocks and the rest)") == 1, r.stderr
    assert _max_diff(load_file(str(tmp_path / "out" / "mpi.safetensors")), one) < 1e-6


def test_sharded_bf16_with_checkpointing_trains_the_lora_of_one_bf16_process(tmp_path, tiny_sd1_dir, faces16):
    """fsdp, mixed_precision = "bf16" (the frozen U-Net in bf16, sharded and gathered in bf16, under the CPU's
    autocast) and gradient_checkpointing composed on 2 processes (accelerate launch --multi_gpu, CPU ranks): the
    LoRA of one bf16 process that runs the two ranks' micro-batches one after another (_as_ranks), to 2.5% of the
    update (measured 0.84%). Not 1e-6: FSDP alone moves fp32 results by last bits (one step, fp32, 2 ranks with
    fsdp against _as_ranks: 1.1e-7 of the update; without fsdp, in bf16 too: exactly 0), and in bf16 a last-bit
    change of an activation or weight is a change at 2^-8 instead of 2^-23: x 2^15, so 3.7e-3 expected after one
    step, measured 3.0e-3, growing to 0.84% over the 6 steps."""
    job = _standard(tmp_path, tiny_sd1_dir, faces16, gradient_accumulation_steps=2)
    r = subprocess.run(_launch("accelerate", job, "--set", "output_name='bf16'", "--set", "fsdp=true",
                               "--set", "mixed_precision='bf16'", "--set", "gradient_checkpointing=true"),
                       cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    two = load_file(str(tmp_path / "out" / "bf16.safetensors"))
    # accelerate keeps one precision per Python process (its state is shared): a fresh one for bf16, and after
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        with _as_ranks(2):
            one_bf16 = _one_process(job, "one_bf16", 1, gradient_accumulation_steps=4, mixed_precision="'bf16'",
                                    gradient_checkpointing="true")
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    one = _one_process(job, "one", 2)
    ups = [k for k in one if k.endswith("lora_up.weight")]

    def apart(a: dict, b: dict) -> float:  # relative to b's update (the up weights start at zero)
        return (sum(((a[k] - b[k]) ** 2).sum() for k in ups) / sum((b[k] ** 2).sum() for k in ups)).sqrt().item()

    assert all(torch.isfinite(t).all() for t in two.values())
    assert apart(two, one_bf16) < 0.025
    assert apart(two, one) > 1e-3  # bf16 was in effect on the two processes


def _pids_of_run(tmp_path) -> dict[int, int]:
    """rank -> pid of the training processes this test started (their environment names the test's folder)."""
    out = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = dict(kv.split("=", 1) for kv in (proc / "environ").read_text().split("\0") if "=" in kv)
        except OSError:
            continue
        if env.get("DIFFLORA_TEST_RUN") == str(tmp_path) and "RANK" in env:
            out[int(env["RANK"])] = int(proc.name)
    return out


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the ranks through /proc")
def test_a_killed_rank_ends_the_run_and_its_state_resumes_with_another_process_count(tmp_path, tiny_sd1_dir,
                                                                                      faces16):
    """accelerate launch, 2 processes: rank 1 is killed after the state at step 2 was saved (the main process
    frozen meanwhile, so the run cannot end first). The main process ends with one line and the state stays
    intact; one process at the same global batch (2) resumes it to the LoRA an uninterrupted run makes, and one
    at another global batch is refused in one line."""
    job = _standard(tmp_path, tiny_sd1_dir, faces16, max_train_steps=20, save_state_every_n_steps=2,
                    output_name='"r"')
    proc = subprocess.Popen(_launch("accelerate", job), cwd=tmp_path, env=_env(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    state = tmp_path / "out" / "r-state"
    deadline = time.monotonic() + 300
    while not (state / "state.json").exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    pids = _pids_of_run(tmp_path)
    os.kill(pids[0], signal.SIGSTOP)
    os.kill(pids[1], signal.SIGKILL)
    os.kill(pids[0], signal.SIGCONT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0
    lines = [line for line in err.splitlines() if line.startswith("difflora:")]
    assert len(lines) == 1 and "another process of this run ended" in lines[0], err[-3000:]
    assert not (tmp_path / "out" / "r.safetensors").exists()
    saved_at = json.loads((state / "state.json").read_text())["tree"]["step"]
    assert 2 <= saved_at < 20

    with pytest.raises(UserError, match=r"cannot resume: the state was trained at a global batch of \[2\]"):
        train(load_job(job, ["train_batch_size=1"]), resume="auto")
    resumed = load_file(str(train(load_job(job, ["train_batch_size=2"]), resume="auto")))
    whole = _one_process(job, "whole", 2)
    assert _max_diff(resumed, whole) < 1e-6


def test_accelerate_cpu_launch_of_several_processes_is_refused(monkeypatch, run_cli, tmp_path, tiny_sd1_dir,
                                                               faces16):
    """`accelerate launch --cpu --num_processes 2` without an MPI hostfile starts one process with only the
    rendezvous address set (accelerate 1.x): one line naming what starts N ranks, nothing trained."""
    job = _standard(tmp_path, tiny_sd1_dir, faces16)
    for k in ("WORLD_SIZE", "RANK"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    code, _, err = run_cli("train", job)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "started only this one process" in err and "--mpirun_hostfile" in err and "--config_file" in err
    assert "torchrun" in err
    assert not (tmp_path / "out").exists()
    monkeypatch.delenv("MASTER_ADDR")  # `accelerate launch --cpu` of one process: trains
    assert run_cli("train", job, "--set", "max_train_steps=2")[0] == 0


@pytest.mark.parametrize("keys,message", [
    ({"fsdp": "true", "deepspeed": "true"}, "fsdp and deepspeed cannot both be true"),
    ({"zero_stage": 3}, "zero_stage needs deepspeed = true"),
    ({"zero_stage": 5}, "zero_stage"),
    ({"deepspeed": "true"}, "deepspeed: needs the deepspeed package"),
    ({"deepspeed": "true", "zero_stage": 3}, "zero_stage: ZeRO-3 partitions the parameters DeepSpeed is given"),
    ({"fsdp": "true", "network_algo": '"loha"'}, "fsdp: trains plain LoRA/LoCon only"),
])
def test_sharding_keys_are_validated_in_one_line(run_cli, tmp_path, tiny_sd1_dir, faces16, keys, message):
    if "needs the deepspeed package" in message and importlib.util.find_spec("deepspeed") is not None:
        pytest.skip("deepspeed is installed here")
    code, _, err = run_cli("train", _standard(tmp_path, tiny_sd1_dir, faces16, **keys))
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None or not torch.cuda.is_available(),
                    reason="DeepSpeed through accelerate needs the deepspeed package and CUDA GPUs (accelerate "
                           "turns DeepSpeed off on the CPU)")
def test_deepspeed_zero2_trains_the_lora_of_one_process(tmp_path, tiny_sd1_dir, faces16):
    """deepspeed = true, zero_stage = 2 (optimizer state and gradients split over the processes, the LoRA whole),
    torchrun with one process per GPU (up to 2): the LoRA one plain process trains at the same global batch.
    Clipping is DeepSpeed's own (gradient_clipping), so max_grad_norm is set to clip at these steps."""
    gpus = min(2, torch.cuda.device_count())
    job = _standard(tmp_path, tiny_sd1_dir, faces16, max_grad_norm=0.01)
    launch = _launch("torchrun", job, "--set", "output_name='ds'", "--set", "deepspeed=true", "--set", "zero_stage=2")
    launch[launch.index("--nproc_per_node") + 1] = str(gpus)
    r = subprocess.run(launch, cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ds = load_file(str(tmp_path / "out" / "ds.safetensors"))
    one = _one_process(job, "one", gpus)
    assert max(one[k].abs().max().item() for k in one if k.endswith("lora_up.weight")) > 1e-3  # it trained
    # (not run in difflora's CI, which has no GPU: GPU convolutions round to TF32 by default, batch shapes differ)
    assert _max_diff(ds, one) < 1e-4
