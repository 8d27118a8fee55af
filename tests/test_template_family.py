"""The template family (tests/template_family/): a family that touches only its package and its registration
trains, saves, loads and generates through the plug-in interface like the built-in ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from difflora.config import JobConfig, apply_method_defaults
from difflora.errors import UserError
from difflora.generate import GenerationRequest, generate
from difflora.models import load_model, registry
from difflora.network.apply import network_from_file
from difflora.network.files import load_lora
from difflora.train.loop import train


@pytest.fixture
def template(monkeypatch, tmp_path):
    """The template family registered for one test (the registry as it was afterwards), and a tiny model folder."""
    from template_family.model import build

    monkeypatch.setattr(registry, "FAMILIES", list(registry.FAMILIES))
    registry.register_family("template_family")
    build(seed=3).save(tmp_path / "model")
    return tmp_path / "model"


def _job(model, data, out, method: str, **extra):
    job = {"model": str(model), "method": method, "resolution": 16, "max_train_steps": 6, "learning_rate": 5e-2,
           "output_dir": str(out), "log_with": "none", "seed": 1, "network_dim": 2, "network_alpha": 2.0,
           "datasets": [{"subsets": [{"image_dir": str(data), "caption_extension": ".txt"}]}], **extra}
    return apply_method_defaults(JobConfig.model_validate(job))


def _images(model, nets, multiplier: float) -> np.ndarray:
    req = GenerationRequest(prompts=["a face"], seeds=[7], steps=4, multipliers={0: [multiplier]})
    return np.stack(generate(model, nets, req, output="float"))


@pytest.mark.parametrize("method", ["standard", "addift"])
def test_the_template_family_trains_a_lora_that_loads_back_and_generates(template, pairs16, tmp_path, method):
    path = train(_job(template, pairs16, tmp_path / "out", method))
    lora = load_lora(path)
    assert registry.lora_owner(set(lora.module_names()), lora.metadata).title == "Template family (tests)"
    assert lora.metadata["ss_base_model_version"] == "template_v1"
    model = load_model(template)
    assert model.family == "template"
    net = network_from_file(model, path, 1.0)
    trained = {n for n in lora.module_names()}
    assert "lora_unet_template_text_proj" in trained
    assert np.abs(_images(model, [net], 1.0) - _images(model, [net], 0.0)).max() > 1e-4
    assert np.array_equal(_images(model, [net], 0.0), _images(load_model(template), [], 0.0))


def test_a_template_lora_is_refused_on_another_family(template, pairs16, tmp_path, tiny_sd1_dir):
    path = train(_job(template, pairs16, tmp_path / "out", "standard"))
    with pytest.raises(UserError, match="trained for template_v1"):
        network_from_file(load_model(tiny_sd1_dir), path, 1.0)


def test_a_key_of_another_family_is_refused_for_the_template(template, pairs16, tmp_path):
    job = _job(template, pairs16, tmp_path / "out", "standard", blocks_to_swap=2)
    refused = r"blocks_to_swap applies to [^;]*FLUX\.1[^;]* models only; this model is Template"  # a shared key
    with pytest.raises(UserError, match=refused):
        train(job)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
