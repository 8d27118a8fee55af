"""`difflora prep ...`: dataset preparation before training.

    difflora prep crop DIR --out OUT --mode focus --size 512     crop (one box per pair)
    difflora prep pairs DIR [--align --out OUT]                   shift/scale/changed area per pair
    difflora prep tag DIR --tagger toy|WD14_DIR|CAPTIONER_DIR     write caption files
    difflora prep captions DIR --trigger WORD --remove TAGS ...   edit captions, tag report

Every command checks all its inputs before it writes anything.
"""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path

import numpy as np

from ..errors import UserError

log = logging.getLogger(__name__)

CROP_HELP = """\
Crop every image (and pair) of DIR to --size and write it to OUT as PNG, with its caption files.

  --mode center   the middle of the image
  --mode focus    the box that keeps the main subject (a saliency map: spectral residual + contrast
                  to the border colours + a centre prior; numpy only, no model)
  --mode none     no cropping; only shrunk to the area of --size

The box has the target's aspect ratio and is as large as the image allows, then resized to --size
(WIDTHxHEIGHT or N). --aspect-buckets picks each image's kohya bucket (area of --size, steps of 64)
instead of one size. A pair (NAME.png + NAME_after.png) gets one box computed from both images and
where they differ, so the crops stay aligned; its further control images for edit models (NAME_ref1.png,
...) get the same box and size (resized to the before image's size first when they differ, warned),
and its NAME.instruction.txt is copied. An image smaller than its target is upscaled and
flagged; with --bucket-no-upscale (kohya's bucket_no_upscale) it is skipped instead (fixed size) or
kept at its own size rounded down to 64 px (with --aspect-buckets). OUT/crop_report.json lists
every box."""

PAIRS_HELP = """\
For each pair of DIR (NAME.png + NAME_after.png): the global shift (x, y in px, "after" relative to
"before"), scale and rotation of the "after" image (phase correlation, sub-pixel), and the share of
pixels that differ once that motion is undone. Flags: misaligned (shift > 0.5 px, scale off by > 2%,
rotation > 1 deg: training would learn the motion, not the difference), identical, differs almost
everywhere (> 75% of pixels: a global edit such as a new background, or two different photos). --align --out OUT writes every pair with "after" registered onto
"before" (pixels the shifted image does not cover are taken from "before"), captions, the instruction
file and the pair's control images (NAME_ref1.png, ...; unchanged, as PNG) copied."""

TAG_HELP = """\
Write a caption file for every image of DIR with a tagger that reads local files only:

  --tagger toy            the embedded world's judge (toy faces), e.g. "a face, tan skin, ..."
  --tagger WD14_FOLDER    model.onnx + selected_tags.csv (SmilingWolf's WD14 taggers): general tags
                          at --threshold (0.35), character tags at --character-threshold (0.85)
  --tagger MODEL_FOLDER   a transformers image-captioning model (BLIP-style): one sentence

Existing caption files are kept unless --overwrite (replace) or --append (add the new tags after
the old ones, without duplicates). A pair's further control images (NAME_ref1.png, ... beside NAME.png
and NAME_after.png) are not tagged: training reads no caption of theirs."""

CAPTIONS_HELP = """\
Edit the caption files of DIR in place (replace, remove, dedupe, sort by frequency, trigger word
first, in that order) and print the tag-frequency report; for pairs, the tags the two captions share
and the tags that differ (what the pair teaches, in words). --dry-run only prints. The report is
also written as DIR/captions_report.json (or --report FILE)."""


