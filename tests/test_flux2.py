"""FLUX.2 (dev, klein 4B / 9B): tiny models with the real block counts and names, both layouts, variant
detection, LoRA spellings against the reference lists (tests/data/flux2_keys: the peers' own code run at the
published configs), ComfyUI's key map and diffusers' loader on the saved files, bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from difflora.errors import UserError
from difflora.models import load_model
from difflora.models.base import Conditioning
from difflora.models.flux2 import names
from difflora.models.flux2.tiny import build_tiny_flux2, write_tiny
from difflora.network.lora import LoRANetwork, NetworkSpec

KEYS = Path(__file__).parent / "data" / "flux2_keys"
SIZES = ("dev", "klein-4b", "klein-9b")
REF = {"dev": "flux2_dev", "klein-4b": "flux2_klein_4b", "klein-9b": "flux2_klein_9b"}


def _ref(size: str, convention: str) -> set[str]:
    return set((KEYS / f"{REF[size]}_{convention}.txt").read_text().split())


def _modules(keys) -> set[str]:
    return {names._split_key(k, None)[0] for k in keys}


@pytest.fixture(scope="module", params=SIZES)
def sized(request):
    return build_tiny_flux2(request.param)


@pytest.fixture(scope="module")
def klein_files(tmp_path_factory):
    return write_tiny(tmp_path_factory.mktemp("flux2"), "klein-4b")


def _random_lora(model, rank=4, seed=1, conv=False) -> LoRANetwork:
    net = LoRANetwork.create(model.lora_targets(conv=conv), NetworkSpec(network_dim=rank, network_alpha=rank / 2))
    torch.manual_seed(seed)
    with torch.no_grad():
        for lora in net.loras():
            lora.lora_up.weight.normal_(0, 0.2)
    return net


# ------------------------------------------------------------------ layout and names
def test_state_dicts_match_the_reference_layouts(sized):
    """Our BFL file and our diffusers folder hold exactly the real models' tensor names."""
    cfg = dict(sized.transformer.config)
    sd = sized.transformer.state_dict()
    bfl = names.fused_to_bfl(sd, cfg["num_layers"], cfg["num_single_layers"], cfg["guidance_embeds"])
    assert set(bfl) == _ref(sized.size.name, "native_statedict")
    ours = names.fused_to_diffusers(sd)
    assert set(ours) == _ref(sized.size.name, "diffusers_statedict")
    # diffusers' own single-file converter reads our BFL tensors to our diffusers tensors (adaLN halves swapped)
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    theirs = convert_flux2_transformer_checkpoint_to_diffusers(dict(bfl))
    assert set(theirs) == set(ours) and all(torch.equal(theirs[k], ours[k]) for k in ours)


def test_fused_transformer_equals_diffusers_own(sized):
    """Our fused transformer gives diffusers' unfused Flux2Transformer2DModel's output from the same weights."""
    from diffusers import Flux2Transformer2DModel

    cfg = {k: v for k, v in dict(sized.transformer.config).items() if not k.startswith("_")}
    ref = Flux2Transformer2DModel(**cfg)
    ref.load_state_dict(names.fused_to_diffusers(sized.transformer.state_dict()))
    g = torch.Generator().manual_seed(0)
    x, txt = torch.randn(1, 6, 128, generator=g), torch.randn(1, 5, cfg["joint_attention_dim"], generator=g)
    from difflora.models.flux2.model import text_ids, token_ids

    kw = dict(hidden_states=x, encoder_hidden_states=txt, timestep=torch.tensor([0.7]), img_ids=token_ids(1, 2, 3),
              txt_ids=text_ids(1, 5), guidance=torch.tensor([4.0]) if cfg["guidance_embeds"] else None,
              return_dict=False)
    with torch.no_grad():
        want, got = ref(**kw)[0], sized.transformer(**kw)[0]
    assert want.abs().mean() > 0.05
    assert (want - got).abs().max() < 1e-5


