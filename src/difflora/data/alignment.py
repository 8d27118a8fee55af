"""How the two images of a pair line up: global shift, scale and rotation, and the changed area.

Both work on edge maps (gradient magnitude), which a recoloured background leaves in place.
Translation is phase correlation (the normalised cross-power spectrum's inverse FFT peaks at the
shift) with a Hann window, refined to 1/20 px by evaluating that inverse DFT on a fine grid around
the peak, then finished by a least-squares (Lucas-Kanade) fit on the pixels the edit left alone
(`refine_on_unchanged`). Scale and rotation come first, from the same correlation on the log-polar resampled
magnitude spectra (Fourier-Mellin: the magnitude ignores translation; log-polar turns scale and
rotation into shifts). Everything is numpy.

`blur` is also the blur of prep's saliency map. `difflora prep pairs` reports and applies all of
this; training calls `misalignment` on every pair it loads.

A shift (dx, dy) means the content of "after" sits (dx, dy) pixels right/down of where it is in
"before": after(x, y) = before(x - dx, y - dy).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CHANGE_THRESHOLD = 0.1  # a pixel "changed" when a channel differs by more than this (0..1) after alignment
MISALIGNED_SHIFT = 0.5  # px
MISALIGNED_SCALE = 0.02  # relative (the log-polar grid resolves about 1-3% on small images)
MISALIGNED_ROTATION = 1.0  # degrees
ALMOST_EVERYWHERE = 0.75  # changed-area fraction above which a pair "differs almost everywhere"
# The final fit uses only pixels that differ by less than this (0..1): a faint texture edit (the toy
# style edit's stripes, +-0.06) passes CHANGE_THRESHOLD but would pull the fit along with it.
FIT_THRESHOLD = 0.03
LK_ITERATIONS = 20  # Gauss-Newton steps of the final refinement (it converges in 2-5 on toy pairs)


def _kernel(sigma: float) -> np.ndarray:
    r = max(1, int(3 * sigma))
    t = np.arange(-r, r + 1)
    k = np.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def _blur_axis(img: np.ndarray, k: np.ndarray, axis: int) -> np.ndarray:
    r = len(k) // 2
    n = img.shape[axis]
    pad = [(0, 0)] * img.ndim
    pad[axis] = (r, r)
    p = np.pad(img, pad, mode="symmetric" if r <= n else "edge")
    out = np.zeros(img.shape, np.float64)
    for i, w in enumerate(k):  # a sum of shifted copies: no BLAS call, so no thread start-up per image
        out += w * np.take(p, np.arange(i, i + n), axis=axis)
    return out


def blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable gaussian blur of a 2-D array, borders reflected."""
    if sigma <= 0:
        return img.astype(np.float64)
    k = _kernel(sigma)
    return _blur_axis(_blur_axis(img, k, 0), k, 1)


@dataclass
class PairReport:
    shift: tuple[float, float]
    scale: float
    rotation: float  # degrees, counter-clockwise
    changed_fraction: float
    flags: list[str]

    def to_dict(self) -> dict:
        return {"shift_x": round(self.shift[0], 3), "shift_y": round(self.shift[1], 3), "scale": round(self.scale, 4),
                "rotation_deg": round(self.rotation, 3), "changed_fraction": round(self.changed_fraction, 4),
                "flags": list(self.flags)}


def grey(img: np.ndarray) -> np.ndarray:
    a = img.astype(np.float64) / 255.0 if img.dtype == np.uint8 else img.astype(np.float64)
    return a.mean(axis=2) if a.ndim == 3 else a


def edges(img: np.ndarray) -> np.ndarray:
    """Gradient magnitude of the lightly blurred grey image: where edges are, whatever their polarity
    (a new background colour can turn a dark-to-light edge into light-to-dark; edges stay put)."""
    g = blur(grey(img), 0.7)
    gy, gx = np.gradient(g)
    return np.hypot(gx, gy)


def _hann(h: int, w: int) -> np.ndarray:
    return np.outer(np.hanning(h), np.hanning(w))


