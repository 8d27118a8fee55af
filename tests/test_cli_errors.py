"""Bad input: one clear line naming the file and the problem, exit code 2, nothing already saved touched."""

from __future__ import annotations

import shutil

import pytest
import torch

from conftest import write_job
from difflora.toy.tiny import build_tiny_sd
from difflora.network.files import save_lora
from difflora.network.lora import LoRANetwork, NetworkSpec


@pytest.fixture
def workspace(tmp_path, tiny_sd1_dir, faces16, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "data"
    shutil.copytree(faces16, data)
    out = tmp_path / "out"
    out.mkdir()
    keep = out / "previous.safetensors"
    keep.write_bytes(b"an earlier result that must survive")
    job = (f'model = "{tiny_sd1_dir}"\ntrain_data_dir = "{data}"\nresolution = 16\nmax_train_steps = 2\n'
           f'output_dir = "{out}"\nlog_with = "none"\n')
    return tmp_path, data, out, keep, job


def _assert_one_line(code, err, *needles):
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("difflora: error: ")
    for n in needles:
        assert n in lines[0], (n, lines[0])


def _untouched(out, keep):
    assert keep.read_bytes() == b"an earlier result that must survive"
    assert sorted(p.name for p in out.iterdir()) == ["previous.safetensors"]


def test_missing_image_folder(workspace, run_cli):
    tmp, data, out, keep, job = workspace
    j = write_job(tmp / "job.toml", job.replace(str(data), str(tmp / "nowhere")))
    code, _, err = run_cli("train", j)
    _assert_one_line(code, err, "nowhere", "not found")
    _untouched(out, keep)


def test_file_that_is_not_an_image(workspace, run_cli):
    tmp, data, out, keep, job = workspace
    (data / "2_face" / "fake.png").write_text("I am a text file with a png name")
    code, _, err = run_cli("train", write_job(tmp / "job.toml", job))
    _assert_one_line(code, err, "fake.png", "not an image")
    _untouched(out, keep)


def test_caption_that_is_not_utf8(workspace, run_cli):
    tmp, data, out, keep, job = workspace
    (data / "2_face" / "000.txt").write_bytes("caf\xe9, red hair".encode("latin-1"))
    code, _, err = run_cli("train", write_job(tmp / "job.toml", job))
    _assert_one_line(code, err, "000.txt", "UTF-8")
    _untouched(out, keep)


def test_toml_with_a_misspelt_key(workspace, run_cli):
    tmp, data, out, keep, job = workspace
    j = write_job(tmp / "job.toml", job + "netwrok_dim = 8\n")
    code, _, err = run_cli("train", j)
    _assert_one_line(code, err, "job.toml", "line 7", "netwrok_dim", "network_dim")
    _untouched(out, keep)


def test_lora_for_another_architecture(workspace, run_cli, sd15_layout_dirs):
    tmp, data, out, keep, job = workspace
    other = build_tiny_sd("sd2", layout="sd15")
    net = LoRANetwork.create(other.lora_targets(), NetworkSpec(network_dim=2))
    save_lora(net.kohya_state_dict(), tmp / "sd2_lora.safetensors", metadata=other.lora_metadata())
    code, _, err = run_cli("generate", "--model", sd15_layout_dirs["sd1"], "--prompt", "a face", "--lora",
                           tmp / "sd2_lora.safetensors", "--out", out)
    _assert_one_line(code, err, "sd2_lora.safetensors", "sd_v2")
    _untouched(out, keep)
    # the same file as network_weights of a training run
    j = write_job(tmp / "job.toml", job.replace('model = "', f'network_weights = "{tmp / "sd2_lora.safetensors"}"\nmodel = "', 1))
    code, _, err = run_cli("train", j)
    _assert_one_line(code, err, "sd2_lora.safetensors")
    _untouched(out, keep)


def test_ckpt_without_allow_pickle(workspace, run_cli, tiny_sd1_dir):
    tmp, data, out, keep, job = workspace
    torch.save({"state_dict": {"a": torch.zeros(1)}}, tmp / "model.ckpt")
    code, _, err = run_cli("generate", "--model", tmp / "model.ckpt", "--prompt", "a face", "--out", out)
    _assert_one_line(code, err, "model.ckpt", "--allow-pickle")
    j = write_job(tmp / "job.toml", job.replace(str(tiny_sd1_dir), str(tmp / "model.ckpt")))
    code, _, err = run_cli("train", j)
    _assert_one_line(code, err, "model.ckpt", "--allow-pickle")
    _untouched(out, keep)


def test_existing_output_is_not_overwritten(workspace, run_cli):
    tmp, data, out, keep, job = workspace
    (out / "last.safetensors").write_bytes(b"old")
    code, _, err = run_cli("train", write_job(tmp / "job.toml", job))
    _assert_one_line(code, err, "last.safetensors", "already exists")
    assert (out / "last.safetensors").read_bytes() == b"old"


@pytest.mark.parametrize("setting, needles", [
    ("slider.captoins=own", ("--set", "slider.captoins", "captions")),
    ("slider.captions=mine", ("--set", "slider.captions", "'own'")),
])
def test_eval_set_is_checked_before_any_training(tmp_path, run_cli, setting, needles):
    code, _, err = run_cli("eval", "--method", "slider", "--pairs", "1", "--set", setting, "--out", tmp_path / "ev")
    _assert_one_line(code, err, *needles)
    assert not (tmp_path / "ev").exists()  # stopped before writing pairs or training


def test_eval_set_dotted_key_keeps_the_rest_of_its_table(tmp_path):
    from difflora.toy.evaluate import eval_job

    job = eval_job("eyes", "slider", 8, tmp_path, None, 0, ["slider.captions='own'", "max_train_steps=7"])
    assert job.slider.captions == "own" and job.slider.scale == 1.0 and job.max_train_steps == 7
