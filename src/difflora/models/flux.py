"""FLUX.1-dev and FLUX.1-schnell: loading, prompt encoding, flow matching, kohya LoRA targets, sampling.

Two layouts load, fully offline:
- a diffusers folder (FluxPipeline: transformer/, vae/, text_encoder/ (CLIP-L), text_encoder_2/
  (T5-XXL), tokenizer/, tokenizer_2/);
- the files FLUX users have: a BFL single-file transformer (`flux1-dev.safetensors`, bare or
  `model.diffusion_model.` keys, fp32/fp16/bf16/fp8) plus separate `clip_l`, `t5xxl` and `ae`
  files, given by those job keys as in kohya. The CLIP tokenizer is built from the bundled
  vocabulary; T5's comes from `t5xxl_tokenizer` (a folder with tokenizer.json, e.g. a FLUX
  diffusers folder's tokenizer_2/) or from beside the t5xxl file.

The transformer is kept in BFL's layout (models/flux_transformer.py), so kohya's LoRA names
(`lora_unet_double_blocks_0_img_attn_qkv`, ...) are module paths.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ..errors import UserError
from ..fileio import load_safetensors, read_safetensors_header, save_safetensors, write_json_atomic
from ..network.lora import LoRATarget
from .base import Conditioning, ModelFamily
from .flow_matching import FlowMatchOptions, FluxFlowObjective, flux_time_shift, flux_time_shift_mu
from .flux_convert import (bfl_to_diffusers, diffusers_config_from_params, diffusers_to_bfl,
                           params_from_bfl_state_dict, params_from_diffusers_config, strip_bfl_prefix)
from .flux_transformer import FluxParams, FluxTransformer

log = logging.getLogger(__name__)

# Bundled component configs of FLUX.1 (black-forest-labs/FLUX.1-dev's, written out; no hub).
CLIP_L_CONFIG = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                     num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                     bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, projection_dim=768)
T5XXL_CONFIG = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                    relative_attention_num_buckets=32, relative_attention_max_distance=128,
                    feed_forward_proj="gated-gelu", dense_act_fn="gelu_new", is_gated_act=True,
                    layer_norm_epsilon=1e-6, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
                    tie_word_embeddings=False, is_encoder_decoder=False, use_cache=False)
AE_CONFIG = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                 up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512],
                 layers_per_block=2, latent_channels=16, norm_num_groups=32, sample_size=1024,
                 scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
                 force_upcast=True)
SCHEDULER_CONFIG = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
                    "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
                    "max_image_seq_len": 4096}

SUPPORTED = "supported: FLUX.1-dev and FLUX.1-schnell layouts (and fine-tunes of them)"
TRAIN_BLOCKS = ("all", "double", "single")
_DOUBLE_OR_SINGLE = re.compile(r"^(double_blocks|single_blocks)\.\d+$")
_EMBEDDERS = ("img_in", "time_in.in_layer", "time_in.out_layer", "vector_in.in_layer", "vector_in.out_layer",
              "guidance_in.in_layer", "guidance_in.out_layer", "txt_in")
_T5_ROLE = re.compile(r"^encoder\.block\.\d+\.layer\.(0\.SelfAttention\.[qkvo]|1\.DenseReluDense\.(wi_0|wi_1|wo))$")


@dataclass
class FluxOptions:
    """FLUX-only job options (kohya's names and defaults)."""

    guidance_scale: float = 3.5
    t5xxl_max_token_length: int | None = None  # None: 512 for dev, 256 for schnell
    apply_t5_attn_mask: bool = False
    train_blocks: str = "all"
    lora_embedders: bool = False  # kohya's in_dims: LoRA on img_in, txt_in, time_in, vector_in, guidance_in
    train_t5xxl: bool = False
    flow: FlowMatchOptions | None = None


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2·w/2, 4C): 2x2 patches, channel-major inside a patch (BFL and diffusers)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    b, _, d = x.shape
    c = d // 4
    return x.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def image_ids(b: int, h: int, w: int, device=None) -> torch.Tensor:
    """Position ids (B, h/2·w/2, 3): (0, row, column) of each packed patch."""
    ids = torch.zeros(h // 2, w // 2, 3, device=device)
    ids[..., 1] = torch.arange(h // 2, device=device)[:, None]
    ids[..., 2] = torch.arange(w // 2, device=device)[None, :]
    return ids.reshape(1, -1, 3).expand(b, -1, -1)


class FluxModel(ModelFamily):
    """FLUX.1 (dev: guidance-distilled with a guidance embedder; schnell: without)."""

    family = "flux"

    def __init__(self, transformer: FluxTransformer, vae, clip_l, t5xxl, clip_tokenizer, t5_tokenizer, *,
                 source: str = "", options: FluxOptions | None = None):
        self.denoiser = transformer
        self.vae = vae
        self.text_encoders = {"clip_l": clip_l, "t5xxl": t5xxl}
        self.clip_tokenizer = clip_tokenizer
        self.t5_tokenizer = t5_tokenizer
        self.source = source
        self.options = options or FluxOptions()
        if self.options.train_blocks not in TRAIN_BLOCKS:
            raise UserError(f"train_blocks must be one of {', '.join(TRAIN_BLOCKS)}, got {self.options.train_blocks!r}")
        self.objective = FluxFlowObjective(self.options.flow)
        self.compute_dtype: torch.dtype | None = None  # set when the base is stored in fp8

    @property
    def transformer(self) -> FluxTransformer:
        return self.denoiser

    @property
    def variant(self) -> str:
        return "dev" if self.transformer.params.guidance_embed else "schnell"

    @property
    def t5xxl_max_token_length(self) -> int:
        return self.options.t5xxl_max_token_length or (512 if self.variant == "dev" else 256)

    # ---- identity and metadata
    @property
    def base_model_version(self) -> str:
        return "flux1"  # kohya's MODEL_VERSION_FLUX_V1

    @property
    def modelspec_architecture(self) -> str:
        return f"flux-1-{self.variant}/lora"

    @property
    def resolution(self) -> int:
        return 1024 if self.transformer.params.hidden_size == 3072 else 16 * self.latent_downscale

    @property
    def latent_downscale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_multiple(self) -> int:
        """Pixels per packed 2x2 latent patch."""
        return 2 * self.latent_downscale

    def lora_metadata(self) -> dict[str, str]:
        f = self.objective.options
        return {
            "ss_base_model_version": self.base_model_version,
            "ss_v2": "False",
            "ss_flux_variant": self.variant,
            "ss_guidance_scale": str(self.options.guidance_scale),
            "ss_apply_t5_attn_mask": str(self.options.apply_t5_attn_mask),
            "ss_t5xxl_max_token_length": str(self.t5xxl_max_token_length),
            "ss_timestep_sampling": f.timestep_sampling,
            "ss_sigmoid_scale": str(f.sigmoid_scale),
            "ss_model_prediction_type": f.model_prediction_type,
            "ss_discrete_flow_shift": str(f.discrete_flow_shift),
            "modelspec.architecture": self.modelspec_architecture,
            "modelspec.implementation": "https://github.com/black-forest-labs/flux",
            "modelspec.resolution": f"{self.resolution}x{self.resolution}",
        }

    # ---- LoRA
    def lora_targets(self, conv: bool = False) -> list[LoRATarget]:
        """kohya's lora_flux modules. conv=True: every module a FLUX LoRA file may hold (for reading)."""
        o = self.options
        blocks = "all" if conv else o.train_blocks
        out = []
        for name, module in self.transformer.named_modules():
            if not _DOUBLE_OR_SINGLE.match(name) or (blocks != "all" and not name.startswith(blocks)):
                continue
            for child, lin in module.named_modules():
                if isinstance(lin, nn.Linear) and child:
                    out.append(LoRATarget(f"lora_unet_{name}.{child}".replace(".", "_"), lin, "unet"))
        if conv or o.lora_embedders:
            for name in _EMBEDDERS:
                lin = self.transformer.get_submodule(name) if _has(self.transformer, name) else None
                if isinstance(lin, nn.Linear):
                    out.append(LoRATarget(f"lora_unet_{name}".replace(".", "_"), lin, "unet"))
        from .sd import text_encoder_lora_targets

        out += text_encoder_lora_targets(self.text_encoders["clip_l"], prefix="lora_te1", component="clip_l")
        if conv or o.train_t5xxl:
            for name, lin in self.text_encoders["t5xxl"].named_modules():
                if _T5_ROLE.match(name) and isinstance(lin, nn.Linear):
                    out.append(LoRATarget(f"lora_te3_{name}".replace(".", "_"), lin, "t5xxl"))
        return out

    def adapt_lora_file(self, lora):
        """Check a LoRA file is for FLUX.1 (this variant) and bring diffusers/ai-toolkit names to kohya's."""
        from ..fileio import load_safetensors as _load
        from ..network.files import LoraFile
        from .flux_lora import diffusers_to_kohya, is_diffusers_flux_lora

        version = lora.metadata.get("ss_base_model_version", "")
        if version and not version.startswith("flux"):
            raise UserError(f"LoRA was trained for {version} (ss_base_model_version), not FLUX.1", path=lora.path)
        if lora.source_format == "peft":
            raw, md = _load(lora.path)
            if not is_diffusers_flux_lora(raw):
                raise UserError("peft-format LoRA without FLUX transformer keys: it was made for another model",
                                path=lora.path)
            alpha = None
            try:
                alpha = json.loads(md.get("lora_adapter_metadata", "{}")).get("lora_alpha")
            except (ValueError, AttributeError):
                pass
            lora = LoraFile(diffusers_to_kohya(raw, self.transformer.params, lora.path, alpha), lora.metadata,
                            lora.path, "diffusers")
        names = lora.module_names()
        sd_like = [n for n in names if re.match(r"lora_unet_(down|up|mid|input|output|middle)_block", n)]
        if sd_like:
            raise UserError(f"this is a Stable Diffusion / SDXL LoRA ({sd_like[0]}), not a FLUX.1 LoRA", path=lora.path)
        if self.variant == "schnell" and any(n.startswith("lora_unet_guidance_in") for n in names):
            raise UserError("LoRA trains FLUX.1-dev's guidance embedder (lora_unet_guidance_in_*), which FLUX.1-schnell "
                            "does not have; train it without embedders for schnell", path=lora.path)
        return lora

    # ---- conditioning
    def _tokens(self, tokenizer, prompts: list[str], max_len: int):
        return tokenizer(list(prompts), padding="max_length", max_length=max_len, truncation=True, return_tensors="pt")

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        clip, t5 = self.text_encoders["clip_l"], self.text_encoders["t5xxl"]
        if clip is None or t5 is None:
            raise RuntimeError("the text encoders were dropped after caching; the prompt is not in the cache")
        c = self._tokens(self.clip_tokenizer, prompts, 77)
        pooled = clip(c.input_ids.to(clip.device)).pooler_output
        t = self._tokens(self.t5_tokenizer, prompts, self.t5xxl_max_token_length)
        mask = t.attention_mask.to(t5.device)
        hidden = t5(t.input_ids.to(t5.device), attention_mask=mask if self.options.apply_t5_attn_mask else None).last_hidden_state
        return Conditioning({"pooled": pooled, "t5": hidden, "t5_mask": mask})

    def drop_text_encoders(self) -> None:
        """After caching every prompt: free T5-XXL (9.5 GB in bf16) and CLIP-L."""
        self.text_encoders = {"clip_l": None, "t5xxl": None}

    def predict(self, noisy, timesteps, cond):
        """Velocity for unpacked latents (B, C, h, w); timesteps are σ·1000."""
        b, _, h, w = noisy.shape
        tr = self.transformer
        dtype = self.compute_dtype or tr.dtype
        txt = cond.tensors["t5"]
        txt_ids = torch.zeros(b, txt.shape[1], 3, device=noisy.device)
        guidance = torch.full((b,), float(self.options.guidance_scale), device=noisy.device) \
            if tr.params.guidance_embed else None
        mask = cond.tensors.get("t5_mask") if self.options.apply_t5_attn_mask else None
        with torch.autocast(noisy.device.type, dtype=dtype, enabled=self.compute_dtype is not None):
            out = tr(pack_latents(noisy.to(dtype)), image_ids(b, h, w, noisy.device), txt.to(dtype), txt_ids,
                     timesteps.float().to(noisy.device) / self.objective.num_train_timesteps,
                     cond.tensors["pooled"].to(dtype), guidance, txt_mask=mask)
        return unpack_latents(out, h, w).to(noisy.dtype)

    # ---- VAE
    def encode_images(self, pixels, sample=True, generator=None):
        cfg = self.vae.config
        dist = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist
        z = dist.sample(generator=generator) if sample else dist.mode()
        return (z - (cfg.shift_factor or 0.0)) * cfg.scaling_factor

    def decode_latents(self, latents):
        cfg = self.vae.config
        return self.vae.decode(latents.to(self.vae.dtype) / cfg.scaling_factor + (cfg.shift_factor or 0.0)).sample

    # ---- sampling
    def sigmas_for_sampling(self, steps: int, image_tokens: int) -> torch.Tensor:
        """BFL's schedule: linspace(1, 0, steps+1), shifted by μ(tokens) for dev (schnell is unshifted)."""
        s = torch.linspace(1, 0, steps + 1)
        if self.variant == "dev":
            s[:-1] = flux_time_shift(s[:-1], flux_time_shift_mu(image_tokens))
        return s

    @torch.no_grad()
    def sample_latents(self, cond: Conditioning, seeds: list[int], steps: int, width: int, height: int) -> torch.Tensor:
        """Euler flow-matching sampling from per-seed noise; returns latents (B, C, h, w)."""
        ds = self.latent_downscale
        h, w = 2 * ((height + 2 * ds - 1) // (2 * ds)), 2 * ((width + 2 * ds - 1) // (2 * ds))
        c = self.vae.config.latent_channels
        x = torch.stack([torch.randn(c, h, w, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
        x = x.to(self.device)
        sig = self.sigmas_for_sampling(steps, (h // 2) * (w // 2))
        for cur, nxt in zip(sig[:-1], sig[1:]):
            t = torch.full((x.shape[0],), float(cur) * self.objective.num_train_timesteps, device=x.device)
            v = self.predict(x, t, cond).float()
            x = x + (float(nxt) - float(cur)) * v
        return x

    @torch.no_grad()
    def text_to_image(self, prompts: list[str], seeds: list[int], steps: int = 20, width: int | None = None,
                      height: int | None = None, guidance: float | None = None) -> np.ndarray:
        """Images (B, H, W, 3) in [0, 1]; `guidance` overrides guidance_scale for a dev model."""
        old = self.options.guidance_scale
        if guidance is not None:
            self.options.guidance_scale = guidance
        try:
            cond = self.encode_prompts(prompts)
            lat = self.sample_latents(cond, seeds, steps, width or self.resolution, height or self.resolution)
        finally:
            self.options.guidance_scale = old
        img = self.decode_latents(lat).float().clamp(-1, 1)
        return ((img + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()

    def pipeline(self, scheduler: str = "euler"):
        raise UserError("FLUX images are made by difflora's own flow-matching Euler sampler (generate uses it)")

    # ---- memory
    def enable_gradient_checkpointing(self, cpu_offload: bool = False) -> None:
        self.transformer.enable_gradient_checkpointing(cpu_offload)

    def store_base_fp8(self) -> None:
        """kohya's fp8_base: frozen block weights in float8_e4m3fn, computed in bf16."""
        from .low_vram import store_fp8

        store_fp8(self.transformer, torch.bfloat16)
        for m in self.transformer.modules():  # norms, embedders etc. compute in bf16 too
            for p in m.parameters(recurse=False):
                if p.dtype != torch.float8_e4m3fn:
                    p.data = p.data.to(torch.bfloat16)
        self.compute_dtype = torch.bfloat16

    def to(self, device=None, dtype=None) -> "FluxModel":
        for m in [self.denoiser, self.vae, *self.text_encoders.values()]:
            if m is None:
                continue
            if dtype is not None and m is self.denoiser and self.compute_dtype is not None:
                m.to(device=device)  # fp8 storage stays fp8
            else:
                m.to(device=device, dtype=dtype)
        return self

    def freeze(self) -> None:
        for m in [self.denoiser, self.vae, *self.text_encoders.values()]:
            if m is not None:
                m.requires_grad_(False)
                m.eval()

    @property
    def device(self) -> torch.device:
        return self.transformer.img_in.weight.device

    # ---- saving
    def save(self, path, single_file=None, dtype=None):
        """A diffusers folder, or (path ending .safetensors) the BFL single-file transformer."""
        path = Path(path)
        if single_file is None:
            single_file = path.suffix.lower() == ".safetensors"
        if single_file:
            save_bfl_transformer(self.transformer, path, dtype=dtype)
        else:
            save_diffusers_folder(self, path, dtype=dtype)


def _has(module: nn.Module, name: str) -> bool:
    try:
        module.get_submodule(name)
        return True
    except AttributeError:
        return False


# ------------------------------------------------------------------ saving
def save_bfl_transformer(transformer: FluxTransformer, path: Path, dtype: torch.dtype | None = None) -> None:
    sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v)
          for k, v in transformer.state_dict().items()}
    save_safetensors(sd, path, {"difflora.flux_params": json.dumps(transformer.params.to_dict())})


def save_diffusers_folder(model: FluxModel, path: Path, dtype: torch.dtype | None = None) -> None:
    if path.exists():
        raise UserError("output folder already exists; choose another path", path=path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
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
            "_class_name": "FluxPipeline", "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "T5EncoderModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "T5TokenizerFast"],
            "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]})
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ------------------------------------------------------------------ loading
def _transformer_from_bfl(sd: dict[str, torch.Tensor], params: FluxParams, dtype: torch.dtype, path,
                          keep_fp8: bool = False) -> FluxTransformer:
    with torch.device("meta"):
        tr = FluxTransformer(params)
    sd = {k: (v if keep_fp8 and v.dtype == torch.float8_e4m3fn else v.to(dtype)) for k, v in sd.items()}
    try:
        tr.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        raise UserError(f"transformer weights do not match a FLUX.1 layout ({str(e).splitlines()[0][:200]}); {SUPPORTED}",
                        path=path) from None
    return tr


def check_flux1_keys(keys, path) -> None:
    """Refuse FLUX.2 / Kontext-style / other layouts with a line saying what is supported."""
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
    if not path:
        raise UserError(f"a FLUX single-file transformer needs its text encoders and autoencoder: set `{key}` "
                        "(clip_l, t5xxl and ae files, as in kohya's FLUX training)")
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

    from .ldm import clip_tokenizer

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

    from .ldm import VAE_PREFIX, infer_vae_config

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
        raise UserError(f"`ae` does not match FLUX's autoencoder ({type(e).__name__}: {str(e).splitlines()[0][:160]})",
                        path=path) from None
    return vae.to(dtype)


def save_component_files(model: FluxModel, folder: Path) -> dict[str, Path]:
    """Write clip_l, t5xxl and ae files in the layouts kohya's users have (with difflora's configs in metadata)."""
    from .ldm import vae_to_ldm, VAE_PREFIX

    folder.mkdir(parents=True, exist_ok=True)
    clip, t5 = model.text_encoders["clip_l"], model.text_encoders["t5xxl"]
    out = {"clip_l": folder / "clip_l.safetensors", "t5xxl": folder / "t5xxl.safetensors", "ae": folder / "ae.safetensors"}
    tok_json = lambda t: t.backend_tokenizer.to_str()  # noqa: E731
    save_safetensors({"text_model." + k: v for k, v in clip.state_dict().items()}, out["clip_l"],
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
                   options: FluxOptions | None = None, fp8_base: bool = False) -> FluxModel:
    header, md = read_safetensors_header(path)
    keys = list(header)
    bare = [k[len(p):] for k in keys for p in ("model.diffusion_model.", "diffusion_model.") if k.startswith(p)] or keys
    check_flux1_keys(bare, path)
    files = {k: _component_file(v, k) for k, v in (("clip_l", clip_l), ("t5xxl", t5xxl), ("ae", ae))}
    sd, _ = load_safetensors(path)
    sd = strip_bfl_prefix(sd)
    cfg = _metadata_config(md, "difflora.flux_params")
    try:
        params = FluxParams(**cfg) if cfg else params_from_bfl_state_dict({k: tuple(v.shape) for k, v in sd.items()})
    except (KeyError, ValueError, TypeError) as e:
        raise UserError(f"cannot read the FLUX layout from the tensors ({e}); {SUPPORTED}", path=path) from None
    _check_in_channels(params, path)
    tr = _transformer_from_bfl(sd, params, dtype, path, keep_fp8=fp8_base)
    te1, tok1 = load_clip_l(files["clip_l"], dtype)
    te3, tok3 = load_t5xxl(files["t5xxl"], dtype, Path(t5xxl_tokenizer) if t5xxl_tokenizer else None)
    vae = load_ae(files["ae"], dtype)
    model = FluxModel(tr, vae, te1, te3, tok1, tok3, source=str(path), options=options)
    model.freeze()
    return model


def _read_diffusers_transformer(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise UserError("model folder is missing transformer/config.json", path=folder.parent)
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    if cfg.get("_class_name", "FluxTransformer2DModel") != "FluxTransformer2DModel":
        raise UserError(f"transformer is {cfg.get('_class_name')}; {SUPPORTED}", path=folder.parent)
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    files = sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()}) if index.exists() \
        else [folder / "diffusion_pytorch_model.safetensors"]
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        if not f.exists():
            raise UserError(f"transformer weights missing: {f.name} (only .safetensors is read)", path=folder.parent)
        sd.update(load_safetensors(f)[0])
    return sd, cfg


def load_diffusers_flux(path: Path, *, dtype=torch.float32, options: FluxOptions | None = None,
                        fp8_base: bool = False) -> FluxModel:
    from diffusers import AutoencoderKL
    from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

    info = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
    cls = str(info.get("_class_name", ""))
    if cls != "FluxPipeline":
        raise UserError(f"this is a {cls} folder; {SUPPORTED} (FluxPipeline folders)", path=path)
    for comp in ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        if not (path / comp).is_dir():
            raise UserError(f"FLUX model folder is missing its {comp}/ component", path=path)
    dsd, cfg = _read_diffusers_transformer(path / "transformer")
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
        raise UserError(f"could not load the FLUX folder ({type(e).__name__}: {str(e).splitlines()[0][:200]})",
                        path=path) from None
    tok1.model_max_length = 77
    model = FluxModel(tr, vae, te1, te3, tok1, tok3, source=str(path), options=options)
    model.freeze()
    return model


def load_flux(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, clip_l=None, t5xxl=None, ae=None,
              t5xxl_tokenizer=None, options: FluxOptions | None = None, fp8_base: bool = False) -> FluxModel:
    """Load FLUX.1 from a diffusers folder or a BFL transformer file plus clip_l / t5xxl / ae files."""
    path = Path(path)
    if not path.exists():
        raise UserError("model not found", path=path)
    if path.is_dir():
        model = load_diffusers_flux(path, dtype=dtype, options=options, fp8_base=fp8_base)
    else:
        if path.suffix.lower() != ".safetensors":
            raise UserError("FLUX transformers are read from .safetensors files", path=path)
        model = load_bfl_files(path, clip_l=clip_l, t5xxl=t5xxl, ae=ae, t5xxl_tokenizer=t5xxl_tokenizer, dtype=dtype,
                               options=options, fp8_base=fp8_base)
    if fp8_base:
        model.store_base_fp8()
    return model


# ------------------------------------------------------------------ detection (model-family registry)
def detect_folder(path: Path) -> bool:
    index = Path(path) / "model_index.json"
    if not index.exists():
        return False
    try:
        cls = str(json.loads(index.read_text(encoding="utf-8")).get("_class_name", ""))
    except (OSError, ValueError):
        return False
    return cls.startswith("Flux")


def detect_single_file(keys: list[str], metadata: dict[str, str] | None = None) -> bool:
    bare = {k.split("diffusion_model.", 1)[-1] for k in keys}
    return any(k.startswith(("double_blocks.", "single_blocks.", "double_stream_modulation")) for k in bare)


def build_flux_on_meta(variant: str = "dev", options: FluxOptions | None = None) -> FluxModel:
    """The full-size FLUX.1 architecture (transformer, CLIP-L, T5-XXL, ae) without weights, on the meta device.

    For module names and sizes (LoRA layouts, benchmarks: `to_empty` then initialise); never for outputs.
    """
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from .flux_transformer import FLUX_DEV, FLUX_SCHNELL

    if variant not in ("dev", "schnell"):
        raise UserError(f"FLUX.1 variant must be dev or schnell, got {variant!r}")
    with torch.device("meta"):
        tr = FluxTransformer(FLUX_DEV if variant == "dev" else FLUX_SCHNELL)
        clip = CLIPTextModel(CLIPTextConfig(**CLIP_L_CONFIG))
        t5 = T5EncoderModel(T5Config(**T5XXL_CONFIG))
        vae = AutoencoderKL(**AE_CONFIG)
    return FluxModel(tr, vae, clip, t5, None, None, source=f"FLUX.1-{variant} (meta)", options=options)
