"""Procedural 64x64 faces with independent, known attributes.

Every random number a face needs (jitter, colour noise, texture phases) is drawn
from its seed *before* the attributes are looked at, so the same seed rendered
with one attribute changed gives an image that differs only where that attribute
is drawn. Shapes are rendered with analytic anti-aliasing (coverage from the
distance to the edge), so no supersampling is needed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from typing import Iterable

import numpy as np

SIZE = 64

# Attribute -> values. The first value of each binary attribute is the "plain" one.
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "skin": ("light", "tan", "dark"),
    "hair": ("black", "brown", "blonde", "red"),
    "background": ("blue", "green", "purple", "gray"),
    "eyes": ("open", "closed"),
    "mouth": ("smiling", "neutral"),
    "glasses": ("none", "glasses"),
    "style": ("flat", "detailed"),
}
# Order of the phrases in a caption (after "a face").
CAPTION_ORDER = ("skin", "hair", "background", "eyes", "mouth", "glasses", "style")
LOCAL_ATTRIBUTES = ("eyes", "mouth", "glasses")
# Accepted spellings on the command line, mapped to canonical values.
VALUE_ALIASES = {
    "mouth": {"smile": "smiling", "smiling": "smiling", "neutral": "neutral"},
    "glasses": {"none": "none", "no": "none", "no_glasses": "none", "glasses": "glasses", "yes": "glasses"},
    "background": {"grey": "gray"},
    "hair": {"blond": "blonde"},
}

_SKIN = {"light": (238, 200, 170), "tan": (200, 150, 105), "dark": (120, 80, 55)}
_HAIR = {"black": (25, 22, 22), "brown": (105, 62, 30), "blonde": (235, 205, 110), "red": (200, 60, 30)}
_BG = {"blue": (70, 110, 205), "green": (75, 165, 85), "purple": (140, 85, 175), "gray": (150, 150, 150)}
_DARK = np.array((35, 25, 25), dtype=np.float32)
# Lips contrast with every skin tone (dark red on light skin, light pink on dark skin), so a
# 4x-downsampling VAE keeps the mouth's shape.
_LIPS = {"light": (165, 35, 50), "tan": (135, 25, 40), "dark": (240, 130, 145)}
_WHITE = np.array((245, 245, 245), dtype=np.float32)
_FRAME = np.array((20, 20, 30), dtype=np.float32)


def phrase(attribute: str, value: str) -> str:
    """The caption phrase for one attribute value."""
    if attribute == "skin":
        return f"{value} skin"
    if attribute == "hair":
        return f"{value} hair"
    if attribute == "background":
        return f"{value} background"
    if attribute == "eyes":
        return f"eyes {value}"
    if attribute == "glasses":
        return "glasses" if value == "glasses" else "no glasses"
    return value  # mouth: smiling / neutral; style: flat / detailed


_PHRASE_TO_ATTR = {phrase(a, v): (a, v) for a, vals in ATTRIBUTES.items() for v in vals}


def caption(attrs: dict[str, str], include: Iterable[str] | None = None) -> str:
    """A caption in the fixed natural order, e.g. 'a face, red hair, blue background, eyes closed'."""
    keep = set(CAPTION_ORDER if include is None else include)
    parts = ["a face"] + [phrase(a, attrs[a]) for a in CAPTION_ORDER if a in keep and a in attrs]
    return ", ".join(parts)


def parse_caption(text: str) -> dict[str, str]:
    """Attributes named in a caption (the inverse of `caption`). Unknown phrases raise ValueError."""
    out: dict[str, str] = {}
    for part in (p.strip().lower() for p in text.split(",")):
        if not part or part == "a face":
            continue
        if part not in _PHRASE_TO_ATTR:
            raise ValueError(f"unknown caption phrase {part!r}")
        attribute, value = _PHRASE_TO_ATTR[part]
        out[attribute] = value
    return out


def canonical_value(attribute: str, value: str) -> str:
    """Map a user spelling to the canonical value, or raise ValueError listing valid ones."""
    if attribute not in ATTRIBUTES:
        raise ValueError(f"unknown attribute {attribute!r}; valid attributes: {', '.join(ATTRIBUTES)}")
    v = value.strip().lower()
    v = VALUE_ALIASES.get(attribute, {}).get(v, v)
    if v not in ATTRIBUTES[attribute]:
        raise ValueError(
            f"unknown value {value!r} for {attribute}; valid values: {', '.join(ATTRIBUTES[attribute])}"
        )
    return v


def parse_change(spec: str) -> tuple[str, str, str]:
    """Parse 'eyes=open:closed' into (attribute, before, after)."""
    m = re.fullmatch(r"\s*([a-z_]+)\s*=\s*([a-z_]+)\s*:\s*([a-z_]+)\s*", spec.lower())
    if not m:
        raise ValueError(
            f"bad change {spec!r}; expected ATTRIBUTE=BEFORE:AFTER, e.g. eyes=open:closed "
            f"(attributes: {', '.join(ATTRIBUTES)})"
        )
    attribute = m.group(1)
    before, after = canonical_value(attribute, m.group(2)), canonical_value(attribute, m.group(3))
    if before == after:
        raise ValueError(f"change {spec!r} has the same value before and after")
    return attribute, before, after


def combo_key(attrs: dict[str, str]) -> tuple[str, ...]:
    return tuple(attrs[a] for a in CAPTION_ORDER)


def is_held_out(attrs: dict[str, str]) -> bool:
    """About 1 in 8 full attribute combinations never appears in the base model's training set."""
    digest = hashlib.sha256("|".join(combo_key(attrs)).encode()).digest()
    return digest[0] % 8 == 0


