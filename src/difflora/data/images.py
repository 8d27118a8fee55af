"""Reading user images safely: one clear error per bad file, never a traceback."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MAX_PIXELS = 64 * 1024 * 1024  # larger images are refused before decoding (decompression bombs)
MIN_SIDE = 8


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def load_image(path: str | Path) -> Image.Image:
    """An RGB image with EXIF orientation applied.

    Palette, grey, CMYK and 16-bit images are converted; transparency is composited on white.
    """
    path = Path(path)
    if not path.exists():
        raise UserError("image not found", path=path)
    if path.stat().st_size == 0:
        raise UserError("image file is empty (0 bytes)", path=path)
    old = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = MAX_PIXELS
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w * h > MAX_PIXELS:
                    raise UserError(f"image is {w}x{h}, over the {MAX_PIXELS // 2**20} Mpx limit (possible "
                                    "decompression bomb); downscale it", path=path)
                im.load()
                img = ImageOps.exif_transpose(im)
                img = to_rgb(img)
    except UserError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        if isinstance(e, UnidentifiedImageError):
            raise UserError("not an image file (unrecognised format); remove it or fix its extension", path=path) from None
        raise UserError("image is too large to decode safely (possible decompression bomb)", path=path) from None
    except (OSError, SyntaxError, ValueError) as e:
        raise UserError(f"truncated or corrupt image ({e}); re-export it or remove it", path=path) from None
    finally:
        Image.MAX_IMAGE_PIXELS = old
    if min(img.size) < MIN_SIDE:
        raise UserError(f"image is {img.size[0]}x{img.size[1]}, too small to train on (minimum {MIN_SIDE} px)", path=path)
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img).astype(np.float64)
        top = 65535.0 if arr.max() > 255 else 255.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    if mode == "F":
        arr = np.asarray(img).astype(np.float64)
        arr = np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode in ("RGB;16", "RGBA;16", "RGBX"):
        return img.convert("RGB")
    return img.convert("RGB")  # P, L, 1, CMYK, YCbCr, LAB, HSV


def resize_and_crop(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize to cover (w, h) keeping the aspect ratio, then centre-crop (kohya's bucket fit)."""
    w, h = size
    sw, sh = img.size
    scale = max(w / sw, h / sh)
    nw, nh = max(w, round(sw * scale)), max(h, round(sh * scale))
    if (nw, nh) != (sw, sh):
        img = img.resize((nw, nh), Image.LANCZOS if scale < 1 else Image.BICUBIC)
    left, top = (nw - w) // 2, (nh - h) // 2
    return img.crop((left, top, left + w, top + h))


def to_tensor(img: Image.Image):
    import torch

    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()
