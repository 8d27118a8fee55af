"""A kohya train_network.py config trains unchanged; kohya options difflora lacks are refused by name."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import _write_faces
from difflora.config import load_job
from difflora.errors import UserError
from difflora.network.files import load_lora

KOHYA_CONFIG = """\
pretrained_model_name_or_path = "{model}"
train_data_dir = "data"
output_dir = "out"
output_name = "kohya_style"
network_module = "networks.lora"
network_dim = 4
network_alpha = 2
learning_rate = 1e-3
max_train_steps = 3
resolution = "16,16"
save_model_as = "safetensors"
optimizer_type = "adamw"
optimizer_args = ["weight_decay=0.01", "betas=0.9,0.99"]
text_encoder_lr = [5e-4]
lr_warmup_steps = "10%"
xformers = true
max_data_loader_n_workers = 2
persistent_data_loader_workers = true
loss_type = "l2"
huber_c = 0.1
color_aug = false
mixed_precision = "no"
caption_extension = ".txt"
seed = 3
log_with = "tensorboard"
"""


def _kohya_tree(tmp_path, tiny_sd1_dir):
    _write_faces(tmp_path / "data" / "2_face", 3, 16)
    cfg = tmp_path / "kohya.toml"
    cfg.write_text(KOHYA_CONFIG.format(model=tiny_sd1_dir))
    return cfg


def test_kohya_keys_read_as_difflora_keys(tmp_path, tiny_sd1_dir, caplog):
    cfg = _kohya_tree(tmp_path, tiny_sd1_dir)
    with caplog.at_level(logging.INFO, logger="difflora"):
        job = load_job(cfg)
    assert job.model == str(tiny_sd1_dir)
    assert job.resolution == 16 and job.optimizer_type == "AdamW" and job.text_encoder_lr == 5e-4
    assert job.optimizer_args == {"weight_decay": 0.01, "betas": (0.9, 0.99)}
    assert job.lr_warmup_steps == pytest.approx(0.1)
    notes = [r.getMessage() for r in caplog.records if "kohya" in r.getMessage()]
    assert any("'pretrained_model_name_or_path' read as 'model'" in n for n in notes)
    assert any("'xformers' has no effect" in n for n in notes)
    assert len(notes) == len(set(notes))  # each note once


def test_kohya_config_trains_unchanged(tmp_path, tiny_sd1_dir, run_cli):
    cfg = _kohya_tree(tmp_path, tiny_sd1_dir)
    code, _, err = run_cli("train", cfg)
    assert code == 0, err
    lora = load_lora(tmp_path / "out" / "kohya_style.safetensors")
    assert int(lora.metadata["ss_network_dim"]) == 4 and float(lora.metadata["ss_network_alpha"]) == 2
    assert any(k.startswith("lora_te_") for k in lora.tensors) and any(k.startswith("lora_unet_") for k in lora.tensors)


@pytest.mark.parametrize("line,key", [
    ('color_aug = true', "color_aug"),
    ('save_model_as = "ckpt"', "save_model_as"),
    ('network_module = "networks.dylora"', "network_module"),
    ('ddp_timeout = 30', "ddp_timeout"),
    ('loss_type = "huber"', "loss_type"),
    ('log_with = "wandb"', "log_with"),
    ('masked_loss = true', "masked_loss"),
])
def test_unsupported_kohya_option_is_refused_by_name(tmp_path, tiny_sd1_dir, run_cli, line, key):
    cfg = _kohya_tree(tmp_path, tiny_sd1_dir)
    text = "\n".join(x for x in cfg.read_text().splitlines() if not x.startswith(key + " "))
    cfg.write_text(text + "\n" + line + "\n")
    code, _, err = run_cli("train", cfg)
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    assert f"'{key} = " in err and "kohya option difflora does not support" in err and str(cfg) in err
    assert not (tmp_path / "out").exists()


def test_kohya_and_difflora_name_for_one_setting_is_refused(tmp_path, tiny_sd1_dir, run_cli):
    cfg = _kohya_tree(tmp_path, tiny_sd1_dir)
    cfg.write_text(cfg.read_text() + f'model = "{tiny_sd1_dir}"\n')
    code, _, err = run_cli("train", cfg)
    assert code == 2 and "'pretrained_model_name_or_path' (kohya) and 'model'" in err


def test_help_keys_lists_every_key_with_level_description_and_method_defaults(run_cli):
    from difflora.commands.train import key_rows
    from difflora.config import JobConfig
    from difflora.methods import METHODS

    rows = key_rows()
    keys = {r[0].strip().strip("[]") for r in rows}
    assert set(JobConfig.model_fields) <= keys
    assert {"image_dir", "after_dir", "after_suffix"} <= keys  # subset and pair keys too
    assert all(r[3] for r in rows), [r[0] for r in rows if not r[3]]  # a description for every key
    levels = {r[0]: r[2] for r in rows}
    assert levels["image_dir"] == "[[datasets.subsets]]" and "[[datasets]]" in levels["resolution"]
    assert levels["learning_rate"] == "job"
    for method, cls in METHODS.items():
        by_key = {r[0]: r[1] for r in key_rows(method)}
        for key, value in cls.defaults.items():
            assert by_key[key] == repr(value), (method, key)
    code, out, _ = run_cli("train", "--help-keys", "--method", "addift")
    assert code == 0 and "[addift]" in out and "[copier]" not in out
    assert any(line.split()[:2] == ["max_train_steps", "40"] for line in out.splitlines())
    code, _, err = run_cli("train", "--help-keys", "--method", "adift")
    assert code == 2 and "unknown method 'adift'" in err


# ------------------------------------------------------------------ kohya_ss GUI configs
GUI_SDXL = Path(__file__).parent / "data" / "kohya_ss_gui_sdxl.toml"


@pytest.fixture(scope="module")
def gui_sdxl_tree(tmp_path_factory):
    """The GUI's SDXL LoRA config beside what it names: the model, one `<repeats>_<name>` image folder, and the
    empty prompt file the GUI writes into the output folder when no sample prompts are given."""
    from difflora.toy.tiny_sdxl import build_tiny_sdxl

    root = tmp_path_factory.mktemp("kohya_ss_gui")
    build_tiny_sdxl().save(root / "model")
    _write_faces(root / "img" / "1_face", 2, 32)
    (root / "output" / "sample").mkdir(parents=True)
    (root / "output" / "sample" / "prompt.txt").write_text("")
    shutil.copy(GUI_SDXL, root / "config_lora-20261207-133000.toml")
    return root


def _train_in_a_process(cfg, cwd) -> str:
    """`python -m difflora train CFG` in its own process (the GUI's bf16 needs a fresh accelerate state); its log."""
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([src, *filter(None, [os.environ.get("PYTHONPATH")])]))
    r = subprocess.run([sys.executable, "-m", "difflora", "train", str(cfg)], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stderr


def test_kohya_ss_gui_sdxl_config_trains_unchanged(gui_sdxl_tree):
    cfg = gui_sdxl_tree / "config_lora-20261207-133000.toml"
    log = _train_in_a_process(cfg, gui_sdxl_tree)
    notes = [line.split("difflora.kohya_config: ", 1)[1] for line in log.splitlines() if "kohya key '" in line]
    assert len(notes) == len(set(notes))  # each once
    noted = {n.split("'")[1] for n in notes}
    # every key sd-scripts reads but difflora has no use for is named, and the GUI's own bookkeeping keys too
    assert {"dynamo_backend", "epoch", "noise_offset_type", "wandb_run_name", "huber_c", "max_token_length"} <= noted
    lora = load_lora(gui_sdxl_tree / "output" / "last.safetensors")
    md = lora.metadata
    assert md["ss_network_module"] == "networks.lora" and md["ss_network_dim"] == "16" and md["ss_network_alpha"] == "8"
    assert json.loads(md["ss_network_args"]) == {"rank_dropout": "0.1", "module_dropout": "0.1", "dropout": None}
    assert float(md["ss_text_encoder_lr"]) == 5e-5 and float(md["ss_unet_lr"]) == 1e-4 and md["ss_seed"] == "1234"
    assert {k.split("_")[1] for k in lora.tensors} == {"te1", "te2", "unet"}  # both text encoders: TE lr > 0
    assert all(t.dtype == torch.bfloat16 for t in lora.tensors.values())  # save_precision = "bf16"


@pytest.mark.parametrize("line,problem", [
    ('dynamo_backend = "inductor"', "'dynamo_backend = 'inductor'' is a kohya option"),
    ("text_encoder_lr = [ 5e-5, 1e-5,]", "with a different rate per text encoder"),
    ('network_args = [ "block_dims=2,4,4,4,8,8,8,8,8,8,4,4,2",]', "block_dims=2,4,4,4,8,8,8,8,8,8,4,4,2: per-block ranks"),
    ('network_args = [ "down_lr_weight=sine",]', "per-block learning rates are not supported"),
    ('model_type = "chroma"', "'model_type = 'chroma''"),
])
def test_gui_values_difflora_cannot_apply_are_refused_by_name(gui_sdxl_tree, tmp_path, run_cli, line, problem):
    key = line.split()[0]
    text = "".join(x + "\n" for x in GUI_SDXL.read_text().splitlines() if not x.startswith(key + " "))
    cfg = gui_sdxl_tree / f"refused_{key}.toml"
    cfg.write_text(text + line + "\n")
    code, _, err = run_cli("train", cfg, "--set", f'output_dir="{tmp_path / "out"}"')
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert problem in err and str(cfg) in err
    assert not (tmp_path / "out").exists()


def test_gui_lycoris_switches_are_accepted_off_and_refused_on():
    from difflora.network.adapters import parse_network_args

    # kohya_ss's LyCORIS/LoKr line, as the GUI writes it with its defaults
    gui = ("preset=full conv_dim=4 conv_alpha=1 use_tucker=False rank_dropout=0 bypass_mode=False dora_wd=False "
           "module_dropout=0 factor=-1 use_cp=False use_scalar=False decompose_both=False rank_dropout_scale=False "
           "algo=lokr train_norm=False").split()
    assert parse_network_args(gui) == {"conv_dim": 4, "conv_alpha": 1.0, "use_tucker": False, "rank_dropout": 0.0,
                                       "dora_wd": False, "module_dropout": 0.0, "factor": -1,
                                       "decompose_both": False, "algo": "lokr"}
    for switch in ("use_scalar", "bypass_mode", "train_norm", "rank_dropout_scale"):
        with pytest.raises(UserError, match=f"network_args {switch}=True: "):
            parse_network_args([*gui, f"{switch}=True"])


# ------------------------------------------------------------------ kohya FLUX configs (flux_train_network.py)
KOHYA_FLUX = Path(__file__).parent / "data" / "kohya_flux_lora.toml"
FLUX_DATASET = """\
[general]
caption_extension = ".txt"

[[datasets]]
resolution = 32
batch_size = 1

  [[datasets.subsets]]
  image_dir = "img"
  num_repeats = 1
"""


@pytest.fixture(scope="module")
def kohya_flux_tree(tmp_path_factory):
    """sd-scripts' FLUX config beside the files it names: a BFL transformer, clip_l / t5xxl / ae, a dataset TOML."""
    from difflora.models.flux.files import save_component_files
    from difflora.toy.tiny_flux import build_tiny_flux

    root = tmp_path_factory.mktemp("kohya_flux")
    model = build_tiny_flux("dev", 1, 1)
    model.save(root / "flux1-tiny.safetensors")
    save_component_files(model, root / "components")
    _write_faces(root / "img", 2, 32)
    (root / "dataset.toml").write_text(FLUX_DATASET)
    shutil.copy(KOHYA_FLUX, root / "flux_lora.toml")
    return root


def test_kohya_flux_config_with_lora_flux_and_train_t5xxl_trains_unchanged(kohya_flux_tree):
    log = _train_in_a_process(kohya_flux_tree / "flux_lora.toml", kohya_flux_tree)
    assert "network_args train_t5xxl=True read as train_t5xxl = True" in log
    lora = load_lora(kohya_flux_tree / "out" / "flux-lora.safetensors")
    md = lora.metadata
    assert {k.split("_")[1] for k in lora.tensors} == {"te1", "te3", "unet"}  # CLIP-L, T5 (train_t5xxl), transformer
    assert md["ss_network_module"] == "networks.lora_flux" and md["ss_base_model_version"] == "flux1"
    assert json.loads(md["ss_network_args"]) == {"train_t5xxl": "True", "split_qkv": "False", "verbose": "True",
                                                 "dropout": None}
    assert md["ss_network_dim"] == "4" and md["ss_network_alpha"] == "4"


@pytest.mark.parametrize("args,problem", [
    ('["train_t5xxl=true"]', "sd-scripts reads only train_t5xxl=True as true"),
    ('["split_qkv=True"]', "network_args split_qkv=True (networks.lora_flux): difflora trains FLUX's fused qkv"),
    ('["img_attn_dim=8"]', "per-module-type ranks are not supported"),
    ('["train_double_block_indices=0-3"]', "blocks are chosen with train_blocks"),
])
def test_lora_flux_network_args_difflora_cannot_apply_are_refused_with_the_reason(kohya_flux_tree, args, problem):
    cfg = kohya_flux_tree / "refused.toml"
    cfg.write_text(KOHYA_FLUX.read_text().replace('["train_t5xxl=True", "split_qkv=False", "verbose=True"]', args))
    with pytest.raises(UserError, match=re.escape(problem)):
        load_job(cfg)


def test_a_family_network_module_on_another_family_is_refused(gui_sdxl_tree, tmp_path, run_cli):
    cfg = gui_sdxl_tree / "lora_flux_on_sdxl.toml"
    cfg.write_text(GUI_SDXL.read_text().replace('"networks.lora"', '"networks.lora_flux"').replace(
        'mixed_precision = "bf16"', 'mixed_precision = "no"'))
    code, _, err = run_cli("train", cfg, "--set", f'output_dir="{tmp_path / "out"}"')
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "'networks.lora_flux' is sd-scripts' LoRA module for FLUX.1; this model is SDXL" in err
    assert not list(tmp_path.rglob("*.safetensors"))  # refused once the model's family is known, before training


def test_clip_l_component_carries_text_projection(kohya_flux_tree):
    from safetensors import safe_open

    with safe_open(str(kohya_flux_tree / "components" / "clip_l.safetensors"), "pt") as f:
        width = f.get_tensor("text_model.final_layer_norm.weight").shape[0]
        assert f.get_tensor("text_projection.weight").shape == (width, width)
