"""FLUX.1: architecture, layouts, kohya names, LoRA conversions, flow matching, low-VRAM storage, bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from difflora.errors import UserError
from difflora.models.flux.model import FluxOptions, image_ids, pack_latents, unpack_latents
from difflora.models.flux.files import build_flux_on_meta, load_flux, save_component_files
from difflora.models.flux.convert import (bfl_to_diffusers, diffusers_config_from_params, diffusers_to_bfl,
                                          params_from_diffusers_config)
from difflora.models.flux.transformer import FluxTransformer
from difflora.network.lora import LoRANetwork, NetworkSpec

KEYS = Path(__file__).parent / "data" / "kohya_keys"  # kohya sd-scripts' module names, one per line


@pytest.fixture(scope="module")
def tiny_flux():
    from difflora.toy.tiny_flux import build_tiny_flux

    return build_tiny_flux("dev", depth=2, depth_single=2)


@pytest.fixture(scope="module")
def flux_files(tiny_flux, tmp_path_factory):
    """The tiny model as a diffusers folder and as BFL transformer + clip_l / t5xxl / ae files."""
    d = tmp_path_factory.mktemp("flux")
    tiny_flux.save(d / "folder")
    tiny_flux.save(d / "flux1-tiny.safetensors")
    files = save_component_files(tiny_flux, d / "components")
    return {"folder": d / "folder", "bfl": d / "flux1-tiny.safetensors", **{k: str(v) for k, v in files.items()}}


def _inputs(model, n=2, hw=4):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, model.vae.config.latent_channels, hw, hw, generator=g)
    t = torch.tensor([250.0, 800.0])[:n]
    return x, t, model.encode_prompts(["a face, red hair", "brown hair, smiling"][:n])


def _random_lora(model, spec: NetworkSpec, seed=1) -> LoRANetwork:
    net = LoRANetwork.create(model.lora_targets(), spec)
    torch.manual_seed(seed)
    with torch.no_grad():
        for lora in net.loras():
            lora.lora_up.weight.normal_(0, 0.2)
    return net


def test_transformer_equals_diffusers_and_keys_convert_both_ways():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    ref = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=16,
                                 num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=24,
                                 axes_dims_rope=[4, 4, 8], guidance_embeds=True)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.3)
    params = params_from_diffusers_config(dict(ref.config))
    ours = FluxTransformer(params)
    bfl = diffusers_to_bfl(ref.state_dict(), params)
    ours.load_state_dict(bfl, strict=True)
    back = bfl_to_diffusers(bfl, params)
    assert set(back) == set(ref.state_dict())
    assert all(torch.equal(back[k], v) for k, v in ref.state_dict().items())
    img, txt, y = torch.randn(2, 12, 4), torch.randn(2, 5, 32), torch.randn(2, 24)
    ids = image_ids(1, 6, 8)[0]
    t, g = torch.tensor([0.3, 0.8]), torch.tensor([3.5, 1.0])
    with torch.no_grad():
        expected = ref(img, txt, y, t, ids, torch.zeros(5, 3), g).sample
        got = ours(img, ids.expand(2, -1, -1), txt, torch.zeros(2, 5, 3), t, y, g)
    assert expected.abs().mean() > 1.0
    assert (got - expected).abs().max() < 1e-5


def _names(options: FluxOptions, component: str) -> list[str]:
    model = build_flux_on_meta("dev", options)
    return sorted(t.name for t in model.lora_targets() if t.component == component)


def _listed(name: str) -> list[str]:
    return sorted((KEYS / name).read_text(encoding="utf-8").split())


def test_kohya_names_of_real_flux1_dev_equal_sd_scripts_lists():
    assert _names(FluxOptions(), "unet") == _listed("flux_unet.txt")
    assert _names(FluxOptions(train_blocks="double"), "unet") == _listed("flux_unet_double.txt")
    assert _names(FluxOptions(train_blocks="single"), "unet") == _listed("flux_unet_single.txt")
    assert _names(FluxOptions(lora_embedders=True), "unet") == _listed("flux_unet_indims.txt")
    assert _names(FluxOptions(), "clip_l") == _listed("flux_te1.txt")
    assert _names(FluxOptions(), "t5xxl") == []
    assert _names(FluxOptions(train_t5xxl=True), "t5xxl") == _listed("flux_te3.txt")


def test_bfl_files_and_diffusers_folder_load_the_same_weights(tiny_flux, flux_files):
    folder = load_flux(flux_files["folder"])
    single = load_flux(flux_files["bfl"], clip_l=flux_files["clip_l"], t5xxl=flux_files["t5xxl"], ae=flux_files["ae"])
    ref = tiny_flux.transformer.state_dict()
    for m in (folder, single):
        sd = m.transformer.state_dict()
        assert set(sd) == set(ref) and all(torch.equal(sd[k], ref[k]) for k in ref)
        for name in ("clip_l", "t5xxl"):
            a, b = m.text_encoders[name].state_dict(), tiny_flux.text_encoders[name].state_dict()
            assert all(torch.equal(a[k], b[k]) for k in b)
        assert all(torch.equal(v, tiny_flux.vae.state_dict()[k]) for k, v in m.vae.state_dict().items())
    x, t, cond = _inputs(tiny_flux)
    with torch.no_grad():
        expected = tiny_flux.predict(x, t, cond)
        for m in (folder, single):
            c2 = m.encode_prompts(["a face, red hair", "brown hair, smiling"])
            assert all(torch.equal(c2.tensors[k], cond.tensors[k]) for k in cond.tensors)
            assert torch.equal(m.predict(x, t, c2), expected)
    # and back: the folder written from the single-file model equals the original folder's transformer
    from safetensors.torch import load_file

    again = flux_files["bfl"].parent / "again"
    single.save(again)
    a = load_file(str(again / "transformer" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(flux_files["folder"] / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in b)
    # and the BFL file written from the folder-loaded model equals the original BFL file
    folder.save(flux_files["bfl"].parent / "again.safetensors")
    a = load_file(str(flux_files["bfl"].parent / "again.safetensors"))
    b = load_file(str(flux_files["bfl"]))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in b)


def test_bfl_prefixed_and_fp16_files_load(tiny_flux, flux_files, tmp_path):
    from safetensors.torch import load_file, save_file

    sd = load_file(str(flux_files["bfl"]))
    save_file({"model.diffusion_model." + k: v.half() for k, v in sd.items()}, str(tmp_path / "f16.safetensors"),
              metadata={"difflora.flux_params": json.dumps(tiny_flux.transformer.params.to_dict())})
    m = load_flux(tmp_path / "f16.safetensors", clip_l=flux_files["clip_l"], t5xxl=flux_files["t5xxl"], ae=flux_files["ae"])
    ref = tiny_flux.transformer.state_dict()
    assert all(torch.equal(v, ref[k].half().float()) for k, v in m.transformer.state_dict().items())


# Modules diffusers 0.42.1's kohya-FLUX converter (lora_conversion_utils._convert_kohya_flux_lora_to_diffusers)
# handles, and the ones a pipeline's load_lora_weights ends up without (checked below):
# - every double-block module (10 per block), single-block linear2 and modulation_lin at any width;
# - single-block linear1 only at FLUX.1's widths: it is split with hard-coded sizes [3072, 3072, 3072, 12288]
#   (`assert sum(dims) == up.shape[0]` fails on any other width), hence the FLUX.1-width test below;
# - the embedders (img_in, txt_in, time_in, vector_in, guidance_in: the 8 extra modules of kohya's in_dims) are
#   converted to keys WITHOUT the `transformer.` prefix, so load_lora_weights / load_lora_adapter(prefix=
#   "transformer") drop them silently; their mapping is right (equal output once the prefix is added);
# - CLIP-L (lora_te1_) goes to `text_encoder.` keys (the same pooled embedding once loaded); T5-XXL (lora_te3_) is left over, logged as "Unsupported
#   keys for ai-toolkit" and dropped.


def _diffusers_twin(tr):
    from diffusers import FluxTransformer2DModel

    cfg = diffusers_config_from_params(tr.params)
    cfg.pop("_class_name")
    ref = FluxTransformer2DModel(**cfg)
    ref.load_state_dict(bfl_to_diffusers(tr.state_dict(), tr.params))
    return ref


def _both_outputs(tr, ref, net, txt, y, b=2, h=4, w=4):
    """(difflora's output with the LoRA, diffusers' output, difflora's output without the LoRA), packed."""
    g = torch.Generator().manual_seed(0)
    img = torch.randn(b, (h // 2) * (w // 2), tr.params.in_channels, generator=g)
    t, gd = torch.tensor([0.25, 0.8])[:b], torch.full((b,), 3.5)
    with torch.no_grad():
        ours = tr(img, image_ids(b, h, w), txt, torch.zeros(b, txt.shape[1], 3), t, y, gd)
        theirs = ref(img, txt, y, t, image_ids(1, h, w)[0], torch.zeros(txt.shape[1], 3), gd).sample
        net.set_multiplier(0.0)
        base = tr(img, image_ids(b, h, w), txt, torch.zeros(b, txt.shape[1], 3), t, y, gd)
        net.set_multiplier(1.0)
    return ours, theirs, base


def test_diffusers_kohya_flux_converter_gives_the_same_output(tiny_flux):
    """A kohya FLUX LoRA (every module difflora can write: blocks, embedders, CLIP-L, T5) through diffusers'
    own converter: the block modules reproduce difflora's transformer output and CLIP-L its pooled embedding
    (< 1e-4 fp32); what it drops is listed above and pinned here. Single-block linear1 is covered at FLUX.1's width in the next test."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    tr = tiny_flux.transformer
    opts = tiny_flux.options
    tiny_flux.options = FluxOptions(lora_embedders=True, in_dims=[2] * 5, train_t5xxl=True)
    try:
        net = _random_lora(tiny_flux, NetworkSpec(network_dim=4, network_alpha=2))
    finally:
        tiny_flux.options = opts
    sd = net.kohya_state_dict()
    names = {k.split(".")[0] for k in sd}
    with pytest.raises(AssertionError):  # linear1's split sizes are FLUX.1's, hard-coded
        _convert_kohya_flux_lora_to_diffusers({k: v for k, v in sd.items() if "linear1" in k})
    kept = {k: v for k, v in sd.items() if "linear1" not in k}
    converted = _convert_kohya_flux_lora_to_diffusers(dict(kept))
    te3 = sum(n.startswith("lora_te3_") for n in names)
    assert te3 == 2 * 7 and not any("t5" in k or "encoder.block" in k for k in converted)  # T5 dropped
    te1 = [k for k in converted if k.startswith("text_encoder.")]
    assert len(te1) == 2 * 2 * 6  # CLIP-L: 2 layers x 6 modules, A and B
    embedders = [k for k in converted if not k.startswith(("transformer.", "text_encoder."))]
    assert len(embedders) == 2 * 8  # converted, but without the `transformer.` prefix: the pipeline drops them
    blocks = [k for k in converted if k.startswith("transformer.")]
    assert len(blocks) == 2 * (2 * 14 + 2 * 2)  # 2 double blocks x 14 split modules, 2 single x 2
    ref = _diffusers_twin(tr)
    ref.load_lora_adapter({k: converted[k] for k in blocks + embedders}, prefix="transformer", adapter_name="kohya")
    assert not any("lora" in n for n, _ in ref.x_embedder.named_modules())  # the embedders were not loaded
    # CLIP-L through diffusers' text-encoder loader: the same pooled embedding as difflora's LoRA on CLIP-L
    import copy

    from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin

    clip = tiny_flux.text_encoders["clip_l"]
    their_clip = copy.deepcopy(clip)
    FluxLoraLoaderMixin.load_lora_into_text_encoder({k: converted[k] for k in te1}, None, their_clip,
                                                    prefix="text_encoder", adapter_name="kohya")
    ids = tiny_flux.clip_tokenizer(["a face, red hair"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    net.apply_to()
    try:
        with torch.no_grad():
            ours_pooled, theirs_pooled = clip(ids).pooler_output, their_clip(ids).pooler_output
            net.set_multiplier(0.0)
            base_pooled = clip(ids).pooler_output
    finally:
        net.set_multiplier(1.0)
        net.remove()
    assert (ours_pooled - base_pooled).abs().max() > 1e-2
    assert (ours_pooled - theirs_pooled).abs().max() < 1e-4
    with torch.no_grad():  # difflora with the modules diffusers loaded: no linear1, embedders or encoders
        for lora in net.loras():
            if "_blocks_" not in lora.lora_name or "linear1" in lora.lora_name:
                lora.lora_up.weight.zero_()
    net.apply_to()
    try:
        x, t, cond = _inputs(tiny_flux)
        ours, theirs, base = _both_outputs(tr, ref, net, cond.tensors["t5"], cond.tensors["pooled"])
        assert (ours - base).abs().max() > 1e-2
        assert (theirs - ours).abs().max() < 1e-4
    finally:
        net.remove()


def test_dora_saved_for_diffusers_loads_whole_in_the_flux_pipeline(tiny_flux, flux_files, tmp_path):
    """DoRA with save_format = "diffusers": the output-axis magnitude travels as peft's lora_magnitude_vector (split
    with q/k/v and linear1's pieces); FluxPipeline.load_lora_weights gives difflora's transformer output with the
    same file (< 1e-4), and the file reads back to the network that wrote it."""
    from diffusers import FluxPipeline
    from safetensors.torch import load_file

    from difflora.network.adapters import adapter_options
    from difflora.network.apply import network_from_file
    from difflora.network.files import save_lora

    net = LoRANetwork.create(tiny_flux.lora_targets(), NetworkSpec(
        network_dim=2, network_alpha=1.0, adapter=adapter_options("lora", dora_wd=True, dora_on_output=True)))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    path = tmp_path / "dora_diffusers.safetensors"
    save_lora(tiny_flux.export_lora(net.state_dict(), "diffusers"), path)
    written = load_file(str(path))
    magnitudes = [k for k in written if ".lora_magnitude_vector" in k]
    assert magnitudes and len(magnitudes) * 2 == sum(".lora_A." in k or ".lora_B." in k for k in written)
    pipe = FluxPipeline.from_pretrained(flux_files["folder"], local_files_only=True)
    pipe.load_lora_weights(str(path))
    assert all(m.lora_magnitude_vector for m in pipe.transformer.modules() if hasattr(m, "lora_A") and m.lora_A)
    loaded = network_from_file(tiny_flux, path, 1.0)
    try:
        state = loaded.state_dict()
        for k, v in net.state_dict().items():  # same ΔW and magnitudes back (the pieces fused again)
            if k.endswith(".dora_scale"):
                torch.testing.assert_close(state[k], v)
        x, t, cond = _inputs(tiny_flux)
        ours, theirs, base = _both_outputs(tiny_flux.transformer, pipe.transformer, loaded, cond.tensors["t5"],
                                           cond.tensors["pooled"])
        ids = tiny_flux.clip_tokenizer(["a face, red hair"], padding="max_length", max_length=77,
                                       return_tensors="pt").input_ids
        with torch.no_grad():  # CLIP-L's modules too (pooled output)
            ours_pooled, theirs_pooled = tiny_flux.text_encoders["clip_l"](ids).pooler_output, pipe.text_encoder(ids).pooler_output
    finally:
        loaded.remove()
    print("max |difflora - FluxPipeline| with the DoRA file:", float((ours - theirs).abs().max()),
          "; DoRA's effect", float((ours - base).abs().max()), "; CLIP-L pooled", float((ours_pooled - theirs_pooled).abs().max()))
    assert (ours - base).abs().max() > 1e-2
    assert (theirs - ours).abs().max() < 1e-4
    assert (theirs_pooled - ours_pooled).abs().max() < 1e-4


def test_diffusers_kohya_flux_converter_at_flux1_width_covers_linear1_and_embedders():
    """At FLUX.1's widths (hidden 3072, MLP 12288; one single block, no double block, small in/out sizes)
    diffusers' converter splits single-block linear1 into to_q/to_k/to_v/proj_mlp: its output equals
    difflora's (< 1e-4 fp32), embedders included once their keys get the `transformer.` prefix the
    converter leaves off."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    from difflora.models.flux.model import FluxModel
    from difflora.models.flux.transformer import FluxParams

    params = FluxParams(in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=32, depth=0,
                        depth_single_blocks=1)
    torch.manual_seed(0)
    tr = FluxTransformer(params)
    with torch.no_grad():
        for p in tr.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.02)
    model = FluxModel(tr, None, None, None, None, None, options=FluxOptions(lora_embedders=True, in_dims=[2] * 5))
    net = _random_lora(model, NetworkSpec(network_dim=4, network_alpha=2))
    assert len(net.names) == 3 + 8  # linear1, linear2, modulation_lin and the 8 embedder modules
    converted = _convert_kohya_flux_lora_to_diffusers(dict(net.kohya_state_dict()))
    single = "transformer.single_transformer_blocks.0."
    assert {k.rsplit(".", 2)[0] for k in converted if k.startswith(single)} == {
        single + m for m in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out", "norm.linear")}
    ref = _diffusers_twin(tr)
    ref.load_lora_adapter({(k if k.startswith("transformer.") else "transformer." + k): v for k, v in converted.items()},
                          prefix="transformer", adapter_name="kohya")
    net.apply_to()
    try:
        g = torch.Generator().manual_seed(1)
        ours, theirs, base = _both_outputs(tr, ref, net, torch.randn(2, 5, 32, generator=g), torch.randn(2, 32, generator=g))
        assert (ours - base).abs().max() > 1e-1
        assert (theirs - ours).abs().max() < 1e-4
    finally:
        net.remove()
    del ref, tr, model, net


def test_diffusers_format_round_trip_is_exact_and_loads(tiny_flux, tmp_path):
    from difflora.models.flux.lora import diffusers_to_kohya, kohya_to_diffusers
    from difflora.network.apply import network_from_file
    from difflora.network.files import save_lora

    tr = tiny_flux.transformer
    net = _random_lora(tiny_flux, NetworkSpec(network_dim=3, network_alpha=1.5))
    sd = net.kohya_state_dict()
    peft = kohya_to_diffusers(sd, tr.params)
    assert all(k.startswith(("transformer.", "text_encoder.")) for k in peft)
    assert "transformer.single_transformer_blocks.0.proj_mlp.lora_B.weight" in peft
    back = diffusers_to_kohya(peft, tr.params)
    for lora in net.loras():
        n = lora.lora_name
        rank = back[f"{n}.lora_down.weight"].shape[0]
        delta = back[f"{n}.lora_up.weight"] @ back[f"{n}.lora_down.weight"] * (float(back[f"{n}.alpha"]) / rank)
        assert (delta - lora.weight_delta()).abs().max() < 1e-6, n
    # A diffusers/ai-toolkit file loads through the normal path and gives the same output.
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in peft.items()}, str(tmp_path / "aitk.safetensors"))
    save_lora(sd, tmp_path / "kohya.safetensors", tiny_flux.lora_metadata())
    x, t, cond = _inputs(tiny_flux)
    outs = []
    for f in ("aitk", "kohya"):
        loaded = network_from_file(tiny_flux, tmp_path / f"{f}.safetensors")
        with torch.no_grad():
            outs.append(tiny_flux.predict(x, t, cond))
        loaded.remove()
    assert (outs[0] - outs[1]).abs().max() < 1e-5


def test_timestep_sampling_follows_kohya():
    from difflora.models.flow_matching import FlowMatchOptions, FluxFlowObjective

    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    sigma = FluxFlowObjective(FlowMatchOptions(timestep_sampling="sigma", discrete_flow_shift=3.0))
    allowed = sigma.scheduler_sigmas()
    assert allowed[0] == 1.0 and abs(float(allowed[-1]) - 3 * 0.001 / (1 + 2 * 0.001)) < 1e-7
    s = sigma.sample_sigmas(500, g(), (64, 64))
    assert all(bool((allowed - v).abs().min() < 1e-7) for v in s[:50])
    shift = FluxFlowObjective(FlowMatchOptions(timestep_sampling="shift", discrete_flow_shift=3.1582)).sample_sigmas(4000, g(), (64, 64))
    plain = FluxFlowObjective(FlowMatchOptions(timestep_sampling="sigmoid")).sample_sigmas(4000, g(), (64, 64))
    assert torch.allclose(shift, 3.1582 * plain / (1 + 2.1582 * plain))
    assert shift.mean() > plain.mean() + 0.1  # shift > 1 moves training towards noise
    fs_small = FluxFlowObjective(FlowMatchOptions(timestep_sampling="flux_shift")).sample_sigmas(4000, g(), (32, 32))
    fs_large = FluxFlowObjective(FlowMatchOptions(timestep_sampling="flux_shift")).sample_sigmas(4000, g(), (128, 128))
    assert fs_large.mean() > fs_small.mean()  # more tokens, more shift (μ 0.5 at 256 tokens, 1.15 at 4096)
    u = FluxFlowObjective(FlowMatchOptions(timestep_sampling="uniform")).sample_timesteps(4000, g())
    assert 0 <= float(u.min()) and float(u.max()) < 1000 and abs(float(u.mean()) - 500) < 20
    with pytest.raises(UserError):
        FluxFlowObjective(FlowMatchOptions(timestep_sampling="logit_normal"))


def test_model_prediction_types():
    from difflora.models.flow_matching import FlowMatchOptions, FluxFlowObjective

    out, noisy, t = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2), torch.tensor([250.0, 500.0])
    obj = lambda kind: FluxFlowObjective(FlowMatchOptions(model_prediction_type=kind))  # noqa: E731
    assert torch.equal(obj("raw").prediction(out, noisy, t), out)
    assert torch.equal(obj("additive").prediction(out, noisy, t), out + noisy)
    scaled = obj("sigma_scaled").prediction(out, noisy, t)
    assert torch.allclose(scaled[1], -0.5 * out[1] + noisy[1]) and torch.allclose(scaled[0], -0.25 * out[0] + noisy[0])