def all_combinations() -> list[dict[str, str]]:
    combos: list[dict[str, str]] = [{}]
    for a in CAPTION_ORDER:
        combos = [dict(c, **{a: v}) for c in combos for v in ATTRIBUTES[a]]
    return combos


def held_out_combinations() -> list[dict[str, str]]:
    return [c for c in all_combinations() if is_held_out(c)]


def sample_attributes(rng: np.random.Generator, held_out: bool | None = False) -> dict[str, str]:
    """Uniform attributes. held_out=False excludes held-out combinations, True draws only those,
    None draws from everything."""
    while True:
        attrs = {a: ATTRIBUTES[a][int(rng.integers(len(ATTRIBUTES[a])))] for a in CAPTION_ORDER}
        if held_out is None or is_held_out(attrs) == held_out:
            return attrs


@dataclasses.dataclass(frozen=True)
class Layout:
    """Everything random about a face except its attributes."""

    cx: float
    cy: float
    scale: float
    hair_len: float
    fringe: float
    pupil_dx: float
    pupil_dy: float
    colour_jitter: np.ndarray  # (5, 3): skin, hair, background, lips, frame offsets
    light_angle: float
    stripe_phase: float
    stripe_angle: float
    strand_phase: float
    noise: np.ndarray  # (SIZE, SIZE) fine-detail texture


def layout_from_seed(seed: int) -> Layout:
    rng = np.random.default_rng(int(seed))
    return Layout(
        cx=32 + rng.uniform(-3.5, 3.5),
        cy=34 + rng.uniform(-3.0, 3.0),
        scale=rng.uniform(0.88, 1.08),
        hair_len=rng.uniform(0.0, 1.0),
        fringe=rng.uniform(0.0, 1.0),
        pupil_dx=rng.uniform(-0.6, 0.6),
        pupil_dy=rng.uniform(-0.3, 0.3),
        colour_jitter=rng.uniform(-10, 10, size=(5, 3)).astype(np.float32),
        light_angle=rng.uniform(-0.6, 0.6),
        stripe_phase=rng.uniform(0, 2 * np.pi),
        stripe_angle=rng.uniform(0.6, 1.0),
        strand_phase=rng.uniform(0, 2 * np.pi),
        noise=rng.normal(0, 1, size=(SIZE, SIZE)).astype(np.float32),
    )


