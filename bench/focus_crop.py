"""Focus crop against center crop on toy faces: how often the whole face box survives the crop.

    python bench/focus_crop.py --n 500            # the README numbers

Two settings; the face box is the face ellipse's bounding box, known from the renderer.
- "jittered": each face is rendered at a random position on a 160x96 canvas (`faces.render(...,
  canvas=, at=)`: the 64x64 face tile anywhere inside, background filling the rest) and cropped to
  a 96x96 square, so the crop must find the face.
- "as rendered": the 64x64 faces the toy world trains on (centre jittered by +-3.5 px, size +-10%),
  cropped to 3:2 landscape (64x43). With its hair the head is often taller than the crop: the
  crop has to cut the hair, not the chin.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from difflora.prep.crop import plan_crop  # noqa: E402
from difflora.toy import faces  # noqa: E402

CANVAS = (160, 96)  # width, height of the jittered setting
# setting -> (image size, crop target size, the target's aspect in words)
SETTINGS = {"jittered": (CANVAS, (96, 96), "1:1"), "as rendered": ((faces.SIZE, faces.SIZE), (48, 32), "3:2")}


def face_box(seed: int, dx: float = 0.0, dy: float = 0.0) -> tuple[float, float, float, float]:
    lay = faces.layout_from_seed(seed)
    g = faces._geometry(lay)
    return lay.cx - g["rx"] + dx, lay.cy - g["ry"] + dy, lay.cx + g["rx"] + dx, lay.cy + g["ry"] + dy


def contains(box, inner) -> bool:
    return box[0] <= inner[0] and box[1] <= inner[1] and box[2] >= inner[2] and box[3] >= inner[3]


def measure(n: int, seed: int = 0, settings: tuple[str, ...] = tuple(SETTINGS)) -> dict:
    """Share of `n` faces whose whole face box each crop mode keeps, per setting."""
    rng = np.random.default_rng(seed)
    kept = {s: {"center": 0, "focus": 0} for s in settings}
    for i in range(n):
        render_seed = 2**30 + i  # evaluation seeds (never used to train the judge or base model)
        attrs = faces.sample_attributes(rng, held_out=None)
        at = (float(rng.uniform(0, CANVAS[0] - faces.SIZE)), float(rng.uniform(0, CANVAS[1] - faces.SIZE)))
        for setting in settings:
            if setting == "jittered":
                img, box = faces.render(attrs, render_seed, canvas=CANVAS, at=at), face_box(render_seed, *at)
            else:
                img, box = faces.render(attrs, render_seed), face_box(render_seed)
            for mode in ("center", "focus"):
                kept[setting][mode] += contains(plan_crop([img], mode, SETTINGS[setting][1], False, False).box, box)
    return {s: {mode: v / n for mode, v in d.items()} for s, d in kept.items()} | {"n": n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="JSON result file")
    args = ap.parse_args()
    r = measure(args.n, args.seed)
    for setting, (canvas, _, aspect) in SETTINGS.items():
        print(f"{setting} ({canvas[0]}x{canvas[1]} cropped to {aspect}): whole face box kept by "
              f"focus crop {100 * r[setting]['focus']:.1f}%, by center crop {100 * r[setting]['center']:.1f}% "
              f"({args.n} faces)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(r, indent=2) + "\n")


if __name__ == "__main__":
    main()
