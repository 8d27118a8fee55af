"""A kohya train_network.py config trains unchanged; kohya options difflora lacks are refused by name."""

from __future__ import annotations

import logging

import pytest

from conftest import _write_faces
from difflora.config import load_job
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
