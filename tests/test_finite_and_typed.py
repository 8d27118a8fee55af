"""Finite and typed (issue 33, item 4): NaN weights never become a black image, in any family; booleans
are not numbers and words are not booleans; an adapter file must match the job's algorithm; fp16 on
the CPU trains (in fp32, said in the log)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from difflora.config import load_job
from difflora.errors import UserError
from difflora.generate import GenerationRequest, NonFiniteImage, generate
from difflora.models import load_model
from difflora.models.registry import family_names, plugin_for

sys.path.insert(0, str(Path(__file__).parent / "contract"))
from tiny_families import TINY_FAMILIES  # noqa: E402


def _tiny(family: str):
    from difflora.toy.tiny import build_tiny_sd

    return build_tiny_sd(family, layout="small")


@pytest.mark.parametrize("family", family_names())
def test_a_nan_denoiser_weight_ends_generate_with_exit_2_not_a_black_image(family, tmp_path, run_cli):
    """Every registered family, through the contract suite's tiny models (a new family joins by joining it): the
    model generates a finite image, then the same model saved with NaN denoiser weights makes `difflora generate`
    exit 2 with one line and write no image."""
    import argparse

    assert family in TINY_FAMILIES, f"{family}: no tiny model (join tests/contract/tiny_families.py)"
    spec = TINY_FAMILIES[family]
    spec.build(tmp_path / "model")
    plugin = plugin_for(family)
    options = {k: v for k, v in spec.job_keys.items() if k in plugin.options.model_fields}  # the family's own keys
    model = load_model(tmp_path / "model", options=options)
    side = spec.resolution
    req = GenerationRequest(["a face"], [1], steps=2, sampler=model.default_sampler, cfg=model.default_cfg,
                            width=side, height=side)
    assert np.isfinite(generate(model, [], req, output="float")[0]).all()
    with torch.no_grad():
        for weight in model.denoiser.parameters():
            if weight.dim() == 2:
                weight[0, 0] = float("nan")
    model.save(tmp_path / "nan")
    parser = argparse.ArgumentParser()
    plugin.add_generate_arguments(parser)
    flags = {a.dest: a.option_strings[0] for a in parser._actions if a.option_strings}
    family_flags = [x for k, v in options.items() if k in flags for x in (flags[k], str(v))]
    code, _, err = run_cli("generate", "--model", tmp_path / "nan", "--prompt", "a face", "--steps", "2",
                           "--width", side, "--height", side, "--out", tmp_path / "out", *family_flags)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "NaN/inf" in err, err
    assert not list((tmp_path / "out").glob("*.png")) if (tmp_path / "out").exists() else True


@pytest.mark.parametrize("line,key,words", [
    ("[addift]\nmin_timestep = true", "addift.min_timestep", "not the boolean true"),
    ("network_dim = true", "network_dim", "not the boolean true"),
    ("learning_rate = false", "learning_rate", "not the boolean false"),
    ('flip_aug = "no"', "flip_aug", "not the text 'no'"),
    ('network_train_unet_only = "true"', "network_train_unet_only", "not the text 'true'"),
    ('use_8bit_adam = "no"', "use_8bit_adam", "takes true or false"),
    ('base_weights = ["a.safetensors"]\nbase_weights_multiplier = "strong"', "base_weights_multiplier",
     "takes numbers"),
])
def test_booleans_are_not_numbers_and_words_are_not_booleans(tmp_path, line, key, words):
    job = tmp_path / "job.toml"
    job.write_text(f'method = "addift"\ntrain_data_dir = "data"\n{line}\n')
    with pytest.raises(UserError, match=words) as e:
        load_job(job)
    assert key in str(e.value) and str(job) in str(e.value) and "\n" not in str(e.value)


def test_booleans_and_numbers_of_the_right_type_still_load(tmp_path):
    job = tmp_path / "job.toml"
    job.write_text('method = "addift"\ntrain_data_dir = "data"\nflip_aug = false\nlearning_rate = 1\n'
                   'use_8bit_adam = false\n[addift]\nmin_timestep = 600\n')
    loaded = load_job(job)
    assert loaded.learning_rate == 1.0 and loaded.addift.min_timestep == 600 and loaded.optimizer_type == "AdamW"


def test_an_adapter_file_of_another_algorithm_is_refused_as_network_weights():
    from difflora.network.adapters import adapter_options
    from difflora.network.lora import LoRANetwork, NetworkSpec

    targets = _tiny("sd1").lora_targets()
    loha = LoRANetwork.create(targets, NetworkSpec(network_dim=2, network_alpha=2.0,
                                                   adapter=adapter_options("loha")))
    lora = LoRANetwork.create(targets, NetworkSpec(network_dim=2, network_alpha=1.0))
    alpha_before = {k: v.clone() for k, v in lora.state_dict().items() if k.endswith(".alpha")}
    with pytest.raises(UserError, match=r"stored as another adapter algorithm \(hada_"):
        lora.load_weights(loha.kohya_state_dict(), source="loha.safetensors", strict=False)
    assert all(torch.equal(v, lora.state_dict()[k]) for k, v in alpha_before.items())  # the job's alpha kept
    only_alpha = {k: v for k, v in loha.kohya_state_dict().items() if k.endswith(".alpha")}
    with pytest.raises(UserError, match="none of the file's keys belong"):
        lora.load_weights(only_alpha, source="alpha.safetensors", strict=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 autocast exists on a GPU: this is the CPU's case")
def test_fp16_mixed_precision_on_the_cpu_trains_in_fp32(tmp_path, tiny_sd1_dir, faces16):
    import os
    import subprocess
    import sys

    def train(name: str, precision: str):  # a process each: accelerate's state is set once per process
        job = tmp_path / f"{name}.toml"
        job.write_text(f'model = "{tiny_sd1_dir}"\ntrain_data_dir = "{faces16}"\nresolution = 16\nmax_train_steps = 2\n'
                       f'network_dim = 2\noutput_dir = "{tmp_path / name}"\nlog_with = "none"\n'
                       f'mixed_precision = "{precision}"\n')
        done = subprocess.run([sys.executable, "-m", "difflora", "train", str(job)], capture_output=True, text=True,
                              env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        return load_file(str(tmp_path / name / "last.safetensors")), done.stderr

    half, log = train("fp16", "fp16")
    assert log.count("training in fp32") == 1
    full, _ = train("fp32", "no")
    assert half.keys() == full.keys() and all(torch.equal(half[k], full[k]) for k in full)
