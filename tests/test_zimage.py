"""Z-Image on a tiny model with the real layout (30 layers, 2 noise + 2 context refiners, diffusers' classes):
the time convention against diffusers' transformer and scheduler, loading both layouts, LoRA names against
the reference lists, ComfyUI's key map, diffusers' loader and pipeline, every peer's spelling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from difflora.errors import UserError
from difflora.models import load_model
from difflora.network.apply import network_from_file
from difflora.network.files import load_lora, save_lora
from difflora.network.lora import LoRANetwork, NetworkSpec

KEYS = Path(__file__).parent / "data" / "zimage_keys"


def reference(name: str) -> set[str]:
    return set((KEYS / f"zimage_{name}.txt").read_text().split())


@pytest.fixture(scope="module")
def zimage_files(tmp_path_factory):
    from difflora.models.zimage.tiny import write_tiny_zimage

    return write_tiny_zimage(tmp_path_factory.mktemp("zimage"))


@pytest.fixture(scope="module")
def model(zimage_files):
    return load_model(zimage_files["folder"], options={"zimage_variant": "turbo"})


def plain_transformer(model):
    """diffusers' own ZImageTransformer2DModel (split q/k/v) with the tiny model's weights."""
    from diffusers import ZImageTransformer2DModel

    from difflora.models.zimage.transformer import split_fused_keys

    plain = ZImageTransformer2DModel.from_config(model.transformer.config)
    plain.load_state_dict(split_fused_keys(model.transformer.state_dict()))
    return plain.eval()


def pipeline(model, transformer=None):
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    return ZImagePipeline(scheduler=sched, vae=model.vae, text_encoder=model.text_encoders["text_encoder"],
                          tokenizer=model.tokenizer, transformer=transformer or plain_transformer(model))


def random_lora(model, tmp_path: Path, save_format: str = "kohya", seed: int = 0, **spec) -> Path:
    """A LoRA with visible random weights (up is zero when fresh), saved in `save_format`."""
    net = LoRANetwork.create(model.lora_targets(), NetworkSpec(network_dim=2, network_alpha=1.0, **spec))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / f"lora_{save_format}.safetensors"
    save_lora(model.export_lora(net.state_dict(), save_format), path, {"ss_base_model_version": "zimage"})
    return path


# ------------------------------------------------------------------ time convention and target
def test_predict_runs_the_transformer_at_one_minus_sigma_and_negates_it(model):
    """difflora's t is σ·1000 (σ = 1: noise); the Z-Image transformer takes 1 − σ and predicts x0 − ε."""
    plain = plain_transformer(model)
    cond = model.encode_prompts(["a face, red hair"])
    caps = [cond.tensors["cap"][0][cond.tensors["cap_mask"][0]]]
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma = 0.2
    with torch.no_grad():
        ours = model.predict(x, torch.tensor([sigma * 1000]), cond)
        at = lambda t: plain([x[0].unsqueeze(1)], torch.tensor([t]), caps, return_dict=False)[0][0].squeeze(1)  # noqa: E731
        right, swapped = -at(1 - sigma), -at(sigma)
    print("max |ours - diffusers at 1-σ|", float((ours[0] - right).abs().max()),
          "| at σ:", float((ours[0] - swapped).abs().max()))
    assert torch.allclose(ours[0], right, atol=1e-5)
    assert float((ours[0] - swapped).abs().max()) > 1e-2  # the two clocks give different outputs here


