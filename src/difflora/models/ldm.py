"""Original-layout (LDM / A1111) single-file checkpoints for SD1 and SD2.

Export (diffusers -> LDM) is derived from the U-Net/VAE configs, so any SD-style layout works,
test-sized ones included. Import uses diffusers' own converters. The diffusers configs come
from the file's metadata when difflora wrote it (`difflora.config.*`), otherwise they are
inferred from tensor shapes (attention heads, which shapes cannot show, follow SD1's 8 heads
and SD2's 64-wide heads). The tokenizer of a third-party file is CLIP's BPE, built from the
vocabulary bundled in the package.
"""

from __future__ import annotations

import gzip
import json
import logging
import re
from importlib import resources
from pathlib import Path

import torch

from ..errors import UserError, is_internal_failure
from ..fileio import atomic_path, load_state_dict_file

log = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_TE_PREFIX = "cond_stage_model.transformer."
SD2_TE_PREFIX = "cond_stage_model.model."

_RESNET_TO_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                  "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


# ------------------------------------------------------------------ diffusers -> LDM
def unet_ldm_map(config: dict) -> dict[str, str]:
    """diffusers U-Net module path -> LDM/SGM module path, for every block of this config (longest first)."""
    n_blocks = len(config["block_out_channels"])
    lpb = config["layers_per_block"]
    mapping: dict[str, str] = {
        "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
        "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
        "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
        "mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
        "mid_block.resnets.1": "middle_block.2",
    }
    for b in range(n_blocks):
        for j in range(lpb):
            idx = 1 + b * (lpb + 1) + j
            mapping[f"down_blocks.{b}.resnets.{j}"] = f"input_blocks.{idx}.0"
            mapping[f"down_blocks.{b}.attentions.{j}"] = f"input_blocks.{idx}.1"
        if b < n_blocks - 1:
            mapping[f"down_blocks.{b}.downsamplers.0.conv"] = f"input_blocks.{1 + b * (lpb + 1) + lpb}.0.op"
    up_types = config["up_block_types"]
    for b in range(n_blocks):
        for j in range(lpb + 1):
            k = b * (lpb + 1) + j
            mapping[f"up_blocks.{b}.resnets.{j}"] = f"output_blocks.{k}.0"
            mapping[f"up_blocks.{b}.attentions.{j}"] = f"output_blocks.{k}.1"
        if b < n_blocks - 1:
            slot = 2 if "CrossAttn" in up_types[b] else 1
            mapping[f"up_blocks.{b}.upsamplers.0.conv"] = f"output_blocks.{b * (lpb + 1) + lpb}.{slot}.conv"
    return dict(sorted(mapping.items(), key=lambda kv: len(kv[0]), reverse=True))


def unet_ldm_name(name: str, mapping: dict[str, str]) -> str:
    """The LDM/SGM name of a diffusers U-Net parameter or module path (ResNet children renamed)."""
    for src, dst in mapping.items():
        if name == src:
            return dst
        if name.startswith(src + "."):
            rest = name[len(src) + 1:]
            if ".resnets." in src + "." or src.startswith("mid_block.resnets"):
                head, dot, tail = rest.partition(".")
                rest = _RESNET_TO_LDM.get(head, head) + dot + tail
            return f"{dst}.{rest}"
    raise ValueError(f"no LDM name for U-Net key {name}")


def unet_to_ldm(sd: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    mapping = unet_ldm_map(config)
    return {UNET_PREFIX + unet_ldm_name(key, mapping): v for key, v in sd.items()}


def vae_to_ldm(sd: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    n = len(config["block_out_channels"])
    out = {}
    attn_map = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    for key, v in sd.items():
        k = key
        k = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2.", k)
        k = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.", r"encoder.down.\1.downsample.conv.", k)
        k = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
                   lambda m: f"decoder.up.{n - 1 - int(m.group(1))}.block.{m.group(2)}.", k)
        k = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.",
                   lambda m: f"decoder.up.{n - 1 - int(m.group(1))}.upsample.conv.", k)
        k = re.sub(r"^(encoder|decoder)\.mid_block\.resnets\.(\d)\.", lambda m: f"{m.group(1)}.mid.block_{int(m.group(2)) + 1}.", k)
        m = re.match(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)$", k)
        if m:
            name = attn_map.get(m.group(2), m.group(2))
            k = f"{m.group(1)}.mid.attn_1.{name}.{m.group(3)}"
            if m.group(3) == "weight" and v.dim() == 2:
                v = v[:, :, None, None]  # LDM's attention uses 1x1 convs
        k = k.replace(".conv_shortcut.", ".nin_shortcut.")
        k = k.replace("encoder.conv_norm_out.", "encoder.norm_out.").replace("decoder.conv_norm_out.", "decoder.norm_out.")
        out[VAE_PREFIX + k] = v
    return out


