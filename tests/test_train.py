"""Standard training: it learns and resumes exactly (several processes: tests/test_distributed.py)."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import write_job
from difflora.generate import GenerationRequest, generate
from difflora.models import load_model
from difflora.network.apply import network_from_file


def _job(tmp_path, model_dir, data_dir, **extra) -> str:
    keys = {"model": f'"{model_dir}"', "train_data_dir": f'"{data_dir}"', "resolution": 16, "network_dim": 4,
            "network_alpha": 4, "learning_rate": 2e-3, "max_train_steps": 40, "train_batch_size": 2,
            "output_dir": '"out"', "log_with": '"none"', "seed": 3}
    keys.update(extra)
    return "".join(f"{k} = {v}\n" for k, v in keys.items())


def _fixed_loss(model, net, latents, captions, multiplier) -> float:
    g = torch.Generator().manual_seed(0)
    losses = []
    with torch.no_grad():
        net.set_multiplier(multiplier)
        cond = model.encode_prompts(captions)
        for _ in range(12):
            noise = torch.randn(latents.shape, generator=g)
            t = torch.randint(0, 1000, (latents.shape[0],), generator=g)
            pred = model.predict(model.objective.add_noise(latents, noise, t), t, cond)
            losses.append(torch.mean((pred - noise) ** 2).item())
    return float(np.mean(losses))


def test_training_lowers_the_loss_and_changes_generations(tmp_path, tiny_sd1_dir, faces16, run_cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    job = write_job(tmp_path / "job.toml", _job(tmp_path, tiny_sd1_dir, faces16, output_name='"std"'))
    code, out, err = run_cli("train", job)
    assert code == 0, err
    model = load_model(tiny_sd1_dir)
    net = network_from_file(model, tmp_path / "out" / "std.safetensors", 1.0)
    from difflora.data.images import load_image, to_tensor

    imgs = sorted((faces16 / "2_face").glob("*.png"))
    latents = torch.cat([model.encode_images(to_tensor(load_image(p))[None], sample=False) for p in imgs])
    caps = [p.with_suffix(".txt").read_text() for p in imgs]
    before, after = _fixed_loss(model, net, latents, caps, 0.0), _fixed_loss(model, net, latents, caps, 1.0)
    assert after < 0.97 * before, (before, after)
    req = GenerationRequest(prompts=["a face, red hair"] * 2, seeds=[1, 1], steps=4, cfg=3.0)
    req.multipliers = {0: [0.0, 1.0]}
    base, with_lora = generate(model, [net], req)
    assert np.abs(base.astype(int) - with_lora.astype(int)).max() > 8


def test_stop_and_resume_gives_the_same_lora(tmp_path, tiny_sd1_dir, faces16, run_cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    body = _job(tmp_path, tiny_sd1_dir, faces16, max_train_steps=12, save_state_every_n_steps=5,
                lr_scheduler='"cosine"', lr_warmup_steps=2, output_name='"r"')
    job = write_job(tmp_path / "job.toml", body)
    assert run_cli("train", job)[0] == 0
    full = load_file(str(tmp_path / "out" / "r.safetensors"))
    # the state saved at step 10 (the last multiple of 5 before the end) is where a stopped run would resume
    shutil.copytree(tmp_path / "out" / "r-state", tmp_path / "state10")
    (tmp_path / "out" / "r.safetensors").unlink()
    code, _, err = run_cli("train", job, "--resume", tmp_path / "state10")
    assert code == 0, err
    resumed = load_file(str(tmp_path / "out" / "r.safetensors"))
    assert set(full) == set(resumed)
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_tensorboard_logs_loss_and_learning_rate(tmp_path, tiny_sd1_dir, faces16, run_cli, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.chdir(tmp_path)
    job = write_job(tmp_path / "job.toml", _job(tmp_path, tiny_sd1_dir, faces16, max_train_steps=3,
                                                log_with='"tensorboard"', output_name='"tb"'))
    assert run_cli("train", job)[0] == 0
    runs = list((tmp_path / "out" / "logs").iterdir())
    assert len(runs) == 1
    acc = EventAccumulator(str(runs[0]))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "loss/main" in tags and any(t.startswith("lr/main/") for t in tags)
    assert [e.step for e in acc.Scalars("loss/main")] == [1, 2, 3]


def test_max_train_epochs_sizes_the_lr_schedule_to_the_steps_that_run(tmp_path, tiny_sd1_dir, faces16):
    """kohya: max_train_epochs wins over max_train_steps; the cosine schedule must end at 0 on the last step run."""
    from difflora.config import JobConfig, apply_method_defaults
    from difflora.network.files import read_metadata_only
    from difflora.train.loop import train

    job = apply_method_defaults(JobConfig.model_validate({
        "model": str(tiny_sd1_dir), "train_data_dir": str(faces16), "resolution": 16, "train_batch_size": 2,
        "max_train_steps": 1600, "max_train_epochs": 2, "lr_scheduler": "cosine", "learning_rate": 1e-3,
        "output_dir": str(tmp_path / "out"), "log_with": "none"}))
    steps = []
    path = train(job, listeners=[lambda e: e.type == "step" and steps.append(e)])
    # 4 images x 2 repeats at batch 2 = 4 steps per epoch
    assert [e.step for e in steps] == list(range(1, 9)) and steps[0].steps == 8
    assert steps[0].lr == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi / 8)))
    assert steps[-1].lr == pytest.approx(0.0, abs=1e-12)
    md = read_metadata_only(path)
    assert md["ss_steps"] == "8" and md["ss_max_train_steps"] == "8"


def test_loraplus_moves_lora_up_at_ratio_times_the_learning_rate(tmp_path, tiny_sd1_dir, faces16, run_cli,
                                                                  monkeypatch):
    """LoRA+ (kohya's network_args loraplus_lr_ratio): one AdamW step from lora_up = 0 moves each up
    weight by lr·ratio·g/|g| (Adam's first step), the down weights not at all (their gradient is 0 while
    up is 0). The job key and kohya's network_args spelling train the same file."""
    monkeypatch.chdir(tmp_path)
    lr = 1e-3
    base = dict(max_train_steps=1, learning_rate=lr, optimizer_args="{weight_decay = 0.0}", save_precision='"float"')
    files = {}
    for name, extra in {"plain": {}, "plus": {"network_args": '["loraplus_lr_ratio=16"]'},
                        "key": {"loraplus_lr_ratio": 16}}.items():
        job = write_job(tmp_path / f"{name}.toml", _job(tmp_path, tiny_sd1_dir, faces16, output_name=f'"{name}"',
                                                        **base, **extra))
        code, _, err = run_cli("train", job)
        assert code == 0, err
        files[name] = load_file(str(tmp_path / "out" / f"{name}.safetensors"))
    plain, plus = files["plain"], files["plus"]
    ups = [k for k in plain if k.endswith("lora_up.weight")]
    downs = [k for k in plain if k.endswith("lora_down.weight")]
    top_plain = max(plain[k].abs().max().item() for k in ups)
    top_plus = max(plus[k].abs().max().item() for k in ups)
    assert top_plain == pytest.approx(lr, rel=1e-3) and top_plus == pytest.approx(16 * lr, rel=1e-3)
    for k in ups:  # element by element: the same direction, 16x the step
        torch.testing.assert_close(plus[k], 16 * plain[k], rtol=1e-4, atol=1e-9)
    for k in downs:
        assert torch.equal(plus[k], plain[k])
    assert all(torch.equal(files["key"][k], plus[k]) for k in plus)
    from difflora.network.files import read_metadata_only

    # as sd-scripts writes them: the network_args as given, the job key as its value
    assert '"loraplus_lr_ratio": "16"' in read_metadata_only(tmp_path / "out" / "plus.safetensors")["ss_network_args"]
    assert '"loraplus_lr_ratio": "16.0"' in read_metadata_only(tmp_path / "out" / "key.safetensors")["ss_network_args"]


@pytest.mark.parametrize("keys, message", [
    ({"loraplus_lr_ratio": 0}, "loraplus_lr_ratio"),
    ({"network_args": '["loraplus_unet_lr_ratio=-2"]'}, "loraplus_unet_lr_ratio = -2: the ratio must be greater than 0"),
    ({"network_algo": '"loha"', "loraplus_lr_ratio": 4}, "loha has none"),
])
def test_loraplus_bad_values_are_refused_naming_the_key(tmp_path, tiny_sd1_dir, faces16, run_cli, keys, message):
    job = write_job(tmp_path / "job.toml", _job(tmp_path, tiny_sd1_dir, faces16, **keys))
    code, _, err = run_cli("train", job)
    assert code == 2 and message in err and "job.toml" in err, err
    assert len(err.strip().splitlines()) <= 2, err
