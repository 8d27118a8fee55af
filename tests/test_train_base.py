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
