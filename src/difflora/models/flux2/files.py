"""FLUX.2 on disk: diffusers folders (Flux2Pipeline, Flux2KleinPipeline) and BFL / ComfyUI single files
(`flux2-dev.safetensors`, `flux-2-klein-4b.safetensors`, bare or `model.diffusion_model.` keys) with the
`text_encoder` (a Qwen3 / Mistral folder or file) and `vae` files given as job keys, as in musubi.

A single file given without text_encoder and vae loads as a transformer only (enough for merge, extract,
resize and inspect); training and generation then stop with a line naming the missing key.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ...errors import UserError
from ...fileio import load_safetensors, save_safetensors, write_json_atomic
from ..comfy_files import dequantize_scaled_fp8
from ..folders import publish_layout, read_transformer_folder
from . import names
from .model import SCHEDULER_CONFIG, Flux2Model, Flux2Options
from .variants import HEAD_DIM, MODEL_VERSIONS, Size, size_from_counts

log = logging.getLogger(__name__)

SUPPORTED = "supported: FLUX.2 dev, klein 4B / 9B and klein base 4B / 9B (and fine-tunes of them)"
PIPELINES = {"Flux2Pipeline": "mistral3", "Flux2KleinPipeline": "qwen3"}


# ------------------------------------------------------------------ the transformer
@functools.cache
def _final_norm_shift_scale():
    from diffusers.models.normalization import AdaLayerNormContinuous

    class FinalNormShiftScale(AdaLayerNormContinuous):
        """diffusers' final AdaLN with BFL's output order (shift, scale): `norm_out.linear` holds BFL's
        `final_layer.adaLN_modulation.1` as is, so kohya / ComfyUI LoRAs on it apply without reordering rows."""

        def forward(self, x, conditioning_embedding):
            emb = self.linear(self.silu(conditioning_embedding).to(x.dtype))
            shift, scale = emb.chunk(2, dim=1)
            return self.norm(x) * (1 + scale)[:, None, :] + shift[:, None, :]

    return FinalNormShiftScale


def fuse_structure(transformer) -> None:
    """Give each double block's attention diffusers' fused `to_qkv` / `to_added_qkv` and drop the split Linears
    (on the meta device before loading: the weights are never held twice); the final norm in BFL's order."""
    transformer.norm_out.__class__ = _final_norm_shift_scale()
    for block in transformer.transformer_blocks:
        attn = block.attn
        dev = attn.to_q.weight.device
        attn.to_qkv = torch.nn.Linear(attn.query_dim, 3 * attn.inner_dim, bias=False, device=dev)
        attn.to_added_qkv = torch.nn.Linear(attn.added_kv_proj_dim, 3 * attn.inner_dim, bias=False, device=dev)
        for split in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
            delattr(attn, split)
        attn.fused_projections = True


def build_transformer(config: dict, state_dict: dict[str, torch.Tensor] | None = None, dtype=torch.float32):
    """diffusers' Flux2Transformer2DModel with fused projections; `state_dict` in our (fused) names, else random."""
    from diffusers import Flux2Transformer2DModel

    config = {k: v for k, v in config.items() if not k.startswith("_")}
    if state_dict is None:
        tr = Flux2Transformer2DModel(**config)
        fuse_structure(tr)
        for block in tr.transformer_blocks:
            for lin in (block.attn.to_qkv, block.attn.to_added_qkv):
                torch.nn.init.normal_(lin.weight, 0, lin.in_features ** -0.5)
        return tr if dtype == torch.float32 else tr.to(dtype)
    with torch.device("meta"):
        tr = Flux2Transformer2DModel(**config)
    fuse_structure(tr)
    weights = {k: v.to(dtype) for k, v in state_dict.items()}
    damaged = next((k for k, v in weights.items() if not bool(torch.isfinite(v).all())), None)
    if damaged is not None:  # a damaged or overflowed file would draw black images and train on NaN losses
        raise NonFiniteWeight(damaged)
    tr.load_state_dict(weights, strict=True, assign=True)
    return tr


class NonFiniteWeight(Exception):
    """A transformer weight holding NaN/inf (its name in our transformer): the loaders name the file."""