def register(subparsers) -> None:
    prep = subparsers.add_parser("prep", help="prepare a dataset: crop, align pairs, tag, edit captions",
                                 description="Dataset preparation before training.")
    sub = prep.add_subparsers(dest="prep_command", metavar="SUBCOMMAND")
    sub.required = True
    fmt = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser("crop", help="crop images and pairs (center, focus, none)", description=CROP_HELP,
                       formatter_class=fmt)
    p.add_argument("dir", type=Path, metavar="DIR")
    p.add_argument("--out", type=Path, required=True, metavar="OUT")
    p.add_argument("--mode", choices=("center", "focus", "none"), default="focus")
    p.add_argument("--size", default="512", help="N or WIDTHxHEIGHT (default 512)")
    p.add_argument("--aspect-buckets", action="store_true", help="each image to its kohya aspect bucket")
    p.add_argument("--bucket-no-upscale", action="store_true",
                   help="never upscale (kohya's bucket_no_upscale): too-small images are skipped or kept at size")
    p.add_argument("--after-suffix", default="_after", help="suffix of a pair's second image (default _after)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty OUT")
    p.set_defaults(func=cmd_crop)

    p = sub.add_parser("pairs", help="measure (and fix) how the two images of each pair line up",
                       description=PAIRS_HELP, formatter_class=fmt)
    p.add_argument("dir", type=Path, metavar="DIR")
    p.add_argument("--align", action="store_true", help="register 'after' onto 'before' and write the pairs to --out")
    p.add_argument("--out", type=Path, default=None, metavar="OUT")
    p.add_argument("--after-suffix", default="_after")
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="report (default DIR/pairs_report.json, "
                                                                          "or OUT/pairs_report.json with --align)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty OUT")
    p.set_defaults(func=cmd_pairs)

    p = sub.add_parser("tag", help="write caption files with a local tagger (toy, WD14 ONNX, BLIP-style)",
                       description=TAG_HELP, formatter_class=fmt)
    p.add_argument("dir", type=Path, metavar="DIR")
    p.add_argument("--tagger", required=True, help="toy, a WD14 folder, or a captioning model folder")
    p.add_argument("--threshold", type=float, default=None, help="WD14 general-tag threshold (default 0.35)")
    p.add_argument("--character-threshold", type=float, default=None, help="WD14 character threshold (default 0.85)")
    p.add_argument("--keep-underscores", action="store_true", help="WD14: keep '_' in tags (default: spaces)")
    p.add_argument("--include-rating", action="store_true", help="WD14: add the most likely rating tag")
    p.add_argument("--caption-extension", default=".txt")
    p.add_argument("--after-suffix", default="_after", help="suffix of a pair's second image (default _after)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--overwrite", action="store_true", help="replace existing caption files")
    g.add_argument("--append", action="store_true", help="add the new tags to existing captions")
    p.add_argument("--recursive", "-r", action="store_true")
    p.add_argument("--batch-size", type=int, default=8)
    p.set_defaults(func=cmd_tag)

    p = sub.add_parser("captions", help="trigger word, remove/replace/dedupe/sort tags, tag reports",
                       description=CAPTIONS_HELP, formatter_class=fmt)
    p.add_argument("dir", type=Path, metavar="DIR")
    p.add_argument("--trigger", default=None, help="put this word first in every caption (use keep_tokens = 1)")
    p.add_argument("--remove", action="append", default=[], metavar="TAGS",
                   help="comma-separated tags to remove: the features the LoRA should absorb (repeatable)")
    p.add_argument("--replace", action="append", default=[], metavar="OLD=NEW", help="replace a tag (repeatable)")
    p.add_argument("--no-dedupe", action="store_true", help="keep repeated tags")
    p.add_argument("--sort", action="store_true", help="order each caption's tags by their frequency in DIR")
    p.add_argument("--caption-extension", default=None, help="default: .txt, else .caption")
    p.add_argument("--after-suffix", default="_after")
    p.add_argument("--recursive", "-r", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="print, write nothing")
    p.add_argument("--report", type=Path, default=None, metavar="FILE")
    p.add_argument("--top", type=int, default=30, help="tags shown in the frequency table (default 30)")
    p.set_defaults(func=cmd_captions)


