"""Stable Diffusion 1.x / 2.x: loading, prompt encoding, objective, kohya LoRA target map."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import UserError
from ..network.lora import LoRATarget
from .base import Conditioning, ModelFamily
from .objectives import objective_for

log = logging.getLogger(__name__)

# Stable Diffusion 1.x's noise schedule (DDPM scaled-linear), used when a checkpoint carries none.
SD_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
)

UNET_TARGETS = ("Transformer2DModel",)
UNET_CONV_TARGETS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
_TE_ROLE = re.compile(r"(?:text_model\.)?encoder\.layers\.(\d+)\.(self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12])$")

# kohya's --sample_sampler names -> (diffusers scheduler class, extra config)
SCHEDULERS: dict[str, tuple[str, dict]] = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "k_lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "k_euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "k_euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm_2": ("KDPM2DiscreteScheduler", {}),
    "k_dpm_2": ("KDPM2DiscreteScheduler", {}),
    "dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "k_dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "dpmsolver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver"}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmsingle": ("DPMSolverSinglestepScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
}


def make_scheduler(name: str, config: dict):
    import diffusers

    key = name.lower()
    if key not in SCHEDULERS:
        raise UserError(f"unknown sampler {name!r}; choose one of: {', '.join(SCHEDULERS)}")
    cls_name, extra = SCHEDULERS[key]
    cfg = {k: v for k, v in config.items() if not k.startswith("_")}
    return getattr(diffusers, cls_name).from_config({**cfg, **extra})


def unet_lora_targets(unet: nn.Module, conv: bool, prefix: str = "lora_unet") -> list[LoRATarget]:
    """kohya's create_modules over a diffusers-layout U-Net (SD1/SD2 names)."""
    classes = UNET_TARGETS + (UNET_CONV_TARGETS if conv else ())
    out = []
    for name, module in unet.named_modules():
        if type(module).__name__ not in classes:
            continue
        for child_name, child in module.named_modules():
            if isinstance(child, (nn.Linear, nn.Conv2d)) and child_name:
                out.append(LoRATarget(f"{prefix}.{name}.{child_name}".replace(".", "_"), child, "unet"))
    return out


def text_encoder_lora_targets(te: nn.Module, prefix: str = "lora_te", component: str = "text_encoder") -> list[LoRATarget]:
    """q/k/v/out_proj and fc1/fc2 of every CLIP layer, matched by role (not class name).

    The name always carries `text_model_`, as kohya and A1111 expect, also for transformers 5's
    flattened CLIPTextModel whose module paths lost the `text_model.` prefix.
    """
    out = []
    for name, module in te.named_modules():
        m = _TE_ROLE.search(name)
        if m and isinstance(module, nn.Linear):
            full = f"text_model.encoder.layers.{m.group(1)}.{m.group(2)}"
            out.append(LoRATarget(f"{prefix}.{full}".replace(".", "_"), module, component))
    return out


