"""Where the subject of a photo is: a saliency map from numpy alone (focus crop).

Two cues, each a classic that needs no trained weights:
- spectral residual (Hou & Zhang, CVPR 2007): what the log-amplitude spectrum has beyond its local
  average is the image's "unexpected" part (objects, faces, text), found at a coarse scale;
- contrast to the background: the background is modelled by the colours of the four borders
  (one median per side), and a pixel's distance to the nearest of them marks the foreground.
The map is their normalised mean times a centre prior (a gaussian of `CENTRE_SIGMA` times each side:
photographers centre subjects, and every saliency benchmark's fixations show it), computed at a
working size of at most `WORK_SIDE` pixels.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from ..data.alignment import blur

WORK_SIDE = 128  # the map is computed at this long side
CENTRE_SIGMA = 0.4
RESIDUAL_SIDE = 64  # spectral residual works on a coarse image (its scale selects object-sized structure)


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
