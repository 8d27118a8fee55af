"""Training on SDXL: the example jobs' SDXL defaults, 2 processes, cached text-encoder outputs.

The tiny SDXL has SDXL's real block structure at narrow widths; images are 32x32.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import _write_faces, _write_pairs, write_job
from difflora.models import load_model
from difflora.network.apply import network_from_file
from difflora.toy.tiny_sdxl import build_tiny_sdxl

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
FAST = {"max_train_steps": 3, "copier.stage1_steps": 2, "copier.stage2_steps": 2, "differential.before_steps": 2,
        "differential.after_steps": 2}


@pytest.fixture(scope="module")
def xl_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl_train")
    build_tiny_sdxl().save(root / "xl")
    shutil.copytree(EXAMPLES, root / "examples")
    _write_faces(root / "data" / "faces" / "1_face", 3, 32)
    for name, change in {"eyes": ("eyes", "open", "closed"), "style": ("style", "flat", "detailed"),
                         "glasses": ("glasses", "none", "glasses"), "smile": ("mouth", "smiling", "neutral")}.items():
        _write_pairs(root / "data" / name, 2, 32, change)
    return root


def _train(run_cli, root, name, *extra):
    args = ["train", root / "examples" / f"{name}.toml", "--set", f'model="{root / "xl"}"', "--set", "resolution=32",
            "--set", "log_with='none'", "--set", "overwrite=true"]
    for k, v in FAST.items():
        args += ["--set", f"{k}={v}"]
    for e in extra:
        args += ["--set", e]
    return run_cli(*args)


def _changes_output(model, lora_path) -> float:
    net = network_from_file(model, lora_path, 1.0)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([600])
    cond = model.encode_prompts(["a face, red hair"])
    with torch.no_grad():
        on = model.predict(x, t, cond)
        net.set_multiplier(0.0)
        off = model.predict(x, t, cond)
    net.remove()
    return float((on - off).abs().max())


def test_addift_example_trains_an_sdxl_lora_with_the_sdxl_defaults(xl_tree, run_cli):
    """The example leaves lr and rank to the defaults: SDXL's (TrainTrain's XL preset). (Every method training
    on SDXL and its file giving the trained output: the contract suite; every example job: test_examples.)"""
    from difflora.network.files import load_lora

    code, _, err = _train(run_cli, xl_tree, "addift")
    assert code == 0, err
    path = xl_tree / "output" / "eyes_closed.safetensors"
    lora = load_lora(path)
    assert any(k.startswith("lora_unet_input_blocks_") or k.startswith("lora_unet_output_blocks_") for k in lora.tensors)
    assert _changes_output(load_model(xl_tree / "xl"), path) > 1e-5
    assert float(lora.metadata["ss_learning_rate"]) == 2e-4 and float(lora.metadata["ss_network_alpha"]) == 1.0


def test_preset_lora_example_trains_on_sdxl_with_the_fused_preset(xl_tree, run_cli):
    if not (xl_tree / "output" / "detail_slider.safetensors").exists():
        assert _train(run_cli, xl_tree, "slider")[0] == 0
    code, _, err = _train(run_cli, xl_tree, "preset_lora")
    assert code == 0, err
    path = xl_tree / "output" / "eyes_closed_on_detail.safetensors"
    assert any(k.startswith("lora_unet_output_blocks_") for k in load_file(str(path)))
    assert _changes_output(load_model(xl_tree / "xl"), path) > 1e-5


def _std_job(root: Path, name: str, **extra) -> Path:
    keys = {"model": f'"{root / "xl"}"', "train_data_dir": f'"{root / "data" / "faces"}"', "resolution": 32,
            "network_dim": 2, "network_alpha": 2, "learning_rate": 2e-3, "max_train_steps": 4, "train_batch_size": 2,
            "output_dir": f'"{root / "out"}"', "output_name": f'"{name}"', "log_with": '"none"', "seed": 3,
            "overwrite": "true"}
    keys.update(extra)
    return write_job(root / f"{name}.toml", "".join(f"{k} = {v}\n" for k, v in keys.items()))


UNET_ONLY = {"network_train_unet_only": "true"}


def _same_lora(a: dict, b: dict) -> bool:
    """Bit for bit (a prompt's encoding does not depend on its batch: models/sdxl.py), and it trained."""
    assert max(a[k].abs().max().item() for k in a if "lora_up" in k) > 0  # lora_up starts at zero
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def plain_unet_only_lora(xl_tree) -> dict[str, torch.Tensor]:
    """The LoRA of _std_job's U-Net-only run without cached text-encoder outputs (what the cached runs must give)."""
    from difflora.cli import main

    assert main(["-q", "train", str(_std_job(xl_tree, "te_plain", **UNET_ONLY))]) == 0
    return load_file(str(xl_tree / "out" / "te_plain.safetensors"))


def test_text_encoder_outputs_cached_to_disk_give_the_same_lora_and_are_read_back(xl_tree, run_cli,
                                                                                   plain_unet_only_lora):
    """(Cached in memory: test_cached_prompts_are_encoded_before_the_unet_moves.)"""
    key = "cache_text_encoder_outputs_to_disk"
    code, _, err = run_cli("train", _std_job(xl_tree, "te_disk", **UNET_ONLY, **{key: "true"}))
    assert code == 0, err
    b = load_file(str(xl_tree / "out" / "te_disk.safetensors"))
    assert _same_lora(plain_unet_only_lora, b)
    # a second run reads every encoding from the disk cache: the first cached run's LoRA, bit for bit
    files = sorted((xl_tree / "out" / "te_cache").glob("*.safetensors"))
    assert files
    stamps = [f.stat().st_mtime_ns for f in files]
    again = _std_job(xl_tree, "te_disk_again", **UNET_ONLY, **{key: "true"})
    assert run_cli("train", again)[0] == 0
    assert [f.stat().st_mtime_ns for f in files] == stamps
    c = load_file(str(xl_tree / "out" / "te_disk_again.safetensors"))
    assert all(torch.equal(b[k], c[k]) for k in b)


def test_cached_text_encoder_outputs_refuse_text_encoder_training(xl_tree, run_cli):
    out = xl_tree / "refused_out"
    job = _std_job(xl_tree, "te_refused", cache_text_encoder_outputs="true", output_dir=f'"{out}"')
    code, _, err = run_cli("train", job)
    assert code == 2
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and job.name in lines[0]
    assert "cache_text_encoder_outputs" in lines[0] and "network_train_unet_only" in lines[0]
    assert not out.exists()  # nothing written


def test_each_rank_gets_its_share_of_the_one_process_batch_with_its_own_time_ids(xl_tree):
    """What 2 processes train on, exactly: the 1-process batch split in two, with every per-sample draw (noise,
    timestep, flip, caption shuffle) and SDXL's time_ids (original size, crop, bucket) of the same samples."""
    from PIL import Image

    from difflora.config import load_job
    from difflora.train.batches import batch_at, make_batch
    from difflora.train.run import prepare

    data = xl_tree / "data" / "sizes" / "1_face"
    data.mkdir(parents=True, exist_ok=True)
    faces = sorted((xl_tree / "data" / "faces" / "1_face").glob("*.png"))
    for i, (w, h) in enumerate([(48, 32), (32, 56), (40, 40), (64, 36)]):  # distinct sizes: distinct time_ids
        Image.open(faces[i % len(faces)]).resize((w, h)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"a face, tag{i}, other{i}", encoding="utf-8")
    extra = {"train_data_dir": f'"{data.parent}"', "enable_bucket": "true", "min_bucket_reso": 16,
             "max_bucket_reso": 64, "bucket_reso_steps": 16, "flip_aug": "true", "shuffle_caption": "true"}
    runs = {}
    for per_device in (2, 1):
        job = load_job(_std_job(xl_tree, f"shard{per_device}", train_batch_size=per_device, **extra))
        run = prepare(job)
        run.data.cache_latents(run.model, None, encode=True)
        runs[per_device] = (job, run)
    (job1, one), (job2, two) = runs[2], runs[1]
    seen = set()
    for step in range(3):
        epoch, batch = batch_at(one.data, step, 1, None)
        assert (epoch, batch) == batch_at(two.data, step, 2, None)
        whole = make_batch(one.data, batch, 0, 1, job1, 0, step, 0, epoch, None, one.model)
        parts = [make_batch(two.data, batch, r, 2, job2, 0, step, 0, epoch, None, two.model) for r in (0, 1)]
        for key in whole.latents:
            assert torch.equal(whole.latents[key], torch.cat([p.latents[key] for p in parts]))
        assert torch.equal(whole.noise, torch.cat([p.noise for p in parts]))
        assert torch.equal(whole.timesteps, torch.cat([p.timesteps for p in parts]))
        assert whole.captions["x"] == parts[0].captions["x"] + parts[1].captions["x"]
        assert whole.sizes == parts[0].sizes + parts[1].sizes
        time_ids = one.model.sample_conditioning(whole.sizes).tensors["time_ids"]
        shares = [two.model.sample_conditioning(p.sizes).tensors["time_ids"] for p in parts]
        assert torch.equal(time_ids, torch.cat(shares))
        seen.update(tuple(row) for row in time_ids.tolist())
    assert len(seen) >= 3  # the samples really carry different sizes and crops


def test_cached_prompts_are_encoded_before_the_unet_moves(xl_tree, run_cli, monkeypatch, plain_unet_only_lora):
    """With cache_text_encoder_outputs both text encoders, alone on the device, encode every caption of the run
    and go back to the CPU before the U-Net moves to the device; they never run again, and the LoRA is the
    uncached run's, bit for bit."""
    from conftest import check_encoded_first, watch_placement

    events = watch_placement(monkeypatch)
    code, _, err = run_cli("train", _std_job(xl_tree, "order_cached", **UNET_ONLY, cache_text_encoder_outputs="true"))
    assert code == 0, err
    captions = {p.read_text(encoding="utf-8").strip() for p in (xl_tree / "data" / "faces" / "1_face").glob("*.txt")}
    moved = check_encoded_first(events, captions)
    last_encode = max(i for i, (kind, _) in enumerate(events) if kind == "encode")
    released = [d for kind, d in events[last_encode:moved] if kind == "te"]
    assert len(released) == 2 and all(d.type == "cpu" for d in released), events
    assert _same_lora(plain_unet_only_lora, load_file(str(xl_tree / "out" / "order_cached.safetensors")))
