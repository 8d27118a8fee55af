"""Training on a tiny FLUX.1-layout model: every method lowers its loss and changes the output; resume,
two processes, block swap, cached text encoder outputs, diffusers-format files."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import _write_pairs
from difflora.config import JobConfig, apply_method_defaults
from difflora.errors import UserError
from difflora.methods.base import Batch, StepContext
from difflora.models import load_model
from difflora.models.registry import family_options_of
from difflora.network.apply import network_from_file
from difflora.network.files import read_metadata_only
from difflora.train.loop import train

FLOW = {"timestep_sampling": "shift", "model_prediction_type": "raw", "guidance_scale": 1.0}


def _job_model(job):
    """The model as training loads it: with the job's FLUX keys and precision."""
    return load_model(job.model, options=family_options_of(job), mixed_precision=job.mixed_precision)


@pytest.fixture(scope="module")
def flux_env(tmp_path_factory):
    from difflora.toy.tiny_flux import build_tiny_flux

    root = tmp_path_factory.mktemp("flux_train")
    build_tiny_flux("dev", 1, 1).save(root / "model")
    _write_pairs(root / "pairs", 4, 32)
    return root


def _job(root: Path, out: Path, method: str, **extra):
    job = {"model": str(root / "model"), "method": method, "resolution": 32, "train_batch_size": 2,
           "max_train_steps": 30, "learning_rate": 1e-2, "output_dir": str(out), "output_name": method,
           "log_with": "none", "seed": 5, "datasets": [{"subsets": [{"image_dir": str(root / "pairs"), "caption_extension": ".txt"}]}], **FLOW}
    job.update(extra)
    return apply_method_defaults(JobConfig.model_validate(job))


def _latents(model, root: Path):
    from difflora.data.images import load_image, to_tensor

    befores = sorted(p for p in (root / "pairs").glob("*.png") if not p.stem.endswith("_after"))
    enc = lambda p: model.encode_images(to_tensor(load_image(p))[None], sample=False)  # noqa: E731
    x = torch.cat([enc(p) for p in befores])
    after = torch.cat([enc(p.with_name(p.stem + "_after.png")) for p in befores])
    caps = [p.with_suffix(".txt").read_text() for p in befores]
    caps_after = [p.with_name(p.stem + "_after.txt").read_text() for p in befores]
    return x, after, caps, caps_after


def _fixed_loss(model, networks, loss_fn, job, data, multipliers, steps=(0, 1), sigmas=(0.1, 0.9)) -> float:
    """The method's own loss on fixed draws (8 σ in `sigmas`), with each network at its multiplier."""
    x, after, caps, caps_after = data
    losses = []
    with torch.no_grad():
        for net, m in zip(networks, multipliers):
            net.set_multiplier(m)
        for k, sigma in enumerate(np.linspace(*sigmas, 8)):
            g = torch.Generator().manual_seed(k)
            batch = Batch({"x": x, "after": after}, {"x": caps, "after": caps_after}, torch.randn(x.shape, generator=g),
                          torch.full((x.shape[0],), float(sigma) * 1000), torch.ones(x.shape[0]), step=steps[k % len(steps)])
            ctx = StepContext(model, networks[-1], job, batch.step, model.encode_prompts)
            if multipliers[-1] == 0.0:  # the losses set the trained network's multiplier themselves: detach it
                networks[-1].remove()
            losses.append(float(loss_fn(ctx, batch).mean()))
            networks[-1].apply_to()
    return float(np.mean(losses))


def _image(model, networks, m):
    from difflora.generate import GenerationRequest, generate

    req = GenerationRequest(prompts=["a face, red hair"], seeds=[3], steps=3, width=32, height=32)
    req.multipliers = {len(networks) - 1: [m]}
    return generate(model, networks, req, output="float")[0]


METHOD_CASES = {
    "standard": {},
    "addift": {"max_train_steps": 60, "learning_rate": 3e-3},  # ADDifT's own lr
    "slider": {},
    "copier": {"copier": {"stage1_steps": 30, "stage2_steps": 30, "stage1_learning_rate": 1e-2,
                          "stage2_learning_rate": 1e-2, "save_copier": True}},
    "differential": {"differential": {"before_steps": 30, "after_steps": 30, "learning_rate": 1e-2, "save_parts": True}},
}


@pytest.mark.parametrize("method", [m if m in ("standard", "addift") else pytest.param(m, marks=pytest.mark.slow)
                                    for m in METHOD_CASES])
