"""Training on tiny FLUX.2 klein-4B (the real 5 + 20 blocks): every method with each adapter runs `difflora
train` end to end for a few steps and writes a FLUX.2 LoRA of musubi's 80 modules; the trained LoRA lowers
the loss it was trained on and changes the image; cached text-encoder outputs free Qwen3; low-VRAM keys."""

from __future__ import annotations

import os
import subprocess
import sys
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
    from difflora.models.flux2.tiny import write_tiny

    root = tmp_path_factory.mktemp("flux2_train")
    files = write_tiny(root / "model", "klein-4b")
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


CASES = [  # (method, adapter keys, extra)
    ("standard", {}, {}),
    ("addift", {"network_algo": "loha"}, {}),
    ("slider", {"network_algo": "lokr", "network_factor": 4}, {}),
    ("copier", {"network_dora": True}, {"copier": {"stage1_steps": 2, "stage2_steps": 2}}),
    ("differential", {}, {"differential": {"before_steps": 2, "after_steps": 2}}),
    ("addift", {}, {"per_pair_average": True, "max_train_steps": 2}),
]


@pytest.mark.parametrize("method,adapter,extra", CASES, ids=[f"{m}-{a.get('network_algo', 'dora' if a else 'lora')}"
                                                             + ("-avg" if e.get("per_pair_average") else "")
                                                             for m, a, e in CASES])
def test_every_method_and_adapter_trains_a_flux2_lora(env, tmp_path, method, adapter, extra):
    job = _job(env, tmp_path, method, **adapter, **extra)
    path = train(job)
    tensors = load_file(str(path))
    modules = {k.split(".", 1)[0] for k in tensors}
    assert len(modules) == 80 and all(m.startswith(("lora_unet_double_blocks_", "lora_unet_single_blocks_"))
                                      for m in modules)
    md = read_metadata_only(path)
    assert md["ss_base_model_version"] == "flux2_klein_base_4b"
    assert md["modelspec.architecture"] == "Flux.2-klein-4b"
    moved = max(v.abs().max().item() for k, v in tensors.items()
                if k.endswith(("lora_up.weight", "hada_w2_a", "lokr_w2", "lokr_w2_b")))
    assert moved > 1e-4


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
               gradient_checkpointing=True,
               blocks_to_swap=4, max_train_steps=2)
    path = train(job)
    assert len({k.split(".", 1)[0] for k in load_file(str(path))}) == 80


def test_cli_train_and_refusals(env, tmp_path):
    root, files = env
    body = (f'model = "{files["folder"]}"\nmethod = "standard"\nresolution = 32\ntrain_batch_size = 2\n'
            f'max_train_steps = 2\noutput_dir = "out"\noutput_name = "cli"\nlog_with = "none"\n'
            f'text_encoder_max_token_length = 16\nsave_format = "comfyui"\n'
            f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{root / "pairs"}"\ncaption_extension = ".txt"\n')
    (tmp_path / "job.toml").write_text(body, encoding="utf-8")
    src = str(Path(__file__).resolve().parents[1] / "src")
    envv = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1",
                PYTHONPATH=os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH", "")) if p))
    r = subprocess.run([sys.executable, "-m", "difflora", "-q", "train", "job.toml"], cwd=tmp_path, env=envv,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    saved = load_file(str(tmp_path / "out" / "cli.safetensors"))
    assert all(k.startswith("diffusion_model.") and not k.endswith(".alpha") for k in saved)
    # a FLUX.1 key on FLUX.2 and a FLUX.2 key on SD are refused with one line
    with pytest.raises(UserError, match="t5xxl_max_token_length applies to FLUX.1"):
        train(_job(env, tmp_path, "standard", t5xxl_max_token_length=64))
