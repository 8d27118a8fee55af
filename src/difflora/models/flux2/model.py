"""The loaded FLUX.2 model: prompt encoding, the transformer's prediction, the VAE's normalised latents,
kohya LoRA targets, the family's sampler and low-VRAM settings.

Latents are what the transformer sees: the VAE's 32 channels in 2x2 patches (128 channels at 1/16 of the
image side), normalised by the VAE's BatchNorm statistics, (z - running_mean) / sqrt(running_var + eps),
as diffusers' pipelines and musubi do. A latent cell is one token.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

from ...errors import UserError
from ...network.lora import LoRATarget
from ..base import Conditioning, ModelFamily
from ..flow_matching import FlowMatchOptions, FluxFlowObjective, flux_time_shift, flux_time_shift_mu, squeeze_to_window
from . import names
from .variants import MAX_TOKENS, SAMPLING, Size, version_name

log = logging.getLogger(__name__)

TRAIN_BLOCKS = ("all", "double", "single")
REFERENCE_T_SCALE = 10  # the i-th reference image's tokens get t = 10 + 10·i (BFL, diffusers, musubi, ComfyUI)
SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5,
                    "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096,
                    "time_shift_type": "exponential"}


@dataclass
class Flux2Options:
    """FLUX.2's job options (musubi's names and defaults where it has them)."""

    distilled: bool = False  # klein: the step-distilled model (4 steps, no CFG) rather than the base
    guidance_scale: float = 1.0  # dev's embedded guidance while training (musubi trains dev at 1.0)
    sample_guidance_scale: float = 4.0  # dev's embedded guidance when generating
    max_token_length: int = MAX_TOKENS
    train_blocks: str = "all"
    flow: FlowMatchOptions = field(default_factory=lambda: FlowMatchOptions("flux_shift", 1.0, 3.0, "raw"))


class Flux2Objective(FluxFlowObjective):
    """kohya's flow matching; "flux_shift" is musubi's flux2_shift: μ linear in the token count (0.5 at 256,
    1.15 at 4096), σ = shift(sigmoid(n)). A FLUX.2 latent cell is one token (FLUX.1 packs 2x2 cells)."""

    def sample_sigmas(self, n, generator, latent_hw):
        if self.options.timestep_sampling != "flux_shift":
            return super().sample_sigmas(n, generator, latent_hw)
        sig = torch.sigmoid(self.options.sigmoid_scale * torch.randn(n, generator=generator))
        h, w = latent_hw
        return flux_time_shift(sig, flux_time_shift_mu(h * w))


def patchify(z: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 4C, H/2, W/2), channel-major inside a 2x2 patch (the pipelines' _patchify_latents)."""
    b, c, h, w = z.shape
    return z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)


