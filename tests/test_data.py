"""kohya dataset semantics: folders, repeats, regularisation balance, buckets, caption rules, batches."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import _write_faces
from difflora.config import JobConfig
from difflora.data.captions import CaptionRules, process_caption
from difflora.data.dataset import TrainingData, choose_bucket, make_bucket_resolutions, no_upscale_bucket
from difflora.errors import UserError


def test_kohya_folder_convention_repeats_and_regularisation(tmp_path):
    _write_faces(tmp_path / "train" / "3_face", 2, 16)
    _write_faces(tmp_path / "train" / "not_numbered", 2, 16)  # ignored, as in kohya
    _write_faces(tmp_path / "reg" / "1_person", 4, 16, seed=1)
    job = JobConfig(train_data_dir=str(tmp_path / "train"), reg_data_dir=str(tmp_path / "reg"), resolution=16)
    data = TrainingData(job, 16, 8, pairs=False)
    assert data.num_train_images == 6  # 2 images x 3 repeats
    assert data.num_reg_images == 6  # reg repeated round-robin up to the training count
    assert len(data.unique_items()) == 6  # 2 train + 4 reg
    with pytest.raises(UserError, match="no data found"):
        TrainingData(JobConfig(train_data_dir=str(tmp_path / "reg" / "1_person"), resolution=16), 16, 8, pairs=False)


def test_class_tokens_are_the_caption_when_a_file_has_none(tmp_path):
    _write_faces(tmp_path / "2_sks face", 1, 16)
    (tmp_path / "2_sks face" / "000.txt").unlink()
    data = TrainingData(JobConfig(train_data_dir=str(tmp_path), resolution=16), 16, 8, pairs=False)
    assert data.items[0].caption == "sks face"


def test_bucket_list_and_assignment():
    buckets = make_bucket_resolutions((512, 512), 256, 1024, 64)
    assert (512, 512) in buckets and (384, 640) in buckets and (640, 384) in buckets
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 for w, h in buckets)
    assert choose_bucket((1000, 600), buckets) == (640, 384)
    assert no_upscale_bucket((300, 200), 512 * 512, 64) == (256, 192)


def test_buckets_group_batches_and_complete_partial_ones(tmp_path):
    d = tmp_path / "1_mixed"
    d.mkdir()
    for i, size in enumerate([(32, 32), (32, 32), (32, 32), (48, 24), (48, 24)]):
        Image.new("RGB", size, (i * 40, 0, 0)).save(d / f"{i}.png")
        (d / f"{i}.txt").write_text(f"image {i}")
    job = JobConfig(train_data_dir=str(tmp_path), resolution=32, enable_bucket=True, min_bucket_reso=16,
                    max_bucket_reso=64, bucket_reso_steps=8, train_batch_size=2)
    data = TrainingData(job, 32, 8, pairs=False)
    assert {it.bucket for it in data.items} == {(32, 32), (40, 24)}  # 48x24 goes to the closest aspect ratio
    for world in (1, 2):
        batches = data.epoch_batches(0, world)
        assert all(len(b) == 2 * world for b in batches)  # always full
        assert all(len({data.items[i].bucket for i in b}) == 1 for b in batches)  # one bucket per batch
        assert data.epoch_batches(0, world) == batches  # deterministic
    assert data.epoch_batches(1, 1) != data.epoch_batches(0, 1) or len(data.epoch_batches(0, 1)) == 1


def test_caption_rules_match_kohya():
    rng = np.random.default_rng(0)
    rules = CaptionRules(shuffle_caption=True, keep_tokens=1, caption_prefix="sks")
    outs = {process_caption("a face, red hair, blue background, eyes closed", rules, np.random.default_rng(s))
            for s in range(20)}
    assert all(o.startswith("sks a face, ") for o in outs)  # prefix joined, first token kept in place
    assert len(outs) > 1  # the rest is shuffled
    assert process_caption("a, b", CaptionRules(caption_dropout_rate=1.0), rng) == ""
    assert process_caption("a, b", CaptionRules(caption_dropout_every_n_epochs=2), rng, epoch=2) == ""
    assert process_caption("a, b", CaptionRules(caption_dropout_every_n_epochs=2), rng, epoch=3) == "a, b"
    kept = process_caption("x, y ||| a, b, c", CaptionRules(shuffle_caption=True, keep_tokens_separator="|||"), rng)
    assert kept.startswith("x, y, ") and sorted(kept.split(", ")[2:]) == ["a", "b", "c"]
    dropped = process_caption("a, b, c, d", CaptionRules(caption_tag_dropout_rate=1.0), rng)
    assert dropped == ""


def test_flip_aug_caches_flipped_latents(tmp_path, tiny_sd1_dir):
    from difflora.models import load_model

    _write_faces(tmp_path / "1_face", 2, 16)
    job = JobConfig(train_data_dir=str(tmp_path), resolution=16, flip_aug=True)
    data = TrainingData(job, 16, 8, pairs=False)
    data.cache_latents(load_model(tiny_sd1_dir))
    it = data.items[0]
    assert set(it.latents) == {"x", "x_flip"}
    assert it.latents["x"].shape == it.latents["x_flip"].shape == (4, 8, 8)  # this VAE downsamples by 2
    assert not np.allclose(it.latents["x"].numpy(), it.latents["x_flip"].numpy())
