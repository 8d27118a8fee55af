"""The attribute judge: a small CNN that reads the attributes of a toy face.

One classification head per attribute in `faces.ATTRIBUTES` (values in that order). It is
trained on procedurally rendered faces with augmentations that mimic what a small diffusion
model decoded by a VAE produces: blur, noise (fine and blotchy), colour/brightness/contrast
jitter, small sub-pixel shifts with edge padding, down-then-up resampling and occasional JPEG
compression. The shipped weights live in `difflora/assets/judge.safetensors`.

Seeds: training faces use render seeds in [0, 2**30); evaluation (tests, bench) uses seeds
from `EVAL_SEED_BASE` = 2**30 upwards, so the two never overlap.

The shipped file was made with (about 12 minutes on one CPU thread, OMP_NUM_THREADS=1):

    import torch; torch.set_num_threads(1)
    from difflora.toy.judge import train_judge
    train_judge("src/difflora/assets/judge.safetensors", seed=0, steps=3000)

and is measured by `bench/judge_accuracy.py`.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from ..errors import UserError
from ..fileio import load_safetensors, save_safetensors
from . import faces

log = logging.getLogger(__name__)

DEFAULT_PATH = Path(__file__).resolve().parent.parent / "assets" / "judge.safetensors"
FORMAT = "difflora-judge-1"
TRAIN_SEED_LIMIT = 2**30  # training render seeds are drawn below this
EVAL_SEED_BASE = 2**30  # evaluation render seeds start here
DEFAULT_WIDTHS = (16, 32, 48, 96, 128)


# ----------------------------------------------------------------------------- the network
def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class JudgeNet(nn.Module):
    """64x64 RGB in [-1, 1] -> one logit vector per attribute.

    Full-resolution stem (thin strokes: mouth curve, closed eyes, glasses frame), four
    stride-2 stages down to 4x4, then average- and max-pooled features into linear heads.
    """

    def __init__(self, n_values: Sequence[int], widths: Sequence[int] = DEFAULT_WIDTHS):
        super().__init__()
        w = list(widths)
        self.features = nn.Sequential(
            _conv(3, w[0]),
            _conv(w[0], w[1], 2), _conv(w[1], w[1]),  # 32x32
            _conv(w[1], w[2], 2), _conv(w[2], w[2]),  # 16x16
            _conv(w[2], w[3], 2), _conv(w[3], w[3]),  # 8x8
            _conv(w[3], w[4], 2),  # 4x4
        )
        self.dropout = nn.Dropout(0.1)
        self.heads = nn.ModuleList([nn.Linear(2 * w[4], n) for n in n_values])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = self.features(x)
        h = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)
        h = self.dropout(h)
        return [head(h) for head in self.heads]


# ----------------------------------------------------------------------------- augmentation
def _jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    with Image.open(buf) as im:
        return np.asarray(im.convert("RGB")).copy()


def _gaussian_kernels(sigma: torch.Tensor, radius: int = 3) -> torch.Tensor:
    """(B, 2*radius+1) normalised 1-D kernels; sigma 0 gives a delta."""
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    s = sigma.clamp_min(1e-3)[:, None]
    k = torch.exp(-0.5 * (t[None, :] / s) ** 2)
    return k / k.sum(dim=1, keepdim=True)


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-sample separable gaussian blur with replicate padding."""
    b, c, h, w = x.shape
    k = _gaussian_kernels(sigma)
    r = k.shape[1] // 2
    k = k.repeat_interleave(c, dim=0)  # (b*c, K)
    y = x.reshape(1, b * c, h, w)
    y = F.pad(y, (r, r, r, r), mode="replicate")
    y = F.conv2d(y, k[:, None, None, :], groups=b * c)
    y = F.conv2d(y, k[:, None, :, None], groups=b * c)
    return y.reshape(b, c, h, w)


