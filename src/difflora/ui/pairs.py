"""What the Pairs page shows: pairs found the way training finds them, their difference and mask.

The heat map is `data.dataset.pair_difference` (|before - after| summed over RGB) and the mask is
`data.dataset.difference_mask` at the latent size, the exact mask ADDifT's `diff_mask` trains
with; images are read with `data.images.load_image`, the CLI's checks included.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..data.dataset import REF_SUFFIX, difference_mask, pair_difference, reference_images, split_control_images
from ..data.instructions import read_instruction, write_instruction  # noqa: F401  (the Pairs page's)
from ..data.images import IMAGE_EXTENSIONS, is_image_file, load_image
from ..errors import UserError
from ..fileio import atomic_path, write_text_atomic

MAX_UPLOAD_BYTES = 20 * 1024 * 1024  # one image file; larger uploads are refused
CAPTION_EXTENSIONS = (".txt", ".caption")


@dataclass
class Pair:
    name: str
    before: Path
    after: Path | None
    warnings: list[str] = field(default_factory=list)
    refs: tuple[Path, ...] = ()  # further control images of an edit model: NAME_ref1.png, NAME_ref2.png, ...


def find_pairs(folder: Path, after_suffix: str = "_after", after_dir: Path | None = None) -> list[Pair]:
    """NAME.png + NAME<after_suffix>.png (or NAME.png in after_dir), as training pairs them, each with its further
    control images NAME_ref1.png, ... (not pairs of their own)."""
    images = sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p))
    if after_dir is None:
        images = [p for p in images if not p.stem.endswith(after_suffix)]
    images, refs_of = split_control_images(images)
    pairs = []
    for img in images:
        candidates = ([after_dir / img.name] if after_dir else [img.with_name(img.stem + after_suffix + img.suffix)])
        candidates += [c.with_suffix(e) for c in candidates[:1] for e in IMAGE_EXTENSIONS]
        partner = next((c for c in candidates if c.is_file()), None)
        pair = Pair(img.stem, img, partner, [] if partner else [f"no 'after' image (expected {candidates[0].name})"])
        found = refs_of.get(img.with_suffix(""), [])
        try:
            pair.refs = reference_images(img, found)
        except UserError as e:  # a gap in the numbering: training refuses the pair; shown here as a warning
            pair.warnings.append(str(e).replace(f"{img}: ", "", 1))
            pair.refs = tuple(sorted(found, key=lambda p: int(REF_SUFFIX.match(p.stem)["n"])))
        pairs.append(pair)
    return pairs


def caption_path(image: Path) -> Path:
    for ext in CAPTION_EXTENSIONS:
        if image.with_suffix(ext).is_file():
            return image.with_suffix(ext)
    return image.with_suffix(".txt")


def read_caption(image: Path) -> str:
    p = caption_path(image)
    return p.read_text(encoding="utf-8").strip() if p.is_file() else ""


def write_caption(image: Path, text: str) -> None:
    write_text_atomic(caption_path(image), " ".join(text.split()) + "\n")


def latent_factor(model: str | None) -> int:
    """Pixels per latent cell of a model's VAE (the model families know; 8 when unknown)."""
    from ..models import pixels_per_latent

    return pixels_per_latent(model)


@dataclass
class PairView:
    before: np.ndarray
    after: np.ndarray
    heat: np.ndarray
    mask: np.ndarray
    warnings: list[str]
    changed: float  # share of pixels above the threshold
    refs: list[np.ndarray] = field(default_factory=list)  # the further control images, at the before image's size


