"""Training on SDXL: every method's example job, exact resume, 2 processes, cached text-encoder outputs.

The tiny SDXL has SDXL's real block structure at narrow widths; images are 32x32.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
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
    md = load_file(str(xl_tree / "output" / "eyes_closed_on_detail.safetensors"))
    assert any(k.startswith("lora_unet_output_blocks_") for k in md)


def _std_job(root: Path, name: str, **extra) -> Path:
    keys = {"model": f'"{root / "xl"}"', "train_data_dir": f'"{root / "data" / "faces"}"', "resolution": 32,
            "network_dim": 2, "network_alpha": 2, "learning_rate": 2e-3, "max_train_steps": 4, "train_batch_size": 2,
            "output_dir": f'"{root / "out"}"', "output_name": f'"{name}"', "log_with": '"none"', "seed": 3,
            "overwrite": "true"}
    keys.update(extra)
    return write_job(root / f"{name}.toml", "".join(f"{k} = {v}\n" for k, v in keys.items()))


def test_stop_and_resume_gives_the_same_sdxl_lora(xl_tree, run_cli):
    job = _std_job(xl_tree, "r", max_train_steps=5, save_state_every_n_steps=2, lr_scheduler='"cosine"')
    assert run_cli("train", job)[0] == 0
    full = load_file(str(xl_tree / "out" / "r.safetensors"))
    shutil.copytree(xl_tree / "out" / "r-state", xl_tree / "state4")  # saved at step 4, as a stopped run
    (xl_tree / "out" / "r.safetensors").unlink()
    code, _, err = run_cli("train", job, "--resume", xl_tree / "state4")
    assert code == 0, err
    resumed = load_file(str(xl_tree / "out" / "r.safetensors"))
    assert set(full) == set(resumed) and all(torch.equal(full[k], resumed[k]) for k in full)


@pytest.mark.parametrize("to_disk", [False, True], ids=["memory", "disk"])
def test_cached_text_encoder_outputs_give_the_same_lora(xl_tree, run_cli, to_disk):
    plain = _std_job(xl_tree, "te_plain", network_train_unet_only="true")
    assert run_cli("train", plain)[0] == 0
    key = "cache_text_encoder_outputs_to_disk" if to_disk else "cache_text_encoder_outputs"
    cached = _std_job(xl_tree, f"te_{key}", network_train_unet_only="true", **{key: "true"})
    code, _, err = run_cli("train", cached)
    assert code == 0, err
    a = load_file(str(xl_tree / "out" / "te_plain.safetensors"))
    b = load_file(str(xl_tree / "out" / f"te_{key}.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    if to_disk:  # a second run reads every encoding from the disk cache, and still gives the same LoRA
        files = sorted((xl_tree / "out" / "te_cache").glob("*.safetensors"))
        assert files
        stamps = [f.stat().st_mtime_ns for f in files]
        again = _std_job(xl_tree, "te_disk_again", network_train_unet_only="true", **{key: "true"})
        assert run_cli("train", again)[0] == 0
        assert [f.stat().st_mtime_ns for f in files] == stamps
        c = load_file(str(xl_tree / "out" / "te_disk_again.safetensors"))
        assert all(torch.equal(a[k], c[k]) for k in a)


def test_cached_text_encoder_outputs_refuse_text_encoder_training(xl_tree, run_cli):
    job = _std_job(xl_tree, "te_refused", cache_text_encoder_outputs="true")
    code, _, err = run_cli("train", job)
    assert code == 2
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "cache_text_encoder_outputs" in lines[0] and "network_train_unet_only" in lines[0]
    assert not (xl_tree / "out" / "te_refused.safetensors").exists()


@pytest.mark.slow
def test_two_processes_train_the_same_sdxl_lora_as_one(xl_tree):
    job = _std_job(xl_tree, "two", max_train_steps=3, train_batch_size=1, optimizer_type='"SGD"', learning_rate=0.05)
    import difflora

    src = str(Path(difflora.__file__).resolve().parents[1])  # the difflora under test, whatever the cwd
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1",
               PYTHONPATH=os.pathsep.join([src, *filter(None, [os.environ.get("PYTHONPATH")])]))
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--cpu", "-m", "difflora", "-q", "train", str(job)]
    r = subprocess.run(launch, cwd=xl_tree, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-m", "difflora", "-q", "train", str(job), "--set", "train_batch_size=2",
                        "--set", "output_name='one'"], cwd=xl_tree, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    two = load_file(str(xl_tree / "out" / "two.safetensors"))
    one = load_file(str(xl_tree / "out" / "one.safetensors"))
    ups = [k for k in one if k.endswith("lora_up.weight")]
    scale = max(one[k].abs().max().item() for k in ups)
    assert scale > 1e-4  # it trained
    # Measured 5.3e-5 absolute here (SD1's shallower test model agrees to 1e-6); the cause (kernel choice
    # by batch size in 60 attention blocks?) is not pinned down, so the bound is relative to the weights.
    assert max((two[k] - one[k]).abs().max().item() for k in one) < 1e-2 * scale
