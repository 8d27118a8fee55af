"""What the clients' own loaders do with the new families' LoRA, LoHa, LoKr and DoRA files (the README's client
table): musubi-tuner's loader (re-derived below) and diffusers' `load_lora_weights` (run). ComfyUI's key map and
diffusers' plain-LoRA output are checked in each family's own tests and the contract suite.

musubi-tuner's LoRA loader: which of a file's modules it applies.

musubi (kohya-ss/musubi-tuner 30c658c4, `utils/lora_utils.load_safetensors_with_lora_and_fp8`, used by its
Qwen-Image, Z-Image and FLUX.2 generate scripts) merges a file while loading the DiT: for every `<path>.weight` of its
own model it looks up `lora_unet_<path with . as _>` and consumes that module's LoRA keys (`lora_down/lora_up/alpha`),
LoHa's (`hada_w1_a/b`, `hada_w2_a/b`) or LoKr's (`lokr_w1`, `lokr_w2` or `lokr_w2_a/b`); what is left unconsumed is
only logged ("not all LoRA keys are used"). Its model's weight names: Qwen-Image and Z-Image use diffusers' module
tree (Z-Image's native fused `attention.qkv` is split into `to_q/k/v` on load), FLUX.2 the BFL one. The name lists
are the peers' state-dict lists (tests/data/*_keys, made with their own code); musubi's own training names (the
`kohya` lists, from its `create_arch_network`) must be among them, which checks the choice of list.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from difflora.models import load_model
from difflora.network.adapters import adapter_options
from difflora.network.files import save_lora
from difflora.network.lora import LoRANetwork, NetworkSpec

sys.path.insert(0, str(Path(__file__).parent / "contract"))
from tiny_families import TINY_FAMILIES  # noqa: E402

DATA = Path(__file__).parent / "data"
# family -> (musubi's model state-dict list, musubi's own trained names)
MUSUBI_MODEL = {
    "qwen_image": (DATA / "qwen_image_keys" / "qwen_image_diffusers_statedict.txt",
                   DATA / "qwen_image_keys" / "qwen_image_kohya.txt"),
    "zimage": (DATA / "zimage_keys" / "zimage_diffusers_statedict.txt", DATA / "zimage_keys" / "zimage_kohya.txt"),
    "flux2": (DATA / "flux2_keys" / "flux2_klein_4b_native_statedict.txt",  # the contract suite's tiny is klein-4B
              DATA / "flux2_keys" / "flux2_klein_4b_kohya.txt"),
}
CONSUMED = {"lora": (".lora_down.weight", ".lora_up.weight", ".alpha"),
            "loha": (".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b", ".alpha"),
            "lokr": (".lokr_w1", ".lokr_w2", ".lokr_w2_a", ".lokr_w2_b", ".alpha")}


def musubi_lora_names(state_dict_list: Path) -> set[str]:
    return {"lora_unet_" + k.removesuffix(".weight").replace(".", "_")
            for k in state_dict_list.read_text().split() if k.endswith(".weight")}


def musubi_merge(keys: set[str], names: set[str]) -> tuple[set[str], set[str]]:
    """(modules musubi merges, keys it leaves unused). It picks the file's type from its first marker key, as
    `detect_network_type` does, then consumes that type's keys of each of its model's names."""
    kind = next((t for t, marker in (("lora", "lora_down"), ("loha", "hada_w1_a"), ("lokr", "lokr_w1"))
                 if any(marker in k for k in keys)), "lora")
    left, merged = set(keys), set()
    for name in names:
        if name + CONSUMED[kind][0] in left:
            merged.add(name)
            left -= {name + s for s in CONSUMED[kind]}
    return merged, left


def random_network(model, algo: str, first_blocks: bool = False, **options) -> LoRANetwork:
    """`algo` on the family's default targets (first_blocks: those of block 0 of each stack, fused q/k/v
    included), with visible random weights."""
    targets = [t for t in model.lora_targets() if not first_blocks or re.search(r"_(blocks|layers)_0_", t.name)]
    net = LoRANetwork.create(targets, NetworkSpec(network_dim=2, network_alpha=1.0,
                                                  adapter=adapter_options(algo, **options)))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return net


def saved_file(model, folder: Path, algo: str, save_format: str = "kohya", **options) -> Path:
    """A file of `algo` in `save_format` (kohya: difflora's default names)."""
    path = folder / f"{algo}_{save_format}.safetensors"
    save_lora(model.export_lora(random_network(model, algo, **options).state_dict(), save_format), path)
    return path


@pytest.fixture(scope="module", params=list(MUSUBI_MODEL))
def tiny(request, tmp_path_factory):
    family = request.param
    spec = TINY_FAMILIES[family]
    folder = tmp_path_factory.mktemp(family) / "model"
    spec.build(folder)
    return family, load_model(folder, options={k: v for k, v in spec.job_keys.items() if k == "zimage_variant"}), folder


@pytest.mark.parametrize("algo", ["lora", "loha", "lokr", "dora"])
def test_musubi_loader_applies_every_module_of_a_saved_file(tiny, tmp_path, algo):
    family, model, _ = tiny
    state_dict_list, musubi_trains = MUSUBI_MODEL[family]
    names = musubi_lora_names(state_dict_list)
    assert set(musubi_trains.read_text().split()) <= names  # the list is musubi's model
    path = saved_file(model, tmp_path, algo)
    with safe_open(path, "pt") as f:
        keys = set(f.keys())
    modules = {k.split(".", 1)[0] for k in keys}
    merged, left = musubi_merge(keys, names)
    print(f"musubi merges {len(merged)}/{len(modules)} modules of difflora's {family} {algo} file; "
          f"{len(left)} keys unused")
    if family == "zimage":  # difflora names the fused qkv / out natively (ComfyUI's names): musubi's split model
        # has no `attention_qkv` / `attention_out`, so only the feed-forward applies
        assert {m.rsplit("_", 1)[0] for m in modules - merged} == {f"lora_unet_layers_{i}_attention" for i in range(30)}
        assert len(merged) == 90 and len(modules) == 150
        return
    assert merged == modules
    if algo == "dora":  # musubi 30c658c4 has no DoRA: the LoRA part applies, dora_scale is left unused
        assert left == {m + ".dora_scale" for m in modules}
    else:
        assert not left


# Z-Image's "musubi" save_format: musubi's own split names (the default kohya file keeps the native fused names,
# the only spelling both ComfyUI and diffusers take whole; musubi's split names lose ComfyUI's attention)
MUSUBI_ADAPTERS = {"lora": {}, "loha": {}, "lokr": {"factor": 6}}  # LoKr: w1's rows must split in three


@pytest.mark.parametrize("tiny", ["zimage"], indirect=True)
@pytest.mark.parametrize("algo", list(MUSUBI_ADAPTERS))
def test_zimage_musubi_format_loads_whole_in_musubi_and_reads_back_exactly(tiny, tmp_path, algo):
    from difflora.network.files import load_lora

    _, model, folder = tiny
    net = random_network(model, algo, **MUSUBI_ADAPTERS[algo])
    path = tmp_path / "musubi.safetensors"
    save_lora(model.export_lora(net.state_dict(), "musubi"), path)
    with safe_open(path, "pt") as f:
        keys = set(f.keys())
    modules = {k.split(".", 1)[0] for k in keys}
    state_dict_list, musubi_trains = MUSUBI_MODEL["zimage"]
    assert modules == set(musubi_trains.read_text().split())  # musubi's own 210 names
    merged, left = musubi_merge(keys, musubi_lora_names(state_dict_list))
    comfyui = modules & musubi_lora_names(COMFYUI_MODEL["zimage"])  # its Lumina2 branch adds no lora_unet_ names
    print(f"musubi merges {len(merged)}/{len(modules)} modules of the musubi-format {algo} file, {len(left)} keys "
          f"unused; ComfyUI's generic key map {len(comfyui)}")
    assert merged == modules and not left
    assert len(comfyui) == 90  # the feed-forward only: what the save warns about
    # read back (generate, network_weights, the tools with a model): the very tensors that were trained
    back = model.adapt_lora_file(load_lora(path)).tensors
    state = net.state_dict()
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    # diffusers' loader: the LoRA file whole, as the default file (its kohya converter takes the split names);
    # LoHa and LoKr raise as they do in the default layout
    x, t, cond = client_inputs(model)
    client = TINY_FAMILIES["zimage"].client_unet
    if algo != "lora":
        with pytest.raises(ValueError, match="state_dict` should be empty|decompose_factor") as e:
            client(folder, path, {"x": x, "t": t, "cond": cond})
        print(f"diffusers, musubi-format {algo}: {type(e.value).__name__}")
        return
    net.apply_to()
    try:
        with torch.no_grad():
            ours = model.predict(x, t, cond)
            net.set_multiplier(0.0)
            without = model.predict(x, t, cond)
    finally:
        net.set_multiplier(1.0)
        net.remove()
    theirs = client(folder, path, {"x": x, "t": t, "cond": cond})
    print("max |diffusers - difflora| with the musubi-format file:", float((theirs - ours).abs().max()))
    assert float((ours - without).abs().max()) > 1e-2
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


@pytest.mark.parametrize("tiny", ["zimage"], indirect=True)
def test_zimage_musubi_format_refuses_what_musubi_cannot_apply_before_training(tiny, caplog):
    from difflora.errors import UserError

    _, model, _ = tiny
    with caplog.at_level("WARNING"):
        model.check_save_format("musubi", adapter_options("lora"))
    assert sum("ComfyUI only the 90 feed-forward" in r.getMessage() for r in caplog.records) == 1
    for options, problem in (({"algo": "lora", "dora_wd": True}, "DoRA (musubi-tuner has none"),
                             ({"algo": "lokr"}, "does not split exactly into q, k and v"),
                             ({"algo": "lokr", "factor": 6, "decompose_both": True}, "network_decompose_both")):
        with pytest.raises(UserError, match=re.escape(problem)) as e:
            model.check_save_format("musubi", adapter_options(**options))
        assert "\n" not in str(e.value)


# ------------------------------------------------------------------ ComfyUI's key map, every adapter
# ComfyUI's model state dicts (tests/data/*_keys, made with ComfyUI's own model classes; Qwen-Image's equals diffusers')
COMFYUI_MODEL = {"qwen_image": DATA / "qwen_image_keys" / "qwen_image_diffusers_statedict.txt",
                 "zimage": DATA / "zimage_keys" / "zimage_native_statedict.txt",
                 "flux2": DATA / "flux2_keys" / "flux2_klein_4b_native_statedict.txt"}
COMFYUI_SUFFIXES = (".lora_up.weight", ".lora_down.weight", ".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b",
                    ".lokr_w1", ".lokr_w2", ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2_a", ".lokr_w2_b")


@pytest.mark.parametrize("algo", ["lora", "loha", "lokr", "dora"])
def test_comfyui_key_map_applies_every_adapter_module(tiny, tmp_path, algo):
    """ComfyUI (comfy/lora.py model_lora_keys_unet, generic branch: `lora_unet_<native path with _>` for every
    weight of its model) maps each module; load_lora then consumes the module's adapter keys, `alpha` and
    `dora_scale` (it applies LoRA, LoHa, LoKr and DoRA by the keys present), leaving none "not loaded"."""
    family, model, _ = tiny
    names = musubi_lora_names(COMFYUI_MODEL[family])  # the same spelling rule: lora_unet_ + path with _
    with safe_open(saved_file(model, tmp_path, algo), "pt") as f:
        keys = set(f.keys())
    loaded = {n + s for n in names for s in (*COMFYUI_SUFFIXES, ".alpha", ".dora_scale")} & keys
    modules = {k.split(".", 1)[0] for k in keys}
    print(f"ComfyUI maps {len({k.split('.', 1)[0] for k in loaded})}/{len(modules)} modules of the {family} {algo} file")
    assert loaded == keys


# ------------------------------------------------------------------ diffusers' load_lora_weights (0.42)
# What it does with each LyCORIS file (plain LoRA loads whole and gives difflora's output: the contract suite):
# "raises" an error naming the LyCORIS keys it could not convert; "ignored": loads without an error and changes
# nothing; "lora part": loads the LoRA factors and drops dora_scale.
DIFFUSERS = {
    ("qwen_image", "loha"): "raises", ("qwen_image", "lokr"): "raises", ("qwen_image", "dora"): "lora part",
    ("zimage", "loha"): "raises", ("zimage", "lokr"): "raises", ("zimage", "dora"): "lora part",
    ("flux2", "loha"): "ignored", ("flux2", "lokr"): "raises", ("flux2", "dora"): "lora part",
}


def client_inputs(model):
    """A latent, timestep and prompt for one denoiser call (difflora's and a client's)."""
    side = 4 * model.latent_downscale
    with torch.no_grad():
        channels = model.encode_images(torch.zeros(1, 3, side, side), sample=False).shape[1]
    x, t = torch.randn(1, channels, 4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([500])
    return x, t, model.encode_prompts(["a face"])


def predict_with_file(model, file: Path, inputs) -> torch.Tensor:
    """The model's prediction with a LoRA file applied through difflora's own reader (removed afterwards)."""
    from difflora.network.apply import network_from_file

    loaded = network_from_file(model, file, 1.0)
    try:
        with torch.no_grad():
            return model.predict(*inputs)
    finally:
        loaded.remove()


@pytest.mark.parametrize("algo", ["loha", "lokr", "dora"])
def test_diffusers_loader_on_lycoris_files(tiny, tmp_path, algo):
    from safetensors.torch import load_file

    family, model, folder = tiny
    path = saved_file(model, tmp_path, algo, first_blocks=True)  # diffusers' loading is slow per module (qwen: 840)
    x, t, cond = client_inputs(model)

    with torch.no_grad():
        base = model.predict(x, t, cond)
    client = TINY_FAMILIES[family].client_unet
    expected = DIFFUSERS[(family, algo)]
    if expected == "raises":
        with pytest.raises(Exception, match="lokr_w|hada_w|lora_unet_") as e:
            client(folder, path, {"x": x, "t": t, "cond": cond})
        print(f"diffusers, {family} {algo}: {type(e.value).__name__}")
        return
    theirs = client(folder, path, {"x": x, "t": t, "cond": cond})
    whole = predict_with_file(model, path, (x, t, cond))
    assert float((whole - base).abs().max()) > 1e-3  # the file changes difflora's output
    if expected == "ignored":
        torch.testing.assert_close(theirs, base, rtol=0, atol=1e-6)
        return
    lora_part = tmp_path / "lora_part.safetensors"
    save_lora({k: v for k, v in load_file(str(path)).items() if not k.endswith(".dora_scale")}, lora_part)
    torch.testing.assert_close(theirs, predict_with_file(model, lora_part, (x, t, cond)), rtol=1e-4, atol=1e-5)
    assert float((theirs - whole).abs().max()) > 1e-3


def test_dora_saved_for_diffusers_loads_whole_in_the_pipeline(tiny, tmp_path, caplog):
    """DoRA with save_format = "diffusers" (magnitude trained per output row): peft's lora_magnitude_vector, split
    with q/k/v where diffusers splits them; the family's pipeline.load_lora_weights gives difflora's output with the
    file (not the LoRA part's), and the file reads back to the network that wrote it."""
    from safetensors.torch import load_file

    from difflora.network.apply import network_from_file

    family, model, folder = tiny
    options = {"dora_wd": True, "dora_on_output": True}
    with caplog.at_level("WARNING"):
        model.check_save_format("diffusers", adapter_options("lora", **options))
    assert sum("magnitude is trained per output row" in r.getMessage() for r in caplog.records) == 1
    net = random_network(model, "lora", first_blocks=True, **options)  # diffusers' DoRA loading is slow per module
    path = tmp_path / "dora_diffusers.safetensors"
    save_lora(model.export_lora(net.state_dict(), "diffusers"), path)
    written = load_file(str(path))
    assert sum(".lora_magnitude_vector" in k for k in written) == sum(".lora_B." in k for k in written) > 0
    lora_part = tmp_path / "lora_part.safetensors"
    save_lora({k: v for k, v in net.state_dict().items() if not k.endswith(".dora_scale")}, lora_part)
    x, t, cond = client_inputs(model)

    back = network_from_file(model, path, 1.0, attach=False).state_dict()
    assert all(torch.equal(back[k], v) for k, v in net.state_dict().items() if k.endswith(".dora_scale"))
    whole, part = (predict_with_file(model, f, (x, t, cond)) for f in (path, lora_part))
    theirs = TINY_FAMILIES[family].client_unet(folder, path, {"x": x, "t": t, "cond": cond})
    print(f"{family}: max |diffusers - difflora| with the DoRA file {float((theirs - whole).abs().max()):.2e}; "
          f"without the magnitude {float((part - whole).abs().max()):.3f}")
    assert float((part - whole).abs().max()) > 1e-2  # the magnitude matters
    torch.testing.assert_close(theirs, whole, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ FLUX.1's T5 in diffusers
def test_diffusers_flux_pipeline_skips_t5_peft_keys(tmp_path):
    """Why `save_format = "diffusers"` refuses `train_t5xxl` (models/flux/model.py check_save_format): FluxPipeline's
    load_lora_weights puts peft keys of `transformer.` on the transformer but none of `text_encoder_2.` (T5) on T5,
    without an error."""
    from diffusers import FluxPipeline
    from safetensors.torch import save_file

    from difflora.toy.tiny_flux import build_tiny_flux

    build_tiny_flux("dev", 1, 1).save(tmp_path / "model")
    pipe = FluxPipeline.from_pretrained(tmp_path / "model", local_files_only=True)
    t5_q = pipe.text_encoder_2.encoder.block[0].layer[0].SelfAttention.q
    to_q = pipe.transformer.transformer_blocks[0].attn.to_q
    g = torch.Generator().manual_seed(0)
    save_file({"text_encoder_2.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight": torch.randn(2, t5_q.in_features, generator=g),
               "text_encoder_2.encoder.block.0.layer.0.SelfAttention.q.lora_B.weight": torch.randn(t5_q.out_features, 2, generator=g),
               "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(2, to_q.in_features, generator=g),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(to_q.out_features, 2, generator=g)},
              str(tmp_path / "peft.safetensors"))
    pipe.load_lora_weights(str(tmp_path / "peft.safetensors"))
    assert hasattr(pipe.transformer.transformer_blocks[0].attn.to_q, "lora_A")
    assert not any(hasattr(m, "lora_A") for m in pipe.text_encoder_2.modules())


# ------------------------------------------------------------------ save formats: refused before training or written
@pytest.mark.parametrize("save_format", ["comfyui", "diffusers"])
def test_a_save_format_is_refused_before_training_or_written_whole(tiny, save_format):
    """check_save_format (run before training) and export_lora (run at each save) agree for every adapter: a
    combination the layout cannot hold is refused up front, never after the training it would waste."""
    from difflora.errors import UserError

    family, model, _ = tiny
    accepted = []
    for algo in ("lora", "loha", "lokr", "dora"):
        options = adapter_options(algo, dora_on_output=save_format == "diffusers")
        try:
            model.check_save_format(save_format, options)
        except UserError as e:
            assert "\n" not in str(e) and save_format in str(e)
            continue
        targets = model.lora_targets()[:: max(1, len(model.lora_targets()) // 24)]  # ~24 modules of every kind
        net = LoRANetwork.create(targets, NetworkSpec(network_dim=2, adapter=options))
        assert model.export_lora(net.state_dict(), save_format)
        accepted.append(algo)
    print(f"{family}, save_format = {save_format}: written for {accepted}, refused before training otherwise")
    assert "lora" in accepted