def test_each_method_on_flux_lowers_its_loss_and_changes_the_output(flux_env, tmp_path, method):
    from difflora.methods.addift import addift_loss
    from difflora.methods.slider import slider_loss
    from difflora.methods.standard import denoising_loss

    job = _job(flux_env, tmp_path, method, **METHOD_CASES[method])
    path = train(job)
    model = _job_model(job)
    data = _latents(model, flux_env)
    out = tmp_path
    if method == "copier":  # stage 2 trains B on "after" on top of A: B must lower that loss
        a = network_from_file(model, out / "copier-copier.safetensors", 1.0)
        b = network_from_file(model, path, 1.0)
        loss = lambda ctx, batch: denoising_loss(ctx, batch, image="after")  # noqa: E731
        with_b, without_b = (_fixed_loss(model, [a, b], loss, job, data, [1.0, m]) for m in (1.0, 0.0))
        networks = [a, b]
    elif method == "differential":  # A overfits "before", B "after"; the result is B - A
        parts = {}
        for part, image in (("before", "x"), ("after", "after")):
            net = network_from_file(model, out / f"differential-{part}.safetensors", 1.0)
            loss = lambda ctx, batch, image=image: denoising_loss(ctx, batch, image=image)  # noqa: E731
            parts[part] = (_fixed_loss(model, [net], loss, job, data, [1.0]), _fixed_loss(model, [net], loss, job, data, [0.0]))
            net.remove()
        with_b, without_b = parts["after"]
        assert parts["before"][0] < parts["before"][1], parts
        networks = [network_from_file(model, path, 1.0)]
    else:
        net = network_from_file(model, path, 1.0)
        loss, m = {"standard": (denoising_loss, 1.0), "slider": (slider_loss, 1.0),
                   "addift": (addift_loss, job.addift.multiplier)}[method]
        window = (0.5, 0.95) if method == "addift" else (0.1, 0.9)  # ADDifT trains σ in [0.5, 1)
        with_b, without_b = (_fixed_loss(model, [net], loss, job, data, [mm], sigmas=window) for mm in (m, 0.0))
        networks = [net]
    # The tiny random model leaves ADDifT little to learn (its pairs differ by ~0.04 in latent units, under
    # σ ≥ 0.5 noise): a 1% drop is what it can show; the ground-truth methods drop more.
    assert with_b < (0.99 if method == "addift" else 0.98) * without_b, (method, with_b, without_b)
    changed = np.abs(_image(model, networks, 1.0) - _image(model, networks, 0.0)).max()
    assert changed > 1e-3, method
    md = read_metadata_only(path)
    assert md["ss_base_model_version"] == "flux1" and md["modelspec.architecture"] == "flux-1-dev/lora"
    assert md["ss_timestep_sampling"] == "shift" and md["ss_model_prediction_type"] == "raw"


def test_per_pair_average_and_presets_on_flux(flux_env, tmp_path):
    job = _job(flux_env, tmp_path, "addift", per_pair_average=True, max_train_steps=6, output_name="avg")
    avg = train(job)
    job2 = _job(flux_env, tmp_path, "standard", max_train_steps=6, output_name="with_preset",
                preset_loras=[{"path": str(avg), "multiplier": 0.5}])
    out = train(job2)
    model = _job_model(job2)
    a = network_from_file(model, avg, 1.0)
    assert np.abs(_image(model, [a], 1.0) - _image(model, [a], 0.0)).max() > 1e-4
    assert len(load_file(str(out))) == 3 * (13 + 12)  # 1 double + 1 single block (10 + 3), CLIP 2 layers x 6


def test_resume_equals_uninterrupted_run(flux_env, tmp_path):
    job = _job(flux_env, tmp_path, "addift", max_train_steps=8, save_state_every_n_steps=5, output_name="r")
    full = load_file(str(train(job)))
    shutil.copytree(tmp_path / "r-state", tmp_path / "state5")
    from difflora.statefile import load_state

    assert load_state(tmp_path / "state5")["step"] == 5  # resumed from the middle, not from the end
    (tmp_path / "r.safetensors").unlink()
    resumed = load_file(str(train(job, resume=str(tmp_path / "state5"))))
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_block_swap_and_cached_text_encoders_give_the_same_lora(flux_env, tmp_path):
    base = dict(max_train_steps=4, network_train_unet_only=True)
    plain = load_file(str(train(_job(flux_env, tmp_path / "a", "standard", **base))))
    swapped = load_file(str(train(_job(flux_env, tmp_path / "b", "standard", blocks_to_swap=1,
                                       cpu_offload_checkpointing=True, **base))))
    cached = load_file(str(train(_job(flux_env, tmp_path / "c", "standard", cache_text_encoder_outputs_to_disk=True,
                                      **base))))
    assert (tmp_path / "c" / "te_cache").exists()  # the shared prompt cache (models of every family)
    for other in (swapped, cached):
        assert all(torch.allclose(plain[k], other[k], atol=1e-6) for k in plain)
    from pydantic import ValidationError

    with pytest.raises((UserError, ValidationError), match="network_train_unet_only"):  # refused with the job
        train(_job(flux_env, tmp_path / "d", "standard", cache_text_encoder_outputs=True, max_train_steps=2))


