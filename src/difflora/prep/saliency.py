"""Where the subject of a photo is (focus crop): a saliency map, plus where the people are.

`saliency_map`: two cues, each a classic that needs no trained weights:
- spectral residual (Hou & Zhang, CVPR 2007): what the log-amplitude spectrum has beyond its local
  average is the image's "unexpected" part (objects, faces, text), found at a coarse scale;
- contrast to the background: the background is modelled by the colours of the four borders
  (one median per side), and a pixel's distance to the nearest of them marks the foreground.
The map is their normalised mean times a centre prior (a gaussian of `CENTRE_SIGMA` times each side:
photographers centre subjects, and every saliency benchmark's fixations show it), computed at a
working size of at most `WORK_SIDE` pixels.

`focus_map` adds people on top, because a portrait's subject is a face and saliency alone ranks the
hair over the chin (the hair is wider and further from the background colour than the skin is) and
a bright orange suit over the head above it:
- salient skin: pixels whose rg chromaticity lies near the skin locus (a segment from light to dark
  skin), weighted by the saliency so a skin-coloured wall does not count;
- faces found by scikit-image's LBP frontal-face cascade (OpenCV's trained file, shipped with
  scikit-image), kept only where their centre is skin-coloured, widened to the whole head (hair
  above, chin below).
Both count `PEOPLE_WEIGHT` times as much as the saliency.
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image

from ..data.alignment import blur

WORK_SIDE = 128  # the map is computed at this long side
CENTRE_SIGMA = 0.4
RESIDUAL_SIDE = 64  # spectral residual works on a coarse image (its scale selects object-sized structure)
# rg chromaticity (R/(R+G+B), G/(R+G+B)) of light and of dark skin; skin of every tone lies near the
# segment between them (the "skin locus"), brown or blonde hair and orange cloth further off.
SKIN_LOCUS = ((0.39, 0.33), (0.47, 0.314))
SKIN_SIGMA = 0.02  # chromaticity distance at which a colour counts e^-0.5 as skin
SKIN_MIN_VALUE = 50  # darker pixels (max channel) carry no reliable chromaticity
PEOPLE_WEIGHT = 30.0  # people first: saliency only decides where the crop goes around them
FACE_SIDE = 512  # faces are searched at this long side (faces >= 24 px there, ~5% of it)
FACE_MIN_SKIN = 0.3  # a detection whose central half is less skin than this is not a face
# A detected face box (eyebrows to mouth) grown to the head: hair above, chin below, ears aside.
HEAD_GROW = {"left": 0.25, "top": 0.6, "right": 0.25, "bottom": 0.3}


def _normalise(m: np.ndarray) -> np.ndarray:
    lo, hi = float(m.min()), float(m.max())
    return (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)


def _resize(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """float (H, W[, C]) -> (h, w[, C]) with PIL's area-aware bilinear filter, per channel."""
    if arr.ndim == 2:
        return np.asarray(Image.fromarray(arr.astype(np.float32), mode="F").resize(size, Image.BILINEAR))
    return np.stack([_resize(arr[..., c], size) for c in range(arr.shape[2])], axis=2)


def spectral_residual(grey: np.ndarray) -> np.ndarray:
    """Hou & Zhang's spectral residual saliency of a 2-D array (same shape, >= 0)."""
    f = np.fft.fft2(grey - grey.mean())
    log_amp = np.log(np.abs(f) + 1e-8)
    phase = np.angle(f)
    h, w = grey.shape
    pad = np.pad(log_amp, 1, mode="wrap")  # the spectrum is periodic
    local = sum(pad[1 + dy:1 + dy + h, 1 + dx:1 + dx + w] for dy in (-1, 0, 1) for dx in (-1, 0, 1)) / 9.0
    sal = np.abs(np.fft.ifft2(np.exp(log_amp - local + 1j * phase))) ** 2
    return blur(sal, 0.04 * max(h, w))


