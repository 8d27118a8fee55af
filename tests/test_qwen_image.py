"""Qwen-Image on a tiny model with the real 60 dual-stream blocks: folders and ComfyUI files, variants, prompt
encoding against diffusers' pipeline, LoRA names against the reference lists, ComfyUI's key map, diffusers' loader
against `difflora generate`, the edit hook, fp8 files and bad inputs."""

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
from difflora.network.files import save_lora

def _load(path, **options):
    """A model with family keys (a job's or generate's flags)."""
    return load_model(path, options=options)


KEYS = Path(__file__).parent / "data" / "qwen_image_keys"


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """The tiny Qwen-Image folder, its ComfyUI split files and the loaded model."""
    from difflora.models.qwen_image.tiny import write_tiny_folder, write_tiny_single_files

    root = tmp_path_factory.mktemp("qwen")
    folder = write_tiny_folder(root / "Qwen-Image")
    files = write_tiny_single_files(folder, root / "comfy")
    return {"root": root, "folder": folder, "files": files, "model": _load(folder)}


def _random_lora(model, path: Path, seed: int = 0, rank: int = 4, alpha: float = 2.0) -> Path:
    """A kohya file on every default target with factors large enough to change the tiny model's images."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for t in model.lora_targets():
        out_f, in_f = t.module.weight.shape
        tensors[f"{t.name}.lora_down.weight"] = torch.randn(rank, in_f, generator=g) / in_f ** 0.5
        tensors[f"{t.name}.lora_up.weight"] = torch.randn(out_f, rank, generator=g) * 0.5
        tensors[f"{t.name}.alpha"] = torch.tensor(alpha)
    save_lora(tensors, path, {"ss_base_model_version": model.base_model_version})
    return path


def _image(model, networks, prompt="a face, red hair", seed=3, cfg=2.0):
    req = GenerationRequest(prompts=[prompt], seeds=[seed], steps=2, cfg=cfg, width=32, height=32)
    return generate(model, networks, req, output="float")[0]


def _names(tensors) -> set[str]:
    suffixes = (".lora_down.weight", ".lora_up.weight", ".alpha", ".lora_A.weight", ".lora_B.weight",
                ".lora_A.default.weight", ".lora_B.default.weight")
    out = set()
    for k in tensors:
        for s in suffixes:
            if k.endswith(s):
                out.add(k[: -len(s)])
    return out


def _reference(convention: str) -> set[str]:
    return set((KEYS / f"qwen_image_{convention}.txt").read_text().split())


# ------------------------------------------------------------------ ComfyUI's key map, re-derived
def comfy_key_map(model_keys) -> dict[str, str]:
    """ComfyUI f443b9f2 comfy/lora.py model_lora_keys_unet for a QwenImage model: the generic branch (lora_unet_ +
    native name with _, diffusion_model.<native>) and the QwenImage branch (bare, transformer., lycoris_)."""
    key_map = {}
    for k in (f"diffusion_model.{k}" for k in model_keys):
        if k.endswith(".weight"):
            native = k[len("diffusion_model."):-len(".weight")]
            key_map[f"lora_unet_{native.replace('.', '_')}"] = k
            key_map[k[:-len(".weight")]] = k
            key_map[native] = k
            key_map[f"transformer.{native}"] = k
            key_map[f"lycoris_{native.replace('.', '_')}"] = k
    return key_map


COMFY_LORA_PAIRS = ((".lora_up.weight", ".lora_down.weight"), ("_lora.up.weight", "_lora.down.weight"),
                    (".lora_B.weight", ".lora_A.weight"), (".lora.up.weight", ".lora.down.weight"),
                    (".lora_B", ".lora_A"), (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"),
                    (".lora_B.default.weight", ".lora_A.default.weight"))
COMFY_LYCORIS = (".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b", ".hada_t1", ".hada_t2", ".lokr_w1",
                 ".lokr_w2", ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2_a", ".lokr_w2_b", ".lokr_t2")


def comfy_not_loaded(lora_keys, key_map) -> tuple[int, list[str]]:
    """ComfyUI's load_lora: for every key-map entry the adapter keys it consumes (LoRA suffix pairs, LoHa/LoKr
    parts, alpha, dora_scale); returns (modules mapped, keys left as "lora key not loaded")."""
    lora_keys = set(lora_keys)
    loaded, mapped = set(), 0
    for x in key_map:
        hit = [k for up, down in COMFY_LORA_PAIRS for k in (x + up, x + down) if x + up in lora_keys]
        ly = [x + s for s in COMFY_LYCORIS if x + s in lora_keys]
        if hit or ly:
            mapped += 1
            loaded.update(hit + ly + [k for k in (x + ".alpha", x + ".dora_scale") if k in lora_keys])
    return mapped, sorted(lora_keys - loaded)


# ------------------------------------------------------------------ files and variants
def test_folder_and_comfy_files_load_the_same_model_and_images(qwen):
    from difflora.models.qwen_image.tiny import tiny_pipeline

    model, files = qwen["model"], qwen["files"]
    assert model.variant == "qwen_image" and len(model.transformer.transformer_blocks) == 60
    single = _load(files["diffusion_model"], text_encoder=str(files["text_encoder"]), vae=str(files["vae"]))
    a, b = model.transformer.state_dict(), single.transformer.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ta, tb = model.text_encoders["qwen25vl"].state_dict(), single.text_encoders["qwen25vl"].state_dict()
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    ours = _image(model, [])
    # the VAE's Wan2.1 names went through diffusers' converter: equal weights in another layout, so float rounding
    # (measured 2.5e-6 on the 4-wide tiny VAE; the bound of the pipeline comparison below)
    assert np.abs(ours - _image(single, [])).max() <= 1e-5
    # the same image as diffusers' own QwenImagePipeline (its prompt encoding, schedule and true CFG)
    pipe = tiny_pipeline()
    assert pipe.transformer.state_dict()["img_in.weight"].equal(a["img_in.weight"])
    ref = pipe("a face, red hair", negative_prompt="", true_cfg_scale=2.0, height=32, width=32, num_inference_steps=2,
               generator=torch.Generator().manual_seed(3), output_type="np").images[0]
    assert np.abs(ours - ref).max() <= 1e-5 and ours.std() > 0.01


def test_generate_takes_comfyuis_files_by_musubis_flags(qwen, tmp_path, run_cli):
    """`difflora generate` on the transformer file with --text-encoder / --vae (and --qwen-tokenizer when the
    tokenizer is elsewhere) draws the folder's image; without --vae it stops before writing anything."""
    from PIL import Image

    files = qwen["files"]
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(files["text_encoder"], alone / "qwen_2.5_vl_7b.safetensors")  # no tokenizer/ beside it
    args = ["generate", "--model", files["diffusion_model"], "--text-encoder", alone / "qwen_2.5_vl_7b.safetensors",
            "--prompt", "a face, red hair", "--seed", "3", "--steps", "2", "--cfg", "2", "--width", "32",
            "--height", "32"]
    code, _, err = run_cli(*args, "--vae", files["vae"], "--qwen-tokenizer", qwen["folder"] / "tokenizer",
                           "--out", tmp_path / "out")
    assert code == 0, err
    drawn = np.asarray(Image.open(tmp_path / "out" / "000_3.png").convert("RGB")).astype(np.float32) / 255
    assert np.abs(drawn - _image(qwen["model"], [])).max() <= 1 / 255
    code, _, err = run_cli(*args, "--qwen-tokenizer", qwen["folder"] / "tokenizer", "--out", tmp_path / "none")
    assert code == 2 and "`vae`" in err and not (tmp_path / "none").exists()


