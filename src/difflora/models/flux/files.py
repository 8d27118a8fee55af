"""FLUX.1 on disk: diffusers folders, BFL single-file transformers and kohya's clip_l / t5xxl / ae files.

A BFL file given without `clip_l`, `t5xxl` and `ae` loads as a transformer only (enough for merge,
extract, resize and inspect); training and generation then stop with a line naming the missing key.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from ...errors import UserError, is_internal_failure
from ...fileio import atomic_folder, load_safetensors, read_safetensors_header, save_safetensors, write_json_atomic
from .model import (AE_CONFIG, CLIP_L_CONFIG, SCHEDULER_CONFIG, SUPPORTED, T5XXL_CONFIG, FluxModel, FluxOptions)
from .convert import (bfl_to_diffusers, diffusers_config_from_params, diffusers_to_bfl,
                           params_from_bfl_state_dict, params_from_diffusers_config, strip_bfl_prefix)
from ..folders import publish_layout, read_transformer_folder
from .transformer import FluxParams, FluxTransformer

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ saving
def save_bfl_transformer(transformer: FluxTransformer, path: Path, dtype: torch.dtype | None = None) -> None:
    sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v)
          for k, v in transformer.state_dict().items()}
    save_safetensors(sd, path, {"difflora.flux_params": json.dumps(transformer.params.to_dict())})


def save_diffusers_folder(model: FluxModel, path: Path, dtype: torch.dtype | None = None) -> None:
    with atomic_folder(path) as tmp:  # umask permissions; a killed save's folder is removed by the next save
        tr = model.transformer
        (tmp / "transformer").mkdir()
        sd = bfl_to_diffusers({k: (v.float() if v.dtype == torch.float8_e4m3fn else v) for k, v in tr.state_dict().items()},
                              tr.params)
        if dtype is not None:
            sd = {k: v.to(dtype) for k, v in sd.items()}
        save_safetensors(sd, tmp / "transformer" / "diffusion_pytorch_model.safetensors")
        write_json_atomic(tmp / "transformer" / "config.json", diffusers_config_from_params(tr.params))
        model.vae.save_pretrained(tmp / "vae", safe_serialization=True)
        for sub, key in (("text_encoder", "clip_l"), ("text_encoder_2", "t5xxl")):
            m = model.text_encoders[key]
            if m is None:
                raise UserError("the text encoders were dropped (cache_text_encoder_outputs); cannot save a folder")
            m.save_pretrained(tmp / sub, safe_serialization=True)
        model.clip_tokenizer.save_pretrained(tmp / "tokenizer")
        model.t5_tokenizer.save_pretrained(tmp / "tokenizer_2")
        (tmp / "scheduler").mkdir()
        write_json_atomic(tmp / "scheduler" / "scheduler_config.json", dict(SCHEDULER_CONFIG))
        write_json_atomic(tmp / "model_index.json", {
            "_class_name": "FluxKontextPipeline" if model.kontext else "FluxPipeline", "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "T5EncoderModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "T5TokenizerFast"],
            "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]})
        publish_layout(tmp)  # CLIP-L with `text_model.` keys, tokenizer files transformers 4 and kohya read


# ------------------------------------------------------------------ loading
def _transformer_from_bfl(sd: dict[str, torch.Tensor], params: FluxParams, dtype: torch.dtype, path,
                          keep_fp8: bool = False) -> FluxTransformer:
    with torch.device("meta"):
        tr = FluxTransformer(params)
    sd = {k: (v if keep_fp8 and v.dtype == torch.float8_e4m3fn else v.to(dtype)) for k, v in sd.items()}
    try:
        tr.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        if is_internal_failure(e):
            raise
        raise UserError(f"transformer weights do not match a FLUX.1 layout ({str(e).splitlines()[0][:200]}); {SUPPORTED}",
                        path=path) from None
    return tr


def check_flux1_keys(keys, path) -> None:
    """Refuse FLUX.2 and other layouts with a line saying what is supported."""
    keys = list(keys)
    if any(k.startswith(("double_stream_modulation", "single_stream_modulation")) for k in keys):
        raise UserError(f"this is a FLUX.2 transformer; {SUPPORTED}", path=path)
    if not any(k.startswith("double_blocks.") or k.startswith("single_blocks.") for k in keys) or "img_in.weight" not in keys:
        if any(k.startswith(("input_blocks.", "down_blocks.", "conditioner.")) for k in keys):
            raise UserError(f"this is a Stable Diffusion checkpoint, not a FLUX transformer; {SUPPORTED}", path=path)
        raise UserError(f"not a FLUX.1 transformer (no double_blocks/single_blocks/img_in keys); {SUPPORTED}", path=path)


def _check_in_channels(params: FluxParams, path) -> None:
    if params.in_channels != params.out_channels:
        what = {384: "FLUX.1 Fill", 128: "FLUX.1 Depth/Canny"}.get(params.in_channels, "an image-conditioned FLUX variant")
        raise UserError(f"this transformer takes {params.in_channels} input channels ({what}); {SUPPORTED}",
                        path=path)


def _component_file(path, key: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"`{key}` file not found", path=p)
    return p


def _metadata_config(metadata: dict[str, str], key: str) -> dict | None:
    raw = metadata.get(key)
    return json.loads(raw) if raw else None


def _tokenizer_from_metadata(metadata: dict[str, str], cls):
    raw = metadata.get("difflora.tokenizer")
    if not raw:
        return None
    from tokenizers import Tokenizer

    return cls(tokenizer_object=Tokenizer.from_str(raw))


def load_clip_l(path: Path, dtype: torch.dtype):
    from transformers import CLIPTextConfig, CLIPTextModel

    from ..ldm import clip_tokenizer

    sd, md = load_safetensors(path)
    sd = {k[len("text_model."):] if k.startswith("text_model.") else k: v for k, v in sd.items()}
    sd = {k: v for k, v in sd.items() if not k.startswith(("text_projection", "logit_scale"))}
    if "embeddings.token_embedding.weight" not in sd:
        raise UserError("not a CLIP-L text encoder file (no token embedding); `clip_l` expects e.g. clip_l.safetensors",
                        path=path)
    te = CLIPTextModel(CLIPTextConfig(**(_metadata_config(md, "difflora.config") or CLIP_L_CONFIG)))
    missing, unexpected = te.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
    missing = [k for k in missing if "position_ids" not in k]
    if missing or unexpected:
        raise UserError(f"`clip_l` does not match CLIP-L ({(missing or unexpected)[0]} ...)", path=path)
    from transformers import CLIPTokenizer

    tok = _tokenizer_from_metadata(md, CLIPTokenizer) or clip_tokenizer("sd1")
    tok.model_max_length = 77
    return te.to(dtype), tok


def _t5_tokenizer_from(path: Path | None, t5_path: Path):
    from transformers import AutoTokenizer

    candidates = [path] if path else [t5_path.parent / "tokenizer_2", t5_path.parent]
    for c in candidates:
        if c is not None and c.is_dir() and ((c / "tokenizer.json").exists() or (c / "spiece.model").exists()):
            try:
                return AutoTokenizer.from_pretrained(str(c), local_files_only=True)
            except Exception as e:
                if is_internal_failure(e):
                    raise
                raise UserError(f"could not load the T5 tokenizer ({type(e).__name__}: {e})", path=c) from None
    raise UserError("no T5 tokenizer: set `t5xxl_tokenizer` to a folder with tokenizer.json or spiece.model "
                    "(e.g. a FLUX diffusers folder's tokenizer_2/); difflora never downloads one", path=t5_path)


def load_t5xxl(path: Path, dtype: torch.dtype, tokenizer_path: Path | None):
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    sd, md = load_safetensors(path)
    if "shared.weight" not in sd and "encoder.embed_tokens.weight" not in sd:
        raise UserError("not a T5 encoder file (no shared.weight); `t5xxl` expects e.g. t5xxl_fp16.safetensors", path=path)
    sd.setdefault("shared.weight", sd.get("encoder.embed_tokens.weight"))
    te = T5EncoderModel(T5Config(**(_metadata_config(md, "difflora.config") or T5XXL_CONFIG)))
    missing, unexpected = te.load_state_dict({k: v.to(torch.float32) for k, v in sd.items()}, strict=False)
    missing = [k for k in missing if k != "encoder.embed_tokens.weight"]
    if missing or unexpected:
        raise UserError(f"`t5xxl` does not match T5-XXL's encoder ({(missing or unexpected)[0]} ...)", path=path)
    tok = _tokenizer_from_metadata(md, T5TokenizerFast) or _t5_tokenizer_from(tokenizer_path, path)
    return te.to(dtype), tok


def load_ae(path: Path, dtype: torch.dtype):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    from ..ldm import VAE_PREFIX, infer_vae_config

    sd, md = load_safetensors(path)
    if "encoder.conv_in.weight" in sd:
        ldm = {VAE_PREFIX + k: v for k, v in sd.items()}
    elif VAE_PREFIX + "encoder.conv_in.weight" in sd:
        ldm = sd
    else:
        raise UserError("not an autoencoder file (no encoder.conv_in); `ae` expects FLUX's ae.safetensors", path=path)
    cfg = _metadata_config(md, "difflora.config")
    if cfg is None:
        cfg = dict(AE_CONFIG)
        if tuple(ldm[VAE_PREFIX + "decoder.conv_in.weight"].shape[1:2]) != (16,):
            raise UserError("`ae` has no 16 latent channels: it is not FLUX's autoencoder", path=path)
        inferred = infer_vae_config(ldm)
        cfg["block_out_channels"] = inferred["block_out_channels"]
    vae = AutoencoderKL(**cfg)
    try:
        vae.load_state_dict(convert_ldm_vae_checkpoint({k: v.float() for k, v in ldm.items()}, dict(vae.config)))
    except Exception as e:
        if is_internal_failure(e):
            raise
        raise UserError(f"`ae` does not match FLUX's autoencoder ({type(e).__name__}: {str(e).splitlines()[0][:160]})",
                        path=path) from None
    return vae if dtype == torch.float32 else vae.to(dtype)


def save_component_files(model: FluxModel, folder: Path) -> dict[str, Path]:
    """Write clip_l, t5xxl and ae files in the layouts kohya's users have (with difflora's configs in metadata)."""
    from ..ldm import vae_to_ldm, VAE_PREFIX

    folder.mkdir(parents=True, exist_ok=True)
    clip, t5 = model.text_encoders["clip_l"], model.text_encoders["t5xxl"]
    out = {"clip_l": folder / "clip_l.safetensors", "t5xxl": folder / "t5xxl.safetensors", "ae": folder / "ae.safetensors"}
    tok_json = lambda t: t.backend_tokenizer.to_str()  # noqa: E731
    # published clip_l.safetensors carry CLIP's text_projection (ComfyUI warns "clip missing" without it); FLUX
    # reads the unprojected pooled output, so the identity stands in for the one this CLIPTextModel does not have
    width = clip.config.hidden_size
    save_safetensors({**{"text_model." + k: v for k, v in clip.state_dict().items()},
                      "text_projection.weight": torch.eye(width, dtype=clip.dtype)}, out["clip_l"],
                     {"difflora.config": json.dumps(_config_dict(clip.config)), "difflora.tokenizer": tok_json(model.clip_tokenizer)})
    save_safetensors({k: v for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"}, out["t5xxl"],
                     {"difflora.config": json.dumps(_config_dict(t5.config)), "difflora.tokenizer": tok_json(model.t5_tokenizer)})
    vcfg = {k: v for k, v in dict(model.vae.config).items() if not k.startswith("_")}
    ldm = vae_to_ldm(model.vae.state_dict(), vcfg)
    save_safetensors({k[len(VAE_PREFIX):]: v for k, v in ldm.items()}, out["ae"], {"difflora.config": json.dumps(vcfg)})
    return out


def _config_dict(cfg) -> dict:
    d = cfg.to_dict()
    return {k: v for k, v in d.items() if not k.startswith("_") and k not in ("transformers_version", "architectures",
                                                                              "dtype", "torch_dtype")}


def load_bfl_files(path: Path, *, clip_l=None, t5xxl=None, ae=None, t5xxl_tokenizer=None, dtype=torch.float32,
                   options: FluxOptions | None = None, fp8_base: bool = False, checkpoint=None,
                   kontext: bool = False) -> FluxModel:
    """A BFL transformer file, with clip_l / t5xxl / ae (all three, or none: transformer only). `kontext`: the job's
    model_variant says it is FLUX.1 Kontext [dev] (its keys are FLUX.1-dev's)."""
    if checkpoint is not None:
        sd, md = checkpoint
    else:
        header, md = read_safetensors_header(path)
        check_flux1_keys(list(strip_bfl_prefix(dict.fromkeys(header))), path)
        sd, md = load_safetensors(path)
    sd = strip_bfl_prefix(sd)
    check_flux1_keys(list(sd), path)
    given = {k: v for k, v in (("clip_l", clip_l), ("t5xxl", t5xxl), ("ae", ae)) if v}
    if given and len(given) < 3:
        missing = [k for k in ("clip_l", "t5xxl", "ae") if k not in given]
        raise UserError(f"a FLUX single-file transformer needs its text encoders and autoencoder: set "
                        f"{', '.join('`' + k + '`' for k in missing)} (clip_l, t5xxl and ae files, as in kohya)", path=path)
    files = {k: _component_file(v, k) for k, v in given.items()}
    cfg = _metadata_config(md, "difflora.flux_params")
    try:
        params = FluxParams(**cfg) if cfg else params_from_bfl_state_dict({k: tuple(v.shape) for k, v in sd.items()})
    except (KeyError, ValueError, TypeError) as e:
        raise UserError(f"cannot read the FLUX layout from the tensors ({e}); {SUPPORTED}", path=path) from None
    _check_in_channels(params, path)
    tr = _transformer_from_bfl(sd, params, dtype, path, keep_fp8=fp8_base)
    te1 = tok1 = te3 = tok3 = vae = None
    if files:
        te1, tok1 = load_clip_l(files["clip_l"], dtype)
        te3, tok3 = load_t5xxl(files["t5xxl"], dtype, Path(t5xxl_tokenizer) if t5xxl_tokenizer else None)
        vae = load_ae(files["ae"], dtype)
    if not kontext and "kontext" in Path(path).name.lower():
        log.warning("%s: loaded as FLUX.1-%s; if it is FLUX.1 Kontext, set model_variant = \"kontext\" (a single "
                    "file cannot say it)", Path(path).name, "dev" if params.guidance_embed else "schnell")
    model = FluxModel(tr, vae, te1, te3, tok1, tok3, source=str(path), options=options, kontext=kontext)
    model.freeze()
    return model


FOLDER_CLASSES = ("FluxPipeline", "FluxKontextPipeline")


def load_diffusers_flux(path: Path, *, dtype=torch.float32, options: FluxOptions | None = None,
                        fp8_base: bool = False, model_variant: str | None = None) -> FluxModel:
    from diffusers import AutoencoderKL
    from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

    info = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
    cls = str(info.get("_class_name", ""))
    if cls not in FOLDER_CLASSES:
        raise UserError(f"this is a {cls} folder; {SUPPORTED} ({' or '.join(FOLDER_CLASSES)} folders)", path=path)
    kontext = cls == "FluxKontextPipeline"
    if model_variant == "kontext" and not kontext:
        raise UserError(f"model_variant = 'kontext' but this folder is a {cls} (text-to-image FLUX.1); remove "
                        "model_variant or give a FluxKontextPipeline folder", path=path)
    for comp in ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        if not (path / comp).is_dir():
            raise UserError(f"FLUX model folder is missing its {comp}/ component", path=path)
    dsd, cfg = read_transformer_folder(path / "transformer", ("FluxTransformer2DModel", None), SUPPORTED)
    params = params_from_diffusers_config(cfg)
    _check_in_channels(params, path)
    try:
        bsd = diffusers_to_bfl(dsd, params)
    except KeyError as e:
        raise UserError(f"transformer weights do not match its config (missing {e}); {SUPPORTED}", path=path) from None
    tr = _transformer_from_bfl(bsd, params, dtype, path, keep_fp8=fp8_base)
    try:
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", local_files_only=True, use_safetensors=True,
                                            torch_dtype=dtype)
        te1 = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", local_files_only=True,
                                            use_safetensors=True, dtype=dtype)
        te3 = T5EncoderModel.from_pretrained(path, subfolder="text_encoder_2", local_files_only=True,
                                             use_safetensors=True, dtype=dtype)
        tok1 = AutoTokenizer.from_pretrained(path / "tokenizer", local_files_only=True)
        tok3 = AutoTokenizer.from_pretrained(path / "tokenizer_2", local_files_only=True)
    except Exception as e:
        if is_internal_failure(e):
            raise
        raise UserError(f"could not load the FLUX folder ({type(e).__name__}: {str(e).splitlines()[0][:200]})",
                        path=path) from None
    tok1.model_max_length = 77
    model = FluxModel(tr, vae, te1, te3, tok1, tok3, source=str(path), options=options, kontext=kontext)
    model.freeze()
    return model


