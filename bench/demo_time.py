"""Wall time of `difflora demo` as a user runs it (a fresh process, imports and model loading included).

    python bench/demo_time.py [--runs 1] [--threads 2]

Target: under 3 minutes on 2 CPU cores. Prints the seconds of each run, the demo's own report
(edit success, preservation) and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results/demo_time.json")
    args = ap.parse_args()
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TQDM_DISABLE="1")
    runs = []
    for i in range(args.runs):
        work = Path(tempfile.mkdtemp(prefix="difflora-demo-"))
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-m", "difflora", "demo", "--out", str(work / "demo")], env=env,
                           capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        if p.returncode != 0:
            print(p.stderr[-3000:], file=sys.stderr)
            return 1
        report = json.loads((work / "demo" / "report.json").read_text())
        runs.append({"seconds": round(seconds, 1), **{k: report[k] for k in (
            "edit_success", "reverse_success", "base_after_rate", "preservation", "outside_change", "train_seconds")}})
        print(f"run {i + 1}: {seconds:.1f} s wall (target < 180 s); edit {report['edit_success']:.0%}, "
              f"reverse {report['reverse_success']:.0%}, preservation {report['preservation']:.0%}, "
              f"training {report['train_seconds']} s")
        shutil.rmtree(work, ignore_errors=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"threads": args.threads, "cpus": os.cpu_count(), "runs": runs}, indent=2) + "\n")
    return 0 if all(r["seconds"] < 180 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
