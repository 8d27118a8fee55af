"""Stable Diffusion 1.x / 2.x: loading, prompt encoding, objective, kohya LoRA target map."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch
import torch.nn as nn

from ...errors import UserError, is_internal_failure
from ...network.lora import LoRATarget
from ..base import Conditioning
from ..folders import read_json_config
from ..objectives import objective_for
from ..samplers import make_scheduler
from ..unet_family import UNetFamily, unet_lora_modules

log = logging.getLogger(__name__)

TOY_BASE_MODEL_VERSION = "difflora_toy_v1"  # ss_base_model_version of LoRAs for the toy world's models
TOY_MODELSPEC_ARCHITECTURE = "difflora-toy/lora"
TOY_MARKER = "_difflora_family"  # model_index.json key ("toy"); single files: metadata "difflora.family"

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

_TE_ROLE = re.compile(r"(?:text_model\.)?encoder\.layers\.(\d+)\.(self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12])$")

def unet_lora_targets(unet: nn.Module, conv: bool, prefix: str = "lora_unet") -> list[LoRATarget]:
    """kohya's create_modules over a diffusers-layout U-Net (SD1/SD2 names)."""
    return [LoRATarget(f"{prefix}.{path}".replace(".", "_"), layer, "unet") for path, layer in unet_lora_modules(unet, conv)]


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


class StableDiffusion(UNetFamily):
    """SD1.x and SD2.x (epsilon or v-prediction)."""

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler_config: dict, *, variant: str,
                 prediction_type: str, source: str = "", clip_skip: int | None = None, toy: bool = False):
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
        # difflora's toy world: SD1 classes and maths, but a layout no real SD1.5 LoRA fits
        self.toy = toy

    @property
    def text_encoder(self):
        return self.text_encoders["text_encoder"]

    # ---- identity
    @property
    def is_v2(self) -> bool:
        return self.family == "sd2"

    @property
    def base_model_version(self) -> str:
        if self.toy:
            return TOY_BASE_MODEL_VERSION
        if self.is_v2:
            return "sd_v2_v" if self.v_prediction else "sd_v2"
        return "sd_v1_v" if self.v_prediction else "sd_v1"

    @property
    def modelspec_architecture(self) -> str:
        if self.toy:
            return TOY_MODELSPEC_ARCHITECTURE
        if self.is_v2:
            return "stable-diffusion-v2-768-v/lora" if self.v_prediction else "stable-diffusion-v2-512/lora"
        return "stable-diffusion-v1/lora"

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
        from ..folders import save_model
        from ..ldm import save_sd_single_file

        save_model(self, path, single_file, dtype, save_sd_single_file, "DDIMScheduler")
        if self.toy and Path(path).is_dir():
            mark_toy_folder(path)


# ------------------------------------------------------------------ loading
def mark_toy_folder(path: Path) -> None:
    """Record in model_index.json that a diffusers folder holds a toy-world model (diffusers ignores "_" keys)."""
    from ...fileio import write_json_atomic

    index = Path(path) / "model_index.json"
    write_json_atomic(index, {**read_json_config(index), TOY_MARKER: "toy"})


def check_folder_components(path: Path, weighted: tuple[str, ...], others: tuple[str, ...], allow_pickle: bool) -> None:
    """Every component folder is there; weighted ones have a config and (safetensors, or allowed pickle) weights."""
    for comp in weighted + others:
        if not (path / comp).is_dir():
            raise UserError(f"model folder is missing its {comp}/ component", path=path)
    for comp in weighted:
        cfg = path / comp / "config.json"
        if not cfg.exists():
            raise UserError(f"model folder is missing {comp}/config.json", path=path)
        has_st = any(p.suffix == ".safetensors" for p in (path / comp).iterdir())
        has_bin = any(p.suffix in (".bin", ".pt", ".ckpt") for p in (path / comp).iterdir())
        if not has_st and not has_bin:
            expected = "model.safetensors" if comp.startswith("text_encoder") else "diffusion_pytorch_model.safetensors"
            raise UserError(f"model folder has no weights in {comp}/ (expected {expected})", path=path)
        if not has_st and not allow_pickle:
            raise UserError(f"{comp}/ holds only pickle weights (.bin)", path=path,
                            hint="convert to safetensors or pass --allow-pickle if you trust them")