def config_from_bfl(shapes: dict[str, tuple[int, ...]]) -> dict:
    """diffusers' transformer config from BFL tensor shapes (heads of 128, as BFL's and ComfyUI's detection)."""
    hidden, in_channels = shapes["img_in.weight"]
    double = 1 + max(int(k.split(".")[1]) for k in shapes if k.startswith("double_blocks."))
    single = 1 + max(int(k.split(".")[1]) for k in shapes if k.startswith("single_blocks."))
    mlp_rows = shapes["double_blocks.0.img_mlp.0.weight"][0]
    return dict(patch_size=1, in_channels=in_channels, out_channels=None, num_layers=double,
                num_single_layers=single, attention_head_dim=HEAD_DIM, num_attention_heads=hidden // HEAD_DIM,
                joint_attention_dim=shapes["txt_in.weight"][1],
                timestep_guidance_channels=shapes["time_in.in_layer.weight"][1], mlp_ratio=mlp_rows / 2 / hidden,
                axes_dims_rope=[HEAD_DIM // 4] * 4, rope_theta=2000, eps=1e-6,
                guidance_embeds="guidance_in.in_layer.weight" in shapes)


def _size(config: dict) -> Size:
    return size_from_counts(config["num_layers"], config["num_single_layers"], config["joint_attention_dim"],
                            bool(config.get("guidance_embeds", True)))


def check_flux2_keys(keys, path) -> None:
    """Refuse a FLUX.1 file given as FLUX.2 with a line saying what it is."""
    keys = set(keys)
    if any(k.startswith("double_blocks.") for k in keys) and "double_stream_modulation_img.lin.weight" not in keys:
        raise UserError("this is a FLUX.1 transformer (per-block modulation, no double_stream_modulation), not "
                        f"FLUX.2; {SUPPORTED}", path=path)
    for k in ("img_in.weight", "txt_in.weight", "double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight"):
        if k not in keys:
            raise UserError(f"not a complete FLUX.2 transformer ({k} is missing); {SUPPORTED}", path=path)


def transformer_from_bfl(sd: dict[str, torch.Tensor], md: dict[str, str], dtype, path):
    sd = dequantize_scaled_fp8(names.strip_prefix(sd), path)
    check_flux2_keys(sd, path)
    cfg = json.loads(md["difflora.flux2_config"]) if md.get("difflora.flux2_config") else \
        config_from_bfl({k: tuple(v.shape) for k, v in sd.items()})
    try:
        fused = names.bfl_to_fused(sd, cfg["num_layers"], cfg["num_single_layers"], cfg["guidance_embeds"])
        return build_transformer(cfg, fused, dtype), cfg
    except NonFiniteWeight as e:
        raise UserError(f"transformer weight {_bfl_name(str(e.args[0]), cfg)} holds NaN/inf: the file is damaged "
                        "(the model itself overflows)", path=path) from None
    except (KeyError, RuntimeError) as e:
        raise UserError(f"the tensors do not form a FLUX.2 transformer ({str(e).splitlines()[0][:160]}); {SUPPORTED}",
                        path=path) from None


def _bfl_name(ours: str, cfg: dict) -> str:
    """Our transformer's weight name as the BFL file spells it."""
    module = ours[: -len(".weight")]
    bfl = {v: k for k, v in names.module_map(cfg["num_layers"], cfg["num_single_layers"], cfg["guidance_embeds"],
                                              norms=True).items()}.get(module)
    return ours if bfl is None else f"{bfl}.scale" if bfl.endswith("_norm") else f"{bfl}.weight"


def check_folder(path: Path) -> None:
    """A diffusers FLUX.2 folder before any weight is read: its components, their configs (JSON objects, sizes
    of the right types), the transformer's weight index, and the widths the components must share."""
    from ..folders import CHANNEL_LISTS, VAE_INTS, check_config

    for comp in ("transformer", "vae", "text_encoder", "tokenizer"):
        if not (path / comp).is_dir():
            raise UserError(f"FLUX.2 model folder is missing its {comp}/ component", path=path)
    configs = {"transformer": ("in_channels", "num_layers", "num_single_layers", "attention_head_dim",
                               "num_attention_heads", "joint_attention_dim", "patch_size"),
               "vae": VAE_INTS, "text_encoder": ("hidden_size", "num_hidden_layers")}
    for comp, ints in configs.items():
        if not (path / comp / "config.json").is_file():
            raise UserError(f"FLUX.2 model folder is missing {comp}/config.json", path=path)
        check_config(path / comp / "config.json", ints, CHANNEL_LISTS if comp == "vae" else (),
                     ("guidance_embeds",) if comp == "transformer" else ())
    _check_weight_index(path / "transformer")
    tr, vae, te = (json.loads((path / c / "config.json").read_text(encoding="utf-8")) for c in configs)
    te_width = (te.get("text_config") or te).get("hidden_size")
    latent = vae.get("latent_channels", 32)
    if tr.get("in_channels", 128) != 4 * latent:
        raise UserError(f"the transformer takes {tr.get('in_channels', 128)} channels but the VAE gives {latent} "
                        f"latent channels in 2x2 patches ({4 * latent}): the components are of different models",
                        path=path / "transformer" / "config.json")
    joint = tr.get("joint_attention_dim")
    if isinstance(te_width, int) and isinstance(joint, int) and joint != 3 * te_width:
        raise UserError(f"the transformer takes {joint} text features per token but the text encoder gives 3 "
                        f"layers of {te_width} ({3 * te_width}): the components are of different models",
                        path=path / "text_encoder" / "config.json")


def _check_weight_index(folder: Path) -> None:
    """A sharded transformer's index: a JSON object whose weight_map names shards inside the folder."""
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if not index.exists():
        return
    try:
        body = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise UserError(f"not a readable JSON index ({str(e)[:80]})", path=index) from None
    weight_map = body.get("weight_map") if isinstance(body, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise UserError("not a weight index: expected an object with a weight_map of tensor names to shard files",
                        path=index)
    for shard in sorted(set(weight_map.values())):
        if Path(shard).name != shard:
            raise UserError(f"the index names a shard outside its folder: {shard!r}", path=index)
        if not (folder / shard).is_file():
            raise UserError(f"the index names a shard that is not there: {shard}", path=index)


def check_component_files(options) -> None:
    """A single file's text_encoder / vae files: there, with a readable header, before the transformer is read
    (a text encoder folder is read by transformers)."""
    from ...fileio import read_safetensors_header

    for key in ("text_encoder", "vae"):
        component = getattr(options, key)
        if component is not None and Path(component).is_file():
            read_safetensors_header(component)


# ------------------------------------------------------------------ text encoder, tokenizer, VAE
def _has_tokenizer(folder: Path) -> bool:
    return folder.is_dir() and any((folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json",
                                                                      "tekken.json", "vocab.json"))


def load_tokenizer(folder: Path, kind: str, path_for_errors):
    """The tokenizer alone (dev's folder holds a Pixtral processor; text prompts need only its tokenizer and
    chat template)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:
        raise UserError(f"could not load the {kind} tokenizer ({type(e).__name__}: {str(e).splitlines()[0][:160]})",
                        path=path_for_errors) from None
    if not tok.chat_template:
        raise UserError(f"the {kind} tokenizer has no chat template (FLUX.2 formats prompts with it)",
                        path=path_for_errors)
    return tok


def _qwen3_config_from(sd: dict[str, torch.Tensor]):
    from transformers import Qwen3Config

    vocab, hidden = sd["embed_tokens.weight"].shape
    layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("layers."))
    head_dim = sd["layers.0.self_attn.q_norm.weight"].shape[0]
    return Qwen3Config(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, head_dim=head_dim,
                       num_attention_heads=sd["layers.0.self_attn.q_proj.weight"].shape[0] // head_dim,
                       num_key_value_heads=sd["layers.0.self_attn.k_proj.weight"].shape[0] // head_dim,
                       intermediate_size=sd["layers.0.mlp.gate_proj.weight"].shape[0], tie_word_embeddings=False)


def load_text_encoder(path, kind: str, size: Size, dtype, tokenizer=None):
    """A text encoder folder (transformers layout, with its tokenizer or `tokenizer` given) or a single Qwen3
    file (ComfyUI's qwen_3_4b.safetensors: `model.` keys); checks its width is the one this transformer takes."""
    from transformers import AutoModel, Mistral3ForConditionalGeneration, Qwen3Model

    path = Path(path)
    if not path.exists():
        raise UserError("`text_encoder` not found", path=path)
    tok_folder = Path(tokenizer) if tokenizer else (path if path.is_dir() else path.parent / "tokenizer")
    if not _has_tokenizer(tok_folder):
        raise UserError(f"no tokenizer for the {kind} text encoder: set `qwen3_tokenizer` to its folder (tokenizer.json; "
                        "difflora never downloads one)", path=tok_folder)
    if path.is_dir():
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8")) if (path / "config.json").exists() else {}
        found = str(cfg.get("model_type", ""))
        want = "mistral3" if kind == "mistral3" else "qwen3"
        if found != want:
            raise UserError(f"`text_encoder` is a {found or 'unknown'} model; FLUX.2 {size.name} uses {want}", path=path)
        cls = Mistral3ForConditionalGeneration if kind == "mistral3" else AutoModel
        try:
            te = cls.from_pretrained(str(path), local_files_only=True, dtype=dtype)
        except Exception as e:
            raise UserError(f"could not load the text encoder ({type(e).__name__}: {str(e).splitlines()[0][:160]})",
                            path=path) from None
    else:
        if kind != "qwen3":
            raise UserError("FLUX.2 dev's Mistral text encoder is read from its folder (config.json + weights)",
                            path=path)
        sd, _ = load_safetensors(path)
        sd = {k[len("model."):] if k.startswith("model.") else k: v for k, v in sd.items() if not k.startswith("lm_head")}
        if "embed_tokens.weight" not in sd or "layers.0.self_attn.q_norm.weight" not in sd:
            raise UserError("not a Qwen3 text encoder file (no embed_tokens / q_norm); FLUX.2 klein takes Qwen3 4B / 8B",
                            path=path)
        te = Qwen3Model(_qwen3_config_from(sd))
        te.load_state_dict({k: v.to(torch.float32) for k, v in sd.items()}, strict=True)
        te = te.to(dtype)
    return te, load_tokenizer(tok_folder, kind, tok_folder)


def load_vae(path, dtype):
    """FLUX.2's autoencoder: a diffusers folder, or a .safetensors file in diffusers' layout or BFL's (LDM) layout
    with the `bn.running_mean` / `running_var` statistics."""
    from diffusers import AutoencoderKLFlux2
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    from ..ldm import VAE_PREFIX

    path = Path(path)
    if path.is_dir():
        try:
            return AutoencoderKLFlux2.from_pretrained(str(path), local_files_only=True, torch_dtype=dtype)
        except Exception as e:
            raise UserError(f"could not load the FLUX.2 VAE ({type(e).__name__}: {str(e).splitlines()[0][:160]})",
                            path=path) from None
    if not path.is_file():
        raise UserError("`vae` not found", path=path)
    sd, md = load_safetensors(path)
    if "bn.running_mean" not in sd:
        what = "FLUX.1's 16-channel ae" if "decoder.conv_in.weight" in sd and sd["decoder.conv_in.weight"].shape[1] == 16 \
            else "not an autoencoder with FLUX.2's latent statistics"
        raise UserError(f"`vae` has no bn.running_mean: {what}; FLUX.2 takes its own VAE (flux2-vae.safetensors)",
                        path=path)
    cfg = json.loads(md["difflora.config"]) if md.get("difflora.config") else {}
    vae = AutoencoderKLFlux2(**cfg)
    if "encoder.conv_in.weight" in sd and "encoder.down_blocks.0.resnets.0.conv1.weight" not in sd:
        bn = {k: v for k, v in sd.items() if k.startswith("bn.")}
        ldm = {VAE_PREFIX + k: v.float() for k, v in sd.items() if not k.startswith("bn.")}
        sd = {**convert_ldm_vae_checkpoint(ldm, dict(vae.config)), **bn}
    try:
        vae.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()}, strict=True)
    except RuntimeError as e:
        raise UserError(f"`vae` does not match FLUX.2's autoencoder ({str(e).splitlines()[0][:160]})", path=path) from None
    return vae.to(dtype)


# ------------------------------------------------------------------ loading
def load_diffusers_folder(path: Path, *, dtype=torch.float32, options: Flux2Options | None = None) -> Flux2Model:
    from diffusers import AutoencoderKLFlux2

    index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
    cls = str(index.get("_class_name", ""))
    if cls not in PIPELINES:
        raise UserError(f"this is a {cls} folder; {SUPPORTED} ({', '.join(PIPELINES)} folders)", path=path)
    check_folder(path)
    dsd, cfg = read_transformer_folder(path / "transformer", ("Flux2Transformer2DModel",), SUPPORTED)
    size = _size(cfg)
    options = options or Flux2Options()
    if cls == "Flux2KleinPipeline":
        options.distilled = bool(index.get("is_distilled", False))
    try:
        tr = build_transformer(cfg, names.diffusers_to_fused(dsd), dtype)
    except NonFiniteWeight as e:
        raise UserError(f"transformer weight {e.args[0]} holds NaN/inf: the file is damaged (the model itself "
                        "overflows)", path=path / "transformer") from None
    except (KeyError, RuntimeError) as e:
        raise UserError(f"transformer weights do not match its config ({str(e).splitlines()[0][:160]}); {SUPPORTED}",
                        path=path) from None
    try:
        vae = AutoencoderKLFlux2.from_pretrained(path, subfolder="vae", local_files_only=True, torch_dtype=dtype)
    except Exception as e:
        raise UserError(f"could not load the FLUX.2 VAE ({type(e).__name__}: {str(e).splitlines()[0][:160]})",
                        path=path / "vae") from None
    te, tok = load_text_encoder(path / "text_encoder", PIPELINES[cls], size, dtype, path / "tokenizer")
    model = Flux2Model(tr, vae, te, tok, size, source=str(path), options=options)
    _check_text_width(model, path / "text_encoder")
    model.freeze()
    return model


def _check_text_width(model: Flux2Model, path) -> None:
    te = model.text_encoders["text_encoder"]
    if te is None:
        return
    width = te.config.get_text_config().hidden_size * len(model.size.text_layers)
    want = model.transformer.config.joint_attention_dim
    if width != want:
        raise UserError(f"the text encoder gives {width} features per token (3 stacked layers of "
                        f"{width // 3}), but this FLUX.2 transformer takes {want} ({want // 3}-wide encoder: "
                        f"{'Qwen3-4B 2560, Qwen3-8B 4096' if model.size.text_encoder == 'qwen3' else 'Mistral Small 5120'})",
                        path=path)


def load_single_file(path: Path, *, checkpoint=None, text_encoder=None, vae=None, tokenizer=None,
                     dtype=torch.float32, options: Flux2Options | None = None, model_version: str | None = None) -> Flux2Model:
    sd, md = checkpoint if checkpoint is not None else load_safetensors(path)
    tr, cfg = transformer_from_bfl(sd, md, dtype, path)
    size = _size(cfg)
    options = options or Flux2Options()
    if model_version:
        want, options.distilled = MODEL_VERSIONS[model_version]
        if want != size.name:
            raise UserError(f"model_version = {model_version!r} but this file is FLUX.2 {size.name}", path=path)
    elif size.name != "dev":
        log.info("%s: klein base and distilled have the same weights; treating it as the base model "
                 "(set model_version = \"%s\" for the distilled one)", path, size.name)
    if bool(text_encoder) != bool(vae):
        missing = "vae" if text_encoder else "text_encoder"
        raise UserError(f"a FLUX.2 single-file transformer needs its text encoder and VAE: set `{missing}` "
                        "(text_encoder and vae, as in musubi)", path=path)
    te = tok = v = None
    if text_encoder:
        te, tok = load_text_encoder(text_encoder, size.text_encoder, size, dtype, tokenizer)
        v = load_vae(vae, dtype)
    model = Flux2Model(tr, v, te, tok, size, source=str(path), options=options)
    _check_text_width(model, text_encoder)
    model.freeze()
    return model


# ------------------------------------------------------------------ saving
def _plain(sd: dict[str, torch.Tensor], dtype) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        v = v.float() if v.dtype == torch.float8_e4m3fn else v
        out[k] = v.to(dtype) if dtype is not None and v.is_floating_point() else v
    return out


def transformer_config(model: Flux2Model) -> dict:
    return {k: v for k, v in dict(model.transformer.config).items() if not k.startswith("_")}


def save_bfl_transformer(model: Flux2Model, path: Path, dtype=None) -> None:
    cfg = transformer_config(model)
    sd = names.fused_to_bfl(_plain(model.transformer.state_dict(), dtype), cfg["num_layers"],
                            cfg["num_single_layers"], cfg["guidance_embeds"])
    save_safetensors(sd, path, {"difflora.flux2_config": json.dumps(cfg)})


def save_diffusers_folder(model: Flux2Model, path: Path, dtype=None) -> None:
    if path.exists():
        raise UserError("output folder already exists; choose another path", path=path)
    te = model.text_encoders["text_encoder"]
    if te is None or model.vae is None:
        raise UserError("this FLUX.2 model has no text encoder or VAE (dropped, or a transformer-only file); "
                        "cannot save a folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        (tmp / "transformer").mkdir()
        save_safetensors(names.fused_to_diffusers(_plain(model.transformer.state_dict(), dtype)),
                         tmp / "transformer" / "diffusion_pytorch_model.safetensors")
        write_json_atomic(tmp / "transformer" / "config.json",
                          {"_class_name": "Flux2Transformer2DModel", **transformer_config(model)})
        model.vae.save_pretrained(tmp / "vae", safe_serialization=True)
        te.save_pretrained(tmp / "text_encoder", safe_serialization=True)
        model.tokenizer.save_pretrained(tmp / "tokenizer")
        (tmp / "scheduler").mkdir()
        write_json_atomic(tmp / "scheduler" / "scheduler_config.json",
                          {"_class_name": "FlowMatchEulerDiscreteScheduler", **SCHEDULER_CONFIG})
        klein = model.size.text_encoder == "qwen3"
        index = {"_class_name": "Flux2KleinPipeline" if klein else "Flux2Pipeline",
                 "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
                 "text_encoder": ["transformers", type(te).__name__],
                 "tokenizer": ["transformers", type(model.tokenizer).__name__],
                 "transformer": ["diffusers", "Flux2Transformer2DModel"], "vae": ["diffusers", "AutoencoderKLFlux2"]}
        if klein:
            index["is_distilled"] = model.options.distilled
        write_json_atomic(tmp / "model_index.json", index)
        publish_layout(tmp)  # tokenizer files transformers 4 reads (vocab.json, merges.txt)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_component_files(model: Flux2Model, folder: Path) -> dict[str, Path]:
    """The text encoder (a single Qwen3 file with `model.` keys, as ComfyUI's, plus its tokenizer folder beside
    it) and the VAE (BFL's LDM layout with the BatchNorm statistics) as musubi's and ComfyUI's users have them."""
    from ..ldm import VAE_PREFIX, vae_to_ldm

    folder.mkdir(parents=True, exist_ok=True)
    te = model.text_encoders["text_encoder"]
    out = {"text_encoder": folder / "text_encoder.safetensors", "vae": folder / "vae.safetensors",
           "tokenizer": folder / "tokenizer"}
    base = te.model if hasattr(te, "lm_head") else te
    save_safetensors({"model." + k: v for k, v in base.state_dict().items()}, out["text_encoder"])
    model.tokenizer.save_pretrained(out["tokenizer"])
    vcfg = {k: v for k, v in dict(model.vae.config).items() if not k.startswith("_")}
    vsd = model.vae.state_dict()
    ldm = vae_to_ldm({k: v for k, v in vsd.items() if not k.startswith("bn.")}, vcfg)
    tensors = {k[len(VAE_PREFIX):]: v for k, v in ldm.items()}
    tensors.update({k: v for k, v in vsd.items() if k.startswith("bn.")})
    save_safetensors(tensors, out["vae"], {"difflora.config": json.dumps(vcfg)})
    return out



def load_flux2(path: Path, *, dtype=torch.float32, checkpoint=None, options=None, mixed_precision: str = "no"):
    """The plug-in's loader: `options` (Flux2JobOptions: the job's keys or generate's flags) names the files and
    sets the options; keys a job leaves unset take musubi's FLUX.2 defaults (model.Flux2Options)."""
    from ..flow_matching import FlowMatchOptions, weighting_of
    from .options import Flux2JobOptions

    options = options or Flux2JobOptions()
    given = options.model_fields_set
    if mixed_precision == "bf16" or options.fp8_base:
        dtype = torch.bfloat16  # the frozen model in the mixed-precision dtype; LoRA weights stay fp32
    opts = Flux2Options(max_token_length=options.text_encoder_max_token_length, train_blocks=options.train_blocks)
    flow = opts.flow
    opts.flow = FlowMatchOptions(
        options.timestep_sampling if "timestep_sampling" in given else flow.timestep_sampling,
        options.sigmoid_scale, options.discrete_flow_shift,
        options.model_prediction_type if "model_prediction_type" in given else flow.model_prediction_type,
        **weighting_of(options))
    if "guidance_scale" in given:
        opts.guidance_scale = options.guidance_scale
    if path.is_dir():
        model = load_diffusers_folder(path, dtype=dtype, options=opts)
    else:
        model = load_single_file(path, checkpoint=checkpoint, text_encoder=options.text_encoder, vae=options.vae,
                                 tokenizer=options.qwen3_tokenizer, dtype=dtype, options=opts,
                                 model_version=options.model_version)
    if options.fp8_base:
        model.store_base_fp8()
    if options.nf4_base:
        model.store_base_nf4()
    return model
