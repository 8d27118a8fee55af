"""Training on SDXL: every method's example job, exact resume, 2 processes, cached text-encoder outputs.

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


@pytest.mark.parametrize("name,output", [
    ("standard", "faces"), ("addift", "eyes_closed"), ("copier", "eyes_closed_copier"), ("slider", "detail_slider"),
    ("differential", "glasses_diffmerge"), ("per_pair_average", "neutral_mouth_avg"),
])
def test_each_method_example_trains_an_sdxl_lora_that_changes_the_output(xl_tree, run_cli, name, output):
    code, _, err = _train(run_cli, xl_tree, name)
    assert code == 0, err
    path = xl_tree / "output" / f"{output}.safetensors"
    tensors = load_file(str(path))
    assert any(k.startswith("lora_unet_input_blocks_") or k.startswith("lora_unet_output_blocks_") for k in tensors)
    assert _changes_output(load_model(xl_tree / "xl"), path) > 1e-5
    if name == "addift":  # the example leaves lr and rank to the defaults: SDXL's (TrainTrain's XL preset)
        from difflora.network.files import load_lora

        md = load_lora(path).metadata
        assert float(md["ss_learning_rate"]) == 2e-4 and float(md["ss_network_alpha"]) == 1.0


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


def test_stop_and_resume_gives_the_same_sdxl_lora(xl_tree, run_cli):
    """A run stopped after step 3 (as the UI's stop button or Ctrl-C does) and resumed ends with the LoRA of
    an uninterrupted run, bit for bit (text-encoder LoRAs and per-sample time_ids included)."""
    from difflora.config import load_job
    from difflora.errors import TrainingStopped
    from difflora.train.loop import train
    from difflora.train.stop import StopRequest

    job = _std_job(xl_tree, "r", max_train_steps=5, lr_scheduler='"cosine"')
    assert run_cli("train", job)[0] == 0
    full = load_file(str(xl_tree / "out" / "r.safetensors"))
    (xl_tree / "out" / "r.safetensors").unlink()
    stop = StopRequest()
    with pytest.raises(TrainingStopped):
        train(load_job(job), listeners=[lambda e: e.type == "step" and e.global_step == 3 and stop.request()],
              stop=stop)
    assert not (xl_tree / "out" / "r.safetensors").exists() and (xl_tree / "out" / "r-state").is_dir()
    steps = []
    train(load_job(job), resume="auto", listeners=[lambda e: e.type == "step" and steps.append(e.global_step)])
    assert steps == [4, 5]
    resumed = load_file(str(xl_tree / "out" / "r.safetensors"))
    assert set(full) == set(resumed) and any(k.startswith("lora_te2_") for k in full)
    assert all(torch.equal(full[k], resumed[k]) for k in full)


UNET_ONLY = {"network_train_unet_only": "true"}


def _same_lora(a: dict, b: dict) -> bool:
    """Bit for bit (a prompt's encoding does not depend on its batch: models/sdxl.py), and it trained."""
    assert max(a[k].abs().max().item() for k in a if "lora_up" in k) > 0  # lora_up starts at zero
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("to_disk", [False, True], ids=["memory", "disk"])
def test_cached_text_encoder_outputs_give_the_same_lora(xl_tree, run_cli, to_disk):
    plain = _std_job(xl_tree, "te_plain", **UNET_ONLY)
    assert run_cli("train", plain)[0] == 0
    key = "cache_text_encoder_outputs_to_disk" if to_disk else "cache_text_encoder_outputs"
    cached = _std_job(xl_tree, f"te_{key}", **UNET_ONLY, **{key: "true"})
    code, _, err = run_cli("train", cached)
    assert code == 0, err
    a = load_file(str(xl_tree / "out" / "te_plain.safetensors"))
    b = load_file(str(xl_tree / "out" / f"te_{key}.safetensors"))
    assert _same_lora(a, b)
    if to_disk:  # a second run reads every encoding from the disk cache: the first cached run's LoRA, bit for bit
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


def test_cached_prompts_are_encoded_before_the_unet_moves(xl_tree, run_cli, monkeypatch):
    """With cache_text_encoder_outputs both text encoders, alone on the device, encode every caption of the run
    and go back to the CPU before the U-Net moves to the device; they never run again, and the LoRA is the
    uncached run's, bit for bit."""
    from conftest import check_encoded_first, watch_placement

    assert run_cli("train", _std_job(xl_tree, "order_plain", **UNET_ONLY))[0] == 0
    events = watch_placement(monkeypatch)
    code, _, err = run_cli("train", _std_job(xl_tree, "order_cached", **UNET_ONLY, cache_text_encoder_outputs="true"))
    assert code == 0, err
    captions = {p.read_text(encoding="utf-8").strip() for p in (xl_tree / "data" / "faces" / "1_face").glob("*.txt")}
    moved = check_encoded_first(events, captions)
    last_encode = max(i for i, (kind, _) in enumerate(events) if kind == "encode")
    released = [d for kind, d in events[last_encode:moved] if kind == "te"]
    assert len(released) == 2 and all(d.type == "cpu" for d in released), events
    a = load_file(str(xl_tree / "out" / "order_plain.safetensors"))
    b = load_file(str(xl_tree / "out" / "order_cached.safetensors"))
    assert _same_lora(a, b)
