"""Validation loss during training: held-out images at fixed noise and timesteps (kohya's names)."""

from __future__ import annotations

import json

import numpy as np
import torch
import pytest
from PIL import Image

from conftest import _write_faces, _write_pairs, write_job
from difflora.train.validation import advice


def _job(tmp_path, model, data, name="v", **extra):
    keys = {"model": f'"{model}"', "resolution": 16, "max_train_steps": 6, "output_dir": f'"{tmp_path / "out"}"',
            "output_name": f'"{name}"', "log_with": '"none"', "validate_every_n_steps": 2, "validation_split": 0.25,
            "learning_rate": 1e-3, "overwrite": "true"}
    keys.update({k: (f'"{v}"' if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else v)
                 for k, v in extra.items()})
    body = "".join(f"{k} = {v}\n" for k, v in keys.items())
    body += f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{data}"\ncaption_extension = ".txt"\n'
    return write_job(tmp_path / f"{name}.toml", body)


def _validation_events(tmp_path, run_cli, job):
    events = tmp_path / f"{job.stem}.jsonl"
    code, out, err = run_cli("train", job, "--events", events)
    assert code == 0, err
    return [e for e in map(json.loads, events.read_text().splitlines()) if e["type"] == "validation"]


def test_validation_loss_is_logged_at_the_requested_steps_and_repeats(tmp_path, tiny_sd1_dir, run_cli):
    data = tmp_path / "faces"
    _write_faces(data, 4, 16)
    a = _validation_events(tmp_path, run_cli, _job(tmp_path, tiny_sd1_dir, data, "a"))
    assert [e["global_step"] for e in a] == [0, 2, 4, 6]
    assert all(np.isfinite(e["loss"]) and e["loss"] > 0 for e in a)
    assert len({round(e["loss"], 9) for e in a}) > 1  # training moves it
    b = _validation_events(tmp_path, run_cli, _job(tmp_path, tiny_sd1_dir, data, "b"))
    assert [e["loss"] for e in a] == [e["loss"] for e in b]  # same seed, same curve
    c = _validation_events(tmp_path, run_cli, _job(tmp_path, tiny_sd1_dir, data, "c", validation_seed=7))
    assert [e["loss"] for e in c] != [e["loss"] for e in a]  # another held-out image and other draws
    plot = tmp_path / "out" / "sample" / "a_validation.png"
    assert Image.open(plot).size == (640, 360)


def test_validation_plot_puts_each_stage_where_its_losses_are(tmp_path):
    from difflora.train.curve import BOTTOM, LEFT, RIGHT, TOP
    from difflora.train.validation import STAGE_COLOURS, plot_curve

    w, h = 640, 360
    plot_curve({"unet": [(0, 1.0), (10, 0.5)], "text encoder": [(10, 0.5), (20, 0.0)]}, tmp_path / "v.png", (w, h))
    px = Image.open(tmp_path / "v.png").convert("RGB").load()
    pad = 0.05 / 1.1 * (h - TOP - BOTTOM)  # 5% headroom above and below

    def colour_near(x: float, y: float) -> set:
        return {px[int(x) + dx, int(y) + dy] for dx in range(-3, 4) for dy in range(-3, 4)}

    unet, te = STAGE_COLOURS[0], STAGE_COLOURS[1]
    assert unet in colour_near(LEFT, TOP + pad) and te not in colour_near(LEFT, TOP + pad)  # 1.0 at step 0
    assert te in colour_near(w - RIGHT - 1, h - BOTTOM - pad)  # 0.0 at step 20
    x_mid, y_mid = (LEFT + w - RIGHT) / 2, (TOP + h - BOTTOM) / 2
    assert te in colour_near(x_mid, y_mid)  # both at (10, 0.5): the later stage on top
    assert unet in colour_near((LEFT + x_mid) / 2, (TOP + pad + y_mid) / 2)  # unet's line at (5, 0.75)
    assert unet not in colour_near((x_mid + w - RIGHT) / 2, (y_mid + h - BOTTOM - pad) / 2)  # (15, 0.25) is te's


def test_validation_split_holds_images_out_of_training(tmp_path, tiny_sd1_dir):
    from difflora.config import load_job
    from difflora.data.dataset import TrainingData

    data = tmp_path / "faces"
    _write_faces(data, 8, 16)
    job = load_job(_job(tmp_path, tiny_sd1_dir, data))
    td = TrainingData(job, 16, 8, pairs=False)
    held = {it.path for it in td.validation_items}
    assert len(held) == 2 and not held & {it.path for it in td.unique_items()}
    assert len(td.unique_items()) == 6
    job2 = load_job(_job(tmp_path, tiny_sd1_dir, data, "x", validation_split=0.95))
    with pytest.raises(Exception, match="leaving none"):
        TrainingData(job2, 16, 8, pairs=False)