def test_packing_and_position_ids():
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).view(2, 3, 4, 6)
    p = pack_latents(x)
    assert p.shape == (2, 6, 12)
    assert torch.equal(p[0, 1], x[0, :, 0:2, 2:4].reshape(-1))  # patch (row 0, col 1), channel-major
    assert torch.equal(unpack_latents(p, 4, 6), x)
    ids = image_ids(1, 4, 6)
    assert ids[0, 4].tolist() == [0.0, 1.0, 1.0]


def test_t5_attention_mask_changes_output_only_when_applied(tiny_flux):
    x, t, cond = _inputs(tiny_flux)
    with torch.no_grad():
        plain = tiny_flux.predict(x, t, cond)
        tiny_flux.options.apply_t5_attn_mask = True
        try:
            masked = tiny_flux.predict(x, t, tiny_flux.encode_prompts(["a face, red hair", "brown hair, smiling"]))
        finally:
            tiny_flux.options.apply_t5_attn_mask = False
    assert (masked - plain).abs().max() > 1e-4
    assert tiny_flux.t5xxl_max_token_length == 512


def test_flow_sampler_generates_and_lora_changes_images(tiny_flux):
    img = tiny_flux.text_to_image(["a face"], [3], steps=4, width=32, height=32)
    assert img.shape == (1, 32, 32, 3) and 0 <= img.min() and img.max() <= 1
    again = tiny_flux.text_to_image(["a face"], [3], steps=4, width=32, height=32)
    assert (img == again).all()
    net = _random_lora(tiny_flux, NetworkSpec(network_dim=4, network_alpha=4, train_text_encoder=False)).apply_to()
    try:
        changed = tiny_flux.text_to_image(["a face"], [3], steps=4, width=32, height=32)
    finally:
        net.remove()
    assert abs(changed - img).max() > 1e-3


