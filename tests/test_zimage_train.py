"""`difflora train` end to end on the tiny Z-Image (real layer count): every method and adapter, per-pair
averaging, preset (assistant) LoRAs with previews without them, Base -> Turbo, low-VRAM settings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import _write_pairs
from difflora.config import JobConfig, apply_method_defaults
from difflora.errors import UserError
from difflora.models import load_model
from difflora.network.adapters import by_module
from difflora.network.apply import network_from_file
from difflora.network.files import read_metadata_only
from difflora.train.loop import train

KOHYA_COMFY = set((Path(__file__).parent / "data" / "zimage_keys" / "zimage_kohya_comfy.txt").read_text().split())


@pytest.fixture(scope="module")
def zenv(tmp_path_factory):
    from difflora.models.zimage.tiny import write_tiny_zimage

    root = tmp_path_factory.mktemp("zimage_train")
    paths = write_tiny_zimage(root / "model")
    _write_pairs(root / "pairs", 2, 32)
    return root, paths


def _job(zenv, out: Path, method: str, **extra):
    root, paths = zenv
    job = {"model": str(paths["folder"]), "zimage_variant": "turbo", "method": method, "resolution": 32,
           "train_batch_size": 2, "max_train_steps": 4, "learning_rate": 1e-2, "output_dir": str(out),
           "output_name": method, "log_with": "none", "seed": 5,
           "datasets": [{"subsets": [{"image_dir": str(root / "pairs"), "caption_extension": ".txt"}]}]}
    job.update(extra)
    return apply_method_defaults(JobConfig.model_validate(job))


def _load(job):
    from difflora.models.registry import family_options_of

    return load_model(job.model, options=family_options_of(job), mixed_precision=job.mixed_precision)


def _image(model, networks, m):
    from difflora.generate import GenerationRequest, generate

    req = GenerationRequest(prompts=["a face, red hair"], seeds=[3], steps=2, width=32, height=32)
    req.multipliers = {len(networks) - 1: [m]}
    return generate(model, networks, req, output="float")[0]


METHOD_CASES = {"standard": {}, "addift": {"max_train_steps": 4, "learning_rate": 1e-2}}


# The contract suite (tests/contract) steps every method and adapter on this tiny model; here the saved names and
# the output change are checked end to end for a ground-truth method and a difference method.
@pytest.mark.parametrize("method", list(METHOD_CASES))
def test_each_method_trains_native_names_that_change_the_output(zenv, tmp_path, method):
    job = _job(zenv, tmp_path, method, **METHOD_CASES[method])
    path = train(job)
    assert set(by_module(load_file(str(path)))) == KOHYA_COMFY  # ComfyUI's and diffusers' loaders take all
    model = _load(job)
    net = network_from_file(model, path, 1.0)
    assert np.abs(_image(model, [net], 1.0) - _image(model, [net], 0.0)).max() > 1e-3, method
    md = read_metadata_only(path)
    assert md["ss_base_model_version"] == "zimage" and md["ss_zimage_variant"] == "turbo"
    assert md["ss_network_module"] == "networks.lora_zimage"  # musubi's module, as its files say
    assert md["ss_timestep_sampling"] == "shift" and md["ss_discrete_flow_shift"] == "2.0"


def test_addift_takes_traintrains_values_on_zimage(zenv, tmp_path):
    from difflora.config import apply_family_defaults

    job = apply_method_defaults(JobConfig.model_validate({
        "model": str(zenv[1]["folder"]), "zimage_variant": "turbo", "method": "addift", "output_dir": str(tmp_path),
        "datasets": [{"subsets": [{"image_dir": str(zenv[0] / "pairs")}]}]}))
    job = apply_family_defaults(job, _load(job).family)
    assert (job.max_train_steps, job.learning_rate, job.network_dim, job.network_alpha) == (100, 2e-4, 4, 1.0)
    assert (job.addift.min_timestep, job.addift.max_timestep, job.addift.multiplier) == (500, 1000, 0.25)


def test_standard_lowers_the_denoising_loss(zenv, tmp_path):
    from difflora.methods.base import Batch, StepContext
    from difflora.methods.standard import denoising_loss
    from difflora.data.images import load_image, to_tensor

    job = _job(zenv, tmp_path, "standard", max_train_steps=10, learning_rate=3e-2)
    path = train(job)
    model = _load(job)
    befores = sorted(p for p in (zenv[0] / "pairs").glob("*.png") if not p.stem.endswith("_after"))
    x = torch.cat([model.encode_images(to_tensor(load_image(p))[None], sample=False) for p in befores])
    caps = [p.with_suffix(".txt").read_text() for p in befores]
    net = network_from_file(model, path, 1.0)

    def loss(attached):
        if not attached:  # the loss sets the network's multiplier itself: detach it for the base model
            net.remove()
        out = []
        with torch.no_grad():
            for k, sigma in enumerate(np.linspace(0.1, 0.9, 8)):
                g = torch.Generator().manual_seed(k)
                batch = Batch({"x": x}, {"x": caps}, torch.randn(x.shape, generator=g),
                              torch.full((x.shape[0],), float(sigma) * 1000), torch.ones(x.shape[0]), step=0)
                out.append(float(denoising_loss(StepContext(model, net, job, 0, model.encode_prompts), batch).mean()))
        return float(np.mean(out))

    trained, base = loss(True), loss(False)
    print(f"denoising loss {base:.4f} -> {trained:.4f}")
    assert trained < 0.99 * base  # the tiny random model leaves little to learn: 1.2671 -> 1.2420 measured


MUSUBI = set((Path(__file__).parent / "data" / "zimage_keys" / "zimage_kohya.txt").read_text().split())


# LoKr's w1 rows must divide by 3 for musubi's split q/k/v (factor 6 on the tiny model; -1 on the real one)
@pytest.mark.parametrize("adapter", [{"network_algo": "lokr", "network_factor": 6, "save_format": "musubi"},
                                     {"network_dora": True}])
def test_adapters_train_on_the_fused_modules(zenv, tmp_path, adapter):
    """Saved under the native fused names by default; save_format = "musubi": musubi's own split names."""
    path = train(_job(zenv, tmp_path, "standard", max_train_steps=3, **adapter))
    assert set(by_module(load_file(str(path)))) == (MUSUBI if "save_format" in adapter else KOHYA_COMFY)
    model = load_model(zenv[1]["folder"], options={"zimage_variant": "turbo"})
    net = network_from_file(model, path, 1.0)
    assert np.abs(_image(model, [net], 1.0) - _image(model, [net], 0.0)).max() > 1e-4