def _grid(width: int = SIZE, height: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (xx, yy) of a width x height image."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    return xx, yy


_XX, _YY = _grid()
_Grid = tuple[np.ndarray, np.ndarray]


def _ellipse(grid: _Grid, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    """Anti-aliased coverage of an ellipse."""
    xx, yy = grid
    r = np.sqrt(((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2)
    return np.clip((1.0 - r) * min(rx, ry) + 0.5, 0.0, 1.0)


def _ring(grid: _Grid, cx: float, cy: float, r: float, width: float) -> np.ndarray:
    xx, yy = grid
    d = np.abs(np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2) - r)
    return np.clip(width / 2 - d + 0.5, 0.0, 1.0)


def _curve(grid: _Grid, cx: float, cy: float, half_width: float, bend: float, thickness: float) -> np.ndarray:
    """A parabola y = cy + bend * (1 - ((x-cx)/half_width)^2) for |x-cx| <= half_width, stroked."""
    xx, yy = grid
    u = (xx - cx) / half_width
    y = cy + bend * (1.0 - u**2)
    slope = -2.0 * bend * u / half_width
    d = np.abs(yy - y) / np.sqrt(1.0 + slope**2)
    inside = np.clip((1.0 - np.abs(u)) * half_width + 0.5, 0.0, 1.0)
    return np.clip(thickness / 2 - d + 0.5, 0.0, 1.0) * inside


def _segment(grid: _Grid, x0: float, y0: float, x1: float, y1: float, thickness: float) -> np.ndarray:
    xx, yy = grid
    px, py = xx - x0, yy - y0
    dx, dy = x1 - x0, y1 - y0
    t = np.clip((px * dx + py * dy) / (dx * dx + dy * dy), 0.0, 1.0)
    d = np.sqrt((px - t * dx) ** 2 + (py - t * dy) ** 2)
    return np.clip(thickness / 2 - d + 0.5, 0.0, 1.0)


def _box(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return (_XX >= x0) & (_XX <= x1) & (_YY >= y0) & (_YY <= y1)


def _paint(img: np.ndarray, coverage: np.ndarray, colour: np.ndarray) -> None:
    a = coverage[..., None]
    img *= 1.0 - a
    img += a * colour


def _geometry(lay: Layout) -> dict[str, float]:
    s = lay.scale
    rx, ry = 14.5 * s, 17.5 * s
    return dict(
        rx=rx,
        ry=ry,
        eye_dx=0.40 * rx,
        eye_y=lay.cy - 0.05 * ry,
        eye_r=3.1 * s,
        mouth_y=lay.cy + 0.52 * ry,
        mouth_w=5.2 * s,
        glass_r=4.9 * s,
    )


def regions(seed: int) -> dict[str, np.ndarray]:
    """Boolean masks (SIZE, SIZE) inside which each local attribute is drawn."""
    lay = layout_from_seed(seed)
    g = _geometry(lay)
    eyes = np.zeros((SIZE, SIZE), bool)
    glasses = np.zeros((SIZE, SIZE), bool)
    for side in (-1, 1):
        ex = lay.cx + side * g["eye_dx"]
        m = g["eye_r"] + 1.5
        eyes |= _box(ex - m, g["eye_y"] - m, ex + m, g["eye_y"] + m)
        m = g["glass_r"] + 1.5
        glasses |= _box(ex - m, g["eye_y"] - m, ex + m, g["eye_y"] + m)
    glasses |= _box(lay.cx - g["eye_dx"], g["eye_y"] - 2.5, lay.cx + g["eye_dx"], g["eye_y"] + 1.5)
    mw = g["mouth_w"] + 1.5
    mouth = _box(lay.cx - mw, g["mouth_y"] - 4.5, lay.cx + mw, g["mouth_y"] + 4.5)
    return {"eyes": eyes, "mouth": mouth, "glasses": glasses}


def render(attrs: dict[str, str], seed: int, canvas: tuple[int, int] | None = None,
           at: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """Render a face as uint8 (SIZE, SIZE, 3).

    `canvas` (width, height) renders on a larger image instead, with the face moved by `at` (dx, dy)
    from where it sits in a SIZE x SIZE image (the jittered placement `bench/focus_crop.py` crops);
    the background, its stripes and grain fill the whole canvas. Without them the image is the
    64x64 face every model and the judge are trained on.
    """
    for a in CAPTION_ORDER:
        if attrs.get(a) not in ATTRIBUTES[a]:
            raise ValueError(f"attribute {a} must be one of {ATTRIBUTES[a]}, got {attrs.get(a)!r}")
    lay = layout_from_seed(seed)
    width, height = canvas or (SIZE, SIZE)
    if canvas is not None:
        noise = np.random.default_rng([int(seed), width, height]).normal(0, 1, size=(height, width)).astype(np.float32)
        lay = dataclasses.replace(lay, cx=lay.cx + at[0], cy=lay.cy + at[1], noise=noise)
    grid = xx, yy = _grid(width, height) if canvas is not None else (_XX, _YY)
    g = _geometry(lay)
    detailed = attrs["style"] == "detailed"
    jit = lay.colour_jitter
    skin = np.array(_SKIN[attrs["skin"]], np.float32) + jit[0]
    hair = np.array(_HAIR[attrs["hair"]], np.float32) + jit[1]
    bg = np.array(_BG[attrs["background"]], np.float32) + jit[2]

    img = np.empty((height, width, 3), np.float32)
    img[:] = bg
    if detailed:
        # Diagonal stripes and grain on the background, hair strands, face shading.
        c, s_ = np.cos(lay.stripe_angle), np.sin(lay.stripe_angle)
        stripes = np.sin((xx * c + yy * s_) * (2 * np.pi / 5.0) + lay.stripe_phase)
        img += (stripes * 16.0 + lay.noise * 5.0)[..., None]

    cx, cy, rx, ry = lay.cx, lay.cy, g["rx"], g["ry"]
    # Hair behind the head: a larger ellipse, longer at the sides by hair_len.
    back = _ellipse(grid, cx, cy - 2.0, rx + 3.5, ry + 2.5 + 4.0 * lay.hair_len)
    back *= np.clip((cy + 4.0 + 10.0 * lay.hair_len) - yy + 0.5, 0.0, 1.0)
    hair_img = np.broadcast_to(hair, (height, width, 3)).copy()
    if detailed:
        strands = np.sin(xx * (2 * np.pi / 3.0) + 0.35 * yy + lay.strand_phase)
        hair_img += (strands * 22.0)[..., None]
    a = back[..., None]
    img = img * (1 - a) + hair_img * a

    face = _ellipse(grid, cx, cy, rx, ry)
    face_img = np.broadcast_to(skin, (height, width, 3)).copy()
    if detailed:
        lx, ly = np.sin(lay.light_angle), -np.cos(lay.light_angle)
        nx, ny = (xx - cx) / rx, (yy - cy) / ry
        shade = 0.82 + 0.22 * np.clip(nx * lx + ny * ly, -1, 1) - 0.18 * (nx**2 + ny**2)
        face_img *= shade[..., None]
        face_img += (lay.noise * 3.0)[..., None]
    a = face[..., None]
    img = img * (1 - a) + face_img * a

    # Fringe: hair over the top of the face.
    fringe_y = cy - ry * (0.50 + 0.12 * lay.fringe)
    fringe = face * np.clip(fringe_y - yy + 0.5, 0.0, 1.0)
    a = fringe[..., None]
    img = img * (1 - a) + hair_img * a

    # Eyes.
    for side in (-1, 1):
        ex, ey, er = cx + side * g["eye_dx"], g["eye_y"], g["eye_r"]
        if attrs["eyes"] == "open":
            _paint(img, _ellipse(grid, ex, ey, er, er * 0.72), _WHITE)
            _paint(img, _ellipse(grid, ex + lay.pupil_dx, ey + lay.pupil_dy, er * 0.48, er * 0.48), _DARK)
        else:
            _paint(img, _curve(grid, ex, ey - 0.2, er * 1.05, 1.4, 1.7), _DARK)

    # Mouth.
    lips = np.array(_LIPS[attrs["skin"]], np.float32) + jit[3]
    if attrs["mouth"] == "smiling":
        _paint(img, _curve(grid, cx, g["mouth_y"] - 1.4, g["mouth_w"], 2.8, 2.1), lips)
    else:
        _paint(img, _segment(grid, cx - g["mouth_w"] * 0.8, g["mouth_y"], cx + g["mouth_w"] * 0.8, g["mouth_y"], 2.1), lips)

    # Glasses.
    if attrs["glasses"] == "glasses":
        frame = _FRAME + jit[4]
        for side in (-1, 1):
            _paint(img, _ring(grid, cx + side * g["eye_dx"], g["eye_y"], g["glass_r"], 1.6), frame)
        bridge_half = g["eye_dx"] - g["glass_r"] + 0.4
        _paint(img, _segment(grid, cx - bridge_half, g["eye_y"] - 1.0, cx + bridge_half, g["eye_y"] - 1.0, 1.5), frame)

    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def make_pair(seed: int, attribute: str, before: str, after: str, rng: np.random.Generator | None = None,
              base: dict[str, str] | None = None) -> tuple[dict[str, str], dict[str, str], np.ndarray, np.ndarray]:
    """The same face rendered with `attribute` = before and = after; other attributes from `base`
    or drawn from `rng` (default: seeded by `seed`)."""
    if base is None:
        base = sample_attributes(rng if rng is not None else np.random.default_rng(seed + 7_919), held_out=None)
    a_before = dict(base, **{attribute: before})
    a_after = dict(base, **{attribute: after})
    return a_before, a_after, render(a_before, seed), render(a_after, seed)
