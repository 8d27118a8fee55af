"""Copier ÷ ADDifT training wall time, measured back to back in one process.

    python bench/copier_speed.py [--task eyes-rev] [--variants addift-30-lr1e-2 addift] [--rounds 1] [--threads 1]

The suite's cells record each training's wall seconds, but they ran minutes or hours apart on a
shared machine whose load moved the same 100-step ADDifT training between 29 and 154 s, so their
ratio says little. Here every training runs in one warm process (imports and the first model load
paid by a warm-up run that is not counted), in the order A C A per round for each ADDifT variant
A and the copier C, so a slow spell falls on both sides; the ratio of a round is the copier's
seconds over the mean of the two ADDifT runs around it. Each training is `train()` as the eval
suite calls it: model load, latent and caption caching, every step, the save. Same 8 pairs (pair
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
    ap.add_argument("--variants", nargs="+", default=["addift-30-lr1e-2", "addift"])
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
        runs: dict[str, list[dict]] = {}
        for r in range(args.rounds):
            for v in args.variants:
                a1, steps_a = timed(v)
                c, steps_c = timed(args.copier)
                a2, _ = timed(v)
                runs.setdefault(v, []).append({"addift_s": [round(a1, 2), round(a2, 2)], "copier_s": round(c, 2),
                                               "addift_steps": steps_a, "copier_steps": steps_c,
                                               "ratio": round(c / ((a1 + a2) / 2), 2)})
    result = {"task": args.task, "threads": args.threads, "pairs": 8,
              "variants": {v: {"rounds": rs, "median_ratio": statistics.median(x["ratio"] for x in rs)}
                           for v, rs in runs.items()}}
    write_json_atomic(Path(args.out), result)
    for v, d in result["variants"].items():
        print(f"copier / {v}: {d['median_ratio']:.1f}x  ({d['rounds']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