def augment(x: torch.Tensor, gen: torch.Generator, strength: float = 1.0, p_clean: float = 0.0) -> torch.Tensor:
    """Generation-like artefacts on a batch in [0, 1] (B, 3, 64, 64); returns [0, 1].

    Every draw comes from `gen`, so the result depends only on its seed. A fraction `p_clean`
    of the samples is returned unchanged. `strength` scales every artefact's range.
    """
    b = x.shape[0]
    s = float(strength)

    def u(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(b, generator=gen)

    def on(p: float) -> torch.Tensor:
        return (torch.rand(b, generator=gen) < p).float()

    keep = (torch.rand(b, generator=gen) < p_clean).float()
    act = 1.0 - keep

    # Geometry: sub-pixel shift up to +-3 px, slight zoom and rotation, border (edge) padding.
    g_on = on(0.8) * act
    tx, ty = u(-3, 3) * s * g_on, u(-3, 3) * s * g_on
    zoom = 1.0 + u(-0.04, 0.04) * s * g_on
    rot = u(-0.06, 0.06) * s * g_on
    cos, sin = torch.cos(rot) / zoom, torch.sin(rot) / zoom
    theta = torch.stack([
        torch.stack([cos, -sin, tx * 2 / x.shape[3]], dim=1),
        torch.stack([sin, cos, ty * 2 / x.shape[2]], dim=1),
    ], dim=1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    # Down-then-up resampling (mild).
    r_on = on(0.3) * act
    sizes = (64 - u(0, 24) * s).round().long()
    for i in torch.nonzero(r_on).flatten().tolist():
        n = int(sizes[i])
        if n < 64:
            d = F.interpolate(x[i:i + 1], size=(n, n), mode="bilinear", antialias=True, align_corners=False)
            x[i:i + 1] = F.interpolate(d, size=x.shape[2:], mode="bicubic", align_corners=False)

    # Gaussian blur, sigma 0..1.2 px.
    x = _blur(x, u(0, 1.2) * s * on(0.85) * act)

    # Colour: brightness, contrast, saturation, per-channel gain and offset.
    c_on = on(0.85) * act
    bright = 1 + u(-0.08, 0.08) * s * c_on
    contrast = 1 + u(-0.15, 0.15) * s * c_on
    sat = 1 + u(-0.2, 0.2) * s * c_on
    gain = 1 + (torch.rand(b, 3, generator=gen) * 2 - 1) * 0.05 * s * c_on[:, None]
    offset = (torch.rand(b, 3, generator=gen) * 2 - 1) * 0.03 * s * c_on[:, None]
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * contrast[:, None, None, None] + mean
    grey = x.mean(dim=1, keepdim=True)
    x = (x - grey) * sat[:, None, None, None] + grey
    x = x * (bright[:, None] * gain)[:, :, None, None] + offset[:, :, None, None]

    # Noise: fine (per pixel, per channel) and blotchy (low-frequency, VAE-like).
    n_on = on(0.85) * act
    fine = u(0, 0.05) * s * n_on
    blotch = u(0, 0.03) * s * n_on
    x = x + torch.randn(x.shape, generator=gen) * fine[:, None, None, None]
    low = torch.randn((b, 3, 8, 8), generator=gen)
    low = F.interpolate(low, size=x.shape[2:], mode="bicubic", align_corners=False)
    x = x + low * blotch[:, None, None, None]
    return x.clamp(0.0, 1.0)


# ----------------------------------------------------------------------------- data
def _to_unit(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0


def random_faces(rng: np.random.Generator, n: int, seed_base: int | None = None, seed_limit: int = TRAIN_SEED_LIMIT):
    """(attrs list, render seeds) drawn from `rng` (all combinations, held-out included).
    Render seeds are random below `seed_limit`, or consecutive from `seed_base`."""
    attrs = [faces.sample_attributes(rng, held_out=None) for _ in range(n)]
    if seed_base is None:
        seeds = [int(s) for s in rng.integers(0, seed_limit, size=n)]
    else:
        seeds = [seed_base + i for i in range(n)]
    return attrs, seeds


def labels_for(attrs: list[dict[str, str]]) -> torch.Tensor:
    """(B, n_attributes) value indices in `faces.ATTRIBUTES` order."""
    names = list(faces.ATTRIBUTES)
    return torch.tensor([[faces.ATTRIBUTES[a].index(d[a]) for a in names] for d in attrs], dtype=torch.long)


def _training_batch(seed: int, step: int, batch: int, p_jpeg: float, p_clean: float):
    rng = np.random.default_rng([seed, 101, step])
    attrs, seeds = random_faces(rng, batch)
    imgs = [faces.render(a, s) for a, s in zip(attrs, seeds)]
    jpeg_on = rng.random(batch) < p_jpeg
    quality = rng.integers(35, 91, size=batch)
    imgs = [_jpeg(im, q) if j else im for im, j, q in zip(imgs, jpeg_on, quality)]
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    x = augment(_to_unit(imgs), gen, p_clean=p_clean)
    return x * 2 - 1, labels_for(attrs)


# ----------------------------------------------------------------------------- the judge
class Judge:
    """A trained judge. `predict` / `predict_proba` take a list of uint8 HxWx3 arrays (or PIL
    images, or float arrays in [0, 1]) or a float tensor Bx3xHxW in [-1, 1]; anything not 64x64
    is resized (bilinear, antialiased). It runs on the CPU unless moved with `to(device)`."""

    def __init__(self, net: JudgeNet, attributes: dict[str, tuple[str, ...]], metadata: dict[str, str] | None = None):
        self.net = net.eval()
        self.attributes = {a: tuple(v) for a, v in attributes.items()}
        self.metadata = dict(metadata or {})

    # -- input handling
    def _prepare(self, images) -> torch.Tensor:
        if isinstance(images, torch.Tensor):
            x = images.detach().to("cpu", torch.float32)
            if x.ndim == 3:
                x = x[None]
            if x.ndim != 4 or x.shape[1] != 3:
                raise UserError(f"judge expects a Bx3xHxW tensor in [-1, 1], got shape {tuple(x.shape)}")
        else:
            if isinstance(images, np.ndarray) and images.ndim == 3:
                images = [images]
            arrays = []
            for i, im in enumerate(images):
                a = np.asarray(im.convert("RGB")) if hasattr(im, "convert") else np.asarray(im)
                if a.ndim == 2:
                    a = np.repeat(a[..., None], 3, axis=2)
                if a.ndim != 3 or a.shape[2] not in (3, 4):
                    raise UserError(f"judge expects HxWx3 images; image {i} has shape {a.shape}")
                a = a[..., :3]
                if a.dtype != np.uint8:
                    if a.size and float(a.min()) < 0:
                        raise UserError(f"judge expects image arrays in [0, 255] (uint8) or [0, 1] (float); image {i} "
                                        "has negative values (pass a Bx3xHxW tensor for [-1, 1])")
                    if np.issubdtype(a.dtype, np.floating) and a.size and float(a.max()) <= 1.0:
                        a = a * 255.0  # float arrays in [0, 1]
                    a = np.clip(np.rint(a), 0, 255).astype(np.uint8)
                a = a if a.flags.writeable and a.flags.c_contiguous else np.array(a, order="C")
                t = torch.from_numpy(a).permute(2, 0, 1).float()[None] / 127.5 - 1.0
                arrays.append(self._resize(t))
            if not arrays:
                return torch.zeros((0, 3, faces.SIZE, faces.SIZE))
            x = torch.cat(arrays)
        return self._resize(x)

    @staticmethod
    def _resize(x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[2:]) != (faces.SIZE, faces.SIZE):
            x = F.interpolate(x, size=(faces.SIZE, faces.SIZE), mode="bilinear", antialias=True, align_corners=False)
        return x

    def to(self, device: str | torch.device) -> "Judge":
        self.net.to(device)
        return self

    # -- inference
    @torch.no_grad()
    def logits(self, images, batch_size: int = 256) -> list[torch.Tensor]:
        """Per-attribute logits (B, n_values) on the CPU."""
        x = self._prepare(images)
        device = next(self.net.parameters()).device
        outs: list[list[torch.Tensor]] = [[] for _ in self.attributes]
        for i in range(0, x.shape[0], batch_size):
            for k, o in enumerate(self.net(x[i:i + batch_size].to(device))):
                outs[k].append(o.float().cpu())
        return [torch.cat(o) if o else torch.zeros((0, len(v))) for o, v in zip(outs, self.attributes.values())]

    def predict_proba(self, images, batch_size: int = 256) -> dict[str, np.ndarray]:
        """attribute -> float32 array (B, n_values), columns in `self.attributes[attribute]` order."""
        logits = self.logits(images, batch_size)
        return {a: torch.softmax(l, dim=1).numpy() for a, l in zip(self.attributes, logits)}

    def predict(self, images, batch_size: int = 256) -> list[dict[str, str]]:
        """One dict attribute -> most likely value per image."""
        proba = self.predict_proba(images, batch_size)
        n = next(iter(proba.values())).shape[0] if proba else 0
        return [{a: self.attributes[a][int(p[i].argmax())] for a, p in proba.items()} for i in range(n)]

    # -- files
    def save(self, path: str | os.PathLike, extra_metadata: dict[str, str] | None = None) -> None:
        meta = dict(self.metadata)
        meta.update(extra_metadata or {})
        meta.update(format=FORMAT, attributes=json.dumps({a: list(v) for a, v in self.attributes.items()}))
        save_safetensors({k: v.to(torch.float16) if v.is_floating_point() else v
                          for k, v in self.net.state_dict().items()}, path, metadata=meta)


_CACHE: dict[str, Judge] = {}


def load_judge(path: str | os.PathLike | None = None) -> Judge:
    """Load a judge (default: the shipped asset). Results are cached per resolved path."""
    p = Path(DEFAULT_PATH if path is None else path).resolve()
    key = str(p)
    if key in _CACHE:
        return _CACHE[key]
    if path is None and not p.exists():
        raise UserError("the shipped judge weights are missing", path=p,
                        hint="reinstall difflora, or retrain with difflora.toy.judge.train_judge")
    tensors, meta = load_safetensors(p)
    if meta.get("format") != FORMAT:
        raise UserError(f"not a difflora judge file (format {meta.get('format')!r}, expected {FORMAT!r})", path=p)
    try:
        attributes = {a: tuple(v) for a, v in json.loads(meta["attributes"]).items()}
        widths = tuple(int(w) for w in json.loads(meta.get("widths", json.dumps(DEFAULT_WIDTHS))))
    except (KeyError, ValueError, TypeError) as e:
        raise UserError(f"judge file has bad metadata ({e})", path=p) from None
    net = JudgeNet([len(v) for v in attributes.values()], widths)
    try:
        net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in tensors.items()})
    except RuntimeError as e:
        raise UserError(f"judge weights do not match the network ({str(e).splitlines()[0]})", path=p) from None
    judge = Judge(net, attributes, meta)
    _CACHE[key] = judge
    return judge


# ----------------------------------------------------------------------------- evaluation
def evaluate(judge: Judge, n: int = 1000, seed: int = 0, augmented: bool = False,
             seed_base: int = EVAL_SEED_BASE, batch_size: int = 250, strength: float = 1.0) -> dict[str, float]:
    """Per-attribute accuracy on `n` fresh faces (render seeds seed_base .. seed_base+n-1,
    attributes from `seed`), optionally with the training augmentations (JPEG included, every
    sample augmented, ranges scaled by `strength`)."""
    rng = np.random.default_rng([seed, 202])
    attrs, seeds = random_faces(rng, n, seed_base=seed_base)
    correct = {a: 0 for a in judge.attributes}
    gen = torch.Generator().manual_seed(seed * 1_000_003 + 7)
    for i in range(0, n, batch_size):
        imgs = [faces.render(a, s) for a, s in zip(attrs[i:i + batch_size], seeds[i:i + batch_size])]
        if augmented:
            jpeg_on = rng.random(len(imgs)) < 0.15
            quality = rng.integers(35, 91, size=len(imgs))
            imgs = [_jpeg(im, q) if j else im for im, j, q in zip(imgs, jpeg_on, quality)]
            x = augment(_to_unit(imgs), gen, strength=strength) * 2 - 1
        else:
            x = _to_unit(imgs) * 2 - 1
        for d, truth in zip(judge.predict(x), attrs[i:i + batch_size]):
            for a in correct:
                correct[a] += d[a] == truth[a]
    return {a: c / n for a, c in correct.items()}


# ----------------------------------------------------------------------------- training
@dataclass
class JudgeTrainConfig:
    seed: int = 0
    steps: int = 3000
    batch: int = 48
    lr: float = 3e-3
    weight_decay: float = 1e-4
    warmup: int = 100
    p_clean: float = 0.15
    p_jpeg: float = 0.15
    label_smoothing: float = 0.02


def train_judge(out_path: str | os.PathLike, seed: int = 0, steps: int = 3000, batch: int = 48,
                lr: float = 3e-3, eval_n: int = 500, **kwargs) -> Judge:
    """Train a judge from scratch on freshly rendered, augmented faces and save it (atomically).

    Deterministic: every face, augmentation and initial weight derives from (seed, step), so
    the same arguments give the same weights on the same machine (use one torch thread).
    """
    cfg = JudgeTrainConfig(seed=seed, steps=steps, batch=batch, lr=lr, **kwargs)
    torch.manual_seed(cfg.seed)
    attributes = {a: tuple(v) for a, v in faces.ATTRIBUTES.items()}
    net = JudgeNet([len(v) for v in attributes.values()]).to(memory_format=torch.channels_last)
    n_params = sum(p.numel() for p in net.parameters())
    log.info("training judge: %d parameters, %d steps of %d faces", n_params, cfg.steps, cfg.batch)
    decay = [p for n_, p in net.named_parameters() if p.ndim > 1]
    no_decay = [p for n_, p in net.named_parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    t0 = time.time()
    net.train()
    bar = tqdm(range(cfg.steps), desc="judge", dynamic_ncols=True)
    ema_loss = None
    for step in bar:
        x, y = _training_batch(cfg.seed, step, cfg.batch, cfg.p_jpeg, cfg.p_clean)
        if step < cfg.warmup:
            f = (step + 1) / cfg.warmup
        else:
            f = 0.5 * (1 + math.cos(math.pi * (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)))
        for g in opt.param_groups:
            g["lr"] = cfg.lr * f
        outs = net(x.contiguous(memory_format=torch.channels_last))
        loss = sum(F.cross_entropy(o, y[:, k], label_smoothing=cfg.label_smoothing) for k, o in enumerate(outs))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema_loss = loss.item() if ema_loss is None else 0.98 * ema_loss + 0.02 * loss.item()
        bar.set_postfix(loss=f"{ema_loss:.4f}")
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"judge training diverged at step {step} (loss {loss.item()})")
    elapsed = time.time() - t0
    net.eval()
    judge = Judge(net, attributes)
    meta = {"config": json.dumps(asdict(cfg), sort_keys=True), "train_seconds": f"{elapsed:.0f}",
            "widths": json.dumps(list(DEFAULT_WIDTHS))}
    if eval_n:
        plain = evaluate(judge, eval_n, seed=cfg.seed + 1)
        log.info("judge accuracy on %d fresh faces: %s", eval_n,
                 ", ".join(f"{a} {v:.3f}" for a, v in plain.items()))
        meta["eval_plain"] = json.dumps(plain, sort_keys=True)
    judge.metadata.update(meta)
    judge.save(out_path)
    _CACHE.pop(str(Path(out_path).resolve()), None)
    log.info("judge saved to %s after %.0f s of training", out_path, elapsed)
    return judge
