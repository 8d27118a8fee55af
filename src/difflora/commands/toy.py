"""`difflora toy ...`: the embedded default world (procedural faces).

    difflora toy dataset --n N --out DIR      random faces + captions, kohya folder layout
    difflora toy pairs --change A=B:C --out DIR   before/after pairs differing in one attribute
    difflora toy judge DIR                    read the attributes of generated images

Heavy imports (torch, the judge) happen inside the commands, so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import numpy as np

from .. import validate
from ..errors import UserError
from ..fileio import atomic_path, write_json_atomic, write_text_atomic
from ..toy import faces

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")

DATASET_HELP = """\
Write N random 64x64 faces with full captions in kohya's folder layout:

  DIR/<R>_face/000000.png   the image
  DIR/<R>_face/000000.txt   its caption, e.g. "a face, tan skin, red hair, blue background,
                            eyes open, smiling, no glasses, flat"
  ... 000001.png, 000001.txt, ...

<R> is --repeats (kohya reads the number before "_" as the repeat count). Faces use only
attribute combinations the base model was trained on, unless --held-out is given (then only
the held-out ones). Face i depends only on (--seed, i), so a larger --n extends a smaller one.
An existing, non-empty DIR is refused unless --overwrite is given; --overwrite replaces only
the files this command writes and never deletes anything else."""

PAIRS_HELP = """\
Write N before/after pairs: the same face rendered with one attribute changed.

  DIR/000000.png          before image
  DIR/000000.txt          before caption (full caption, e.g. "a face, ..., eyes open, ...")
  DIR/000000_after.png    after image (same face, only the --change attribute differs)
  DIR/000000_after.txt    after caption
  ... 000001.png, 000001_after.png, ...

