"""FLUX.1-dev, FLUX.1-schnell and FLUX.1 Kontext [dev]: loading, prompt encoding, flow matching, kohya LoRA
targets, sampling.

Two layouts load, fully offline:
- a diffusers folder (FluxPipeline: transformer/, vae/, text_encoder/ (CLIP-L), text_encoder_2/
  (T5-XXL), tokenizer/, tokenizer_2/);
- the files FLUX users have: a BFL single-file transformer (`flux1-dev.safetensors`, bare or
  `model.diffusion_model.` keys, fp32/fp16/bf16/fp8) plus separate `clip_l`, `t5xxl` and `ae`
  files, given by those job keys as in kohya. The CLIP tokenizer is built from the bundled
  vocabulary; T5's comes from `t5xxl_tokenizer` (a folder with tokenizer.json, e.g. a FLUX
  diffusers folder's tokenizer_2/) or from beside the t5xxl file.

The transformer is kept in BFL's layout (transformer.py), so kohya's LoRA names
(`lora_unet_double_blocks_0_img_attn_qkv`, ...) are module paths.

FLUX.1 Kontext [dev] is FLUX.1-dev's architecture (the same keys, so musubi-tuner's and kohya's LoRA names) trained
to edit: the control image's clean latents are packed like the target's and appended after its tokens with position
ids (1, row, column), and only the target's tokens of the output are kept (BFL, diffusers' FluxKontextPipeline,
musubi-tuner, ComfyUI's ReferenceLatent). A FluxKontextPipeline folder says it is Kontext; a single file cannot,
so the job says `model_variant = "kontext"`.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ...errors import UserError
from ...network.lora import LoRATarget
from ..base import Conditioning, ModelFamily
from ..flow_matching import (FlowMatchOptions, FluxFlowObjective, flux_time_shift, flux_time_shift_mu,
                             pack_latents, squeeze_to_window, unpack_latents, weighting_of)
from .transformer import FluxTransformer

log = logging.getLogger(__name__)

FLOW_SAMPLERS = ("euler", "heun")  # the samplers of the flow-matching ODE; kohya's DDPM samplers do not apply

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


def tiny_ae():
    """AE_CONFIG's layout at test size (4 latent channels) for the FLUX.1 and Z-Image test worlds, its latent
    variance near zero."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                        up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[8, 8, 8, 8], layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=32, scaling_factor=0.3611,
                        shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
    with torch.no_grad():  # a near-zero latent variance: an untrained VAE's sampling noise would swamp the images
        c = vae.config.latent_channels
        vae.encoder.conv_out.weight[c:] = 0
        vae.encoder.conv_out.bias[c:] = -30.0
    return vae


SUPPORTED = "supported: FLUX.1-dev, FLUX.1-schnell and FLUX.1 Kontext [dev] layouts (and fine-tunes of them)"
# BFL's preferred Kontext input sizes (width, height): the pipelines resize a control image to the one nearest its
# aspect ratio (diffusers' PREFERRED_KONTEXT_RESOLUTIONS, BFL's PREFERED_KONTEXT_RESOLUTIONS)
KONTEXT_RESOLUTIONS = ((672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184),
                       (944, 1104), (1024, 1024), (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752),
                       (1456, 720), (1504, 688), (1568, 672))
KONTEXT_REFERENCE_T = 1  # the control tokens' first position id (the target's is 0)
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
    lora_embedders: bool = False  # LoRA on the embedders (img_in, time_in, vector_in, guidance_in, txt_in)
    in_dims: list[int] | None = None  # kohya's in_dims: their ranks in that order (0: none)
    train_t5xxl: bool = False
    flow: FlowMatchOptions | None = None

    @classmethod
    def from_job(cls, job) -> "FluxOptions":
        in_dims = list(job.in_dims) if job.in_dims else None
        if in_dims is not None and len(in_dims) != 5:
            raise UserError(f"in_dims needs 5 ranks (img_in, time_in, vector_in, guidance_in, txt_in), got {in_dims}")
        return cls(guidance_scale=job.guidance_scale, t5xxl_max_token_length=job.t5xxl_max_token_length,
                   apply_t5_attn_mask=job.apply_t5_attn_mask, train_blocks=job.train_blocks,
                   lora_embedders=bool(in_dims and any(in_dims)), in_dims=in_dims, train_t5xxl=job.train_t5xxl,
                   flow=FlowMatchOptions(job.timestep_sampling, job.sigmoid_scale, job.discrete_flow_shift,
                                         job.model_prediction_type, **weighting_of(job)))