def border_contrast(rgb: np.ndarray) -> np.ndarray:
    """Distance of each pixel's colour to the nearest of the four borders' median colours."""
    h, w, _ = rgb.shape
    b = max(1, min(h, w) // 16)
    sides = [rgb[:b].reshape(-1, 3), rgb[-b:].reshape(-1, 3), rgb[:, :b].reshape(-1, 3), rgb[:, -b:].reshape(-1, 3)]
    medians = np.stack([np.median(s, axis=0) for s in sides])
    dist = np.sqrt(((rgb[:, :, None, :] - medians[None, None]) ** 2).sum(-1)).min(axis=2)
    return blur(dist, 0.02 * max(h, w))


def saliency_map(rgb: np.ndarray) -> np.ndarray:
    """(h, w) map in [0, 1] at the working size (long side <= WORK_SIDE) of a uint8 (H, W, 3) image."""
    H, W = rgb.shape[:2]
    s = min(1.0, WORK_SIDE / max(H, W))
    size = (max(1, round(W * s)), max(1, round(H * s)))
    work = _resize(rgb.astype(np.float32) / 255.0, size)
    r = min(1.0, RESIDUAL_SIDE / max(size))
    coarse = _resize(work.mean(axis=2), (max(1, round(size[0] * r)), max(1, round(size[1] * r))))
    residual = _resize(_normalise(spectral_residual(coarse)).astype(np.float32), size)
    sal = 0.5 * _normalise(residual) + 0.5 * _normalise(border_contrast(work))
    h, w = sal.shape
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    prior = np.exp(-0.5 * (((yy - h / 2) / (CENTRE_SIGMA * h)) ** 2 + ((xx - w / 2) / (CENTRE_SIGMA * w)) ** 2))
    return _normalise(sal * prior)


def skin_map(rgb: np.ndarray) -> np.ndarray:
    """How skin-coloured each pixel of a (H, W, 3) image is, in [0, 1] (same H, W)."""
    f = rgb.astype(np.float32)
    total = f.sum(axis=2) + 1e-6
    chroma = np.stack([f[..., 0] / total, f[..., 1] / total], axis=-1)
    a, b = np.asarray(SKIN_LOCUS[0], np.float32), np.asarray(SKIN_LOCUS[1], np.float32)
    along = np.clip(((chroma - a) @ (b - a)) / float((b - a) @ (b - a)), 0.0, 1.0)
    dist = np.linalg.norm(chroma - (a + along[..., None] * (b - a)), axis=-1)
    return np.exp(-0.5 * (dist / SKIN_SIGMA) ** 2) * (f.max(axis=2) >= SKIN_MIN_VALUE)


@functools.cache
def _face_cascade():
    """scikit-image's frontal-face detector (imported here: only focus crop pays for loading it)."""
    from skimage.data import lbp_frontal_face_cascade_filename
    from skimage.feature import Cascade

    return Cascade(lbp_frontal_face_cascade_filename())


def head_boxes(rgb: np.ndarray) -> list[tuple[float, float, float, float]]:
    """(left, top, right, bottom) of each head whose face the cascade finds, in image pixels."""
    H, W = rgb.shape[:2]
    s = min(1.0, FACE_SIDE / max(H, W))
    size = (max(1, round(W * s)), max(1, round(H * s)))
    small = np.asarray(Image.fromarray(rgb).resize(size, Image.BILINEAR)) if s < 1 else rgb
    if min(size) < 24:  # the cascade's own window
        return []
    # 5 overlapping hits per face: at 3 the cascade also "finds" faces in a cat's fur and a coffee cup.
    found = _face_cascade().detect_multi_scale(img=small, scale_factor=1.2, step_ratio=1, min_size=(24, 24),
                                               max_size=(min(size), min(size)), min_neighbor_number=5)
    skin = skin_map(small)
    boxes = []
    for d in found:
        x, y, w, h = d["c"], d["r"], d["width"], d["height"]
        if skin[y + h // 4:y + 3 * h // 4, x + w // 4:x + 3 * w // 4].mean() < FACE_MIN_SKIN:
            continue  # e.g. the astronaut's helmet visor: a face has skin between its eyes and mouth
        g = HEAD_GROW
        boxes.append(((x - g["left"] * w) / s, (y - g["top"] * h) / s, (x + (1 + g["right"]) * w) / s,
                      (y + (1 + g["bottom"]) * h) / s))
    return boxes


def focus_map(rgb: np.ndarray) -> np.ndarray:
    """The saliency map with salient skin and detected heads on top: what focus crop keeps, in [0, 1]."""
    sal = saliency_map(rgb)
    h, w = sal.shape
    H, W = rgb.shape[:2]
    people = blur(skin_map(_resize(rgb.astype(np.float32), (w, h))), 1.0) * sal
    people = _normalise(people) if people.max() > 0 else people
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    for left, top, right, bottom in head_boxes(rgb):
        people = people + ((xx >= left * w / W) & (xx <= right * w / W) & (yy >= top * h / H)
                           & (yy <= bottom * h / H))
    if people.max() > 0:
        sal = sal + PEOPLE_WEIGHT * people / people.max()
    return _normalise(sal)
