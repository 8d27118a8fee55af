"""`difflora toy train-base` on a miniature schedule: deterministic, and a resumed run matches an
uninterrupted one (the shipped base model was trained through several restarts).

Resuming reproduces every random draw; the weights agree to float rounding (about 1e-7 after a
restart), not bit for bit, while two runs of the same schedule agree exactly."""

from __future__ import annotations

from dataclasses import replace

import torch
from safetensors.torch import load_file

from difflora.toy.train_base import BaseTrainConfig, train_base

TINY = BaseTrainConfig(vae_steps=3, vae_batch=2, n_images=16, unet_steps=4, unet_batch=2, warmup=2,
                       checkpoint_every=2, region_loss_weight=8.0, region_loss_from_step=2)


def _unet(out):
    return load_file(out / "unet" / "diffusion_pytorch_model.safetensors")


def test_resumed_base_training_matches_uninterrupted(tmp_path):
    full = train_base(tmp_path / "full_out", tmp_path / "full_work", TINY)
    again = train_base(tmp_path / "again_out", tmp_path / "again_work", TINY)
    a, b = _unet(full), _unet(again)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # Interrupted after 2 U-Net steps (the VAE and latent cache are reused), then resumed to 4.
    train_base(tmp_path / "part_out", tmp_path / "part_work", replace(TINY, unet_steps=2))
    resumed = train_base(tmp_path / "resumed_out", tmp_path / "part_work", TINY)
    b = _unet(resumed)
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    # ...and the weights did move: a model trained 2 steps differs from one trained 4.
    early = _unet(tmp_path / "part_out")
    assert max((a[k] - early[k]).abs().max().item() for k in a) > 1e-4
    assert (full / "vae" / "config.json").is_file() and (full / "tokenizer").is_dir()


def test_base_denoising_loss_equals_its_formula():
    from difflora.toy.train_base import base_denoising_loss

    g = torch.Generator().manual_seed(0)
    pred, noise = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    w = torch.tensor([0.5, 2.0])
    region = torch.zeros(2, 1, 3, 3, dtype=torch.uint8)
    region[0, 0, 1, 1] = 1
    sq = (pred - noise) ** 2
    plain = (w[0] * sq[0].mean() + w[1] * sq[1].mean()) / 2
    assert torch.allclose(base_denoising_loss(pred, noise, w), plain)
    weighted0 = (sq[0].sum() + 8 * sq[0, :, 1, 1].sum()) / sq[0].numel()
    expected = (w[0] * weighted0 + w[1] * sq[1].mean()) / 2
    assert torch.allclose(base_denoising_loss(pred, noise, w, region, 8.0), expected)


def test_region_maps_cover_the_mouth_eyes_and_glasses_at_latent_size():
    import numpy as np

    from difflora.toy import faces
    from difflora.toy.train_base import BaseTrainer, _random_faces

    cfg = replace(TINY, n_images=4)
    trainer = BaseTrainer.__new__(BaseTrainer)
    trainer.cfg = cfg
    attrs, seeds = _random_faces(np.random.default_rng([cfg.seed, 3]), cfg.n_images, held_out=False)
    maps = trainer._region_maps(attrs, (16, 16))
    assert maps.shape == (4, 1, 16, 16)
    for i, s in enumerate(seeds):
        r = faces.regions(s)
        ys, xs = np.nonzero(r["mouth"] | r["eyes"] | r["glasses"])
        assert maps[i, 0, ys // 4, xs // 4].all()  # every region pixel's latent cell is marked
        assert 0 < maps[i].float().mean() < 0.3  # ...and the background is not
