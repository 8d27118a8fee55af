"""What ADDifT's self-regularisation term can act on, per task of the quality suite.

    python bench/selfreg_mask.py [--pairs 4]

For each task, on its procedural pairs (default settings: |RGB| threshold 10, dilation 2 px,
max-pooled to the latent grid):
- mask: the share of latent cells where the pair differs; `self_reg_weight` only acts on the rest
  (1 - mask), so a change that touches the whole image (style) leaves it nothing to act on;
- out/in at t: where the pair does not differ, ADDifT's own target (the frozen model on the other
  image) differs from "no change" (the frozen model on the LoRA's own input) by this mean squared
  amount, relative to the same inside the mask. A small ratio means the main loss already asks the
  LoRA for almost no change there, so the self-regularisation term, which asks for none, moves the
  optimum little.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))


def main() -> int:
    import numpy as np
    import torch
    from PIL import Image

    from difflora.data.dataset import difference_mask, pair_difference
    from difflora.models import load_model
    from difflora.toy import faces
    from difflora.toy.evaluate import TASKS, before_values

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=4)
    args = ap.parse_args()
    model = load_model(None)
    obj = model.objective
    gen = torch.Generator().manual_seed(0)
    cond = model.encode_prompts(["a face"] * args.pairs)
    print("| task | mask | out/in t=100 | t=300 | t=600 | t=900 |\n|---|---|---|---|---|---|")
    for name, task in TASKS.items():
        rng = np.random.default_rng(0)
        xs, ys, masks = [], [], []
        for i in range(args.pairs):
            base = faces.sample_attributes(rng, held_out=False)
            starts = before_values(task)
            _, _, x, y = faces.make_pair(1000 + i, task.attribute, starts[i % len(starts)], task.after, base=base)
            masks.append(difference_mask(pair_difference(Image.fromarray(x), Image.fromarray(y)), (16, 16), 10.0, 2))
            xs.append(torch.from_numpy(x).permute(2, 0, 1).float() / 127.5 - 1)
            ys.append(torch.from_numpy(y).permute(2, 0, 1).float() / 127.5 - 1)
        mask = torch.stack(masks)[:, None]
        ratios = []
        with torch.no_grad():
            lo = model.encode_images(torch.stack(xs), sample=False)
            lt = model.encode_images(torch.stack(ys), sample=False)
            for tv in (100, 300, 600, 900):
                eps = torch.randn(lo.shape, generator=gen)
                t = torch.full((args.pairs,), tv)
                d = model.predict(obj.add_noise(lt, eps, t), t, cond) - model.predict(obj.add_noise(lo, eps, t), t, cond)
                inside = (d**2 * mask).sum() / mask.sum().clamp(min=1)
                outside = (d**2 * (1 - mask)).sum() / (1 - mask).sum()
                ratios.append("–" if float((1 - mask).sum()) == 0 else f"{float(outside / inside):.3f}")
        print(f"| {name} | {float(mask.mean()):.2f} | " + " | ".join(ratios) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
