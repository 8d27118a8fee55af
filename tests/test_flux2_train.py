"""Training on tiny FLUX.2 klein-4B (the real 5 + 20 blocks), what the contract suite (tests/contract: every
method and adapter on klein-4B, klein-9B and dev) does not check: the trained LoRA lowers the loss it was trained
on and changes the image; cached text-encoder outputs free Qwen3 with the low-VRAM keys; the CLI's comfyui save."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import _write_pairs
from difflora.config import JobConfig, apply_method_defaults
from difflora.errors import UserError
from difflora.models import load_model
from difflora.models.registry import family_options_of
from difflora.network.apply import network_from_file
from difflora.network.files import read_metadata_only
from difflora.train.loop import train


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from difflora.models.flux2.tiny import build_tiny_flux2

    root = tmp_path_factory.mktemp("flux2_train")
    files = {"folder": root / "model"}
    build_tiny_flux2("klein-4b").save(files["folder"])
    _write_pairs(root / "pairs", 4, 32)
    return root, files


def _job(env, out: Path, method: str, **extra):
    root, files = env
    job = {"model": str(files["folder"]), "method": method, "resolution": 32, "train_batch_size": 2,
           "max_train_steps": 4, "learning_rate": 1e-2, "output_dir": str(out), "output_name": method,
           "log_with": "none", "seed": 5, "text_encoder_max_token_length": 16,
           "datasets": [{"subsets": [{"image_dir": str(root / "pairs"), "caption_extension": ".txt"}]}]}
    job.update(extra)
    return apply_method_defaults(JobConfig.model_validate(job))


def test_standard_lora_lowers_its_loss_and_changes_the_image(env, tmp_path):
    from difflora.data.images import load_image, to_tensor
    from difflora.generate import GenerationRequest, generate

    job = _job(env, tmp_path, "standard", max_train_steps=40, train_batch_size=4, learning_rate=5e-2)
    path = train(job)
    model = load_model(env[1]["folder"], options=family_options_of(job))
    befores = [p for p in sorted((env[0] / "pairs").glob("*.png")) if not p.stem.endswith("_after")]
    x0 = torch.cat([model.encode_images(to_tensor(load_image(p))[None], sample=False) for p in befores])
    caps = [p.with_suffix(".txt").read_text() for p in befores]
    cond = model.encode_prompts(caps)
    g = torch.Generator().manual_seed(0)
    losses = {}
    net = network_from_file(model, path)
    for m in (1.0, 0.0):
        net.set_multiplier(m)
        total = 0.0
        for sigma in (0.2, 0.5, 0.8):
            noise = torch.randn(x0.shape, generator=g)
            noisy = (1 - sigma) * x0 + sigma * noise
            with torch.no_grad():
                pred = model.predict(noisy, torch.full((len(x0),), sigma * 1000), cond)
            total += float(((pred - (noise - x0)) ** 2).mean())
        losses[m] = total
    assert losses[1.0] < 0.98 * losses[0.0], losses
    req = GenerationRequest(["a face"], [0], steps=2, cfg=1.0, width=32, height=32)
    images = [generate(model, [net], GenerationRequest(**{**req.__dict__, "multipliers": {0: [m]}}), output="float")[0]
              for m in (1.0, 0.0)]
    assert np.abs(images[0] - images[1]).max() > 1e-3


def test_cached_text_encoder_outputs_free_qwen3_and_low_vram_keys_train(env, tmp_path):
    job = _job(env, tmp_path, "standard", cache_text_encoder_outputs=True, network_train_unet_only=True,
               gradient_checkpointing=True, blocks_to_swap=4, max_train_steps=2)
    path = train(job)
    assert len({k.split(".", 1)[0] for k in load_file(str(path))}) == 80
    md = read_metadata_only(path)  # the variant as musubi names it (klein base: a folder without is_distilled)
    assert (md["ss_base_model_version"], md["modelspec.architecture"]) == ("flux2_klein_base_4b", "Flux.2-klein-4b")
    assert md["ss_network_module"] == "networks.lora_flux_2"  # musubi's module, as its files say


def test_cli_train_saves_comfyui_names_and_refuses_flux1_keys(env, tmp_path, run_cli):
    root, files = env
    body = (f'model = "{files["folder"].as_posix()}"\nmethod = "standard"\nresolution = 32\ntrain_batch_size = 2\n'
            f'max_train_steps = 1\noutput_dir = "{(tmp_path / "out").as_posix()}"\noutput_name = "cli"\n'
            f'log_with = "none"\ntext_encoder_max_token_length = 16\nsave_format = "comfyui"\n'
            f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{(root / "pairs").as_posix()}"\n'
            f'caption_extension = ".txt"\n')
    (tmp_path / "job.toml").write_text(body, encoding="utf-8")
    code, _, err = run_cli("-q", "train", tmp_path / "job.toml")
    assert code == 0, err[-2000:]
    saved = load_file(str(tmp_path / "out" / "cli.safetensors"))
    assert all(k.startswith("diffusion_model.") and not k.endswith(".alpha") for k in saved)
    # a FLUX.1 key on FLUX.2 is refused with one line
    with pytest.raises(UserError, match="t5xxl_max_token_length applies to FLUX.1"):
        train(_job(env, tmp_path, "standard", t5xxl_max_token_length=64))