def test_fp8_base_within_tolerance_of_bf16(flux_files):
    """fp8_base (float8_e4m3fn storage, bf16 compute) stays within 0.08 of bf16 (relative to output magnitude)."""
    bf16 = load_flux(flux_files["folder"], dtype=torch.bfloat16)
    fp8 = load_flux(flux_files["folder"], dtype=torch.bfloat16, fp8_base=True)
    assert fp8.transformer.double_blocks[0].img_attn.qkv.weight.dtype == torch.float8_e4m3fn
    x, t, cond = _inputs(bf16)
    with torch.no_grad():
        a, b = bf16.predict(x, t, cond).float(), fp8.predict(x, t, cond).float()
    rel = (a - b).abs().mean() / a.abs().mean()
    assert 0 < rel < 0.08, rel


def _train_steps(model, steps=3, swap=0, checkpointing=False) -> dict[str, torch.Tensor]:
    from difflora.models.low_vram import enable_block_swap

    if checkpointing:
        model.enable_gradient_checkpointing()
    enable_block_swap(model.transformer, swap, model.device)
    net = LoRANetwork.create(model.lora_targets(), NetworkSpec(network_dim=4, network_alpha=4, train_text_encoder=False))
    torch.manual_seed(0)
    for lora in net.loras():
        torch.nn.init.normal_(lora.lora_down.weight, 0, 0.1)
    net.apply_to()
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    x0, _, cond = _inputs(model)
    g = torch.Generator().manual_seed(1)
    try:
        for _ in range(steps):
            noise = torch.randn(x0.shape, generator=g)
            t = model.objective.sample_timesteps(x0.shape[0], g, x0.shape[-2:])
            noisy = model.objective.add_noise(x0, noise, t)
            pred = model.objective.prediction(model.predict(noisy, t, cond), noisy, t)
            loss = torch.nn.functional.mse_loss(pred, model.objective.target(x0, noise, t))
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        net.remove()
        enable_block_swap(model.transformer, 0, model.device)
        model.transformer.gradient_checkpointing = False
    return net.kohya_state_dict()