# ---------------------------------------------------------------------------- helpers
def _check_out_dir(out: Path, overwrite: bool, source: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError("exists and is not a folder", path=out)
    if out.resolve() == source.resolve():
        raise UserError("--out must be another folder than DIR (the originals are kept)", path=out)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError("output folder exists and is not empty", path=out,
                        hint="choose another --out, or pass --overwrite to replace files of the same names")


def _read(path: Path) -> np.ndarray:
    from ..data.images import load_image

    return np.asarray(load_image(path))


def _save_png(arr: np.ndarray, path: Path) -> None:
    from PIL import Image

    from ..fileio import atomic_path

    with atomic_path(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")


def _caption_copies(image: Path, out_image: Path) -> list[tuple[Path, Path]]:
    """(caption file beside `image`, where its copy beside `out_image` goes) for each caption it has, and for a
    pair's edit instruction (NAME.instruction.txt)."""
    from ..data.instructions import INSTRUCTION_SUFFIX
    from ..prep.files import CAPTION_EXTENSIONS

    copies = [(image.with_name(image.stem + ext), out_image.with_name(out_image.stem + ext))
              for ext in (*CAPTION_EXTENSIONS, INSTRUCTION_SUFFIX)]
    return [(src, dst) for src, dst in copies if src.is_file()]


def _copy_captions(image: Path, out_image: Path) -> None:
    from ..fileio import atomic_path

    for src, dst in _caption_copies(image, out_image):
        with atomic_path(dst) as tmp:
            shutil.copyfile(src, tmp)


def _check_copies(entries, out: Path, report: Path | None, report_option: str) -> None:
    """Every file a crop or an alignment will write (each image as OUT/<stem>.png with its captions, the
    report), against every file it reads, before the first write: `face.png` and `face.jpg` would
    both become OUT/face.png, and a report path may name an input or one of the outputs."""
    from ..fileio import check_writes

    reads, writes = [], []
    for entry in entries:
        for path in entry.all_paths:
            target = out / (path.stem + ".png")
            reads.append(path)
            writes.append((target, f"the output of {path.name}"))
            for src, dst in _caption_copies(path, target):
                reads.append(src)
                writes.append((dst, f"the copy of {src.name}"))
    if report is not None:
        writes.append((report, report_option))
    check_writes(writes, reads)


def _caption_extension(text: str) -> str:
    """--caption-extension as ".ext": a name part, and never an image's extension (captions would replace images)."""
    from .. import validate
    from ..data.images import IMAGE_EXTENSIONS

    ext = text if text.startswith(".") else "." + text
    validate.name_part(ext, "--caption-extension")
    if ext.lower() in IMAGE_EXTENSIONS:
        raise UserError(f"--caption-extension {ext} is an image extension: the captions would replace the images",
                        hint="use .txt or .caption")
    return ext


def _report_path(path: Path, option: str, reads) -> Path:
    """A report file the command will write: writable, and none of the files it reads."""
    from .. import validate
    from ..fileio import check_writes

    validate.output_file(path, option)
    check_writes([(path, option)], reads)
    return path


def _pair_arrays(entry) -> list[np.ndarray]:
    """The entry's images; a pair's "after" is resized to the "before" size when they differ."""
    from PIL import Image

    arrays = [_read(p) for p in entry.paths]
    if len(arrays) == 2 and arrays[0].shape != arrays[1].shape:
        h, w = arrays[0].shape[:2]
        log.warning("%s: the pair's images differ in size (%dx%d vs %dx%d); 'after' is resized to match",
                    entry.after, w, h, arrays[1].shape[1], arrays[1].shape[0])
        arrays[1] = np.asarray(Image.fromarray(arrays[1]).resize((w, h), Image.LANCZOS))
    return arrays


def _control_arrays(entry, size: tuple[int, int]) -> list[np.ndarray]:
    """The pair's further control images (NAME_ref1.png, ...), each resized to `size` (w, h), the "before" image's,
    when it differs (warned), so one crop box fits them all."""
    from PIL import Image

    arrays = []
    for path in entry.refs:
        arr = _read(path)
        if (arr.shape[1], arr.shape[0]) != size:
            log.warning("%s: %dx%d, the pair's before image %dx%d; resized to match", path, arr.shape[1],
                        arr.shape[0], *size)
            arr = np.asarray(Image.fromarray(arr).resize(size, Image.LANCZOS))
        arrays.append(arr)
    return arrays


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max([len(h)] + [len(r[k]) for r in rows]) for k, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- crop
def cmd_crop(args) -> int:
    from PIL import Image
    from tqdm import tqdm

    from ..fileio import write_json_atomic
    from ..prep.crop import parse_size, plan_crop
    from ..prep.files import entries_in

    try:
        size = parse_size(args.size)
    except ValueError as e:
        raise UserError(f"--size: {e}") from None
    entries = entries_in(args.dir, args.after_suffix)
    _check_out_dir(args.out, args.overwrite, args.dir)
    _check_copies(entries, args.out, args.out / "crop_report.json", "the crop report")
    plans = []
    for entry in tqdm(entries, desc="planning crops", dynamic_ncols=True, disable=len(entries) < 20):
        arrays = _pair_arrays(entry)
        plans.append((entry, arrays, plan_crop(arrays, args.mode, size, args.aspect_buckets, args.bucket_no_upscale)))
    kept = [p for p in plans if p[2].skipped is None]
    if not kept:
        biggest = max(plans, key=lambda p: p[1][0].shape[0] * p[1][0].shape[1])
        h, w = biggest[1][0].shape[:2]
        raise UserError(f"every image is smaller than the crop size {size[0]}x{size[1]} (largest: {w}x{h}) and "
                        "--bucket-no-upscale refuses to upscale; nothing written", path=biggest[0].before,
                        hint="choose a smaller --size, or drop --bucket-no-upscale to upscale (flagged)")
    report = []
    for entry, arrays, plan in tqdm(plans, desc="cropping", dynamic_ncols=True, disable=len(plans) < 20):
        row = {"image": entry.before.name, "after": entry.after.name if entry.after else None,
               "controls": [p.name for p in entry.refs], "box": list(plan.box), "size": list(plan.out_size),
               "flags": plan.flags}
        if plan.skipped:
            log.warning("%s: skipped: %s", entry.before, plan.skipped)
            row["skipped"] = plan.skipped
            report.append(row)
            continue
        controls = _control_arrays(entry, (arrays[0].shape[1], arrays[0].shape[0]))
        for path, arr in zip(entry.all_paths, arrays + controls):
            img = Image.fromarray(arr).crop(plan.box)
            if img.size != plan.out_size:
                img = img.resize(plan.out_size, Image.LANCZOS)
            out = args.out / (path.stem + ".png")
            _save_png(np.asarray(img), out)
            _copy_captions(path, out)
        for flag in plan.flags:
            log.warning("%s: %s", entry.before, flag)
        report.append(row)
    write_json_atomic(args.out / "crop_report.json", {"mode": args.mode, "size": list(size),
                                                      "aspect_buckets": args.aspect_buckets,
                                                      "bucket_no_upscale": args.bucket_no_upscale, "images": report})
    n_flag = sum(1 for r in report if r["flags"])
    n_skip = sum(1 for r in report if "skipped" in r)
    print(f"cropped {len(kept)} of {len(plans)} images/pairs ({args.mode}) to {args.out}"
          + (f"; {n_flag} upscaled (flagged)" if n_flag else "") + (f"; {n_skip} skipped (too small)" if n_skip else ""))
    return 0


# ---------------------------------------------------------------------------- pairs
def cmd_pairs(args) -> int:
    from tqdm import tqdm

    from .. import validate
    from ..fileio import write_json_atomic
    from ..data.alignment import align, measure
    from ..prep.files import entries_in

    pairs = [e for e in entries_in(args.dir, args.after_suffix) if e.after is not None]
    if not pairs:
        raise UserError(f"no pairs in folder (NAME.png + NAME{args.after_suffix}.png)", path=args.dir)
    if args.align:
        if args.out is None:
            raise UserError("--align writes the aligned pairs to --out OUT (the originals are kept)")
        _check_out_dir(args.out, args.overwrite, args.dir)
    out = args.json or ((args.out if args.align else args.dir) / "pairs_report.json")
    validate.output_file(out, "--json")
    if args.align:
        _check_copies(pairs, args.out, out, "--json")
    else:
        images = [p for e in pairs for p in e.paths]
        _report_path(out, "--json", images + [src for p in images for src, _ in _caption_copies(p, p)])
    rows, report = [], []
    for entry in tqdm(pairs, desc="measuring pairs", dynamic_ncols=True, disable=len(pairs) < 20):
        before, after = _pair_arrays(entry)
        r = measure(before, after)
        report.append({"before": entry.before.name, "after": entry.after.name, **r.to_dict()})
        rows.append([entry.before.name, f"{r.shift[0]:+.2f}", f"{r.shift[1]:+.2f}", f"{r.scale:.3f}",
                     f"{r.rotation:+.2f}", f"{100 * r.changed_fraction:.1f}%", ", ".join(r.flags)])
        if args.align:
            aligned = align(before, after, r)
            _save_png(before, args.out / (entry.before.stem + ".png"))
            _save_png(aligned, args.out / (entry.after.stem + ".png"))
            for ref in entry.refs:  # control images are no part of the registration: copied as they are
                _save_png(_read(ref), args.out / (ref.stem + ".png"))
            for path in entry.all_paths:
                _copy_captions(path, args.out / (path.stem + ".png"))
    print(_table(["pair", "shift x", "shift y", "scale", "rot deg", "changed", "flags"], rows))
    bad = sum(1 for r in report if "misaligned" in r["flags"])
    if bad:
        print(f"\n{bad} of {len(report)} pairs are misaligned: "
              + ("aligned copies written" if args.align else "fix them with --align --out OUT"))
    write_json_atomic(out, {"folder": str(args.dir), "aligned_to": str(args.out) if args.align else None,
                            "pairs": report})
    print(f"wrote {out}")
    return 0


# ---------------------------------------------------------------------------- tag
def cmd_tag(args) -> int:
    from tqdm import tqdm

    from .. import validate
    from ..data.images import load_image
    from ..fileio import check_writes, write_text_atomic
    from ..prep.captions import join_tags, split_tags
    from ..prep.files import entries_in, images_in
    from ..prep.taggers import CHARACTER_THRESHOLD, GENERAL_THRESHOLD, open_tagger

    ext = _caption_extension(args.caption_extension)
    general = GENERAL_THRESHOLD if args.threshold is None else validate.probability(args.threshold, "--threshold")
    character = (CHARACTER_THRESHOLD if args.character_threshold is None
                 else validate.probability(args.character_threshold, "--character-threshold"))
    validate.at_least(args.batch_size, 1, "--batch-size")
    files = images_in(args.dir, args.recursive)
    if not files:
        raise UserError("no images in folder", path=args.dir)
    controls = {p for e in entries_in(args.dir, args.after_suffix, args.recursive) for p in e.refs}
    files = [p for p in files if p not in controls]
    todo = [p for p in files if args.overwrite or args.append or not p.with_name(p.stem + ext).exists()]
    check_writes([(p.with_name(p.stem + ext), f"the caption of {p.name}") for p in todo], files)
    tagger = open_tagger(args.tagger, general_threshold=general, character_threshold=character,
                         keep_underscores=args.keep_underscores, include_rating=args.include_rating)
    kept = len(files) - len(todo)
    for path in todo:  # every image readable before the first caption is written
        load_image(path)
    captions = []
    bs = args.batch_size
    with tqdm(total=len(todo), desc=f"tagging ({tagger.name})", dynamic_ncols=True) as bar:
        for i in range(0, len(todo), bs):
            chunk = todo[i:i + bs]
            for path, tags in zip(chunk, tagger.tag([_read(p) for p in chunk])):
                cap = path.with_name(path.stem + ext)
                if args.append and cap.exists():
                    from ..data.captions import read_caption

                    old = split_tags(read_caption(cap))
                    seen = {t.lower() for t in old}
                    tags = old + [t for t in tags if t.lower() not in seen]
                captions.append((cap, join_tags(tags) + "\n"))
            bar.update(len(chunk))
    for cap, text in captions:
        write_text_atomic(cap, text)
    print(f"wrote {len(captions)} caption files ({tagger.name})"
          + (f"; kept {kept} existing (pass --overwrite or --append)" if kept else "")
          + (f"; {len(controls)} control image(s) of pairs (NAME_ref1.png, ...) not tagged" if controls else ""))
    return 0


# ---------------------------------------------------------------------------- captions
def cmd_captions(args) -> int:
    from ..data.captions import read_caption
    from ..fileio import write_json_atomic, write_text_atomic
    from ..prep.captions import CaptionEdits, join_tags, pair_difference, split_tags, tag_frequency
    from ..prep.files import caption_path, entries_in

    replace = {}
    for spec in args.replace:
        if "=" not in spec:
            raise UserError(f"--replace takes OLD=NEW, got {spec!r}")
        old, new = spec.split("=", 1)
        replace[old.strip()] = new.strip()
    edits = CaptionEdits(trigger=args.trigger.strip() if args.trigger else None,
                         remove=[t for spec in args.remove for t in split_tags(spec)], replace=replace,
                         dedupe=not args.no_dedupe, sort_by_frequency=args.sort)
    if args.caption_extension is not None:
        _caption_extension(args.caption_extension)
    entries = entries_in(args.dir, args.after_suffix, args.recursive)
    files: dict[Path, Path] = {}
    for e in entries:
        for img in e.paths:
            cap = caption_path(img, args.caption_extension)
            if cap is not None:
                files[img] = cap
    if not files:
        raise UserError("no caption files beside the images (NAME.txt or NAME.caption)", path=args.dir,
                        hint="write them with `difflora prep tag`")
    report = None if args.dry_run else _report_path(args.report or (args.dir / "captions_report.json"), "--report",
                                                    [*files, *files.values()])
    tags = {img: split_tags(read_caption(cap)) for img, cap in files.items()}
    # frequency after replace/remove, so sorting ranks the tags that stay
    staged = CaptionEdits(remove=edits.remove, replace=edits.replace, dedupe=True)
    freq = tag_frequency([staged.apply(t) for t in tags.values()])
    new = {img: edits.apply(t, freq) for img, t in tags.items()}
    changed = [img for img in new if new[img] != tags[img]]
    if not args.dry_run:
        for img in changed:
            write_text_atomic(files[img], join_tags(new[img]) + "\n")
    final_freq = tag_frequency(list(new.values()))
    n = len(new)
    top = final_freq.most_common(args.top)
    print(_table(["tag", "captions", "share"], [[t, str(c), f"{100 * c / n:.0f}%"] for t, c in top]))
    pairs = []
    for e in entries:
        if e.after is not None and e.before in new and e.after in new:
            pairs.append({"pair": e.before.name, **pair_difference(new[e.before], new[e.after])})
    if pairs:
        print("\npair: tags only in 'before' -> tags only in 'after' (shared tags omitted)")
        for p in pairs:
            print(f"  {p['pair']}: {join_tags(p['before_only']) or '-'} -> {join_tags(p['after_only']) or '-'}")
        same = sum(1 for p in pairs if not p["before_only"] and not p["after_only"])
        if same:
            print(f"  {same} pair(s) have identical captions: the difference is not named (fine for ADDifT).")
    verb = "would change" if args.dry_run else "changed"
    print(f"\n{verb} {len(changed)} of {n} caption files")
    if report is not None:
        write_json_atomic(report, {"captions": n, "changed": len(changed), "frequency": dict(final_freq.most_common()),
                                "pairs": pairs})
        print(f"wrote {report}")
    return 0