def test_prompt_encoding_drops_the_template_prefix_and_pads_with_a_mask(qwen):
    model = qwen["model"]
    cond = model.encode_prompts(["a face", "a face, red hair, blue background"])
    txt, mask = cond.tensors["txt"], cond.tensors["txt_mask"]
    tok = model.tokenizer
    from difflora.models.qwen_image.model import T2I_TEMPLATE

    full = len(tok(T2I_TEMPLATE.format("a face, red hair, blue background")).input_ids)
    assert txt.shape[:2] == (2, full - 34) and int(mask[1].sum()) == full - 34
    assert int(mask[0].sum()) == len(tok(T2I_TEMPLATE.format("a face")).input_ids) - 34
    assert torch.all(txt[0, int(mask[0].sum()):] == 0)
    # a prompt encoded alone equals its row of a padded batch, and the padding does not change the prediction
    alone = model.encode_prompts(["a face"])
    n = alone.tensors["txt"].shape[1]
    assert torch.allclose(alone.tensors["txt"][0], txt[0, :n], atol=1e-5)
    x = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500.0])
    assert torch.allclose(model.predict(x, t, alone), model.predict(x, t, cond[0:1]), atol=1e-5)


def test_variants_are_named_by_the_files_or_the_job(qwen, tmp_path):
    from difflora.models.qwen_image.tiny import write_tiny_folder

    for variant in ("edit", "edit_2509", "edit_2511"):
        folder = write_tiny_folder(tmp_path / variant, variant, num_layers=2)
        m = _load(folder)
        assert m.variant == variant and m.is_edit and m.base_model_version == "qwen_image_edit"
        assert m.transformer.zero_cond_t == (variant == "edit_2511")
        with pytest.raises(UserError, match="model_variant = 'qwen_image' but this model is " + variant):
            _load(folder, model_variant="qwen_image")
    # a 2511 transformer saved as ComfyUI's file carries the marker, which names the variant
    m2511 = _load(tmp_path / "edit_2511")
    m2511.save(tmp_path / "qwen_image_edit_2511_bf16.safetensors")
    assert "__index_timestep_zero__" in load_file(str(tmp_path / "qwen_image_edit_2511_bf16.safetensors"))
    single = _load(tmp_path / "qwen_image_edit_2511_bf16.safetensors")
    assert single.variant == "edit_2511" and single.transformer.zero_cond_t
    with pytest.raises(UserError, match="Edit-2511 marker"):
        _load(tmp_path / "qwen_image_edit_2511_bf16.safetensors", model_variant="edit_2509")
    # weights cannot tell Qwen-Image from Edit-2509: the job says
    plain = qwen["files"]["diffusion_model"]
    assert _load(plain).variant == "qwen_image"
    assert _load(plain, model_variant="edit_2509").variant == "edit_2509"


