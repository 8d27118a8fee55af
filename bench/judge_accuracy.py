"""Accuracy of the shipped attribute judge on fresh procedural faces.

Trains nothing. Scores N faces whose render seeds (2**30 upwards) never occur in training
(training seeds are below 2**30), plain and with the training augmentations (blur, noise,
colour jitter, shifts, resampling, JPEG) at strength 1.0 and a harsher 1.5. The peer column is
chance (1 / number of values).

With --vae FOLDER (a diffusers AutoencoderKL folder, or a model folder with a vae/ sub-folder,
e.g. the toy base model's) it also scores the same faces after an encode/decode round trip,
which shows whether the VAE keeps what the judge reads (thin strokes: mouth, closed eyes,
glasses frames).

    python bench/judge_accuracy.py [--n 1000] [--seed 0] [--vae DIR] [--out bench/results/judge_accuracy.json]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _paths import portable  # noqa: E402
from difflora.fileio import write_json_atomic
from difflora.toy import judge as judge_mod


def vae_roundtrip_accuracy(judge, vae_path: Path, n: int, seed: int) -> dict[str, float]:
    """Per-attribute accuracy on the evaluation faces after encode (posterior mean) + decode."""
    import numpy as np
    from diffusers import AutoencoderKL

    from difflora.toy import faces

    folder = vae_path / "vae" if (vae_path / "vae" / "config.json").is_file() else vae_path
    vae = AutoencoderKL.from_pretrained(folder, local_files_only=True).eval()
    rng = np.random.default_rng([seed, 202])  # the same faces as judge_mod.evaluate
    attrs, seeds = judge_mod.random_faces(rng, n, seed_base=judge_mod.EVAL_SEED_BASE)
    correct = {a: 0 for a in judge.attributes}
    with torch.no_grad():
        for i in range(0, n, 100):
            imgs = [faces.render(a, s) for a, s in zip(attrs[i:i + 100], seeds[i:i + 100])]
            x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
            rec = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
            for d, truth in zip(judge.predict(rec), attrs[i:i + 100]):
                for a in correct:
                    correct[a] += d[a] == truth[a]
    return {a: c / n for a, c in correct.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000, help="number of faces (default 1000)")
    ap.add_argument("--seed", type=int, default=0, help="attribute seed (default 0)")
    ap.add_argument("--weights", type=Path, default=None, help="judge file (default: the shipped one)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--vae", type=Path, default=None, help="also score VAE round trips (diffusers folder)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "judge_accuracy.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)

    judge = judge_mod.load_judge(args.weights)
    runs = {}
    timings = {}
    for name, aug, strength in (("plain", False, 1.0), ("augmented", True, 1.0), ("augmented_x1.5", True, 1.5)):
        t = time.perf_counter()
        runs[name] = judge_mod.evaluate(judge, n=args.n, seed=args.seed, augmented=aug, strength=strength)
        timings[name] = time.perf_counter() - t
    if args.vae is not None:
        t = time.perf_counter()
        runs["vae_roundtrip"] = vae_roundtrip_accuracy(judge, args.vae, n=args.n, seed=args.seed)
        timings["vae_roundtrip"] = time.perf_counter() - t

    chance = {a: 1.0 / len(v) for a, v in judge.attributes.items()}
    header = ["attribute", "chance", *runs]
    rows = [[a, f"{chance[a]:.3f}", *(f"{runs[r][a]:.4f}" for r in runs)] for a in judge.attributes]
    rows.append(["(min)", f"{min(chance.values()):.3f}", *(f"{min(runs[r].values()):.4f}" for r in runs)])
    widths = [max(len(h), *(len(r[k]) for r in rows)) for k, h in enumerate(header)]
    print(f"judge accuracy on {args.n} fresh faces (render seeds {judge_mod.EVAL_SEED_BASE}..), seed {args.seed}")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))

    write_json_atomic(args.out, {
        "n": args.n,
        "seed": args.seed,
        "render_seed_base": judge_mod.EVAL_SEED_BASE,
        "weights": portable(args.weights or judge_mod.DEFAULT_PATH),
        "vae": None if args.vae is None else os.fspath(args.vae),
        "chance": chance,
        "accuracy": runs,
        "min_accuracy": {r: min(v.values()) for r, v in runs.items()},
        "seconds": timings,
        "judge_metadata": {k: v for k, v in judge.metadata.items() if k != "attributes"},
    })
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