def test_the_training_target_is_what_the_pipeline_integrates(model):
    """A transformer whose raw output is x0 − ε (musubi's target) makes the pipeline's Euler step (diffusers'
    scheduler, output negated) land on x0; difflora's objective noises as the scheduler does and its loss is
    zero for exactly that output."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    sched.set_timesteps(sigmas=[0.3], mu=0.0)
    timestep = sched.timesteps[0]
    sigma = float(sched.sigmas[0])
    t = torch.tensor([sigma * 1000])
    noisy = model.objective.add_noise(x0, eps, t)
    assert torch.allclose(noisy, sched.scale_noise(x0, timestep[None], eps), atol=1e-6)
    raw = x0 - eps  # the ideal raw transformer output
    stepped = sched.step(-raw, timestep, noisy, return_dict=False)[0]  # the pipeline negates, then steps to 0
    assert torch.allclose(stepped, x0, atol=1e-5)
    loss = torch.nn.functional.mse_loss(model.objective.prediction(-raw, noisy, t), model.objective.target(x0, eps, t))
    assert float(loss) < 1e-12
    wrong = torch.nn.functional.mse_loss(model.objective.prediction(raw, noisy, t), model.objective.target(x0, eps, t))
    assert float(wrong) > 1.0  # FLUX's sign on the raw output would train the opposite direction


def test_musubi_training_defaults_without_job_keys(model):
    o = model.objective.options
    assert (o.timestep_sampling, o.discrete_flow_shift, o.model_prediction_type) == ("shift", 2.0, "raw")


# ------------------------------------------------------------------ files and detection
def test_folder_and_comfyui_files_load_the_same_model_and_name_the_variant(zimage_files, model):
    single = load_model(zimage_files["transformer"], options={"text_encoder": str(zimage_files["text_encoder"]),
                                                          "vae": str(zimage_files["vae"])})
    assert single.family == "zimage" and single.variant == "turbo"  # difflora's file says; the folder needs the key
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a = model.predict(x, torch.tensor([600.0]), model.encode_prompts(["a cat"]))
        b = single.predict(x, torch.tensor([600.0]), single.encode_prompts(["a cat"]))
    assert torch.equal(a, b)
    base = load_model(zimage_files["folder"], options={"zimage_variant": "base"})
    assert base.variant == "base"


def test_native_file_has_comfyui_keys(zimage_files):
    from safetensors import safe_open

    with safe_open(zimage_files["transformer"], "pt") as f:
        keys = set(f.keys())
    assert "layers.29.attention.qkv.weight" in keys and "x_embedder.weight" in keys
    assert "noise_refiner.1.attention.q_norm.weight" in keys and "context_refiner.1.feed_forward.w3.weight" in keys
    assert not any(".to_q." in k or "all_x_embedder" in k for k in keys)
    assert len(keys) == 453  # the released layout's 453 native keys (keys/zimage_native_statedict.txt)


def test_the_variant_is_asked_for_when_the_files_cannot_tell(zimage_files):
    unknown = load_model(zimage_files["folder"])  # the tools need no variant
    assert unknown.variant is None
    with pytest.raises(UserError, match="zimage_variant") as e:
        unknown.check_complete()  # training and generation do
    assert str(zimage_files["folder"]) in str(e.value)


def test_model_family_detection(zimage_files):
    from difflora.models.registry import detect_folder, detect_single_file, read_model_index
    from difflora.fileio import read_safetensors_header

    assert detect_folder(zimage_files["folder"]) == "zimage"
    header, md = read_safetensors_header(zimage_files["transformer"])
    assert detect_single_file(set(header), md, zimage_files["transformer"]) == "zimage"
    assert read_model_index(zimage_files["folder"])["_class_name"] == "ZImagePipeline"


# ------------------------------------------------------------------ LoRA names
@pytest.mark.parametrize("save_format,reference_list", [("kohya", "kohya_comfy"), ("comfyui", "comfyui"),
                                                         ("diffusers", "diffusers"), ("musubi", "kohya")])
def test_saved_names_equal_the_reference_lists(model, tmp_path, save_format, reference_list):
    from difflora.network.adapters import by_module
    from safetensors.torch import load_file

    keys = load_file(random_lora(model, tmp_path, save_format))
    if save_format in ("kohya", "musubi"):
        modules = set(by_module(keys))
    else:
        modules = {k.rsplit(".lora_", 1)[0] if ".lora_" in k else k.rsplit(".", 1)[0] for k in keys}
    assert modules == reference(reference_list)


def comfyui_key_map(model) -> dict[str, str]:
    """ComfyUI's model_lora_keys_unet for Z-Image (comfy/lora.py at f443b9f2, new-families.md §2.3): the generic
    branch (`lora_unet_<native _>`, `diffusion_model.<native>`) and the Lumina2 branch (`diffusion_model.`,
    `transformer.`, `lycoris_` and bare diffusers names onto the native weights). The diffusers -> native table is
    diffusers' own single-file converter, inverted."""
    from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers

    from difflora.models.zimage.transformer import fused_model_to_native_keys

    native = [k for k in fused_model_to_native_keys(model.transformer.state_dict()) if k.endswith(".weight")]
    key_map = {}
    for k in native:
        key_map["lora_unet_" + k[: -len(".weight")].replace(".", "_")] = k
        key_map["diffusion_model." + k[: -len(".weight")]] = k
    for k in native:
        for d in convert_z_image_transformer_checkpoint_to_diffusers({k: torch.zeros(3, 1)}):
            base = d[: -len(".weight")]
            for spelling in (f"diffusion_model.{base}", f"transformer.{base}", "lycoris_" + base.replace(".", "_"), base):
                key_map[spelling] = k
    return key_map


_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".lora_A.weight", ".lora_B.weight", ".lora_A.default.weight",
             ".lora_B.default.weight", ".alpha", ".dora_scale", ".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b",
             ".lokr_w1", ".lokr_w2", ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2_a", ".lokr_w2_b")


