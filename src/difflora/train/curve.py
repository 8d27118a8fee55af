"""A loss-curve PNG beside the LoRA at the end of training, and the line chart it and the validation plot
share (drawn with PIL: no plotting library needed)."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from .events import Event, Finished, Step

log = logging.getLogger(__name__)

WIDTH, HEIGHT = 800, 450
LEFT, RIGHT, TOP, BOTTOM = 70, 20, 40, 50  # margins around the plot area
RAW, AVERAGE, AXES, GRID, STAGE = (170, 190, 230), (20, 60, 170), (0, 0, 0), (225, 225, 225), (200, 120, 0)


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About n round values (1, 2, 5 × 10^k steps) covering [lo, hi]."""
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _font(size: int = 13):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the bitmap font (no anchors)
        return None


@dataclass
class Series:
    """One line of a chart: (x, y) points, drawn in `colour`, named in the legend."""

    label: str
    points: list[tuple[float, float]]
    colour: tuple[int, int, int]
    width: int = 2
    markers: bool = False  # a dot on every point (few points: validation)


def draw_chart(series: list[Series], title: str, size: tuple[int, int] = (WIDTH, HEIGHT),
               stages: list[tuple[int, str]] = (), x_label: str = "step", y_label: str = "loss") -> Image.Image:
    """Lines against a shared x axis, with round-number ticks, labelled axes, stage marks and a legend."""
    w, h = size
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    font = _font()

    def text(xy, s: str, fill, anchor: str = "la") -> None:
        if font is None:
            d.text(xy, s, fill=fill)
        else:
            d.text(xy, s, fill=fill, font=font, anchor=anchor)
    x0, x1, y0, y1 = LEFT, w - RIGHT, h - BOTTOM, TOP  # y0: bottom of the plot, y1: top
    finite = [(x, y) for line in series for x, y in line.points if math.isfinite(y)]
    s_lo, s_hi = (min(x for x, _ in finite), max(x for x, _ in finite)) if finite else (0, 1)
    l_lo, l_hi = (min(y for _, y in finite), max(y for _, y in finite)) if finite else (0.0, 1.0)
    if l_hi - l_lo < 1e-12:
        l_lo, l_hi = l_lo - 0.5 * abs(l_lo or 1), l_hi + 0.5 * abs(l_hi or 1)
    pad = 0.05 * (l_hi - l_lo)
    l_lo, l_hi = l_lo - pad, l_hi + pad
    s_span = max(s_hi - s_lo, 1)

    def px(step: float, loss: float) -> tuple[float, float]:
        return x0 + (step - s_lo) / s_span * (x1 - x0), y0 - (loss - l_lo) / (l_hi - l_lo) * (y0 - y1)

    for v in nice_ticks(l_lo, l_hi):
        y = px(s_lo, v)[1]
        d.line([(x0, y), (x1, y)], fill=GRID)
        text((x0 - 6, y), f"{v:.3g}", AXES, "rm")
    for v in nice_ticks(s_lo, s_hi):
        x = px(v, l_lo)[0]
        d.line([(x, y0), (x, y0 + 4)], fill=AXES)
        text((x, y0 + 6), f"{int(v)}" if float(v).is_integer() else f"{v:g}", AXES, "mt")
    for start, name in stages:
        x = px(start, l_lo)[0]
        d.line([(x, y1), (x, y0)], fill=STAGE)
        text((x + 3, y1 + 2), name, STAGE)
    for n, line in enumerate(series):
        points = [px(x, y) for x, y in line.points if math.isfinite(y)]
        if len(points) > 1:
            d.line(points, fill=line.colour, width=line.width)
        if line.markers or len(points) == 1:
            for cx, cy in points:
                d.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=line.colour)
        text((x1 - 4, y1 + 4 + 12 * n), line.label, line.colour, "rt")
    d.rectangle([x0, y1, x1, y0], outline=AXES)
    text(((x0 + x1) / 2, 12), title, AXES, "mt")
    text(((x0 + x1) / 2, h - 14), x_label, AXES, "mm")
    text((8, (y0 + y1) / 2), y_label, AXES, "lm")
    return img


def draw_loss_curve(steps: list[int], losses: list[float], title: str,
                    stages: list[tuple[int, str]] = ()) -> Image.Image:
    """Loss per step (light) and its moving average (dark) against the global step, with labelled axes."""
    kept = [(s, v) for s, v in zip(steps, losses) if math.isfinite(v)]
    half = max(1, len(kept) // 40)  # centred moving average over about 5% of the run
    averaged = [(kept[i][0], sum(v for _, v in kept[max(0, i - half):i + half + 1])
                 / len(kept[max(0, i - half):i + half + 1])) for i in range(len(kept))]
    return draw_chart([Series("per step", kept, RAW, width=1), Series("moving average", averaged, AVERAGE)],
                      title, stages=stages)


class LossCurve:
    """Collects each step's loss; at the end of training draws <output_dir>/<output_name>-loss.png."""

    def __init__(self, path: str | os.PathLike, title: str):
        self.path = Path(path)
        self.title = title
        self.steps: list[int] = []
        self.losses: list[float] = []
        self.stages: list[tuple[int, str]] = []  # (global step before the stage's first step, stage name)

    def __call__(self, event: Event) -> None:
        if isinstance(event, Step):
            if not self.stages or self.stages[-1][1] != event.stage:
                self.stages.append((event.global_step - event.step, event.stage))
            self.steps.append(event.global_step)
            self.losses.append(event.loss)
        elif isinstance(event, Finished) and self.steps:
            from ..generate import save_png

            stages = self.stages if len(self.stages) > 1 else []
            save_png(draw_loss_curve(self.steps, self.losses, self.title, stages), self.path)
            log.info("wrote the loss curve %s", self.path)
