"""Text-to-image with LoRA multipliers, including several multipliers in one batch.

Prompts are encoded here (text-encoder LoRAs at each sample's multiplier) and handed to the
diffusers pipeline as embeddings, so only the U-Net runs inside it; the U-Net sees the batch
twice over for classifier-free guidance ([negative, positive]), hence its multipliers are
the per-sample ones repeated.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, PngImagePlugin

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
    sampler: str = "ddim"
    cfg: float = 7.5
    width: int | None = None
    height: int | None = None


@torch.no_grad()
def generate(model, networks: list[LoRANetwork], req: GenerationRequest, batch_size: int = 64,
             output: str = "uint8") -> list[np.ndarray]:
    """Images as HxWx3 arrays (uint8, or float in [0, 1] with output="float"), one per request entry."""
    n = len(req.prompts)
    if len(req.seeds) != n:
        raise ValueError("one seed per prompt")
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
        cond = model.encode_prompts(req.prompts[sl]).tensors["encoder_hidden_states"]
        uncond = model.encode_prompts(negative[sl]).tensors["encoder_hidden_states"]
        for i, net in enumerate(networks):
            values = req.multipliers.get(i)
            if values is not None:
                m = torch.tensor(values[sl], dtype=torch.float32)
                if not bool((m == m[0]).all()):
                    net.set_multiplier(torch.cat([m, m]) if req.cfg > 1.0 else m, component="unet")
        gens = [torch.Generator().manual_seed(int(s)) for s in req.seeds[sl]]
        result = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, generator=gens, num_inference_steps=req.steps,
                      guidance_scale=req.cfg, width=width, height=height, output_type="np")
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


def make_grid(rows: list[list[np.ndarray]], col_labels: list[str] | None = None, row_labels: list[str] | None = None,
              scale: int = 1) -> Image.Image:
    """A labelled grid: rows of equally sized images."""
    h, w = rows[0][0].shape[:2]
    h, w = h * scale, w * scale
    top = 14 if col_labels else 0
    left = 0
    if row_labels:
        left = min(220, 6 * max(len(r) for r in row_labels) + 8)
    ncol = max(len(r) for r in rows)
    grid = Image.new("RGB", (left + ncol * w, top + len(rows) * h), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for j, label in enumerate(col_labels or []):
        draw.text((left + j * w + 2, 1), label, fill=(0, 0, 0))
    for i, row in enumerate(rows):
        if row_labels:
            draw.text((2, top + i * h + h // 2 - 5), row_labels[i][: (left - 8) // 6], fill=(0, 0, 0))
        for j, img in enumerate(row):
            tile = Image.fromarray(img)
            if scale != 1:
                tile = tile.resize((w, h), Image.NEAREST)
            grid.paste(tile, (left + j * w, top + i * h))
    return grid
