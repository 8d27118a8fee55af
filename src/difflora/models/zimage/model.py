"""Z-Image (Turbo and Base): prompt encoding, the family's time convention, LoRA names, sampling, low VRAM.

Edit (the flow world's model, issue 25; the Omni pipeline's layout without SigLIP): control images are clean
reference latents called with the target as one nested list, x = [[ref_1, ..., ref_N, target]] with
image_noise_mask [[0]*N + [1]] (the references get a clean image's timestep embedding and their own RoPE
frames after their caption segment), the instruction split into the Omni pipeline's N + 2 caption segments
around the images (each encoded on its own), and the output is the target's alone.

Time: difflora's timesteps are t = σ·1000 (σ = 1 is pure noise) for every flow model, so the methods'
windows mean the same thing on FLUX and Z-Image. The Z-Image transformer takes the opposite clock,
(1000 − t)/1000 = 1 − σ (1 = clean), and predicts x0 − ε (musubi: "opposite of usual flow matching";
the diffusers pipeline negates it). `predict` does both, so it returns the velocity ε − x0 of every other
flow family and the raw output is trained towards x0 − ε.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ...errors import UserError
from ...network.lora import LoRATarget
from ..base import Conditioning, ModelFamily
from ..flow_matching import FlowMatchOptions, FluxFlowObjective, shift_sigma, squeeze_to_window
from . import lora as names
from .transformer import blocks, in_blocks

log = logging.getLogger(__name__)

# Qwen3's chat template as the pipeline applies it (add_generation_prompt, enable_thinking=True); ComfyUI
# writes the same literal, so a tokenizer without a chat template encodes the same ids.
PROMPT_TEMPLATE = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
MAX_SEQUENCE_LENGTH = 512
# musubi's Z-Image training defaults (zimage docs: shift sampling, flow shift 2.0, no weighting)
TRAIN_FLOW = FlowMatchOptions(timestep_sampling="shift", sigmoid_scale=1.0, discrete_flow_shift=2.0,
                              model_prediction_type="raw")
SAMPLING_SHIFT = 3.0  # the scheduler's static shift (diffusers, ComfyUI, musubi)
# sampling defaults per variant: (steps, guidance); Turbo is distilled to 8 steps without CFG
VARIANT_SAMPLING = {"turbo": (8, 0.0), "base": (28, 4.0)}
TRAIN_TARGETS = ("attention.qkv", "attention.to_out.0", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
# ZImageOmniPipeline's caption segments for N reference images: FIRST, BETWEEN × (N − 1), the instruction's
# segment, LAST; the images sit between consecutive segments, the target after the instruction's
OMNI_FIRST, OMNI_BETWEEN, OMNI_LAST = ("<|im_start|>user\n<|vision_start|>", "<|vision_end|><|vision_start|>",
                                       "<|vision_end|><|im_end|>")
OMNI_PROMPT = "<|vision_end|>{}<|im_end|>\n<|im_start|>assistant\n<|vision_start|>"


class ZImageModel(ModelFamily):
    family = "zimage"
    default_sampler = "euler"  # the pipeline's flow-matching Euler, the only sampler here

    def __init__(self, transformer, vae, text_encoder, tokenizer, *, variant: str | None, source: str = "",
                 flow: FlowMatchOptions | None = None, sampling_shift: float = SAMPLING_SHIFT,
                 edit: bool = False):
        self.denoiser = transformer
        self.edit = edit  # takes control images in the Omni layout (the flow world's model)
        self._omni_constants: dict[str, torch.Tensor] | None = None
        self.vae = vae
        self.text_encoders = {"text_encoder": text_encoder}
        self.tokenizer = tokenizer
        self.variant = variant
        self.source = source
        self.sampling_shift = sampling_shift
        self.objective = FluxFlowObjective(flow or TRAIN_FLOW)
        self.compute_dtype: torch.dtype | None = None  # bf16 when the base is stored in fp8
        self.block_swap = None
        self._cached_prompts: dict[str, Conditioning] | None = None
        self._names = names.NameTable([n for n, m in transformer.named_modules() if isinstance(m, nn.Linear)])

    @property
    def transformer(self):
        return self.denoiser

    # ---- identity and metadata
    @property
    def base_model_version(self) -> str:
        return "zimage"  # TrainTrain's and musubi's value

    @property
    def modelspec_architecture(self) -> str:
        return "Z-Image/lora"

    @property
    def resolution(self) -> int:
        return 1024 if self.transformer.config.dim == 3840 else 16 * self.latent_downscale

    @property
    def latent_downscale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 8

    @property
    def latent_multiple(self) -> int:
        return 2 * self.latent_downscale  # 2x2 latent patches

    def lora_metadata(self) -> dict[str, str]:
        f = self.objective.options
        return {"ss_base_model_version": self.base_model_version, "ss_v2": "False",
                "ss_zimage_variant": str(self.variant), "ss_timestep_sampling": f.timestep_sampling,
                "ss_discrete_flow_shift": str(f.discrete_flow_shift), "ss_sigmoid_scale": str(f.sigmoid_scale),
                "ss_model_prediction_type": f.model_prediction_type,
                "modelspec.architecture": self.modelspec_architecture,
                "modelspec.implementation": "https://github.com/Tongyi-MAI/Z-Image",
                "modelspec.resolution": f"{self.resolution}x{self.resolution}"}

    def block_names(self) -> list[str]:
        return [f"{name}.{i}" for name in ("noise_refiner", "context_refiner", "layers")
                for i in range(len(getattr(self.transformer, name)))]

    # ---- LoRA
    def lora_targets(self, conv: bool = False) -> list[LoRATarget]:
        """musubi's default set (the 30 layers' attention and feed-forward; refiners and modulation left out)
        with native fused names; conv=True: every Linear of the 34 blocks (refiners and modulation too: what a
        peer's file may hold; transformer.in_blocks says why nothing outside them)."""
        out = []
        for path, module in self.transformer.named_modules():
            if not isinstance(module, nn.Linear) or not in_blocks(path):
                continue
            if conv or (path.startswith("layers.") and path.split(".", 2)[2] in TRAIN_TARGETS):
                out.append(LoRATarget(names.kohya_name(path), module, "unet"))
        return out

    def adapt_lora_file(self, lora):
        """Check a LoRA is for Z-Image and bring any peer's spelling (split q/k/v fused) to this model's names."""
        from ...network.files import LoraFile

        version = lora.metadata.get("ss_base_model_version", "")
        if version and version != self.base_model_version:
            raise UserError(f"LoRA was trained for {version} (ss_base_model_version), not Z-Image", path=lora.path)
        if not names.looks_like_zimage(list(lora.modules)):
            raise UserError(f"not a Z-Image LoRA (modules such as {lora.module_names()[0]})", path=lora.path)
        tensors, fused = names.to_model_names(lora.tensors, self._names, lora.path)
        if fused:
            log.info("%s: %d split q/k/v LoRA(s) fused into Z-Image's qkv projections", lora.path, fused)
        return LoraFile(tensors, lora.metadata, lora.path, lora.source_format)

    def check_save_format(self, save_format: str, adapter) -> None:
        """Before training: export one fused qkv module and one feed-forward module of the job's adapter (what the
        layout refuses, it refuses for the whole run); a "musubi" file warns once that ComfyUI loses its attention, DoRA
        for diffusers that its magnitude is peft's (per output row)."""
        from ...network.lora import LoRANetwork, NetworkSpec

        sample = [t for t in self.lora_targets() if t.name.endswith(("_attention_qkv", "_feed_forward_w1"))][:2]
        self.export_lora(LoRANetwork.create(sample, NetworkSpec(network_dim=1, adapter=adapter)).state_dict(),
                         save_format)
        if save_format == "diffusers":
            from ...network.files import warn_dora_for_diffusers

            warn_dora_for_diffusers(adapter)
        if save_format == "musubi" and adapter.decompose_both:
            raise UserError('save_format = "musubi" with network_decompose_both: musubi-tuner reads LoKr\'s w1 whole '
                            'only (its loader would skip every module); save_format = "kohya" keeps it')
        if save_format == "musubi":
            log.warning('save_format = "musubi": musubi-tuner applies every module, but ComfyUI only the 90 '
                        "feed-forward ones (it has no lora_unet_ name for split q/k/v); the default kohya format "
                        "loads whole in ComfyUI and diffusers")

    def export_lora(self, tensors, save_format: str = "kohya"):
        return names.export(tensors, self._names, save_format)

    @property
    def default_cfg(self) -> float:
        """Base: the pipeline's guidance 4 (pos + 4·(pos − neg)); Turbo runs without CFG."""
        return VARIANT_SAMPLING.get(self.variant, (0, 0.0))[1]

    def sample_timesteps(self, n, generator, latent_hw, window):
        """musubi's timestep sampling (flow_matching.py, shift 2.0 by default) as σ·1000, squeezed into the
        job's min/max_timestep window."""
        return squeeze_to_window(self.objective.sample_timesteps(n, generator, latent_hw), window,
                                 self.objective.num_train_timesteps)

    # ---- conditioning
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """Qwen3's second-to-last hidden state of the chat-wrapped prompt, padded to 512 tokens with its mask
        (the transformer sees the masked tokens only, as in the pipeline)."""
        if self._cached_prompts is not None:
            missing = [p for p in prompts if p not in self._cached_prompts]
            if missing:
                raise UserError(f"prompt {missing[0][:60]!r} was not encoded before the Qwen3 text encoder was freed "
                                "(cache_text_encoder_outputs encodes the captions, validation captions and sample "
                                "prompts once, at the start)")
            return Conditioning.cat([self._cached_prompts[p] for p in prompts]).to(self.device)
        self.require("text_encoder")
        te = self.text_encoders["text_encoder"]
        tok = self.tokenizer([PROMPT_TEMPLATE.format(p) for p in prompts], padding="max_length",
                             max_length=MAX_SEQUENCE_LENGTH, truncation=True, return_tensors="pt")
        mask = tok.attention_mask.to(te.device).bool()
        hidden = te(input_ids=tok.input_ids.to(te.device), attention_mask=mask, output_hidden_states=True).hidden_states[-2]
        # zeros where the mask is off: the transformer never sees those rows, and a prompt's stored encoding is
        # then exactly what reaches the transformer, padded
        out = {"cap": hidden * mask[..., None], "cap_mask": mask}
        if self.edit:  # the prompt's Omni segment too, for a call with control images (cached with the prompt)
            cap, mask = self._encode_texts([OMNI_PROMPT.format(p) for p in prompts])
            out |= {"edit_cap": cap, "edit_cap_mask": mask}
        return Conditioning(out)

    def _encode_texts(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Qwen3's second-to-last hidden state of literal texts (no chat template), padded to 512, and the mask."""
        te = self.text_encoders["text_encoder"]
        tok = self.tokenizer(texts, padding="max_length", max_length=MAX_SEQUENCE_LENGTH, truncation=True,
                             return_tensors="pt")
        mask = tok.attention_mask.to(te.device).bool()
        out = te(input_ids=tok.input_ids.to(te.device), attention_mask=mask, output_hidden_states=True)
        return out.hidden_states[-2] * mask[..., None], mask

    def omni_constants(self) -> dict[str, torch.Tensor]:
        """The prompt-independent Omni caption segments' encodings (encoded once; kept when the encoder is freed)."""
        if self._omni_constants is None:
            self.require("text_encoder")
            with torch.no_grad():
                cap, mask = self._encode_texts([OMNI_FIRST, OMNI_BETWEEN, OMNI_LAST])
            self._omni_constants = {k: c[m].cpu() for k, c, m in zip(("first", "between", "last"), cap, mask)}
        return self._omni_constants

    # ---- edit (the flow world's model: control images as Omni reference latents)
    @property
    def max_control_images(self) -> int:
        """The flow world's model learned edits from one reference image; a Z-Image Turbo or Base takes none."""
        return 1 if self.edit else 0

    def control_conditioning(self, controls: list[torch.Tensor]) -> Conditioning:
        """The control latents as `control_<i>` tensors; `predict` puts them before the target in the Omni call."""
        if not self.edit:
            return super().control_conditioning(controls)
        return Conditioning({f"control_{i}": c for i, c in enumerate(controls)})

    def control_size(self, width: int, height: int) -> tuple[int, int]:
        """The Omni pipeline's condition images: at most 1024² pixels, sides floored to the latent multiple."""
        if width * height > 1024 * 1024:
            scale = (1024 * 1024 / (width * height)) ** 0.5
            width, height = int(width * scale), int(height * scale)
        m = self.latent_multiple
        return width // m * m, height // m * m

    drops_cached_text_encoders = True

    def drop_text_encoders(self, cached: dict[str, Conditioning]) -> list[str]:
        """cache_text_encoder_outputs: Qwen3-4B (8 GB in bf16) is freed; `cached` answers every later prompt."""
        self._cached_prompts = {p: c.to("cpu") for p, c in cached.items()}
        if self.edit:
            self.omni_constants()
        self.text_encoders = {"text_encoder": None}
        self.text_encoders_dropped = True
        log.info("encoded %d prompt(s) once; the Qwen3 text encoder freed (cache_text_encoder_outputs)", len(cached))
        return ["text_encoder"]

    def require(self, *keys: str) -> None:
        have = {"text_encoder": self.text_encoders.get("text_encoder"), "vae": self.vae}
        missing = [k for k in keys if have[k] is None]
        if missing:
            raise UserError(f"this Z-Image transformer was loaded without {', '.join('`' + k + '`' for k in missing)}:"
                            " set the text_encoder and vae files (and qwen3_tokenizer)", path=self.source)

    def check_complete(self) -> None:
        """Training and generation need the variant (its sampling) and every component."""
        if self.variant not in VARIANT_SAMPLING:
            raise UserError("Z-Image Turbo and Base have the same weights and names, so the variant cannot be read "
                            "from the files: set zimage_variant = \"turbo\" or \"base\" (--zimage-variant for "
                            "generate)", path=self.source)
        self.require(*(() if self.text_encoders_dropped else ("text_encoder",)), "vae")

    def predict(self, noisy, timesteps, cond):
        """ε − x0 for latents (B, C, h, w) at difflora's t = σ·1000: the transformer runs at 1 − σ and its
        output (x0 − ε) is negated."""
        dtype = self.compute_dtype or self.transformer.dtype
        n = self.objective.num_train_timesteps
        model_t = (n - timesteps.float().to(noisy.device)) / n
        x = list(noisy.to(dtype).unsqueeze(2).unbind(0))  # (C, 1, h, w) each: one frame
        controls = [cond.tensors[k] for k in sorted((k for k in cond.tensors if k.startswith("control_")),
                                                    key=lambda k: int(k.split("_")[1]))]
        kwargs = {}
        if controls:  # the Omni call: each sample's references, then its target; captions around them
            const = {k: v.to(noisy.device, dtype) for k, v in self.omni_constants().items()}
            cap, mask = cond.tensors["edit_cap"], cond.tensors["edit_cap_mask"].bool()
            caps = [[const["first"], *[const["between"]] * (len(controls) - 1), c[m].to(dtype), const["last"]]
                    for c, m in zip(cap, mask)]
            x = [[c[i].to(noisy.device, dtype).unsqueeze(1) for c in controls] + [xi] for i, xi in enumerate(x)]
            kwargs = {"siglip_feats": [None] * len(x), "image_noise_mask": [[0] * len(controls) + [1]] * len(x)}
        else:
            cap, mask = cond.tensors["cap"], cond.tensors["cap_mask"].bool()
            caps = [c[m].to(dtype) for c, m in zip(cap, mask)]
        with torch.autocast(noisy.device.type, dtype=dtype, enabled=self.compute_dtype is not None):
            out = self.transformer(x, model_t, caps, return_dict=False, **kwargs)[0]
        return -torch.stack(out).squeeze(2).to(noisy.dtype)

    # ---- VAE (FLUX.1's autoencoder: z = (x − shift)·scale)
    def encode_images(self, pixels, sample=True, generator=None):
        self.require("vae")
        cfg = self.vae.config
        dist = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist
        z = dist.sample(generator=generator) if sample else dist.mode()
        return (z - cfg.shift_factor) * cfg.scaling_factor

    def decode_latents(self, latents):
        self.require("vae")
        cfg = self.vae.config
        return self.vae.decode(latents.to(self.vae.dtype) / cfg.scaling_factor + cfg.shift_factor).sample

    # ---- sampling
    def sampling_sigmas(self, steps: int) -> torch.Tensor:
        """The pipeline's schedule: linspace(1, 1/steps, steps) through the static shift, then 0."""
        s = torch.linspace(1.0, 1.0 / steps, steps)  # float32, as the scheduler computes it
        return torch.cat([shift_sigma(s, self.sampling_shift), torch.zeros(1)])

    @torch.no_grad()
    def sample_latents(self, cond: Conditioning, uncond: Conditioning | None, seeds: list[int], steps: int,
                       width: int, height: int, guidance: float) -> torch.Tensor:
        """Euler steps from per-seed noise; guidance > 0 (Base): pos + g·(pos − neg), the pipeline's CFG."""
        ds = 2 * self.latent_downscale
        h, w = 2 * (height // ds), 2 * (width // ds)
        c = self.transformer.config.in_channels
        x = torch.stack([torch.randn(c, h, w, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
        x = x.to(self.device)
        sig = self.sampling_sigmas(steps)
        for cur, nxt in zip(sig[:-1], sig[1:]):
            t = (cur * self.objective.num_train_timesteps).expand(x.shape[0]).to(x.device)
            v = self.predict(x, t, cond).float()
            if guidance > 0 and uncond is not None:
                v = v + guidance * (v - self.predict(x, t, uncond).float())
            x = x + (nxt - cur).to(x.device) * v
        return x

    @torch.no_grad()
    def text_to_image(self, prompts: list[str], seeds: list[int], steps: int | None = None, width: int | None = None,
                      height: int | None = None, guidance: float | None = None,
                      negative: list[str] | None = None, controls: list[list] | None = None) -> np.ndarray:
        """Images (B, H, W, 3) in [0, 1]; steps and guidance default to the variant's (Turbo: 8, none).
        controls: each prompt's control images (PIL at control_size), in both CFG passes as the Omni pipeline does."""
        default_steps, default_guidance = VARIANT_SAMPLING[self.variant]
        guidance = default_guidance if guidance is None else guidance
        cond = self.encode_with_controls(prompts, controls)
        uncond = self.encode_with_controls(negative or [""] * len(prompts), controls) if guidance > 0 else None
        lat = self.sample_latents(cond, uncond, seeds, steps or default_steps, width or self.resolution,
                                  height or self.resolution, guidance)
        img = self.decode_latents(lat).float().clamp(-1, 1)
        return ((img + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()

    @torch.no_grad()
    def generate_request(self, networks, req, batch_size: int = 64, output: str = "uint8",
                         progress=None) -> list[np.ndarray]:
        """generate.py's request with Z-Image's own sampler: Turbo without CFG, Base with req.cfg as the
        pipeline's guidance_scale (pos + cfg·(pos − neg)); per-sample LoRA multipliers apply to both passes."""
        self.check_complete()
        if req.sampler not in (None, "euler"):
            raise UserError(f"sampler {req.sampler!r}: Z-Image samples with the pipeline's flow-matching Euler "
                            "(euler) only")
        guidance = 0.0 if self.variant == "turbo" else float(req.cfg)
        out = []
        for start in range(0, len(req.prompts), batch_size):
            sl = slice(start, min(len(req.prompts), start + batch_size))
            for i, net in enumerate(networks):
                values = req.multipliers.get(i)
                if values is not None:
                    m = torch.tensor(values[sl], dtype=torch.float32)
                    net.set_multiplier(float(m[0]) if bool((m == m[0]).all()) else m)
            negative = (req.negative or [""] * len(req.prompts))[sl]
            imgs = self.text_to_image(req.prompts[sl], req.seeds[sl], req.steps, req.width, req.height, guidance,
                                      negative, req.controls[sl] if req.controls else None)
            if progress is not None:
                progress.update(req.steps)
            out.extend(np.asarray(i, dtype=np.float32) if output == "float"
                       else (np.clip(i, 0, 1) * 255).round().astype(np.uint8) for i in imgs)
        return out

    def pipeline_embeddings(self, cond, uncond):
        raise UserError("Z-Image images are made by difflora's own flow-matching sampler, not a diffusers pipeline")

    def pipeline(self, scheduler: str = "euler"):
        raise UserError("Z-Image images are made by difflora's own flow-matching Euler sampler (generate uses it)")

    # ---- low VRAM
    def prepare_training(self, job, device) -> None:
        self.check_complete()
        if job.gradient_checkpointing or job.cpu_offload_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        if job.blocks_to_swap:
            self.enable_block_swap(job.blocks_to_swap, torch.device(device))

    def enable_block_swap(self, n: int, device: torch.device) -> None:
        """musubi's blocks_to_swap: the last n of the 30 layers live on the CPU and come to the device for their
        own forward (and, checkpointed, for their recomputation)."""
        from ..low_vram import BlockSwap

        layers = list(self.transformer.layers)
        if n >= len(layers) - 1:
            raise UserError(f"blocks_to_swap = {n} but Z-Image has {len(layers)} layers; use at most {len(layers) - 2}")
        swap = BlockSwap(layers[-n:], device, checkpoint_others=self.transformer.gradient_checkpointing)
        for block in layers[-n:]:  # calls outside checkpointing (sampling under no_grad) move it too
            block.register_forward_pre_hook(lambda mod, args: swap._move(mod, swap.device))
            block.register_forward_hook(lambda mod, args, out: swap._move(mod, torch.device("cpu")))
        self.transformer.gradient_checkpointing = True  # diffusers then runs every block through swap.run
        self.transformer._gradient_checkpointing_func = swap.run
        self.block_swap = swap
        log.info("blocks_to_swap: %d of %d layers stay on the CPU", n, len(layers))

    def store_base_fp8(self) -> None:
        """fp8_base: the blocks' attention and feed-forward weights in float8_e4m3fn (musubi's fp8 targets,
        modulation and norms excluded), everything computed in bf16."""
        from ..low_vram import store_fp8

        for block in blocks(self.transformer):
            store_fp8(block.attention, torch.bfloat16)
            store_fp8(block.feed_forward, torch.bfloat16)
        for p in self.transformer.parameters():
            if p.dtype != torch.float8_e4m3fn:
                p.data = p.data.to(torch.bfloat16)
        self.compute_dtype = torch.bfloat16

    def store_base_nf4(self) -> None:
        from ..low_vram import store_nf4

        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        for block in blocks(self.transformer):
            store_nf4(block, device)
        self.compute_dtype = torch.bfloat16

    def to(self, device=None, dtype=None, text_encoders: bool = True) -> "ZImageModel":
        for m in [self.vae, *(self.text_encoders.values() if text_encoders else ())]:
            if m is not None:
                m.to(device=device, dtype=dtype)
        if dtype is not None and self.compute_dtype is None:  # fp8 storage stays fp8
            self.transformer.to(dtype=dtype)
        if device is not None and self.block_swap is not None:
            self.block_swap.place(self.transformer, device)
        elif device is not None:
            self.transformer.to(device=device)
        return self

    @property
    def device(self) -> torch.device:
        return self.transformer.x_pad_token.device

    # ---- saving
    def save(self, path, single_file=None, dtype=None):
        """A diffusers folder, or (path ending .safetensors) the native single-file transformer (ComfyUI's)."""
        from .files import save_diffusers_folder, save_native_transformer

        path = Path(path)
        if single_file is None:
            single_file = path.suffix.lower() == ".safetensors"
        if single_file:
            save_native_transformer(self, path, dtype=dtype)
        else:
            save_diffusers_folder(self, path, dtype=dtype)
