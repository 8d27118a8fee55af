"""Batches for one step: which items, and every random draw derived from the step's position.

Every per-sample draw (sample order, caption shuffles, flips, noise, timesteps) is derived from
(seed, stage, step, micro-batch, position in the global batch), so a resumed run continues
exactly, and N processes at per-device batch b train the same LoRA as one process at batch N·b
(DDP averages the gradients), up to float rounding: CPU and GPU kernels sum in another order at
another batch size, and the all-reduce sums in its own (tests/test_distributed.py measures it). The network
dropouts (dropout, rank_dropout, module_dropout) are seeded per (seed, stage, step, rank) and drawn
per forward call, so with them N processes draw other masks than one process does.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from ..data.captions import process_caption
from ..data.dataset import Item, TrainingData, difference_mask, seed_of
from ..data.images import load_image, resize_and_crop
from ..data.instructions import instruction_for
from ..errors import UserError
from ..methods import Batch, StepContext
from ..models.base import Conditioning

# (sample index, its generator, latent (h, w)) -> its timestep
TimestepDraw = Callable[[int, torch.Generator, tuple[int, int]], torch.Tensor]


class PromptCache:
    """Prompt encoding, cached per caption while no text-encoder LoRA is being trained.

    With `disk` (cache_text_encoder_outputs_to_disk) each caption's encoding is also kept in a
    safetensors file named by a hash of `identity` (the model and fused presets) and the caption,
    so a later run with the same model reads it instead of running the text encoders.
    """

    def __init__(self, model, disk: Path | None = None, identity: str = ""):
        self.model = model
        self.cache: dict[str, Conditioning] = {}
        self.encoded: dict[str, Conditioning] = {}  # encoded before training (on the CPU), kept across stages
        self.trains_text_encoder = False
        self.disk = disk
        self.identity = identity

    def reset(self, trains_text_encoder: bool) -> None:
        self.cache.clear()  # an earlier stage's text-encoder LoRA may have changed the embeddings
        self.trains_text_encoder = trains_text_encoder

    def encode_all(self, prompts: list[str], chunk: int = 16) -> dict[str, Conditioning]:
        """Every prompt's encoding on the CPU (read from disk where cached there), before the text encoders leave
        the device. Nothing stays in this cache: the returned table answers (the model's or `keep`'s)."""
        out: dict[str, Conditioning] = {}
        prompts = list(dict.fromkeys(prompts))
        for start in range(0, len(prompts), chunk):
            part = prompts[start:start + chunk]
            enc = self(part)
            for i, p in enumerate(part):
                out[p] = enc[i:i + 1].to("cpu")
            self.cache.clear()  # on the model's device: only one chunk at a time
        return out

    def keep(self, table: dict[str, Conditioning]) -> None:
        """Answer from `table` (encode_all's, made before the text encoders left the device) while no
        text-encoder LoRA trains; reset() does not forget it (no LoRA can change it under cached outputs)."""
        self.encoded.update(table)

    def __call__(self, captions: list[str]) -> Conditioning:
        if self.trains_text_encoder or self.model.text_encoders_dropped:
            return self.model.encode_prompts(captions)  # (or the model's own table, its encoders freed)
        missing = [c for c in dict.fromkeys(captions)
                   if c not in self.cache and not self._from_table(c) and not self._from_disk(c)]
        if missing:
            with torch.no_grad():
                enc = self.model.encode_prompts(missing).to(self.model.device)
            for i, c in enumerate(missing):
                self.cache[c] = enc[i:i + 1]
                self._to_disk(c)
        return Conditioning.cat([self.cache[c] for c in captions])

    def _from_table(self, caption: str) -> bool:
        if caption not in self.encoded:
            return False
        self.cache[caption] = self.encoded[caption].to(self.model.device)
        return True

    def _file(self, caption: str) -> Path:
        digest = hashlib.sha256(f"{self.identity}\0{caption}".encode()).hexdigest()[:32]
        return self.disk / f"{digest}.safetensors"

    def _from_disk(self, caption: str) -> bool:
        if self.disk is None or not self._file(caption).exists():
            return False
        from ..fileio import load_safetensors

        try:
            tensors, meta = load_safetensors(self._file(caption))
        except UserError:
            return False  # unreadable cache file: encode again (and overwrite it)
        if meta.get("caption") != caption:
            return False
        self.cache[caption] = Conditioning(tensors).to(self.model.device)
        return True

    def _to_disk(self, caption: str) -> None:
        if self.disk is not None:
            from ..fileio import save_safetensors

            self.disk.mkdir(parents=True, exist_ok=True)
            save_safetensors(self.cache[caption].tensors, self._file(caption), metadata={"caption": caption})


def batch_at(data: TrainingData, position: int, world: int, allowed) -> tuple[int, list[int]]:
    """(epoch, global batch) at a position in the endless sequence of epochs."""
    epoch = 0
    while True:
        batches = data.epoch_batches(epoch, world, allowed)
        if position < len(batches):
            return epoch, batches[position]
        position -= len(batches)
        epoch += 1


@dataclass
class Sample:
    """One sample of a batch and the random sources its draws come from.

    `noise_gen` draws, in this order, the noise, the noise offset and the timestep; `latent_gen` samples the
    VAE when latents are not cached (training uses one generator for both, validation keeps the latent fixed).
    """

    item: Item
    flip: bool
    captions: dict[str, str]  # "x" (and "after"), already processed
    noise_gen: torch.Generator
    latent_gen: torch.Generator
    weight: float = 1.0


def assemble(data: TrainingData, samples: list[Sample], model, step: int, timestep: TimestepDraw,
             noise_offset: float = 0.0) -> Batch:
    """The model inputs of a batch: the one assembly for training steps, validation and the non-finite recheck.

    `timestep(index, generator, latent_hw)` draws sample `index`'s timestep (after its noise).
    """
    latents: dict[str, list] = {}
    captions: dict[str, list[str]] = {}
    noise, ts, diffs, sizes = [], [], [], []
    for index, s in enumerate(samples):
        it = s.item
        sizes.append(data.sample_size(it, s.flip))
        for k in it.image_keys:
            latents.setdefault(k, []).append(data.latent_for(it, k, s.flip, model, s.latent_gen))
        for k, caption in s.captions.items():
            captions.setdefault(k, []).append(caption)
        if it.is_pair:
            diffs.append(it.latents["pixel_diff"].flip(-1) if s.flip else it.latents["pixel_diff"])
        shape = latents["x"][-1].shape
        eps = torch.randn(shape, generator=s.noise_gen)
        if noise_offset:
            eps = eps + noise_offset * torch.randn(shape[0], 1, 1, generator=s.noise_gen)
        noise.append(eps)
        ts.append(torch.as_tensor(timestep(index, s.noise_gen, tuple(shape[-2:]))))
    device = model.device
    latent_hw = tuple(latents["x"][-1].shape[-2:])

    def masks(threshold: float, dilate: int) -> torch.Tensor:  # only when a loss asks for them
        return torch.stack([difference_mask(d, latent_hw, threshold, dilate) for d in diffs])[:, None].to(device)

    def images(key: str) -> list:  # the pairs' images as PIL, cut to their bucket (Qwen-Image-Edit's VL encoder)
        out = []
        for s in samples:
            img = resize_and_crop(load_image(s.item.image_path(key)), s.item.bucket)
            out.append(img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if s.flip else img)
        return out

    return Batch(
        latents={k: torch.stack(v).to(device) for k, v in latents.items()},
        captions=captions,
        noise=torch.stack(noise).to(device),
        # flow matching keeps σ·1000 continuous (kohya); DDPM timesteps are indices
        timesteps=torch.stack(ts).to(torch.float32 if model.objective.prediction_type == "flow" else torch.long).to(device),
        loss_weight=torch.tensor([s.weight for s in samples], dtype=torch.float32, device=device),
        step=step,
        mask_fn=masks if diffs else None,
        sizes=sizes,
        image_fn=images if diffs else None,
    )


def step_context(run, network, step: int, batch: Batch) -> StepContext:
    """What a stage's loss gets for `batch`: with the batch's own per-sample conditioning (SDXL's time_ids)."""
    return StepContext(model=run.model, network=network, job=run.job, step=step, encode=run.encode,
                       sample_cond=run.model.sample_conditioning(batch.sizes))


def default_timesteps(job, model) -> TimestepDraw:
    """The timestep draw of a stage without its own rule: the family's (uniform over the job's window by default)."""
    window = (job.min_timestep, job.max_timestep)
    return lambda index, gen, latent_hw: model.sample_timesteps(1, gen, latent_hw, window)[0]  # noqa: E731


def make_batch(data: TrainingData, global_batch: list[int], rank: int, world: int, job, stage_index: int, step: int,
               micro: int, epoch: int, timesteps, model) -> Batch:
    """This process's slice of a global batch, with every random draw derived from its position.

    `timesteps`: the stage's (step, n, generator) -> timesteps rule, or None for the family's own sampling or
    uniform [min_timestep, max_timestep).
    """
    per = len(global_batch) // world
    samples = []
    for j in range(rank * per, (rank + 1) * per):
        it = data.items[global_batch[j]]
        seed = seed_of(job.seed, stage_index, step, micro, j)
        rng = np.random.default_rng(seed)
        gen = torch.Generator().manual_seed(seed)
        flip = bool(it.flip_aug and rng.random() < 0.5)
        captions = {"x": process_caption(it.caption, it.rules, rng, epoch)}
        if it.is_pair:
            captions["after"] = process_caption(it.after_caption, it.rules, rng, epoch)
            captions["instruction"] = instruction_for(it.instruction, job.edit_instruction, captions["after"])
        samples.append(Sample(it, flip, captions, gen, gen, job.prior_loss_weight if it.is_reg else 1.0))
    draw = (lambda index, gen, latent_hw: timesteps(step, 1, gen)[0]) if timesteps is not None \
        else default_timesteps(job, model)
    return assemble(data, samples, model, step, draw, job.noise_offset)
