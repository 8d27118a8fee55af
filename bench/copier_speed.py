"""Copier ÷ ADDifT training wall time, measured back to back in one process.

    python bench/copier_speed.py [--task eyes-rev] [--variants addift addift-30-lr1e-2 addift-100] [--rounds 1] [--threads 1]

The suite's cells record each training's wall seconds, but they ran minutes or hours apart on a
shared machine whose load moved the same 100-step ADDifT training between 29 and 154 s, so their
ratio says little. Here every training runs in one warm process (imports and the first model load
paid by a warm-up run that is not counted), in the order A1 A2 .. C A1 A2 .. per round (ADDifT
variants A, the copier C), so a slow spell falls on both sides; a variant's ratio in a round is
the copier's seconds over the mean of that variant's two runs around it. Each training is
`train()` as the eval suite calls it: model load, latent and caption caching, every step, the save. Same 8 pairs (pair
seed 0), training seed 0. Writes bench/results/copier_speed.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="eyes-rev")
    ap.add_argument("--variants", nargs="+", default=["addift", "addift-30-lr1e-2", "addift-100"])
    ap.add_argument("--copier", default="copier")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "copier_speed.json"))
    args = ap.parse_args()
    import torch

    from difflora.fileio import write_json_atomic
    from difflora.toy.evaluate import train_one

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="difflora-copier-speed-") as tmp:
        work = Path(tmp)

        def timed(label: str) -> tuple[float, int]:
            t0 = time.perf_counter()
            _, steps, _ = train_one(args.task, label, 8, work, None, 0)
            seconds = time.perf_counter() - t0
            print(f"{label}: {steps} steps, {seconds:.1f} s", flush=True)
            return seconds, steps

        timed(args.variants[0])  # warm-up: imports, first model load, pairs written
        rounds = []
        for _ in range(args.rounds):
            before = {v: timed(v) for v in args.variants}
            copier_s, copier_steps = timed(args.copier)
            after = {v: timed(v) for v in args.variants}
            rounds.append({"copier_s": round(copier_s, 2), "copier_steps": copier_steps,
                           "addift": {v: {"steps": before[v][1], "s": [round(before[v][0], 2), round(after[v][0], 2)],
                                          "ratio": round(copier_s / ((before[v][0] + after[v][0]) / 2), 2)}
                                      for v in args.variants}})
    result = {"task": args.task, "threads": args.threads, "pairs": 8, "rounds": rounds,
              "median_ratio": {v: statistics.median(r["addift"][v]["ratio"] for r in rounds) for v in args.variants}}
    write_json_atomic(Path(args.out), result)
    for v, ratio in result["median_ratio"].items():
        print(f"copier / {v}: {ratio:.1f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
