"""Where a task's edit misses fall: edit success from a "before" start, by the value every other
attribute shows on the 0 image (e.g. style-rev by skin tone), and the training pairs' make-up.

    python bench/miss_breakdown.py [--task style-rev] [--method addift] [--train-seeds 0,1] [--threads 1]

Same protocol as `difflora eval --suite test` (8 pairs, pair seed 0, 32 held-out prompts, prompt
seed 0, 20 DDIM steps, CFG 4, load weight 1), images pooled over the training seeds. Writes
bench/results/miss_breakdown_<task>_<method>.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="style-rev")
    ap.add_argument("--method", default="addift")
    ap.add_argument("--train-seeds", default="0,1")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    import torch

    from difflora.fileio import write_json_atomic
    from difflora.models import load_model
    from difflora.toy import faces
    from difflora.toy.evaluate import TASKS, before_values, score, train_one
    from difflora.toy.judge import load_judge

    torch.set_num_threads(args.threads)
    task = TASKS[args.task]
    befores = before_values(task)
    others = [a for a in faces.CAPTION_ORDER if a != task.attribute]
    judge, model = load_judge(), load_model(None)
    seen: dict[str, Counter] = {a: Counter() for a in others}
    hits: dict[str, Counter] = {a: Counter() for a in others}
    pairs_make_up: dict[str, Counter] = {a: Counter() for a in others}
    seeds = [int(s) for s in args.train_seeds.split(",")]
    with tempfile.TemporaryDirectory(prefix="difflora-miss-") as tmp:
        for seed in seeds:
            lora, _, _ = train_one(args.task, args.method, 8, Path(tmp) / f"t{seed}", None, seed, pair_seed=0)
            _, images = score(model, lora, args.task, 32, 0, judge)
            for z, p in zip(judge.predict(images["0"]), judge.predict(images["+1"])):
                if z[task.attribute] in befores:
                    for a in others:
                        seen[a][z[a]] += 1
                        hits[a][z[a]] += p[task.attribute] == task.after
        for caption in sorted((Path(tmp) / f"t{seeds[0]}" / f"pairs_{args.task}_8").glob("[0-9][0-9][0-9].txt")):
            attrs = faces.parse_caption(caption.read_text(encoding="utf-8"))
            for a in others:
                if a in attrs:
                    pairs_make_up[a][attrs[a]] += 1
    result = {"task": args.task, "method": args.method, "train_seeds": args.train_seeds,
              "edit_from_before_by": {a: {v: {"n": seen[a][v], "edit": hits[a][v] / seen[a][v]} for v in seen[a]}
                                      for a in others},
              "training_pairs": {a: dict(pairs_make_up[a]) for a in others}}
    write_json_atomic(ROOT / "bench" / "results" / f"miss_breakdown_{args.task}_{args.method}.json", result)
    print(f"{args.task} ({args.method}, training seeds {args.train_seeds}): edit from a before start at +1, "
          "by the other attributes' values on the 0 image (training pairs holding that value)")
    for a in others:
        cells = [f"{v} {hits[a][v]}/{seen[a][v]} ({pairs_make_up[a].get(v, 0)})" for v in faces.ATTRIBUTES[a] if seen[a][v]]
        print(f"  {a:<11} " + "   ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
