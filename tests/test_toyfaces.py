"""The procedural face generator: determinism, one-attribute pairs, captions, change specs."""

from __future__ import annotations

import numpy as np
import pytest

from difflora.toy import faces

PAIR_SEEDS = (3, 17, 2024, 99_991)


@pytest.fixture(scope="module")
def judge():
    from difflora.toy.judge import load_judge

    return load_judge()


def test_render_is_deterministic():
    rng = np.random.default_rng(5)
    for seed in (0, 1, 12345, 2**31 - 2):
        attrs = faces.sample_attributes(rng, held_out=None)
        a, b = faces.render(attrs, seed), faces.render(dict(attrs), seed)
        assert a.dtype == np.uint8 and a.shape == (faces.SIZE, faces.SIZE, 3)
        assert np.array_equal(a, b)
    attrs = faces.sample_attributes(np.random.default_rng(1), held_out=None)
    assert not np.array_equal(faces.render(attrs, 1), faces.render(attrs, 2))


def test_render_on_a_canvas_places_the_same_face_where_asked():
    attrs = dict(faces.sample_attributes(np.random.default_rng(2), held_out=None), style="flat")
    face = faces.render(attrs, 7)
    canvas = faces.render(attrs, 7, canvas=(160, 96), at=(70, 20))
    assert canvas.shape == (96, 160, 3)
    assert np.array_equal(canvas[20:84, 70:134], face)  # flat style: the tile moved by whole pixels
    background = np.array(canvas[0, 0], np.int16)
    assert np.abs(canvas[:, :60].astype(np.int16) - background).max() <= 1  # nothing left of the tile
    assert np.abs(canvas[:, 140:].astype(np.int16) - background).max() <= 1
    detailed = faces.render(dict(attrs, style="detailed"), 7, canvas=(160, 96), at=(70, 20))
    assert detailed[:, :60].std() > 5  # stripes and grain fill the whole canvas


def test_render_rejects_bad_attributes():
    attrs = faces.sample_attributes(np.random.default_rng(0), held_out=None)
    with pytest.raises(ValueError, match="hair"):
        faces.render(dict(attrs, hair="green"), 0)


def _value_pairs(attribute):
    values = faces.ATTRIBUTES[attribute]
    return [(values[i % len(values)], values[(i + 1) % len(values)]) for i in range(len(PAIR_SEEDS))]


@pytest.mark.parametrize("attribute", list(faces.ATTRIBUTES))
def test_pair_differs_in_exactly_one_attribute_per_judge(attribute, judge):
    befores, afters, images = [], [], []
    for seed, (before, after) in zip(PAIR_SEEDS, _value_pairs(attribute)):
        a_before, a_after, img_before, img_after = faces.make_pair(seed, attribute, before, after)
        assert {k for k in faces.ATTRIBUTES if a_before[k] != a_after[k]} == {attribute}
        befores.append(a_before)
        afters.append(a_after)
        images += [img_before, img_after]
    pred = judge.predict(images)
    for i, (a_before, a_after) in enumerate(zip(befores, afters)):
        p_before, p_after = pred[2 * i], pred[2 * i + 1]
        changed = {k for k in faces.ATTRIBUTES if p_before[k] != p_after[k]}
        assert changed == {attribute}, (PAIR_SEEDS[i], p_before, p_after)
        assert p_before[attribute] == a_before[attribute]
        assert p_after[attribute] == a_after[attribute]


@pytest.mark.parametrize("attribute", faces.LOCAL_ATTRIBUTES)
def test_local_pair_differs_only_inside_its_region(attribute):
    before, after = faces.ATTRIBUTES[attribute]
    for seed in range(120):
        _, _, img_before, img_after = faces.make_pair(seed, attribute, before, after)
        diff = np.any(img_before != img_after, axis=2)
        region = faces.regions(seed)[attribute]
        assert diff.any(), seed
        assert not (diff & ~region).any(), (seed, int((diff & ~region).sum()))
        # The region is a small part of the image, not the whole frame.
        assert region.mean() < 0.25


def test_pairs_of_global_attributes_change_many_pixels():
    for attribute in ("skin", "hair", "background", "style"):
        before, after = faces.ATTRIBUTES[attribute][:2]
        _, _, img_before, img_after = faces.make_pair(7, attribute, before, after)
        assert np.any(img_before != img_after, axis=2).mean() > 0.02, attribute


def test_captions_round_trip():
    combos = faces.all_combinations()
    assert len(combos) == int(np.prod([len(v) for v in faces.ATTRIBUTES.values()]))
    for attrs in combos:
        text = faces.caption(attrs)
        assert text.startswith("a face, ")
        assert faces.parse_caption(text) == attrs
    attrs = combos[123]
    partial = faces.caption(attrs, include=("eyes", "hair"))
    assert faces.parse_caption(partial) == {"eyes": attrs["eyes"], "hair": attrs["hair"]}
    assert faces.parse_caption("a face") == {}
    assert faces.parse_caption("A Face,  Eyes Closed ,") == {"eyes": "closed"}
    with pytest.raises(ValueError, match="unknown caption phrase"):
        faces.parse_caption("a face, green skin")


def test_held_out_sampling():
    rng = np.random.default_rng(0)
    assert not any(faces.is_held_out(faces.sample_attributes(rng)) for _ in range(200))
    assert all(faces.is_held_out(faces.sample_attributes(rng, held_out=True)) for _ in range(50))
    frac = len(faces.held_out_combinations()) / len(faces.all_combinations())
    assert 0.05 < frac < 0.2


def test_parse_change_accepts_and_canonicalises():
    assert faces.parse_change("eyes=open:closed") == ("eyes", "open", "closed")
    assert faces.parse_change(" Mouth = smile : neutral ") == ("mouth", "smiling", "neutral")
    assert faces.parse_change("glasses=no:yes") == ("glasses", "none", "glasses")
    assert faces.parse_change("background=grey:blue") == ("background", "gray", "blue")


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("eyes=open:shut", "valid values: open, closed"),
        ("hair=black:green", "valid values: black, brown, blonde, red"),
        ("nose=big:small", "valid attributes: skin, hair, background, eyes, mouth, glasses, style"),
        ("eyes", "expected ATTRIBUTE=BEFORE:AFTER"),
        ("eyes=open", "expected ATTRIBUTE=BEFORE:AFTER"),
        ("eyes=open:open", "same value"),
    ],
)
def test_parse_change_rejects_bad_specs(spec, expected):
    with pytest.raises(ValueError) as e:
        faces.parse_change(spec)
    assert expected in str(e.value)
