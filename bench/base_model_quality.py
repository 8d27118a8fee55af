"""Attribute correctness of the embedded base model on held-out attribute combinations.

    python bench/base_model_quality.py [--model PATH | --work runs/base/work] [--n 256] [--steps 20]
    python bench/base_model_quality.py --work runs/flow/work --sampler euler   # the flow world's latest checkpoint

Generates n images from captions whose full attribute combination never appeared in the base
model's training set (20 sampler steps), judges every attribute with the shipped judge, and
reports per-attribute accuracy (target >= 90% each) and seed diversity. Writes JSON and a grid.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder (default: the embedded toy model)")
    ap.add_argument("--work", default=None, help="judge the latest checkpoint of a `toy train-base` work folder")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=4.0)
    ap.add_argument("--sampler", default="ddim")
    ap.add_argument("--out", default="bench/results/base_model_quality.json")
    args = ap.parse_args()

    from difflora.generate import make_grid
    from difflora.models import load_model
    from difflora.toy.quality import base_model_quality

    model_path = args.model
    if args.work:
        if (Path(args.work) / "state").is_dir():  # a `train-base --world flow` work folder
            from difflora.toy.train_flow import export_checkpoint
        else:
            from difflora.toy.train_base import export_checkpoint

        model_path = export_checkpoint(Path(args.work), Path(tempfile.mkdtemp()) / "model")
    model = load_model(model_path)
    t0 = time.time()
    r = base_model_quality(model, n=args.n, steps=args.steps, sampler=args.sampler, cfg=args.cfg, return_images=True)
    images, div = r.pop("images"), r.pop("div_images")
    r["seconds"] = round(time.time() - t0, 1)
    r["model"] = str(model_path or "embedded")
    print(f"{'attribute':<12} accuracy")
    for a, v in r["accuracy"].items():
        print(f"{a:<12} {v:.3f}{'' if v >= 0.9 else '   < 0.90'}")
    print(f"all attributes right: {r['all_correct']:.3f}; seed diversity (mean |diff| between seeds): "
          f"{r['seed_diversity_mean_abs_diff']:.3f} (min {r['seed_diversity_min_abs_diff']:.3f}); {r['seconds']} s")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(r, indent=2) + "\n")
    grid = make_grid([images[i:i + 8] for i in range(0, 32, 8)] + [div[i:i + 8] for i in range(0, 16, 8)], scale=2)
    grid.save(out.with_suffix(".png"))
    return 0 if r["min_accuracy"] >= 0.9 else 1


if __name__ == "__main__":
    sys.exit(main())