def test_fp8_and_scaled_fp8_files_load_within_fp8_error(qwen, tmp_path):
    sd = load_file(str(qwen["files"]["diffusion_model"]))
    fp8 = {k: (v.to(torch.float8_e4m3fn) if v.dim() == 2 else v) for k, v in sd.items()}
    save_file(fp8, str(tmp_path / "qwen_image_fp8_e4m3fn.safetensors"))
    scaled = {"scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}
    for k, v in sd.items():
        if v.dim() == 2:
            s = v.abs().max() / 448
            scaled[k] = (v / s).to(torch.float8_e4m3fn)
            scaled[k[: -len(".weight")] + ".scale_weight"] = s.reshape(1)
        else:
            scaled[k] = v
    save_file(scaled, str(tmp_path / "scaled.safetensors"))
    for name in ("qwen_image_fp8_e4m3fn.safetensors", "scaled.safetensors"):
        m = _load(tmp_path / name)
        w, ref = m.transformer.state_dict()["transformer_blocks.7.attn.to_q.weight"], sd["transformer_blocks.7.attn.to_q.weight"]
        err = float((w - ref).abs().max() / ref.abs().max())
        assert w.dtype == torch.float32 and 0 < err < 0.07, (name, err)
    # the scale matters: without it the scaled file's weights are off by orders of magnitude
    raw = scaled["transformer_blocks.7.attn.to_q.weight"].float()
    assert float((raw - sd["transformer_blocks.7.attn.to_q.weight"]).abs().max()) > 10


# ------------------------------------------------------------------ LoRA names
@pytest.mark.parametrize("save_format,convention", [("kohya", "kohya"), ("comfyui", "comfyui"),
                                                     ("diffusers", "diffusers")])
def test_saved_key_sets_equal_the_reference_lists_and_comfyui_maps_every_key(qwen, tmp_path, save_format, convention):
    model = qwen["model"]
    kohya = load_file(str(_random_lora(model, tmp_path / "k.safetensors")))
    written = model.export_lora(kohya, save_format)
    names = _names(written)
    assert len(names) == 840 and names == _reference(convention)
    key_map = comfy_key_map(model.transformer.state_dict())
    mapped, not_loaded = comfy_not_loaded(written, key_map)
    print(f"{save_format}: ComfyUI maps {mapped}/{len(names)}, {len(not_loaded)} keys not loaded")
    assert mapped == 840 and not not_loaded


def test_comfyui_maps_the_peers_reference_lists(qwen):
    key_map = comfy_key_map(qwen["model"].transformer.state_dict())
    suffix = {"kohya": (".lora_up.weight", ".lora_down.weight"), "diffsynth": (".lora_B.default.weight", ".lora_A.default.weight")}
    for convention in ("kohya", "comfyui", "diffusers", "diffsynth", "aitoolkit", "musubi_other"):
        names = _reference(convention)
        up, down = suffix.get(convention, (".lora_B.weight", ".lora_A.weight"))
        mapped, not_loaded = comfy_not_loaded([n + s for n in names for s in (up, down)], key_map)
        assert mapped == len(names) and not not_loaded, convention
    # the re-derived map is not vacuous: a FLUX name is left unloaded
    assert comfy_not_loaded(["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"], key_map)[1]


def test_peer_spellings_read_back_to_the_same_module_deltas(qwen, tmp_path):
    from difflora.network.files import load_lora

    model = qwen["model"]
    kohya_path = _random_lora(model, tmp_path / "k.safetensors")
    kohya = load_file(str(kohya_path))
    base = model.adapt_lora_file(load_lora(kohya_path))

    def delta(lora, name):
        up, down = lora.tensors[f"{name}.lora_up.weight"], lora.tensors[f"{name}.lora_down.weight"]
        return lora.scale(name) * (up @ down)

    spelled = {"comfyui": model.export_lora(kohya, "comfyui"), "diffusers": model.export_lora(kohya, "diffusers")}
    ai = model.export_lora(kohya, "comfyui")  # ai-toolkit: diffusion_model. + lora_A/B without alpha
    spelled["diffsynth"] = {k.replace("diffusion_model.", "").replace(".weight", ".default.weight"): v
                            for k, v in ai.items()}
    spelled["lycoris"] = {("lycoris_" + k.split(".lora_")[0][len("lora_unet_"):] + ".lora_" + k.split(".lora_")[1]
                           if ".lora_" in k else "lycoris_" + k[len("lora_unet_"):]): v for k, v in kohya.items()}
    for name, tensors in spelled.items():
        save_file(tensors, str(tmp_path / f"{name}.safetensors"))
        lora = model.adapt_lora_file(load_lora(tmp_path / f"{name}.safetensors"))
        assert set(lora.module_names()) == set(base.module_names()), name
        for m in ("lora_unet_transformer_blocks_0_attn_to_q", "lora_unet_transformer_blocks_59_txt_mod_1"):
            assert torch.allclose(delta(lora, m), delta(base, m), atol=1e-5), (name, m)


def test_diffusers_load_lora_weights_gives_the_image_of_difflora_generate(qwen, tmp_path):
    from difflora.models.qwen_image.tiny import tiny_pipeline

    model = qwen["model"]
    kohya = load_file(str(_random_lora(model, tmp_path / "k.safetensors")))
    without = _image(model, [])
    pipe = tiny_pipeline()
    for save_format in ("kohya", "comfyui", "diffusers"):
        path = tmp_path / f"{save_format}.safetensors"
        save_file(model.export_lora(kohya, save_format), str(path))
        net = network_from_file(model, path, 1.0)
        ours = _image(model, [net])
        net.remove()
        pipe.load_lora_weights(str(path))
        ref = pipe("a face, red hair", negative_prompt="", true_cfg_scale=2.0, height=32, width=32,
                   num_inference_steps=2, generator=torch.Generator().manual_seed(3), output_type="np").images[0]
        pipe.unload_lora_weights()
        diff = float(np.abs(ours - ref).max())
        print(f"{save_format}: |difflora - diffusers| = {diff:.2e}, LoRA effect {np.abs(ours - without).max():.3f}")
        assert diff <= 1e-4 and np.abs(ours - without).max() > 0.02, save_format


def test_wrong_family_loras_are_refused_both_ways(qwen, tmp_path, tiny_sd1_dir):
    model = qwen["model"]
    sd = _load(tiny_sd1_dir)
    sd_lora = {}
    for t in sd.lora_targets()[:3]:
        o, i = t.module.weight.shape[:2]
        sd_lora.update({f"{t.name}.lora_down.weight": torch.zeros(2, i), f"{t.name}.lora_up.weight": torch.zeros(o, 2),
                        f"{t.name}.alpha": torch.tensor(1.0)})
    save_lora(sd_lora, tmp_path / "sd.safetensors")
    with pytest.raises(UserError, match="not a Qwen-Image LoRA"):
        network_from_file(model, tmp_path / "sd.safetensors")
    qwen_lora = _random_lora(model, tmp_path / "q.safetensors")
    with pytest.raises(UserError, match="trained for qwen_image .*but the model is sd_v1"):
        network_from_file(sd, qwen_lora)


# ------------------------------------------------------------------ sampling and the edit hook
def test_qwen_shift_sampling_follows_musubi():
    from difflora.models.flow_matching import FlowMatchOptions
    from difflora.models.qwen_image.model import QwenFlowObjective, qwen_shift_mu

    obj = QwenFlowObjective(FlowMatchOptions("qwen_shift", 1.0, 2.2, "raw"))
    g = torch.Generator().manual_seed(0)
    s = obj.sample_sigmas(20000, g, (128, 128))  # 64x64 packed tokens = 4096
    shift = np.exp(qwen_shift_mu(4096))
    raw = torch.sigmoid(torch.randn(20000, generator=torch.Generator().manual_seed(0)))
    assert torch.allclose(s, shift * raw / (1 + (shift - 1) * raw))
    assert abs(qwen_shift_mu(256) - 0.5) < 1e-9 and abs(qwen_shift_mu(8192) - 0.9) < 1e-9
    small = obj.sample_sigmas(20000, torch.Generator().manual_seed(0), (32, 32))
    assert float(small.mean()) < float(s.mean())  # more tokens, more noise


def test_weighting_scheme_weights_the_loss_and_the_sigma_density(qwen):
    """musubi's weighting_scheme as a job key: sigma_sqrt / cosmap scale each sample's loss by σ⁻² /
    2/(π(1 - 2σ + 2σ²)); logit_normal makes the "sigma" sampling's index logit-normal."""
    from dataclasses import replace
    from types import SimpleNamespace

    from difflora.methods.base import Batch, StepContext
    from difflora.methods.standard import denoising_loss
    from difflora.models.flow_matching import FlowMatchOptions
    from difflora.models.qwen_image.loader import options_from_table
    from difflora.models.qwen_image.model import QwenFlowObjective
    from difflora.models.qwen_image.options import QwenImageJobOptions

    table = QwenImageJobOptions.model_validate({"weighting_scheme": "sigma_sqrt"})
    assert options_from_table(table, "qwen_image").flow.weighting_scheme == "sigma_sqrt"  # the job key's way in

    class NoNetwork:
        def set_multiplier(self, m, component=None):
            pass

    model, job = qwen["model"], SimpleNamespace(min_snr_gamma=None)
    g = torch.Generator().manual_seed(0)
    batch = Batch({"x": torch.randn(3, 16, 4, 4, generator=g)}, {"x": ["a face"] * 3},
                  torch.randn(3, 16, 4, 4, generator=g), torch.tensor([200.0, 500.0, 800.0]), torch.ones(3))
    losses, kept = {}, model.objective.options
    try:
        for scheme in ("none", "sigma_sqrt", "cosmap"):
            model.objective.options = replace(kept, weighting_scheme=scheme)
            with torch.no_grad():
                losses[scheme] = denoising_loss(StepContext(model, NoNetwork(), job, 0, model.encode_prompts), batch)
            if scheme != "none":
                assert model.lora_metadata()["ss_weighting_scheme"] == scheme
    finally:
        model.objective.options = kept
    assert torch.allclose(losses["sigma_sqrt"] / losses["none"], torch.tensor([25.0, 4.0, 1.5625]), rtol=1e-4)
    assert torch.allclose(losses["cosmap"] / losses["none"], torch.tensor([0.93621, 1.27324, 0.93621]), rtol=1e-4)

    def middle_share(**weighting):  # the σ index in the middle half of the 1000 (shift 1: σ = index / 1000)
        obj = QwenFlowObjective(FlowMatchOptions("sigma", 1.0, 1.0, "raw", **weighting))
        s = obj.sample_sigmas(20000, torch.Generator().manual_seed(0), (64, 64))
        return float(((s > 0.25) & (s <= 0.75)).float().mean())

    assert abs(middle_share() - 0.5) < 0.015
    assert abs(middle_share(weighting_scheme="logit_normal") - 0.7281) < 0.015  # P(|N(0, 1)| < logit 0.75)
    assert abs(middle_share(weighting_scheme="logit_normal", logit_std=0.5) - 0.9720) < 0.01


def test_edit_prompts_see_the_control_images_and_references_join_as_tokens(tmp_path):
    from PIL import Image

    from difflora.models.qwen_image.tiny import write_tiny_folder

    red, blue = Image.new("RGB", (96, 64), (200, 30, 30)), Image.new("RGB", (64, 64), (30, 30, 200))
    for variant in ("edit_2509", "edit_2511"):
        m = _load(write_tiny_folder(tmp_path / variant, variant, num_layers=2))
        plain = m.encode_prompts(["make it blue"])
        one = m.encode_prompts_with_images(["make it blue"], [[red]])
        two = m.encode_prompts_with_images(["make it blue"], [[red, blue]])
        # 384² area: 96x64 -> 480x320, which the folder's processor (at most 112² pixels on the tiny model) takes
        # as 8x6 patches, 2x2 merged: 12 image tokens, plus "Picture 1: " and the vision start/end tokens
        assert m.image_processor.size["longest_edge"] == 112 * 112  # processor/preprocessor_config.json's bound
        grids = [m.image_processor(images=[im.resize(size)], return_tensors="pt")["image_grid_thw"].tolist()
                 for im, size in ((red, (480, 320)), (blue, (384, 384)))]
        assert grids == [[[1, 6, 8]], [[1, 6, 6]]]  # blue: 64² -> 384² -> 84² (under the bound): 9 tokens
        assert one.tensors["txt"].shape[1] >= plain.tensors["txt"].shape[1] + 12 + 2
        assert two.tensors["txt"].shape[1] >= one.tensors["txt"].shape[1] + 9 + 2
        other = m.encode_prompts_with_images(["make it blue"], [[blue]])
        assert not torch.allclose(one.tensors["txt"][:, -5:], other.tensors["txt"][:, -5:])  # the image matters
        x = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(0))
        ref = torch.randn(1, 16, 6, 4, generator=torch.Generator().manual_seed(1))
        t = torch.tensor([700.0])
        out = m.predict_with_references(x, t, one, [ref])
        assert out.shape == x.shape and not torch.allclose(out, m.predict(x, t, one), atol=1e-4)
        if variant == "edit_2511":  # zero_cond_t: the reference tokens are modulated at t = 0, whatever t is
            m.transformer.zero_cond_t = False
            # small on 2 narrow blocks (1e-5), exactly 0 if the flag did nothing
            assert float((out - m.predict_with_references(x, t, one, [ref])).abs().max()) > 2e-6
    with pytest.raises(UserError, match="Qwen-Image-Edit models"):
        _load(write_tiny_folder(tmp_path / "t2i", "qwen_image", num_layers=2)).encode_prompts_with_images(
            ["x"], [[red]])


