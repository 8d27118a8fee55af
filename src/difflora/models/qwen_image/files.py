"""Qwen-Image on disk: diffusers folders and ComfyUI's split files, with the variant each one is.

- A diffusers folder (Qwen/Qwen-Image, -2512, -Edit, -Edit-2509, -Edit-2511): transformer/, text_encoder/
  (Qwen2.5-VL), vae/, tokenizer/, scheduler/, and processor/ for the edit models. The pipeline class names the
  variant: QwenImagePipeline, QwenImageEditPipeline (edit), QwenImageEditPlusPipeline (edit_2509, or edit_2511 when
  the transformer's config sets zero_cond_t).
- ComfyUI's files: `qwen_image*_bf16.safetensors` / `_fp8_e4m3fn` (diffusers names, bare or under
  `model.diffusion_model.`; Edit-2511 saved by ComfyUI carries the `__index_timestep_zero__` marker), the text encoder
  `qwen_2.5_vl_7b*.safetensors` (`model.`/`visual.` names, bf16 or scaled fp8) and `qwen_image_vae.safetensors`
  (Wan2.1 names), given by the job keys `text_encoder` and `vae` as musubi-tuner names them. The tokenizer comes from
  `qwen_tokenizer` (a folder, e.g. a Qwen-Image folder's tokenizer/) or a tokenizer/ folder beside the text encoder.

Nothing in the weights tells Qwen-Image, Edit and Edit-2509 apart: a single file is Qwen-Image unless the job's
`model_variant` says otherwise, and a choice the files contradict (a 2511 marker, an edit folder) is refused.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from accelerate import init_empty_weights

from ...errors import UserError
from ...fileio import load_safetensors, read_safetensors_header
from ..comfy_files import dequantize_scaled_fp8, strip_comfy_prefix

VARIANTS = ("qwen_image", "edit", "edit_2509", "edit_2511")
EDIT_VARIANTS = VARIANTS[1:]
PIPELINE_VARIANTS = {"QwenImagePipeline": "qwen_image", "QwenImageEditPipeline": "edit",
                     "QwenImageEditPlusPipeline": "edit_2509"}
MARKER_2511 = "__index_timestep_zero__"  # ComfyUI's Edit-2511 sentinel (a buffer of its model)

# Published widths: Qwen-Image's transformer (head 128, RoPE axes 16/56/56), Qwen2.5-VL-7B, the Wan2.1-style VAE.
# The tiny test model's widths (models/qwen_image/tiny.py) are listed too, so its single files load like real ones.
ROPE_AXES = {128: (16, 56, 56), 8: (2, 2, 4)}
QWEN25_VL_7B = dict(
    text_config=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                     num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000,
                     rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                                         "mrope_section": [16, 24, 24]},
                     bos_token_id=151643, eos_token_id=151645),
    vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                       fullatt_block_indexes=[7, 15, 23, 31], window_size=112, patch_size=14, spatial_merge_size=2,
                       temporal_patch_size=2, tokens_per_second=2),
    image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653)
VAE_DIM_MULT = [1, 2, 4, 4]


def text_encoder_configs() -> dict[int, dict]:
    """Qwen2.5-VL configs by text width: the 7B Qwen-Image uses, and the tiny test model's."""
    from .tiny import TEXT_WIDTH, tiny_text_encoder_config

    return {3584: QWEN25_VL_7B, TEXT_WIDTH: tiny_text_encoder_config()}


# ------------------------------------------------------------------ key layouts
def is_qwen_image_transformer(keys) -> bool:
    """ComfyUI's test (model_detection.py): `txt_norm.weight` means a Qwen-Image transformer."""
    return any(k.split("diffusion_model.", 1)[-1] == "txt_norm.weight" for k in keys)


def comfy_text_encoder_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' Qwen2.5-VL names (model.language_model.*, model.visual.*) -> the checkpoint names ComfyUI's and
    Qwen's files use (model.*, visual.*, lm_head.*)."""
    out = {}
    for k, v in sd.items():
        if k.startswith("model.language_model."):
            k = "model." + k[len("model.language_model."):]
        elif k.startswith("model.visual."):
            k = k[len("model."):]
        out[k] = v
    return out