def test_blocks_to_swap_and_checkpointing_give_the_same_lora(flux_files):
    plain = _train_steps(load_flux(flux_files["folder"]))
    swapped = _train_steps(load_flux(flux_files["folder"]), swap=2)
    ckpt = _train_steps(load_flux(flux_files["folder"]), checkpointing=True)
    assert any((v != 0).any() for k, v in plain.items() if "lora_up" in k)
    for other in (swapped, ckpt):
        assert all(torch.allclose(plain[k], other[k], atol=1e-6) for k in plain)


# ------------------------------------------------------------------ bad inputs
def test_single_file_without_components_names_the_missing_key(flux_files):
    with pytest.raises(UserError, match="`t5xxl`"):
        load_flux(flux_files["bfl"], clip_l=flux_files["clip_l"], ae=flux_files["ae"])
    with pytest.raises(UserError, match="`clip_l`"):
        load_flux(flux_files["bfl"], t5xxl=flux_files["t5xxl"], ae=flux_files["ae"])
    bare = load_flux(flux_files["bfl"])  # transformer only: enough for merge / extract / inspect
    assert len(bare.lora_targets(conv=True)) == 2 * 10 + 2 * 3 + 8
    with pytest.raises(UserError, match="`clip_l`, `t5xxl`, `ae`"):
        bare.check_complete()
    with pytest.raises(UserError, match="`ae`"):
        bare.encode_images(torch.zeros(1, 3, 16, 16))


