"""Progress events drive the progress bar, TensorBoard and the --events file; a stop requested from
another thread saves the state, and --resume ends with the same LoRA as an uninterrupted run."""

from __future__ import annotations

import io
import json
import threading

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import write_job
from difflora.config import JobConfig, apply_method_defaults
from difflora.errors import TrainingStopped
from difflora.train.listeners import ProgressBar, TensorBoard
from difflora.train.loop import train
from difflora.train.stop import StopRequest


def _job(tmp_path, model_dir, data_dir, **extra) -> JobConfig:
    keys = {"model": str(model_dir), "train_data_dir": str(data_dir), "resolution": 16, "network_dim": 4,
            "network_alpha": 4, "learning_rate": 2e-3, "max_train_steps": 8, "train_batch_size": 2,
            "output_dir": str(tmp_path / "out"), "output_name": "ev", "log_with": "none", "seed": 5,
            "lr_scheduler": "cosine", "lr_warmup_steps": 2}
    keys.update(extra)
    return apply_method_defaults(JobConfig.model_validate(keys))


def test_events_drive_the_progress_bar_and_tensorboard(tmp_path, tiny_sd1_dir, faces16):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    seen, bar_text = [], io.StringIO()
    path = train(_job(tmp_path, tiny_sd1_dir, faces16, max_train_steps=3),
                 listeners=[seen.append, ProgressBar(file=bar_text, disable=False, mininterval=0),
                            TensorBoard(tmp_path / "tb")])
    types = [e.type for e in seen]
    assert types == ["stage_started", "step", "step", "step", "stage_ended", "finished"]
    steps = [e for e in seen if e.type == "step"]
    assert [e.global_step for e in steps] == [1, 2, 3] and all(e.total_steps == 3 for e in steps)
    assert all(e.loss > 0 and e.steps_per_s > 0 for e in steps) and steps[-1].eta_s == 0
    assert seen[-1].lora == str(path)
    d = steps[0].to_dict()
    assert d["type"] == "step" and d["time"] > 1.7e9 and json.loads(json.dumps(d)) == d
    # the bar was driven by the events: it reached 3/3 and shows the running loss
    text = bar_text.getvalue()
    assert "3/3" in text and f"loss={steps[-1].loss_avg:.4f}" in text
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    losses = acc.Scalars("loss/main")
    assert [e.step for e in losses] == [1, 2, 3]
    assert [e.value for e in losses] == pytest.approx([e.loss for e in steps], rel=1e-6)
    lrs = acc.Scalars(next(t for t in acc.Tags()["scalars"] if t.startswith("lr/main/")))
    assert [e.value for e in lrs] == pytest.approx([e.lr for e in steps], rel=1e-6)