def test_kohya_comfyui_diffusers_names_equal_the_reference_lists(sized):
    """Default targets: 160 / 80 / 112 musubi modules; the comfyui and diffusers spellings are ai-toolkit's and
    diffusers' converter's lists (q/k/v split: 192 / 100 / 144)."""
    size = sized.size.name
    net = _random_lora(sized)
    kohya = net.kohya_state_dict()
    assert _modules(kohya) == _ref(size, "kohya")
    assert len(_modules(kohya)) == {"dev": 160, "klein-4b": 80, "klein-9b": 112}[size]
    comfy = sized.export_lora(kohya, "comfyui")
    assert _modules(comfy) == _ref(size, "comfyui") == _ref(size, "aitoolkit")
    assert not any(k.endswith(".alpha") for k in comfy)  # diffusers refuses alpha in this spelling
    assert _modules(sized.export_lora(kohya, "diffusers")) == _ref(size, "diffusers")



# ------------------------------------------------------------------ ComfyUI's key map, re-derived
def comfy_key_map(model) -> dict[str, str]:
    """ComfyUI's `comfy.lora.model_lora_keys_unet` for its Flux2 model (f443b9f2, new-families.md §2.3): the generic
    branch over the native state dict (`lora_unet_<native _>`, `diffusion_model.<native>`) and the Flux branch's
    `flux_to_diffusers` names under `transformer.` (q/k/v pieces map to slices of the fused weight). Its basic table
    still has FLUX.1's embedder names, so FLUX.2's embedders and modulation have no diffusers spelling there."""
    cfg = dict(model.transformer.config)
    native = names.fused_to_bfl(model.transformer.state_dict(), cfg["num_layers"], cfg["num_single_layers"],
                                cfg["guidance_embeds"])
    key_map = {}
    for k in native:
        if k.endswith(".weight"):
            base = k[: -len(".weight")]
            key_map["lora_unet_" + base.replace(".", "_")] = "diffusion_model." + k
            key_map["diffusion_model." + base] = "diffusion_model." + k
    diffusers = {}
    for i in range(cfg["num_layers"]):
        d, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for piece in ("to_q", "to_k", "to_v"):
            diffusers[d + "attn." + piece] = b + "img_attn.qkv"
        for piece in ("add_q_proj", "add_k_proj", "add_v_proj"):
            diffusers[d + "attn." + piece] = b + "txt_attn.qkv"
        for dd, bb in (("attn.to_out.0", "img_attn.proj"), ("attn.to_add_out", "txt_attn.proj"),
                       ("ff.linear_in", "img_mlp.0"), ("ff.linear_out", "img_mlp.2"),
                       ("ff_context.linear_in", "txt_mlp.0"), ("ff_context.linear_out", "txt_mlp.2")):
            diffusers[d + dd] = b + bb
    for i in range(cfg["num_single_layers"]):
        diffusers[f"single_transformer_blocks.{i}.attn.to_qkv_mlp_proj"] = f"single_blocks.{i}.linear1"
        diffusers[f"single_transformer_blocks.{i}.attn.to_out"] = f"single_blocks.{i}.linear2"
    for dd, bb in (("proj_out", "final_layer.linear"), ("x_embedder", "img_in"), ("context_embedder", "txt_in")):
        diffusers[dd] = bb
    for dd, bb in diffusers.items():
        key_map["transformer." + dd] = "diffusion_model." + bb + ".weight"
    return key_map


_COMFY_PAIRS = ((".lora_up.weight", ".lora_down.weight"), (".lora_B.weight", ".lora_A.weight"))


def comfy_unloaded(tensors: dict[str, torch.Tensor], key_map: dict[str, str]) -> list[str]:
    """The keys ComfyUI's load_lora would report as "lora key not loaded"."""
    loaded = set()
    for mod in key_map:
        for up, down in _COMFY_PAIRS:
            if mod + up in tensors and mod + down in tensors:
                loaded |= {mod + up, mod + down, mod + ".alpha", mod + ".dora_scale"}
    return sorted(k for k in tensors if k not in loaded)