def analyse(pair: Pair, threshold: float = 10.0, dilate: int = 2, factor: int = 8) -> PairView:
    if pair.after is None:
        raise UserError(pair.warnings[0], path=pair.before)
    a, b = load_image(pair.before), load_image(pair.after)
    warnings = list(pair.warnings)
    if a.size != b.size:
        warnings.append(f"size mismatch: before {a.size[0]}x{a.size[1]}, after {b.size[0]}x{b.size[1]} "
                        "(training resizes both into one bucket)")
        b = b.resize(a.size, Image.BICUBIC)
    diff = pair_difference(a, b)
    if float(diff.max()) == 0:
        warnings.append("identical images: there is nothing to learn (training stops on this pair)")
    changed = float((diff > threshold).float().mean())
    shift = best_shift(np.asarray(a), np.asarray(b))
    if shift is not None:
        (dx, dy), gain = shift
        warnings.append(f"misaligned: 'after' is offset by ({dx}, {dy}) px (x, y) from 'before'; undoing it lowers "
                        f"the difference by {gain:.0%}; align the pair so only the change differs")
    elif changed > 0.6:
        warnings.append(f"{changed:.0%} of the pixels differ: a global change, or a misaligned pair")
    w, h = a.size
    latent_hw = (max(1, h // factor), max(1, w // factor))
    mask = difference_mask(diff, latent_hw, threshold, dilate).numpy()
    mask_px = np.asarray(Image.fromarray((mask * 255).astype(np.uint8)).resize((w, h), Image.NEAREST)) > 127
    refs = []
    for path in pair.refs:
        ref = load_image(path)
        if ref.size != a.size:
            warnings.append(f"{path.name} is {ref.size[0]}x{ref.size[1]}, before {w}x{h} (training resizes the "
                            "control images into the pair's bucket)")
            ref = ref.resize(a.size, Image.BICUBIC)
        refs.append(np.asarray(ref))
    return PairView(np.asarray(a), np.asarray(b), heat_map(diff.numpy()), overlay(np.asarray(a), mask_px),
                    warnings, changed, refs)


def pair_label(pair: Pair, view: PairView) -> str:
    """The gallery caption of a pair: its name, its control images when it has more than the before image, and its
    warnings or how much of it changed."""
    label = pair.name
    if pair.refs:
        names = ", ".join(p.name for p in pair.refs)
        label += f" · {1 + len(pair.refs)} control images (before, {names}) → after"
    if view.warnings:
        return label + " ⚠ " + "; ".join(view.warnings)
    return label + f" · {view.changed:.1%} changed"


def best_shift(a: np.ndarray, b: np.ndarray, radius: int = 3, gain: float = 0.3):
    """((dx, dy), relative gain) when `b` is `a` moved by (dx, dy) pixels, more or less; else None."""
    h, w = a.shape[:2]
    if min(h, w) <= 4 * radius:
        return None
    fa, fb = a.astype(np.float32), b.astype(np.float32)
    crop = (slice(radius, h - radius), slice(radius, w - radius))
    base = np.abs(fa[crop] - fb[crop]).mean()
    if base < 1.0:
        return None
    best, where = base, (0, 0)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            shifted = fb[radius + dy:h - radius + dy, radius + dx:w - radius + dx]
            d = np.abs(fa[crop] - shifted).mean()
            if d < best:
                best, where = d, (dx, dy)
    improvement = 1 - best / base
    return (where, improvement) if where != (0, 0) and improvement > gain else None


def heat_map(diff: np.ndarray) -> np.ndarray:
    """|difference| (0..765) as black -> red -> yellow -> white."""
    x = np.clip(diff / 255.0, 0, 3) / 3  # saturates at an RGB sum of 765
    x = np.sqrt(x)  # small differences stay visible
    r = np.clip(3 * x, 0, 1)
    g = np.clip(3 * x - 1, 0, 1)
    b = np.clip(3 * x - 2, 0, 1)
    return (np.stack([r, g, b], axis=-1) * 255).astype(np.uint8)


def overlay(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The image dimmed outside the mask and tinted inside it."""
    out = image.astype(np.float32) * 0.35
    inside = image.astype(np.float32) * 0.6 + np.array([0, 160, 255], np.float32) * 0.4
    out[mask] = inside[mask]
    return out.clip(0, 255).astype(np.uint8)


def import_uploads(files: list[str], dest: Path, replace: bool = False) -> list[str]:
    """Copy uploaded images/captions into a pair folder; one line per file.

    The whole batch is checked first (the CLI's image checks, UTF-8 captions, sizes, two uploads of
    one name, names already in the folder unless `replace`), so a refused batch writes nothing; a
    write that fails (a full disk) removes the files this batch created, and the folder if it made it.
    """
    checked, report, names = [], [], {}
    for f in files:
        src = Path(f)
        name = os.path.basename(src.name)
        key = name.casefold()  # one file on case-insensitive file systems
        if key in names:
            raise UserError(f"two uploads are named {names[key]!r} and {name!r}; nothing was added", path=name)
        names[key] = name
        size = src.stat().st_size
        if size > MAX_UPLOAD_BYTES:
            raise UserError(f"upload is {size / 2**20:.1f} MiB, over the {MAX_UPLOAD_BYTES // 2**20} MiB limit; "
                            "nothing was added", path=name)
        suffix = src.suffix.lower()
        if suffix in CAPTION_EXTENSIONS:
            try:
                text = src.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                raise UserError("caption is not UTF-8 text; nothing was added", path=name) from None
            checked.append((src, name, text))
            report.append(name)
        elif suffix in IMAGE_EXTENSIONS:
            try:
                img = load_image(src)  # the CLI's checks: format, size limit, truncation, minimum size
            except UserError as e:  # named as the user named the file, not by Gradio's upload copy
                raise UserError(f"{str(e).replace(f'{src}: ', '', 1)}; nothing was added", path=name) from None
            checked.append((src, name, None))
            report.append(f"{name}: {img.size[0]}x{img.size[1]}")
        else:
            raise UserError(f"not an image ({', '.join(IMAGE_EXTENSIONS)}) or caption (.txt, .caption); "
                            "nothing was added", path=name)
    if not replace and dest.is_dir():
        present = {p.name.casefold(): p.name for p in dest.iterdir()}
        clash = [present[n] for n in names if n in present]
        if clash:
            raise UserError(f"{len(clash)} upload(s) would replace files in the folder (first: {clash[0]}); "
                            "nothing was added", path=dest, hint="tick 'replace existing files' to replace them")
    made_folder = not dest.exists()
    created = []
    try:
        dest.mkdir(parents=True, exist_ok=True)
        for src, name, text in checked:
            if not (dest / name).exists():
                created.append(dest / name)
            if text is not None:
                write_text_atomic(dest / name, text)
            else:
                with atomic_path(dest / name) as tmp:
                    shutil.copyfile(src, tmp)
    except BaseException:
        for path in created:
            path.unlink(missing_ok=True)
        if made_folder and dest.is_dir() and not any(dest.iterdir()):
            dest.rmdir()
        raise
    return report