def file_modules(path: Path) -> set[str]:
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        keys = list(f.keys())
    out = set()
    for k in keys:
        suffix = next(s for s in _SUFFIXES if k.endswith(s))
        out.add(k[: -len(suffix)])
    return out


@pytest.mark.parametrize("save_format,adapter", [("kohya", {}), ("comfyui", {}), ("diffusers", {}),
                                                 ("kohya", {"algo": "loha"}), ("kohya", {"algo": "lokr"}),
                                                 ("kohya", {"dora_wd": True})])
def test_comfyui_key_map_takes_every_module(model, tmp_path, save_format, adapter):
    from difflora.network.adapters.base import AdapterOptions

    modules = file_modules(random_lora(model, tmp_path, save_format, adapter=AdapterOptions(**adapter)))
    key_map = comfyui_key_map(model)
    mapped = [m for m in modules if m in key_map]
    print(f"ComfyUI maps {len(mapped)}/{len(modules)} modules ({save_format}, {adapter or 'lora'})")
    assert len(mapped) == len(modules)
    musubi = reference("kohya")  # musubi's split kohya names: the failure the default avoids
    assert sum(m in key_map for m in musubi) == 90


def test_diffusers_loader_lands_every_module_and_the_pipeline_matches_generate(model, zimage_files, tmp_path):
    """diffusers' ZImagePipeline.load_lora_weights on the kohya file (split by its converter) gives the image
    `difflora generate`'s sampler makes with the same file."""
    from difflora.generate import GenerationRequest, generate

    lora = random_lora(model, tmp_path)
    pipe = pipeline(model)
    pipe.load_lora_weights(str(lora))
    adapted = [n for n, m in pipe.transformer.named_modules() if hasattr(m, "lora_A") and m.lora_A]
    print(f"diffusers lands {len(adapted)}/210 modules")
    assert len(adapted) == 210
    ref = pipe("a face, red hair", num_inference_steps=3, guidance_scale=0.0, height=64, width=64,
               generator=torch.Generator().manual_seed(7), output_type="np").images[0]
    net = network_from_file(model, lora)
    try:
        ours = generate(model, [net], GenerationRequest(["a face, red hair"], [7], steps=3, width=64, height=64),
                        output="float")[0]
        net.set_multiplier(0.0)
        without = generate(model, [net], GenerationRequest(["a face, red hair"], [7], steps=3, width=64, height=64),
                           output="float")[0]
    finally:
        net.remove()
    diff = float(np.abs(ours - ref).max())
    print("max |generate - diffusers pipeline| =", diff, "; LoRA effect", float(np.abs(ours - without).max()))
    assert diff <= 1e-4
    assert float(np.abs(ours - without).max()) > 1e-2


def test_base_uses_the_pipelines_cfg(zimage_files):
    from difflora.generate import GenerationRequest, generate

    base = load_model(zimage_files["folder"], options={"zimage_variant": "base"})
    ref = pipeline(base)("a cat", negative_prompt="", num_inference_steps=2, guidance_scale=4.0, height=64, width=64,
                         generator=torch.Generator().manual_seed(3), output_type="np").images[0]
    ours = generate(base, [], GenerationRequest(["a cat"], [3], steps=2, cfg=4.0, width=64, height=64),
                    output="float")[0]
    assert float(np.abs(ours - ref).max()) <= 1e-4


@pytest.mark.parametrize("peer,suffixes", [
    ("kohya", (".lora_down.weight", ".lora_up.weight", ".alpha")),  # musubi's split names
    ("aitoolkit", (".lora_A.weight", ".lora_B.weight", None)),
    ("musubi_other", (".lora_A.weight", ".lora_B.weight", None)),
    ("diffsynth", (".lora_A.default.weight", ".lora_B.default.weight", None)),
    ("diffusers", (".lora_A.weight", ".lora_B.weight", None)),
    ("diffusers_script_default", (".lora_A.weight", ".lora_B.weight", None)),
])
def test_peer_files_give_what_diffusers_gives(model, tmp_path, peer, suffixes):
    """A LoRA in each peer's spelling (module sets from the reference lists) on difflora's model predicts what
    diffusers' own loader predicts with the same file (split q/k/v fused exactly)."""
    from safetensors.torch import save_file

    plain = plain_transformer(model)
    shapes = {n: m.weight.shape for n, m in plain.named_modules() if isinstance(m, torch.nn.Linear)}
    g = torch.Generator().manual_seed(4)
    tensors = {}
    for name in sorted(reference(peer)):
        bare = name.removeprefix("transformer.").removeprefix("diffusion_model.")
        path = bare if peer != "kohya" else _musubi_path(bare.removeprefix("lora_unet_"), shapes)
        out_dim, in_dim = shapes[path]
        down_key, up_key, alpha_key = suffixes
        tensors[name + down_key] = torch.randn(2, in_dim, generator=g) * 0.3
        tensors[name + up_key] = torch.randn(out_dim, 2, generator=g) * 0.3
        if alpha_key:
            tensors[name + alpha_key] = torch.tensor(1.0)
    file = tmp_path / f"{peer}.safetensors"
    save_file(tensors, file)
    pipe = pipeline(model, plain)
    pipe.load_lora_weights(str(file))
    cond = model.encode_prompts(["a face"])
    caps = [cond.tensors["cap"][0][cond.tensors["cap_mask"][0]]]
    x = torch.randn(1, 4, 8, 8, generator=g)
    net = network_from_file(model, file)
    try:
        with torch.no_grad():
            ours = model.predict(x, torch.tensor([400.0]), cond)[0]
            theirs = -plain([x[0].unsqueeze(1)], torch.tensor([0.6]), caps, return_dict=False)[0][0].squeeze(1)
            net.set_multiplier(0.0)
            bare_model = model.predict(x, torch.tensor([400.0]), cond)[0]
    finally:
        net.remove()
    print(f"{peer}: {len(reference(peer))} modules, max |difflora - diffusers| = {float((ours - theirs).abs().max()):.2e}")
    assert torch.allclose(ours, theirs, atol=1e-4)
    assert float((ours - bare_model).abs().max()) > 1e-3


