"""A tiny Qwen-Image / Qwen-Image-Edit built offline (tests, benchmarks): the real 60 dual-stream blocks and
module names of diffusers' `QwenImageTransformer2DModel` at a narrow width, a 2-layer Qwen2.5-VL (with its vision
tower, for the edit models), a narrow `AutoencoderKLQwenImage` and a byte-level Qwen2 tokenizer built in code.

`write_tiny_folder` writes the diffusers folder users download (transformer/, text_encoder/, vae/, tokenizer/,
scheduler/, processor/ for the edit models) and `write_tiny_single_files` the ComfyUI split files
(diffusion_models/, text_encoders/, vae/).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# The published scheduler of Qwen/Qwen-Image (scheduler/scheduler_config.json).
SCHEDULER_CONFIG = {"base_image_seq_len": 256, "base_shift": 0.5, "invert_sigmas": False, "max_image_seq_len": 8192,
                    "max_shift": 0.9, "num_train_timesteps": 1000, "shift": 1.0, "shift_terminal": 0.02,
                    "stochastic_sampling": False, "time_shift_type": "exponential", "use_beta_sigmas": False,
                    "use_dynamic_shifting": True, "use_exponential_sigmas": False, "use_karras_sigmas": False}

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>")
TEXT_WIDTH = 16  # the tiny Qwen2.5-VL's hidden size (3584 on the 7B): the transformer's joint_attention_dim


def tiny_tokenizer():
    """A byte-level Qwen2 BPE trained here on the pipelines' chat templates and the toy captions (so a template's
    system prefix is a few dozen tokens, as with the real tokenizer, and the text stream stays short), with the chat
    and vision special tokens first."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    from .model import EDIT_TEMPLATE, T2I_TEMPLATE

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    texts = [T2I_TEMPLATE, EDIT_TEMPLATE, "Picture 1: Picture 2: Picture 3: ", *_CAPTION_WORDS] * 4
    raw.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=list(SPECIAL_TOKENS),
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    model = json.loads(raw.to_str())["model"]
    tok = Qwen2Tokenizer(vocab=model["vocab"], merges=[tuple(m) if isinstance(m, list) else tuple(m.split(" "))
                                                       for m in model["merges"]],
                         unk_token="<|endoftext|>", pad_token="<|endoftext|>", eos_token="<|im_end|>",
                         additional_special_tokens=list(SPECIAL_TOKENS[1:]))
    tok.model_max_length = 32768
    return tok


VOCAB_SIZE = 512
_CAPTION_WORDS = ["a face, red hair, blue background, eyes open, smiling, glasses, closed eyes, brown hair, green "
                  "background, black hair, blond hair, yellow, white, frowning, no glasses, portrait, make it, change"]


# The tiny processor's pixel bound (12,845,056 on the real one): the pipelines hand the VL encoder a 1024² control
# (Edit) or 384² (Edit-2509/2511), ~1,300 / ~190 image tokens that every one of the 60 blocks would attend to;
# at most 112² pixels = 8x8 patches = 16 tokens keeps the tiny edit models' text streams as short as their prompts.
TINY_MAX_PIXELS = 112 * 112


def tiny_image_processor():
    """Qwen2.5-VL's image processor (14 px patches, 2x2 merge; the PIL one: torchvision is not a dependency), its
    images bounded to TINY_MAX_PIXELS."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=TINY_MAX_PIXELS)


def tiny_text_encoder_config() -> dict:
    """Qwen2.5-VL with 2 text layers of width 16 (2 heads of 8, grouped-query: k_proj bias 8 wide, 512 on the 7B)
    and a 2-block vision tower 8 wide whose output is 16 wide; token ids are the tiny tokenizer's."""
    ids = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    return dict(
        text_config=dict(vocab_size=VOCAB_SIZE, hidden_size=TEXT_WIDTH, intermediate_size=16, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [1, 1, 2]},
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=2, hidden_size=8, intermediate_size=8, num_heads=1, out_hidden_size=TEXT_WIDTH,
                           fullatt_block_indexes=[1], window_size=112, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])