class StableDiffusion(ModelFamily):
    """SD1.x and SD2.x (epsilon or v-prediction)."""

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler_config: dict, *, variant: str,
                 prediction_type: str, source: str = "", clip_skip: int | None = None):
        self.denoiser = unet
        self.vae = vae
        self.text_encoders = {"text_encoder": text_encoder}
        self.tokenizer = tokenizer
        self.scheduler_config = dict(scheduler_config)
        self.scheduler_config["prediction_type"] = prediction_type
        self.family = variant
        self.objective = objective_for(prediction_type, self.scheduler_config)
        self.source = source
        self.clip_skip = clip_skip

    @property
    def unet(self):
        return self.denoiser

    @property
    def text_encoder(self):
        return self.text_encoders["text_encoder"]

    # ---- identity
    @property
    def is_v2(self) -> bool:
        return self.family == "sd2"

    @property
    def v_prediction(self) -> bool:
        return self.objective.prediction_type == "v_prediction"

    @property
    def base_model_version(self) -> str:
        if self.is_v2:
            return "sd_v2_v" if self.v_prediction else "sd_v2"
        return "sd_v1_v" if self.v_prediction else "sd_v1"

    @property
    def modelspec_architecture(self) -> str:
        if self.is_v2:
            return "stable-diffusion-v2-768-v/lora" if self.v_prediction else "stable-diffusion-v2-512/lora"
        return "stable-diffusion-v1/lora"

    @property
    def resolution(self) -> int:
        return int(self.unet.config.sample_size) * self.latent_downscale

    @property
    def latent_downscale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_multiple(self) -> int:
        return self.latent_downscale * 2 ** (len(self.unet.config.block_out_channels) - 1)

    def pipeline_embeddings(self, cond: Conditioning, uncond: Conditioning) -> dict[str, torch.Tensor]:
        return {"prompt_embeds": cond.tensors["encoder_hidden_states"],
                "negative_prompt_embeds": uncond.tensors["encoder_hidden_states"]}

    def lora_metadata(self) -> dict[str, str]:
        return {
            "ss_v2": str(self.is_v2),
            "ss_base_model_version": self.base_model_version,
            "modelspec.architecture": self.modelspec_architecture,
            "modelspec.implementation": "diffusers",
            "modelspec.prediction_type": "v" if self.v_prediction else "epsilon",
            "modelspec.resolution": f"{self.resolution}x{self.resolution}",
        }

    # ---- LoRA
    def lora_targets(self, conv: bool = False) -> list[LoRATarget]:
        return text_encoder_lora_targets(self.text_encoder) + unet_lora_targets(self.unet, conv)

    # ---- conditioning
    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        max_len = self.tokenizer.model_max_length
        if not isinstance(max_len, int) or max_len > 10_000:
            max_len = 77
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=max_len, truncation=True,
                             return_tensors="pt").input_ids
        self._warn_if_truncated(prompts, max_len)
        return ids

    def _warn_if_truncated(self, prompts: list[str], max_len: int) -> None:
        """Log once per prompt that is longer than the text encoder's token limit (the rest is cut)."""
        warned = self.__dict__.setdefault("_warned_long_prompts", set())
        for p in prompts:
            if len(p) + 2 <= max_len or p in warned:  # a token is at least one character, plus BOS/EOS
                continue
            n = len(self.tokenizer(p, truncation=False, verbose=False).input_ids)
            if n > max_len:
                if len(warned) < 10_000:
                    warned.add(p)
                log.warning("caption/prompt is %d tokens, over the text encoder's limit of %d: the end is ignored "
                            "(%r...)", n, max_len, p[:60])

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        te = self.text_encoder
        ids = self.tokenize(prompts).to(te.device)
        if self.clip_skip and self.clip_skip > 1:
            out = te(ids, output_hidden_states=True)
            hidden = out.hidden_states[-self.clip_skip]
            final_ln = getattr(te, "final_layer_norm", None) or te.text_model.final_layer_norm
            hidden = final_ln(hidden)
        else:
            hidden = te(ids).last_hidden_state
        return Conditioning({"encoder_hidden_states": hidden})

    def predict(self, noisy, timesteps, cond):
        hs = cond.tensors["encoder_hidden_states"].to(noisy.dtype)
        return self.unet(noisy, timesteps, encoder_hidden_states=hs).sample

    # ---- VAE
    def encode_images(self, pixels, sample=True, generator=None):
        cfg = self.vae.config
        dist = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist
        z = dist.sample(generator=generator) if sample else dist.mode()
        shift = getattr(cfg, "shift_factor", None) or 0.0
        return (z - shift) * cfg.scaling_factor

    def decode_latents(self, latents):
        cfg = self.vae.config
        shift = getattr(cfg, "shift_factor", None) or 0.0
        return self.vae.decode(latents.to(self.vae.dtype) / cfg.scaling_factor + shift).sample

    # ---- generation / saving
    def pipeline(self, scheduler: str = "ddim"):
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline(
            vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=self.unet,
            scheduler=make_scheduler(scheduler, self.scheduler_config), safety_checker=None,
            feature_extractor=None, image_encoder=None, requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def save(self, path, single_file=None, dtype=None):
        from .ldm import save_sd_single_file

        path = Path(path)
        if single_file is None:
            single_file = path.suffix.lower() == ".safetensors"
        if single_file:
            save_sd_single_file(self, path, dtype=dtype)
            return
        import shutil

        from diffusers import DDIMScheduler

        from ..fileio import make_temp_dir

        pipe = self.pipeline("ddim")
        pipe.scheduler = DDIMScheduler.from_config(self.scheduler_config)
        tmp = make_temp_dir(path)
        try:
            if dtype is not None:
                pipe.to(dtype=dtype)
            pipe.save_pretrained(tmp, safe_serialization=True)
            if dtype is not None:
                pipe.to(dtype=torch.float32)
            if path.exists():
                raise UserError("output folder already exists; choose another path", path=path)
            os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


# ------------------------------------------------------------------ loading
COMPONENT_FILES = {
    "unet": "diffusion_pytorch_model.safetensors",
    "vae": "diffusion_pytorch_model.safetensors",
    "text_encoder": "model.safetensors",
}


def detect_variant(unet_config: dict, te_config: dict) -> str:
    """SD2 uses an OpenCLIP text encoder (gelu) and linear projections; SD1 CLIP-L (quick_gelu)."""
    if te_config.get("hidden_act") == "gelu" or unet_config.get("cross_attention_dim") == 1024:
        return "sd2"
    return "sd1"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise UserError(f"unreadable config ({e})", path=path) from None


def load_diffusers_folder(path: Path, *, dtype=torch.float32, allow_pickle=False, variant=None,
                          prediction_type=None, clip_skip=None) -> StableDiffusion:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    index = path / "model_index.json"
    if not index.exists():
        raise UserError("not a diffusers model folder (model_index.json is missing)", path=path)
    info = _read_json(index)
    if "text_encoder_2" in info or "StableDiffusionXL" in str(info.get("_class_name", "")):
        raise UserError("this is an SDXL model; SDXL support is not built yet (SD1.x and SD2.x are)", path=path)
    for comp in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        if not (path / comp).is_dir():
            raise UserError(f"model folder is missing its {comp}/ component", path=path)
    for comp in ("unet", "vae", "text_encoder"):
        cfg = path / comp / "config.json"
        if not cfg.exists():
            raise UserError(f"model folder is missing {comp}/config.json", path=path)
        has_st = any(p.suffix == ".safetensors" for p in (path / comp).iterdir())
        has_bin = any(p.suffix in (".bin", ".pt", ".ckpt") for p in (path / comp).iterdir())
        if not has_st and not has_bin:
            raise UserError(f"model folder has no weights in {comp}/ (expected {COMPONENT_FILES[comp]})", path=path)
        if not has_st and not allow_pickle:
            raise UserError(f"{comp}/ holds only pickle weights (.bin)", path=path,
                            hint="convert to safetensors or pass --allow-pickle if you trust them")
    sched_cfg_path = path / "scheduler" / "scheduler_config.json"
    if not sched_cfg_path.exists():
        raise UserError("model folder is missing scheduler/scheduler_config.json", path=path)
    sched_cfg = _read_json(sched_cfg_path)
    st = not allow_pickle
    try:
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", local_files_only=True,
                                                    use_safetensors=st or None, torch_dtype=dtype)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", local_files_only=True,
                                            use_safetensors=st or None, torch_dtype=dtype)
        te = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", local_files_only=True,
                                           use_safetensors=st or None, dtype=dtype)
        tok = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"could not load the model folder ({type(e).__name__}: {str(e).splitlines()[0]})", path=path) from None
    if not isinstance(tok.model_max_length, int) or tok.model_max_length > 10_000:
        tok.model_max_length = te.config.max_position_embeddings
    variant = variant or detect_variant(dict(unet.config), te.config.to_dict())
    prediction_type = prediction_type or sched_cfg.get("prediction_type", "epsilon")
    model = StableDiffusion(unet, vae, te, tok, sched_cfg, variant=variant, prediction_type=prediction_type,
                            source=str(path), clip_skip=clip_skip)
    model.freeze()
    return model


def load_stable_diffusion(path: str | os.PathLike, *, dtype=torch.float32, allow_pickle=False, variant=None,
                          prediction_type=None, clip_skip=None) -> StableDiffusion:
    """Load SD1/SD2 from a diffusers folder or an original-layout single file, offline."""
    path = Path(path)
    if not path.exists():
        raise UserError("model not found", path=path)
    if path.is_dir():
        return load_diffusers_folder(path, dtype=dtype, allow_pickle=allow_pickle, variant=variant,
                                     prediction_type=prediction_type, clip_skip=clip_skip)
    from .ldm import load_sd_single_file

    return load_sd_single_file(path, dtype=dtype, allow_pickle=allow_pickle, variant=variant,
                               prediction_type=prediction_type, clip_skip=clip_skip)