def unpatchify(x: torch.Tensor) -> torch.Tensor:
    b, c4, h, w = x.shape
    return x.view(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c4 // 4, h * 2, w * 2)


def token_ids(b: int, h: int, w: int, t: float = 0.0, device=None) -> torch.Tensor:
    """(B, h·w, 4) RoPE positions (t, row, column, 0) of an image's tokens, row-major."""
    ids = torch.zeros(h, w, 4, device=device)
    ids[..., 0] = t
    ids[..., 1] = torch.arange(h, device=device)[:, None]
    ids[..., 2] = torch.arange(w, device=device)[None, :]
    return ids.reshape(1, h * w, 4).expand(b, -1, -1)


def text_ids(b: int, length: int, device=None) -> torch.Tensor:
    ids = torch.zeros(length, 4, device=device)
    ids[:, 3] = torch.arange(length, device=device)
    return ids.reshape(1, length, 4).expand(b, -1, -1)


class Flux2Model(ModelFamily):
    """FLUX.2 dev or klein 4B / 9B (step-distilled or base)."""

    family = "flux2"
    default_sampler = "euler"
    default_cfg = 4.0  # klein base's CFG, dev's embedded guidance (the pipelines' default)

    def __init__(self, transformer, vae, text_encoder, tokenizer, size: Size, *, source: str = "",
                 options: Flux2Options | None = None):
        self.denoiser = transformer
        self.vae = vae
        self.text_encoders = {"text_encoder": text_encoder}
        self.tokenizer = tokenizer
        self.size = size
        self.source = source
        self.options = options or Flux2Options()
        if self.options.train_blocks not in TRAIN_BLOCKS:
            raise UserError(f"train_blocks must be one of {', '.join(TRAIN_BLOCKS)}, got {self.options.train_blocks!r}")
        self.objective = Flux2Objective(self.options.flow)
        self.compute_dtype: torch.dtype | None = None  # bf16 when the base is stored in fp8
        self._cached_prompts: dict[str, Conditioning] | None = None
        self.block_swap = None  # low_vram.BlockSwap once blocks_to_swap is set

    @property
    def transformer(self):
        return self.denoiser

    @property
    def guidance_embeds(self) -> bool:
        return bool(self.transformer.config.guidance_embeds)

    @property
    def version(self) -> str:
        """musubi's model_version: dev, klein-4b, klein-base-4b, klein-9b, klein-base-9b."""
        return version_name(self.size, self.options.distilled)

    # ---- identity and metadata
    @property
    def base_model_version(self) -> str:
        return f"flux2_{self.version.replace('-', '_')}"

    @property
    def modelspec_architecture(self) -> str:
        return self.size.architecture

    @property
    def resolution(self) -> int:
        return 1024 if self.transformer.inner_dim >= 3072 else 4 * self.latent_multiple

    @property
    def latent_downscale(self) -> int:
        """Pixels per latent cell: the VAE's factor times the 2x2 patch."""
        return 2 * 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 16

    @property
    def latent_multiple(self) -> int:
        return self.latent_downscale

    def lora_metadata(self) -> dict[str, str]:
        f = self.objective.options
        return {
            "ss_base_model_version": self.base_model_version,
            "ss_v2": "False",
            "ss_flux2_model_version": self.version,
            "ss_timestep_sampling": "flux2_shift" if f.timestep_sampling == "flux_shift" else f.timestep_sampling,
            "ss_sigmoid_scale": str(f.sigmoid_scale),
            "ss_model_prediction_type": f.model_prediction_type,
            "ss_discrete_flow_shift": str(f.discrete_flow_shift),
            **({"ss_guidance_scale": str(self.options.guidance_scale)} if self.guidance_embeds else {}),
            "modelspec.architecture": self.modelspec_architecture,
            "modelspec.implementation": "https://github.com/black-forest-labs/flux2",
            "modelspec.resolution": f"{self.resolution}x{self.resolution}",
        }

    # ---- LoRA
    def module_map(self) -> dict[str, str]:
        """BFL module -> our module, for every Linear a LoRA may name."""
        cfg = self.transformer.config
        return names.module_map(cfg.num_layers, cfg.num_single_layers, self.guidance_embeds)

    def lora_targets(self, conv: bool = False) -> list[LoRATarget]:
        """musubi's default: every Linear of the double and single blocks (160 / 80 / 112 modules on dev / klein-4B /
        klein-9B). conv=True: every Linear a FLUX.2 LoRA file may hold (the peers' all-linear sets: embedders, global
        modulation and the final adaLN too; a job's conv_dim trains them)."""
        blocks = "all" if conv else self.options.train_blocks
        out = []
        for bfl, ours in self.module_map().items():
            in_blocks = bfl.startswith(("double_blocks.", "single_blocks."))
            if not conv and (not in_blocks or (blocks != "all" and not bfl.startswith(blocks))):
                continue
            out.append(LoRATarget(names.kohya_name(bfl), self.transformer.get_submodule(ours), "unet"))
        return out

    def adapt_lora_file(self, lora):
        """Check a LoRA file is a FLUX.2 one and bring ComfyUI / ai-toolkit / diffusers / DiffSynth / musubi
        spellings to kohya names."""
        from ...fileio import load_safetensors
        from ...network.files import LoraFile

        version = lora.metadata.get("ss_base_model_version", "")
        if version and not version.startswith("flux2"):
            what = "FLUX.1" if version.startswith("flux") else version
            raise UserError(f"LoRA was trained for {what} (ss_base_model_version {version}), not FLUX.2",
                            path=lora.path)
        raw, md = load_safetensors(lora.path) if lora.source_format == "peft" or names.is_peer_spelling(
            lora.tensors) else (None, None)
        if raw is not None:
            if not names.is_peer_spelling(raw):
                raise UserError("peft-format LoRA without FLUX.2 transformer keys: it was made for another model",
                                path=lora.path)
            rows = {ours: self.transformer.get_submodule(ours).out_features // 3
                    for ours in self.module_map().values() if ours.endswith(tuple(names.SPLIT))}
            lora = LoraFile(names.peer_to_kohya(raw, md, self.module_map(), rows, lora.path), lora.metadata,
                            lora.path, "peft")
        known = {t.name for t in self.lora_targets(conv=True)}
        foreign = [n for n in lora.module_names() if n not in known]
        if foreign:
            raise UserError(f"module {foreign[0]} is not a module of this FLUX.2 {self.size.name} transformer "
                            f"({len(foreign)} of {len(lora.module_names())} modules): "
                            f"{_what_lora_is(foreign)}", path=lora.path)
        return lora

    def check_save_format(self, save_format: str, adapter) -> None:
        """What export_lora refuses (one module), and DoRA for diffusers' note (peft's per-row magnitude)."""
        from ...network.files import warn_dora_for_diffusers

        super().check_save_format(save_format, adapter)
        if save_format == "diffusers":
            warn_dora_for_diffusers(adapter)

    def export_lora(self, tensors: dict[str, torch.Tensor], save_format: str = "kohya") -> dict[str, torch.Tensor]:
        """kohya names (musubi's; loads in ComfyUI and diffusers as is), "comfyui" (`diffusion_model.` + BFL path,
        ai-toolkit's spelling, scale baked in) or "diffusers" (`transformer.` + diffusers path, q/k/v split)."""
        if save_format == "kohya":
            return tensors
        if save_format == "comfyui":
            return names.kohya_to_comfyui(tensors)
        if save_format == "diffusers":
            return names.kohya_to_diffusers(tensors, self.module_map())
        raise UserError(f"save_format = {save_format!r} is not available for FLUX.2 (kohya, comfyui, diffusers are)")

    # ---- conditioning
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        if self._cached_prompts is not None:
            missing = [p for p in prompts if p not in self._cached_prompts]
            if missing:
                raise UserError(f"prompt {missing[0][:60]!r} was not encoded before the text encoder was freed "
                                "(cache_text_encoder_outputs encodes the dataset's captions, the validation "
                                "captions and the sample prompts once, at the start)")
            return Conditioning.cat([self._cached_prompts[p] for p in prompts]).to(self.device)
        self.require("text_encoder")
        te = self.text_encoders["text_encoder"]
        with torch.no_grad():
            embeds = self._prompt_embeds(te, list(prompts))
        return Conditioning({"txt": embeds})

    def _prompt_embeds(self, te, prompts: list[str]) -> torch.Tensor:
        """The pipelines' own encoding: chat template, max_token_length tokens, hidden states stacked."""
        n = self.options.max_token_length
        if self.size.text_encoder == "qwen3":
            from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline

            return Flux2KleinPipeline._get_qwen3_prompt_embeds(te, self.tokenizer, prompts, max_sequence_length=n,
                                                               hidden_states_layers=self.size.text_layers)
        from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline

        return torch.cat([Flux2Pipeline._get_mistral_3_small_prompt_embeds(
            te, self.tokenizer, [p], max_sequence_length=n, hidden_states_layers=self.size.text_layers)
            for p in prompts])  # one at a time: a prompt's encoding does not depend on its batch

    drops_cached_text_encoders = True

    def drop_text_encoders(self, cached: dict[str, Conditioning]) -> list[str]:
        """cache_text_encoder_outputs: the text encoder (Qwen3 4B/8B, Mistral Small 24B) is freed, not moved."""
        self._cached_prompts = {p: c.to("cpu") for p, c in cached.items()}
        self.text_encoders = {"text_encoder": None}
        self.text_encoders_dropped = True
        log.info("encoded %d prompt(s) once; the %s text encoder freed (cache_text_encoder_outputs)", len(cached),
                 self.size.text_encoder)
        return ["text_encoder"]

    def require(self, *keys: str) -> None:
        have = {"text_encoder": self.text_encoders.get("text_encoder"), "vae": self.vae}
        missing = [k for k in keys if have[k] is None]
        if missing:
            raise UserError(f"this FLUX.2 transformer was loaded without {', '.join('`' + k + '`' for k in missing)}: "
                            "set the text_encoder and vae files (as in musubi's FLUX.2 training)", path=self.source)

    def check_complete(self) -> None:
        self.require(*(() if self.text_encoders_dropped else ("text_encoder",)), "vae")

    # ---- edit (reference images: the edit methods, generate --control)
    max_control_images = 10  # BFL's multi-reference limit

    def control_conditioning(self, controls: list[torch.Tensor]) -> Conditioning:
        """The control latents as the pipelines' reference tokens, image i at t = 10 + 10·i (`predict` appends them)."""
        tokens, ids = self.reference_tokens(controls)
        return Conditioning({"ref_tokens": tokens, "ref_ids": ids})

    def control_size(self, width: int, height: int) -> tuple[int, int]:
        """The pipelines' reference size: at most 1024² pixels, sides floored to the latent multiple."""
        if width * height > 1024 * 1024:
            scale = math.sqrt(1024 * 1024 / (width * height))
            width, height = int(width * scale), int(height * scale)
        m = self.latent_multiple
        return width // m * m, height // m * m

    def resize_control(self, image):
        """As the pipelines do: Lanczos down to a 1024² area only when larger, then a centred crop (no resampling) to
        the sides floored to the latent multiple."""
        from PIL import Image

        if image.width * image.height > 1024 * 1024:
            scale = math.sqrt(1024 * 1024 / (image.width * image.height))
            image = image.resize((int(image.width * scale), int(image.height * scale)), Image.LANCZOS)
        w, h = self.control_size(*image.size)
        left, top = (image.width - w) // 2, (image.height - h) // 2
        return image.crop((left, top, left + w, top + h))

    # ---- prediction
    def reference_tokens(self, latents: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference images' latents (each (B, 128, h, w), from encode_images) as the pipelines pack them: tokens
        concatenated (B, Σ h·w, 128) and their ids, image i at t = 10 + 10·i. Put them in a Conditioning as
        "ref_tokens" / "ref_ids" and `predict` appends them after the target's tokens and drops their output."""
        toks, ids = [], []
        for i, z in enumerate(latents):
            b, _, h, w = z.shape
            toks.append(z.flatten(2).transpose(1, 2))
            ids.append(token_ids(b, h, w, REFERENCE_T_SCALE * (i + 1), z.device))
        return torch.cat(toks, 1), torch.cat(ids, 1)

    def predict(self, noisy, timesteps, cond):
        """Velocity for latents (B, 128, h, w); timesteps are σ·1000."""
        b, c, h, w = noisy.shape
        tr = self.transformer
        dtype = self.compute_dtype or tr.dtype
        x = noisy.flatten(2).transpose(1, 2)
        ids = token_ids(b, h, w, 0.0, noisy.device)
        if "ref_tokens" in cond.tensors:
            x = torch.cat([x, cond.tensors["ref_tokens"].to(x)], 1)
            ids = torch.cat([ids, cond.tensors["ref_ids"].to(ids)], 1)
        txt = cond.tensors["txt"]
        guidance = torch.full((b,), float(self.options.guidance_scale), device=noisy.device) \
            if self.guidance_embeds else None
        with torch.autocast(noisy.device.type, dtype=dtype, enabled=self.compute_dtype is not None):
            out = tr(hidden_states=x.to(dtype), encoder_hidden_states=txt.to(noisy.device, dtype),
                     timestep=(timesteps.float().to(noisy.device) / self.objective.num_train_timesteps).to(dtype),
                     img_ids=ids, txt_ids=text_ids(b, txt.shape[1], noisy.device), guidance=guidance,
                     return_dict=False)[0]
        return out[:, : h * w].transpose(1, 2).reshape(b, c, h, w).to(noisy.dtype)

    # ---- VAE
    def _bn(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bn = self.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps).to(like.device, like.dtype)
        return mean, std

    def encode_images(self, pixels, sample=True, generator=None):
        self.require("vae")
        dist = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist
        z = patchify(dist.sample(generator=generator) if sample else dist.mode())
        mean, std = self._bn(z)
        return (z - mean) / std

    def decode_latents(self, latents):
        self.require("vae")
        latents = latents.to(self.vae.dtype)
        mean, std = self._bn(latents)
        return self.vae.decode(unpatchify(latents * std + mean)).sample

    def sample_timesteps(self, n, generator, latent_hw, window):
        """The flow-matching timestep_sampling (musubi's flux2_shift by default), squeezed into the job's
        min/max_timestep window."""
        return squeeze_to_window(self.objective.sample_timesteps(n, generator, latent_hw), window,
                                 self.objective.num_train_timesteps)

    # ---- sampling
    def sampling_defaults(self) -> tuple[int, float]:
        """(steps, guidance) of this variant: dev 50 at embedded 4.0, klein base 50 at CFG 4.0, distilled 4, none."""
        if self.size.name == "dev":
            return SAMPLING["dev"]
        return SAMPLING["distilled" if self.options.distilled else "base"]

    def uses_cfg(self) -> bool:
        """Classifier-free guidance with a negative prompt: the klein base models (distilled and dev embed it)."""
        return not self.guidance_embeds and not self.options.distilled

    @torch.no_grad()
    def sample_latents(self, cond: Conditioning, seeds: list[int], steps: int, width: int, height: int,
                       cfg: float = 4.0, uncond: Conditioning | None = None) -> torch.Tensor:
        """The pipelines' sampler: FlowMatchEulerDiscreteScheduler over linspace(1, 1/steps) shifted by the
        empirical μ(tokens, steps), noise drawn per seed as (1, 128, h, w)."""
        from diffusers import FlowMatchEulerDiscreteScheduler
        from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

        ds = self.latent_downscale
        h, w = height // ds, width // ds
        c = self.transformer.config.in_channels
        x = torch.cat([torch.randn((1, c, h, w), generator=torch.Generator().manual_seed(int(s))) for s in seeds])
        x = x.to(self.device)
        sched = FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=compute_empirical_mu(h * w, steps),
                            device=x.device)
        sched.set_begin_index(0)
        for t in sched.timesteps:
            tt = t.expand(x.shape[0]).to(torch.float32)
            v = self.predict(x, tt, cond).float()
            if uncond is not None:
                v_neg = self.predict(x, tt, uncond).float()
                v = v_neg + cfg * (v - v_neg)
            x = sched.step(v, t, x, return_dict=False)[0]
        return x

    @torch.no_grad()
    def text_to_image(self, prompts: list[str], seeds: list[int], steps: int | None = None, width: int | None = None,
                      height: int | None = None, cfg: float | None = None, negative: list[str] | None = None,
                      controls: list[list] | None = None) -> np.ndarray:
        """Images (B, H, W, 3) in [0, 1]. cfg: klein base's classifier-free guidance, dev's embedded guidance;
        controls: each prompt's reference images (PIL at control_size), in both CFG passes as the pipelines do."""
        default_steps, default_guidance = self.sampling_defaults()
        guidance = default_guidance if cfg is None else cfg
        cond = self.encode_with_controls(prompts, controls)
        uncond = self.encode_with_controls(negative or [""] * len(prompts), controls) \
            if self.uses_cfg() and guidance > 1 else None
        old = self.options.guidance_scale
        if self.guidance_embeds:
            self.options.guidance_scale = guidance
        try:
            lat = self.sample_latents(cond, seeds, steps or default_steps, width or self.resolution,
                                      height or self.resolution, guidance, uncond)
        finally:
            self.options.guidance_scale = old
        img = self.decode_latents(lat).float().clamp(-1, 1)
        return ((img + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()

    @torch.no_grad()
    def generate_request(self, networks, req, batch_size: int = 64, output: str = "uint8",
                         progress=None) -> list[np.ndarray]:
        """generate.py's request with FLUX.2's sampler; req.cfg is klein base's CFG scale, dev's embedded guidance
        (unused by the distilled klein models)."""
        self.check_complete()
        out = []
        for start in range(0, len(req.prompts), batch_size):
            sl = slice(start, min(len(req.prompts), start + batch_size))
            for i, net in enumerate(networks):
                values = req.multipliers.get(i)
                if values is not None:
                    m = torch.tensor(values[sl], dtype=torch.float32)
                    net.set_multiplier(float(m[0]) if bool((m == m[0]).all()) else m)
            negative = req.negative[sl] if req.negative else None
            imgs = self.text_to_image(req.prompts[sl], req.seeds[sl], req.steps, req.width, req.height, req.cfg,
                                      negative, req.controls[sl] if req.controls else None)
            if progress is not None:
                progress.update(req.steps)
            out.extend(np.asarray(i, dtype=np.float32) if output == "float"
                       else (np.clip(i, 0, 1) * 255).round().astype(np.uint8) for i in imgs)
        return out

    def pipeline_embeddings(self, cond, uncond):
        raise UserError("FLUX.2 images are made by difflora's own sampler (the pipelines' schedule), not a pipeline")

    def pipeline(self, scheduler: str = "euler"):
        raise UserError("FLUX.2 images are made by difflora's own sampler (generate uses it)")

    # ---- training and memory
    def prepare_training(self, job, device) -> None:
        from .low_vram import enable_block_swap

        self.check_complete()
        if job.gradient_checkpointing or job.cpu_offload_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        if job.blocks_to_swap:
            self.block_swap = enable_block_swap(self.transformer, job.blocks_to_swap, torch.device(device))

    def store_base_fp8(self) -> None:
        """musubi's fp8_base: the blocks' frozen Linear weights in float8_e4m3fn, computed in bf16 (embedders,
        modulation and norms stay in bf16, as musubi's fp8_scaled excludes them)."""
        from ..low_vram import store_fp8

        for block in [*self.transformer.transformer_blocks, *self.transformer.single_transformer_blocks]:
            store_fp8(block, torch.bfloat16)
        for p in self.transformer.parameters():
            if p.dtype != torch.float8_e4m3fn:
                p.data = p.data.to(torch.bfloat16)
        self.compute_dtype = torch.bfloat16

    def store_base_nf4(self) -> None:
        """4-bit NF4 frozen blocks (bitsandbytes, CUDA only); the LoRA stays in fp32."""
        from ..low_vram import store_nf4

        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        for block in [*self.transformer.transformer_blocks, *self.transformer.single_transformer_blocks]:
            store_nf4(block, device)
        self.compute_dtype = torch.bfloat16

    def to(self, device=None, dtype=None, text_encoders: bool = True) -> "Flux2Model":
        for m in [self.denoiser, self.vae, *(self.text_encoders.values() if text_encoders else ())]:
            if m is None:
                continue
            if m is not self.denoiser:
                m.to(device=device, dtype=dtype)
                continue
            if dtype is not None and self.compute_dtype is None:
                m.to(dtype=dtype)
            if device is not None and self.block_swap is not None:
                self.block_swap.place(m, device)  # swapped blocks stay on the CPU
            elif device is not None:
                m.to(device=device)
        return self

    @property
    def device(self) -> torch.device:
        return self.transformer.x_embedder.weight.device

    def save(self, path, single_file=None, dtype=None):
        """A diffusers folder, or (path ending .safetensors) BFL's single-file transformer."""
        from pathlib import Path

        from .files import save_bfl_transformer, save_diffusers_folder

        path = Path(path)
        if single_file is None:
            single_file = path.suffix.lower() == ".safetensors"
        if single_file:
            save_bfl_transformer(self, path, dtype=dtype)
        else:
            save_diffusers_folder(self, path, dtype=dtype)


def _what_lora_is(foreign: list[str]) -> str:
    """A line saying which family a LoRA's foreign module names belong to."""
    joined = " ".join(foreign[:50])
    if any(s in joined for s in ("_img_mod_", "_txt_mod_", "_modulation_lin", "single_blocks_0_linear1")) and \
            "stream_modulation" not in joined:
        return "this is a FLUX.1 LoRA, not a FLUX.2 one"
    if "lora_unet_" in joined and any(s in joined for s in ("down_blocks", "input_blocks", "up_blocks", "mid_block")):
        return "this is a Stable Diffusion / SDXL LoRA, not a FLUX.2 one"
    if "lora_te" in joined:
        return "FLUX.2 LoRAs train the transformer only (no text-encoder modules)"
    return "it was made for another model (or another FLUX.2 size)"
