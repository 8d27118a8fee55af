"""Qwen-Image and Qwen-Image-Edit (2509 / 2511): prompt encoding, flow matching, kohya targets, sampling.

The components are diffusers' and transformers' own classes: `QwenImageTransformer2DModel` (60 dual-stream blocks),
`AutoencoderKLQwenImage` (Wan2.1-style, 16 channels, per-channel mean/std) and Qwen2.5-VL-7B, whose last hidden state
is the text condition after the chat template's system prefix is dropped (34 tokens for Qwen-Image, 64 for the edit
models), as diffusers' pipelines do. The edit models' control images also go through the VL encoder ("Picture i:"
prompts at a 384² area for Edit-2509/2511, the image itself for Edit) and are appended as clean reference tokens with
their own RoPE frame (`predict_with_references`, the hook the edit method builds on).

Latents outside this module are (B, 16, H/8, W/8) and normalised; `predict` packs 2x2 patches into the transformer's
tokens and back.
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
from ..flow_matching import (FlowMatchOptions, FluxFlowObjective, pack_latents, shift_sigma, squeeze_to_window,
                             unpack_latents)
from ..objectives import FlowMatchingObjective
from .files import EDIT_VARIANTS

log = logging.getLogger(__name__)

T2I_TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
                "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
                "<|im_start|>assistant\n")
EDIT_TEMPLATE = ("<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, "
                 "objects, background), then explain how the user's text instruction should alter or modify the image. "
                 "Generate a new image that meets the user's requirements while maintaining consistency with the "
                 "original input where appropriate.<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n")
DROP_INDEX = {"qwen_image": 34, "edit": 64, "edit_2509": 64, "edit_2511": 64}  # the template's system-prefix tokens
TOKENIZER_MAX_LENGTH = 1024
EDIT_IMAGE_PROMPT = "<|vision_start|><|image_pad|><|vision_end|>"
PLUS_IMAGE_PROMPT = "Picture {}: <|vision_start|><|image_pad|><|vision_end|>"
CONDITION_IMAGE_AREA = 384 * 384  # Edit-2509/2511: what the VL encoder sees
EDIT_IMAGE_AREA = 1024 * 1024  # Edit: what the VL encoder sees; every edit model: the reference latents' area
TIMESTEP_SAMPLING = ("sigma", "uniform", "sigmoid", "shift", "qwen_shift")
MODELSPEC = {"qwen_image": "Qwen-Image", "edit": "Qwen-Image-Edit", "edit_2509": "Qwen-Image-Edit-Plus",
             "edit_2511": "Qwen-Image-Edit-2511"}  # musubi-tuner's modelspec.architecture values
BLOCK = "transformer_blocks"
PLUS_VARIANTS = ("edit_2509", "edit_2511")  # several control images, each after "Picture i:"


def area_size(area: int, ratio: float) -> tuple[int, int]:
    """(width, height) of `area` pixels at aspect `ratio`, in multiples of 32 (the pipelines' calculate_dimensions)."""
    width = math.sqrt(area * ratio)
    return round(width / 32) * 32, round(width / ratio / 32) * 32


def qwen_shift_mu(image_tokens: int) -> float:
    """musubi's qwen_shift μ (the published scheduler's dynamic shift): 0.5 at 256 packed tokens, 0.9 at 8192."""
    return 0.5 + (0.9 - 0.5) * (image_tokens - 256) / (8192 - 256)


@dataclass
class QwenImageOptions:
    """Qwen-Image job options (musubi-tuner's names; its defaults except discrete_flow_shift, see options.py)."""

    variant: str = "qwen_image"
    flow: FlowMatchOptions = field(default_factory=lambda: FlowMatchOptions("shift", 1.0, 2.2, "raw"))

    def check(self) -> "QwenImageOptions":
        f = self.flow
        if f.timestep_sampling not in TIMESTEP_SAMPLING:
            raise UserError(f"timestep_sampling = {f.timestep_sampling!r} is not available for Qwen-Image "
                            f"(choose {', '.join(TIMESTEP_SAMPLING)})")
        if f.model_prediction_type != "raw":
            raise UserError("Qwen-Image trains on the raw velocity (musubi); model_prediction_type is a FLUX key")
        return self


class QwenFlowObjective(FluxFlowObjective):
    """Rectified flow (target ε - x0, raw prediction) with musubi's Qwen-Image timestep samplings."""

    def __init__(self, options: FlowMatchOptions):
        FlowMatchingObjective.__init__(self, 1000)
        self.options = options

    def sample_sigmas(self, n: int, generator: torch.Generator | None, latent_hw: tuple[int, int]) -> torch.Tensor:
        if self.options.timestep_sampling != "qwen_shift":
            return super().sample_sigmas(n, generator, latent_hw)
        sig = torch.sigmoid(self.options.sigmoid_scale * torch.randn(n, generator=generator))
        h, w = latent_hw
        return shift_sigma(sig, math.exp(qwen_shift_mu((h // 2) * (w // 2))))


class QwenImageModel(ModelFamily):
    """Qwen-Image (text to image) and its edit models; `variant` is one of files.VARIANTS."""

    family = "qwen_image"
    drops_cached_text_encoders = True  # Qwen2.5-VL-7B is 16 GB in bf16: freed once every prompt is encoded

    def __init__(self, transformer, vae, text_encoder, tokenizer, image_processor, *, source: str = "",
                 options: QwenImageOptions | None = None):
        self.denoiser = transformer
        self.vae = vae
        self.text_encoders = {"qwen25vl": text_encoder}
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.source = source
        self.options = (options or QwenImageOptions()).check()
        self.objective = QwenFlowObjective(self.options.flow)
        self.compute_dtype: torch.dtype | None = None  # bf16 when the base is stored in fp8
        self._cached_prompts: dict[str, Conditioning] | None = None
        self._block_swap = None

    @property
    def transformer(self):
        return self.denoiser

    @property
    def variant(self) -> str:
        return self.options.variant

    @property
    def is_edit(self) -> bool:
        return self.variant in EDIT_VARIANTS

    # ---- identity and metadata
    @property
    def base_model_version(self) -> str:
        return "qwen_image_edit" if self.is_edit else "qwen_image"

    @property
    def modelspec_architecture(self) -> str:
        return MODELSPEC[self.variant]

    @property
    def resolution(self) -> int:
        return 1024 if self.transformer.config.num_attention_heads * self.transformer.config.attention_head_dim >= 1024 \
            else 16 * self.latent_downscale

    @property
    def latent_downscale(self) -> int:
        return 8  # AutoencoderKLQwenImage: 2 ** len(temperal_downsample)

    @property
    def latent_multiple(self) -> int:
        return 2 * self.latent_downscale

    def block_names(self) -> list[str]:
        return [f"{BLOCK}.{i}" for i in range(len(self.transformer.transformer_blocks))]

    def lora_metadata(self) -> dict[str, str]:
        f = self.objective.options
        return {"ss_base_model_version": self.base_model_version, "ss_v2": "False",
                "ss_qwen_image_variant": self.variant, "ss_timestep_sampling": f.timestep_sampling,
                "ss_sigmoid_scale": str(f.sigmoid_scale), "ss_discrete_flow_shift": str(f.discrete_flow_shift),
                "ss_weighting_scheme": f.weighting_scheme,
                "modelspec.architecture": self.modelspec_architecture,
                "modelspec.implementation": "https://github.com/QwenLM/Qwen-Image",
                "modelspec.resolution": f"{self.resolution}x{self.resolution}"}

    # ---- LoRA
    def lora_targets(self, conv: bool = False) -> list[LoRATarget]:
        """musubi's targets: every Linear of the 60 blocks, kohya names (840 modules), img_mod.1 / txt_mod.1
        included as musubi, ai-toolkit and DiffSynth train them (network_ignore_if_contains = ["_mod_"] leaves them
        out: 600); conv=True: every Linear a peer's file may hold (the embedders and the output layers too)."""
        from .lora import OUTSIDE_BLOCKS

        out = []
        for i, block in enumerate(self.transformer.transformer_blocks):
            for child, lin in block.named_modules():
                if not isinstance(lin, nn.Linear):
                    continue
                out.append(LoRATarget(f"lora_unet_{BLOCK}_{i}_{child}".replace(".", "_"), lin, "unet"))
        if conv:
            for name in OUTSIDE_BLOCKS:
                out.append(LoRATarget(f"lora_unet_{name}".replace(".", "_"), self.transformer.get_submodule(name),
                                      "unet"))
        return out

    def adapt_lora_file(self, lora):
        from .lora import adapt_lora_file

        return adapt_lora_file(self, lora)

    def check_save_format(self, save_format: str, adapter) -> None:
        """kohya and comfyui take every adapter (LyCORIS / DoRA modules keep kohya's names in a comfyui file);
        diffusers reads LoRA and DoRA (peft's magnitude) only."""
        from .lora import check_save_format

        check_save_format(save_format, adapter)

    def export_lora(self, tensors: dict[str, torch.Tensor], save_format: str = "kohya") -> dict[str, torch.Tensor]:
        """kohya (musubi) names by default; "comfyui": `diffusion_model.` + lora_A/B with alpha kept;
        "diffusers": `transformer.` + lora_A/B with alpha baked in."""
        from .lora import export_lora

        return export_lora(self, tensors, save_format)

    # ---- conditioning
    def require(self, *keys: str) -> None:
        """Stop with a line naming the job key of each component this model was loaded without."""
        have = {"text_encoder": self.text_encoders.get("qwen25vl"), "vae": self.vae}
        missing = [k for k in keys if have[k] is None]
        if missing:
            raise UserError(f"this Qwen-Image transformer was loaded without {', '.join('`' + k + '`' for k in missing)}: "
                            "set the text_encoder and vae files (as in musubi-tuner)", path=self.source)

    def check_complete(self) -> None:
        self.require(*(() if self.text_encoders_dropped else ("text_encoder",)), "vae")

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """Qwen2.5-VL's last hidden state after the template's system prefix, per prompt (no image); padded with
        zeros to the longest, `txt_mask` marking the real tokens. Edit models use their own template."""
        if self._cached_prompts is not None:
            missing = [p for p in prompts if p not in self._cached_prompts]
            if missing:
                raise UserError(f"prompt {missing[0][:60]!r} was not encoded before Qwen2.5-VL was freed "
                                "(cache_text_encoder_outputs encodes the dataset's captions, the validation captions "
                                "and the sample prompts once, at the start)")
            return Conditioning.cat([self._cached_prompts[p] for p in prompts]).to(self.device)
        return self._encode([self._template().format(p) for p in prompts], None)

    def _template(self) -> str:
        return EDIT_TEMPLATE if self.is_edit else T2I_TEMPLATE

    # ---- edit (control images: the edit methods, generate --control)
    @property
    def max_control_images(self) -> int:
        """Edit: one control image; Edit-2509/2511: several (the pipelines are tuned for up to 3); Qwen-Image: none."""
        return (3 if self.variant in PLUS_VARIANTS else 1) if self.is_edit else 0

    @property
    def controls_reach_text_encoder(self) -> bool:
        return self.is_edit

    def control_conditioning(self, controls: list[torch.Tensor]) -> Conditioning:
        """The control latents as `control_<i>` tensors; `predict` appends them as reference tokens."""
        if not self.is_edit:
            return super().control_conditioning(controls)
        return Conditioning({f"control_{i}": c for i, c in enumerate(controls)})

    def control_size(self, width: int, height: int) -> tuple[int, int]:
        """The pipelines' reference latents: a 1024² area at the control's aspect, sides multiples of 32."""
        return area_size(EDIT_IMAGE_AREA, width / height)

    def encode_prompts_with_controls(self, prompts: list[str], controls: list[list]) -> Conditioning:
        return self.encode_prompts_with_images(prompts, controls)

    def encode_prompts_with_images(self, prompts: list[str], images: list[list]) -> Conditioning:
        """For the edit models (issue 29's edit method): each prompt with its control images (PIL images) through
        the VL encoder as the pipelines do: Edit sees one image ("<|vision_start|>..."), Edit-2509/2511 see each image
        at a 384² area after "Picture i:". Not cached by prompt: the images are part of the key."""
        if not self.is_edit:
            raise UserError("control images are for the Qwen-Image-Edit models; this model is Qwen-Image "
                            "(set model_variant to edit, edit_2509 or edit_2511 with an edit model)", path=self.source)
        if any(len(im) > self.max_control_images for im in images):
            raise UserError(f"{MODELSPEC[self.variant]} takes at most {self.max_control_images} control image(s) per "
                            "prompt", path=self.source)
        out = []
        for prompt, imgs in zip(prompts, images):
            if self.variant not in PLUS_VARIANTS:  # Edit: the image itself, no "Picture i:"
                sized = [im.resize(area_size(EDIT_IMAGE_AREA, im.width / im.height), resample=3) for im in imgs]
                prefix = EDIT_IMAGE_PROMPT * len(sized)
            else:
                sized = [im.resize(area_size(CONDITION_IMAGE_AREA, im.width / im.height), resample=3) for im in imgs]
                prefix = "".join(PLUS_IMAGE_PROMPT.format(i + 1) for i in range(len(sized)))
            out.append(self._encode([self._template().format(prefix + prompt)], sized or None))
        return Conditioning.cat(out)

    def _encode(self, texts: list[str], images) -> Conditioning:
        self.require("text_encoder")
        te = self.text_encoders["qwen25vl"]
        drop = DROP_INDEX[self.variant]
        tok = self.tokenizer(texts, max_length=TOKENIZER_MAX_LENGTH + drop, padding=True, truncation=True,
                             return_tensors="pt")
        ids, mask, extra = tok.input_ids, tok.attention_mask, {}
        if images:
            ids, mask, extra = self._with_image_tokens(texts[0], images)
        out = te(input_ids=ids.to(te.device), attention_mask=mask.to(te.device), output_hidden_states=True,
                 **{k: v.to(te.device) for k, v in extra.items()})
        hidden = out.hidden_states[-1]
        rows = [h[m.bool()][drop:] for h, m in zip(hidden, mask.to(hidden.device))]
        n = max(r.shape[0] for r in rows)
        emb = torch.stack([torch.cat([r, r.new_zeros(n - r.shape[0], r.shape[1])]) for r in rows])
        txt_mask = torch.stack([torch.arange(n, device=emb.device) < r.shape[0] for r in rows]).long()
        return Conditioning({"txt": emb, "txt_mask": txt_mask})

    def _with_image_tokens(self, text: str, images):
        """What Qwen2VLProcessor does for one prompt: the image patches, and each <|image_pad|> repeated once per
        merged patch of its image."""
        pix = self.image_processor(images=images, return_tensors="pt")
        grid = pix["image_grid_thw"]
        merge = self.image_processor.merge_size ** 2
        parts = text.split("<|image_pad|>")
        expanded = parts[0]
        for i, rest in enumerate(parts[1:]):
            expanded += "<|image_pad|>" * int(grid[i].prod() // merge) + rest
        tok = self.tokenizer([expanded], return_tensors="pt")
        return tok.input_ids, tok.attention_mask, {"pixel_values": pix["pixel_values"], "image_grid_thw": grid}

    def drop_text_encoders(self, cached: dict[str, Conditioning]) -> list[str]:
        """musubi's cached text-encoder outputs: Qwen2.5-VL is freed; `cached` answers every later encode_prompts."""
        self._cached_prompts = {p: c.to("cpu") for p, c in cached.items()}
        self.text_encoders = {"qwen25vl": None}
        self.text_encoders_dropped = True
        log.info("encoded %d prompt(s) once; Qwen2.5-VL freed (cache_text_encoder_outputs)", len(cached))
        return ["qwen25vl"]

    def sample_timesteps(self, n, generator, latent_hw, window):
        """musubi's timestep sampling (shift 2.2 by default, or qwen_shift) as σ·1000, squeezed into the job's
        min/max_timestep window as FLUX's."""
        return squeeze_to_window(self.objective.sample_timesteps(n, generator, latent_hw), window,
                                 self.objective.num_train_timesteps)

    # ---- prediction
    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Velocity for unpacked latents (B, 16, h, w); timesteps are σ·1000."""
        controls = sorted((int(k.split("_")[1]), v) for k, v in cond.tensors.items() if k.startswith("control_"))
        return self.predict_with_references(noisy, timesteps, cond, [v for _, v in controls])

    def predict_with_references(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning,
                                references: list[torch.Tensor]) -> torch.Tensor:
        """The hook of the edit method (issue 29): `references` are clean, normalised latents (B, 16, h_i, w_i) of
        the control images, appended after the target's tokens, each with its own RoPE frame (target 0, i-th control
        i, as `img_shapes` tells diffusers' transformer); an Edit-2511 transformer (zero_cond_t) modulates them with
        t = 0. Returns the velocity of the target tokens only (B, 16, h, w)."""
        b, _, h, w = noisy.shape
        tr = self.transformer
        dtype = self.compute_dtype or tr.dtype
        tokens = [pack_latents(noisy.to(dtype))] + [pack_latents(r.to(noisy.device, dtype)) for r in references]
        shapes = [(1, h // 2, w // 2)] + [(1, r.shape[-2] // 2, r.shape[-1] // 2) for r in references]
        txt = cond.tensors["txt"].to(noisy.device, dtype)
        mask = cond.tensors["txt_mask"].to(noisy.device)
        with torch.autocast(noisy.device.type, dtype=dtype, enabled=self.compute_dtype is not None):
            out = tr(hidden_states=torch.cat(tokens, dim=1), encoder_hidden_states=txt,
                     encoder_hidden_states_mask=None if bool(mask.all()) else mask,
                     timestep=(timesteps.float().to(noisy.device) / self.objective.num_train_timesteps).to(dtype),
                     img_shapes=[shapes] * b, return_dict=False)[0]
        return unpack_latents(out[:, : (h // 2) * (w // 2)], h, w).to(noisy.dtype)

    # ---- VAE
    def _latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.vae.config
        mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1).to(like.device, like.dtype)
        std = torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1).to(like.device, like.dtype)
        return mean, std

    def encode_images(self, pixels, sample=True, generator=None):
        """Pixels (B, 3, H, W) -> (z - latents_mean) / latents_std per channel (the VAE's single frame)."""
        self.require("vae")
        dist = self.vae.encode(pixels.to(self.vae.dtype)[:, :, None]).latent_dist
        z = (dist.sample(generator=generator) if sample else dist.mode())[:, :, 0]
        mean, std = self._latent_stats(z)
        return (z - mean) / std

    def decode_latents(self, latents):
        self.require("vae")
        mean, std = self._latent_stats(latents.to(self.vae.dtype))
        z = latents.to(self.vae.dtype) * std + mean
        return self.vae.decode(z[:, :, None]).sample[:, :, 0]

    # ---- sampling
    def sampling_sigmas(self, steps: int, image_tokens: int) -> torch.Tensor:
        """The pipelines' schedule: sigmas linspace(1, 1/steps) through the published scheduler (exponential
        dynamic shift μ(tokens), terminal 0.02), then 0. One step is σ 1 -> 0 (the pipelines' terminal stretch
        divides 0 by 0 there: their one-step image is NaN)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        from .tiny import SCHEDULER_CONFIG

        if steps == 1:
            return torch.tensor([1.0, 0.0])

        sched = FlowMatchEulerDiscreteScheduler.from_config(SCHEDULER_CONFIG)
        c = sched.config
        mu = c.base_shift + (c.max_shift - c.base_shift) * (image_tokens - c.base_image_seq_len) / (
            c.max_image_seq_len - c.base_image_seq_len)
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
        return sched.sigmas.float()

    @torch.no_grad()
    def sample_latents(self, cond: Conditioning, uncond: Conditioning | None, seeds: list[int], steps: int,
                       width: int, height: int, cfg: float) -> torch.Tensor:
        """Euler flow sampling from per-seed noise, with the pipelines' true
        CFG and its norm rescale when cfg > 1."""
        ds = self.latent_downscale
        h, w = 2 * (height // (2 * ds)), 2 * (width // (2 * ds))
        x = torch.stack([torch.randn(16, h, w, generator=torch.Generator().manual_seed(int(s)))
                         for s in seeds]).to(self.device)  # the pipelines' (1, 1, 16, h, w) draw
        sig = self.sampling_sigmas(steps, (h // 2) * (w // 2))
        for cur, nxt in zip(sig[:-1], sig[1:]):
            t = torch.full((x.shape[0],), float(cur) * self.objective.num_train_timesteps, device=x.device)
            v = self.predict(x, t, cond).float()
            if uncond is not None and cfg > 1:
                v_neg = self.predict(x, t, uncond).float()
                comb = pack_latents(v_neg + cfg * (v - v_neg))
                packed = pack_latents(v)
                comb = comb * (packed.norm(dim=-1, keepdim=True) / comb.norm(dim=-1, keepdim=True))
                v = unpack_latents(comb, h, w)
            x = x + (float(nxt) - float(cur)) * v
        return x

    @torch.no_grad()
    def generate_request(self, networks, req, batch_size: int = 64, output: str = "uint8",
                         progress=None) -> list[np.ndarray]:
        """generate.py's request with the family's sampler: true CFG at req.cfg with the negative prompts (the
        pipelines' true_cfg_scale), per-sample LoRA multipliers on both passes."""
        self.check_complete()
        out = []
        negative = req.negative or [""] * len(req.prompts)
        for start in range(0, len(req.prompts), batch_size):
            sl = slice(start, min(len(req.prompts), start + batch_size))
            for i, net in enumerate(networks):
                values = req.multipliers.get(i)
                if values is not None:
                    m = torch.tensor(values[sl], dtype=torch.float32)
                    net.set_multiplier(float(m[0]) if bool((m == m[0]).all()) else m)
            controls = req.controls[sl] if req.controls else None  # generate --control: with the control images
            cond = self.encode_with_controls(req.prompts[sl], controls)
            uncond = self.encode_with_controls(negative[sl], controls) if req.cfg > 1 else None
            lat = self.sample_latents(cond, uncond, req.seeds[sl], req.steps, req.width or self.resolution,
                                      req.height or self.resolution, req.cfg)
            imgs = ((self.decode_latents(lat).float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()
            if progress is not None:
                progress.update(req.steps)
            out.extend(np.asarray(i, dtype=np.float32) if output == "float"
                       else (np.clip(i, 0, 1) * 255).round().astype(np.uint8) for i in imgs)
        return out

    def pipeline_embeddings(self, cond, uncond):
        raise UserError("Qwen-Image images are made by difflora's own flow-matching sampler, not a diffusers pipeline")

    def pipeline(self, scheduler: str = "euler"):
        raise UserError("Qwen-Image images are made by difflora's own flow-matching Euler sampler (generate uses it)")

    # ---- memory
    def prepare_training(self, job, device) -> None:
        """Gradient checkpointing per block (diffusers' own), and musubi's blocks_to_swap."""
        self.check_complete()
        if job.gradient_checkpointing or job.cpu_offload_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        if job.blocks_to_swap:
            self.enable_block_swap(job.blocks_to_swap, torch.device(device))

    def enable_block_swap(self, n: int, device: torch.device) -> None:
        """musubi's blocks_to_swap: the last n blocks live on the CPU and come to `device` for their own forward
        (models/low_vram.BlockSwap, checkpointed, through diffusers' checkpointing call; sampling without
        gradients moves them by forward hooks)."""
        from ..low_vram import BlockSwap

        blocks = list(self.transformer.transformer_blocks)
        if not 0 < n < len(blocks):
            raise UserError(f"blocks_to_swap = {n} but the transformer has {len(blocks)} blocks; use 1 to "
                            f"{len(blocks) - 1}")
        swap = BlockSwap(blocks[-n:], device, checkpoint_others=self.transformer.gradient_checkpointing)
        self.transformer.gradient_checkpointing = True
        self.transformer._gradient_checkpointing_func = swap.run
        for block in blocks[-n:]:
            block.register_forward_pre_hook(lambda mod, args: None if torch.is_grad_enabled()
                                            else BlockSwap._move(mod, swap.device))
            block.register_forward_hook(lambda mod, args, out: None if torch.is_grad_enabled()
                                        else BlockSwap._move(mod, torch.device("cpu")))
        self._block_swap = swap
        log.info("blocks_to_swap: %d of %d blocks stay on the CPU", n, len(blocks))

    def store_base_fp8(self) -> None:
        """fp8_base: the blocks' Linear weights in float8_e4m3fn, computed in bf16 (musubi's --fp8_base)."""
        from ..low_vram import store_fp8

        for block in self.transformer.transformer_blocks:
            store_fp8(block, torch.bfloat16)
        for p in self.transformer.parameters():
            if p.dtype != torch.float8_e4m3fn:
                p.data = p.data.to(torch.bfloat16)
        self.compute_dtype = torch.bfloat16

    def store_base_nf4(self) -> None:
        """4-bit NF4 frozen blocks (bitsandbytes, CUDA only)."""
        from ..low_vram import store_nf4

        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        for block in self.transformer.transformer_blocks:
            store_nf4(block, device)
        self.compute_dtype = torch.bfloat16

    def to(self, device=None, dtype=None, text_encoders: bool = True) -> "QwenImageModel":
        for m in [self.denoiser, self.vae, *(self.text_encoders.values() if text_encoders else ())]:
            if m is None:
                continue
            if m is self.denoiser:
                if dtype is not None and self.compute_dtype is None:  # fp8 storage stays fp8
                    m.to(dtype=dtype)
                if device is not None and self._block_swap is not None:
                    self._block_swap.place(m, device)  # swapped blocks stay on the CPU
                elif device is not None:
                    m.to(device=device)
                continue
            m.to(device=device, dtype=dtype)
        return self

    @property
    def device(self) -> torch.device:
        return self.transformer.img_in.weight.device

    # ---- saving
    def save(self, path, single_file=None, dtype=None):
        """A diffusers folder, or (path ending .safetensors) ComfyUI's transformer file (an Edit-2511 one with its
        marker)."""
        from pathlib import Path

        from .files import save_folder, save_transformer_file

        path = Path(path)
        if single_file is None:
            single_file = path.suffix.lower() == ".safetensors"
        if single_file:
            save_transformer_file(self, path, dtype)
        else:
            save_folder(self, path, dtype)