def detect_variant(unet_config: dict, te_config: dict) -> str:
    """SD2 uses an OpenCLIP text encoder (gelu) and linear projections; SD1 CLIP-L (quick_gelu)."""
    if te_config.get("hidden_act") == "gelu" or unet_config.get("cross_attention_dim") == 1024:
        return "sd2"
    return "sd1"


# ------------------------------------------------------------------ registry hooks (models/sd/__init__.py)
def detect_folder(path: Path, index: dict) -> str | None:
    """"sd1"/"sd2" for a diffusers folder with one CLIP text encoder and a U-Net, else None."""
    if "text_encoder_2" in index or "XL" in str(index.get("_class_name", "")):
        return None
    if not ("unet" in index and "text_encoder" in index) and not (path / "unet").is_dir():
        return None
    unet_cfg, te_cfg = path / "unet" / "config.json", path / "text_encoder" / "config.json"
    if unet_cfg.exists() and te_cfg.exists():
        return detect_variant(read_json_config(unet_cfg), read_json_config(te_cfg))
    return "sd1"  # the loader names the missing part



def load(path: Path, *, family: str, dtype=torch.float32, allow_pickle=False, prediction_type=None, clip_skip=None,
         checkpoint=None, zero_terminal_snr: bool | None = None) -> StableDiffusion:
    """Load SD1/SD2 from a diffusers folder or an original-layout single file, offline."""
    if path.is_dir():
        model = load_diffusers_folder(path, dtype=dtype, allow_pickle=allow_pickle, variant=family,
                                      prediction_type=prediction_type, clip_skip=clip_skip)
    else:
        from ..ldm import load_sd_single_file

        model = load_sd_single_file(path, dtype=dtype, allow_pickle=allow_pickle, variant=family,
                                    prediction_type=prediction_type, clip_skip=clip_skip, checkpoint=checkpoint)
    if zero_terminal_snr:
        model.scheduler_config["rescale_betas_zero_snr"] = True
        model.objective = objective_for(model.objective.prediction_type, model.scheduler_config)
    return model


def load_diffusers_folder(path: Path, *, dtype=torch.float32, allow_pickle=False, variant=None,
                          prediction_type=None, clip_skip=None) -> StableDiffusion:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    index = path / "model_index.json"
    if not index.exists():
        raise UserError("not a diffusers model folder (model_index.json is missing)", path=path)
    info = read_json_config(index)
    check_folder_components(path, ("unet", "vae", "text_encoder"), ("tokenizer", "scheduler"), allow_pickle)
    sched_cfg_path = path / "scheduler" / "scheduler_config.json"
    if not sched_cfg_path.exists():
        raise UserError("model folder is missing scheduler/scheduler_config.json", path=path)
    sched_cfg = read_json_config(sched_cfg_path)
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
        if is_internal_failure(e):
            raise
        raise UserError(f"could not load the model folder ({type(e).__name__}: {str(e).splitlines()[0]})", path=path) from None
    if not isinstance(tok.model_max_length, int) or tok.model_max_length > 10_000:
        tok.model_max_length = te.config.max_position_embeddings
    variant = variant or detect_variant(dict(unet.config), te.config.to_dict())
    prediction_type = prediction_type or sched_cfg.get("prediction_type", "epsilon")
    model = StableDiffusion(unet, vae, te, tok, sched_cfg, variant=variant, prediction_type=prediction_type,
                            source=str(path), clip_skip=clip_skip, toy=info.get(TOY_MARKER) == "toy")
    model.freeze()
    return model