def transformers_text_encoder_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of comfy_text_encoder_keys."""
    out = {}
    for k, v in sd.items():
        if k.startswith("visual."):
            k = "model." + k
        elif k.startswith("model.") and not k.startswith(("model.language_model.", "model.visual.")):
            k = "model.language_model." + k[len("model."):]
        out[k] = v
    return out


def comfy_vae_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' AutoencoderKLQwenImage names -> the Wan2.1 names of ComfyUI's qwen_image_vae.safetensors (the
    inverse of diffusers' convert_wan_vae_to_diffusers, which reads them; tests check the round trip)."""
    resnet = {"norm1.gamma": "residual.0.gamma", "conv1": "residual.2", "norm2.gamma": "residual.3.gamma",
              "conv2": "residual.6", "conv_shortcut": "shortcut"}
    fixed = {"quant_conv": "conv1", "post_quant_conv": "conv2", "encoder.conv_in": "encoder.conv1",
             "decoder.conv_in": "decoder.conv1", "encoder.norm_out.gamma": "encoder.head.0.gamma",
             "encoder.conv_out": "encoder.head.2", "decoder.norm_out.gamma": "decoder.head.0.gamma",
             "decoder.conv_out": "decoder.head.2"}
    out = {}
    for k, v in sd.items():
        new = None
        for a, b in fixed.items():
            if k == a or k.startswith(a + "."):
                new = b + k[len(a):]
        m = re.match(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.+)$", k)
        if m:
            side, kind, i, rest = m.groups()
            idx = 2 * int(i) if kind == "resnets" else 1
            new = f"{side}.middle.{idx}.{_sub(rest, resnet) if kind == 'resnets' else rest}"
        m = re.match(r"encoder\.down_blocks\.(\d+)\.(.+)$", k)
        if m:
            new = f"encoder.downsamples.{m.group(1)}.{_sub(m.group(2), resnet)}"
        m = re.match(r"decoder\.up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0)\.(.+)$", k)
        if m:
            block, part, r, rest = m.groups()
            flat = 4 * int(block) + (int(r) if r is not None else 3)
            new = f"decoder.upsamples.{flat}.{_sub(rest, resnet) if r is not None else rest}"
        out[new or k] = v
    return out


def _sub(rest: str, table: dict[str, str]) -> str:
    for a, b in table.items():
        if rest == a or rest.startswith(a + "."):
            return b + rest[len(a):]
    return rest


# ------------------------------------------------------------------ detection
def variant_of_folder(path: Path, index: dict) -> str | None:
    cls = str(index.get("_class_name", ""))
    if cls not in PIPELINE_VARIANTS:
        return None
    variant = PIPELINE_VARIANTS[cls]
    if variant == "edit_2509" and _read_json(path / "transformer" / "config.json", path).get("zero_cond_t"):
        variant = "edit_2511"
    return variant


def resolve_variant(found: str | None, asked: str | None, path, can_tell: bool) -> str:
    """The variant to load: what the files say (`found`; None where they cannot tell), else the job's
    `model_variant`; a job that contradicts the files is refused. `can_tell`: a folder (its pipeline class names
    the variant) rather than a single file (only Edit-2511's marker says anything)."""
    if asked is None or asked == found:
        return found or "qwen_image"
    if found is None:
        return asked
    what = f"is {found}" if can_tell else "has ComfyUI's Edit-2511 marker (__index_timestep_zero__)"
    raise UserError(f"model_variant = {asked!r} but this model {what}; remove model_variant or give the "
                    "matching model", path=path)


# ------------------------------------------------------------------ loading
def read_index(path: Path) -> dict:
    return _read_json(path / "model_index.json", path)


def _read_json(path: Path, where) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path.parent.name}/{path.name} is missing", path=where) from None
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise UserError(f"unreadable {path.parent.name}/{path.name} ({e})", path=where) from None


