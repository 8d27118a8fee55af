"""SDXL: kohya names, diffusers' own LoRA loading, SGM single files, v-prediction, bad inputs.

The tiny SDXL has SDXL's real block structure (so real kohya names) at narrow widths.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from difflora.errors import UserError
from difflora.generate import GenerationRequest, generate
from difflora.models import load_model
from difflora.network.apply import network_from_file
from difflora.network.files import load_lora, save_lora
from difflora.network.lora import LoRANetwork, NetworkSpec
from difflora.toy.tiny_sdxl import build_real_sdxl, build_tiny_sdxl

KEYS = Path(__file__).parent / "data" / "kohya_keys"


def _ref(name: str) -> set[str]:
    return set((KEYS / name).read_text().split())


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("sdxl") / "tiny_sdxl"
    build_tiny_sdxl().save(d)
    return d


def _names(targets, prefix: str) -> set[str]:
    return {t.name for t in targets if t.name.startswith(prefix)}


def test_kohya_names_and_counts_match_sd_scripts():
    model = build_tiny_sdxl()
    plain, conv = model.lora_targets(conv=False), model.lora_targets(conv=True)
    assert _names(plain, "lora_unet_") == _ref("sdxl_unet_lierla.txt")  # 722
    assert _names(conv, "lora_unet_") == _ref("sdxl_unet_c3lier.txt")  # 788
    assert _names(plain, "lora_te1_") == _ref("sdxl_te1.txt")  # 72
    assert _names(plain, "lora_te2_") == _ref("sdxl_te2.txt")  # 192
    assert (len(_ref("sdxl_unet_lierla.txt")), len(_ref("sdxl_unet_c3lier.txt"))) == (722, 788)
    # the real architecture (meta device) gives the same names
    from difflora.models.sdxl.model import unet_lora_targets

    unet, _, _ = build_real_sdxl()
    assert {t.name for t in unet_lora_targets(unet, conv=True)} == _ref("sdxl_unet_c3lier.txt")
    md = model.lora_metadata()
    assert md["ss_base_model_version"] == "sdxl_base_v1-0"
    assert md["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert md["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"


def _random_lora(model, path, kind: str, seed: int = 0) -> Path:
    """kind: "attention" (the U-Net's Linears), "conv" (and its convs) or "all" (and both text encoders)."""
    conv = kind in ("conv", "all")
    spec = NetworkSpec(network_dim=4, network_alpha=2, conv_dim=4 if conv else None, conv_alpha=1,
                       train_text_encoder=kind == "all")
    net = LoRANetwork.create(model.lora_targets(conv=conv), spec)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lora in net.loras():
            lora.lora_up.weight.copy_(torch.randn(lora.lora_up.weight.shape, generator=g) * 0.3)
    save_lora(net.kohya_state_dict(), path, metadata=model.lora_metadata())
    return path


def test_diffusers_load_lora_weights_gives_the_same_image(tmp_path, sdxl_dir):
    """One file with every kind of module (U-Net Linears and convs, both text encoders): one generation each."""
    from diffusers import StableDiffusionXLPipeline

    from difflora.models.samplers import make_scheduler

    model = load_model(sdxl_dir)
    lora = _random_lora(model, tmp_path / "l.safetensors", "all")
    names = set(load_lora(lora).module_names())
    assert {"lora_te1_text_model_encoder_layers_0_mlp_fc1", "lora_te2_text_model_encoder_layers_31_mlp_fc1",
            "lora_unet_output_blocks_2_0_in_layers_2", "lora_unet_input_blocks_7_1_transformer_blocks_9_attn2_to_k"} <= names
    net = network_from_file(model, lora, 0.8)
    req = GenerationRequest(prompts=["a face, red hair"], seeds=[7], steps=4, sampler="euler", cfg=3.0, width=64,
                            height=64)
    ours = generate(model, [net], req, output="float")[0]
    net.set_multiplier(0.0)
    ours_base = generate(model, [net], req, output="float")[0]

    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_dir, local_files_only=True)
    pipe.scheduler = make_scheduler("euler", pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(lora), adapter_name="x")
    pipe.set_adapters(["x"], [0.8])
    # negative_prompt "" is encoded (as A1111/ComfyUI do), not replaced by zeros
    theirs = pipe(prompt=["a face, red hair"], negative_prompt=[""], generator=torch.Generator().manual_seed(7),
                  num_inference_steps=4, guidance_scale=3.0, height=64, width=64, output_type="np").images[0]
    assert np.abs(ours_base - theirs).max() > 1e-2  # the LoRA matters
    assert np.abs(ours - theirs).max() < 1e-4


