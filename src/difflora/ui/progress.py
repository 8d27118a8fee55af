"""Reading a run's progress: the events `difflora train --events FILE` appends, one JSON per line."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


def file_stamp(path: Path) -> tuple[int, int] | None:
    """(size, modification time) of a file, None when it is missing: whether a page has anything new to show."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def read_events(path: Path) -> list[dict]:
    """Every complete event line (a line being written is skipped until it ends)."""
    try:
        data = path.read_bytes()
    except OSError:
        return []
    events = []
    for line in data.split(b"\n")[:-1]:  # the last piece is empty or still being written
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict) and "type" in obj:
            events.append(obj)
    return events


@dataclass
class Progress:
    stage: str | None = None
    stage_index: int = 0
    stages: int = 1
    step: int = 0
    steps: int = 0
    global_step: int = 0
    total_steps: int = 0
    steps_per_s: float | None = None
    eta_s: float | None = None
    loss: list[tuple[int, float]] = field(default_factory=list)  # (global step, loss)
    loss_avg: list[tuple[int, float]] = field(default_factory=list)
    lr: list[tuple[int, float]] = field(default_factory=list)
    validation: list[tuple[int, float]] = field(default_factory=list)
    samples: list[tuple[int, list[str]]] = field(default_factory=list)  # (step, paths)
    sample_controls: dict[int, object] = field(default_factory=dict)  # step -> its event's `control` (control_rows)
    checkpoints: list[dict] = field(default_factory=list)
    outcome: dict | None = None  # the last finished / stopped / failed event
    step_s: float | None = None  # seconds per training step, sampling left out
    sample_pass_s: list[float] = field(default_factory=list)  # seconds of each sampling pass

    @property
    def fraction(self) -> float:
        return min(1.0, self.global_step / self.total_steps) if self.total_steps else 0.0


def summarize(events: list[dict]) -> Progress:
    p = Progress()
    previous = None
    step_times: list[float] = []  # the seconds of each step, measured from the event before it
    for e in events:
        t = e.get("type")
        if t == "step" and previous is not None and previous.get("type") == "step" and "time" in e:
            step_times.append(e["time"] - previous["time"])
        if t == "stage_started":
            p.stage, p.stage_index, p.stages = e.get("stage"), int(e.get("index", 0)), int(e.get("stages", 1))
            p.steps, p.step = int(e.get("steps", 0)), int(e.get("start_step", 0))
            p.outcome = None
        elif t == "step":
            p.stage = e.get("stage", p.stage)
            p.step, p.steps = int(e["step"]), int(e.get("steps", p.steps))
            p.global_step, p.total_steps = int(e.get("global_step", e["step"])), int(e.get("total_steps", p.steps))
            p.steps_per_s, p.eta_s = e.get("steps_per_s"), e.get("eta_s")
            # a resumed run repeats no step, but a restart after a crash may: keep the latest value per step
            for series, key in ((p.loss, "loss"), (p.loss_avg, "loss_avg"), (p.lr, "lr")):
                if e.get(key) is not None:
                    while series and series[-1][0] >= p.global_step:
                        series.pop()
                    series.append((p.global_step, float(e[key])))
        elif t == "validation":
            p.validation.append((int(e.get("global_step", e.get("step", 0))), float(e["loss"])))
        elif t == "sample_written":
            p.samples.append((int(e.get("step", 0)), list(e.get("paths") or [])))
            if e.get("control"):
                p.sample_controls[int(e.get("step", 0))] = e["control"]
            if previous is not None and "time" in e and "time" in previous:
                p.sample_pass_s.append(max(0.0, e["time"] - previous["time"]))
        elif t == "checkpoint_written":
            p.checkpoints.append(e)
        elif t in ("finished", "stopped", "failed"):
            p.outcome = e
        previous = e
    if step_times:
        p.step_s = float(np.median(step_times))
        p.eta_s = eta_with_sampling(p)
    return p


def eta_with_sampling(p: Progress) -> float | None:
    """Seconds left: the steps at their own pace, plus the sampling passes still due at the pace of those seen
    (the interval between them as observed, and the final pass)."""
    if p.step_s is None or not p.total_steps:
        return p.eta_s
    left = max(0, p.total_steps - p.global_step)
    eta = left * p.step_s
    if p.sample_pass_s and p.outcome is None:
        steps = sorted({s for s, _ in p.samples if 0 < s < p.total_steps})
        gaps = [b - a for a, b in zip([0, *steps], steps)]
        every = min(gaps) if gaps else None
        due = (left - 1) // every if every and left else 0  # intermediate passes still to come
        eta += (due + 1) * float(np.mean(p.sample_pass_s))
    return eta


