"""Focus crop against center crop on toy faces: how often the whole face box survives the crop.

    python bench/focus_crop.py --n 500            # the README numbers

Two settings. "off-centre": each 64x64 face is placed at a random horizontal offset in a 128x64
canvas (the face image's border pixels extended), cropped to a 64x64 square. "native 3:2": the
64x64 faces as rendered (centre jittered by +-3.5 px, size +-10%), cropped to 3:2 landscape
(64x43), where a head with long hair is taller than the crop. The face box is the face ellipse's
bounding box, known from the renderer.
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


def face_box(seed: int, dx: float = 0.0) -> tuple[float, float, float, float]:
    lay = faces.layout_from_seed(seed)
    g = faces._geometry(lay)
    return lay.cx - g["rx"] + dx, lay.cy - g["ry"], lay.cx + g["rx"] + dx, lay.cy + g["ry"]


def contains(box, inner) -> bool:
    return box[0] <= inner[0] and box[1] <= inner[1] and box[2] >= inner[2] and box[3] >= inner[3]


def measure(n: int, seed: int = 0, canvas_width: int = 128, native: bool = True) -> dict:
    rng = np.random.default_rng(seed)
    kept = {"off-centre": {"center": 0, "focus": 0}, "native 3:2": {"center": 0, "focus": 0}}
    for i in range(n):
        render_seed = 2**30 + i  # evaluation seeds (never used to train the judge or base model)
        img = faces.render(faces.sample_attributes(rng, held_out=None), render_seed)
        off = int(rng.integers(0, canvas_width - faces.SIZE + 1))
        canvas = np.pad(img, ((0, 0), (off, canvas_width - faces.SIZE - off), (0, 0)), mode="edge")
        for mode in ("center", "focus"):
            box = plan_crop([canvas], mode, (64, 64), False, False).box
            kept["off-centre"][mode] += contains(box, face_box(render_seed, off))
            if native:
                box = plan_crop([img], mode, (48, 32), False, False).box
                kept["native 3:2"][mode] += contains(box, face_box(render_seed))
    return {setting: {mode: v / n for mode, v in d.items()} for setting, d in kept.items()} | {"n": n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="JSON result file")
    args = ap.parse_args()
    r = measure(args.n, args.seed)
    for setting in ("off-centre", "native 3:2"):
        print(f"{setting}: whole face box kept by focus crop {100 * r[setting]['focus']:.1f}%, "
              f"by center crop {100 * r[setting]['center']:.1f}% ({args.n} faces)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(r, indent=2) + "\n")


if __name__ == "__main__":
    main()