def test_comfyui_maps_every_key_of_each_saved_spelling(sized, capsys):
    net = _random_lora(sized)
    kohya = net.kohya_state_dict()
    key_map = comfy_key_map(sized)
    for fmt in ("kohya", "comfyui", "diffusers"):
        tensors = sized.export_lora(kohya, fmt)
        unloaded = comfy_unloaded(tensors, key_map)
        with capsys.disabled():
            mapped = len(_modules(tensors) - _modules(unloaded))
            print(f"ComfyUI map, {sized.size.name} {fmt}: {mapped}/{len(_modules(tensors))} modules")
        assert unloaded == [], fmt
    # the check can fail: musubi's `--target other` files lose their attention modules there (#905)
    broken = {_musubi_other(k): v for k, v in sized.export_lora(kohya, "comfyui").items()}
    assert len(comfy_unloaded(broken, key_map)) == 4 * 2 * sized.transformer.config.num_layers


def test_peer_spellings_read_back_to_the_same_network(sized, tmp_path):
    """ComfyUI / ai-toolkit, diffusers (q/k/v split, block-diagonal on reading), DiffSynth (`.default.`, bare) and
    musubi's broken `img_attn_qkv` files all give the trained ΔW of every module."""
    from difflora.network.files import LoraFile, load_lora

    net = _random_lora(sized)
    kohya = net.kohya_state_dict()
    want = _deltas(kohya)
    spellings = {"comfyui": sized.export_lora(kohya, "comfyui"), "diffusers": sized.export_lora(kohya, "diffusers")}
    spellings["diffsynth"] = {k[len("transformer."):].replace(".lora_A.", ".lora_A.default.")
                              .replace(".lora_B.", ".lora_B.default."): v for k, v in spellings["diffusers"].items()}
    spellings["musubi_other"] = {_musubi_other(k): v for k, v in spellings["comfyui"].items()}
    assert _modules(spellings["musubi_other"]) == _ref(sized.size.name, "musubi_other")
    assert _modules(spellings["diffsynth"]) == _ref(sized.size.name, "diffsynth")
    for fmt, tensors in spellings.items():
        path = tmp_path / f"{fmt}.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
        lora = sized.adapt_lora_file(load_lora(path))
        got = _deltas(lora.tensors)
        assert set(got) == set(want), fmt
        assert max((got[n] - want[n]).abs().max().item() for n in want) < 1e-5, fmt
    assert isinstance(lora, LoraFile)


def _musubi_other(key: str) -> str:
    """What musubi's convert_lora.py --target other writes for a FLUX.2 module (its `attn.` -> `attn_` rule)."""
    import re

    return re.sub(r"(img|txt)_attn\.(qkv|proj)", r"\1_attn_\2", key)


def _deltas(tensors) -> dict[str, torch.Tensor]:
    out = {}
    for k in tensors:
        if k.endswith(".lora_down.weight"):
            n = k.split(".", 1)[0]
            down, up = tensors[k].float(), tensors[f"{n}.lora_up.weight"].float()
            alpha = float(tensors.get(f"{n}.alpha", down.shape[0]))
            out[n] = up @ down * alpha / down.shape[0]
    return out


