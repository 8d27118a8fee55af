"""`difflora toy train-base`: train the embedded default model from scratch.

Three stages, each resumable from its last checkpoint in the work folder:
1. the VAE on freshly rendered faces (MSE + L1 + a small KL term);
2. latents of a fixed training set of faces (combinations held out by `faces.is_held_out`
   never appear), cached once;
3. the text encoder and U-Net together, with captions naming a random subset of the
   attributes (10% empty, for classifier-free guidance), min-SNR weighting and an EMA
   of the weights, which is what gets exported.
Every random draw is derived from (seed, step), so a resumed run repeats the draws of an
uninterrupted one (weights agree to float rounding, ~1e-7).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..fileio import load_safetensors, save_safetensors, write_json_atomic
from ..models.sd.model import mark_toy_folder
from ..statefile import load_state, save_state
from . import base_model, faces

log = logging.getLogger(__name__)


@dataclass
class BaseTrainConfig:
    seed: int = 0
    vae_steps: int = 2500
    vae_batch: int = 32
    vae_crop_fraction: float = 0.7  # first 70% of VAE steps on 32x32 crops (4x cheaper), then full images
    vae_edge_weight: float = 1.0  # L1 on image gradients: keeps thin lines (mouths, closed eyes) sharp
    vae_lr: float = 1e-3
    n_images: int = 60_000
    unet_steps: int = 6000  # the shipped model: every attribute judged right on held-out prompts
    unet_batch: int = 64
    unet_lr: float = 6e-4
    warmup: int = 300
    ema_decay: float = 0.999
    caption_keep: float = 0.8
    caption_drop: float = 0.1
    min_snr_gamma: float = 5.0
    # Extra loss weight on the small regions that carry local attributes (eyes, mouth, glasses),
    # from a given step on. The mouth (a 2-pixel curve against a line) stayed unbound to its words
    # at ~45% accuracy through step 4,250 of the shipped run, so the weighting was switched on
    # there; these defaults reproduce that run.
    region_loss_weight: float = 8.0
    region_loss_from_step: int = 4250
    checkpoint_every: int = 250
    device: str = "cpu"  # "cuda" where a GPU is available (deterministic per machine, not bit-equal to CPU)


def _images_to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def _random_faces(rng: np.random.Generator, n: int, held_out: bool | None = False):
    attrs = [faces.sample_attributes(rng, held_out=held_out) for _ in range(n)]
    seeds = rng.integers(0, 2**31 - 1, size=n)
    return attrs, [int(s) for s in seeds]


@torch.no_grad()
def ema_update(pairs, step: int, max_decay: float) -> None:
    """EMA of each (ema state dict, model) pair, decay min(max_decay, (1 + step) / (10 + step)) (fast at first)."""
    decay = min(max_decay, (1 + step) / (10 + step))
    for ema, model in pairs:
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                ema[k].mul_(decay).add_(v.detach(), alpha=1 - decay)
            else:
                ema[k].copy_(v)


def base_denoising_loss(pred: torch.Tensor, noise: torch.Tensor, snr_weight: torch.Tensor,
                        region: torch.Tensor | None = None, region_weight: float = 0.0) -> torch.Tensor:
    """mean_i( w_i · mean_chw( (1 + region_weight · region_i) · (pred_i - noise_i)^2 ) ), region in {0, 1}."""
    err = F.mse_loss(pred, noise, reduction="none")
    if region is not None:
        err = err * (1 + region_weight * region.to(err.dtype))
    return (err.mean(dim=(1, 2, 3)) * snr_weight).mean()


def _lr_factor(step: int, warmup: int) -> float:
    return min(1.0, (step + 1) / warmup)


class BaseTrainer:
    def __init__(self, work: Path, cfg: BaseTrainConfig):
        self.work = Path(work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.cfg = cfg
        cfg_path = self.work / "config.json"
        if cfg_path.exists():
            saved = json.loads(cfg_path.read_text())
            if saved != asdict(cfg):
                log.warning("work folder was started with a different config; continuing with the new one")
        write_json_atomic(cfg_path, asdict(cfg))
        self.tokenizer = base_model.build_tokenizer()

    # ---------------------------------------------------------------- VAE
    def train_vae(self):
        from diffusers import AutoencoderKL

        cfg = self.cfg
        done = self.work / "vae_final"
        if (done / "config.json").exists():
            return AutoencoderKL.from_pretrained(done, local_files_only=True)
        torch.manual_seed(cfg.seed)
        dev = torch.device(cfg.device)
        vae = AutoencoderKL(**base_model.VAE_CONFIG).to(dev)
        opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
        start = 0
        state_dir = self.work / "vae_state"
        if (state_dir / "state.json").exists():
            st = load_state(state_dir)
            vae.load_state_dict(st["model"])
            opt.load_state_dict(st["opt"])
            start = st["step"]
            log.info("resuming VAE at step %d", start)
        vae.train()
        bar = tqdm(range(start, cfg.vae_steps), initial=start, total=cfg.vae_steps, desc="vae", dynamic_ncols=True)
        for step in bar:
            rng = np.random.default_rng([cfg.seed, 1, step])
            torch.manual_seed(cfg.seed * 1_000_003 + step)
            cropping = step < cfg.vae_crop_fraction * cfg.vae_steps
            attrs, seeds = _random_faces(rng, cfg.vae_batch * (2 if cropping else 1), held_out=None)
            x = _images_to_tensor([faces.render(a, s) for a, s in zip(attrs, seeds)]).to(dev)
            if cropping:  # the VAE is convolutional: crops teach local detail at a quarter of the cost
                half = faces.SIZE // 2
                offs = rng.integers(0, half + 1, size=(x.shape[0], 2))
                x = torch.stack([img[:, oy:oy + half, ox:ox + half] for img, (oy, ox) in zip(x, offs)])
            for g in opt.param_groups:
                lr = cfg.vae_lr * _lr_factor(step, 100)
                if step > 0.75 * cfg.vae_steps:
                    lr *= 0.2
                g["lr"] = lr
            post = vae.encode(x).latent_dist
            z = post.sample()
            rec = vae.decode(z).sample
            kl = post.kl().mean() / z[0].numel()
            edges = F.l1_loss(rec.diff(dim=-1), x.diff(dim=-1)) + F.l1_loss(rec.diff(dim=-2), x.diff(dim=-2))
            loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + cfg.vae_edge_weight * edges + 1e-5 * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            opt.step()
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.vae_steps:
                save_state(state_dir, {"model": vae.state_dict(), "opt": opt.state_dict(), "step": step + 1})
        vae.eval()
        # Scale latents to unit variance, as SD's 0.18215 does for its VAE.
        with torch.no_grad():
            rng = np.random.default_rng([cfg.seed, 2])
            attrs, seeds = _random_faces(rng, 512, held_out=None)
            x = _images_to_tensor([faces.render(a, s) for a, s in zip(attrs, seeds)]).to(dev)
            std = torch.cat([vae.encode(x[i:i + 64]).latent_dist.mean for i in range(0, 512, 64)]).std().item()
        vae.register_to_config(scaling_factor=round(1.0 / std, 5))
        vae.to("cpu").save_pretrained(done, safe_serialization=True)
        vae.to(dev)
        log.info("VAE done: latent std %.4f, scaling_factor %.5f", std, 1.0 / std)
        return vae

    # ---------------------------------------------------------------- latents
    def cache_latents(self, vae):
        cfg = self.cfg
        path = self.work / "latents.safetensors"
        if path.exists():
            t, meta = load_safetensors(path)
            return t["mean"].float(), t["std"].float(), json.loads(meta["attrs"])
        dev = next(vae.parameters()).device
        rng = np.random.default_rng([cfg.seed, 3])
        attrs, seeds = _random_faces(rng, cfg.n_images, held_out=False)
        means, stds = [], []
        with torch.no_grad():
            for i in tqdm(range(0, cfg.n_images, 256), desc="latents", dynamic_ncols=True):
                x = _images_to_tensor([faces.render(a, s) for a, s in zip(attrs[i:i + 256], seeds[i:i + 256])])
                d = vae.encode(x.to(dev)).latent_dist
                means.append(d.mean.half().cpu())
                stds.append(d.std.half().cpu())
        mean, std = torch.cat(means), torch.cat(stds)
        save_safetensors({"mean": mean, "std": std}, path, metadata={"attrs": json.dumps(attrs)})
        return mean.float(), std.float(), attrs

    # ---------------------------------------------------------------- U-Net + text encoder
    def _captions(self, rng: np.random.Generator, attrs: list[dict]) -> list[str]:
        out = []
        for a in attrs:
            if rng.random() < self.cfg.caption_drop:
                out.append("")
                continue
            keep = [k for k in faces.CAPTION_ORDER if rng.random() < self.cfg.caption_keep]
            out.append(faces.caption(a, include=keep))
        return out

    def _region_maps(self, attrs: list[dict], latent_hw) -> torch.Tensor:
        """Per cached image, 1 where a local attribute (eyes, mouth, glasses) can be drawn, at latent size."""
        rng = np.random.default_rng([self.cfg.seed, 3])  # the draw `cache_latents` made
        check, seeds = _random_faces(rng, self.cfg.n_images, held_out=False)
        if check != attrs:
            raise RuntimeError("cached latents do not match the configured training set; delete latents.safetensors")
        maps = []
        for i in range(0, len(seeds), 1000):
            chunk = np.zeros((len(seeds[i:i + 1000]), 1, faces.SIZE, faces.SIZE), np.float32)
            for k, s in enumerate(seeds[i:i + 1000]):
                r = faces.regions(s)
                chunk[k, 0] = r["eyes"] | r["mouth"] | r["glasses"]
            maps.append(F.adaptive_max_pool2d(torch.from_numpy(chunk), tuple(latent_hw)).to(torch.uint8))
        return torch.cat(maps)

    def train_unet(self, vae, mean, std, attrs):
        from diffusers import DDPMScheduler, UNet2DConditionModel

        cfg = self.cfg
        torch.manual_seed(cfg.seed + 11)
        dev = torch.device(cfg.device)
        unet = UNet2DConditionModel(**base_model.UNET_CONFIG).to(dev)
        te = base_model.build_text_encoder(self.tokenizer).to(dev)
        ema_unet = {k: v.detach().clone() for k, v in unet.state_dict().items()}
        ema_te = {k: v.detach().clone() for k, v in te.state_dict().items()}
        params = list(unet.parameters()) + list(te.parameters())
        opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=1e-2)
        sched = DDPMScheduler(**{k: v for k, v in base_model.SCHEDULER_CONFIG.items() if k != "set_alpha_to_one"})
        alphas = sched.alphas_cumprod
        snr = alphas / (1 - alphas)
        scaling = vae.config.scaling_factor
        start = 0
        state_dir = self.work / "unet_state"
        if (state_dir / "state.json").exists():
            st = load_state(state_dir)
            unet.load_state_dict(st["unet"])
            te.load_state_dict(st["te"])
            ema_unet, ema_te = st["ema_unet"], st["ema_te"]
            opt.load_state_dict(st["opt"])
            start = st["step"]
            log.info("resuming U-Net at step %d", start)
        unet.train()
        te.train()
        n = mean.shape[0]
        region_maps = self._region_maps(attrs, mean.shape[-2:]) if cfg.region_loss_weight else None
        bar = tqdm(range(start, cfg.unet_steps), initial=start, total=cfg.unet_steps, desc="unet", dynamic_ncols=True)
        t0 = time.time()
        for step in bar:
            rng = np.random.default_rng([cfg.seed, 4, step])
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 7 * step + 1)
            idx = rng.integers(0, n, size=cfg.unet_batch)
            lat = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scaling
            caps = self._captions(rng, [attrs[i] for i in idx])
            ids = self.tokenizer(caps, padding="max_length", max_length=base_model.MAX_LENGTH,
                                 truncation=True, return_tensors="pt").input_ids
            noise = torch.randn(lat.shape, generator=gen)
            t = torch.randint(0, 1000, (cfg.unet_batch,), generator=gen)
            lat, noise, ids = lat.to(dev), noise.to(dev), ids.to(dev)
            noisy = sched.add_noise(lat, noise, t.to(dev))
            for g in opt.param_groups:
                g["lr"] = cfg.unet_lr * _lr_factor(step, cfg.warmup)
            cond = te(ids).last_hidden_state
            pred = unet(noisy, t.to(dev), cond).sample
            w = (torch.clamp(snr[t], max=cfg.min_snr_gamma) / snr[t]).to(dev)
            region = region_maps[idx].to(dev) if region_maps is not None and step >= cfg.region_loss_from_step else None
            loss = base_denoising_loss(pred, noise, w, region, cfg.region_loss_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            ema_update(((ema_unet, unet), (ema_te, te)), step, cfg.ema_decay)
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.unet_steps:
                save_state(state_dir, {"unet": unet.state_dict(), "te": te.state_dict(), "ema_unet": ema_unet,
                                       "ema_te": ema_te, "opt": opt.state_dict(), "step": step + 1})
        log.info("U-Net stage: %d steps in %.0f s", cfg.unet_steps - start, time.time() - t0)
        unet.load_state_dict(ema_unet)
        te.load_state_dict(ema_te)
        return unet.to("cpu").eval(), te.to("cpu").eval()

    # ---------------------------------------------------------------- export
    def export(self, vae, unet, te, out: Path):
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=te, tokenizer=self.tokenizer, unet=unet,
            scheduler=DDIMScheduler(**base_model.SCHEDULER_CONFIG),
            safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False,
        )
        out = Path(out)
        tmp = out.with_name(out.name + ".tmp")
        import shutil

        from ..models.folders import prefix_text_encoder_keys

        shutil.rmtree(tmp, ignore_errors=True)
        pipe.save_pretrained(tmp, safe_serialization=True)
        mark_toy_folder(tmp)
        prefix_text_encoder_keys(tmp)  # the layout transformers 4, kohya and ComfyUI read
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
        log.info("saved base model to %s", out)


def export_checkpoint(work: Path, out: Path) -> Path:
    """Export the EMA weights of the latest U-Net checkpoint in a work folder (to judge it mid-run)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    work = Path(work)
    cfg = BaseTrainConfig(**json.loads((work / "config.json").read_text()))
    trainer = BaseTrainer.__new__(BaseTrainer)
    trainer.work, trainer.cfg, trainer.tokenizer = work, cfg, base_model.build_tokenizer()
    vae = AutoencoderKL.from_pretrained(work / "vae_final", local_files_only=True)
    st = load_state(work / "unet_state")
    unet = UNet2DConditionModel(**base_model.UNET_CONFIG)
    unet.load_state_dict(st["ema_unet"])
    te = base_model.build_text_encoder(trainer.tokenizer)
    te.load_state_dict(st["ema_te"])
    trainer.export(vae, unet.eval(), te.eval(), out)
    log.info("exported step %d", st["step"])
    return out


def train_base(out: Path, work: Path, cfg: BaseTrainConfig) -> Path:
    trainer = BaseTrainer(work, cfg)
    vae = trainer.train_vae()
    vae.requires_grad_(False)
    mean, std, attrs = trainer.cache_latents(vae)
    unet, te = trainer.train_unet(vae, mean, std, attrs)
    trainer.export(vae.to("cpu"), unet, te, out)
    return out
