"""Scaling over processes: steps/s and peak memory per process for 1, 2 (4) processes on the same job.

    python bench/scaling.py [--processes 1 2 4] [--steps 30] [--warmup 5] [--batch 1] [--device cpu|cuda]

Each process count trains the same job (difflora's own `train`, launched by `torchrun --standalone`; gloo on the
CPU, NCCL with `--device cuda`, one GPU per process) at the same per-process batch, so N processes train N times
the samples per step (weak scaling). Efficiency(N) = steps/s at N ÷ steps/s at 1: 100% means N processes train N
times the samples per second of one. Steady state: the step events after `--warmup` steps (of the main process;
the ranks move in lockstep). Peak memory: each process's own (CPU: peak resident set; CUDA: peak allocated).
Without `--model`, a tiny SD1 model and 16 toy faces are made in a temp folder. On a shared CPU, keep
`--threads 1` (each process one thread) and compare only the numbers of one run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _paths import REPO, portable  # noqa: E402


def _make_data(folder: Path, n: int, size: int) -> Path:
    import numpy as np
    from PIL import Image

    from difflora.toy import faces as F

    out = folder / "faces" / "1_face"
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        a = F.sample_attributes(rng, held_out=None)
        Image.fromarray(F.render(a, i)).resize((size, size), Image.BILINEAR).save(out / f"{i:03d}.png")
        (out / f"{i:03d}.txt").write_text(F.caption(a), encoding="utf-8")
    return out.parent


def _job(args, work: Path, model: str, data: Path, processes: int) -> Path:
    keys = {"model": model, "train_data_dir": str(data), "resolution": args.resolution, "network_dim": args.rank,
            "network_alpha": args.rank, "learning_rate": 1e-4, "max_train_steps": args.steps,
            "train_batch_size": args.batch, "output_dir": str(work / f"out{processes}"), "output_name": "scaling",
            "log_with": "none", "seed": 0, "overwrite": True}
    path = work / f"job{processes}.toml"
    path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in keys.items()), encoding="utf-8")
    return path


def worker(args) -> None:
    """One rank (started by torchrun): train the job, record the main process's step times and this process's
    peak memory."""
    import torch

    from difflora.config import load_job
    from difflora.train.events import Step
    from difflora.train.loop import train

    torch.set_num_threads(args.threads)
    times: list[tuple[int, float]] = []

    def on_event(event) -> None:
        if isinstance(event, Step):
            times.append((event.step, time.perf_counter()))

    train(load_job(args.worker), listeners=[on_event])
    rank = int(os.environ.get("RANK", "0"))
    if torch.cuda.is_available() and args.device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    out = {"rank": rank, "peak_mib": peak}
    if rank == 0:
        steady = [(s, t) for s, t in times if s >= args.warmup]
        (s0, t0), (s1, t1) = steady[0], steady[-1]
        out["steps_per_s"] = (s1 - s0) / (t1 - t0)
    Path(args.report, f"rank{rank}.json").write_text(json.dumps(out), encoding="utf-8")


def measure(args, work: Path, model: str, data: Path, processes: int) -> dict:
    report = work / f"report{processes}"
    report.mkdir(exist_ok=True)
    job = _job(args, work, model, data, processes)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TQDM_DISABLE="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO / "src"), os.environ.get("PYTHONPATH", "")) if p))
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # gloo ranks on the CPU even where GPUs are
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
           __file__, "--worker", str(job), "--report", str(report), "--warmup", str(args.warmup),
           "--threads", str(args.threads), "--device", args.device]
    t = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"{processes} process(es) failed:\n{r.stderr[-3000:]}")
    ranks = [json.loads((report / f"rank{i}.json").read_text()) for i in range(processes)]
    return {"processes": processes, "steps_per_s": ranks[0]["steps_per_s"],
            "samples_per_s": ranks[0]["steps_per_s"] * processes * args.batch,
            "peak_mib_per_process": [round(x["peak_mib"], 1) for x in ranks], "wall_s": time.perf_counter() - t}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--model", default=None, help="a model folder or file (default: a tiny SD1 model)")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--batch", type=int, default=1, help="per-process batch")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="threads per process")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "scaling.json"))
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--report", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if 1 not in args.processes:
        args.processes = [1, *args.processes]  # the baseline of the efficiency
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = args.model
        if model is None:
            from difflora.toy.tiny import build_tiny_sd

            model = str(work / "tiny_sd1")
            build_tiny_sd("sd1", layout="small").save(model)
        data = _make_data(work, 16, args.resolution)
        rows = [measure(args, work, model, data, n) for n in sorted(set(args.processes))]
    base = rows[0]["steps_per_s"]
    print(f"model {portable(args.model) or 'tiny SD1 (small)'}, {args.resolution}px, per-process batch {args.batch}, "
          f"rank {args.rank}, {args.device}, {args.threads} thread(s) per process, steps {args.warmup}-{args.steps}")
    print(f"{'processes':>9}  {'steps/s':>8}  {'samples/s':>9}  {'efficiency':>10}  peak MiB per process")
    for row in rows:
        row["efficiency"] = row["steps_per_s"] / base
        print(f"{row['processes']:>9}  {row['steps_per_s']:>8.2f}  {row['samples_per_s']:>9.2f}  "
              f"{row['efficiency']:>10.0%}  {row['peak_mib_per_process']}")
    result = {"model": portable(args.model) or "tiny SD1 (small)", "resolution": args.resolution, "batch": args.batch,
              "rank": args.rank, "device": args.device, "threads": args.threads, "steps": args.steps,
              "warmup": args.warmup, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
