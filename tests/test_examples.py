"""Every example job runs (on the tiny test model, few steps) and writes its LoRA."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import _write_faces, _write_pairs
from difflora.network.files import load_lora

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
FAST = {"max_train_steps": 4, "copier.stage1_steps": 3, "copier.stage2_steps": 3, "differential.before_steps": 3,
        "differential.after_steps": 3, "sample_every_n_steps": 2, "save_every_n_steps": 2}


@pytest.fixture(scope="module")
def example_tree(tmp_path_factory, tiny_sd1_dir):
    root = tmp_path_factory.mktemp("examples_tree")
    shutil.copytree(EXAMPLES, root / "examples")
    _write_faces(root / "data" / "faces" / "1_face", 4, 16)
    for name, change in {"eyes": ("eyes", "open", "closed"), "style": ("style", "flat", "detailed"),
                         "glasses": ("glasses", "none", "glasses"), "smile": ("mouth", "smiling", "neutral")}.items():
        _write_pairs(root / "data" / name, 3, 16, change)
    return root


def _run(run_cli, root, tiny, name, extra=()):
    args = ["train", root / "examples" / f"{name}.toml", "--set", f'model="{tiny}"', "--set", "resolution=16",
            "--set", "log_with='none'"]
    for k, v in FAST.items():
        args += ["--set", f"{k}={v}"]
    return run_cli(*args, *extra)


@pytest.mark.parametrize("name,output", [
    ("standard", "faces"), ("addift", "eyes_closed"), ("copier", "eyes_closed_copier"), ("slider", "detail_slider"),
    ("differential", "glasses_diffmerge"), ("per_pair_average", "neutral_mouth_avg"), ("sd15_addift", "sd15_glasses"),
])
def test_example_runs(example_tree, tiny_sd1_dir, run_cli, name, output):
    cpu = ["--set", "mixed_precision='no'"] if name == "sd15_addift" else []  # bf16 autocast is a GPU setting
    code, out, err = _run(run_cli, example_tree, tiny_sd1_dir, name, cpu)
    assert code == 0, err
    lora = load_lora(example_tree / "output" / f"{output}.safetensors")
    assert lora.module_names()
    ups = [v for k, v in lora.tensors.items() if k.endswith("lora_up.weight")]
    assert max(float(u.abs().max()) for u in ups) > 0  # it trained
    if name == "differential":
        assert {lora.rank_alpha(n)[0] for n in lora.module_names()} == {8}  # rerank = 8
    if name == "copier":
        assert (example_tree / "output" / f"{output}-copier.safetensors").exists()
    if name == "standard":
        assert list((example_tree / "output" / "sample").glob("faces_*.png"))


def test_preset_example_trains_on_the_fused_preset(example_tree, tiny_sd1_dir, run_cli):
    if not (example_tree / "output" / "detail_slider.safetensors").exists():
        assert _run(run_cli, example_tree, tiny_sd1_dir, "slider")[0] == 0
    code, _, err = _run(run_cli, example_tree, tiny_sd1_dir, "preset_lora")
    assert code == 0, err
    with_preset = load_lora(example_tree / "output" / "eyes_closed_on_detail.safetensors")
    assert "detail_slider" in with_preset.metadata["difflora_preset_loras"]
    code, _, err = _run(run_cli, example_tree, tiny_sd1_dir, "preset_lora",
                        ["--set", "preset_loras=[]", "--set", "output_name='no_preset'"])
    assert code == 0, err
    without = load_lora(example_tree / "output" / "no_preset.safetensors")
    diffs = [float((with_preset.tensors[k] - without.tensors[k]).abs().max()) for k in without.tensors
             if k.endswith("lora_up.weight")]
    assert max(diffs) > 1e-6  # the preset changed what was learned


def test_inspect_shows_the_timestep_window_addift_used(example_tree, tiny_sd1_dir, run_cli):
    lora_path = example_tree / "output" / "eyes_closed.safetensors"
    if not lora_path.exists():
        assert _run(run_cli, example_tree, tiny_sd1_dir, "addift")[0] == 0
    md = load_lora(lora_path).metadata
    # [addift] min_timestep = "auto": these 16x16 eyes pairs differ over most of their 2x2 latent grid, a
    # "global" change, so 700 ran (tests/test_methods.py checks 500 for eyes at the toy model's 64x64)
    assert (md["ss_min_timestep"], md["ss_max_timestep"]) == ("700", "1000")  # the window that ran, not 0-1000
    code, out, _ = run_cli("inspect", lora_path)
    assert code == 0 and "training:           addift, 4 steps, timesteps 700-1000" in out
