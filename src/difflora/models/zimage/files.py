"""Z-Image on disk: diffusers folders (Tongyi-MAI/Z-Image-Turbo, Z-Image) and ComfyUI's files
(`z_image_turbo_bf16.safetensors` with native names, `qwen_3_4b.safetensors`, FLUX.1's `ae.safetensors`).

Neither layout says Turbo or Base (same architecture and keys): the variant comes from the job
(`zimage_variant`), else from difflora's own metadata in a file it wrote, else a one-line refusal.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ...errors import UserError
from ...fileio import load_safetensors, read_safetensors_header, save_safetensors
from ..comfy_files import dequantize_scaled_fp8, strip_comfy_prefix
from ..flow_matching import FlowMatchOptions, weighting_of
from .model import SAMPLING_SHIFT, ZImageModel
from .transformer import (fuse_attention, fuse_split_keys, fused_model_to_native_keys, native_to_fused_model_keys,
                          split_fused_keys)

VARIANT_KEY = "difflora.zimage_variant"
CONFIG_KEY = "difflora.config"
FOLDER_VARIANT_KEY = "_difflora_zimage_variant"  # in a folder's model_index.json (diffusers ignores "_" keys)
# the same place: "omni" marks a model trained to edit in the Omni layout without SigLIP (the flow world's)
FOLDER_EDIT_KEY = "_difflora_zimage_edit"
# Qwen3-4B (the text encoder of Z-Image, also FLUX.2 klein-4B's), written out: no hub
QWEN3_4B_CONFIG = dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                       rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True, hidden_act="silu")
REAL_AXES = [32, 48, 48]
FOLDER_PARTS = ("transformer", "text_encoder", "tokenizer", "vae")


def resolve_variant(variant: str | None, metadata: dict[str, str]) -> str | None:
    """The job's zimage_variant, else the one difflora wrote into its own file; None when neither says
    (tools do not need it; training and generation refuse it in ZImageModel.check_complete)."""
    return variant or metadata.get(VARIANT_KEY)


# ------------------------------------------------------------------ diffusers folders
def check_folder(path: Path) -> None:
    missing = [p for p in FOLDER_PARTS if not (path / p).is_dir()]
    if missing:
        raise UserError(f"Z-Image folder without {', '.join(m + '/' for m in missing)} (a diffusers Z-Image folder "
                        "has transformer/, text_encoder/, tokenizer/, vae/ and scheduler/)", path=path)


def load_folder(path: Path, *, dtype: torch.dtype, variant: str | None, flow: FlowMatchOptions | None) -> ZImageModel:
    from diffusers import AutoencoderKL, ZImageTransformer2DModel
    from transformers import AutoTokenizer, Qwen3Model

    check_folder(path)
    try:
        transformer = ZImageTransformer2DModel.from_pretrained(path / "transformer", torch_dtype=dtype)
        text_encoder = Qwen3Model.from_pretrained(path / "text_encoder", dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")
        vae = AutoencoderKL.from_pretrained(path / "vae", torch_dtype=dtype)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot read this Z-Image folder ({type(e).__name__}: {str(e).splitlines()[0][:200]})",
                        path=path) from None
    _check_widths(transformer, text_encoder, vae, path)
    shift = SAMPLING_SHIFT
    sched = path / "scheduler" / "scheduler_config.json"
    if sched.exists():
        shift = float(json.loads(sched.read_text(encoding="utf-8")).get("shift", SAMPLING_SHIFT))
    fuse_attention(transformer)
    index = json.loads((path / "model_index.json").read_text(encoding="utf-8")) if (path / "model_index.json").exists() else {}
    folder_variant = index.get(FOLDER_VARIANT_KEY)  # difflora's toy flow world writes it ("base")
    model = ZImageModel(transformer, vae, text_encoder, tokenizer,
                        variant=resolve_variant(variant, {VARIANT_KEY: folder_variant} if folder_variant else {}),
                        source=str(path), flow=flow, sampling_shift=shift,
                        edit=index.get(FOLDER_EDIT_KEY) == "omni")
    model.freeze()
    return model


def _check_widths(transformer, text_encoder, vae, path) -> None:
    cap = transformer.config.cap_feat_dim
    if text_encoder is not None and text_encoder.config.hidden_size != cap:
        raise UserError(f"the text encoder's hidden size is {text_encoder.config.hidden_size} but the transformer "
                        f"reads {cap}-wide captions (Z-Image's is Qwen3-4B, 2560)", path=path)
    if vae is not None and vae.config.latent_channels != transformer.config.in_channels:
        raise UserError(f"the autoencoder has {vae.config.latent_channels} latent channels but the transformer "
                        f"takes {transformer.config.in_channels} (Z-Image uses FLUX.1's 16-channel ae)", path=path)


def save_diffusers_folder(model: ZImageModel, path: Path, dtype: torch.dtype | None = None) -> None:
    """A folder diffusers' ZImagePipeline loads (the fused projections split back into to_q/to_k/to_v)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel

    import os
    import shutil
    import tempfile

    from ..folders import publish_layout

    if model.text_encoders_dropped:
        raise UserError("the text encoder was dropped (cache_text_encoder_outputs); cannot save a folder")
    if path.exists():
        raise UserError("output folder already exists; choose another path", path=path)
    model.require("text_encoder", "vae")
    with torch.device("meta"):
        plain = ZImageTransformer2DModel.from_config(model.transformer.config)
    sd = split_fused_keys({k: v.to(dtype) if dtype else v for k, v in model.transformer.state_dict().items()})
    plain.load_state_dict(sd, assign=True)
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=model.sampling_shift,
                                            use_dynamic_shifting=False)
    pipe = ZImagePipeline(scheduler=sched, vae=model.vae, text_encoder=model.text_encoders["text_encoder"],
                          tokenizer=model.tokenizer, transformer=plain)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        publish_layout(tmp)  # tokenizer files transformers 4 reads (vocab.json, merges.txt)
        if model.edit:  # the flow world's model keeps its marks (a Turbo or Base folder records no variant)
            index = tmp / "model_index.json"
            marks = {FOLDER_VARIANT_KEY: model.variant, FOLDER_EDIT_KEY: "omni"}
            index.write_text(json.dumps({**json.loads(index.read_text(encoding="utf-8")), **marks}, indent=2) + "\n",
                             encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ------------------------------------------------------------------ single files
def transformer_config(shapes: dict[str, tuple], metadata: dict[str, str], path) -> dict:
    """ZImageTransformer2DModel's config from a native state dict's shapes (the axes only for the real width)."""
    cfg = metadata.get(CONFIG_KEY)
    if cfg:
        return json.loads(cfg)
    try:
        dim, cap = shapes["cap_embedder.1.weight"]
        head = shapes["layers.0.attention.q_norm.weight"][0]
        in_ch = shapes["x_embedder.weight"][1] // 4
    except KeyError as e:
        raise UserError(f"not a Z-Image transformer file: {e.args[0]} is missing", path=path) from None
    if head != sum(REAL_AXES):
        raise UserError(f"a Z-Image transformer with {head}-wide heads: only the released layout (128) is known",
                        path=path)
    count = lambda prefix: len({k.split(".")[1] for k in shapes if k.startswith(prefix + ".")})  # noqa: E731
    return dict(dim=dim, n_layers=count("layers"), n_refiner_layers=count("noise_refiner"), n_heads=dim // head,
                n_kv_heads=dim // head, cap_feat_dim=cap, in_channels=in_ch, axes_dims=REAL_AXES)


def load_native_transformer(sd: dict[str, torch.Tensor], metadata: dict[str, str], dtype: torch.dtype, path):
    from diffusers import ZImageTransformer2DModel

    sd = dequantize_scaled_fp8(strip_comfy_prefix(sd), path)
    if any(".attention.to_q." in k for k in sd):  # a diffusers-layout single file
        native = fused_model_to_native_keys(fuse_split_keys(sd))
    else:
        native = sd
    cfg = transformer_config({k: tuple(v.shape) for k, v in native.items()}, metadata, path)
    with torch.device("meta"):
        tr = ZImageTransformer2DModel(**cfg)
    fuse_attention(tr)
    fused = {k: v.to(dtype) for k, v in native_to_fused_model_keys(native).items()}
    expected = set(tr.state_dict())
    missing, extra = sorted(expected - set(fused)), sorted(set(fused) - expected)
    if missing or extra:
        what = f"{len(missing)} tensor(s) missing, e.g. {missing[0]}" if missing else f"unexpected {extra[0]}"
        raise UserError(f"not a Z-Image transformer of this layout ({what})", path=path)
    try:
        tr.load_state_dict(fused, assign=True)
    except RuntimeError as e:
        raise UserError(f"tensor shapes do not fit a Z-Image transformer ({str(e).splitlines()[-1][:200]})",
                        path=path) from None
    tr.rope_embedder.freqs_cis = None  # rebuilt on first use on the weights' device
    return tr


def load_text_encoder(path: Path, dtype: torch.dtype, tokenizer_folder: Path | None):
    from transformers import AutoTokenizer, Qwen3Config, Qwen3Model

    header, md = read_safetensors_header(path)
    keys = {k[len("model."):] if k.startswith("model.") else k for k in header}
    if "layers.0.self_attn.q_norm.weight" not in keys or "embed_tokens.weight" not in keys:
        raise UserError("`text_encoder` is not a Qwen3 text encoder (no layers.0.self_attn.q_norm / embed_tokens); "
                        "Z-Image needs qwen_3_4b.safetensors", path=path)
    sd, md = load_safetensors(path)
    sd = {(k[len("model."):] if k.startswith("model.") else k): v for k, v in sd.items() if not k.startswith("lm_head.")}
    cfg = json.loads(md[CONFIG_KEY]) if CONFIG_KEY in md else dict(QWEN3_4B_CONFIG)
    if sd["embed_tokens.weight"].shape[1] != cfg["hidden_size"]:
        raise UserError(f"`text_encoder` is {sd['embed_tokens.weight'].shape[1]} wide, not Qwen3-4B's "
                        f"{cfg['hidden_size']} (a FLUX.2 klein-9B / other Qwen3 file?)", path=path)
    with torch.device("meta"):
        te = Qwen3Model(Qwen3Config(**cfg))
    try:
        te.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, assign=True, strict=True)
    except RuntimeError as e:
        raise UserError(f"`text_encoder` does not match Qwen3-4B ({str(e).splitlines()[-1][:200]})", path=path) from None
    te.rotary_emb = type(te.rotary_emb)(config=te.config)  # its non-persistent buffers, built off the meta device
    folder = tokenizer_folder or path.parent
    if "difflora.tokenizer" in md:
        from transformers import Qwen2Tokenizer
        from tokenizers import Tokenizer

        tok = Qwen2Tokenizer(tokenizer_object=Tokenizer.from_str(md["difflora.tokenizer"]), eos_token="<|im_end|>",
                             pad_token="<|endoftext|>", unk_token=None)
    elif (folder / "tokenizer.json").exists():
        tok = AutoTokenizer.from_pretrained(folder)
    else:
        raise UserError(f"no Qwen3 tokenizer: set qwen3_tokenizer to a folder with tokenizer.json (a Z-Image "
                        f"diffusers folder's tokenizer/); none beside the text encoder in {folder}", path=path)
    return te, tok


def load_single_file(path: Path, *, checkpoint, dtype: torch.dtype, variant: str | None, text_encoder=None, vae=None,
                     qwen3_tokenizer=None, flow: FlowMatchOptions | None = None) -> ZImageModel:
    """The native transformer file, with text_encoder and vae files (both, or neither: transformer only)."""
    from ..flux.files import load_ae

    sd, md = checkpoint if checkpoint is not None else load_safetensors(path)
    given = {k: v for k, v in (("text_encoder", text_encoder), ("vae", vae)) if v}
    if len(given) == 1:
        missing = "vae" if "text_encoder" in given else "text_encoder"
        raise UserError(f"a Z-Image single-file transformer needs `{missing}` too (text_encoder: qwen_3_4b.safetensors,"
                        " vae: FLUX.1's ae.safetensors)", path=path)
    for key, file in given.items():
        if not Path(file).is_file():
            raise UserError(f"`{key}` file not found", path=file)
    tr = load_native_transformer(dict(sd), md, dtype, path)
    te = tok = ae = None
    if given:
        te, tok = load_text_encoder(Path(text_encoder), dtype, Path(qwen3_tokenizer) if qwen3_tokenizer else None)
        ae = load_ae(Path(vae), dtype)
        _check_widths(tr, te, ae, text_encoder)
    model = ZImageModel(tr, ae, te, tok, variant=resolve_variant(variant, md), source=str(path), flow=flow)
    model.freeze()
    return model


def save_native_transformer(model: ZImageModel, path: Path, dtype: torch.dtype | None = None) -> None:
    """ComfyUI's layout (fused qkv, native names), with difflora's config and the variant in the metadata."""
    sd = fused_model_to_native_keys({k: (v.to(dtype) if dtype else v).contiguous()
                                     for k, v in model.transformer.state_dict().items()})
    cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(model.transformer.config).items()
           if not k.startswith("_")}
    save_safetensors(sd, path, {CONFIG_KEY: json.dumps(cfg), **({VARIANT_KEY: model.variant} if model.variant else {})})


