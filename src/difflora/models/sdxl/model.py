"""SDXL base models (epsilon, or v-prediction as NoobAI-style models): loading, prompts, LoRA names.

- Two text encoders, as SDXL and kohya use them: CLIP-L's and OpenCLIP bigG's penultimate hidden
  states concatenated (768 + 1280 = 2048 wide), and bigG's pooled, projected output. The first
  tokenizer pads with <|endoftext|>, the second with "!" (token 0), as SDXL's tokenizer_2 does.
- Micro-conditioning: `time_ids` = (original height, width, crop top, left, target height, width)
  per sample, from the image's size and bucket as kohya computes them (`SampleSize`); without them
  (generation) the pipeline uses the output size and a (0, 0) crop.
- kohya LoRA names use the SGM ("input_blocks") layout of the original checkpoint, because
  sd-scripts trains SDXL on its SGM-layout U-Net: 722 U-Net modules, 788 with conv_dim,
  `lora_te1_` 72 and `lora_te2_` 192.
- Files: diffusers folders (read and written), and the original SGM single file read and written
  (`model.diffusion_model.`, `first_stage_model.`, `conditioner.embedders.0.transformer.` and
  `conditioner.embedders.1.model.`), the layout A1111, ComfyUI and kohya load. A third-party single
  file's layout is read from its tensor shapes; the real SDXL configs are bundled below.
- v-prediction: `v_parameterization`, or the file says so (ModelSpec `v`, or the `v_pred` marker
  tensor NoobAI/ComfyUI files carry); `ztsnr` (or `zero_terminal_snr`) rescales the betas to zero
  terminal SNR, as kohya's --zero_terminal_snr.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
import torch.nn as nn

from ...errors import UserError, is_internal_failure
from ...network.lora import LoRATarget
from ..base import Conditioning, SampleSize
from ..objectives import objective_for
from ..unet_family import UNetFamily, unet_lora_modules

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- bundled configs (stabilityai/stable-diffusion-xl-base-1.0)
UNET_CONFIG = dict(
    sample_size=128, in_channels=4, out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
    cross_attention_dim=2048, attention_head_dim=(5, 10, 20), use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    norm_num_groups=32,
)
VAE_CONFIG = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    latent_channels=4, sample_size=1024, scaling_factor=0.13025, force_upcast=True,
)
TEXT_ENCODER_CONFIG = dict(  # CLIP ViT-L/14
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
    bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
)
TEXT_ENCODER_2_CONFIG = dict(  # OpenCLIP ViT-bigG/14
    vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
    max_position_embeddings=77, hidden_act="gelu", projection_dim=1280,
    bos_token_id=49406, eos_token_id=49407, pad_token_id=0,
)
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="epsilon", steps_offset=1, timestep_spacing="leading", clip_sample=False,
    set_alpha_to_one=False, interpolation_type="linear", sample_max_value=1.0, use_karras_sigmas=False,
)

UNET_PREFIX = "model.diffusion_model."
TE1_PREFIX = "conditioner.embedders.0.transformer."
TE2_PREFIX = "conditioner.embedders.1.model."
REFINER_KEY = "conditioner.embedders.0.model.text_projection"  # the refiner has only bigG, as embedder 0
V_PRED_KEY, ZTSNR_KEY = "v_pred", "ztsnr"  # marker tensors of v-prediction SDXL files (NoobAI, ComfyUI)
MODELSPEC_ARCHITECTURE = "stable-diffusion-xl-v1-base"
IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"  # kohya's ModelSpec value for SDXL LoRAs


# ---------------------------------------------------------------- registry hooks (models/sdxl/__init__.py)
def detect_folder(path: Path, index: dict) -> str | None:
    cls = str(index.get("_class_name", ""))
    if "text_encoder_2" not in index and "StableDiffusionXL" not in cls:
        return None
    if "unet" not in index and not (path / "unet").is_dir():
        return None  # another two-encoder family (FLUX, SD3): a transformer, not a U-Net
    te1 = index.get("text_encoder")
    if index.get("requires_aesthetics_score") or (isinstance(te1, list) and not any(te1)):
        raise UserError("this is an SDXL refiner model, which difflora does not support (it has no CLIP-L text "
                        "encoder and is conditioned on aesthetic scores); train on an SDXL base model", path=path)
    return "sdxl"



def load(path: Path, *, family: str = "sdxl", dtype=torch.float32, allow_pickle=False, prediction_type=None,
         clip_skip=None, checkpoint=None, zero_terminal_snr: bool | None = None) -> "StableDiffusionXL":
    if clip_skip and clip_skip != 2:
        log.warning("clip_skip = %d is ignored: SDXL always uses the penultimate layer of both text encoders "
                    "(as kohya's sdxl_train_network)", clip_skip)
    if path.is_dir():
        model = load_folder(path, dtype=dtype, allow_pickle=allow_pickle, prediction_type=prediction_type,
                            zero_terminal_snr=zero_terminal_snr)
    else:
        model = load_single_file(path, checkpoint, dtype=dtype, allow_pickle=allow_pickle,
                                 prediction_type=prediction_type, zero_terminal_snr=zero_terminal_snr)
    model.freeze()
    return model


# ---------------------------------------------------------------- LoRA names
def unet_lora_targets(unet: nn.Module, conv: bool) -> list[LoRATarget]:
    """kohya's create_modules on sd-scripts' SGM-layout SDXL U-Net, run over the diffusers U-Net."""
    from ..ldm import unet_ldm_map, unet_ldm_name

    mapping = unet_ldm_map(dict(unet.config))
    return [LoRATarget("lora_unet_" + unet_ldm_name(path, mapping).replace(".", "_"), layer, "unet")
            for path, layer in unet_lora_modules(unet, conv)]


# ---------------------------------------------------------------- the model
class StableDiffusionXL(UNetFamily):
    family = "sdxl"

    def __init__(self, unet, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, scheduler_config: dict, *,
                 prediction_type: str, source: str = "", zero_terminal_snr: bool = False):
        self.denoiser = unet
        self.vae = vae
        self.text_encoders = {"text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
        self.tokenizers = (tokenizer, tokenizer_2)
        self.scheduler_config = dict(scheduler_config)
        self.scheduler_config["prediction_type"] = prediction_type
        if zero_terminal_snr:
            self.scheduler_config["rescale_betas_zero_snr"] = True
            if prediction_type == "epsilon":
                log.warning("zero terminal SNR with epsilon prediction: the last timestep cannot be learned "
                            "(kohya warns the same); use it with v_parameterization")
        self.objective = objective_for(prediction_type, self.scheduler_config)
        self.source = source

    # ---- identity
    @property
    def zero_terminal_snr(self) -> bool:
        return bool(self.scheduler_config.get("rescale_betas_zero_snr"))

    @property
    def base_model_version(self) -> str:
        return "sdxl_base_v1-0"  # kohya writes this for v-prediction SDXL too (ModelSpec says "v")

    @property
    def modelspec_architecture(self) -> str:
        return MODELSPEC_ARCHITECTURE + "/lora"

    def lora_metadata(self) -> dict[str, str]:
        md = {
            "ss_v2": "False",
            "ss_base_model_version": self.base_model_version,
            "modelspec.architecture": self.modelspec_architecture,
            "modelspec.implementation": IMPLEMENTATION,
            "modelspec.prediction_type": "v" if self.v_prediction else "epsilon",
            "modelspec.resolution": f"{self.resolution}x{self.resolution}",
        }
        if self.zero_terminal_snr:
            md["ss_zero_terminal_snr"] = "True"
        return md

    # ---- LoRA
    def lora_targets(self, conv: bool = False) -> list[LoRATarget]:
        from ..sd.model import text_encoder_lora_targets

        te1, te2 = self.text_encoders["text_encoder"], self.text_encoders["text_encoder_2"]
        return (text_encoder_lora_targets(te1, "lora_te1") + text_encoder_lora_targets(te2, "lora_te2")
                + unet_lora_targets(self.unet, conv))

    # ---- conditioning
    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
                         return_tensors="pt").input_ids for tok in self.tokenizers)

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        te1, te2 = self.text_encoders["text_encoder"], self.text_encoders["text_encoder_2"]
        ids1, ids2 = self.tokenize(prompts)
        h1 = te1(ids1.to(te1.device), output_hidden_states=True).hidden_states[-2]
        out2 = te2.text_model(ids2.to(te2.device), output_hidden_states=True)
        h2 = out2.hidden_states[-2]
        # bigG's pooled projection one prompt at a time: a CPU matmul rounds differently for another number of
        # rows, and a prompt's encoding must not depend on its batch (cached captions are encoded all at once,
        # uncached ones per step; both must give the same LoRA bit for bit).
        text_embeds = torch.cat([te2.text_projection(row[None]) for row in out2.pooler_output])
        return Conditioning({"encoder_hidden_states": torch.cat([h1, h2.to(h1.dtype)], dim=-1),
                             "text_embeds": text_embeds})

    def sample_conditioning(self, sizes: list[SampleSize]) -> Conditioning:
        rows = [[*s.original_hw, *s.crop_top_left, *s.target_hw] for s in sizes]
        return Conditioning({"time_ids": torch.tensor(rows, dtype=torch.float32)})

    def default_time_ids(self, latents: torch.Tensor) -> torch.Tensor:
        """No crop, original size = target size = the output size: what the pipeline uses to generate."""
        h, w = (int(x) * self.latent_downscale for x in latents.shape[-2:])
        return torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32).repeat(latents.shape[0], 1)

    def added_conditions(self, noisy, cond):
        time_ids = cond.tensors.get("time_ids")
        if time_ids is None:
            time_ids = self.default_time_ids(noisy)
        return {"text_embeds": cond.tensors["text_embeds"].to(noisy.dtype),
                "time_ids": time_ids.to(noisy.device, noisy.dtype)}

    def pipeline_embeddings(self, cond: Conditioning, uncond: Conditioning) -> dict[str, torch.Tensor]:
        return {**super().pipeline_embeddings(cond, uncond), "pooled_prompt_embeds": cond.tensors["text_embeds"],
                "negative_pooled_prompt_embeds": uncond.tensors["text_embeds"]}

    # ---- generation / saving
    def pipeline(self, scheduler: str = "ddim"):
        from diffusers import StableDiffusionXLPipeline

        from ..samplers import make_scheduler

        te1, te2 = self.text_encoders["text_encoder"], self.text_encoders["text_encoder_2"]
        pipe = StableDiffusionXLPipeline(
            vae=self.vae, text_encoder=te1, text_encoder_2=te2, tokenizer=self.tokenizers[0],
            tokenizer_2=self.tokenizers[1], unet=self.unet, scheduler=make_scheduler(scheduler, self.scheduler_config),
            force_zeros_for_empty_prompt=True, add_watermarker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def save(self, path, single_file=None, dtype=None):
        from ..folders import save_model

        save_model(self, path, single_file, dtype, save_single_file, "EulerDiscreteScheduler")


# ---------------------------------------------------------------- diffusers folders
def load_folder(path: Path, *, dtype=torch.float32, allow_pickle=False, prediction_type=None,
                zero_terminal_snr=None) -> StableDiffusionXL:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from ..folders import read_json_config
    from ..sd.model import check_folder_components

    for comp, what in (("text_encoder", "first text encoder (CLIP-L)"), ("text_encoder_2", "second text encoder "
                                                                         "(OpenCLIP bigG)")):
        if not (path / comp).is_dir():
            raise UserError(f"SDXL model folder is missing {comp}/, its {what}", path=path)
    check_folder_components(path, ("unet", "vae", "text_encoder", "text_encoder_2"),
                            ("tokenizer", "tokenizer_2", "scheduler"), allow_pickle)
    sched_path = path / "scheduler" / "scheduler_config.json"
    if not sched_path.exists():
        raise UserError("model folder is missing scheduler/scheduler_config.json", path=path)
    sched_cfg = read_json_config(sched_path)
    st = not allow_pickle or None
    try:
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", local_files_only=True, use_safetensors=st,
                                                    torch_dtype=dtype)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", local_files_only=True, use_safetensors=st,
                                            torch_dtype=dtype)
        te1 = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", local_files_only=True,
                                            use_safetensors=st, dtype=dtype)
        te2 = CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", local_files_only=True,
                                                          use_safetensors=st, dtype=dtype)
        tok1 = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True)
        tok2 = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", local_files_only=True)
    except Exception as e:
        if is_internal_failure(e):
            raise
        raise UserError(f"could not load the SDXL model folder ({type(e).__name__}: {str(e).splitlines()[0]})",
                        path=path) from None
    _check_unet_is_base(dict(unet.config), path)
    for tok, te in ((tok1, te1), (tok2, te2)):
        if not isinstance(tok.model_max_length, int) or tok.model_max_length > 10_000:
            tok.model_max_length = te.config.max_position_embeddings
    prediction_type = prediction_type or sched_cfg.get("prediction_type", "epsilon")
    ztsnr = bool(sched_cfg.get("rescale_betas_zero_snr")) if zero_terminal_snr is None else zero_terminal_snr
    return StableDiffusionXL(unet, vae, te1, te2, tok1, tok2, sched_cfg, prediction_type=prediction_type,
                             source=str(path), zero_terminal_snr=ztsnr)


def _check_unet_is_base(unet_cfg: dict, path) -> None:
    if unet_cfg.get("addition_embed_type") != "text_time":
        raise UserError("this folder's U-Net has no SDXL size conditioning (addition_embed_type is not text_time); "
                        "it is not an SDXL base model", path=path)


# ---------------------------------------------------------------- SGM single files
def check_checkpoint(keys, path) -> None:
    """Refuse SDXL single files difflora cannot use, saying what is wrong."""
    if REFINER_KEY in keys:
        raise UserError("this is an SDXL refiner checkpoint, which difflora does not support (it has no CLIP-L text "
                        "encoder and is conditioned on aesthetic scores); train on an SDXL base model", path=path)
    parts = (("first text encoder (CLIP-L, conditioner.embedders.0.transformer.)", TE1_PREFIX),
             ("second text encoder (OpenCLIP bigG, conditioner.embedders.1.model.)", TE2_PREFIX),
             ("U-Net (model.diffusion_model.)", UNET_PREFIX), ("VAE (first_stage_model.)", "first_stage_model."))
    for what, prefix in parts:
        if not any(k.startswith(prefix) for k in keys):
            raise UserError(f"SDXL checkpoint is missing its {what}", path=path)


def infer_configs(sd: dict[str, torch.Tensor]) -> dict[str, dict]:
    """diffusers configs of an SGM checkpoint from its tensor shapes (heads: SDXL's 64-wide heads)."""
    from ..ldm import infer_text_config, infer_unet_config, infer_vae_config

    unet = infer_unet_config(sd, "sd2")
    depths = []
    for b in range(len(unet["block_out_channels"])):
        idx = 1 + b * (unet["layers_per_block"] + 1)
        layers = {int(m.group(1)) for k in sd
                  if (m := re.match(rf"model\.diffusion_model\.input_blocks\.{idx}\.1\.transformer_blocks\.(\d+)\.", k))}
        depths.append(max(1, len(layers)))
    te2 = infer_text_config(sd, "sd2", prefix=TE2_PREFIX, penultimate=False)
    te2["projection_dim"] = int(sd[TE2_PREFIX + "text_projection"].shape[1])
    label_in = int(sd[UNET_PREFIX + "label_emb.0.0.weight"].shape[1])
    unet.update(sample_size=128, transformer_layers_per_block=depths, addition_embed_type="text_time",
                addition_time_embed_dim=(label_in - te2["projection_dim"]) // 6,
                projection_class_embeddings_input_dim=label_in)
    vae = dict(infer_vae_config(sd), scaling_factor=VAE_CONFIG["scaling_factor"], sample_size=1024)
    te1 = infer_text_config(sd, "sd1", prefix=TE1_PREFIX)
    te1.update(pad_token_id=49407)
    te2.update(pad_token_id=0)
    return {"unet": unet, "vae": vae, "text_encoder": te1, "text_encoder_2": te2, "scheduler": dict(SCHEDULER_CONFIG)}


def load_single_file(path: Path, checkpoint=None, *, dtype=torch.float32, allow_pickle=False, prediction_type=None,
                     zero_terminal_snr=None) -> StableDiffusionXL:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint, convert_open_clip_checkpoint)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from ...fileio import load_state_dict_file
    from ..ldm import clip_tokenizer

    sd, metadata = checkpoint if checkpoint is not None else load_state_dict_file(path, allow_pickle=allow_pickle)
    check_checkpoint(set(sd), path)
    try:
        configs = infer_configs(sd)
        for name in configs:
            if f"difflora.config.{name}" in metadata:
                configs[name] = json.loads(metadata[f"difflora.config.{name}"])
    except (KeyError, ValueError, IndexError, ZeroDivisionError) as e:
        raise UserError(f"cannot work out the SDXL layout from the checkpoint ({type(e).__name__}: {e})",
                        path=path) from None
    _check_unet_is_base(configs["unet"], path)
    try:
        unet = UNet2DConditionModel(**configs["unet"])
        unet.load_state_dict(convert_ldm_unet_checkpoint(sd, dict(unet.config)))
        vae = AutoencoderKL(**configs["vae"])
        vae.load_state_dict(convert_ldm_vae_checkpoint(sd, dict(vae.config)))
        te1 = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
        te1_sd = {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(sd).items()
                  if k.startswith("text_model.")}
        _load_text_encoder(te1, te1_sd)
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_encoder_2"]))
        _load_text_encoder(te2, convert_open_clip_checkpoint(te2, sd, prefix=TE2_PREFIX))
    except UserError:
        raise
    except Exception as e:
        if is_internal_failure(e):
            raise
        raise UserError(f"checkpoint does not match an SDXL layout ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200]})", path=path) from None
    toks = []
    for i, (key, pad_variant) in enumerate((("difflora.tokenizer", "sd1"), ("difflora.tokenizer_2", "sd2"))):
        if key in metadata:
            from tokenizers import Tokenizer
            from transformers import CLIPTokenizer

            tok = CLIPTokenizer(tokenizer_object=Tokenizer.from_str(metadata[key]),
                                pad_token=metadata.get(key + ".pad", "<|endoftext|>"))
            tok.model_max_length = 77
        else:
            tok = clip_tokenizer(pad_variant)
        toks.append(tok)
    if prediction_type is None:
        spec = metadata.get("modelspec.prediction_type")
        prediction_type = "v_prediction" if spec == "v" or (spec is None and V_PRED_KEY in sd) else "epsilon"
    ztsnr = (ZTSNR_KEY in sd or bool(configs["scheduler"].get("rescale_betas_zero_snr"))) \
        if zero_terminal_snr is None else zero_terminal_snr
    if dtype != torch.float32:
        for m in (unet, vae, te1, te2):
            m.to(dtype)
    return StableDiffusionXL(unet, vae, te1, te2, toks[0], toks[1], configs["scheduler"],
                             prediction_type=prediction_type, source=str(path), zero_terminal_snr=ztsnr)


