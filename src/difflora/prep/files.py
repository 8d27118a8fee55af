"""The images, pairs and caption files of a folder, as `difflora prep` reads them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..data.images import IMAGE_EXTENSIONS, is_image_file
from ..errors import UserError

CAPTION_EXTENSIONS = (".txt", ".caption")


@dataclass(frozen=True)
class Entry:
    """One image, or one pair (`after` set) of a folder."""

    before: Path
    after: Path | None = None

    @property
    def name(self) -> str:
        return self.before.stem

    @property
    def paths(self) -> list[Path]:
        return [self.before] + ([self.after] if self.after is not None else [])


def images_in(folder: Path, recursive: bool = False) -> list[Path]:
    if not folder.exists():
        raise UserError("folder not found", path=folder)
    if not folder.is_dir():
        raise UserError("is not a folder", path=folder)
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in found if p.is_file() and is_image_file(p))


def entries_in(folder: Path, after_suffix: str = "_after", recursive: bool = False,
               require: bool = True) -> list[Entry]:
    """Images of `folder`, grouped into pairs where `NAME<after_suffix>.<ext>` sits beside `NAME.<ext>`.

    An `..._after` image without its "before" partner is kept as a single image.
    """
    files = images_in(folder, recursive)
    if require and not files:
        raise UserError(f"no images in folder (looked for {', '.join(IMAGE_EXTENSIONS)})", path=folder)
    by_stem = {(p.parent, p.stem): p for p in files}
    paired_afters = set()
    out = []
    for p in files:
        if after_suffix and p.stem.endswith(after_suffix) and (p.parent, p.stem[: -len(after_suffix)]) in by_stem:
            paired_afters.add(p)
    for p in files:
        if p in paired_afters:
            continue
        after = by_stem.get((p.parent, p.stem + after_suffix)) if after_suffix else None
        out.append(Entry(p, after))
    return out


def caption_path(image: Path, extension: str | None = None) -> Path | None:
    """The caption file beside `image` (the given extension, else .txt then .caption), or None."""
    exts = [extension if extension.startswith(".") else "." + extension] if extension else list(CAPTION_EXTENSIONS)
    for ext in exts:
        p = image.with_name(image.stem + ext)
        if p.is_file():
            return p
    return None