def test_flux2_and_fill_layouts_say_what_is_supported(flux_files, tmp_path):
    from safetensors.torch import save_file

    save_file({"double_stream_modulation_img.lin.weight": torch.zeros(4, 4), "img_in.weight": torch.zeros(4, 4)},
              str(tmp_path / "flux2.safetensors"))
    with pytest.raises(UserError, match="FLUX.2.*supported: FLUX.1-dev, FLUX.1-schnell and FLUX.1 Kontext"):
        load_flux(tmp_path / "flux2.safetensors", clip_l="x", t5xxl="y", ae="z")
    import shutil

    fill = tmp_path / "fill"
    shutil.copytree(flux_files["folder"], fill)
    info = json.loads((fill / "model_index.json").read_text())
    info["_class_name"] = "FluxFillPipeline"
    (fill / "model_index.json").write_text(json.dumps(info))
    with pytest.raises(UserError, match="FluxFillPipeline.*supported"):
        load_flux(fill)


def test_wrong_loras_for_flux_are_refused(tiny_flux, tmp_path):
    from difflora.network.apply import network_from_file
    from difflora.network.files import save_lora

    sd_lora = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4)}
    save_lora(sd_lora, tmp_path / "sd.safetensors", {"ss_base_model_version": "sd_v1"})
    with pytest.raises(UserError, match="sd_v1.*not FLUX"):
        network_from_file(tiny_flux, tmp_path / "sd.safetensors")
    save_lora(sd_lora, tmp_path / "sd_nometa.safetensors")
    with pytest.raises(UserError, match="Stable Diffusion"):
        network_from_file(tiny_flux, tmp_path / "sd_nometa.safetensors")

    from difflora.toy.tiny_flux import build_tiny_flux

    dev = build_tiny_flux("dev")
    schnell = build_tiny_flux("schnell")
    guided = LoRANetwork.create(dev.lora_targets(conv=True), NetworkSpec(network_dim=2, only_if_contains=("guidance_in",)))
    save_lora(guided.kohya_state_dict(), tmp_path / "dev_guidance.safetensors", dev.lora_metadata())
    with pytest.raises(UserError, match="guidance embedder"):
        network_from_file(schnell, tmp_path / "dev_guidance.safetensors")