def load_flux(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, clip_l=None, t5xxl=None, ae=None,
              t5xxl_tokenizer=None, options: FluxOptions | None = None, fp8_base: bool = False,
              checkpoint=None, model_variant: str | None = None) -> FluxModel:
    """Load FLUX.1 from a diffusers folder or a BFL transformer file plus clip_l / t5xxl / ae files;
    `model_variant` = "kontext": FLUX.1 Kontext [dev] (a folder's pipeline class says it too)."""
    path = Path(path)
    if not path.exists():
        raise UserError("model not found", path=path)
    if path.is_dir():
        model = load_diffusers_flux(path, dtype=dtype, options=options, fp8_base=fp8_base, model_variant=model_variant)
    else:
        if path.suffix.lower() != ".safetensors":
            raise UserError("FLUX transformers are read from .safetensors files", path=path)
        model = load_bfl_files(path, clip_l=clip_l, t5xxl=t5xxl, ae=ae, t5xxl_tokenizer=t5xxl_tokenizer, dtype=dtype,
                               options=options, fp8_base=fp8_base, checkpoint=checkpoint,
                               kontext=model_variant == "kontext")
    if fp8_base:
        model.store_base_fp8()
    return model


def build_flux_on_meta(variant: str = "dev", options: FluxOptions | None = None) -> FluxModel:
    """The full-size FLUX.1 architecture (transformer, CLIP-L, T5-XXL, ae) without weights, on the meta device.

    For module names and sizes (LoRA layouts, benchmarks: `to_empty` then initialise); never for outputs.
    """
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from .transformer import FLUX_DEV, FLUX_SCHNELL

    if variant not in ("dev", "schnell"):
        raise UserError(f"FLUX.1 variant must be dev or schnell, got {variant!r}")
    with torch.device("meta"):
        tr = FluxTransformer(FLUX_DEV if variant == "dev" else FLUX_SCHNELL)
        clip = CLIPTextModel(CLIPTextConfig(**CLIP_L_CONFIG))
        t5 = T5EncoderModel(T5Config(**T5XXL_CONFIG))
        vae = AutoencoderKL(**AE_CONFIG)
    return FluxModel(tr, vae, clip, t5, None, None, source=f"FLUX.1-{variant} (meta)", options=options)