def _assistant_file(path: Path) -> Path:
    """An ai-toolkit-style de-distill adapter: `diffusion_model.<diffusers path>` names, split q/k/v, no alpha."""
    g = torch.Generator().manual_seed(9)
    tensors = {}
    for i in range(30):
        for part in ("to_q", "to_k", "to_v", "to_out.0"):
            stem = f"diffusion_model.layers.{i}.attention.{part}"
            tensors[f"{stem}.lora_A.weight"] = torch.randn(2, 32, generator=g) * 0.3
            tensors[f"{stem}.lora_B.weight"] = torch.randn(32, 2, generator=g) * 0.3
    save_file(tensors, path)
    return path


def test_base_training_with_an_assistant_preset_applies_to_turbo(zenv, tmp_path):
    """The Turbo workflow: the assistant LoRA fused while training, left out of the previews; a LoRA trained on
    Base (same keys) loads on Turbo."""
    assistant = _assistant_file(tmp_path / "assistant.safetensors")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a face --w 32 --h 32 --s 2 --d 1\n")
    job = _job(zenv, tmp_path, "standard", zimage_variant="base", max_train_steps=2, sample_every_n_steps=2,
               sample_prompts=str(prompts), sample_without_presets=True,
               preset_loras=[{"path": str(assistant), "multiplier": 1.0}])
    path = train(job)
    md = read_metadata_only(path)
    assert md["ss_zimage_variant"] == "base" and "assistant.safetensors" in md["difflora_preset_loras"]
    samples = sorted((tmp_path / "sample").glob("*.png"))
    assert samples, "previews were written"
    turbo = load_model(zenv[1]["folder"], options={"zimage_variant": "turbo"})
    net = network_from_file(turbo, path, 1.0)
    assert np.abs(_image(turbo, [net], 1.0) - _image(turbo, [net], 0.0)).max() > 1e-4
    # the preview is the trained LoRA alone: what the base model with it (no assistant) makes
    from PIL import Image

    base = load_model(zenv[1]["folder"], options={"zimage_variant": "base"})
    preview = np.asarray(Image.open(samples[-1]).convert("RGB"), dtype=np.float32) / 255
    from difflora.generate import GenerationRequest, generate

    net2 = network_from_file(base, path, 1.0)
    alone = generate(base, [net2], GenerationRequest(["a face"], [1], steps=2, width=32, height=32),
                     output="float")[0]
    assert np.abs(preview - alone).max() <= 1 / 255 + 1e-6


def test_per_pair_average_on_zimage(zenv, tmp_path):
    path = train(_job(zenv, tmp_path, "addift", per_pair_average=True, max_train_steps=2, output_name="avg"))
    assert set(by_module(load_file(str(path)))) == KOHYA_COMFY


def test_low_vram_settings_give_the_same_lora(zenv, tmp_path):
    base = dict(max_train_steps=2, network_train_unet_only=True)
    plain = load_file(str(train(_job(zenv, tmp_path / "a", "standard", **base))))
    swapped = load_file(str(train(_job(zenv, tmp_path / "b", "standard", blocks_to_swap=4,
                                       gradient_checkpointing=True, **base))))
    cached = load_file(str(train(_job(zenv, tmp_path / "c", "standard", cache_text_encoder_outputs=True, **base))))
    for other in (swapped, cached):
        assert all(torch.allclose(plain[k], other[k], atol=1e-6) for k in plain)
    fp8 = load_file(str(train(_job(zenv, tmp_path / "d", "standard", fp8_base=True, **base))))
    assert set(fp8) == set(plain) and all(torch.isfinite(v.float()).all() for v in fp8.values())


def test_family_keys_are_refused_where_they_do_not_apply(zenv, tmp_path, tiny_sd1_dir):
    with pytest.raises(UserError, match="guidance_scale is FLUX.1-dev's"):
        train(_job(zenv, tmp_path / "a", "standard", guidance_scale=2.0))
    job = JobConfig.model_validate({"model": str(tiny_sd1_dir), "zimage_variant": "base", "method": "standard",
                                    "output_dir": str(tmp_path / "b"), "max_train_steps": 1, "resolution": 32,
                                    "datasets": [{"subsets": [{"image_dir": str(zenv[0] / "pairs")}]}]})
    with pytest.raises(UserError, match="zimage_variant applies to Z-Image"):
        train(job)
    assert not list((tmp_path / "b").glob("*.safetensors"))