# ------------------------------------------------------------------ bad inputs
def test_bad_qwen_inputs_are_one_line_errors(qwen, tmp_path, tiny_sd1_dir):
    files, folder = qwen["files"], qwen["folder"]
    # a text encoder of the wrong model (the VAE file; an SD text encoder's weights)
    with pytest.raises(UserError, match="not a Qwen2.5-VL text-encoder file"):
        _load(files["diffusion_model"], text_encoder=str(files["vae"]), vae=str(files["vae"]))
    # a Qwen2.5-VL of another width than the transformer takes
    te = load_file(str(files["text_encoder"]))
    wide = {k: (torch.zeros(v.shape[0], 64) if k == "model.embed_tokens.weight" else v) for k, v in te.items()}
    save_file(wide, str(tmp_path / "qwen_2.5_vl_3b.safetensors"))
    with pytest.raises(UserError, match="64 wide, but the Qwen-Image transformer takes 16"):
        _load(files["diffusion_model"], text_encoder=str(tmp_path / "qwen_2.5_vl_3b.safetensors"))
    # a VAE file that is not Qwen-Image's
    with pytest.raises(UserError, match="not a Qwen-Image VAE file"):
        _load(files["diffusion_model"], vae=str(files["text_encoder"]))
    # a folder without vae/ or tokenizer/
    for sub in ("vae", "tokenizer"):
        broken = tmp_path / f"no_{sub}"
        shutil.copytree(folder, broken)
        shutil.rmtree(broken / sub)
        with pytest.raises(UserError, match=f"the {sub}/ folder .* is missing"):
            _load(broken)
    # the tokenizer is not beside the text encoder
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(files["text_encoder"], alone / "te.safetensors")
    with pytest.raises(UserError, match="qwen_tokenizer"):
        _load(files["diffusion_model"], text_encoder=str(alone / "te.safetensors"))
    # an edit-only choice on the text-to-image folder
    with pytest.raises(UserError, match="model_variant = 'edit_2511' but this model is qwen_image"):
        _load(folder, model_variant="edit_2511")
    # a Layered model
    index = json.loads((folder / "model_index.json").read_text())
    layered = tmp_path / "layered"
    layered.mkdir()
    (layered / "model_index.json").write_text(json.dumps({**index, "_class_name": "QwenImageLayeredPipeline"}))
    with pytest.raises(UserError, match="QwenImageLayeredPipeline"):
        _load(layered)