def test_cached_text_encoder_outputs_free_t5_and_clip(flux_env, tmp_path, monkeypatch):
    """cache_text_encoder_outputs drops T5-XXL and CLIP-L (not just off the GPU): nothing in the run keeps them
    (weak references die, a preset's CLIP part included), training and sampling read the cached prompts, and
    the LoRA equals the uncached run's."""
    import gc
    import weakref

    import difflora.train.run as run_module
    from difflora.network.files import save_lora

    model = load_model(flux_env / "model")
    preset = _clip_preset(model)  # a preset with CLIP-L modules: fused before the prompts are encoded
    save_lora(preset.kohya_state_dict(), tmp_path / "preset.safetensors", model.lora_metadata())
    del model, preset
    refs = {}

    def load_and_watch(*args, **kwargs):
        m = real_load(*args, **kwargs)
        refs.update(t5=weakref.ref(m.text_encoders["t5xxl"]), clip=weakref.ref(m.text_encoders["clip_l"]),
                    t5_layer=weakref.ref(m.text_encoders["t5xxl"].encoder.block[0].layer[0].SelfAttention.q),
                    clip_layer=weakref.ref(next(mod for n, mod in m.text_encoders["clip_l"].named_modules()
                                                   if n.endswith("layers.0.self_attn.q_proj"))))
        return m

    real_load = run_module.load_model
    monkeypatch.setattr(run_module, "load_model", load_and_watch)
    alive_during_training = []

    def watch(event):
        if event.to_dict()["type"] == "step":
            gc.collect()
            alive_during_training.append(sorted(k for k, r in refs.items() if r() is not None))

    (tmp_path / "prompts.txt").write_text("a face, red hair --w 32 --h 32 --s 2\n", encoding="utf-8")
    base = dict(max_train_steps=4, network_train_unet_only=True, sample_every_n_steps=2,
                sample_prompts=str(tmp_path / "prompts.txt"),
                preset_loras=[{"path": str(tmp_path / "preset.safetensors"), "multiplier": 0.5}])
    cached = load_file(str(train(_job(flux_env, tmp_path / "c", "addift", cache_text_encoder_outputs=True, **base),
                                 listeners=[watch])))
    assert alive_during_training and all(a == [] for a in alive_during_training), alive_during_training
    assert len(list((tmp_path / "c" / "sample").glob("*.png"))) >= 2  # sampled from the cached prompt
    refs.clear()
    plain = load_file(str(train(_job(flux_env, tmp_path / "p", "addift", **base))))
    assert max((plain[k] - cached[k]).abs().max().item() for k in plain) < 1e-6


def _clip_preset(model):
    from difflora.network.lora import LoRANetwork, NetworkSpec

    net = LoRANetwork.create([t for t in model.lora_targets() if t.name.startswith("lora_te1_")],
                             NetworkSpec(network_dim=2, network_alpha=2))
    torch.manual_seed(3)
    with torch.no_grad():
        for lora in net.loras():
            lora.lora_up.weight.normal_(0, 0.3)
    return net


def test_cached_prompts_refuse_what_was_not_encoded(flux_env, tmp_path):
    model = load_model(flux_env / "model")
    table = {"a face": model.encode_prompts(["a face"])}
    model.drop_text_encoders(table)
    assert torch.equal(model.encode_prompts(["a face"]).tensors["t5"], table["a face"].tensors["t5"])
    with pytest.raises(UserError, match="'a face, red hair' was not encoded before T5-XXL and CLIP-L were freed"):
        model.encode_prompts(["a face, red hair"])
    # captions that change at every step have no fixed set to encode: refused before anything is written
    job = _job(flux_env, tmp_path / "out", "standard", cache_text_encoder_outputs=True, network_train_unet_only=True,
               max_train_steps=2, shuffle_caption=True)
    with pytest.raises(UserError, match="shuffle_caption .* cannot be used with it") as e:
        train(job)
    assert "pairs" in str(e.value)  # names the caption's image
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.safetensors"))