def test_difference_methods_validate_their_own_objective_on_held_out_pairs(tmp_path, tiny_sd1_dir, run_cli):
    pairs, held = tmp_path / "pairs", tmp_path / "held"
    _write_pairs(pairs, 3, 16)
    _write_pairs(held, 2, 16, seed=9)
    job = _job(tmp_path, tiny_sd1_dir, pairs, "d", method="addift", validation_split=0.0,
               validation_data_dir=str(held), max_train_steps=4)
    ev = _validation_events(tmp_path, run_cli, job)
    assert [e["global_step"] for e in ev] == [0, 2, 4]
    # at step 0 the LoRA is zero: ADDifT's objective (LoRA at +m on "after" vs the frozen model on "before")
    # is then the frozen model's own before/after difference, which the held-out pairs do have
    assert ev[0]["loss"] > 0


@pytest.mark.slow
def test_validation_loss_rises_when_one_image_is_overtrained(tmp_path, run_cli):
    """Standard LoRA on one toy face at a high learning rate (shipped base model), validated on four
    other faces: the training loss falls while the held-out loss rises past its early minimum."""
    train, held = tmp_path / "one", tmp_path / "held"
    _write_faces(train, 1, 64, seed=3)
    _write_faces(held, 4, 64, seed=4)
    job = write_job(tmp_path / "over.toml", (
        f'method = "standard"\nmax_train_steps = 60\nlearning_rate = 3e-3\nlr_scheduler = "constant"\n'
        f'network_dim = 16\nnetwork_alpha = 16\nnetwork_train_unet_only = true\nlog_with = "none"\n'
        f'output_dir = "{tmp_path / "out"}"\noutput_name = "over"\nvalidate_every_n_steps = 10\n'
        f'validation_data_dir = "{held}"\n'
        f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{train}"\ncaption_extension = ".txt"\n'))
    events = tmp_path / "over.jsonl"
    code, out, err = run_cli("train", job, "--events", events)
    assert code == 0, err
    all_events = [json.loads(line) for line in events.read_text().splitlines()]
    ev = [e for e in all_events if e["type"] == "validation"]
    train_loss = [e["loss"] for e in all_events if e["type"] == "step"]
    losses = [e["loss"] for e in ev]
    assert [e["global_step"] for e in ev] == [0, 10, 20, 30, 40, 50, 60]
    assert np.mean(train_loss[-10:]) < np.mean(train_loss[:10])  # it fits the one image...
    assert int(np.argmin(losses)) < 4 and losses[-1] > 1.05 * min(losses), losses  # ...and loses the others
    assert "overfitted" in advice([e["global_step"] for e in ev], losses)


def test_advice_rules():
    steps = list(range(0, 110, 10))
    assert "overfitted" in advice(steps, [1.0, 0.8, 0.7, 0.65, 0.66, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95])
    assert "underfitted" in advice(steps, [1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5])
    assert "no progress" in advice(steps, [1.0] * 11)
    assert "flattened" in advice(steps, [1.0, 0.8, 0.7, 0.65, 0.64, 0.63, 0.63, 0.63, 0.63, 0.63, 0.63])
    assert "too few" in advice([0, 10], [1.0, 0.9])


def test_sdxl_validation_loss_runs_on_each_images_own_size_conditioning(tmp_path, monkeypatch):
    """The validation batch is assembled like a training batch: SDXL's time_ids carry each held-out image's size
    (they were the defaults, the output size, before; a validation folder's images did not even know theirs)."""
    from difflora.config import load_job
    from difflora.models.sdxl.model import StableDiffusionXL
    from difflora.toy.tiny_sdxl import build_tiny_sdxl
    from difflora.train.loop import train
    from difflora.train.validation import Validator

    build_tiny_sdxl().save(tmp_path / "xl")
    for folder, n in (("train", 2), ("held", 2)):
        _write_faces(tmp_path / folder, n, 32, seed=n)
        for png in (tmp_path / folder).glob("*.png"):
            Image.open(png).resize((40, 48)).save(png)  # (w, h): larger than the training side, not square
    seen, validating = [], [False]
    real_predict, real_loss = StableDiffusionXL.predict, Validator.loss

    def predict(self, noisy, t, cond):
        if validating[0]:
            seen.append(cond.tensors.get("time_ids"))
        return real_predict(self, noisy, t, cond)

    def loss(self, stage, network):
        validating[0] = True
        try:
            return real_loss(self, stage, network)
        finally:
            validating[0] = False

    monkeypatch.setattr(StableDiffusionXL, "predict", predict)
    monkeypatch.setattr(Validator, "loss", loss)
    job = _job(tmp_path, tmp_path / "xl", tmp_path / "train", resolution=32, max_train_steps=1,
               validation_split=0.0, validation_data_dir=str(tmp_path / "held"))
    train(load_job(job))
    assert seen and all(ids is not None for ids in seen)
    rows = torch.cat(seen)
    assert rows[:, :2].tolist() == [[48.0, 40.0]] * len(rows)  # original (h, w)
    assert rows[:, 4:].tolist() == [[32.0, 32.0]] * len(rows)  # the size trained at
