"""Model folders difflora writes store CLIP text encoders as published checkpoints do (`text_model.` keys)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from difflora.models import default_model_path, load_model
from difflora.models.registry import family_names


def _te_keys(folder):
    return list(load_file(str(folder / "text_encoder" / "model.safetensors")))


def test_shipped_model_text_encoder_is_in_the_published_layout_and_loads_both_ways(tmp_path):
    shipped = default_model_path()
    keys = _te_keys(shipped)
    assert keys and all(k.startswith("text_model.") for k in keys)
    # the transformers-5 layout (no prefix) of the same tensors loads to the same weights
    flat = tmp_path / "flat"
    shutil.copytree(shipped, flat)
    tensors = load_file(str(shipped / "text_encoder" / "model.safetensors"))
    save_file({k.removeprefix("text_model."): v for k, v in tensors.items()},
              str(flat / "text_encoder" / "model.safetensors"), metadata={"format": "pt"})
    a, b = load_model(shipped).text_encoder, load_model(flat).text_encoder
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    # every weight in the file reached the model (nothing left at its random initialisation)
    own = {k.removeprefix("text_model."): v for k, v in tensors.items()}
    assert all(torch.equal(sa[k], own[k]) for k in own)


def test_saved_model_folders_use_the_published_layout(tmp_path, tiny_sd1_dir):
    model = load_model(tiny_sd1_dir)
    assert all(k.startswith("text_model.") for k in _te_keys(tiny_sd1_dir))
    model.save(tmp_path / "copy")
    assert all(k.startswith("text_model.") for k in _te_keys(tmp_path / "copy"))
    again = load_model(tmp_path / "copy").text_encoder.state_dict()
    assert all(torch.equal(v, again[k]) for k, v in model.text_encoder.state_dict().items())


# ------------------------------------------------------------------ every family's folder, read as older tools read it
# One tiny model per model_family (real layer counts, narrow widths). A registered family without a line here fails
# test_every_registered_family_has_a_tiny_model, so a new family's folders join the checks below by registering.
def _tiny(family: str):
    from difflora.toy.tiny import build_tiny_sd
    from difflora.toy.tiny_flux import build_tiny_flux
    from difflora.toy.tiny_sdxl import build_tiny_sdxl

    from difflora.models.flux2.tiny import build_tiny_flux2
    from difflora.models.zimage.tiny import build_tiny_zimage

    def qwen_image():  # its tiny model is a diffusers folder; the family's own loader reads it
        import tempfile

        from difflora.models.qwen_image.tiny import write_tiny_folder

        return load_model(write_tiny_folder(Path(tempfile.mkdtemp(prefix="tiny_qwen_")) / "model"))

    builders = {"sd1": lambda: build_tiny_sd("sd1", layout="small"), "sd2": lambda: build_tiny_sd("sd2", layout="small"),
                "sdxl": build_tiny_sdxl, "flux": lambda: build_tiny_flux("dev", 1, 1), "zimage": build_tiny_zimage,
                "flux2": build_tiny_flux2, "qwen_image": qwen_image}
    return builders[family]() if family in builders else None


def test_every_registered_family_has_a_tiny_model():
    from difflora.models.registry import family_names

    missing = [f for f in family_names() if _tiny(f) is None]
    assert not missing, f"add a tiny builder for {missing} to _tiny() so its folders are checked"


def transformers4_keys(config: dict) -> tuple[set[str], dict[str, str]]:
    """(keys, {tied key that may be absent: the key it is tied to}) of a text encoder's state dict as
    transformers 4.x names them.

    From the 4.x module trees: CLIPTextModel and CLIPTextModelWithProjection hold a `text_model`
    (CLIPTextTransformer: embeddings, encoder.layers, final_layer_norm), the latter plus `text_projection`;
    T5EncoderModel holds `shared` and an `encoder` stack whose `embed_tokens` is tied to `shared`."""
    arch = (config.get("architectures") or ["?"])[0]
    if arch in ("CLIPTextModel", "CLIPTextModelWithProjection"):
        keys = {"text_model.embeddings.token_embedding.weight", "text_model.embeddings.position_embedding.weight",
                "text_model.final_layer_norm.weight", "text_model.final_layer_norm.bias"}
        for i in range(config["num_hidden_layers"]):
            layer = f"text_model.encoder.layers.{i}."
            for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                         "layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2"):
                keys |= {layer + part + ".weight", layer + part + ".bias"}
        if arch == "CLIPTextModelWithProjection":
            keys.add("text_projection.weight")
        return keys, {}
    if arch == "T5EncoderModel":
        gated = config.get("feed_forward_proj", "relu").startswith("gated-")
        keys = {"shared.weight", "encoder.final_layer_norm.weight",
                "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"}
        for i in range(config["num_layers"]):
            block = f"encoder.block.{i}.layer."
            keys |= {block + f"0.SelfAttention.{p}.weight" for p in "qkvo"} | {block + "0.layer_norm.weight",
                                                                            block + "1.layer_norm.weight"}
            keys |= {block + f"1.DenseReluDense.{p}.weight" for p in (("wi_0", "wi_1", "wo") if gated else ("wi", "wo"))}
        return keys, {"encoder.embed_tokens.weight": "shared.weight"}
    if arch in ("Qwen3Model", "Qwen3ForCausalLM"):  # embed_tokens, layers (attention with q/k norms, gated MLP,
        # two RMSNorms), norm; the causal LM holds that under `model.` with an lm_head tied to embed_tokens
        keys = {"embed_tokens.weight", "norm.weight"}
        projections = ("q_proj", "k_proj", "v_proj", "o_proj")
        for i in range(config["num_hidden_layers"]):
            layer = f"layers.{i}."
            keys |= {layer + f"self_attn.{p}.weight" for p in projections}
            if config.get("attention_bias"):
                keys |= {layer + f"self_attn.{p}.bias" for p in projections}
            keys |= {layer + f"self_attn.{n}.weight" for n in ("q_norm", "k_norm")}
            keys |= {layer + f"mlp.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")}
            keys |= {layer + f"{n}.weight" for n in ("input_layernorm", "post_attention_layernorm")}
        if arch == "Qwen3Model":
            return keys, {}
        keys = {"model." + k for k in keys}
        if not config.get("tie_word_embeddings"):
            return keys | {"lm_head.weight"}, {}
        return keys, {"lm_head.weight": "model.embed_tokens.weight"}
    if arch == "Qwen2_5_VLForConditionalGeneration":  # 4.x: model.* (the language model), visual.*, lm_head
        text, vision = config.get("text_config", config), config["vision_config"]
        keys = {"model.embed_tokens.weight", "model.norm.weight", "visual.patch_embed.proj.weight",
                "visual.merger.ln_q.weight"} | {f"visual.merger.mlp.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
        for i in range(text["num_hidden_layers"]):
            layer = f"model.layers.{i}."
            keys |= {layer + f"self_attn.{p}_proj.{w}" for p in "qkv" for w in ("weight", "bias")}
            keys |= {layer + "self_attn.o_proj.weight", layer + "input_layernorm.weight",
                     layer + "post_attention_layernorm.weight"}
            keys |= {layer + f"mlp.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")}
        for i in range(vision["depth"]):
            block = f"visual.blocks.{i}."
            keys |= {block + "norm1.weight", block + "norm2.weight"}
            keys |= {block + f"{p}.{w}" for p in ("attn.qkv", "attn.proj", "mlp.gate_proj", "mlp.up_proj",
                                                   "mlp.down_proj") for w in ("weight", "bias")}
        if not (text.get("tie_word_embeddings") or config.get("tie_word_embeddings")):
            return keys | {"lm_head.weight"}, {}
        return keys, {"lm_head.weight": "model.embed_tokens.weight"}
    raise AssertionError(f"text encoder architecture {arch}: add its transformers-4 layout to transformers4_keys")


# Where transformers 5's module tree puts what transformers 4 names otherwise (it renames on load and on save).
_TO_TRANSFORMERS5 = {
    "CLIPTextModel": lambda k: k.removeprefix("text_model."),
    "Qwen2_5_VLForConditionalGeneration": lambda k: ("model." + k if k.startswith("visual.") else
                                                     "model.language_model." + k.removeprefix("model.")
                                                     if k.startswith("model.") else k),
}


def _load_as_transformers4(sub):
    """A text encoder read the way transformers 4 reads its folder: the file's keys must be exactly the 4.x names,
    which are then placed into the model (4.x's `text_model.` prefix of CLIPTextModel is part of its module tree)."""
    import json

    import transformers

    config = json.loads((sub / "config.json").read_text())
    tensors = {}
    for f in sorted(sub.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    expected, tied = transformers4_keys(config)
    missing, unexpected = expected - set(tensors), set(tensors) - expected - set(tied)
    assert not missing and not unexpected, (sub.name, sorted(missing)[:3], len(missing), sorted(unexpected)[:3],
                                            len(unexpected))
    arch = config["architectures"][0]
    model = getattr(transformers, arch)(getattr(transformers, arch).config_class.from_dict(config)).eval()
    tensors.update({k: tensors[source] for k, source in tied.items() if k not in tensors})
    rename = _TO_TRANSFORMERS5.get(arch, lambda k: k)
    own = {rename(k): v for k, v in tensors.items()}
    model.load_state_dict(own, strict=True)
    return model


@pytest.fixture(scope="module", params=family_names())
def written_folder(request, tmp_path_factory):
    """(the tiny model, the diffusers folder its family's writer made of it)."""
    model = _tiny(request.param)
    folder = tmp_path_factory.mktemp(f"folder_{request.param}") / "model"
    model.save(folder)
    return model, folder


TEXTS = ["a photo of a face with closed eyes", "Glasses,  smiling!  ", "unseenword xyz 42"]


def test_written_text_encoders_load_in_the_transformers4_layout_with_equal_outputs(written_folder):
    import json

    model, folder = written_folder
    subs = {json.loads(c.read_text()).get("architectures", ["?"])[0]: c.parent for c in folder.glob("*/config.json")}
    assert model.text_encoders
    torch.manual_seed(0)
    for original in model.text_encoders.values():
        arch = type(original).__name__
        assert arch in subs, (arch, sorted(subs))
        read = _load_as_transformers4(subs[arch])
        ids = torch.randint(0, original.get_input_embeddings().num_embeddings, (2, 9))
        with torch.no_grad():
            want, got = original(input_ids=ids), read(input_ids=ids)
        outputs = [(a, b) for a, b in zip(want.to_tuple(), got.to_tuple()) if isinstance(a, torch.Tensor)]
        assert outputs and all(torch.equal(a, b) for a, b in outputs), arch  # hidden states, projections, logits


def _from_files(tokenizer_dir, names, tmp_path):
    """A folder holding only `names` of a written tokenizer folder."""
    alone = tmp_path / f"{tokenizer_dir.name}_alone"
    alone.mkdir()
    for name in names:
        assert (tokenizer_dir / name).is_file(), f"{tokenizer_dir.name}/{name} is missing"
        shutil.copy(tokenizer_dir / name, alone / name)
    return alone


def test_written_tokenizer_folders_hold_the_files_older_readers_load(written_folder, tmp_path):
    import json

    import transformers
    from tokenizers import Tokenizer
    from transformers.convert_slow_tokenizer import T5Converter

    _, folder = written_folder
    dirs = sorted(p.parent for p in folder.glob("*/tokenizer.json"))
    assert dirs
    for tok_dir in dirs:
        fast = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
        config = json.loads((tok_dir / "tokenizer_config.json").read_text())
        assert not isinstance(config.get("extra_special_tokens"), list)  # transformers 4 needs a dict there
        kind = json.loads((tok_dir / "tokenizer.json").read_text())["model"]["type"]
        if kind == "BPE":  # CLIP, Qwen: the slow tokenizer's vocab.json + merges.txt
            alone = _from_files(tok_dir, ("vocab.json", "merges.txt", "tokenizer_config.json"), tmp_path)
            slow = getattr(transformers, config["tokenizer_class"]).from_pretrained(str(alone))
            assert not (alone / "tokenizer.json").exists()
            for text in TEXTS:
                assert slow(text).input_ids == fast.encode(text).ids, (tok_dir.name, text)
        else:  # T5: SentencePiece's spiece.model, read by the converter transformers builds T5 tokenizers with
            assert kind == "Unigram", (tok_dir.name, kind)
            alone = _from_files(tok_dir, ("spiece.model", "tokenizer_config.json"), tmp_path)
            stub = type("Slow", (), {"vocab_file": str(alone / "spiece.model"), "_extra_ids": 0, "legacy": True,
                                     "add_prefix_space": True,
                                     "convert_tokens_to_ids": lambda self, t: fast.token_to_id(t)})()
            from_spiece = T5Converter(stub).converted()
            for text in TEXTS:
                assert from_spiece.encode(text).ids == fast.encode(text).ids, (tok_dir.name, text)
