"""Text-to-image with LoRA multipliers, including several multipliers in one batch.

Prompts are encoded here (text-encoder LoRAs at each sample's multiplier) and handed to the
diffusers pipeline as embeddings, so only the U-Net runs inside it; the U-Net sees the batch
twice over for classifier-free guidance ([negative, positive]), hence its multipliers are
the per-sample ones repeated.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, PngImagePlugin

from .errors import UserError
from .fileio import atomic_path
from .network.lora import LoRANetwork

log = logging.getLogger(__name__)


@dataclass
class GenerationRequest:
    prompts: list[str]
    seeds: list[int]
    negative: list[str] | None = None
    multipliers: dict[int, list[float]] = field(default_factory=dict)  # network index -> per-sample value
    steps: int = 20
    sampler: str | None = None  # None: the family's default_sampler
    cfg: float | None = None  # None: the family's default_cfg
    width: int | None = None
    height: int | None = None
    # edit models (generate --control): each entry's control images, PIL at the family's control_size; the output
    # size defaults to the first one's
    controls: list[list] | None = None


def control_images(model, paths: list, what: str = "--control") -> list:
    """The control images of generate --control (`what`: where they were named) as the family's edit pipeline
    resizes them; one line (exit 2) for a model that takes none or fewer than given."""
    from .data.images import load_image

    if model.max_control_images < len(paths):
        can = "cannot take a control image" if model.max_control_images == 0 else \
            f"takes at most {model.max_control_images} control image(s), {len(paths)} were given"
        raise UserError(f"{what}: this model ({model.modelspec_architecture}) {can}", path=model.source or None)
    return [model.resize_control(load_image(p)) for p in paths]


@contextlib.contextmanager
def lora_multipliers(networks: list[LoRANetwork], values: dict[int, float] | None = None):
    """A scope in which networks[i] is at values[i]; on leaving it every LoRA of `networks` has the
    multiplier it had before, whatever was set inside (generation, samples during training)."""
    saved = [[lora.multiplier for lora in net.loras()] for net in networks]
    try:
        for i, value in (values or {}).items():
            networks[i].set_multiplier(value)
        yield networks
    finally:
        for net, multipliers in zip(networks, saved):
            for lora, m in zip(net.loras(), multipliers):
                lora.multiplier = m


class NonFiniteImage(UserError):
    """The generated image holds NaN/inf (it would be saved all black); `network` is the suspect's index."""

    def __init__(self, message: str, network: int | None = None, path=None):
        super().__init__(message, path=path)
        self.message, self.network = message, network


def _overflow_report(networks: list[LoRANetwork]) -> NonFiniteImage:
    """Which LoRA module most likely made the image non-finite: the largest change relative to its weight."""
    worst = None
    for index, net in enumerate(networks):
        for lora in net.loras():
            m = lora.multiplier
            mult = float(m.abs().max()) if isinstance(m, torch.Tensor) else abs(float(m))
            delta = lora.weight_delta().float() * mult
            size = float(delta.abs().max()) if bool(torch.isfinite(delta).all()) else float("inf")
            ratio = size / max(float(lora.org_module.weight.detach().abs().max()), 1e-12)
            if worst is None or ratio > worst[0]:
                worst = (ratio, lora.lora_name, size, index)
    text = "generation produced NaN/inf values (the image would be black)"
    if worst is None:
        return NonFiniteImage(text + "; no LoRA is applied, so the model itself overflows "
                              "(try float32 weights or another sampler)")
    ratio, name, size, index = worst
    if not np.isfinite(size):
        return NonFiniteImage(text + f"; LoRA module {name}: scale * lora_up @ lora_down overflows float32 "
                              "(lower its alpha or multiplier)", index)
    return NonFiniteImage(text + f"; the largest change is LoRA module {name} (|ΔW| up to {size:.3g}, {ratio:.3g}x "
                          "its weight): its factors or alpha are too large (lower the multiplier, or check the file)",
                          index)


@torch.no_grad()
def generate(model, networks: list[LoRANetwork], req: GenerationRequest, batch_size: int = 64,
             output: str = "uint8", progress=None) -> list[np.ndarray]:
    """Images as HxWx3 arrays (uint8, or float in [0, 1] with output="float"), one per request entry.

    Networks run at the request's multipliers; afterwards each has its multipliers from before.
    `progress` (a tqdm bar, or anything with `update(n)`) advances by one per denoising step of each batch:
    `progress_total(req, batch_size)` steps in all.
    """
    n = len(req.prompts)
    if len(req.seeds) != n:
        raise ValueError("one seed per prompt")
    req = with_family_defaults(model, req)
    with lora_multipliers(networks):
        images = model.generate_request(networks, req, batch_size, "float", progress=progress)
        if images is None:  # no sampler of the family's own
            images = _generate(model, networks, req, batch_size, "float", progress)
        # for every family, its own sampler included: a NaN weight or an overflow never becomes a black image
        if not all(np.isfinite(img).all() for img in images):
            raise _overflow_report(networks)
    if output == "float":
        return images
    return [(np.clip(img, 0, 1) * 255).round().astype(np.uint8) for img in images]


def with_family_defaults(model, req: GenerationRequest) -> GenerationRequest:
    """The request with the family's sampler and guidance scale where it names none (and the size of its first
    control image, with --control)."""
    first = req.controls[0][0] if req.controls else None
    return replace(req, sampler=req.sampler or model.default_sampler,
                   cfg=model.default_cfg if req.cfg is None else req.cfg,
                   width=req.width or (first.width if first is not None else None),
                   height=req.height or (first.height if first is not None else None))