# ------------------------------------------------------------------ layouts on disk, detection
def test_folder_and_single_files_load_the_same_model_and_name_the_variant(klein_files):
    from difflora.models.registry import detect_folder, detect_single_file
    from difflora.fileio import read_safetensors_header

    folder = load_model(klein_files["folder"])
    single = load_model(klein_files["single"], options={"text_encoder": str(klein_files["text_encoder"]),
                                                        "vae": str(klein_files["vae"]),
                                                        "qwen3_tokenizer": str(klein_files["tokenizer"])})
    assert detect_folder(klein_files["folder"]) == "flux2"
    header, md = read_safetensors_header(klein_files["single"])
    assert detect_single_file(set(header), md, klein_files["single"]) == "flux2"
    assert (folder.family, folder.size.name, folder.version) == ("flux2", "klein-4b", "klein-base-4b")
    assert single.version == "klein-base-4b"  # base and distilled share weights: base unless model_version says
    distilled = load_model(klein_files["single"], options={"model_version": "klein-4b"})
    assert distilled.version == "klein-4b" and distilled.sampling_defaults() == (4, 1.0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 128, 2, 3, generator=g)
    outs = []
    for m in (folder, single):
        m.options.max_token_length = 32
        cond = m.encode_prompts(["a face, red hair"])
        assert cond.tensors["txt"].shape == (1, 32, 48)
        outs.append(m.predict(x, torch.tensor([600.0]), cond))
        pixels = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
        outs.append(m.encode_images(pixels, sample=False))
    assert outs[0].abs().mean() > 0.05
    assert (outs[0] - outs[2]).abs().max() < 1e-6  # the text encoders' two loaders round alike to ~1e-7
    assert torch.equal(outs[1], outs[3])
    # the BFL file written from the folder equals the original file
    assert load_file(str(klein_files["single"])).keys() == set(_ref("klein-4b", "native_statedict"))


def test_single_file_without_encoders_is_a_transformer_only(klein_files):
    model = load_model(klein_files["single"])
    assert len(model.lora_targets()) == 80
    with pytest.raises(UserError, match="text_encoder.*vae"):
        model.check_complete()