def _musubi_path(underscored: str, shapes) -> str:
    for path in shapes:
        if path.replace(".", "_") == underscored:
            return path
    raise KeyError(underscored)


def test_lora_of_another_family_is_refused(model, tmp_path):
    from safetensors.torch import save_file

    sd_lora = tmp_path / "sd.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 4),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(4, 2)}, sd_lora)
    with pytest.raises(UserError, match="not a Z-Image LoRA") as e:
        network_from_file(model, sd_lora)
    assert str(sd_lora) in str(e.value)
    flux_md = tmp_path / "flux.safetensors"
    save_lora({"lora_unet_layers_0_attention_qkv.lora_down.weight": torch.zeros(2, 32),
               "lora_unet_layers_0_attention_qkv.lora_up.weight": torch.zeros(96, 2)}, flux_md,
              {"ss_base_model_version": "flux1"})
    with pytest.raises(UserError, match="flux1"):
        network_from_file(model, flux_md)
    assert load_lora(flux_md).module_names()  # the file itself is fine: the refusal is about the model


def test_comfyui_scaled_fp8_file_loads_dequantized(zimage_files, model, tmp_path):
    """A ComfyUI scaled-fp8 transformer (fp8 weights, per-tensor `scale_weight`, `scaled_fp8` marker) loads as the
    weights times their scales."""
    from safetensors.torch import load_file, save_file

    sd = load_file(str(zimage_files["transformer"]))
    from difflora.fileio import read_safetensors_header

    _, md = read_safetensors_header(zimage_files["transformer"])
    scaled = {"scaled_fp8": torch.zeros(2, dtype=torch.float8_e4m3fn)}
    for k, v in sd.items():
        if k.endswith(".weight") and v.dim() == 2 and k.startswith("layers."):
            scale = v.abs().max() / 448
            scaled[k] = (v / scale).to(torch.float8_e4m3fn)
            scaled[k[: -len(".weight")] + ".scale_weight"] = scale.reshape(1)
        else:
            scaled[k] = v
    path = tmp_path / "z_image_fp8_scaled.safetensors"
    save_file(scaled, str(path), metadata=md)
    loaded = load_model(path)
    w = loaded.transformer.layers[3].feed_forward.w1.weight
    ref = model.transformer.layers[3].feed_forward.w1.weight
    assert float((w - ref).abs().max()) < 0.07 * float(ref.abs().max())  # fp8's 3-bit mantissa
    assert float((w - ref).abs().max()) > 0  # it is the fp8 copy, not the original
    assert torch.equal(loaded.transformer.x_pad_token, model.transformer.x_pad_token)


def test_a_lora_outside_the_blocks_is_refused_with_its_reason(model, tmp_path):
    """x_embedder sees every sample's tokens concatenated (a per-sample multiplier cannot apply there)."""
    from safetensors.torch import save_file

    path = tmp_path / "embedder.safetensors"
    save_file({"diffusion_model.layers.0.attention.to_q.lora_A.weight": torch.zeros(2, 32),
               "diffusion_model.layers.0.attention.to_q.lora_B.weight": torch.zeros(32, 2),
               "diffusion_model.x_embedder.lora_A.weight": torch.zeros(2, 16),
               "diffusion_model.x_embedder.lora_B.weight": torch.zeros(32, 2)}, path)
    with pytest.raises(UserError, match="x_embedder.*outside Z-Image's 34 transformer blocks") as e:
        network_from_file(model, path)
    assert str(path) in str(e.value)