def tiny_text_encoder(seed: int = 0):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**tiny_text_encoder_config())).eval()


def tiny_transformer(num_layers: int = 60, zero_cond_t: bool = False, seed: int = 0):
    """The 60 dual-stream blocks at width 8 (one head of 8; RoPE axes 2/2/4 instead of 16/56/56)."""
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    tr = QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=num_layers,
                                     attention_head_dim=8, num_attention_heads=1, joint_attention_dim=TEXT_WIDTH,
                                     axes_dims_rope=(2, 2, 4), zero_cond_t=zero_cond_t)
    with torch.no_grad():  # diffusers' default init leaves the modulation tiny; give every Linear a visible effect
        for m in tr.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.normal_(0, 0.3 / m.in_features ** 0.5)
    return tr.eval()


def tiny_vae(seed: int = 0):
    """AutoencoderKLQwenImage with the real blocks (4 levels of 2 residual blocks), 16 latent channels, 8x down and
    per-channel normalisation, at base width 4 (96 on the real one)."""
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(seed)
    return AutoencoderKLQwenImage(base_dim=4, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                                  temperal_downsample=[False, True, True]).eval()


def tiny_pipeline(variant: str = "qwen_image", num_layers: int = 60, seed: int = 0):
    """diffusers' QwenImagePipeline over a tiny model (an edit variant's transformer: zero_cond_t for edit_2511).
    The edit pipelines need transformers' Qwen2VLProcessor, which needs torchvision; the edit folders are written
    without building them (write_tiny_folder)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    tok = tiny_tokenizer()
    return QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_config(SCHEDULER_CONFIG),
                             vae=tiny_vae(seed), text_encoder=tiny_text_encoder(seed), tokenizer=tok,
                             transformer=tiny_transformer(num_layers, zero_cond_t=variant == "edit_2511", seed=seed))


EDIT_PIPELINES = {"edit": "QwenImageEditPipeline", "edit_2509": "QwenImageEditPlusPipeline",
                  "edit_2511": "QwenImageEditPlusPipeline"}


def write_tiny_folder(path, variant: str = "qwen_image", num_layers: int = 60, seed: int = 0) -> Path:
    """A diffusers folder as Qwen/Qwen-Image (or -Edit, -Edit-2509, -Edit-2511) ships it; the edit folders get
    their pipeline class and processor/ (the image processor's config and the tokenizer)."""
    import json

    path = Path(path)
    pipe = tiny_pipeline(variant, num_layers, seed)
    pipe.save_pretrained(path, safe_serialization=True)
    if variant in EDIT_PIPELINES:
        tiny_image_processor().save_pretrained(path / "processor")
        pipe.tokenizer.save_pretrained(path / "processor")
        index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
        index["_class_name"] = EDIT_PIPELINES[variant]
        index["processor"] = ["transformers", "Qwen2VLProcessor"]
        (path / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    return path


def write_tiny_single_files(folder, out) -> dict[str, Path]:
    """ComfyUI's split files of a tiny diffusers folder: diffusion_models/ (an Edit-2511 one with ComfyUI's
    marker), text_encoders/ (with the tokenizer/ folder beside it) and vae/."""
    from .files import save_text_encoder_file, save_transformer_file, save_vae_file
    from .loader import load_qwen_image

    model = load_qwen_image(Path(folder))  # every option at its default
    out = Path(out)
    files = {"diffusion_model": out / "diffusion_models" / "qwen_image_bf16.safetensors",
             "text_encoder": out / "text_encoders" / "qwen_2.5_vl_7b.safetensors",
             "vae": out / "vae" / "qwen_image_vae.safetensors"}
    for f in files.values():
        f.parent.mkdir(parents=True, exist_ok=True)
    save_transformer_file(model, files["diffusion_model"])
    save_text_encoder_file(model, files["text_encoder"])
    save_vae_file(model, files["vae"])
    model.tokenizer.save_pretrained(files["text_encoder"].parent / "tokenizer")
    return files
