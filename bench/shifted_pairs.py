"""ADDifT on shifted toy pairs, with and without `difflora prep pairs --align`.

    nice -n 19 python bench/shifted_pairs.py --task eyes --pairs 8      # the README numbers

Eight eval pairs of the task (difflora eval's pairs), then three datasets: as rendered
("aligned originals"), every "after" image shifted by (3, -2) px (border pixels extended, as a
camera that moved between shots), and the shifted pairs registered by `prep pairs --align`. ADDifT
at 100 steps, lr 3e-3, 500-1000 (eval's `addift-100`, the defaults when this was measured) on each, scored by difflora eval's protocol (64 held-out prompts, multipliers -1, 0,
+1, the judge): edit, reverse, preservation, outside change.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def shift_image(arr: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """Content moved dx right, dy down; the uncovered border repeats the edge pixels."""
    h, w = arr.shape[:2]
    p = np.pad(arr, ((abs(dy), abs(dy)), (abs(dx), abs(dx)), (0, 0)), mode="edge")
    return p[abs(dy) - dy:abs(dy) - dy + h, abs(dx) - dx:abs(dx) - dx + w].copy()


def main() -> None:
    from difflora.cli import main as cli
    from difflora.toy.evaluate import markdown_table, run_one, write_pairs
    from difflora.toy.judge import load_judge
    from difflora.models import load_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="eyes")
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--shift", default="3,-2")
    ap.add_argument("--m", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("bench/results/shifted_pairs.json"))
    args = ap.parse_args()
    dx, dy = (int(v) for v in args.shift.split(","))
    judge, model = load_judge(), load_model(None)
    results = {}
    with tempfile.TemporaryDirectory(prefix="difflora-shift-") as tmp:
        tmp = Path(tmp)
        src = tmp / "src"
        write_pairs(src, args.task, args.pairs, args.seed)
        variants = {}
        for k, name in enumerate(("aligned originals", f"shifted ({dx}, {dy})", "shifted, then prep pairs --align")):
            work = tmp / f"variant{k}"
            variants[name] = work
            folder = work / f"pairs_{args.task}_{args.pairs}"
            if name.startswith("shifted ("):
                shutil.copytree(src, folder)
                for p in folder.glob("*_after.png"):
                    Image.fromarray(shift_image(np.asarray(Image.open(p).convert("RGB")), dx, dy)).save(p)
            elif name.startswith("aligned"):
                shutil.copytree(src, folder)
        shifted = variants[f"shifted ({dx}, {dy})"] / f"pairs_{args.task}_{args.pairs}"
        aligned = variants["shifted, then prep pairs --align"] / f"pairs_{args.task}_{args.pairs}"
        assert cli(["-q", "prep", "pairs", str(shifted), "--align", "--out", str(aligned)]) == 0
        (aligned / "pairs_report.json").unlink()
        rows = []
        for name, work in variants.items():
            r, _ = run_one(args.task, "addift-100", args.pairs, work, None, args.seed, args.m, judge, model=model)
            r.method = f"addift, {name}"
            rows.append(r)
            results[name] = r.__dict__
            print(f"{name}: edit {r.edit_success:.0%} reverse {r.reverse_success:.0%} preservation "
                  f"{r.preservation:.0%} outside change {r.outside_change:.4f}", flush=True)
    print(markdown_table(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