# ------------------------------------------------------------------ methods on flow matching
def test_addift_loss_on_flux_equals_its_formula(tiny_flux):
    """ADDifT on a flow-matching model: the LoRA's velocity on the noised "after" image is regressed onto the
    frozen model's velocity on the noised "before" image (same ε and σ); odd steps swap images and use -m."""
    from types import SimpleNamespace

    from difflora.methods.addift import AddiftOptions
    from difflora.methods.addift import addift_loss
    from difflora.methods.base import Batch, StepContext

    net = _random_lora(tiny_flux, NetworkSpec(network_dim=4, network_alpha=4, train_text_encoder=False)).apply_to()
    try:
        g = torch.Generator().manual_seed(5)
        before, after, eps = (torch.randn(2, 4, 4, 4, generator=g) for _ in range(3))
        t = torch.tensor([620.0, 910.0])  # σ = 0.62, 0.91
        captions = ["a face, red hair", "a face, brown hair"]
        opts = AddiftOptions(multiplier=0.25, captions="fixed_roles", min_timestep=500, max_timestep=1000)
        job = SimpleNamespace(addift=opts, min_snr_gamma=0)
        ctx_of = lambda step: StepContext(tiny_flux, net, job, step, tiny_flux.encode_prompts)  # noqa: E731
        batch_of = lambda step: Batch({"x": before, "after": after}, {"x": captions, "after": captions}, eps, t,  # noqa: E731
                                      torch.ones(2), step=step)
        sig = (t / 1000).view(-1, 1, 1, 1)
        q = lambda x: (1 - sig) * x + sig * eps  # noqa: E731
        cond = tiny_flux.encode_prompts(captions)
        for step, (frozen_in, lora_in, m) in ((0, (q(before), q(after), 0.25)), (1, (q(after), q(before), -0.25))):
            loss = addift_loss(ctx_of(step), batch_of(step))
            with torch.no_grad():
                net.set_multiplier(0.0)
                target = tiny_flux.predict(frozen_in, t, cond)
                net.set_multiplier(m)
                pred = tiny_flux.predict(lora_in, t, cond)
            expected = ((pred - target) ** 2).mean(dim=(1, 2, 3))
            assert torch.allclose(loss, expected, rtol=1e-5, atol=1e-7), (step, loss, expected)
            assert float(loss.detach().mean()) > 1e-4
    finally:
        net.remove()