def test_diffusers_pipeline_with_the_lora_gives_difflora_generate_s_image(klein_files, tmp_path):
    """Flux2KleinPipeline + load_lora_weights(our kohya file) == `generate` with it (klein base: CFG 4)."""
    from diffusers import Flux2KleinPipeline

    from difflora.generate import GenerationRequest, generate
    from difflora.network.apply import network_from_file
    from difflora.network.files import save_lora

    model = load_model(klein_files["folder"])
    model.options.max_token_length = 32
    net = _random_lora(model, rank=4)
    for fmt in ("kohya", "comfyui", "diffusers"):
        path = tmp_path / f"{fmt}.safetensors"
        save_lora(model.export_lora(net.kohya_state_dict(), fmt), path, {"ss_base_model_version": "flux2_klein_base_4b"})
        pipe = Flux2KleinPipeline.from_pretrained(klein_files["folder"], local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        pipe.load_lora_weights(str(path))
        want = pipe(prompt="a face, red hair", height=64, width=64, num_inference_steps=3, guidance_scale=4.0,
                    generator=torch.Generator().manual_seed(3), max_sequence_length=32, output_type="np").images[0]
        lora = network_from_file(model, path)
        try:
            got = generate(model, [lora], GenerationRequest(["a face, red hair"], [3], steps=3, cfg=4.0, width=64,
                                                           height=64), output="float")[0]
        finally:
            lora.remove()
        without = pipe.__class__.from_pretrained(klein_files["folder"], local_files_only=True)(
            prompt="a face, red hair", height=64, width=64, num_inference_steps=3, guidance_scale=4.0,
            generator=torch.Generator().manual_seed(3), max_sequence_length=32, output_type="np").images[0]
        assert np.abs(want - without).max() > 1e-2  # the LoRA changes the image
        assert np.abs(got - want).max() <= 1e-4, fmt


# ------------------------------------------------------------------ every Linear, the final adaLN, scaled fp8
def test_all_linear_names_equal_the_reference_lists(sized):
    """Every Linear a FLUX.2 LoRA may hold (the peers' all-linear sets: embedders, global modulation, the final
    adaLN): 171 / 89 / 121 modules, in the kohya, comfyui and diffusers spellings."""
    size = sized.size.name
    net = _random_lora(sized, conv=True)
    kohya = net.kohya_state_dict()
    assert _modules(kohya) == _ref(size, "all_linear_kohya")
    assert _modules(sized.export_lora(kohya, "comfyui")) == _ref(size, "all_linear_comfyui")
    assert _modules(sized.export_lora(kohya, "diffusers")) == _ref(size, "all_linear_diffusers")
    # ComfyUI's generic branch names every native weight: both BFL spellings load whole (its diffusers table
    # lacks FLUX.2's embedders and modulation, so that spelling is for diffusers)
    key_map = comfy_key_map(sized)
    assert comfy_unloaded(kohya, key_map) == comfy_unloaded(sized.export_lora(kohya, "comfyui"), key_map) == []


def test_final_adaln_lora_applies_as_comfyui_and_diffusers_apply_it(klein_files, tmp_path):
    """A LoRA on `final_layer.adaLN_modulation.1` (BFL's (shift, scale) rows): ComfyUI adds its ΔW to the BFL weight
    of that name; our kohya / comfyui / diffusers files of it give that model's output, and diffusers' own loader
    gives it from our diffusers file (whose rows are diffusers' (scale, shift))."""
    from diffusers import Flux2KleinPipeline

    from difflora.fileio import read_safetensors_header
    from difflora.models.flux2.model import text_ids, token_ids
    from difflora.network.apply import network_from_file
    from difflora.network.files import save_lora

    model = load_model(klein_files["folder"])
    model.options.max_token_length = 32
    adaln = [t for t in model.lora_targets(conv=True) if t.name == "lora_unet_final_layer_adaLN_modulation_1"]
    net = LoRANetwork.create(adaln, NetworkSpec(network_dim=4, network_alpha=2.0))
    torch.manual_seed(2)
    with torch.no_grad():
        net.loras()[0].lora_up.weight.normal_(0, 0.5)
    kohya = {k: v.detach().clone() for k, v in net.kohya_state_dict().items()}
    net.remove()
    down, up = kohya[f"{adaln[0].name}.lora_down.weight"], kohya[f"{adaln[0].name}.lora_up.weight"]
    sd, md = load_file(str(klein_files["single"])), read_safetensors_header(klein_files["single"])[1]
    sd["final_layer.adaLN_modulation.1.weight"] = sd["final_layer.adaLN_modulation.1.weight"] + up @ down * 0.5
    save_file(sd, str(tmp_path / "comfy_merged.safetensors"), metadata=md)
    merged = load_model(tmp_path / "comfy_merged.safetensors")
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 128, 2, 3, generator=g), torch.tensor([600.0])
    cond = model.encode_prompts(["a face, red hair"])
    with torch.no_grad():
        base, want = model.predict(x, t, cond), merged.predict(x, t, cond)
    assert (want - base).abs().max() > 1e-2  # the final adaLN LoRA changes the output
    for fmt in ("kohya", "comfyui", "diffusers"):
        path = tmp_path / f"adaln_{fmt}.safetensors"
        save_lora(model.export_lora(kohya, fmt), path, {"ss_base_model_version": "flux2_klein_base_4b"})
        lora = network_from_file(model, path)
        try:
            with torch.no_grad():
                got = model.predict(x, t, cond)
        finally:
            lora.remove()
        assert (got - want).abs().max() < 1e-5, fmt
    pipe = Flux2KleinPipeline.from_pretrained(klein_files["folder"], local_files_only=True)
    pipe.load_lora_weights(str(tmp_path / "adaln_diffusers.safetensors"))
    txt = cond.tensors["txt"]
    with torch.no_grad():
        theirs = pipe.transformer(hidden_states=x.flatten(2).transpose(1, 2), encoder_hidden_states=txt,
                                  timestep=t / 1000, img_ids=token_ids(1, 2, 3), txt_ids=text_ids(1, txt.shape[1]),
                                  guidance=None, return_dict=False)[0]
    assert (theirs.transpose(1, 2).reshape(want.shape) - want).abs().max() < 1e-5


