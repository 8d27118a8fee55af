"""`difflora toy train-base --world flow`: train the flow world's Z-Image (text-to-image and edit) from scratch.

Two stages, each resumable from its work folder:
1. latents, cached once, through the SD world's toy VAE (reused frozen): a fixed training set of faces (held-out
   attribute combinations never appear) and, for edit triples, the same faces re-rendered with one attribute
   changed (changes in flow_model.HELD_OUT_EDITS never appear);
2. the Qwen3 text encoder and the transformer together, every step a text-to-image batch (captions naming a
   random subset of the attributes, 10% empty for classifier-free guidance) and, every `edit_every` steps, an
   edit batch in Z-Image Omni's layout (reference latents as clean tokens, instruction "change to <phrase>",
   10% empty), with the loss on the target's tokens only. Z-Image's flow matching as the family trains it:
   σ from shift sampling (shift 2), x_t = (1−σ)·x0 + σ·ε, the transformer at 1−σ, its raw output towards x0 − ε,
   plus extra weight inside the eye, mouth and glasses regions, and from a step on (FlowTrainConfig.phases, the
   shipped run's history) a heavier mouth and contrast pairs that bind the mouth to its word. An EMA of the weights
   is exported.
Every random draw is derived from (seed, step), so a resumed run repeats the draws of an uninterrupted one.
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..fileio import load_safetensors, save_safetensors, write_json_atomic
from ..models.flow_matching import FluxFlowObjective
from ..models.zimage.files import FOLDER_EDIT_KEY, FOLDER_VARIANT_KEY
from ..models.zimage.model import TRAIN_FLOW
from ..statefile import load_state, save_state
from . import faces, flow_model
from .train_base import _images_to_tensor, _lr_factor, _random_faces, ema_update

log = logging.getLogger(__name__)

TOY_VAE = Path(__file__).resolve().parent.parent / "assets" / "toy_base" / "vae"
SAMPLING_SHIFT = 3.0  # the released scheduler's


@dataclass
class FlowTrainConfig:
    seed: int = 0
    n_images: int = 12_000
    n_edit_pairs: int = 4_000
    steps: int = 11_000  # the shipped model (about 2 h on 2 CPU cores)
    batch: int = 24
    edit_batch: int = 6
    edit_every: int = 2  # an edit batch every this many steps (an edit sample is ~2.3x a text-to-image one)
    lr: float = 1e-3
    warmup: int = 100
    ema_decay: float = 0.998
    caption_keep: float = 0.8
    caption_drop: float = 0.1
    # Extra loss weight inside each local attribute's region (the SD world's lesson); on the edit loss too when
    # edit_loss_region_weighted (a faithful copy of the reference's eyes and mouth is what preservation judges).
    region_loss_weights: dict = field(default_factory=lambda: {"eyes": 8.0, "mouth": 8.0, "glasses": 8.0})
    region_overlap: str = "max"  # where two regions overlap (eyes, glasses): the larger weight, or their "sum"
    edit_loss_region_weighted: bool = False
    # Contrast pairs in every text-to-image batch: a face and its re-render with one attribute changed (an edit
    # triple's before and after), under the same noise and σ, captions naming the changed attribute. Their noisy
    # inputs nearly match, so only the word can tell the two targets apart. Each row's own loss is mostly the
    # noise's, so the pair also pays for the difference of its two outputs against the difference of its two
    # clean latents (contrast_loss_weight; the noise cancels: a noise-free target for what the word changes).
    contrast_pairs: int = 0
    contrast_loss_weight: float = 0.0
    contrast_attributes: tuple = ("mouth",)
    # The shipped run's later settings, each from a step on. The mouth (its smile and its line differ by ~1 latent
    # pixel, which x_t gives away below σ≈0.5, so the word must decide above) stayed at chance by the judge through
    # step 6,000 (44-52%, cfg 4 or 9); a heavier mouth region did not move it by 7,000 (52%), contrast pairs
    # reached 60% by 8,500 and their difference loss 79% by 9,500 (bench/base_model_quality.py, README).
    phases: list = field(default_factory=lambda: [
        {"from_step": 6000, "region_loss_weights": {"eyes": 8.0, "mouth": 32.0, "glasses": 8.0},
         "region_overlap": "sum", "edit_loss_region_weighted": True},
        {"from_step": 7000, "contrast_pairs": 4},
        {"from_step": 8500, "contrast_loss_weight": 1.0},
    ])
    checkpoint_every: int = 100
    transformer: dict = field(default_factory=flow_model.transformer_config)
    device: str = "cpu"

    def at_step(self, step: int) -> FlowTrainConfig:
        """The settings in force at `step`: these, updated by every phase that has begun."""
        changes: dict = {}
        for phase in sorted(self.phases, key=lambda p: p["from_step"]):
            if phase["from_step"] <= step:
                changes.update({k: v for k, v in phase.items() if k != "from_step"})
        return replace(self, **changes)


class FlowTrainer:
    def __init__(self, work: Path, cfg: FlowTrainConfig):
        self.work = Path(work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.cfg = cfg
        cfg_path = self.work / "config.json"
        if cfg_path.exists() and json.loads(cfg_path.read_text()) != json.loads(json.dumps(asdict(cfg))):
            log.warning("work folder was started with a different config; continuing with the new one")
        write_json_atomic(cfg_path, asdict(cfg))
        self.tokenizer = flow_model.build_tokenizer()
        self.objective = FluxFlowObjective(TRAIN_FLOW)

    # ---------------------------------------------------------------- latents
    def load_vae(self):
        return load_toy_vae()

    def _edit_changes(self, attrs: list[dict]) -> list[tuple[int, str, str]]:
        """(image index, attribute, after value) for each edit pair: any change but the held-out ones, to a
        combination the text-to-image set may contain."""
        rng = np.random.default_rng([self.cfg.seed, 5])
        held = set(flow_model.HELD_OUT_EDITS)
        out = []
        while len(out) < self.cfg.n_edit_pairs:
            i = int(rng.integers(len(attrs)))
            attribute = faces.CAPTION_ORDER[int(rng.integers(len(faces.CAPTION_ORDER)))]
            after = faces.ATTRIBUTES[attribute][int(rng.integers(len(faces.ATTRIBUTES[attribute])))]
            changed = dict(attrs[i], **{attribute: after})
            if after == attrs[i][attribute] or (attribute, after) in held or faces.is_held_out(changed):
                continue
            out.append((i, attribute, after))
        return out

    def cache_latents(self, vae):
        cfg = self.cfg
        path = self.work / "latents.safetensors"
        if path.exists():
            t, meta = load_safetensors(path)
            return ({k: v.float() for k, v in t.items() if k != "regions"} | {"regions": t["regions"]},
                    json.loads(meta["attrs"]), [tuple(c) for c in json.loads(meta["edits"])])
        rng = np.random.default_rng([cfg.seed, 3])
        attrs, seeds = _random_faces(rng, cfg.n_images, held_out=False)
        edits = self._edit_changes(attrs)
        jobs = [(a, s) for a, s in zip(attrs, seeds)]
        jobs += [(dict(attrs[i], **{attribute: after}), seeds[i]) for i, attribute, after in edits]
        means, stds = [], []
        with torch.no_grad():
            for k in tqdm(range(0, len(jobs), 256), desc="latents", dynamic_ncols=True):
                x = _images_to_tensor([faces.render(a, s) for a, s in jobs[k:k + 256]])
                d = vae.encode(x).latent_dist
                means.append(d.mean.half())
                stds.append(d.std.half())
        mean, std = torch.cat(means), torch.cat(stds)
        region_maps = region_maps_for(seeds, tuple(mean.shape[-2:]))
        tensors = {"mean": mean[:cfg.n_images], "std": std[:cfg.n_images], "edit_mean": mean[cfg.n_images:],
                   "edit_std": std[cfg.n_images:], "regions": region_maps}
        save_safetensors(tensors, path, metadata={"attrs": json.dumps(attrs), "edits": json.dumps(edits)})
        return ({k: v.float() for k, v in tensors.items() if k != "regions"} | {"regions": region_maps},
                attrs, edits)

    # ---------------------------------------------------------------- one step's batches
    def _captions(self, rng: np.random.Generator, attrs: list[dict]) -> list[str]:
        out = []
        for a in attrs:
            if rng.random() < self.cfg.caption_drop:
                out.append("")
                continue
            keep = [k for k in faces.CAPTION_ORDER if rng.random() < self.cfg.caption_keep]
            out.append(faces.caption(a, include=keep))
        return out

    @staticmethod
    def _loss_weight(cfg: FlowTrainConfig, regions: torch.Tensor) -> torch.Tensor:
        """1 + the configured extra weight inside each local attribute's region (regions: N × 3 × h × w)."""
        w = torch.tensor([cfg.region_loss_weights.get(a, 0.0) for a in faces.LOCAL_ATTRIBUTES])
        weighted = regions.float() * w.view(1, -1, 1, 1)
        return 1 + (weighted.sum(1, keepdim=True) if cfg.region_overlap == "sum" else weighted.amax(1, keepdim=True))

    def _noised(self, x0: torch.Tensor, gen: torch.Generator):
        sigma = self.objective.sample_sigmas(x0.shape[0], gen, tuple(x0.shape[-2:]))
        noise = torch.randn(x0.shape, generator=gen)
        s = sigma.view(-1, 1, 1, 1)
        return (1 - s) * x0 + s * noise, 1 - sigma, x0 - noise  # noisy, Z-Image's t, the raw output's target

    def losses(self, transformer, te, data, attrs, edits, step: int):
        """(text-to-image loss, edit loss or None) of one step; draws from (seed, step) only."""
        cfg = self.cfg.at_step(step)
        dev = torch.device(cfg.device)
        rng = np.random.default_rng([cfg.seed, 4, step])
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 7 * step + 1)
        scaling = flow_vae_scaling()
        idx = rng.integers(0, len(attrs), size=cfg.batch)
        x0 = (data["mean"][idx] + data["std"][idx] * torch.randn(data["mean"][idx].shape, generator=gen)) * scaling
        captions = self._captions(rng, [attrs[i] for i in idx])
        noisy, model_t, target = self._noised(x0, gen)
        regions = data["regions"][idx]
        if cfg.contrast_pairs:
            c_captions, c_noisy, c_t, c_target, c_regions = self._contrast_pairs(cfg, rng, gen, data, attrs, edits)
            captions += c_captions
            noisy, model_t = torch.cat([noisy, c_noisy]), torch.cat([model_t, c_t])
            target, regions = torch.cat([target, c_target]), torch.cat([regions, c_regions])
        caps = flow_model.encode_segments(self.tokenizer, te, [flow_model.t2i_text(c) for c in captions])
        out = flow_model.t2i_forward(transformer, noisy.to(dev), model_t.to(dev), caps)
        weight = self._loss_weight(cfg, regions).to(dev)
        t2i = (F.mse_loss(out, target.to(dev), reduction="none") * weight).mean()
        if cfg.contrast_pairs and cfg.contrast_loss_weight:
            pairs, want, w = out[cfg.batch:], target[cfg.batch:].to(dev), weight[cfg.batch:]
            told = pairs[0::2] - pairs[1::2]
            t2i = t2i + cfg.contrast_loss_weight * (F.mse_loss(told, want[0::2] - want[1::2], reduction="none")
                                                    * w[0::2]).mean()
        if not cfg.edit_batch or step % cfg.edit_every:
            return t2i, None
        pick = rng.integers(0, len(edits), size=cfg.edit_batch)
        src = torch.tensor([edits[p][0] for p in pick])
        ref = (data["mean"][src] + data["std"][src] * torch.randn(data["mean"][src].shape, generator=gen)) * scaling
        after = data["edit_mean"][pick] + data["edit_std"][pick] * torch.randn(data["edit_mean"][pick].shape,
                                                                                 generator=gen)
        prompts = ["" if rng.random() < cfg.caption_drop else flow_model.instruction(edits[p][1], edits[p][2])
                   for p in pick]
        noisy, model_t, target = self._noised(after * scaling, gen)
        flat = flow_model.encode_segments(self.tokenizer, te, [s for p in prompts for s in flow_model.edit_texts(p)])
        segments = [flat[3 * k:3 * k + 3] for k in range(len(prompts))]
        out = flow_model.edit_forward(transformer, ref.to(dev), noisy.to(dev), model_t.to(dev), segments)
        err = F.mse_loss(out, target.to(dev), reduction="none")
        if cfg.edit_loss_region_weighted:
            err = err * self._loss_weight(cfg, data["regions"][src]).to(dev)
        return t2i, err.mean()

    def _contrast_pairs(self, cfg: FlowTrainConfig, rng: np.random.Generator, gen: torch.Generator, data, attrs,
                        edits):
        """(captions, noisy, model t, target, regions) of cfg.contrast_pairs pairs, each pair's two rows adjacent."""
        allowed = [k for k, e in enumerate(edits) if e[1] in cfg.contrast_attributes]
        pick = [allowed[int(j)] for j in rng.integers(0, len(allowed), size=cfg.contrast_pairs)]
        src = torch.tensor([edits[p][0] for p in pick])
        scaling = flow_vae_scaling()
        before = data["mean"][src] + data["std"][src] * torch.randn(data["mean"][src].shape, generator=gen)
        after = data["edit_mean"][pick] + data["edit_std"][pick] * torch.randn(data["edit_mean"][pick].shape,
                                                                               generator=gen)
        x0 = torch.stack([before, after], 1).flatten(0, 1) * scaling
        sigma = self.objective.sample_sigmas(len(pick), gen, tuple(x0.shape[-2:])).repeat_interleave(2)
        noise = torch.randn(before.shape, generator=gen).repeat_interleave(2, 0)
        s = sigma.view(-1, 1, 1, 1)
        captions = []
        for p in pick:
            i, attribute, value = edits[p]
            keep = [k for k in faces.CAPTION_ORDER if k == attribute or rng.random() < cfg.caption_keep]
            captions += [faces.caption(attrs[i], include=keep), faces.caption(dict(attrs[i], **{attribute: value}),
                                                                             include=keep)]
        return (captions, (1 - s) * x0 + s * noise, 1 - sigma, x0 - noise,
                data["regions"][src].repeat_interleave(2, 0))

    # ---------------------------------------------------------------- training
    def build(self):
        torch.manual_seed(self.cfg.seed + 11)
        transformer = flow_model.build_transformer(self.cfg.transformer)
        te = flow_model.build_text_encoder(self.tokenizer)
        return transformer, te

    def train(self, data, attrs, edits):
        cfg = self.cfg
        dev = torch.device(cfg.device)
        transformer, te = self.build()
        transformer.to(dev).train()
        te.to(dev).train()
        ema_tr = {k: v.detach().clone() for k, v in transformer.state_dict().items()}
        ema_te = {k: v.detach().clone() for k, v in te.state_dict().items()}
        params = list(transformer.parameters()) + list(te.parameters())
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-2)
        start = 0
        state_dir = self.work / "state"
        if (state_dir / "state.json").exists():
            st = load_state(state_dir)
            transformer.load_state_dict(st["transformer"])
            te.load_state_dict(st["te"])
            ema_tr, ema_te = st["ema_transformer"], st["ema_te"]
            opt.load_state_dict(st["opt"])
            start = st["step"]
            log.info("resuming at step %d", start)
        bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="flow", dynamic_ncols=True)
        t0 = time.time()
        edit_loss = float("nan")
        for step in bar:
            for g in opt.param_groups:
                g["lr"] = cfg.lr * _lr_factor(step, cfg.warmup)
            t2i, edit = self.losses(transformer, te, data, attrs, edits, step)
            loss = t2i if edit is None else t2i + edit
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            ema_update(((ema_tr, transformer), (ema_te, te)), step, cfg.ema_decay)
            if edit is not None:
                edit_loss = edit.item()
            bar.set_postfix(loss=f"{t2i.item():.4f}", edit=f"{edit_loss:.4f}")
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
                save_state(state_dir, {"transformer": transformer.state_dict(), "te": te.state_dict(),
                                       "ema_transformer": ema_tr, "ema_te": ema_te, "opt": opt.state_dict(),
                                       "step": step + 1})
                log.info("step %d: loss %.4f, edit loss %.4f, %.2f s/step", step + 1, t2i.item(), edit_loss,
                         (time.time() - t0) / (step + 1 - start))
        transformer.load_state_dict(ema_tr)
        te.load_state_dict(ema_te)
        return transformer.to("cpu").eval(), te.to("cpu").eval()

    # ---------------------------------------------------------------- export
    def export(self, transformer, te, out: Path) -> Path:
        return write_flow_folder(transformer, te, self.tokenizer, out)