FOLDER_PARTS = (("transformer", "the diffusion transformer"), ("text_encoder", "Qwen2.5-VL"), ("vae", "the VAE"),
                ("tokenizer", "Qwen2.5-VL's tokenizer"))


def check_folder(path: Path) -> None:
    """A Qwen-Image folder before anything is loaded: its parts are there, each config holds the types the classes
    need, and the parts fit together (the transformer reads the VAE's 2x2-packed latents and the text encoder's
    width; its heads carry the RoPE axes)."""
    from ..folders import check_config

    for sub, what in FOLDER_PARTS:
        _require_folder(path, sub, what)
    tr_cfg, vae_cfg, te_cfg = (path / sub / "config.json" for sub in ("transformer", "vae", "text_encoder"))
    check_config(tr_cfg, ("in_channels", "out_channels", "num_layers", "attention_head_dim", "num_attention_heads",
                          "joint_attention_dim", "patch_size"), ("axes_dims_rope",), ("guidance_embeds", "zero_cond_t"))
    check_config(vae_cfg, ("base_dim", "z_dim", "num_res_blocks"), ("dim_mult",))
    check_config(te_cfg)
    tr, vae, te = (_read_json(c, path) for c in (tr_cfg, vae_cfg, te_cfg))
    head = tr.get("attention_head_dim", 128)
    axes = tr.get("axes_dims_rope", [16, 56, 56])
    if sum(axes) != head:
        raise UserError(f"axes_dims_rope {axes} adds up to {sum(axes)}, but attention_head_dim is {head} (Qwen-Image: "
                        "16 + 56 + 56 = 128)", path=tr_cfg)
    z = vae.get("z_dim", 16)
    for key in ("latents_mean", "latents_std"):  # absent: the class's own (Qwen-Image's)
        stats = vae.get(key, [1.0] * z)
        numbers = isinstance(stats, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in stats)
        if not numbers or len(stats) != z or not all(math.isfinite(v) for v in stats):
            raise UserError(f"{key} must be {z} finite numbers (one per latent channel)", path=vae_cfg)
        if key == "latents_std" and min(stats) <= 0:
            raise UserError("latents_std must be positive (the latents are divided by it)", path=vae_cfg)
    patch = tr.get("patch_size", 2)
    if tr.get("in_channels", 64) != z * patch * patch or tr.get("out_channels", 16) != z:
        raise UserError(f"the transformer takes {tr.get('in_channels', 64)} channels in and gives "
                        f"{tr.get('out_channels', 16)} out, but the VAE's {z} latent channels in {patch}x{patch} "
                        f"patches need {z * patch * patch} in and {z} out", path=tr_cfg)
    text = te.get("text_config") if isinstance(te.get("text_config"), dict) else te
    width = text.get("hidden_size")
    if not isinstance(width, int) or isinstance(width, bool) or width <= 0:
        raise UserError(f"hidden_size = {width!r}: expected a positive integer", path=te_cfg)
    joint = tr.get("joint_attention_dim", 3584)
    if width != joint:
        raise UserError(f"this Qwen2.5-VL is {width} wide, but the transformer (joint_attention_dim) takes "
                        f"{joint}-wide text (Qwen2.5-VL-7B: 3584)", path=te_cfg)


def check_single_file_parts(options) -> None:
    """A single file's companion files exist and are safetensors (their header read, no weights) before the
    transformer is read."""
    for key in ("text_encoder", "vae"):
        value = getattr(options, key)
        if value is not None:
            read_safetensors_header(_existing(value, key))
    if options.qwen_tokenizer is not None and not Path(options.qwen_tokenizer).is_dir():
        raise UserError("qwen_tokenizer must be a folder with Qwen2.5-VL's tokenizer.json", path=options.qwen_tokenizer)


def _require_folder(path: Path, sub: str, what: str) -> Path:
    folder = path / sub
    if not folder.is_dir():
        raise UserError(f"the {sub}/ folder ({what}) is missing from this Qwen-Image model folder", path=path)
    return folder