def test_generate_sweep_on_flux_per_sample_multipliers(tiny_flux):
    """generate.py on FLUX: a -1/0/+1 sweep in one batch equals three separate runs."""
    from difflora.generate import GenerationRequest, generate

    net = _random_lora(tiny_flux, NetworkSpec(network_dim=4, network_alpha=4)).apply_to()
    try:
        req = GenerationRequest(prompts=["a face"] * 3, seeds=[7] * 3, steps=3, width=32, height=32)
        req.multipliers = {0: [-1.0, 0.0, 1.0]}
        swept = generate(tiny_flux, [net], req, output="float")
        alone = []
        for m in (-1.0, 0.0, 1.0):
            one = GenerationRequest(prompts=["a face"], seeds=[7], steps=3, width=32, height=32)
            one.multipliers = {0: [m]}
            alone.append(generate(tiny_flux, [net], one, output="float")[0])
    finally:
        net.remove()
    for a, b in zip(swept, alone):
        assert abs(a - b).max() < 1e-4
    assert abs(swept[0] - swept[2]).max() > 1e-3


# ------------------------------------------------------------------ tools and CLI on FLUX
def test_merge_into_bfl_file_and_folder_equals_the_dense_formula(tiny_flux, flux_files, tmp_path, run_cli):
    from safetensors.torch import load_file

    from difflora.network.files import save_lora

    net = _random_lora(tiny_flux, NetworkSpec(network_dim=3, network_alpha=1.5))
    save_lora(net.kohya_state_dict(), tmp_path / "l.safetensors", tiny_flux.lora_metadata())
    qkv = "double_blocks.0.img_attn.qkv.weight"
    delta = 0.7 * net.lora_unet_double_blocks_0_img_attn_qkv.weight_delta()
    code, _, err = run_cli("merge", "--model", flux_files["bfl"], "--models", tmp_path / "l.safetensors", "--ratios", "0.7",
                           "--save-to", tmp_path / "merged.safetensors")
    assert code == 0, err
    merged = load_file(str(tmp_path / "merged.safetensors"))
    assert (merged[qkv] - (tiny_flux.transformer.state_dict()[qkv] + delta)).abs().max() < 1e-6
    code, _, err = run_cli("merge", "--model", flux_files["folder"], "--models", tmp_path / "l.safetensors",
                           "--ratios", "0.7", "--save-to", tmp_path / "merged_folder")
    assert code == 0, err
    folder = load_flux(tmp_path / "merged_folder")
    assert (folder.transformer.state_dict()[qkv] - merged[qkv]).abs().max() < 1e-6
    te = "encoder.layers.0.self_attn.q_proj.weight"
    te_delta = 0.7 * net.lora_te1_text_model_encoder_layers_0_self_attn_q_proj.weight_delta()
    assert (folder.text_encoders["clip_l"].state_dict()[te] - tiny_flux.text_encoders["clip_l"].state_dict()[te]
            - te_delta).abs().max() < 1e-6
    # extract from the two transformers gives the merged delta back (rank 3 is exact)
    code, _, err = run_cli("extract", "--model-org", flux_files["bfl"], "--model-tuned", tmp_path / "merged.safetensors",
                           "--dim", "3", "--save-to", tmp_path / "x.safetensors")
    assert code == 0, err
    from difflora.network.files import load_lora

    x = load_lora(tmp_path / "x.safetensors")
    n = "lora_unet_double_blocks_0_img_attn_qkv"
    rank, alpha = x.rank_alpha(n)
    got = x.tensors[f"{n}.lora_up.weight"] @ x.tensors[f"{n}.lora_down.weight"] * alpha / rank
    assert (got - delta).abs().max() < 1e-4
    assert x.metadata["ss_base_model_version"] == "flux1"
    assert x.metadata["ss_network_module"] == "networks.lora_flux"  # sd-scripts' FLUX module, as its tools write
    # the merged folder is in the published layout too (its text encoders read as transformers 4 reads them)
    from test_model_folders import _load_as_transformers4

    _load_as_transformers4(tmp_path / "merged_folder" / "text_encoder")


def test_generate_cli_sweep_on_bfl_files(tiny_flux, flux_files, tmp_path, run_cli):
    from difflora.network.files import save_lora

    net = _random_lora(tiny_flux, NetworkSpec(network_dim=4, network_alpha=4))
    save_lora(net.kohya_state_dict(), tmp_path / "l.safetensors", tiny_flux.lora_metadata())
    code, out, err = run_cli("generate", "--model", flux_files["bfl"], "--clip-l", flux_files["clip_l"], "--t5xxl",
                             flux_files["t5xxl"], "--ae", flux_files["ae"], "--prompt", "a face", "--lora",
                             tmp_path / "l.safetensors", "--sweep", "-1,0,1", "--steps", "3", "--width", "32",
                             "--height", "32", "--out", tmp_path / "gen")
    assert code == 0, err
    pngs = list((tmp_path / "gen").glob("*.png"))
    assert any("grid" in p.name for p in pngs) and len([p for p in pngs if "grid" not in p.name]) == 3
    code, _, err = run_cli("generate", "--model", flux_files["bfl"], "--prompt", "a face", "--out", tmp_path / "g2")
    assert code == 2 and "`clip_l`, `t5xxl`, `ae`" in err and not (tmp_path / "g2").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_nf4_base_needs_cuda_and_says_so(flux_files):
    model = load_flux(flux_files["folder"])
    with pytest.raises(UserError, match="CUDA"):
        model.store_base_nf4()