def image_ids(b: int, h: int, w: int, device=None) -> torch.Tensor:
    """Position ids (B, h/2·w/2, 3): (0, row, column) of each packed patch."""
    ids = torch.zeros(h // 2, w // 2, 3, device=device)
    ids[..., 1] = torch.arange(h // 2, device=device)[:, None]
    ids[..., 2] = torch.arange(w // 2, device=device)[None, :]
    return ids.reshape(1, -1, 3).expand(b, -1, -1)


class FluxModel(ModelFamily):
    """FLUX.1 (dev: guidance-distilled with a guidance embedder; schnell: without)."""

    family = "flux"
    default_sampler = "euler"
    default_cfg = 1.0  # no true CFG: dev's guidance is embedded (guidance_scale)

    def __init__(self, transformer: FluxTransformer, vae, clip_l, t5xxl, clip_tokenizer, t5_tokenizer, *,
                 source: str = "", options: FluxOptions | None = None, kontext: bool = False):
        if kontext and not transformer.params.guidance_embed:
            raise UserError("model_variant = 'kontext' but this transformer has no guidance embedder (FLUX.1-schnell "
                            "layout); FLUX.1 Kontext [dev] has FLUX.1-dev's", path=source or None)
        self.kontext = kontext
        self.max_control_images = 1 if kontext else 0  # Kontext takes one reference image
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
        self._cached_prompts: dict[str, Conditioning] | None = None

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
        return "flux-1-kontext-dev/lora" if self.kontext else f"flux-1-{self.variant}/lora"

    @property
    def resolution(self) -> int:
        return 1024 if self.transformer.params.hidden_size == 3072 else 16 * self.latent_downscale

    @property
    def latent_downscale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 8

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
            ranks = dict(zip(("img_in", "time_in", "vector_in", "guidance_in", "txt_in"), o.in_dims or [None] * 5))
            for name in _EMBEDDERS:
                lin = self.transformer.get_submodule(name) if _has(self.transformer, name) else None
                rank = ranks[name.split(".")[0]]
                if isinstance(lin, nn.Linear) and (conv or rank != 0):
                    out.append(LoRATarget(f"lora_unet_{name}".replace(".", "_"), lin, "unet", None if conv else rank))
        from ..sd.model import text_encoder_lora_targets

        if self.text_encoders.get("clip_l") is not None:
            out += text_encoder_lora_targets(self.text_encoders["clip_l"], prefix="lora_te1", component="clip_l")
        if (conv or o.train_t5xxl) and self.text_encoders.get("t5xxl") is not None:
            for name, lin in self.text_encoders["t5xxl"].named_modules():
                if _T5_ROLE.match(name) and isinstance(lin, nn.Linear):
                    out.append(LoRATarget(f"lora_te3_{name}".replace(".", "_"), lin, "t5xxl"))
        return out

    def adapt_lora_file(self, lora):
        """Check a LoRA file is for FLUX.1 (this variant) and bring diffusers/ai-toolkit names to kohya's."""
        from ...fileio import load_safetensors as _load
        from ...network.files import LoraFile
        from .lora import diffusers_to_kohya, is_diffusers_flux_lora

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
        absent = [p for p, key in (("lora_te1_", "clip_l"), ("lora_te3_", "t5xxl")) if self.text_encoders.get(key) is None]
        dropped = [n for n in names if n.startswith(tuple(absent))]
        if dropped:  # a transformer-only model (merge into a BFL file): its text-encoder modules have nowhere to go
            log.warning("%s: %d text-encoder module(s) left out: this FLUX model was loaded without its text encoders "
                        "(give clip_l / t5xxl, or use a diffusers folder)", lora.path, len(dropped))
            keep = {k: v for k, v in lora.tensors.items() if k.split(".", 1)[0] not in set(dropped)}
            lora = LoraFile(keep, lora.metadata, lora.path, lora.source_format)
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
        if self._cached_prompts is not None:  # cache_text_encoder_outputs: the encoders are gone
            missing = [p for p in prompts if p not in self._cached_prompts]
            if missing:
                raise UserError(f"prompt {missing[0][:60]!r} was not encoded before T5-XXL and CLIP-L were freed "
                                "(cache_text_encoder_outputs encodes the dataset's captions, the validation "
                                "captions and the sample prompts once, at the start)")
            return Conditioning.cat([self._cached_prompts[p] for p in prompts]).to(self.device)
        self.require("clip_l", "t5xxl")
        clip, t5 = self.text_encoders["clip_l"], self.text_encoders["t5xxl"]
        c = self._tokens(self.clip_tokenizer, prompts, 77)
        pooled = clip(c.input_ids.to(clip.device)).pooler_output
        t = self._tokens(self.t5_tokenizer, prompts, self.t5xxl_max_token_length)
        mask = t.attention_mask.to(t5.device)
        hidden = t5(t.input_ids.to(t5.device), attention_mask=mask if self.options.apply_t5_attn_mask else None).last_hidden_state
        return Conditioning({"pooled": pooled, "t5": hidden, "t5_mask": mask})

    drops_cached_text_encoders = True

    def drop_text_encoders(self, cached: dict[str, Conditioning]) -> list[str]:
        """kohya's cache_text_encoder_outputs: T5-XXL (9.5 GB in bf16) and CLIP-L are freed, not just moved off
        the GPU; `cached` (on the CPU, moved per batch) answers every later encode_prompts, and a prompt not in
        it is refused (loading T5 again would undo the saving)."""
        self._cached_prompts = {p: c.to("cpu") for p, c in cached.items()}
        self.text_encoders = {"clip_l": None, "t5xxl": None}
        self.text_encoders_dropped = True
        log.info("encoded %d prompt(s) once; T5-XXL and CLIP-L freed (cache_text_encoder_outputs)", len(cached))
        return ["clip_l", "t5xxl"]

    def require(self, *keys: str) -> None:
        """Stop with a line naming the job key of each component this model was loaded without."""
        have = {"clip_l": self.text_encoders.get("clip_l"), "t5xxl": self.text_encoders.get("t5xxl"), "ae": self.vae}
        missing = [k for k in keys if have[k] is None]
        if missing:
            raise UserError(f"this FLUX transformer was loaded without {', '.join('`' + k + '`' for k in missing)}: "
                            "set the clip_l, t5xxl and ae files (as in kohya's FLUX training)", path=self.source)

    def check_complete(self) -> None:
        """Training and generation need every component (the text encoders' cached outputs stand for them)."""
        self.require(*(() if self.text_encoders_dropped else ("clip_l", "t5xxl")), "ae")

    # ---- edit (FLUX.1 Kontext: the edit methods, generate --control)
    def control_conditioning(self, controls: list[torch.Tensor]) -> Conditioning:
        """The control latents packed as Kontext's reference tokens with ids (1, row, column); `predict` appends them
        after the target's tokens and keeps the target's output only."""
        if not self.kontext:
            return super().control_conditioning(controls)
        (z,) = controls
        b, _, h, w = z.shape
        ids = image_ids(b, h, w, z.device).clone()
        ids[..., 0] = KONTEXT_REFERENCE_T
        return Conditioning({"ref_img": pack_latents(z), "ref_ids": ids})

    def control_size(self, width: int, height: int) -> tuple[int, int]:
        """The pipelines' size for a Kontext input: the preferred resolution nearest its aspect ratio (ties: the
        narrower), sides floored to the latent multiple."""
        ratio = width / height
        _, w, h = min((abs(ratio - rw / rh), rw, rh) for rw, rh in KONTEXT_RESOLUTIONS)
        m = self.latent_multiple
        return w // m * m, h // m * m

    def predict(self, noisy, timesteps, cond):
        """Velocity for unpacked latents (B, C, h, w); timesteps are σ·1000. A Kontext control ("ref_img") joins
        the image tokens and its output is dropped."""
        b, _, h, w = noisy.shape
        tr = self.transformer
        dtype = self.compute_dtype or tr.dtype
        img, ids = pack_latents(noisy.to(dtype)), image_ids(b, h, w, noisy.device)
        if "ref_img" in cond.tensors:
            img = torch.cat([img, cond.tensors["ref_img"].to(img)], 1)
            ids = torch.cat([ids, cond.tensors["ref_ids"].to(ids)], 1)
        txt = cond.tensors["t5"]
        txt_ids = torch.zeros(b, txt.shape[1], 3, device=noisy.device)
        guidance = torch.full((b,), float(self.options.guidance_scale), device=noisy.device) \
            if tr.params.guidance_embed else None
        mask = cond.tensors.get("t5_mask") if self.options.apply_t5_attn_mask else None
        with torch.autocast(noisy.device.type, dtype=dtype, enabled=self.compute_dtype is not None):
            out = tr(img, ids, txt.to(dtype), txt_ids,
                     timesteps.float().to(noisy.device) / self.objective.num_train_timesteps,
                     cond.tensors["pooled"].to(dtype), guidance, txt_mask=mask)
        return unpack_latents(out[:, : (h // 2) * (w // 2)], h, w).to(noisy.dtype)

    # ---- VAE
    def encode_images(self, pixels, sample=True, generator=None):
        self.require("ae")
        cfg = self.vae.config
        dist = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist
        z = dist.sample(generator=generator) if sample else dist.mode()
        return (z - (cfg.shift_factor or 0.0)) * cfg.scaling_factor

    def decode_latents(self, latents):
        self.require("ae")
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
    def sample_latents(self, cond: Conditioning, seeds: list[int], steps: int, width: int, height: int,
                       sampler: str = "euler", cfg: float = 1.0, uncond: Conditioning | None = None) -> torch.Tensor:
        """Flow-matching sampling from per-seed noise; returns latents (B, C, h, w).

        `sampler`: "euler" (BFL's), or "heun" (Heun's second order: a second prediction at the step's end, not on
        the last step, which ends at σ = 0). `cfg` > 1: true classifier-free guidance against `uncond` (the
        negative prompts), v = v_neg + cfg·(v - v_neg), what de-distilled FLUX fine-tunes sample with.
        """
        self.check_sampler(sampler)
        ds = self.latent_downscale
        h, w = 2 * ((height + 2 * ds - 1) // (2 * ds)), 2 * ((width + 2 * ds - 1) // (2 * ds))
        c = self.vae.config.latent_channels
        x = torch.stack([torch.randn(c, h, w, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
        x = x.to(self.device)

        def velocity(x, sigma: float) -> torch.Tensor:
            t = torch.full((x.shape[0],), sigma * self.objective.num_train_timesteps, device=x.device)
            v = self.predict(x, t, cond).float()
            if cfg > 1.0:
                v_neg = self.predict(x, t, uncond).float()
                v = v_neg + cfg * (v - v_neg)
            return v

        sig = [float(s) for s in self.sigmas_for_sampling(steps, (h // 2) * (w // 2))]
        for cur, nxt in zip(sig[:-1], sig[1:]):
            v = velocity(x, cur)
            if sampler == "heun" and nxt > 0:
                v = (v + velocity(x + (nxt - cur) * v, nxt)) / 2
            x = x + (nxt - cur) * v
        return x

    @torch.no_grad()
    def text_to_image(self, prompts: list[str], seeds: list[int], steps: int = 20, width: int | None = None,
                      height: int | None = None, guidance: float | None = None, sampler: str = "euler",
                      cfg: float = 1.0, negative: list[str] | None = None,
                      controls: list[list] | None = None) -> np.ndarray:
        """Images (B, H, W, 3) in [0, 1]; `guidance` overrides guidance_scale for a dev model; `cfg` > 1 guides
        away from `negative` (empty prompts by default); `controls`: each prompt's Kontext input (PIL at
        control_size), in both CFG passes as the pipeline does."""
        old = self.options.guidance_scale
        if guidance is not None:
            self.options.guidance_scale = guidance
        try:
            cond = self.encode_with_controls(prompts, controls)
            uncond = self.encode_with_controls(negative or [""] * len(prompts), controls) if cfg > 1.0 else None
            lat = self.sample_latents(cond, seeds, steps, width or self.resolution, height or self.resolution,
                                      sampler, cfg, uncond)
        finally:
            self.options.guidance_scale = old
        img = self.decode_latents(lat).float().clamp(-1, 1)
        return ((img + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()

    def sample_timesteps(self, n, generator, latent_hw, window):
        """kohya's timestep_sampling (flow_matching.py), squeezed into the job's min/max_timestep window."""
        return squeeze_to_window(self.objective.sample_timesteps(n, generator, latent_hw), window,
                                 self.objective.num_train_timesteps)

    def check_sampler(self, name):
        if name not in FLOW_SAMPLERS:
            raise UserError(f"sampler {name!r} is not a flow-matching sampler; FLUX samples with "
                            f"{' or '.join(FLOW_SAMPLERS)}")

    @torch.no_grad()
    def generate_request(self, networks, req, batch_size: int = 64, output: str = "uint8",
                         progress=None) -> list[np.ndarray]:
        """generate.py's request on FLUX: dev's embedded guidance (guidance_scale), and true CFG against the
        negative prompt when req.cfg > 1 (two predictions per step, each at the samples' own LoRA multipliers)."""
        self.check_complete()
        if req.cfg <= 1.0 and any(req.negative or []):
            log.warning("FLUX: the negative prompt has no effect at cfg %g (true CFG needs cfg > 1)", req.cfg)
        out = []
        for start in range(0, len(req.prompts), batch_size):
            sl = slice(start, min(len(req.prompts), start + batch_size))
            for i, net in enumerate(networks):
                values = req.multipliers.get(i)
                if values is not None:
                    m = torch.tensor(values[sl], dtype=torch.float32)
                    net.set_multiplier(float(m[0]) if bool((m == m[0]).all()) else m)
            imgs = self.text_to_image(req.prompts[sl], req.seeds[sl], req.steps, req.width, req.height,
                                      sampler=req.sampler, cfg=req.cfg, negative=(req.negative or None) and req.negative[sl],
                                      controls=req.controls[sl] if req.controls else None)
            if progress is not None:
                progress.update(req.steps)
            out.extend(np.asarray(i, dtype=np.float32) if output == "float"
                       else (np.clip(i, 0, 1) * 255).round().astype(np.uint8) for i in imgs)
        return out

    def prepare_training(self, job, device) -> None:
        from ..low_vram import enable_block_swap

        self.check_complete()
        if self.variant == "schnell" and self.options.in_dims and self.options.in_dims[3]:
            raise UserError(f"in_dims gives guidance_in rank {self.options.in_dims[3]}, but FLUX.1-schnell has no "
                            "guidance embedder (a schnell LoRA cannot train guidance); set its fourth value to 0",
                            path=getattr(job, "_source", None) or self.source)
        if job.cpu_offload_checkpointing or job.gradient_checkpointing:
            self.enable_gradient_checkpointing(cpu_offload=job.cpu_offload_checkpointing)
        if job.blocks_to_swap:
            enable_block_swap(self.transformer, job.blocks_to_swap, torch.device(device))

    def check_save_format(self, save_format: str, adapter) -> None:
        """diffusers' FluxPipeline.load_lora_weights reads peft keys of `transformer.` and `text_encoder.` (CLIP-L)
        only: T5 keys are skipped without a word (tests/test_client_loaders.py). Its DoRA is peft's
        `lora_magnitude_vector`, the output-axis magnitude: DoRA saved for diffusers trains that axis
        (adapter.dora_on_output), which A1111 and ComfyUI do not apply as trained (they use the input axis)."""
        if save_format == "diffusers":  # FLUX's own reasons first; the sample export adds peft_lora_parts' checks
            self._check_diffusers_format(adapter)
        super().check_save_format(save_format, adapter)
        if save_format == "diffusers":
            from ...network.files import warn_dora_for_diffusers

            warn_dora_for_diffusers(adapter)

    def _check_diffusers_format(self, adapter) -> None:
        if self.options.train_t5xxl:
            raise UserError('save_format = "diffusers" with train_t5xxl: diffusers\' FluxPipeline loads no T5 LoRA '
                            '(it skips text_encoder_2 keys); save the kohya format (ComfyUI applies lora_te3_)')
        from ...network.adapters import ADAPTERS

        if not ADAPTERS[adapter.algo].low_rank or adapter.use_tucker:  # peft holds up @ down factors only
            what = ADAPTERS[adapter.algo].title + (" + Tucker" * adapter.use_tucker)
            raise UserError(f'save_format = "diffusers" with {what}: diffusers loads FLUX.1 LoRAs as peft '
                            'lora_A/lora_B (+ DoRA\'s lora_magnitude_vector), which holds no LoHa or LoKr; save the '
                            'kohya format (A1111, Forge and ComfyUI apply it)')

    def export_lora(self, tensors: dict[str, torch.Tensor], save_format: str = "kohya") -> dict[str, torch.Tensor]:
        """kohya names by default; "diffusers": `transformer.`-prefixed peft keys (models/flux_lora.py)."""
        if save_format == "kohya":
            return tensors
        if save_format != "diffusers":
            raise UserError(f"save_format = {save_format!r} is not a FLUX.1 LoRA layout (kohya or diffusers)")
        from .lora import kohya_to_diffusers

        return kohya_to_diffusers(tensors, self.transformer.params)

    def pipeline_embeddings(self, cond, uncond):
        raise UserError("FLUX images are made by difflora's own flow-matching sampler, not a diffusers pipeline")

    def pipeline(self, scheduler: str = "euler"):
        raise UserError("FLUX images are made by difflora's own flow-matching Euler sampler (generate uses it)")

    # ---- memory
    def enable_gradient_checkpointing(self, cpu_offload: bool = False) -> None:
        self.transformer.enable_gradient_checkpointing(cpu_offload)

    def store_base_fp8(self) -> None:
        """kohya's fp8_base: frozen block weights in float8_e4m3fn, computed in bf16."""
        from ..low_vram import store_fp8

        store_fp8(self.transformer, torch.bfloat16)
        for m in self.transformer.modules():  # norms, embedders etc. compute in bf16 too
            for p in m.parameters(recurse=False):
                if p.dtype != torch.float8_e4m3fn:
                    p.data = p.data.to(torch.bfloat16)
        self.compute_dtype = torch.bfloat16

    def store_base_nf4(self) -> None:
        """4-bit NF4 frozen blocks (bitsandbytes, CUDA only); the LoRA stays in fp32."""
        from ..low_vram import store_nf4

        for block in self.transformer.blocks():
            store_nf4(block, torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
        self.compute_dtype = torch.bfloat16

    def to(self, device=None, dtype=None, text_encoders: bool = True) -> "FluxModel":
        for m in [self.denoiser, self.vae, *(self.text_encoders.values() if text_encoders else ())]:
            if m is None:
                continue
            if m is not self.denoiser:
                m.to(device=device, dtype=dtype)
                continue
            if dtype is not None and self.compute_dtype is None:  # fp8 storage stays fp8
                m.to(dtype=dtype)
            if device is not None and self.transformer.block_swap is not None:
                self.transformer.block_swap.place(m, device)  # swapped blocks stay on the CPU
            elif device is not None:
                m.to(device=device)
        return self

    @property
    def device(self) -> torch.device:
        return self.transformer.img_in.weight.device

    # ---- saving
    def save(self, path, single_file=None, dtype=None):
        """A diffusers folder, or (path ending .safetensors) the BFL single-file transformer."""
        path = Path(path)
        if single_file is None:
            single_file = path.suffix.lower() == ".safetensors"
        from .files import save_bfl_transformer, save_diffusers_folder

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



# ------------------------------------------------------------------ the loader (models/flux/__init__.py)
def load(path, *, dtype=torch.float32, checkpoint=None, options=None, prediction_type=None,
         mixed_precision: str = "no") -> "FluxModel":
    """The plugin's loader. `options` (FluxJobOptions: the job's FLUX keys, or generate's flags) names the files
    and sets the options; None keeps every default."""
    from .files import load_flux
    from .options import FluxJobOptions

    if prediction_type not in (None, "flow"):
        raise UserError(f"FLUX.1 is a flow-matching model; prediction type {prediction_type!r} does not apply",
                        path=path)
    options = options or FluxJobOptions()
    if mixed_precision == "bf16" or options.fp8_base:
        dtype = torch.bfloat16  # kohya: the frozen model in the mixed-precision dtype; LoRA weights stay fp32
    files = {k: getattr(options, k) for k in ("clip_l", "t5xxl", "ae", "t5xxl_tokenizer")}
    model = load_flux(path, dtype=dtype, checkpoint=checkpoint, fp8_base=options.fp8_base,
                      options=FluxOptions.from_job(options), model_variant=options.model_variant,
                      **{k: v for k, v in files.items() if v is not None})
    if options.nf4_base:
        model.store_base_nf4()
    return model
