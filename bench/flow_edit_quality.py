"""Edit success of the flow world's model (reference image + "change to <phrase>"), trained vs held-out changes.

    python bench/flow_edit_quality.py --work runs/flow/work [--n 32] [--steps 20] [--cfg 4]
    python bench/flow_edit_quality.py --model DIR

For each change, n held-out faces (evaluation render seeds) with the "before" value are edited; the judge
reads the result: success = the attribute shows the "after" value, preservation = every other attribute as the
judge reads it on the input. Changes in toy/flow_model.HELD_OUT_EDITS never appeared in edit training (near 0%
success expected until an edit LoRA teaches them).
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

TRAINED = [("eyes", "open", "closed"), ("glasses", "glasses", "none"), ("hair", "black", "red"),
           ("skin", "dark", "light"), ("background", "blue", "green"), ("mouth", "smiling", "neutral"),
           ("style", "flat", "detailed")]
HELD_OUT = [("eyes", "closed", "open"), ("glasses", "none", "glasses"), ("hair", "red", "black"),
            ("skin", "light", "dark")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a flow world model folder")
    ap.add_argument("--work", default=None, help="judge the latest checkpoint of a `train-base --world flow` work folder")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=4.0)
    ap.add_argument("--out", default="bench/results/flow_edit_quality.json")
    args = ap.parse_args()

    import numpy as np
    import torch

    from difflora.models import load_model
    from difflora.toy import faces, flow_model
    from difflora.toy.judge import EVAL_SEED_BASE, load_judge

    model_path = args.model
    if args.work:
        from difflora.toy.train_flow import export_checkpoint

        model_path = export_checkpoint(Path(args.work), Path(tempfile.mkdtemp()) / "model")
    model = load_model(model_path)
    judge = load_judge()
    assert set(HELD_OUT) == {(a, b, v) for a, b, v in HELD_OUT if (a, v) in flow_model.HELD_OUT_EDITS}
    t0 = time.time()
    rows = {}
    for attribute, before, after in TRAINED + HELD_OUT:
        rng = np.random.default_rng([7, len(rows)])
        pairs = [faces.make_pair(EVAL_SEED_BASE + 1000 * len(rows) + i, attribute, before, after, rng=rng)
                 for i in range(args.n)]
        pixels = torch.from_numpy(np.stack([p[2] for p in pairs])).permute(0, 3, 1, 2).float() / 127.5 - 1
        with torch.no_grad():
            ref = model.encode_images(pixels, sample=False)
            lat = flow_model.sample_edit(model, ref, [flow_model.instruction(attribute, after)] * args.n,
                                         list(range(args.n)), args.steps, args.cfg)
            out = ((model.decode_latents(lat).float().clamp(-1, 1) + 1) * 127.5).round().byte()
        edited = judge.predict(list(out.permute(0, 2, 3, 1).numpy()))
        inputs = judge.predict([p[2] for p in pairs])
        others = [a for a in faces.CAPTION_ORDER if a != attribute]
        rows[f"{attribute}={before}:{after}"] = {
            "held_out": (attribute, after) in flow_model.HELD_OUT_EDITS,
            "success": float(np.mean([e[attribute] == after for e in edited])),
            "preservation": float(np.mean([all(e[a] == i[a] for a in others) for e, i in zip(edited, inputs)])),
        }
    print(f"{'change':<28} {'held out':<9} {'success':>8} {'preserved':>10}")
    for name, r in rows.items():
        print(f"{name:<28} {'yes' if r['held_out'] else 'no':<9} {r['success']:>8.3f} {r['preservation']:>10.3f}")
    result = {"n": args.n, "steps": args.steps, "cfg": args.cfg, "changes": rows,
              "seconds": round(time.time() - t0, 1)}
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