def _peak(surface: np.ndarray) -> tuple[float, float]:
    """(row, col) of the maximum of a periodic surface, refined by a parabola in each axis."""
    h, w = surface.shape
    r, c = np.unravel_index(int(np.argmax(surface)), surface.shape)

    def refine(m1: float, m0: float, p1: float) -> float:
        den = m1 - 2 * m0 + p1
        return 0.0 if den >= 0 else float(np.clip(0.5 * (m1 - p1) / den, -0.5, 0.5))

    dr = refine(surface[(r - 1) % h, c], surface[r, c], surface[(r + 1) % h, c])
    dc = refine(surface[r, (c - 1) % w], surface[r, c], surface[r, (c + 1) % w])
    return r + dr, c + dc


def _refine(cross: np.ndarray, dy: float, dx: float, upsample: int = 20) -> tuple[float, float]:
    """The correlation peak near (dy, dx) on a grid `upsample` times finer: the inverse DFT of the
    cross-power spectrum evaluated only there (two small matrix products, Guizar-Sicairos 2008)."""
    h, w = cross.shape
    n = int(1.2 * upsample) | 1  # +-0.6 px: the chosen peak, never a neighbouring one
    ys = dy + (np.arange(n) - n // 2) / upsample
    xs = dx + (np.arange(n) - n // 2) / upsample
    ky = np.exp(2j * np.pi * ys[:, None] * np.fft.fftfreq(h)[None, :])
    kx = np.exp(2j * np.pi * np.fft.fftfreq(w)[:, None] * xs[None, :])
    # einsum's own loops: a BLAS call here pays a thread-pool start-up far larger than the product
    rows = np.einsum("ij,jk->ik", ky, cross, optimize=False)
    surface = np.real(np.einsum("ik,kl->il", rows, kx, optimize=False))
    r, c = np.unravel_index(int(np.argmax(surface)), surface.shape)
    return float(ys[r]), float(xs[c])


def edge_misfit(ea: np.ndarray, eb: np.ndarray) -> float:
    """Mean |ea - eb| of two edge maps: how badly they disagree. Compared between candidate shifts, it
    picks the true one on every toy pair of every attribute (40 pairs, shifted and not; the median,
    over all pixels or over the edges only, failed on flat backgrounds and on edits that add edges)."""
    return float(np.abs(ea - eb).mean())


def _shifted_misfit(a: np.ndarray, b: np.ndarray, dy: int, dx: int) -> float:
    """edge_misfit of a(p) against b(p + d) over their overlap."""
    h, w = a.shape
    ya, yb = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xa, xb = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    if a[ya, xa].size == 0:
        return float("inf")
    return edge_misfit(a[ya, xa], b[yb, xb])


def phase_correlation(a: np.ndarray, b: np.ndarray, window: bool = True,
                      candidates: int = 0) -> tuple[tuple[float, float], tuple[int, int]]:
    """(dy, dx) with b(y, x) ~ a(y - dy, x - dx), to 1/20 px, and the whole-pixel peak it refines,
    for 2-D arrays of one shape.

    With `candidates` > 0 the highest peaks (and zero shift) of edge maps `a`, `b` are compared by
    `edge_misfit` over their overlap, so a strong local change (closed eyes, added glasses) cannot pass
    for a shift. `whole`: the
    whole-pixel peak, not refined.
    """
    h, w = a.shape
    win = _hann(h, w) if window else 1.0
    fa = np.fft.fft2((a - a.mean()) * win)
    fb = np.fft.fft2((b - b.mean()) * win)
    cross = fb * np.conj(fa)
    cross /= np.abs(cross) + 1e-12
    surface = np.real(np.fft.ifft2(cross))

    def wrap(r: float, c: float) -> tuple[float, float]:
        return (r - h if r > h / 2 else r), (c - w if c > w / 2 else c)

    dy, dx = wrap(*_peak(surface))
    if candidates:
        order = np.argsort(surface, axis=None)[::-1][:candidates]
        options = {(round(dy), round(dx)), (0, 0)}
        options |= {tuple(int(v) for v in wrap(*np.unravel_index(int(i), surface.shape))) for i in order}
        dy, dx = min(options, key=lambda o: (_shifted_misfit(a, b, int(o[0]), int(o[1])), abs(o[0]) + abs(o[1])))
    whole = (int(round(dy)), int(round(dx)))
    return _refine(cross, *whole), whole


def sample_bilinear(img: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Values of img (H, W[, C]) at float coordinates, and a mask of coordinates inside the image."""
    h, w = img.shape[:2]
    inside = (ys >= -1e-6) & (ys <= h - 1 + 1e-6) & (xs >= -1e-6) & (xs <= w - 1 + 1e-6)
    y = np.clip(ys, 0, h - 1)
    x = np.clip(xs, 0, w - 1)
    y0 = np.floor(y).astype(int)
    x0 = np.floor(x).astype(int)
    y1 = np.minimum(y0 + 1, h - 1)
    x1 = np.minimum(x0 + 1, w - 1)
    fy, fx = y - y0, x - x0
    if img.ndim == 3:
        fy, fx = fy[..., None], fx[..., None]
    f = img.astype(np.float64)
    out = (f[y0, x0] * (1 - fy) * (1 - fx) + f[y0, x1] * (1 - fy) * fx
           + f[y1, x0] * fy * (1 - fx) + f[y1, x1] * fy * fx)
    return out, inside


def _log_polar(mag: np.ndarray, n_angle: int, n_radius: int) -> tuple[np.ndarray, float]:
    h, w = mag.shape
    cy, cx = h / 2, w / 2
    max_r = min(cy, cx)
    log_base = np.log(max_r) / n_radius
    radii = np.exp(np.arange(n_radius) * log_base)
    angles = np.arange(n_angle) * np.pi / n_angle  # the magnitude spectrum is symmetric: half a turn
    ys = cy + radii[None, :] * np.sin(angles[:, None])
    xs = cx + radii[None, :] * np.cos(angles[:, None])
    lp, _ = sample_bilinear(mag, ys, xs)
    return lp, log_base


def scale_rotation(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(scale, rotation in degrees) of b relative to a (Fourier-Mellin)."""
    h, w = a.shape
    win = _hann(h, w)
    mags = []
    for im in (a, b):
        m = np.abs(np.fft.fftshift(np.fft.fft2((im - im.mean()) * win)))
        yy, xx = np.mgrid[0:h, 0:w]
        rr = np.hypot((yy - h / 2) / h, (xx - w / 2) / w)
        mags.append(np.log1p(m) * (1 - np.cos(np.pi * np.clip(rr * 2, 0, 1))) / 2)  # high-pass: ignore DC
    n_angle, n_radius = 180, max(32, min(h, w))
    lpa, log_base = _log_polar(mags[0], n_angle, n_radius)
    lpb, _ = _log_polar(mags[1], n_angle, n_radius)
    (d_angle, d_logr), _ = phase_correlation(lpa, lpb, window=False)
    # b is a scaled by s: b's spectrum is a's shrunk by s, so its log-radius moves by -log(s).
    scale = float(np.exp(-d_logr * log_base))
    rotation = float(-d_angle * 180.0 / n_angle)  # image rows grow downwards: a counter-clockwise turn is -angle
    return scale, rotation


def _source_coords(shape: tuple[int, ...], shift: tuple[float, float], scale: float,
                   rotation: float) -> tuple[np.ndarray, np.ndarray]:
    """(ys, xs) in the moved image of every pixel of the reference frame."""
    h, w = shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    cy, cx = (h - 1) / 2, (w - 1) / 2
    th = np.deg2rad(rotation)
    # forward model: p_after = c + s R (p_before - c) + d
    u, v = xx - cx, yy - cy
    xs = cx + scale * (np.cos(th) * u + np.sin(th) * v) + shift[0]
    ys = cy + scale * (-np.sin(th) * u + np.cos(th) * v) + shift[1]
    return ys, xs


def warp(img: np.ndarray, shift: tuple[float, float], scale: float = 1.0, rotation: float = 0.0,
         fill: np.ndarray | None = None) -> np.ndarray:
    """`img` with the motion (shift, scale, rotation about the centre) undone: the "after" image on
    the "before" frame. Pixels with no source (outside the image) take `fill`'s pixels (the
    "before" image: no information there means no difference)."""
    out, inside = sample_bilinear(img, *_source_coords(img.shape, shift, scale, rotation))
    if fill is not None:
        keep = inside[..., None] if out.ndim == 3 else inside
        out = np.where(keep, out, fill.astype(np.float64))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8) if img.dtype == np.uint8 else out


def _unchanged(before: np.ndarray, after: np.ndarray, shift: tuple[float, float], scale: float, rotation: float,
               slack: int = 0) -> np.ndarray:
    """Pixels that agree (within FIT_THRESHOLD) once the motion is undone, away (about 2 px) from any
    that do not. With `slack` a pixel agrees if any "before" pixel within `slack` px does, so a shift
    that is still off by that much does not mark every edge as changed."""
    moved = warp(after, shift, scale, rotation, fill=before).astype(np.float32)
    ref = before.astype(np.float32)
    diff = np.full(before.shape[:2], np.inf, np.float32)
    for dy in range(-slack, slack + 1):
        for dx in range(-slack, slack + 1):
            d = np.abs(moved - np.roll(ref, (dy, dx), axis=(0, 1)))
            diff = np.minimum(diff, d.max(axis=2) if d.ndim == 3 else d)
    scale_to_one = 255.0 if before.dtype == np.uint8 else 1.0
    changed = blur(diff / scale_to_one, 0.7) > FIT_THRESHOLD
    return blur(changed.astype(np.float64), 1.0) < 0.02


def refine_on_unchanged(before: np.ndarray, after: np.ndarray, shift: tuple[float, float], scale: float = 1.0,
                        rotation: float = 0.0) -> tuple[float, float]:
    """The shift refined by Gauss-Newton (Lucas-Kanade) on the grey values of the pixels the edit left
    alone, starting from `shift`. Pixels that differ once the shift is undone (grown by 2 px) are left
    out: a recoloured face or background moves the correlation peak of edge maps by up to 0.7 px
    (edges change strength, not place), while outside the edit both images agree exactly at the true
    shift. The first pass lets each pixel match within 1 px (at a start 0.7 px off, misplaced edges
    would otherwise count as changed and leave only flat areas to fit); the second redraws the mask
    strictly at the first pass's shift. Returns `shift` unchanged where too little is left (< 5% of pixels), the problem is
    flat in one direction, the fit wanders more than a pixel away, or it does not fit better."""
    a, b = grey(before), grey(after)
    gy, gx = np.gradient(b)
    b_and_gradient = np.stack([b, gx, gy], axis=2)
    ys0, xs0 = _source_coords(b.shape, (0.0, 0.0), scale, rotation)  # the shift adds to these
    # Only pixels near an edge of "before" say anything about a shift (flat ones add nothing to the
    # normal equations): sampling just those makes the fit a few times cheaper.
    near_edge = blur(edges(before), 1.0) > 1e-3
    start = np.array(shift, np.float64)

    def sampled(d: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(values and gradients of "after" moved by d, "before") at the kept pixels near edges."""
        pick = keep & near_edge
        vals, inside = sample_bilinear(b_and_gradient, ys0[pick] + d[1], xs0[pick] + d[0])
        return vals[inside], a[pick][inside]

    d = start.copy()
    for slack in (1, 0):  # first with a pixel of slack (the start may be off by that), then strictly
        keep = _unchanged(before, after, (float(d[0]), float(d[1])), scale, rotation, slack)
        if keep.mean() < 0.05:
            return shift
        for _ in range(LK_ITERATIONS):
            vals, ref = sampled(d, keep)
            gx_, gy_, err = vals[:, 1], vals[:, 2], vals[:, 0] - ref
            # sums of products, not `@`: BLAS's thread pool costs more than these small products
            hessian = np.array([[np.sum(gx_ * gx_), np.sum(gx_ * gy_)], [np.sum(gx_ * gy_), np.sum(gy_ * gy_)]])
            if len(err) < 10 or np.linalg.cond(hessian) > 1e6:  # flat in some direction: nothing to fit
                return shift
            step = -np.linalg.solve(hessian, np.array([np.sum(gx_ * err), np.sum(gy_ * err)]))
            d += step
            if np.abs(d - start).max() > 1.0:
                return shift
            if np.abs(step).max() < 1e-3:
                break
    # Judged on the final mask, the fit must agree better than the start did.
    keep = _unchanged(before, after, (float(d[0]), float(d[1])), scale, rotation)

    def rms(x: np.ndarray) -> float:
        vals, ref = sampled(x, keep)
        return float(np.sqrt(np.mean((vals[:, 0] - ref) ** 2))) if len(ref) else np.inf

    if rms(d) > rms(start):
        return shift
    return float(d[0]), float(d[1])


def changed_mask(a: np.ndarray, b: np.ndarray, threshold: float = CHANGE_THRESHOLD) -> np.ndarray:
    """Pixels where any channel differs by more than `threshold` (0..1), lightly smoothed."""
    d = np.abs(a.astype(np.float64) - b.astype(np.float64)) / (255.0 if a.dtype == np.uint8 else 1.0)
    d = d.max(axis=2) if d.ndim == 3 else d
    return blur(d, 0.7) > threshold


def measure(before: np.ndarray, after: np.ndarray) -> PairReport:
    """Global motion of `after` relative to `before` and the share of pixels that differ once it is undone."""
    a, b = edges(before), edges(after)
    scale, rotation = scale_rotation(a, b)
    if abs(scale - 1) <= MISALIGNED_SCALE and abs(rotation) <= MISALIGNED_ROTATION:
        scale, rotation = 1.0, 0.0  # below what the log-polar grid resolves: call it none
    b_unscaled = warp(b, (0.0, 0.0), scale, rotation) if (scale, rotation) != (1.0, 0.0) else b
    th = np.deg2rad(rotation)

    def in_after_frame(d):  # a shift measured in the unscaled frame, in the "after" frame
        return (scale * (np.cos(th) * d[1] + np.sin(th) * d[0]), scale * (-np.sin(th) * d[1] + np.cos(th) * d[0]))

    refined, whole = phase_correlation(a, b_unscaled, candidates=5)

    def misfit(d):
        return edge_misfit(a, edges(warp(after, d, scale, rotation, fill=before)))

    # A local change can tilt the sub-pixel peak: keep the refinement only if it fits better than the
    # whole-pixel shift.
    options = {in_after_frame(refined), in_after_frame(whole)}
    dx, dy = min(options, key=lambda d: (misfit(d), abs(d[0]) + abs(d[1])))
    dx, dy = refine_on_unchanged(before, after, (dx, dy), scale, rotation)
    aligned = warp(after, (dx, dy), scale, rotation, fill=before)
    changed = changed_mask(before, aligned)
    frac = float(changed.mean())
    flags = []
    if np.array_equal(before, after):
        flags.append("identical")
    else:
        if np.hypot(dx, dy) > MISALIGNED_SHIFT or abs(scale - 1) > MISALIGNED_SCALE or abs(rotation) > MISALIGNED_ROTATION:
            flags.append("misaligned")
        if frac > ALMOST_EVERYWHERE:
            flags.append("differs almost everywhere")
    return PairReport((dx, dy), scale, rotation, frac, flags)


def align(before: np.ndarray, after: np.ndarray, report: PairReport | None = None) -> np.ndarray:
    """`after` registered onto `before` (uint8 arrays of one shape)."""
    report = report or measure(before, after)
    return warp(after, report.shift, report.scale, report.rotation, fill=before)


CHECK_SIDE = 256  # training's check measures pairs at this long side at most


def misalignment(before: np.ndarray, after: np.ndarray) -> str | None:
    """A one-line description of how a pair is misaligned, or None (the check training runs on pairs)."""
    h, w = before.shape[:2]
    s = min(1.0, CHECK_SIDE / max(h, w))
    if s < 1.0:
        from PIL import Image

        size = (max(8, round(w * s)), max(8, round(h * s)))
        before = np.asarray(Image.fromarray(before).resize(size, Image.BOX))
        after = np.asarray(Image.fromarray(after).resize(size, Image.BOX))
    r = measure(before, after)
    if "misaligned" not in r.flags:
        return None
    parts = [f"shifted by ({r.shift[0] / s:+.1f}, {r.shift[1] / s:+.1f}) px"]
    if r.scale != 1.0:
        parts.append(f"scaled x{r.scale:.3f}")
    if r.rotation != 0.0:
        parts.append(f"rotated {r.rotation:+.1f} deg")
    return ", ".join(parts)
