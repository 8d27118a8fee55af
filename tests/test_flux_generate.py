"""FLUX generation flags: true CFG against a negative prompt, the flow-matching samplers, and what is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from difflora.errors import UserError
from difflora.generate import GenerationRequest, generate


@pytest.fixture(scope="module")
def flux():
    from difflora.toy.tiny_flux import build_tiny_flux

    return build_tiny_flux("dev", 1, 1)


def _image(model, **request) -> np.ndarray:
    req = GenerationRequest(prompts=["a face, red hair"], seeds=[4], steps=4, width=32, height=32, **request)
    return generate(model, [], req, output="float")[0]


def _forwards(model) -> list[int]:
    calls = [0]
    model.denoiser.register_forward_pre_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_true_cfg_runs_a_negative_prediction_per_step_and_steers_away_from_it(flux):
    calls = _forwards(flux)
    plain = _image(flux)
    assert calls[0] == 4  # the family's default: Euler, cfg 1 (dev's guidance is embedded)
    calls[0] = 0
    guided = _image(flux, cfg=3.0, negative=["a face, blue hair"])
    assert calls[0] == 8  # a conditional and a negative prediction at each step
    assert np.abs(guided - plain).max() > 1e-3
    # v_neg + s·(v - v_neg) = v when the negative is the prompt itself: any scale gives the unguided image
    same = _image(flux, cfg=3.0, negative=["a face, red hair"])
    np.testing.assert_allclose(same, plain, atol=1e-5)
    # the negative prompt decides the result
    other = _image(flux, cfg=3.0, negative=["a face, closed eyes"])
    assert np.abs(other - guided).max() > 1e-3


def test_heun_takes_a_second_prediction_per_step_and_converges_faster_than_euler(flux):
    calls = _forwards(flux)

    def run(sampler, steps):
        req = GenerationRequest(prompts=["a face"], seeds=[2], steps=steps, width=32, height=32, sampler=sampler)
        return generate(flux, [], req, output="float")[0]

    calls[0] = 0
    heun = run("heun", 4)
    assert calls[0] == 2 * 4 - 1  # the last step ends at sigma 0: Euler there
    reference = run("euler", 96)
    assert np.abs(run("heun", 4) - reference).mean() < np.abs(run("euler", 4) - reference).mean()
    assert np.abs(heun - run("euler", 4)).max() > 1e-4


def test_a_ddpm_sampler_is_refused_on_flux_with_one_line(flux):
    with pytest.raises(UserError) as info:
        _image(flux, sampler="ddim")
    assert "ddim" in str(info.value) and "euler or heun" in str(info.value) and "\n" not in str(info.value)


def test_generate_cli_on_flux_uses_cfg_negative_and_sampler(tmp_path, run_cli, flux):
    model = tmp_path / "flux"
    flux.save(model)
    base = ["generate", "--model", model, "--prompt", "a face, red hair", "--steps", "3", "--width", "32",
            "--height", "32", "--seed", "1"]

    def image(name, *extra):
        code, _, err = run_cli(*base, "--out", tmp_path / name, *extra)
        assert code == 0, err
        path = tmp_path / name / "000_1.png"
        return np.asarray(Image.open(path), dtype=np.float32), Image.open(path).text["parameters"]

    plain, params = image("plain")
    assert "Sampler: euler" in params and "CFG scale: 1" in params
    guided, params = image("guided", "--cfg", "4", "--negative", "a face, blue hair")
    assert "CFG scale: 4" in params and np.abs(guided - plain).max() > 0
    heun, params = image("heun", "--sampler", "heun")
    assert "Sampler: heun" in params and np.abs(heun - plain).max() > 0
    code, _, err = run_cli(*base, "--out", tmp_path / "ddim", "--sampler", "ddim")
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and "euler or heun" in lines[0]


def test_a_sample_sampler_flux_cannot_use_stops_training_before_the_first_step(tmp_path, flux):
    from conftest import _write_pairs
    from difflora.config import JobConfig, apply_method_defaults
    from difflora.train.loop import train

    flux.save(tmp_path / "flux")
    _write_pairs(tmp_path / "data", 2, 32)
    (tmp_path / "prompts.txt").write_text("a face\n", encoding="utf-8")
    out = tmp_path / "out"
    job = apply_method_defaults(JobConfig.model_validate({
        "model": str(tmp_path / "flux"), "method": "standard", "resolution": 32, "max_train_steps": 2,
        "output_dir": str(out), "output_name": "r", "log_with": "none", "sample_sampler": "ddim",
        "sample_prompts": str(tmp_path / "prompts.txt"), "sample_every_n_steps": 1,
        "datasets": [{"subsets": [{"image_dir": str(tmp_path / "data"), "caption_extension": ".txt"}]}]}))
    with pytest.raises(UserError) as info:
        train(job)
    assert "'ddim'" in str(info.value) and "euler or heun" in str(info.value)
    assert not out.exists() or not any(out.glob("*.safetensors"))
