"""Start N training processes on one machine when a CPU launch asked for N but started one.

`accelerate launch --cpu --num_processes N` uses its single-process launcher unless an MPI
hostfile is configured, and does not tell the child how many processes were asked for. difflora
reads the request (DIFFLORA_NUM_PROCESSES, or the launcher's own command line) and, when no
process group exists yet, starts N ranks with the torch.distributed environment set; accelerate
then forms a gloo group in each (DistributedType.MULTI_CPU). `torchrun --nproc_per_node N -m
difflora train ...` works directly too.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys

log = logging.getLogger(__name__)


def _launcher_num_processes() -> int | None:
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as fh:
            argv = [a.decode(errors="replace") for a in fh.read().split(b"\0") if a]
    except OSError:
        return None
    # `accelerate launch ...`, `python -m accelerate.commands.launch ...`, `accelerate-launch ...`
    if not any("accelerate" in os.path.basename(a) for a in argv[:4]):
        return None
    for i, a in enumerate(argv):
        if a in ("--num_processes", "--num-processes") and i + 1 < len(argv):
            return int(argv[i + 1])
        if a.startswith(("--num_processes=", "--num-processes=")):
            return int(a.split("=", 1)[1])
    return None


def requested_processes() -> int:
    """How many training processes the user asked for, when this process is not yet one of them."""
    if "WORLD_SIZE" in os.environ or "RANK" in os.environ:
        return 1  # already inside a distributed launch (torchrun, MPI, or our own children)
    env = os.environ.get("DIFFLORA_NUM_PROCESSES")
    if env:
        return max(1, int(env))
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true"):
        return _launcher_num_processes() or 1
    return 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(n: int, argv: list[str]) -> int:
    """Run `python -m difflora ARGV` as ranks 0..n-1 on this machine; returns the worst exit code."""
    port = _free_port()
    threads = max(1, (os.cpu_count() or 1) // n)
    procs = []
    for rank in range(n):
        env = dict(os.environ, WORLD_SIZE=str(n), RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(n),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), ACCELERATE_USE_CPU="True")
        env.setdefault("OMP_NUM_THREADS", str(threads))
        procs.append(subprocess.Popen([sys.executable, "-m", "difflora", *argv], env=env))
    log.info("started %d training processes (gloo, port %d)", n, port)

    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        codes = [p.wait() for p in procs]
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return max(codes, key=abs)