def _load_text_encoder(te: nn.Module, state: dict[str, torch.Tensor]) -> None:
    missing, _ = te.load_state_dict(state, strict=False)
    missing = [k for k in missing if "position_ids" not in k]
    if missing:
        raise RuntimeError(f"text encoder weights missing: {missing[:3]}")


def save_single_file(model: StableDiffusionXL, path: Path, dtype: torch.dtype | None = None) -> None:
    """The SGM layout A1111/ComfyUI/kohya load, with the diffusers configs in the metadata."""
    from safetensors.torch import save_file

    from ...fileio import atomic_path
    from ..ldm import config_metadata, ldm_tensors

    te1, te2 = model.text_encoders["text_encoder"], model.text_encoders["text_encoder_2"]
    tensors = ldm_tensors(model, [(te1, "sd1", TE1_PREFIX), (te2, "sd2", TE2_PREFIX)], dtype)
    if model.v_prediction:
        tensors[V_PRED_KEY] = torch.tensor([])
    if model.zero_terminal_snr:
        tensors[ZTSNR_KEY] = torch.tensor([])
    metadata = {
        **config_metadata(model, model.text_encoders),
        "difflora.variant": "sdxl",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": MODELSPEC_ARCHITECTURE,
        "modelspec.implementation": IMPLEMENTATION,
        "modelspec.prediction_type": "v" if model.v_prediction else "epsilon",
    }
    for key, tok in zip(("difflora.tokenizer", "difflora.tokenizer_2"), model.tokenizers):
        backend = getattr(tok, "backend_tokenizer", None)
        if backend is not None and len(tok) != 49408:
            metadata[key] = backend.to_str()
            metadata[key + ".pad"] = str(tok.pad_token)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
