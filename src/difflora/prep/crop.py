"""Crop boxes for `difflora prep crop`: center, focus (the salient subject) or none.

A box has the target's aspect ratio and is as large as the image allows; focus crop slides it
along the one free axis to the position that keeps the most saliency, and where a range of positions
keeps nearly all of it (within `FOCUS_TOLERANCE`), to the middle of that range (the subject centred).
A pair gets one box, computed from both images' saliency plus where they differ, so the two crops
stay aligned and the difference stays inside.

Upscaling follows kohya's `bucket_no_upscale`: without it a box smaller than the target is
upscaled and flagged; with it such an image is skipped (fixed size), or with aspect buckets kept
at its own size rounded down to the bucket step (kohya's no-upscale bucket).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np

from ..data.alignment import blur
from .saliency import _resize, focus_map

MODES = ("center", "focus", "none")
FOCUS_TOLERANCE = 0.02  # positions keeping >= 98% of the best window's saliency count as equally good
BUCKET_STEP = 64  # kohya's bucket_reso_steps default


def parse_size(text: str) -> tuple[int, int]:
    """'512' -> (512, 512); '768x512' -> (768, 512) (width x height)."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:[x,]\s*(\d+))?\s*", str(text))
    if not m:
        raise ValueError(f"size must be N or WIDTHxHEIGHT, got {text!r}")
    w = int(m.group(1))
    h = int(m.group(2) or w)
    if w < 8 or h < 8:
        raise ValueError(f"size {w}x{h} is too small (minimum 8 px)")
    return w, h


def bucket_for(image_size: tuple[int, int], size: tuple[int, int], no_upscale: bool) -> tuple[int, int]:
    """kohya's aspect bucket for an image at resolution `size` (area), default bucket settings."""
    from ..data.dataset import choose_bucket, make_bucket_resolutions, no_upscale_bucket

    area = size[0] * size[1]
    if no_upscale:
        return no_upscale_bucket(image_size, area, BUCKET_STEP)
    buckets = make_bucket_resolutions(size, min(256, min(size)), max(1024, max(size)), BUCKET_STEP)
    return choose_bucket(image_size, buckets)


@dataclass
class Plan:
    """What happens to one image or pair: the box (left, top, right, bottom) and the output size."""

    box: tuple[int, int, int, int]
    out_size: tuple[int, int]
    flags: list[str] = field(default_factory=list)
    skipped: str | None = None

    @property
    def scale(self) -> float:
        return self.out_size[0] / max(1, self.box[2] - self.box[0])


def largest_box(image_size: tuple[int, int], aspect: float) -> tuple[int, int]:
    """(w, h) of the largest box of aspect w/h inside the image."""
    W, H = image_size
    if W / H > aspect:
        return max(1, min(W, round(H * aspect))), H
    return W, max(1, min(H, round(W / aspect)))


def window_offset(profile: np.ndarray, window: float, tolerance: float = FOCUS_TOLERANCE) -> float:
    """Start (in profile cells, fractional) of the window of length `window` along a 1-D saliency profile."""
    n = len(profile)
    if window >= n:
        return 0.0
    cum = np.concatenate([[0.0], np.cumsum(profile)])
    starts = np.linspace(0.0, n - window, max(2, 4 * n + 1))
    ends = starts + window
    mass = np.interp(ends, np.arange(n + 1), cum) - np.interp(starts, np.arange(n + 1), cum)
    total = float(cum[-1])
    if total <= 0:
        return (n - window) / 2
    good = mass >= mass.max() - tolerance * total
    best = int(np.argmax(mass))
    lo, hi = best, best  # the run of near-best positions around the best one; its middle centres the subject
    while lo > 0 and good[lo - 1]:
        lo -= 1
    while hi < len(good) - 1 and good[hi + 1]:
        hi += 1
    return float((starts[lo] + starts[hi]) / 2)


def focus_box(sal: np.ndarray, image_size: tuple[int, int], box_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The box of `box_size` (source pixels) placed on the saliency map `sal` (any resolution)."""
    W, H = image_size
    bw, bh = box_size
    h, w = sal.shape
    if bw < W:
        cells = bw * w / W
        left = round(window_offset(sal.sum(axis=0), cells) * W / w)
        left = min(max(0, left), W - bw)
        return left, 0, left + bw, bh if bh <= H else H
    if bh < H:
        cells = bh * h / H
        top = round(window_offset(sal.sum(axis=1), cells) * H / h)
        top = min(max(0, top), H - bh)
        return 0, top, bw, top + bh
    return 0, 0, W, H


def center_box(image_size: tuple[int, int], box_size: tuple[int, int]) -> tuple[int, int, int, int]:
    W, H = image_size
    bw, bh = box_size
    left, top = (W - bw) // 2, (H - bh) // 2
    return left, top, left + bw, top + bh


def subject_map(images: list[np.ndarray]) -> np.ndarray:
    """Saliency of one image, or of a pair: the mean of both maps plus where the two differ."""
    maps = [focus_map(im) for im in images]
    sal = sum(maps) / len(maps)
    if len(images) == 2 and images[0].shape == images[1].shape:
        diff = np.abs(images[0].astype(np.float32) - images[1].astype(np.float32)).max(axis=2)
        diff = blur(_resize(diff, (sal.shape[1], sal.shape[0])), 1.0)
        if diff.max() > 0:
            sal = sal + diff / diff.max()
    return sal


def plan_crop(images: list[np.ndarray], mode: str, size: tuple[int, int], aspect_buckets: bool,
              no_upscale: bool) -> Plan:
    """The box and output size for one image (or a pair, given as two same-size arrays)."""
    H, W = images[0].shape[:2]
    target = bucket_for((W, H), size, no_upscale) if aspect_buckets else size
    if mode == "none":
        s = min(1.0, math.sqrt(size[0] * size[1] / (W * H)))
        return Plan((0, 0, W, H), (max(1, round(W * s)), max(1, round(H * s))))
    box_size = largest_box((W, H), target[0] / target[1])
    if mode == "center":
        box = center_box((W, H), box_size)
    else:
        box = focus_box(subject_map(images), (W, H), box_size)
    plan = Plan(box, target)
    scale = target[0] / box_size[0]
    if scale > 1.0 + 1e-6:
        if no_upscale:
            plan.skipped = (f"{W}x{H} would need upscaling x{scale:.2f} to {target[0]}x{target[1]} "
                            "(bucket_no_upscale)")
        else:
            plan.flags.append(f"upscaled x{scale:.2f}")
    return plan