def _assert_same_weights(a, b):
    pairs = [(a.denoiser, b.denoiser), (a.vae, b.vae)] + [(a.text_encoders[k], b.text_encoders[k]) for k in a.text_encoders]
    for x, y in pairs:
        sx, sy = x.state_dict(), y.state_dict()
        assert sx.keys() == sy.keys()
        assert all(torch.equal(sx[k], sy[k]) for k in sx)


def test_sgm_single_file_round_trip_and_diffusers_reads_it(tmp_path, sdxl_dir):
    from diffusers import StableDiffusionXLPipeline

    model = load_model(sdxl_dir)
    path = tmp_path / "xl.safetensors"
    model.save(path)
    keys = set(load_file(str(path)))
    assert {"model.diffusion_model.label_emb.0.0.weight", "conditioner.embedders.1.model.text_projection",
            "conditioner.embedders.0.transformer.text_model.encoder.layers.0.mlp.fc1.weight",
            "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight",
            "first_stage_model.decoder.mid.attn_1.q.weight"} <= keys
    _assert_same_weights(model, load_model(path))
    # diffusers' own single-file loader reads difflora's SGM file to the same weights
    pipe = StableDiffusionXLPipeline.from_single_file(str(path), config=str(sdxl_dir), local_files_only=True)
    for name, ours in [("unet", model.unet), ("vae", model.vae)] + list(model.text_encoders.items()):
        theirs = getattr(pipe, name).state_dict()
        assert all(torch.equal(v, theirs[k]) for k, v in ours.state_dict().items()), name
    # a third-party file (no difflora metadata): the layout comes from the tensor shapes
    plain = tmp_path / "plain.safetensors"
    save_file(load_file(str(path)), str(plain))
    _assert_same_weights(model, load_model(plain))


def test_diffusers_single_file_conversion_and_difflora_agree_on_a_third_party_sgm_file(tmp_path, sdxl_dir):
    """An fp16 SGM file with no difflora metadata, as released checkpoints are: diffusers' single-file code
    (offline, configs from a local folder) and difflora read the same weights; the folder diffusers converts it
    to loads in difflora to those weights too."""
    from diffusers import StableDiffusionXLPipeline

    source = build_tiny_sdxl(seed=5)  # other weights than sdxl_dir's model: only the configs come from there
    written = tmp_path / "written.safetensors"
    source.save(written)
    sgm = tmp_path / "third_party.safetensors"
    save_file({k: v.half() if v.is_floating_point() else v for k, v in load_file(str(written)).items()}, str(sgm))

    ours = load_model(sgm)
    pipe = StableDiffusionXLPipeline.from_single_file(str(sgm), config=str(sdxl_dir), local_files_only=True,
                                                      torch_dtype=torch.float32)
    converted = tmp_path / "converted_by_diffusers"
    pipe.save_pretrained(converted, safe_serialization=True)
    from_folder, base = load_model(converted), load_model(sdxl_dir)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        mine, theirs = _component(ours, name), getattr(pipe, name).state_dict()
        assert set(mine) == set(theirs), name
        assert all(torch.equal(v, theirs[k]) for k, v in mine.items()), name
        again = _component(from_folder, name)
        assert all(torch.equal(v, again[k]) for k, v in mine.items()), name
        # the file's fp16 values, not a default initialisation or the config folder's weights
        src, other = _component(source, name), _component(base, name)
        assert all(torch.equal(v, src[k].half().float()) for k, v in mine.items() if v.is_floating_point()), name
        assert any(not torch.equal(v, other[k]) for k, v in mine.items() if v.is_floating_point()), name


def _component(model, name: str) -> dict[str, torch.Tensor]:
    module = {"unet": model.denoiser, "vae": model.vae}.get(name) or model.text_encoders[name]
    return module.state_dict()


def test_v_prediction_and_zero_terminal_snr_travel_with_the_file(tmp_path):
    model = build_tiny_sdxl(prediction_type="v_prediction", zero_terminal_snr=True)
    assert float(model.objective.alphas_cumprod[-1]) == pytest.approx(0.0, abs=1e-7)
    path = tmp_path / "v.safetensors"
    model.save(path)
    plain = tmp_path / "plain.safetensors"
    tensors = load_file(str(path))
    assert "v_pred" in tensors and "ztsnr" in tensors  # the markers NoobAI / ComfyUI files carry
    save_file(tensors, str(plain))
    loaded = load_model(plain)
    assert loaded.objective.prediction_type == "v_prediction" and loaded.zero_terminal_snr
    md = loaded.lora_metadata()
    assert md["ss_base_model_version"] == "sdxl_base_v1-0" and md["modelspec.prediction_type"] == "v"


# ---------------------------------------------------------------- bad inputs
def _one_line_exit_2(run_cli, args, *needles):
    code, out, err = run_cli(*args)
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    for n in needles:
        assert n.lower() in lines[0].lower(), lines[0]
    return lines[0]