def text_encoder_to_ldm(sd: dict[str, torch.Tensor], variant: str, prefix: str | None = None) -> dict[str, torch.Tensor]:
    """CLIP-L ("sd1": `prefix` + text_model.*) or OpenCLIP ("sd2": `prefix` + open_clip's names).

    A CLIPTextModelWithProjection's `text_projection` is written transposed, as open_clip stores it.
    """
    projection = sd.get("text_projection.weight")
    sd = {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in sd.items()
          if k != "text_projection.weight"}
    if variant == "sd1":
        prefix = prefix or SD1_TE_PREFIX
        return {prefix + k: v for k, v in sd.items() if "position_ids" not in k}
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    prefix = prefix or SD2_TE_PREFIX
    maps = DIFFUSERS_TO_LDM_MAPPING["openclip"]
    out = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        if k in maps["layers"]:
            out[prefix + maps["layers"][k]] = v
            continue
        m = re.match(r"text_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$", k)
        if m:
            qkv.setdefault(f"{m.group(1)}.{m.group(3)}", {})[m.group(2)] = v
            continue
        m = re.match(r"text_model\.encoder\.layers\.(\d+)\.(.+)$", k)
        if not m:
            continue
        rest = m.group(2).replace("layer_norm1", "ln_1").replace("layer_norm2", "ln_2")
        rest = rest.replace("mlp.fc1", "mlp.c_fc").replace("mlp.fc2", "mlp.c_proj").replace("self_attn.out_proj", "attn.out_proj")
        out[f"{prefix}transformer.resblocks.{m.group(1)}.{rest}"] = v
    for key, parts in qkv.items():
        layer, kind = key.split(".")
        out[f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    if projection is not None:
        out[prefix + "text_projection"] = projection.t().contiguous()
    return out


def ldm_tensors(model, text_encoders: list[tuple[object, str, str | None]], dtype: torch.dtype | None) -> dict:
    """A U-Net family's weights in the original layout: U-Net, VAE and each (text encoder, its variant, its key
    prefix or None for the variant's own), cast to `dtype`, on the CPU, contiguous: ready for save_file."""
    tensors = {}
    tensors.update(unet_to_ldm(model.unet.state_dict(), dict(model.unet.config)))
    tensors.update(vae_to_ldm(model.vae.state_dict(), dict(model.vae.config)))
    for te, variant, prefix in text_encoders:
        tensors.update(text_encoder_to_ldm(te.state_dict(), variant, prefix))
    return {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
            for k, v in tensors.items()}


def config_metadata(model, text_encoders: dict[str, object]) -> dict[str, str]:
    """The diffusers configs of every component, as the single file's metadata (a later load rebuilds them)."""
    def clean(cfg) -> str:
        return json.dumps({k: v for k, v in dict(cfg).items() if not k.startswith("_")})

    return {"difflora.config.unet": clean(model.unet.config), "difflora.config.vae": clean(model.vae.config),
            **{f"difflora.config.{name}": json.dumps(te.config.to_diff_dict()) for name, te in text_encoders.items()},
            "difflora.config.scheduler": clean(model.scheduler_config)}


def save_sd_single_file(model, path: Path, dtype: torch.dtype | None = None) -> None:
    """Write an original-layout .safetensors with the diffusers configs in its metadata."""
    from safetensors.torch import save_file

    tensors = ldm_tensors(model, [(model.text_encoder, model.family, None)], dtype)
    metadata = {
        **config_metadata(model, {"text_encoder": model.text_encoder}),
        "difflora.variant": model.family,
        **({"difflora.family": "toy"} if model.toy else {}),
        "modelspec.prediction_type": "v" if model.v_prediction else "epsilon",
    }
    tok_json = getattr(model.tokenizer, "backend_tokenizer", None)
    if tok_json is not None and len(model.tokenizer) != 49408:
        metadata["difflora.tokenizer"] = tok_json.to_str()
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


# ------------------------------------------------------------------ LDM -> diffusers
def detect_checkpoint(keys) -> str | None:
    """"sd1"/"sd2" when the tensor names are SD1/SD2's LDM layout, else None."""
    if any(k.startswith("conditioner.embedders.") for k in keys):
        return None  # SDXL
    has_unet = any(k.startswith(UNET_PREFIX) for k in keys)
    if any(k.startswith(SD2_TE_PREFIX) for k in keys) and has_unet:
        return "sd2"
    if any(k.startswith(SD1_TE_PREFIX) for k in keys) and has_unet:
        return "sd1"
    return None


def _norm_groups(channels: list[int]) -> int:
    """GroupNorm's group count is not in the weights: SD uses 32; smaller widths need a divisor."""
    return next(g for g in (32, 16, 8, 4, 2, 1) if all(c % g == 0 for c in channels))


def infer_unet_config(sd: dict[str, torch.Tensor], variant: str) -> dict:
    p = UNET_PREFIX
    n_in = len({int(m.group(1)) for k in sd if (m := re.match(re.escape(p) + r"input_blocks\.(\d+)\.", k))})
    down_idx = sorted(int(m.group(1)) for k in sd if (m := re.match(re.escape(p) + r"input_blocks\.(\d+)\.0\.op\.weight$", k)))
    n_blocks = len(down_idx) + 1
    lpb = (n_in - 1 - len(down_idx)) // n_blocks
    chans, attn = [], []
    for b in range(n_blocks):
        idx = 1 + b * (lpb + 1)
        chans.append(int(sd[f"{p}input_blocks.{idx}.0.out_layers.3.weight"].shape[0]))
        attn.append(any(k.startswith(f"{p}input_blocks.{idx}.1.") for k in sd))
    attn_keys = [k for k in sd if k.endswith("attn2.to_k.weight")]
    cross_dim = int(sd[attn_keys[0]].shape[1]) if attn_keys else 768
    proj = [k for k in sd if k.endswith(".proj_in.weight")]
    linear_proj = bool(proj) and sd[proj[0]].dim() == 2
    heads = [8] * n_blocks if variant == "sd1" else [max(1, c // 64) for c in chans]
    return dict(
        sample_size=64,
        in_channels=int(sd[p + "input_blocks.0.0.weight"].shape[1]),
        out_channels=int(sd[p + "out.2.weight"].shape[0]),
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        block_out_channels=chans,
        layers_per_block=lpb,
        cross_attention_dim=cross_dim,
        attention_head_dim=heads if variant == "sd2" else heads[0],
        use_linear_projection=linear_proj,
        norm_num_groups=_norm_groups(chans),
    )


def infer_vae_config(sd: dict[str, torch.Tensor]) -> dict:
    p = VAE_PREFIX
    n = len({int(m.group(1)) for k in sd if (m := re.match(re.escape(p) + r"encoder\.down\.(\d+)\.", k))})
    lpb = len({int(m.group(1)) for k in sd if (m := re.match(re.escape(p) + r"encoder\.down\.0\.block\.(\d+)\.", k))})
    chans = [int(sd[f"{p}encoder.down.{i}.block.0.conv2.weight"].shape[0]) for i in range(n)]
    return dict(
        in_channels=int(sd[p + "encoder.conv_in.weight"].shape[1]),
        out_channels=int(sd[p + "decoder.conv_out.weight"].shape[0]),
        down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n,
        block_out_channels=chans,
        layers_per_block=lpb,
        latent_channels=int(sd[p + "decoder.conv_in.weight"].shape[1]),
        norm_num_groups=_norm_groups(chans),
        sample_size=512,
        scaling_factor=0.18215,
    )


def infer_text_config(sd: dict[str, torch.Tensor], variant: str, prefix: str | None = None,
                      penultimate: bool = True) -> dict:
    """CLIP config from tensor shapes. `penultimate`: drop OpenCLIP's last layer as SD2 models do."""
    if variant == "sd1":
        p = (prefix or SD1_TE_PREFIX) + "text_model."
        emb = sd[p + "embeddings.token_embedding.weight"]
        layers = len({int(m.group(1)) for k in sd if (m := re.match(re.escape(p) + r"encoder\.layers\.(\d+)\.", k))})
        inter = int(sd[p + "encoder.layers.0.mlp.fc1.weight"].shape[0])
        max_pos = int(sd[p + "embeddings.position_embedding.weight"].shape[0])
        act = "quick_gelu"
    else:
        p = prefix or SD2_TE_PREFIX
        emb = sd[p + "token_embedding.weight"]
        layers = len({int(m.group(1)) for k in sd if (m := re.match(re.escape(p) + r"transformer\.resblocks\.(\d+)\.", k))})
        layers = 23 if layers == 24 and penultimate else layers  # SD2 uses the penultimate layer, as diffusers and kohya build it
        inter = int(sd[p + "transformer.resblocks.0.mlp.c_fc.weight"].shape[0])
        max_pos = int(sd[p + "positional_embedding"].shape[0])
        act = "gelu"
    hidden = int(emb.shape[1])
    return dict(vocab_size=int(emb.shape[0]), hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                num_attention_heads=max(1, hidden // 64), max_position_embeddings=max_pos, hidden_act=act,
                bos_token_id=49406, eos_token_id=49407, pad_token_id=49407 if variant == "sd1" else 0,
                projection_dim=hidden)


def clip_tokenizer(variant: str):
    """CLIP's BPE tokenizer from the bundled vocabulary (same for SD1 and SD2; pad differs)."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    data = resources.files("difflora").joinpath("assets/clip/bpe_simple_vocab_16e6.txt.gz")
    if not data.is_file():
        raise UserError("the bundled CLIP vocabulary is missing from this installation (assets/clip)")
    lines = gzip.decompress(data.read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]]
    alphabet = list(bytes_to_unicode().values())
    vocab_list = alphabet + [a + "</w>" for a in alphabet] + ["".join(m) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(vocab_list)}
    pad = "<|endoftext|>" if variant == "sd1" else "!"
    tok = CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad, model_max_length=77)
    tok.model_max_length = 77
    return tok


def load_sd_single_file(path: Path, *, dtype=torch.float32, allow_pickle=False, variant=None,
                        prediction_type=None, clip_skip=None, checkpoint=None):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint, convert_open_clip_checkpoint)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from .sd.model import StableDiffusion

    sd, metadata = checkpoint if checkpoint is not None else load_state_dict_file(path, allow_pickle=allow_pickle)
    detected = detect_checkpoint(sd)
    if detected is None:
        raise UserError("not a Stable Diffusion 1.x/2.x checkpoint (no model.diffusion_model / cond_stage_model keys)",
                        path=path)
    variant = variant or metadata.get("difflora.variant") or detected
    try:
        unet_cfg = json.loads(metadata["difflora.config.unet"]) if "difflora.config.unet" in metadata else infer_unet_config(sd, variant)
        vae_cfg = json.loads(metadata["difflora.config.vae"]) if "difflora.config.vae" in metadata else infer_vae_config(sd)
        te_cfg = json.loads(metadata["difflora.config.text_encoder"]) if "difflora.config.text_encoder" in metadata else infer_text_config(sd, variant)
        sched_cfg = json.loads(metadata["difflora.config.scheduler"]) if "difflora.config.scheduler" in metadata else None
    except (KeyError, ValueError, IndexError) as e:
        raise UserError(f"cannot work out the model's layout from the checkpoint ({type(e).__name__}: {e})", path=path) from None
    if sched_cfg is None:
        from .sd.model import SD_SCHEDULER_CONFIG

        sched_cfg = dict(SD_SCHEDULER_CONFIG)
    if prediction_type is None:
        spec = metadata.get("modelspec.prediction_type")
        prediction_type = "v_prediction" if spec == "v" else sched_cfg.get("prediction_type", "epsilon")
        if variant == "sd2" and spec is None:
            log.warning("%s: SD2 checkpoint without metadata; assuming epsilon prediction. Set v_parameterization "
                        "= true (or --v-parameterization) for 768-v models.", path)
    try:
        unet = UNet2DConditionModel(**unet_cfg)
        unet.load_state_dict(convert_ldm_unet_checkpoint(sd, dict(unet.config)))
        vae = AutoencoderKL(**vae_cfg)
        vae.load_state_dict(convert_ldm_vae_checkpoint(sd, dict(vae.config)))
        te = CLIPTextModel(CLIPTextConfig(**te_cfg))
        if variant == "sd1":
            te_sd = convert_ldm_clip_checkpoint(sd)
        else:
            te_sd = convert_open_clip_checkpoint(te, sd)
        te_sd = {k[len("text_model."):] if k.startswith("text_model.") else k: v for k, v in te_sd.items()}
        missing, unexpected = te.load_state_dict(te_sd, strict=False)
        missing = [k for k in missing if "position_ids" not in k]
        if missing:
            raise RuntimeError(f"text encoder weights missing: {missing[:3]}")
    except UserError:
        raise
    except Exception as e:
        if is_internal_failure(e):
            raise
        raise UserError(f"checkpoint does not match an SD1/SD2 layout ({type(e).__name__}: {str(e).splitlines()[0][:200]})",
                        path=path) from None
    if "difflora.tokenizer" in metadata:
        from tokenizers import Tokenizer

        tok = CLIPTokenizer(tokenizer_object=Tokenizer.from_str(metadata["difflora.tokenizer"]))
        tok.model_max_length = te.config.max_position_embeddings
    else:
        tok = clip_tokenizer(variant)
    if dtype != torch.float32:
        for m in (unet, vae, te):
            m.to(dtype)
    model = StableDiffusion(unet, vae, te, tok, sched_cfg, variant=variant, prediction_type=prediction_type,
                            source=str(path), clip_skip=clip_skip, toy=metadata.get("difflora.family") == "toy")
    model.freeze()
    return model