def test_cli_events_file_has_one_json_object_per_event(tmp_path, tiny_sd1_dir, faces16, run_cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    job = write_job(tmp_path / "job.toml", f'model = "{tiny_sd1_dir}"\ntrain_data_dir = "{faces16}"\nresolution = 16\n'
                    'max_train_steps = 2\nsave_every_n_steps = 1\nlog_with = "none"\noutput_name = "cli"\n')
    code, _, err = run_cli("train", job, "--events", tmp_path / "events.jsonl")
    assert code == 0, err
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert [e["type"] for e in events] == ["stage_started", "step", "checkpoint_written", "step", "stage_ended",
                                           "finished"]
    assert events[2]["lora"].endswith("cli-step00000001.safetensors") and events[2]["state_dir"] is None
    assert events[0]["steps"] == 2 and events[0]["start_step"] == 0


def test_stop_from_another_thread_saves_the_state_and_resume_gives_the_same_lora(tmp_path, tiny_sd1_dir, faces16):
    full = load_file(str(train(_job(tmp_path / "full", tiny_sd1_dir, faces16))))

    stop, seen = StopRequest(), []

    def stop_at_step_4(event):  # a UI's stop button: another thread asks, the loop stops after the step
        seen.append(event)
        if event.type == "step" and event.global_step == 4:
            t = threading.Thread(target=stop.request)
            t.start()
            t.join()

    job = _job(tmp_path, tiny_sd1_dir, faces16)
    with pytest.raises(TrainingStopped):
        train(job, listeners=[stop_at_step_4], stop=stop)
    out = tmp_path / "out"
    assert not (out / "ev.safetensors").exists()
    assert (out / "ev-interrupted.safetensors").exists() and (out / "ev-state" / "state.json").exists()
    assert [e.type for e in seen][-2:] == ["checkpoint_written", "stopped"]
    assert seen[-1].step == 4 and seen[-1].state_dir == str(out / "ev-state")
    assert not any(e.type == "failed" for e in seen)

    resumed_events = []
    path = train(job, resume="auto", listeners=[resumed_events.append])
    assert resumed_events[0].type == "stage_started" and resumed_events[0].start_step == 4
    assert [e.global_step for e in resumed_events if e.type == "step"] == [5, 6, 7, 8]
    resumed = load_file(str(path))
    assert set(resumed) == set(full)
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_a_failure_is_reported_to_listeners(tmp_path, tiny_sd1_dir, faces16):
    seen = []
    job = _job(tmp_path, tiny_sd1_dir, faces16, max_train_steps=1)
    train(job)
    with pytest.raises(Exception) as info:
        train(job, listeners=[seen.append])  # the LoRA exists and overwrite is false
    assert [e.type for e in seen] == ["failed"]
    assert seen[0].kind == "user" and seen[0].error == str(info.value)


def test_loss_curve_is_drawn_to_scale():
    from difflora.train.curve import AVERAGE, BOTTOM, HEIGHT, LEFT, RIGHT, TOP, WIDTH, draw_loss_curve

    steps = list(range(1, 101))
    img = draw_loss_curve(steps, [1.0 - s / 100 for s in steps], "t")  # a straight line from (1, 0.99) to (100, 0)
    assert img.size == (WIDTH, HEIGHT)
    px = img.load()
    pad = 0.05 * 0.99 / (0.99 + 0.1 * 0.99) * (HEIGHT - BOTTOM - TOP)  # 5% headroom above and below

    def has_curve_near(x: float, y: float) -> bool:
        return any(px[int(x) + dx, int(y) + dy] == AVERAGE for dx in (-2, -1, 0, 1, 2) for dy in range(-4, 5))

    assert has_curve_near(LEFT + 2, TOP + pad)  # highest loss at the first step: top left
    assert has_curve_near(WIDTH - RIGHT - 2, HEIGHT - BOTTOM - pad)  # lowest at the last: bottom right
    assert has_curve_near((LEFT + WIDTH - RIGHT) / 2, (TOP + HEIGHT - BOTTOM) / 2)
    assert not has_curve_near(LEFT + 2, HEIGHT - BOTTOM - pad)


def test_training_writes_a_loss_curve_and_sweep_grids(tmp_path, tiny_sd1_dir, faces16):
    from PIL import Image

    (tmp_path / "prompts.txt").write_text("a face, red hair --d 1 --s 3 --l 3\na face, smiling --d 2 --s 3 --l 3\n")
    job = _job(tmp_path, tiny_sd1_dir, faces16, max_train_steps=4, sample_every_n_steps=2,
               sample_prompts=str(tmp_path / "prompts.txt"), sample_sweep=[-1, 0, 1], learning_rate=2e-2)
    seen = []
    train(job, listeners=[seen.append])
    out = tmp_path / "out"
    curve = Image.open(out / "ev-loss.png")
    assert curve.size == (800, 450)
    written = [e for e in seen if e.type == "sample_written"]
    assert [e.step for e in written] == [2, 4]  # step 2, then the finished LoRA at step 4 (once)
    grid_path = out / "sample" / "ev_000004_sweep.png"
    assert written[-1].paths == [str(grid_path)]
    grid = Image.open(grid_path)
    info = json.loads(grid.info["difflora"])
    assert info["multipliers"] == [-1, 0, 1] and info["prompts"] == ["a face, red hair", "a face, smiling"]
    # 3 columns of 128 px tiles (16 px samples upscaled), 2 rows; labels above and to the left
    assert grid.width > 3 * 128 and grid.height > 2 * 128
    arr = np.asarray(grid.convert("RGB")).astype(int)
    bottom = arr[-128:]  # the last row of tiles, right-aligned columns
    tiles = [bottom[:, arr.shape[1] - (3 - j) * 128: arr.shape[1] - (2 - j) * 128] for j in range(3)]
    assert np.abs(tiles[0] - tiles[2]).mean() > 1  # weight -1 and +1 give different images