def save_component_files(model: ZImageModel, folder: Path) -> dict[str, Path]:
    """The text-encoder and ae files ComfyUI users have (difflora's configs and tokenizer in the metadata)."""
    from ..ldm import VAE_PREFIX, vae_to_ldm

    folder.mkdir(parents=True, exist_ok=True)
    out = {"text_encoder": folder / "qwen_3_4b.safetensors", "vae": folder / "ae.safetensors"}
    te = model.text_encoders["text_encoder"]
    save_safetensors({"model." + k: v.contiguous() for k, v in te.state_dict().items()}, out["text_encoder"],
                     {CONFIG_KEY: json.dumps({k: v for k, v in te.config.to_dict().items() if not k.startswith("_") and k not in (
                         "transformers_version", "architectures", "dtype", "torch_dtype")}),
                      "difflora.tokenizer": model.tokenizer.backend_tokenizer.to_str()})
    vcfg = {k: v for k, v in dict(model.vae.config).items() if not k.startswith("_")}
    ldm = vae_to_ldm(model.vae.state_dict(), vcfg)
    save_safetensors({k[len(VAE_PREFIX):]: v for k, v in ldm.items()}, out["vae"], {CONFIG_KEY: json.dumps(vcfg)})
    return out


def load_zimage(path: Path, *, dtype: torch.dtype, checkpoint, options, mixed_precision: str = "no") -> ZImageModel:
    """The plug-in's loader: `options` is the job's Z-Image table (models/zimage/options.py)."""
    from .model import TRAIN_FLOW

    if mixed_precision == "bf16" or options.fp8_base:
        dtype = torch.bfloat16  # the frozen model in the mixed-precision dtype; LoRA weights stay fp32
    given = options.model_fields_set  # a FLUX default is not a Z-Image one: only keys the job sets count
    flow = FlowMatchOptions(*(getattr(options if k in given else TRAIN_FLOW, k)
                              for k in ("timestep_sampling", "sigmoid_scale", "discrete_flow_shift",
                                        "model_prediction_type")), **weighting_of(options))
    if path.is_dir():
        model = load_folder(path, dtype=dtype, variant=options.zimage_variant, flow=flow)
    else:
        model = load_single_file(path, checkpoint=checkpoint, dtype=dtype, variant=options.zimage_variant, flow=flow,
                                 text_encoder=options.text_encoder, vae=options.vae,
                                 qwen3_tokenizer=options.qwen3_tokenizer)
    if options.fp8_base:
        model.store_base_fp8()
    if options.nf4_base:
        model.store_base_nf4()
    return model