def load_tokenizer(folder: Path, where):
    from transformers import Qwen2Tokenizer

    if not ((folder / "tokenizer.json").exists() or (folder / "vocab.json").exists()):
        raise UserError("no Qwen2 tokenizer here (tokenizer.json, or vocab.json + merges.txt)", path=folder)
    try:
        return Qwen2Tokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise UserError(f"unreadable Qwen2 tokenizer ({e})", path=where) from None


def load_image_processor(folder: Path | None):
    """Qwen2.5-VL's image processor (the PIL one: torchvision is not a dependency), from processor/ when given."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    cfg = folder / "preprocessor_config.json" if folder is not None else None
    if cfg is not None and cfg.exists():
        settings = _read_json(cfg, folder)
        # the pixel bounds as transformers writes them now ("size": shortest/longest_edge) or as the published
        # configs also spell them (min_pixels / max_pixels)
        keep = {k: settings[k] for k in ("size", "min_pixels", "max_pixels", "patch_size", "merge_size",
                                          "temporal_patch_size", "image_mean", "image_std") if k in settings}
        return Qwen2VLImageProcessorPil(**keep)
    return Qwen2VLImageProcessorPil()


def load_folder(path: Path, variant: str, dtype: torch.dtype):
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLForConditionalGeneration

    parts = {sub: _require_folder(path, sub, what) for sub, what in FOLDER_PARTS}
    tokenizer = load_tokenizer(parts["tokenizer"], path)
    try:
        transformer = QwenImageTransformer2DModel.from_pretrained(parts["transformer"], torch_dtype=dtype,
                                                                  local_files_only=True)
        vae = AutoencoderKLQwenImage.from_pretrained(parts["vae"], torch_dtype=dtype, local_files_only=True)
        text_encoder = Qwen2_5_VLForConditionalGeneration.from_pretrained(parts["text_encoder"], dtype=dtype,
                                                                          local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise UserError(f"cannot load this Qwen-Image folder ({str(e).splitlines()[0][:200]})", path=path) from None
    processor_dir = path / "processor"
    if variant in EDIT_VARIANTS:
        transformer.register_to_config(zero_cond_t=variant == "edit_2511")
        transformer.zero_cond_t = variant == "edit_2511"
    return transformer, vae, text_encoder.eval(), tokenizer, load_image_processor(
        processor_dir if processor_dir.is_dir() else None)


def transformer_from_state_dict(sd: dict[str, torch.Tensor], dtype: torch.dtype, path, zero_cond_t: bool):
    """diffusers' QwenImageTransformer2DModel sized from a single file's shapes (its native names are diffusers')."""
    from diffusers import QwenImageTransformer2DModel

    sd = dequantize_scaled_fp8({k: v for k, v in strip_comfy_prefix(sd).items() if k != MARKER_2511}, path, dtype)
    try:
        inner, in_channels = sd["img_in.weight"].shape
        joint = sd["txt_in.weight"].shape[1]
        head_dim = sd["transformer_blocks.0.attn.norm_q.weight"].shape[0]
        out_channels = sd["proj_out.weight"].shape[0] // 4
    except KeyError as e:
        raise UserError(f"not a complete Qwen-Image transformer: {e.args[0]} is missing", path=path) from None
    if "time_text_embed.addition_t_embedding.weight" in sd:
        raise UserError("this is Qwen-Image-Layered (time_text_embed.addition_t_embedding), which difflora does not "
                        "train; supported: Qwen-Image, Qwen-Image-Edit, Edit-2509, Edit-2511", path=path)
    if head_dim not in ROPE_AXES:
        raise UserError(f"attention head width {head_dim} is not Qwen-Image's (128)", path=path)
    layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks."))
    with init_empty_weights():  # parameters come from the file; buffers (RoPE tables) are computed
        tr = QwenImageTransformer2DModel(in_channels=in_channels, out_channels=out_channels, num_layers=layers,
                                         attention_head_dim=head_dim, num_attention_heads=inner // head_dim,
                                         joint_attention_dim=joint, axes_dims_rope=ROPE_AXES[head_dim],
                                         zero_cond_t=zero_cond_t)
    _load_exact(tr, sd, path, "transformer")
    return tr.to(dtype)


def _load_exact(module, sd, path, what: str) -> None:
    missing, unexpected = module.load_state_dict(sd, strict=False, assign=True)
    if missing or unexpected:
        name = (missing or unexpected)[0]
        raise UserError(f"this {what} file does not fit Qwen-Image's {what}: {len(missing)} weight(s) missing "
                        f"(first: {missing[0] if missing else '-'}), {len(unexpected)} unexpected "
                        f"(first: {unexpected[0] if unexpected else '-'}); {name}", path=path)


def load_text_encoder_file(path: Path, dtype: torch.dtype, joint_width: int):
    """Qwen2.5-VL from ComfyUI's text-encoder file (bf16 or scaled fp8), checked against the transformer's width."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    header, _ = read_safetensors_header(path)
    bias = header.get("model.layers.0.self_attn.k_proj.bias")
    embed = header.get("model.embed_tokens.weight")
    if bias is None or embed is None or not any(k.startswith("visual.") for k in header):
        raise UserError("not a Qwen2.5-VL text-encoder file (no model.layers.0.self_attn.k_proj.bias / visual.*); "
                        "Qwen-Image needs qwen_2.5_vl_7b.safetensors", path=path)
    width = int(embed["shape"][1])
    configs = text_encoder_configs()
    if width != joint_width or width not in configs:
        raise UserError(f"this Qwen2.5-VL is {width} wide, but the Qwen-Image transformer takes {joint_width}-wide "
                        "text (Qwen2.5-VL-7B: 3584); give qwen_2.5_vl_7b.safetensors", path=path)
    sd = dequantize_scaled_fp8(transformers_text_encoder_keys(load_safetensors(path)[0]), path, dtype)
    with init_empty_weights():  # parameters come from the file; buffers (RoPE tables) are computed
        te = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**configs[width]))
    if "lm_head.weight" not in sd:  # ComfyUI's files leave the unused language-model head out
        sd["lm_head.weight"] = torch.zeros(te.lm_head.weight.shape, dtype=dtype)
    _load_exact(te, sd, path, "text encoder")
    return te.to(dtype).eval()


def load_vae_file(path: Path, dtype: torch.dtype):
    """AutoencoderKLQwenImage from ComfyUI's Wan2.1-named file (or a diffusers-named one)."""
    from diffusers import AutoencoderKLQwenImage
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    sd, _ = load_safetensors(path)
    if "encoder.conv1.weight" in sd:
        sd = convert_wan_vae_to_diffusers(sd)
    if "encoder.conv_in.weight" not in sd or "post_quant_conv.weight" not in sd:
        raise UserError("not a Qwen-Image VAE file (no encoder.conv1 / conv2 of the Wan2.1 VAE); give "
                        "qwen_image_vae.safetensors", path=path)
    base, z2 = sd["encoder.conv_in.weight"].shape[0], sd["quant_conv.weight"].shape[0]
    if z2 != 32:
        raise UserError(f"this VAE has {z2 // 2} latent channels; Qwen-Image's has 16", path=path)
    with init_empty_weights():  # parameters come from the file; buffers (RoPE tables) are computed
        vae = AutoencoderKLQwenImage(base_dim=base, z_dim=16, dim_mult=VAE_DIM_MULT, num_res_blocks=2,
                                     temperal_downsample=[False, True, True])
    _load_exact(vae, {k: v.to(dtype) for k, v in sd.items()}, path, "VAE")
    return vae.eval()


def load_single_files(path: Path, checkpoint, *, variant: str, dtype: torch.dtype, text_encoder=None, vae=None,
                      tokenizer=None):
    """The transformer file plus, when given, the text encoder, VAE and tokenizer (a transformer alone is enough
    for the LoRA tools; training and generation then name the missing job key)."""
    tr = transformer_from_state_dict(checkpoint[0], dtype, path, zero_cond_t=variant == "edit_2511")
    te = tok = ae = None
    if text_encoder:
        te_path = _existing(text_encoder, "text_encoder")
        te = load_text_encoder_file(te_path, dtype, tr.config.joint_attention_dim)
        tok_dir = Path(tokenizer) if tokenizer else te_path.parent / "tokenizer"
        if not tok_dir.is_dir():
            raise UserError("Qwen2.5-VL's tokenizer folder was not found: set qwen_tokenizer to a folder with "
                            "tokenizer.json (e.g. a Qwen-Image folder's tokenizer/)", path=tok_dir)
        tok = load_tokenizer(tok_dir, tok_dir)
    if vae:
        ae = load_vae_file(_existing(vae, "vae"), dtype)
    return tr, ae, te, tok, load_image_processor(None)


def _existing(value, key: str) -> Path:
    p = Path(value)
    if not p.is_file():
        raise UserError(f"{key} file not found", path=p)
    return p


# ------------------------------------------------------------------ saving
def save_transformer_file(model, path: Path, dtype: torch.dtype | None = None) -> None:
    """ComfyUI's diffusion-model file (diffusers names; Edit-2511 with ComfyUI's marker, so it loads as 2511)."""
    from ...fileio import save_safetensors

    sd = {k: (v.float() if v.dtype == torch.float8_e4m3fn else v) for k, v in model.transformer.state_dict().items()}
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    if model.variant == "edit_2511":
        sd[MARKER_2511] = torch.tensor([])
    save_safetensors({k: v.contiguous() for k, v in sd.items()}, path)


def save_text_encoder_file(model, path: Path) -> None:
    from ...fileio import save_safetensors

    te = model.text_encoders["qwen25vl"]
    save_safetensors({k: v.contiguous() for k, v in comfy_text_encoder_keys(te.state_dict()).items()}, path)


def save_vae_file(model, path: Path) -> None:
    from ...fileio import save_safetensors

    save_safetensors({k: v.contiguous() for k, v in comfy_vae_keys(model.vae.state_dict()).items()}, path)


def save_folder(model, path: Path, dtype: torch.dtype | None = None) -> None:
    """A diffusers folder (written beside, then renamed into place)."""
    import shutil
    import tempfile

    from ...fileio import write_json_atomic
    from ..folders import publish_layout
    from .tiny import EDIT_PIPELINES, SCHEDULER_CONFIG

    if path.exists():
        raise UserError("output folder already exists; choose another path", path=path)
    if model.text_encoders.get("qwen25vl") is None or model.vae is None:
        raise UserError("this Qwen-Image model has no text encoder or VAE (a single transformer file, or "
                        "cache_text_encoder_outputs): save it as a .safetensors file instead", path=path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        tr = model.transformer
        sd = {k: (v.float() if v.dtype == torch.float8_e4m3fn else v) for k, v in tr.state_dict().items()}
        if dtype is not None:
            sd = {k: v.to(dtype) for k, v in sd.items()}
        tr.save_pretrained(tmp / "transformer", state_dict=sd, safe_serialization=True)
        model.vae.save_pretrained(tmp / "vae", safe_serialization=True)
        model.text_encoders["qwen25vl"].save_pretrained(tmp / "text_encoder", safe_serialization=True)
        model.tokenizer.save_pretrained(tmp / "tokenizer")
        (tmp / "scheduler").mkdir()
        write_json_atomic(tmp / "scheduler" / "scheduler_config.json",
                          {"_class_name": "FlowMatchEulerDiscreteScheduler", **SCHEDULER_CONFIG})
        index = {"_class_name": EDIT_PIPELINES.get(model.variant, "QwenImagePipeline"),
                 "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
                 "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
                 "tokenizer": ["transformers", "Qwen2Tokenizer"],
                 "transformer": ["diffusers", "QwenImageTransformer2DModel"], "vae": ["diffusers", "AutoencoderKLQwenImage"]}
        if model.is_edit:
            model.image_processor.save_pretrained(tmp / "processor")
            model.tokenizer.save_pretrained(tmp / "processor")
            index["processor"] = ["transformers", "Qwen2VLProcessor"]
        write_json_atomic(tmp / "model_index.json", index)
        publish_layout(tmp)  # tokenizer files transformers 4 reads (vocab.json, merges.txt, its tokenizer_config)
        tmp.rename(path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