def _scaled_fp8(sd: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """A ComfyUI fp8 repack of a BFL state dict: the blocks' Linear weights in float8_e4m3fn with their scale;
    "old": the `scaled_fp8` marker and a per-tensor `scale_weight`; "new": QUANTIZATION.md's `weight_scale` per
    output row and an `input_scale`."""
    out = {"scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)} if layout == "old" else {}
    for k, v in sd.items():
        if k.startswith(("double_blocks.", "single_blocks.")) and k.endswith(".weight") and v.dim() == 2:
            layer = k[: -len(".weight")]
            scale = v.abs().amax(dim=1, keepdim=True) / 448 if layout == "new" else v.abs().max().reshape(1) / 448
            out[k] = (v / scale).to(torch.float8_e4m3fn)
            if layout == "new":
                out[f"{layer}.weight_scale"], out[f"{layer}.input_scale"] = scale.squeeze(1), torch.ones(())
            else:
                out[f"{layer}.scale_weight"] = scale
        else:
            out[k] = v
    return out


def test_comfyui_scaled_fp8_files_load_dequantized(klein_files, tmp_path):
    from difflora.fileio import read_safetensors_header

    sd = load_file(str(klein_files["single"]))
    md = read_safetensors_header(klein_files["single"])[1]
    ref = sd["double_blocks.1.img_attn.qkv.weight"]
    for layout in ("old", "new"):
        path = tmp_path / f"flux-2-klein-4b-fp8-{layout}.safetensors"
        save_file({"model.diffusion_model." + k: v for k, v in _scaled_fp8(sd, layout).items()}, str(path),
                  metadata=md)
        model = load_model(path)
        w = model.transformer.transformer_blocks[1].attn.to_qkv.weight
        err = float((w - ref).abs().max())
        assert 0 < err < 0.07 * float(ref.abs().max()), layout  # the fp8 copy (3-bit mantissa), de-scaled
    blockwise = _scaled_fp8(sd, "new")
    blockwise["single_blocks.0.linear1.weight_scale"] = torch.ones(2, 2)
    save_file(blockwise, str(tmp_path / "blockwise.safetensors"), metadata=md)
    with pytest.raises(UserError, match=r"single_blocks\.0\.linear1\.weight: a block-wise fp8 scale"):
        load_model(tmp_path / "blockwise.safetensors")


# ------------------------------------------------------------------ tools and the UI's tool forms on FLUX.2 files
def _saved_lora(model, path: Path, seed: int, conv: bool = False) -> Path:
    """A random rank-4 FLUX.2 LoRA file (kohya names; conv=True: every Linear, the final adaLN too)."""
    from difflora.network.files import save_lora

    net = _random_lora(model, rank=4, seed=seed, conv=conv)
    save_lora(net.kohya_state_dict(), path, model.lora_metadata())
    net.remove()
    return path


def _predict_fixed(model) -> torch.Tensor:
    x = torch.randn(1, 128, 2, 3, generator=torch.Generator().manual_seed(0))
    cond = Conditioning({"txt": torch.randn(1, 8, 48, generator=torch.Generator().manual_seed(1))})
    with torch.no_grad():
        return model.predict(x, torch.tensor([600.0]), cond)


@pytest.mark.parametrize("target", ["single", "folder"])
def test_merge_into_the_model_equals_the_attached_lora(klein_files, tmp_path, run_cli, target):
    """`merge --model`: the BFL single file and the diffusers folder written with every Linear's LoRA merged
    (the final adaLN too) give the output of the model with the LoRA attached."""
    from difflora.network.apply import network_from_file

    model = load_model(klein_files["single"])
    lora = _saved_lora(model, tmp_path / "all_linear.safetensors", seed=3, conv=True)
    out = tmp_path / ("merged.safetensors" if target == "single" else "merged")
    code, _, err = run_cli("merge", "--model", klein_files[target], "--models", lora, "--save-to", out)
    assert code == 0, err
    merged = load_model(out)
    net = network_from_file(model, lora)
    try:
        attached = _predict_fixed(model)
    finally:
        net.remove()
    assert (_predict_fixed(model) - attached).abs().max() > 1e-2
    assert (_predict_fixed(merged) - attached).abs().max() < 1e-4


def test_lora_tools_extract_and_inspect_keep_flux2_names(klein_files, tmp_path, run_cli):
    """merge / svd-merge / resize keep the 80 musubi modules; extract from the merged transformer gives back the
    LoRA's modules and (at its rank) its output; inspect names the family."""
    from difflora.network.apply import network_from_file

    model = load_model(klein_files["single"])
    a, b = _saved_lora(model, tmp_path / "a.safetensors", 1), _saved_lora(model, tmp_path / "b.safetensors", 2)
    keys = set(load_file(str(a)))
    for cmd in (["merge", "--models", a, b, "--save-to", tmp_path / "ab.safetensors"],
                ["svd-merge", "--models", a, b, "--new-rank", "2", "--save-to", tmp_path / "svd.safetensors"],
                ["resize", "--model", a, "--new-rank", "1", "--save-to", tmp_path / "r1.safetensors"]):
        code, _, err = run_cli(*cmd)
        assert code == 0, (cmd[0], err)
        assert set(load_file(str(cmd[-1]))) == keys, cmd[0]
    merged = tmp_path / "merged.safetensors"
    assert run_cli("merge", "--model", klein_files["single"], "--models", a, "--save-to", merged)[0] == 0
    code, _, err = run_cli("extract", "--model-org", klein_files["single"], "--model-tuned", merged, "--dim", "4",
                           "--save-to", tmp_path / "extracted.safetensors")
    assert code == 0, err
    assert _modules(load_file(str(tmp_path / "extracted.safetensors"))) == _ref("klein-4b", "kohya")
    outs = []
    for path in (a, tmp_path / "extracted.safetensors"):
        net = network_from_file(model, path)
        try:
            outs.append(_predict_fixed(model))
        finally:
            net.remove()
    assert (outs[0] - outs[1]).abs().max() < 1e-3 * outs[0].abs().max()
    code, out, err = run_cli("inspect", a)
    assert code == 0 and "flux2" in out, err


def test_ui_tool_forms_and_pickers_take_flux2_files(klein_files, tmp_path, run_cli):
    """The UI lists a workspace's FLUX.2 folder, single file and LoRA, and its tool forms' commands run on them."""
    import shutil

    from difflora.ui.pages.tools import tool_argv
    from difflora.ui.pickers import lora_choices, model_choices
    from difflora.ui.workspace import Workspace

    ws = Workspace(tmp_path / "ws")
    shutil.copytree(klein_files["folder"], ws.root / "models" / "klein")
    shutil.copy(klein_files["single"], ws.root / "models" / "klein.safetensors")
    model = load_model(klein_files["single"])
    _saved_lora(model, ws.root / "loras" / "eyes.safetensors", 4)
    assert sorted(model_choices(ws)[1:]) == [("models/klein (diffusers folder)", "models/klein"),
                                             ("models/klein.safetensors (single file)", "models/klein.safetensors")]
    assert lora_choices(ws) == [("loras/eyes.safetensors", "loras/eyes.safetensors")]
    ctx = type("Ctx", (), {"ws": ws})
    forms = {"merge": {"loras": ["loras/eyes.safetensors"], "ratios": "", "model": "models/klein.safetensors",
                       "mode": "exact", "save_to": "tools/klein-eyes.safetensors"},
             "extract": {"model_org": "models/klein.safetensors", "model_tuned": "tools/klein-eyes.safetensors",
                         "dim": 2, "save_to": "tools/extracted.safetensors"}}
    for tool, form in forms.items():
        code, _, err = run_cli(*tool_argv(ctx, tool, form))
        assert code == 0, (tool, err)
    assert _modules(load_file(str(ws.root / "tools" / "extracted.safetensors"))) == _ref("klein-4b", "kohya")