def test_sd1_lora_on_sdxl_and_sdxl_lora_on_sd1_are_refused(tmp_path, sdxl_dir, tiny_sd1_dir, run_cli):
    xl = load_model(sdxl_dir)
    sd1 = load_model(tiny_sd1_dir)
    xl_lora = _random_lora(xl, tmp_path / "xl_lora.safetensors", "attention")
    sd1_lora = tmp_path / "sd1_lora.safetensors"
    net = LoRANetwork.create(sd1.lora_targets(), NetworkSpec(network_dim=2))
    save_lora(net.kohya_state_dict(), sd1_lora, metadata=sd1.lora_metadata())
    for model_dir, lora in ((sdxl_dir, sd1_lora), (tiny_sd1_dir, xl_lora)):
        out = tmp_path / f"out_{lora.stem}"
        _one_line_exit_2(run_cli, ["generate", "--model", model_dir, "--prompt", "a face", "--lora", lora,
                                   "--steps", "1", "--out", out], lora.name)
        assert not out.exists()


def test_broken_sdxl_checkpoints_say_what_is_wrong(tmp_path, sdxl_dir, run_cli):
    model = load_model(sdxl_dir)
    full = tmp_path / "xl.safetensors"
    model.save(full)
    tensors = load_file(str(full))
    no_te2 = tmp_path / "no_te2.safetensors"
    save_file({k: v for k, v in tensors.items() if not k.startswith("conditioner.embedders.1.")}, str(no_te2))
    refiner = tmp_path / "refiner.safetensors"
    save_file({("conditioner.embedders.0.model." + k.split("conditioner.embedders.1.model.", 1)[1]
                if k.startswith("conditioner.embedders.1.") else k): v
               for k, v in tensors.items() if not k.startswith("conditioner.embedders.0.")}, str(refiner))
    refiner_dir = tmp_path / "refiner_dir"
    shutil.copytree(sdxl_dir, refiner_dir)
    index = json.loads((refiner_dir / "model_index.json").read_text())
    index.update(text_encoder=[None, None], tokenizer=[None, None], requires_aesthetics_score=True,
                 _class_name="StableDiffusionXLImg2ImgPipeline")
    (refiner_dir / "model_index.json").write_text(json.dumps(index))
    no_te2_dir = tmp_path / "no_te2_dir"
    shutil.copytree(sdxl_dir, no_te2_dir)
    shutil.rmtree(no_te2_dir / "text_encoder_2")
    for path, needles in ((no_te2, ("second text encoder",)), (no_te2_dir, ("text_encoder_2", "bigG")),
                          (refiner, ("refiner", "not support")), (refiner_dir, ("refiner", "not support"))):
        out = tmp_path / f"out_{path.stem}"
        _one_line_exit_2(run_cli, ["generate", "--model", path, "--prompt", "a face", "--steps", "1", "--out", out],
                         path.name, *needles)
        assert not out.exists()


def test_pixels_per_latent_without_loading_agrees_with_the_family(sdxl_dir, tiny_sd1_dir, tmp_path):
    from difflora.models import pixels_per_latent

    for folder in (sdxl_dir, tiny_sd1_dir):
        assert pixels_per_latent(folder) == load_model(folder).latent_downscale
    assert pixels_per_latent(tmp_path / "no_such_model.safetensors") == 8