def curve_frame(points: list[tuple[int, float]], name: str):
    import pandas as pd

    return pd.DataFrame({"step": [s for s, _ in points], name: [v for _, v in points]})


def format_eta(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}" if seconds < 3600 else f"{seconds // 3600}h{seconds % 3600 // 60:02d}"


MIN_PREVIEW_PX = 256  # a grid is shown at least this tall: the toy world's 64 px faces are unreadable smaller
# A gallery's visible height in px: Gradio scrolls a taller one inside this box ("auto" gave ~310 px, less than
# one row of two square cells on a 1280 px page), so one full row of whole images shows without scrolling.
GALLERY_HEIGHT = 680


def readable(image: np.ndarray) -> np.ndarray:
    """The image enlarged by a whole factor (nearest pixel, nothing cropped) until it is MIN_PREVIEW_PX tall."""
    factor = -(-MIN_PREVIEW_PX // image.shape[0])
    return image.repeat(factor, 0).repeat(factor, 1) if factor > 1 else image


def sample_grid(paths: list[str], layout: list[dict] | None, scale: int = 2):
    """One step's samples as a grid: a row per prompt, a column per multiplier (from the run's layout); a grid
    the training wrote itself (sample_sweep) as it is. Enlarged to a readable height."""
    return None if (grid := _grid(paths, layout, scale)) is None else readable(grid)


def _grid(paths: list[str], layout: list[dict] | None, scale: int):
    from PIL import Image

    from ..generate import make_grid

    images = []
    for p in paths:
        try:
            with Image.open(p) as im:
                images.append(np.asarray(im.convert("RGB")))
        except OSError:
            return None
    if not images:
        return None
    if len(images) == 1:
        return images[0]
    if layout and len(layout) == len(images):
        prompts = list(dict.fromkeys(x["prompt"] for x in layout))
        mults = list(dict.fromkeys(x["multiplier"] for x in layout))
        by = {(x["prompt"], x["multiplier"]): img for x, img in zip(layout, images)}
        if len(by) == len(prompts) * len(mults):
            rows = [[by[(pr, m)] for m in mults] for pr in prompts]
            return np.asarray(make_grid(rows, [f"weight {m:g}" for m in mults], scale=scale))
    return np.asarray(make_grid([images], scale=scale))


def control_rows(control, folder: Path, rows: int) -> list[list[Path]]:
    """The control ("before") images of each sample row, from a `sample_written` event's `control` field: a list
    with an entry per row (a path, a list of paths, or null), or one path for every row; paths are relative to
    the run folder (the folder of its events file), or absolute."""
    entries = control if isinstance(control, list) else [control] * rows
    return [[folder / p for p in ([e] if isinstance(e, str) else list(e or []))] for e in entries]


def with_controls(grid: np.ndarray, controls: list[list[np.ndarray]], gap: int = 8) -> np.ndarray:
    """The grid with each row's control images to its left, scaled to the row's height: an edit's before -> after
    at each multiplier. The rows are the grid's equal bands below its label lines (white with dark text, so at
    most half of such a line's pixels differ from white)."""
    from PIL import Image, ImageDraw

    height = grid.shape[0]
    coloured = (np.abs(grid.astype(np.int16) - 255).max(axis=2) > 24).mean(axis=1)
    dense = np.flatnonzero(coloured > 0.5)
    top = int(dense[0]) if len(dense) else 0
    row_h = (height - top) // max(1, len(controls))
    if row_h < 8:
        return grid
    strips = []
    for images in controls:
        tiles = [np.asarray(Image.fromarray(im).resize((max(1, round(im.shape[1] * row_h / im.shape[0])), row_h),
                                                       Image.NEAREST)) for im in images]
        strips.append(np.concatenate(tiles, axis=1) if tiles else None)
    width = max((s.shape[1] for s in strips if s is not None), default=0)
    if not width:
        return grid
    panel = Image.new("RGB", (width + gap, height), (255, 255, 255))
    if top >= 12:
        ImageDraw.Draw(panel).text((4, max(0, top - 14)), "control", fill=(0, 0, 0))
    for i, strip in enumerate(strips):
        if strip is not None:
            panel.paste(Image.fromarray(strip), (0, top + i * row_h))
    return np.concatenate([np.asarray(panel), grid[..., :3]], axis=1)
