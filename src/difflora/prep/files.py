"""The images, pairs and caption files of a folder, as `difflora prep` reads them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..data.images import IMAGE_EXTENSIONS, is_image_file
from ..errors import UserError

CAPTION_EXTENSIONS = (".txt", ".caption")


@dataclass(frozen=True)
class Entry:
    """One image, or one pair (`after` set) of a folder with its further control images (NAME_ref1.png, ...)."""

    before: Path
    after: Path | None = None
    refs: tuple[Path, ...] = ()

    @property
    def name(self) -> str:
        return self.before.stem

    @property
    def paths(self) -> list[Path]:
        """The image, or the pair's before and after."""
        return [self.before] + ([self.after] if self.after is not None else [])

    @property
    def all_paths(self) -> list[Path]:
        """`paths` and the pair's control images: every file a copy of the entry must carry."""
        return self.paths + list(self.refs)


def images_in(folder: Path, recursive: bool = False) -> list[Path]:
    if not folder.exists():
        raise UserError("folder not found", path=folder)
    if not folder.is_dir():
        raise UserError("is not a folder", path=folder)
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in found if p.is_file() and is_image_file(p))


def entries_in(folder: Path, after_suffix: str = "_after", recursive: bool = False,
               require: bool = True) -> list[Entry]:
    """Images of `folder`, grouped into pairs where `NAME<after_suffix>.<ext>` sits beside `NAME.<ext>`; a pair's
    `NAME_ref1.<ext>`, `NAME_ref2.<ext>`, ... are its further control images (as training reads them), numbered
    without gaps (else UserError).

    An `..._after` image without its "before" partner is kept as a single image, and so is a `NAME_ref1` image
    whose NAME is no pair.
    """
    from ..data.dataset import REF_SUFFIX, reference_images

    files = images_in(folder, recursive)
    if require and not files:
        raise UserError(f"no images in folder (looked for {', '.join(IMAGE_EXTENSIONS)})", path=folder)
    by_stem = {(p.parent, p.stem): p for p in files}
    paired_afters = set()
    for p in files:
        if after_suffix and p.stem.endswith(after_suffix) and (p.parent, p.stem[: -len(after_suffix)]) in by_stem:
            paired_afters.add(p)
    entries = []
    for p in files:
        if p in paired_afters:
            continue
        after = by_stem.get((p.parent, p.stem + after_suffix)) if after_suffix else None
        entries.append(Entry(p, after))
    pair_bases = {e.before.with_suffix("") for e in entries if e.after is not None}
    refs_of: dict[Path, list[Path]] = {}
    for e in entries:
        m = REF_SUFFIX.match(e.before.stem)
        if e.after is None and m and e.before.with_name(m["base"]) in pair_bases:
            refs_of.setdefault(e.before.with_name(m["base"]), []).append(e.before)
    refs = {p for found in refs_of.values() for p in found}
    out = []
    for e in entries:
        if e.before in refs:
            continue  # carried by its pair
        found = refs_of.get(e.before.with_suffix(""))
        out.append(Entry(e.before, e.after, reference_images(e.before, found)) if found else e)
    return out


def caption_path(image: Path, extension: str | None = None) -> Path | None:
    """The caption file beside `image` (the given extension, else .txt then .caption), or None."""
    exts = [extension if extension.startswith(".") else "." + extension] if extension else list(CAPTION_EXTENSIONS)
    for ext in exts:
        p = image.with_name(image.stem + ext)
        if p.is_file():
            return p
    return None