--change is ATTRIBUTE=BEFORE:AFTER, e.g. eyes=open:closed, mouth=neutral:smiling,
glasses=none:glasses, hair=black:blonde. The other attributes are drawn at random (all
combinations). For eyes, mouth and glasses only the pixels of that feature differ.
Pair i depends only on (--seed, i). An existing, non-empty DIR is refused unless --overwrite
is given; --overwrite replaces only the files this command writes and never deletes anything."""

JUDGE_HELP = """\
Read the attributes of every image (png, jpg, webp) in DIR with the shipped judge (a small
CNN trained on the procedural faces), print a table with one column per attribute and write
JSON (default DIR/judge.json). Images that are not 64x64 are resized. When a caption
(same name, .txt) sits beside an image and is a toy-face caption, each attribute it names is
checked against the judge (a mismatch is shown as "predicted!=captioned") and the
per-attribute agreement is printed at the end."""


def _attribute_list() -> str:
    return "; ".join(f"{a}: {'/'.join(v)}" for a, v in faces.ATTRIBUTES.items())


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def register(subparsers) -> None:
    toy = subparsers.add_parser(
        "toy",
        help="the embedded default world: procedural faces, datasets, pairs, the attribute judge",
        description="The embedded default world: 64x64 procedural faces with known attributes "
        f"({_attribute_list()}).",
    )
    sub = toy.add_subparsers(dest="toy_command", metavar="SUBCOMMAND")
    sub.required = True
    fmt = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser("dataset", help="write random faces + captions in kohya's folder layout",
                       description=DATASET_HELP, formatter_class=fmt)
    p.add_argument("--n", type=_positive_int, required=True, help="number of faces")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--repeats", type=_positive_int, default=1, metavar="R",
                   help="kohya repeat count, the R in DIR/R_face (default 1)")
    p.add_argument("--held-out", action="store_true",
                   help="only attribute combinations held out of the base model's training set")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty DIR, replacing only files of the same names")
    p.set_defaults(func=cmd_dataset)

    p = sub.add_parser("pairs", help="write before/after face pairs that differ in one attribute",
                       description=PAIRS_HELP, formatter_class=fmt)
    p.add_argument("--change", required=True, metavar="ATTR=BEFORE:AFTER",
                   help=f"the attribute to change, e.g. eyes=open:closed ({_attribute_list()})")
    p.add_argument("--n", type=_positive_int, default=8, help="number of pairs (default 8)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty DIR, replacing only files of the same names")
    p.set_defaults(func=cmd_pairs)

    p = sub.add_parser("judge", help="read the attributes of images with the shipped judge",
                       description=JUDGE_HELP, formatter_class=fmt)
    p.add_argument("dir", type=Path, metavar="DIR", help="folder of images")
    p.add_argument("--json", type=Path, default=None, metavar="OUT", help="JSON report (default DIR/judge.json)")
    p.add_argument("--recursive", "-r", action="store_true", help="also judge images in sub-folders")
    p.add_argument("--weights", type=Path, default=None, metavar="FILE",
                   help="judge weights (.safetensors; default: the shipped judge)")
    p.add_argument("--batch-size", type=_positive_int, default=256, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_judge)

    # ------------------------------------------------------------------ train-base
    p = sub.add_parser("train-base", help="train the embedded toy base model from scratch (deterministic, resumable)",
                       description="Trains the VAE, then the text encoder and U-Net, on procedural faces (held-out "
                                   "attribute combinations excluded) and saves a diffusers folder. Re-running with the "
                                   "same --work folder resumes from the last checkpoint. The defaults reproduce the "
                                   "shipped model, which took about 2.5 h on 2 CPU cores; a GPU makes it minutes.")
    p.add_argument("--out", required=True, help="output diffusers folder")
    p.add_argument("--world", choices=["sd", "flow"], default="sd",
                   help="sd: the shipped SD1-layout U-Net (default); flow: the flow world's Z-Image-layout "
                        "transformer that also edits (reuses the shipped toy VAE; about 2 h on 2 CPU cores)")
    p.add_argument("--work", default=None, help="checkpoints and cached latents (resumable; default "
                                                "runs/base/work, runs/flow/work for --world flow)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-steps", type=int, default=None, help="default: the shipped run's (2500)")
    p.add_argument("--unet-steps", type=int, default=None,
                   help="denoiser steps (default: the shipped run's, 6000; flow: 11000)")
    p.add_argument("--n-images", type=int, default=None, help="default: the shipped run's (60000; flow: 12000)")
    p.add_argument("--export-only", action="store_true", help="export the latest checkpoint's EMA weights and stop")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.set_defaults(func=cmd_train_base)
    # ------------------------------------------------------------------


# ---------------------------------------------------------------------------- helpers
def _check_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError("exists and is not a folder", path=out)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError("output folder exists and is not empty", path=out,
                        hint="choose another --out, or pass --overwrite to replace files of the same names")


def _save_png(img: np.ndarray, path: Path) -> None:
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(img).save(tmp, format="PNG")


def _face_rng(seed: int, index: int) -> tuple[np.random.Generator, int]:
    """The generator for item `index` and its render seed (depends only on seed, index)."""
    rng = np.random.default_rng([seed & 0xFFFFFFFF, 31, index])
    return rng, int(rng.integers(0, 2**31 - 1))


# ---------------------------------------------------------------------------- dataset
def cmd_dataset(args) -> int:
    from tqdm import tqdm

    out: Path = args.out
    _check_out_dir(out, args.overwrite)
    folder = out / f"{args.repeats}_face"
    folder.mkdir(parents=True, exist_ok=True)
    counts = {"held_out": 0}
    for i in tqdm(range(args.n), desc="faces", dynamic_ncols=True, disable=args.n < 50):
        rng, render_seed = _face_rng(args.seed, i)
        attrs = faces.sample_attributes(rng, held_out=bool(args.held_out))
        counts["held_out"] += faces.is_held_out(attrs)
        _save_png(faces.render(attrs, render_seed), folder / f"{i:06d}.png")
        write_text_atomic(folder / f"{i:06d}.txt", faces.caption(attrs) + "\n")
    log.debug("wrote %d faces (%d held-out combinations) to %s", args.n, counts["held_out"], folder)
    print(f"wrote {args.n} faces to {folder}")
    return 0


# ---------------------------------------------------------------------------- pairs
def cmd_pairs(args) -> int:
    from tqdm import tqdm

    try:
        attribute, before, after = faces.parse_change(args.change)
    except ValueError as e:
        raise UserError(f"--change: {e}") from None
    out: Path = args.out
    _check_out_dir(out, args.overwrite)
    out.mkdir(parents=True, exist_ok=True)
    for i in tqdm(range(args.n), desc="pairs", dynamic_ncols=True, disable=args.n < 50):
        rng, render_seed = _face_rng(args.seed, i)
        a_before, a_after, img_before, img_after = faces.make_pair(render_seed, attribute, before, after, rng=rng)
        _save_png(img_before, out / f"{i:06d}.png")
        write_text_atomic(out / f"{i:06d}.txt", faces.caption(a_before) + "\n")
        _save_png(img_after, out / f"{i:06d}_after.png")
        write_text_atomic(out / f"{i:06d}_after.txt", faces.caption(a_after) + "\n")
    log.debug("wrote %d pairs (%s: %s -> %s) to %s", args.n, attribute, before, after, out)
    print(f"wrote {args.n} pairs ({attribute}: {before} -> {after}) to {out}")
    return 0


# ---------------------------------------------------------------------------- judge
def _find_images(folder: Path, recursive: bool) -> list[Path]:
    it = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in it if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def _is_grid(path: Path) -> bool:
    """Grids written by generate, demo, eval and training samples (`*grid*.png`): many faces, not one."""
    return "grid" in path.stem.lower()


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB")).copy()
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"cannot read image ({e})", path=path) from None


def _caption_attrs(image: Path) -> dict[str, str] | None:
    txt = image.with_suffix(".txt")
    if not txt.is_file():
        return None
    try:
        return faces.parse_caption(txt.read_text(encoding="utf-8").strip())
    except (ValueError, UnicodeDecodeError) as e:
        log.debug("%s: not a toy-face caption (%s)", txt, e)
        return None


def _format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[k]) for r in rows)) if rows else len(h) for k, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def cmd_judge(args) -> int:
    from tqdm import tqdm

    from ..toy.judge import DEFAULT_PATH, load_judge

    folder: Path = args.dir
    if os.path.lexists(folder):  # a symlink loop, an unreadable folder
        validate.input_folder(folder, "DIR")
    if not folder.exists():
        raise UserError("folder not found", path=folder)
    if not folder.is_dir():
        raise UserError("is not a folder", path=folder)
    validate.output_file(args.json if args.json is not None else folder / "judge.json", "--json")
    files = _find_images(folder, args.recursive)
    grids = [p for p in files if _is_grid(p)]
    if grids:
        log.info("skipping %d grid image(s) (%s%s)", len(grids), grids[0].name, ", ..." if len(grids) > 1 else "")
        files = [p for p in files if not _is_grid(p)]
    if not files:
        raise UserError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in folder", path=folder,
                        hint=None if args.recursive else "pass --recursive to look in sub-folders")
    judge = load_judge(args.weights)
    attributes = list(judge.attributes)

    results = []
    bs = args.batch_size
    for i in tqdm(range(0, len(files), bs), desc="judge", dynamic_ncols=True, disable=len(files) <= bs):
        chunk = files[i:i + bs]
        proba = judge.predict_proba([_read_image(p) for p in chunk])
        for k, path in enumerate(chunk):
            pred = {a: judge.attributes[a][int(proba[a][k].argmax())] for a in attributes}
            conf = {a: round(float(proba[a][k].max()), 4) for a in attributes}
            entry = {"file": path.relative_to(folder).as_posix(), "predicted": pred, "confidence": conf}
            named = _caption_attrs(path)
            if named is not None:
                entry["caption"] = named
                entry["match"] = {a: pred[a] == v for a, v in named.items() if a in pred}
            results.append(entry)

    rows = []
    agree = {a: [0, 0] for a in attributes}
    for r in results:
        row = [r["file"]]
        for a in attributes:
            cell = r["predicted"][a]
            if "match" in r and a in r["match"]:
                agree[a][1] += 1
                agree[a][0] += r["match"][a]
                if not r["match"][a]:
                    cell = f"{cell}!={r['caption'][a]}"
            row.append(cell)
        rows.append(row)
    print(_format_table(["file"] + attributes, rows))

    agreement = {a: {"matched": m, "named": n, "rate": m / n} for a, (m, n) in agree.items() if n}
    n_captioned = sum("caption" in r for r in results)
    if agreement:
        print(f"\nagreement with captions ({n_captioned} of {len(results)} images captioned):")
        print(_format_table(["attribute", "matched", "named", "rate"],
                            [[a, str(v["matched"]), str(v["named"]), f"{v['rate']:.3f}"] for a, v in agreement.items()]))
    out = args.json if args.json is not None else folder / "judge.json"
    write_json_atomic(out, {
        "judge": os.fspath(Path(args.weights).resolve() if args.weights else DEFAULT_PATH),
        "folder": os.fspath(folder),
        "attributes": {a: list(v) for a, v in judge.attributes.items()},
        "images": results,
        "agreement": agreement,
    })
    print(f"\nwrote {out}")
    return 0


def cmd_train_base(args) -> int:
    from pathlib import Path

    import torch

    from ..toy.train_base import BaseTrainConfig, export_checkpoint, train_base

    for option, value in (("--vae-steps", args.vae_steps), ("--unet-steps", args.unet_steps),
                          ("--n-images", args.n_images)):
        if value is not None:
            validate.at_least(value, 1, option)
    validate.seed(args.seed)
    if args.work is None:
        args.work = "runs/flow/work" if args.world == "flow" else "runs/base/work"
    out, work = validate.output_folder(args.out, "--out"), validate.output_folder(args.work, "--work")
    if args.world == "flow":
        return _train_flow(args, out, work)
    if args.export_only:
        export_checkpoint(work, out)
    else:
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        given = {"vae_steps": args.vae_steps, "unet_steps": args.unet_steps, "n_images": args.n_images}
        cfg = BaseTrainConfig(seed=args.seed, device=device, **{k: v for k, v in given.items() if v is not None})
        train_base(out, work, cfg)
    print(f"saved {out}")
    return 0


def _train_flow(args, out, work) -> int:
    import torch

    from ..toy.train_flow import FlowTrainConfig, export_checkpoint, train_flow

    if args.vae_steps is not None:
        raise UserError("--vae-steps: the flow world reuses the shipped toy VAE (no VAE stage)")
    if args.export_only:
        if not (Path(work) / "state" / "state.json").exists():
            raise UserError("no checkpoint to export (state/state.json is missing)", path=work)
        export_checkpoint(work, out)
    else:
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        given = {"steps": args.unet_steps, "n_images": args.n_images}
        train_flow(out, work, FlowTrainConfig(seed=args.seed, device=device,
                                              **{k: v for k, v in given.items() if v is not None}))
    print(f"saved {out}")
    return 0
