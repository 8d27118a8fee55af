"""The shipped attribute judge: accuracy on fresh faces, input handling, file format, determinism."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from difflora.errors import UserError
from difflora.fileio import load_safetensors, save_safetensors
from difflora.toy import faces
from difflora.toy import judge as J

# Render seeds for these tests: fresh (training uses seeds < 2**30) and apart from the bench's.
TEST_SEED_BASE = J.EVAL_SEED_BASE + 500_000


@pytest.fixture(scope="module")
def judge():
    return J.load_judge()


def test_shipped_asset_is_small_and_describes_its_attributes():
    assert J.DEFAULT_PATH.is_file()
    assert J.DEFAULT_PATH.stat().st_size < 5 * 1024 * 1024
    _, meta = load_safetensors(J.DEFAULT_PATH)
    assert meta["format"] == J.FORMAT
    assert json.loads(meta["attributes"]) == {a: list(v) for a, v in faces.ATTRIBUTES.items()}


def test_load_judge_is_cached(judge):
    assert J.load_judge() is judge
    assert J.load_judge(J.DEFAULT_PATH) is judge
    assert judge.attributes == faces.ATTRIBUTES


def test_accuracy_on_fresh_faces(judge):
    acc = J.evaluate(judge, n=300, seed=11, seed_base=TEST_SEED_BASE)
    assert set(acc) == set(faces.ATTRIBUTES)
    assert min(acc.values()) >= 0.99, acc


def test_accuracy_under_generation_like_augmentations(judge):
    acc = J.evaluate(judge, n=300, seed=12, augmented=True, seed_base=TEST_SEED_BASE + 1000)
    assert min(acc.values()) >= 0.95, acc


def _sample(n: int, seed: int):
    rng = np.random.default_rng(seed)
    attrs, seeds = J.random_faces(rng, n, seed_base=TEST_SEED_BASE + 5000 + 100 * seed)
    return attrs, [faces.render(a, s) for a, s in zip(attrs, seeds)]


def test_predict_accepts_arrays_tensors_and_other_sizes(judge):
    attrs, images = _sample(12, 1)
    from_arrays = judge.predict(images)
    tensor = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    assert judge.predict(tensor) == from_arrays
    assert judge.predict(images[0]) == from_arrays[:1]  # a single HxWx3 array
    assert sum(p == a for p, a in zip(from_arrays, attrs)) >= 11
    # 128x128 (nearest-upscaled) images are resized back to 64x64 and read the same way.
    big = [np.repeat(np.repeat(im, 2, axis=0), 2, axis=1) for im in images]
    assert sum(p == q for p, q in zip(judge.predict(big), from_arrays)) >= 11
    assert judge.predict([]) == []


def test_predict_proba_shapes(judge):
    _, images = _sample(5, 2)
    proba = judge.predict_proba(images)
    assert list(proba) == list(faces.ATTRIBUTES)
    for a, p in proba.items():
        assert p.shape == (5, len(faces.ATTRIBUTES[a]))
        np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-5)
    pred = judge.predict(images)
    for i, d in enumerate(pred):
        for a, v in d.items():
            assert faces.ATTRIBUTES[a][int(proba[a][i].argmax())] == v


def test_predict_rejects_bad_shapes(judge):
    with pytest.raises(UserError):
        judge.predict(torch.zeros(2, 1, 64, 64))
    with pytest.raises(UserError):
        judge.predict([np.zeros((64, 64, 2), np.uint8)])
    with pytest.raises(UserError, match="negative"):
        judge.predict([np.full((64, 64, 3), -0.5, np.float32)])


def test_predict_accepts_float_arrays_and_pil(judge):
    from PIL import Image

    _, images = _sample(4, 5)
    expected = judge.predict(images)
    assert judge.predict([im.astype(np.float32) / 255.0 for im in images]) == expected
    assert judge.predict([Image.fromarray(im) for im in images]) == expected


def test_training_is_deterministic_and_round_trips(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    J.train_judge(a, seed=3, steps=2, batch=8, eval_n=0)
    J.train_judge(b, seed=3, steps=2, batch=8, eval_n=0)
    ta, ma = load_safetensors(a)
    tb, _ = load_safetensors(b)
    assert set(ta) == set(tb)
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    assert json.loads(ma["config"])["seed"] == 3
    loaded = J.load_judge(a)
    _, images = _sample(3, 3)
    assert len(loaded.predict(images)) == 3
    J.train_judge(b, seed=4, steps=2, batch=8, eval_n=0)
    tc, _ = load_safetensors(b)
    assert any(not torch.equal(ta[k], tc[k]) for k in ta if ta[k].is_floating_point())


def test_load_judge_refuses_other_files(tmp_path):
    other = tmp_path / "other.safetensors"
    save_safetensors({"w": torch.zeros(2)}, other, metadata={"format": "something-else"})
    with pytest.raises(UserError, match="not a difflora judge file"):
        J.load_judge(other)
    with pytest.raises(UserError, match="file not found"):
        J.load_judge(tmp_path / "missing.safetensors")


def test_augment_is_seeded_and_bounded():
    _, images = _sample(6, 4)
    x = J._to_unit(images)
    a = J.augment(x.clone(), torch.Generator().manual_seed(5))
    b = J.augment(x.clone(), torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 1 and a.shape == x.shape
    assert not torch.equal(a, x)
    clean = J.augment(x.clone(), torch.Generator().manual_seed(5), p_clean=1.0)
    assert torch.allclose(clean, x, atol=1e-5)