def progress_total(req: GenerationRequest, batch_size: int = 64) -> int:
    """Denoising steps `generate` runs for `req`: the total of its `progress` bar."""
    return -(-len(req.prompts) // batch_size) * req.steps


def _generate(model, networks, req: GenerationRequest, batch_size: int, output: str, progress) -> list[np.ndarray]:
    n = len(req.prompts)
    negative = req.negative or [""] * n
    width = req.width or model.resolution
    height = req.height or model.resolution
    pipe = model.pipeline(req.sampler)
    out: list[np.ndarray] = []
    for start in range(0, n, batch_size):
        sl = slice(start, min(n, start + batch_size))
        for i, net in enumerate(networks):
            values = req.multipliers.get(i)
            m = torch.tensor(values[sl], dtype=torch.float32) if values is not None else None
            if m is not None and bool((m == m[0]).all()):
                net.set_multiplier(float(m[0]))
            elif m is not None:
                net.set_multiplier(m, component="text_encoder")
        embeddings = model.pipeline_embeddings(model.encode_prompts(req.prompts[sl]), model.encode_prompts(negative[sl]))
        for i, net in enumerate(networks):
            values = req.multipliers.get(i)
            if values is not None:
                m = torch.tensor(values[sl], dtype=torch.float32)
                if not bool((m == m[0]).all()):
                    net.set_multiplier(torch.cat([m, m]) if req.cfg > 1.0 else m, component="unet")
        gens = [torch.Generator().manual_seed(int(s)) for s in req.seeds[sl]]
        def step_done(pipe, step, timestep, tensors):
            progress.update(1)
            return tensors

        result = pipe(**embeddings, generator=gens, num_inference_steps=req.steps,
                      guidance_scale=req.cfg, width=width, height=height, output_type="np",
                      callback_on_step_end=step_done if progress is not None else None)
        if not all(np.isfinite(img).all() for img in result.images):
            raise _overflow_report(networks)
        if output == "float":
            out.extend(np.asarray(img, dtype=np.float32) for img in result.images)
        else:
            out.extend((np.clip(img, 0, 1) * 255).round().astype(np.uint8) for img in result.images)
    return out


def parameters_text(prompt: str, negative: str, steps: int, sampler: str, cfg: float, seed: int, size: tuple[int, int],
                    model: str, loras: list[tuple[str, float]]) -> str:
    """A1111-style 'parameters' text, so UIs that read PNG info show how the image was made."""
    text = prompt
    if negative:
        text += f"\nNegative prompt: {negative}"
    text += f"\nSteps: {steps}, Sampler: {sampler}, CFG scale: {cfg}, Seed: {seed}, Size: {size[0]}x{size[1]}, Model: {model}"
    if loras:
        text += ", Lora: " + "; ".join(f"{Path(p).stem}:{m:g}" for p, m in loras)
    return text


def save_png(image: np.ndarray | Image.Image, path: str | Path, parameters: str | None = None, info: dict | None = None) -> None:
    img = image if isinstance(image, Image.Image) else Image.fromarray(image)
    png = PngImagePlugin.PngInfo()
    if parameters:
        png.add_text("parameters", parameters)
    if info:
        png.add_text("difflora", json.dumps(info, sort_keys=True))
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG", pnginfo=png)


def weight_label(multiplier: float) -> str:
    """The column label every grid uses for a LoRA multiplier: "weight -1", "weight 0", "weight +1"."""
    return "weight 0" if multiplier == 0 else f"weight {multiplier:+g}"


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow built without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def make_grid(rows: list[list[np.ndarray]], col_labels: list[str] | None = None, row_labels: list[str] | None = None,
              scale: int = 1, title: str | None = None) -> Image.Image:
    """A labelled grid of equally sized images, in the one style demo, generate, eval and samples share.

    `title` (the prompt and the LoRA name) goes above the column labels; labels are drawn at a size that
    stays readable next to small tiles (tiles are upscaled with nearest neighbour by `scale`).
    """
    h, w = rows[0][0].shape[:2]
    h, w = h * scale, w * scale
    ncol = max(len(r) for r in rows)
    font = _font(max(12, min(20, w // 9)))
    line = font.size + 6 if hasattr(font, "size") else 14
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def width_of(text: str) -> int:
        return int(probe.textlength(text, font=font))

    left = min(260, max(width_of(r) for r in row_labels) + 12) if row_labels else 0
    title_lines = _wrap(title, ncol * w + left - 8, width_of) if title else []
    top = line * len(title_lines) + (line if col_labels else 0)
    grid = Image.new("RGB", (left + ncol * w, top + len(rows) * h), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for k, text in enumerate(title_lines):
        draw.text((4, 3 + k * line), text, fill=(0, 0, 0), font=font)
    for j, label in enumerate(col_labels or []):
        x = left + j * w + max(2, (w - width_of(label)) // 2)
        draw.text((x, top - line + 3), label, fill=(0, 0, 0), font=font)
    for i, row in enumerate(rows):
        if row_labels:
            draw.text((4, top + i * h + h // 2 - line // 2), row_labels[i], fill=(0, 0, 0), font=font)
        for j, img in enumerate(row):
            tile = Image.fromarray(img)
            if scale != 1:
                tile = tile.resize((w, h), Image.NEAREST)
            grid.paste(tile, (left + j * w, top + i * h))
    return grid


def _wrap(text: str, width: int, width_of) -> list[str]:
    """Greedy word wrap to a pixel width (at most 3 lines; the last one ends with an ellipsis if cut)."""
    lines, current = [], ""
    for word in text.replace("\n", " ").split(" "):
        candidate = f"{current} {word}".strip()
        if current and width_of(candidate) > width:
            lines.append(current)
            current = word
        else:
            current = candidate
    if current:
        lines.append(current)
    if len(lines) > 3:
        lines = lines[:3]
        lines[-1] = lines[-1][: max(1, len(lines[-1]) - 3)] + "..."
    return lines