def test_diffusers_save_format_writes_transformer_peft_keys_that_load_back(flux_env, tmp_path):
    job = _job(flux_env, tmp_path, "addift", max_train_steps=4, save_format="diffusers", output_name="d")
    path = train(job)
    keys = list(load_file(str(path)))
    assert keys and all(k.startswith("transformer.") and (".lora_A." in k or ".lora_B." in k) for k in keys)
    model = _job_model(job)
    net = network_from_file(model, path, 1.0)
    assert np.abs(_image(model, [net], 1.0) - _image(model, [net], 0.0)).max() > 0


def test_dora_for_diffusers_trains_the_output_axis_magnitude_and_writes_peft_s_vector(flux_env, tmp_path, caplog):
    job = _job(flux_env, tmp_path, "standard", max_train_steps=2, save_format="diffusers", output_name="d",
               network_dora=True)
    with caplog.at_level("WARNING"):
        path = train(job)
    assert sum("magnitude is trained per output row" in r.getMessage() for r in caplog.records) == 1
    tensors = load_file(str(path))
    magnitudes = {k: v for k, v in tensors.items() if ".lora_magnitude_vector" in k}
    assert magnitudes and all(v.dim() == 1 and v.shape[0] == tensors[k.split(".lora_magnitude_vector")[0] +
                                                                         ".lora_B.weight"].shape[0]
                              for k, v in magnitudes.items())
    net = network_from_file(_job_model(job), path, 1.0)
    assert all(lora.dora_scale.shape[1] == 1 for lora in net.loras())  # (O, 1): the output axis


@pytest.mark.parametrize("extra,problem", [
    ({"train_t5xxl": True}, "diffusers' FluxPipeline loads no T5 LoRA"),
    ({"network_algo": "lokr"}, 'save_format = "diffusers" with LoKr'),
])
def test_diffusers_save_format_refuses_before_training_what_diffusers_cannot_load(flux_env, tmp_path, extra, problem):
    job = _job(flux_env, tmp_path, "standard", max_train_steps=2, save_format="diffusers", output_name="d", **extra)
    with pytest.raises(UserError, match=re.escape(problem)):
        train(job)
    assert not any(tmp_path.rglob("*.safetensors"))


def test_flux_keys_on_an_sd_model_are_refused(tiny_sd1_dir, faces16, tmp_path):
    job = apply_method_defaults(JobConfig.model_validate({
        "model": str(tiny_sd1_dir), "train_data_dir": str(faces16), "resolution": 16, "max_train_steps": 2,
        "output_dir": str(tmp_path), "log_with": "none", "timestep_sampling": "shift"}))
    with pytest.raises(UserError, match=r"timestep_sampling applies to ([^;]+ / )?FLUX\.1( / [^;]+)? models only; this model is Stable Diffusion"):
        train(job)
    assert not any(tmp_path.iterdir())


def test_cached_prompts_are_encoded_and_freed_before_the_transformer_moves(flux_env, tmp_path, monkeypatch):
    """kohya's order for FLUX's low-VRAM run: T5-XXL and CLIP-L alone on the device encode every prompt of the
    run and are freed before the transformer moves there (never both on a 24 GB card); the LoRA equals the
    uncached run's."""
    from conftest import check_encoded_first, watch_placement

    base = dict(max_train_steps=4, network_train_unet_only=True)
    plain = load_file(str(train(_job(flux_env, tmp_path / "a", "standard", **base))))
    events = watch_placement(monkeypatch)
    cached = load_file(str(train(_job(flux_env, tmp_path / "c", "standard", cache_text_encoder_outputs=True, **base))))
    captions = {p.read_text(encoding="utf-8").strip() for p in (flux_env / "pairs").glob("*.txt")}
    moved = check_encoded_first(events, captions)
    drops = [i for i, (kind, _) in enumerate(events) if kind == "drop"]
    assert len(drops) == 1 and drops[0] < moved, events
    assert all(torch.allclose(plain[k], cached[k], atol=1e-6) for k in plain)


def test_block_swap_placement_leaves_the_swapped_blocks_on_the_cpu(flux_env):
    """Moving a block-swapped transformer to the device (after the prompts are encoded) moves every part but the
    swapped blocks: they stay on the CPU and come in only for their own forward."""
    from difflora.models.low_vram import enable_block_swap

    model = load_model(flux_env / "model")
    enable_block_swap(model.transformer, 1, torch.device("meta"))
    swapped = model.transformer.blocks()[-1]
    model.to("meta", text_encoders=False)
    assert all(p.device.type == "cpu" for p in swapped.parameters())
    rest = [p for b in model.transformer.blocks()[:-1] for p in b.parameters()]
    assert rest and all(p.device.type == "meta" for p in rest)
    assert all(p.device.type == "meta" for p in model.vae.parameters())
    assert all(p.device.type == "cpu" for te in model.text_encoders.values() for p in te.parameters())