def test_a_flux_folder_is_named_as_what_it_is(tmp_path):
    flux = tmp_path / "flux"
    flux.mkdir()
    (flux / "model_index.json").write_text(json.dumps({
        "_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"],
        "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "T5EncoderModel"],
        "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}))
    with pytest.raises(UserError) as err:
        load_model(flux)
    assert "is an SDXL" not in str(err.value) and "flux" in str(err.value).lower()


def test_time_ids_of_a_bucketed_cropped_sample_equal_kohyas():
    """kohya: original (h, w), crop (top, left) from BucketManager.get_crop_ltrb, target = bucket (h, w)."""
    from difflora.data.dataset import kohya_sample_size

    model = build_tiny_sdxl()
    sizes = [kohya_sample_size((1000, 1500), (832, 1216), flipped=False),  # portrait into an 832x1216 bucket
             kohya_sample_size((1000, 1500), (832, 1216), flipped=True),  # flipped: left = 832 - right
             kohya_sample_size((2000, 1000), (1024, 1024), flipped=False)]  # wide into a square: kohya says top 256
    time_ids = model.sample_conditioning(sizes).tensors["time_ids"]
    assert time_ids.tolist() == [[1500, 1000, 0, 10, 1216, 832],
                                 [1500, 1000, 0, 11, 1216, 832],
                                 [1000, 2000, 256, 0, 1024, 1024]]
    # they reach the U-Net: other time_ids, other prediction
    cond = model.encode_prompts(["a face"] * 3).merged(model.sample_conditioning(sizes))
    x, t = torch.randn(3, 4, 8, 8), torch.tensor([500] * 3)
    with torch.no_grad():
        given = model.predict(x, t, cond)
        default = model.predict(x, t, model.encode_prompts(["a face"] * 3))
    assert (given - default).abs().max() > 1e-4


def test_tools_work_on_sdxl(tmp_path, sdxl_dir, run_cli):
    """merge into an SDXL single file and folder (the dense formula), extract it back, LoRA + LoRA (exact, kohya),
    svd-merge, resize, inspect, sweep."""
    from difflora.network.lowrank import dense_delta, lora_weight_delta

    model = load_model(sdxl_dir)
    single = tmp_path / "xl.safetensors"
    model.save(single)
    lora = _random_lora(model, tmp_path / "l.safetensors", "conv")
    merged = tmp_path / "merged.safetensors"
    assert run_cli("merge", "--model", single, "--models", lora, "--ratios", "0.5", "--save-to", merged)[0] == 0
    tuned = load_model(merged)
    name = "lora_unet_input_blocks_7_1_transformer_blocks_9_attn2_to_k"
    t = load_lora(lora).tensors
    target = {x.name: x.module for x in model.lora_targets(conv=True)}[name]
    tuned_module = {x.name: x.module for x in tuned.lora_targets(conv=True)}[name]
    expected = target.weight + 0.5 * lora_weight_delta(t[name + ".lora_up.weight"], t[name + ".lora_down.weight"],
                                                       float(t[name + ".alpha"]) / 4)
    assert torch.allclose(tuned_module.weight, expected, atol=1e-6)
    # into the diffusers folder: a folder with the same merged weights
    assert run_cli("merge", "--model", sdxl_dir, "--models", lora, "--ratios", "0.5", "--save-to",
                   tmp_path / "merged_dir")[0] == 0
    folder_module = {x.name: x.module for x in load_model(tmp_path / "merged_dir").lora_targets(conv=True)}[name]
    assert torch.equal(folder_module.weight, tuned_module.weight)
    # extracted back at the LoRA's rank: the same dense deltas (a Linear and a 3x3 conv module)
    out = tmp_path / "ext.safetensors"
    assert run_cli("extract", "--model-org", single, "--model-tuned", merged, "--dim", "4", "--conv-dim", "4",
                   "--save-to", out)[0] == 0
    extracted = load_lora(out)
    assert set(extracted.module_names()) == _ref("sdxl_unet_c3lier.txt")
    for module in (name, "lora_unet_output_blocks_2_0_in_layers_2"):
        want = dense_delta(t, module, 0.5)
        assert (dense_delta(extracted.tensors, module) - want).abs().max() < 1e-4 * want.abs().max()
    # LoRA + LoRA: exact is the sum of the deltas; kohya's merge keeps the names (equal ranks)
    other = _random_lora(model, tmp_path / "o.safetensors", "conv", seed=1)
    assert run_cli("merge", "--models", lora, other, "--ratios", "0.5", "2", "--save-to", tmp_path / "ex.safetensors")[0] == 0
    exact, o = load_lora(tmp_path / "ex.safetensors").tensors, load_lora(other).tensors
    want = dense_delta(t, name, 0.5) + dense_delta(o, name, 2.0)
    assert (dense_delta(exact, name) - want).abs().max() < 1e-5 * want.abs().max()
    assert run_cli("merge", "--models", lora, other, "--mode", "kohya", "--save-to", tmp_path / "k.safetensors")[0] == 0
    assert set(load_lora(tmp_path / "k.safetensors").module_names()) == _ref("sdxl_unet_c3lier.txt")
    assert run_cli("svd-merge", "--models", lora, out, "--new-rank", "2", "--save-to", tmp_path / "svd.safetensors")[0] == 0
    assert run_cli("resize", "--model", lora, "--new-rank", "2", "--save-to", tmp_path / "rs.safetensors")[0] == 0
    assert load_lora(tmp_path / "rs.safetensors").tensors[name + ".lora_down.weight"].shape[0] == 2
    code, text, _ = run_cli("inspect", lora)
    assert code == 0 and "sdxl_base_v1-0" in text and "unet=788" in text
    code, _, err = run_cli("generate", "--model", merged, "--prompt", "a face", "--lora", lora, "--sweep", "-1,0,1",
                           "--steps", "2", "--out", tmp_path / "gen")
    assert code == 0, err
    assert len(list((tmp_path / "gen").glob("*_w*.png"))) == 3