# ------------------------------------------------------------------ the web UI
def test_ui_pickers_job_form_and_tool_forms_take_qwen_image_files(qwen, tmp_path, run_cli):
    """A workspace with the folder and ComfyUI's split files: the pickers list them, a job naming the files by
    musubi's keys passes the form's check and loads the complete model, and the tool forms' commands run on them."""
    from difflora.config import load_job
    from difflora.models.registry import family_options_of
    from difflora.ui import jobform as J
    from difflora.ui.pages.tools import tool_argv
    from difflora.ui.pickers import lora_choices, model_choices
    from difflora.ui.workspace import Workspace

    ws = Workspace(tmp_path / "ws")
    shutil.copytree(qwen["folder"], ws.root / "models" / "Qwen-Image")
    shutil.copytree(qwen["files"]["diffusion_model"].parent.parent, ws.root / "models" / "comfy")
    _random_lora(qwen["model"], ws.root / "loras" / "eyes.safetensors")
    transformer = "models/comfy/diffusion_models/qwen_image_bf16.safetensors"
    models = [value for _, value in model_choices(ws)]
    assert "models/Qwen-Image" in models and transformer in models
    assert lora_choices(ws) == [("loras/eyes.safetensors", "loras/eyes.safetensors")]
    job = {"model": transformer, "text_encoder": "models/comfy/text_encoders/qwen_2.5_vl_7b.safetensors",
           "vae": "models/comfy/vae/qwen_image_vae.safetensors", "weighting_scheme": "cosmap",
           "datasets": [{"subsets": [{"image_dir": "models"}]}]}
    assert J.validate(job, ws) is None
    (ws.root / "job.toml").write_text(J.job_toml(job))
    options = family_options_of(load_job(ws.root / "job.toml", restrict_paths_to=ws.root))
    model = load_model(ws.root / transformer, options=options)
    model.check_complete()  # the text encoder and the VAE came from the form's keys
    assert model.objective.options.weighting_scheme == "cosmap"
    message = J.validate({**job, "weighting_scheme": "heavy"}, ws)
    assert message is not None and "weighting_scheme" in message
    ctx = type("Ctx", (), {"ws": ws})
    forms = {"merge": {"loras": ["loras/eyes.safetensors"], "ratios": "", "model": transformer, "mode": "exact",
                       "save_to": "tools/qwen-eyes.safetensors"},
             "extract": {"model_org": transformer, "model_tuned": "tools/qwen-eyes.safetensors", "dim": 4,
                         "save_to": "tools/extracted.safetensors"}}
    for tool, form in forms.items():
        code, _, err = run_cli(*tool_argv(ctx, tool, form))
        assert code == 0, (tool, err)
    extracted = load_file(str(ws.root / "tools" / "extracted.safetensors"))
    assert {k.split(".")[0] for k in extracted} == _reference("kohya")