def region_maps_for(seeds: list[int], latent_size: tuple[int, int]) -> torch.Tensor:
    """Per face seed, its eyes / mouth / glasses regions (faces.LOCAL_ATTRIBUTES order) at latent size, uint8."""
    regions = np.zeros((len(seeds), len(faces.LOCAL_ATTRIBUTES), faces.SIZE, faces.SIZE), np.float32)
    for k, s in enumerate(seeds):
        r = faces.regions(s)
        for c, a in enumerate(faces.LOCAL_ATTRIBUTES):
            regions[k, c] = r[a]
    return F.adaptive_max_pool2d(torch.from_numpy(regions), latent_size).to(torch.uint8)


def load_toy_vae():
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(TOY_VAE, local_files_only=True)
    vae.register_to_config(shift_factor=0.0)  # Z-Image's z = (x − shift)·scale, with the toy VAE's scale
    return vae.requires_grad_(False).eval()


def write_flow_folder(transformer, te, tokenizer, out: Path) -> Path:
    """A diffusers Z-Image folder (ZImagePipeline) with the toy VAE, the variant "base" and its edit layout
    ("omni") recorded for the zimage family."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

    from ..fileio import atomic_folder
    from ..models.folders import publish_layout

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SAMPLING_SHIFT,
                                            use_dynamic_shifting=False)
    pipe = ZImagePipeline(scheduler=sched, vae=load_toy_vae(), text_encoder=te, tokenizer=tokenizer,
                          transformer=transformer)
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    with atomic_folder(out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        publish_layout(tmp)
        vae_config = tmp / "vae" / "config.json"  # from_pretrained recorded where the toy VAE was read: no machine path
        write_json_atomic(vae_config, {**json.loads(vae_config.read_text()), "_name_or_path": "vae"})
        index = tmp / "model_index.json"
        write_json_atomic(index, {**json.loads(index.read_text()), FOLDER_VARIANT_KEY: "base",
                                  FOLDER_EDIT_KEY: "omni"})
    log.info("saved the flow world's model to %s", out)
    return out


@functools.cache  # read once, not on every training step
def flow_vae_scaling() -> float:
    return float(json.loads((TOY_VAE / "config.json").read_text())["scaling_factor"])


def export_checkpoint(work: Path, out: Path) -> Path:
    """Export the EMA weights of the latest checkpoint in a work folder (to judge it mid-run)."""
    work = Path(work)
    saved = json.loads((work / "config.json").read_text())
    trainer = FlowTrainer.__new__(FlowTrainer)
    trainer.work, trainer.cfg = work, FlowTrainConfig(**saved)
    trainer.tokenizer = flow_model.build_tokenizer()
    st = load_state(work / "state")
    transformer, te = trainer.build()
    transformer.load_state_dict(st["ema_transformer"])
    te.load_state_dict(st["ema_te"])
    trainer.export(transformer.eval(), te.eval(), out)
    log.info("exported step %d", st["step"])
    return out


def train_flow(out: Path, work: Path, cfg: FlowTrainConfig) -> Path:
    trainer = FlowTrainer(work, cfg)
    data, attrs, edits = trainer.cache_latents(trainer.load_vae())
    transformer, te = trainer.train(data, attrs, edits)
    return trainer.export(transformer, te, out)
