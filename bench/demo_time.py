"""Wall time of `difflora demo` as a user runs it (a fresh process, imports and model loading included).

    python bench/demo_time.py [--runs 1] [--threads 2]
    python bench/demo_time.py --threads 1 --flow   # also `demo --world flow` (--flow-model DIR: another model)

Target: under 3 minutes on 2 CPU cores. Prints the seconds of each run, the demo's own report
(edit success, preservation) and writes JSON. With --flow, each run is `difflora demo` then
`difflora demo --world flow` in turn (same machine, same threads), and the flow/sd wall-time
ratio is printed (issue 25's target: at most 2).
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

from _paths import portable


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--flow", action="store_true", help="also time `demo --world flow` (the shipped flow model)")
    ap.add_argument("--flow-model", default=None, help="with --flow: this model folder instead of the shipped one")
    ap.add_argument("--out", default=None, help="JSON (default bench/results/demo_time.json, or "
                                                 "demo_time_flow.json with --flow)")
    args = ap.parse_args()
    args.flow = args.flow or bool(args.flow_model)
    if args.out is None:
        args.out = f"bench/results/demo_time{'_flow' if args.flow else ''}.json"
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TQDM_DISABLE="1")
    flow_args = ["--world", "flow"] + (["--model", args.flow_model] if args.flow_model else [])
    worlds = {"sd": []} | ({"flow": flow_args} if args.flow else {})
    runs: dict[str, list] = {w: [] for w in worlds}
    for i in range(args.runs):
        for world, extra in worlds.items():
            work = Path(tempfile.mkdtemp(prefix="difflora-demo-"))
            t0 = time.perf_counter()
            p = subprocess.run([sys.executable, "-m", "difflora", "demo", "--out", str(work / "demo"), *extra],
                               env=env, capture_output=True, text=True)
            seconds = time.perf_counter() - t0
            if p.returncode != 0:
                print(p.stderr[-3000:], file=sys.stderr)
                return 1
            report = json.loads((work / "demo" / "report.json").read_text())
            runs[world].append({"seconds": round(seconds, 1), **{k: report[k] for k in (
                "edit_success", "reverse_success", "base_after_rate", "preservation", "outside_change",
                "train_seconds", "train_steps")}})
            print(f"run {i + 1} ({world} world): {seconds:.1f} s wall (target < 180 s); edit "
                  f"{report['edit_success']:.0%}, reverse {report['reverse_success']:.0%}, preservation "
                  f"{report['preservation']:.0%}, training {report['train_steps']} steps in "
                  f"{report['train_seconds']} s")
            shutil.rmtree(work, ignore_errors=True)
    result = {"threads": args.threads, "cpus": os.cpu_count(), "runs": runs["sd"]}
    if args.flow:
        ratio = sum(r["seconds"] for r in runs["flow"]) / sum(r["seconds"] for r in runs["sd"])
        print(f"flow world / sd world wall time: {ratio:.2f}x (target <= 2)")
        result |= {"flow_model": portable(args.flow_model) if args.flow_model else "shipped", "flow_runs": runs["flow"], "flow_over_sd": round(ratio, 2)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if all(r["seconds"] < 180 for r in runs["sd"]) else 1


if __name__ == "__main__":
    sys.exit(main())