@pytest.fixture(scope="module")
def bad_flux_inputs(tiny_flux, flux_files, tmp_path_factory):
    """Inputs the CLI must refuse for FLUX: wrong LoRAs, FLUX.2 / Fill layouts, a Kontext variant the files deny."""
    import shutil

    from safetensors.torch import save_file

    from difflora.network.files import save_lora
    from difflora.toy.tiny_flux import build_tiny_flux

    d = tmp_path_factory.mktemp("bad_flux")
    sd_lora = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4)}
    save_lora(sd_lora, d / "sd15.safetensors", {"ss_base_model_version": "sd_v1"})
    save_lora(sd_lora, d / "sdxl_nometa.safetensors")
    guided = LoRANetwork.create(tiny_flux.lora_targets(conv=True),
                                NetworkSpec(network_dim=2, only_if_contains=("guidance_in",)))
    save_lora(guided.kohya_state_dict(), d / "guidance.safetensors", tiny_flux.lora_metadata())
    build_tiny_flux("schnell").save(d / "schnell")
    build_tiny_flux("schnell").save(d / "schnell.safetensors")
    from PIL import Image

    Image.new("RGB", (32, 32), (90, 30, 200)).save(d / "control.png")
    save_file({"double_stream_modulation_img.lin.weight": torch.zeros(4, 4), "img_in.weight": torch.zeros(4, 4)},
              str(d / "flux2.safetensors"))
    shutil.copytree(flux_files["folder"], d / "fill")
    info = json.loads((d / "fill" / "model_index.json").read_text())
    (d / "fill" / "model_index.json").write_text(json.dumps({**info, "_class_name": "FluxFillPipeline"}))
    return d


BAD_FLUX = {  # case: (model, extra generate arguments, file the message names, words it holds)
    "no_t5xxl": ("bfl", ["--clip-l", "clip_l", "--ae", "ae"], "flux1-tiny.safetensors", "`t5xxl`"),
    "no_clip_l": ("bfl", ["--t5xxl", "t5xxl", "--ae", "ae"], "flux1-tiny.safetensors", "`clip_l`"),
    "no_ae": ("bfl", ["--clip-l", "clip_l", "--t5xxl", "t5xxl"], "flux1-tiny.safetensors", "`ae`"),
    "sd_lora": ("folder", ["--lora", "sd15.safetensors"], "sd15.safetensors", "not FLUX.1"),
    "sd_lora_no_metadata": ("folder", ["--lora", "sdxl_nometa.safetensors"], "sdxl_nometa.safetensors",
                            "Stable Diffusion / SDXL LoRA"),
    "guidance_lora_on_schnell": ("schnell", ["--lora", "guidance.safetensors"], "guidance.safetensors",
                                 "FLUX.1-schnell does not have"),
    "flux2_file": ("flux2.safetensors", [], "flux2.safetensors", "not a complete FLUX.2 transformer"),
    "fill_folder": ("fill", [], "fill", "FluxFillPipeline"),
    "kontext_variant_on_text_to_image": ("folder", ["--model-variant", "kontext"], "folder", "FluxPipeline"),
    "kontext_variant_on_schnell": ("schnell.safetensors", ["--model-variant", "kontext"], "schnell.safetensors",
                                   "no guidance embedder"),
    "control_on_text_to_image": ("folder", ["--control", "control.png"], "folder", "cannot take a control image"),
}


@pytest.mark.parametrize("case", list(BAD_FLUX))
def test_bad_flux_inputs_exit_2_with_one_line_and_write_nothing(case, flux_files, bad_flux_inputs, tmp_path, run_cli):
    model, extra, named, words = BAD_FLUX[case]
    where = lambda a: str(flux_files[a]) if a in flux_files else str(bad_flux_inputs / a)  # noqa: E731
    args = [where(a) if i % 2 and extra[i - 1] != "--model-variant" else a for i, a in enumerate(extra)]
    code, _, err = run_cli("generate", "--model", where(model), *args, "--prompt", "a face", "--steps", "2",
                           "--width", "32", "--height", "32", "--out", tmp_path / "out")
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1, err
    assert named in lines[0] and words in lines[0], lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["no_t5xxl", "schnell_with_guidance"])
def test_bad_flux_training_jobs_leave_the_output_folder_as_it_was(case, flux_files, bad_flux_inputs, tmp_path, faces16,
                                                                   run_cli):
    out = tmp_path / "out"
    out.mkdir()
    (out / "earlier.safetensors").write_bytes(b"an earlier result")
    if case == "no_t5xxl":  # a BFL transformer given clip_l and ae, not t5xxl
        model = f'model = "{flux_files["bfl"]}"\nclip_l = "{flux_files["clip_l"]}"\nae = "{flux_files["ae"]}"\n'
        named, words = "flux1-tiny.safetensors", "`t5xxl`"
    else:  # a schnell LoRA asked to train the guidance embedder schnell does not have
        model = f'model = "{bad_flux_inputs / "schnell"}"\nin_dims = [0, 0, 0, 4, 0]\n'
        named, words = "job.toml", "FLUX.1-schnell has no guidance embedder"
    job = tmp_path / "job.toml"
    job.write_text(f'{model}train_data_dir = "{faces16}"\nresolution = 32\nmax_train_steps = 2\noutput_dir = "{out}"\n'
                   f'output_name = "earlier"\noverwrite = true\nlog_with = "none"\n', encoding="utf-8")
    code, _, err = run_cli("train", job)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and named in lines[0] and words in lines[0], err
    assert sorted(p.name for p in out.iterdir()) == ["earlier.safetensors"]
    assert (out / "earlier.safetensors").read_bytes() == b"an earlier result"
