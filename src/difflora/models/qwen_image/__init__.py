"""Qwen-Image, Qwen-Image-Edit, Edit-2509 and Edit-2511: the family's plug-in (`model_family = "qwen_image"`;
the variant from the files or `model_variant`).

Light on purpose (the job schema is built from it): torch-heavy modules load in `load`. Package: model.py (the
family: prompt encoding, flow matching, sampler, the edit hooks), files.py (folders and ComfyUI's files), loader.py,
lora.py (LoRA names), options.py (job keys), tiny.py (tests, benches).
"""

from __future__ import annotations

import re
from pathlib import Path

from ...errors import UserError
from ..plugin import FamilyPlugin
from .options import QwenImageJobOptions

_PIPELINES = ("QwenImagePipeline", "QwenImageEditPipeline", "QwenImageEditPlusPipeline")
_BLOCK = re.compile(r"^lora_unet_(transformer_blocks_\d+)_")
_VERSIONS = ("qwen_image", "qwen_image_edit")


class QwenImagePlugin(FamilyPlugin):
    names = ("qwen_image",)
    title = "Qwen-Image / Qwen-Image-Edit"
    options = QwenImageJobOptions
    kohya_network_module = "networks.lora_qwen_image"  # musubi-tuner's

    def detect_folder(self, path, index):
        cls = str(index.get("_class_name", ""))
        if not cls.startswith("QwenImage"):
            return None
        if cls not in _PIPELINES:
            raise UserError(f"this is a {cls} folder; difflora trains Qwen-Image, Qwen-Image-Edit, Edit-2509 and "
                            "Edit-2511 (QwenImagePipeline, QwenImageEditPipeline, QwenImageEditPlusPipeline)",
                            path=path)
        return "qwen_image"

    def detect_single_file(self, keys, metadata):
        from .files import is_qwen_image_transformer

        return "qwen_image" if is_qwen_image_transformer(keys) else None

    def owns_lora_names(self, names, metadata):
        version = metadata.get("ss_base_model_version")
        if version:
            return version in _VERSIONS
        return bool(names) and all(_BLOCK.match(n) or "transformer_blocks" in n for n in names)

    def family_of_version(self, version):
        return "qwen_image" if version in _VERSIONS else None

    def lora_block(self, name):
        m = _BLOCK.match(name)
        return m.group(1) if m else None

    generate_file_keys = {"text_encoder": "Qwen2.5-VL-7B file (qwen_2.5_vl_7b.safetensors)",
                          "vae": "Qwen-Image VAE file (qwen_image_vae.safetensors)",
                          "qwen_tokenizer": "folder with Qwen2.5-VL's tokenizer.json (default: tokenizer/ beside "
                                            "the --text-encoder file)"}

    model_variants = {"qwen_image": "Qwen-Image", "edit": "Qwen-Image-Edit", "edit_2509": "Qwen-Image-Edit-2509",
                      "edit_2511": "Qwen-Image-Edit-2511"}

    def check_files(self, path, options):
        """A folder: its parts, their configs and how they fit (files.check_folder); a single file: its companion
        files' headers."""
        from .files import check_folder, check_single_file_parts

        if Path(path).is_dir():
            stray = [k for k in ("text_encoder", "vae", "qwen_tokenizer") if getattr(options, k)]
            if stray:
                raise UserError(f"{', '.join(stray)} name files for a single-file transformer; a diffusers folder "
                                "has its own", path=path)
            check_folder(Path(path))
        else:
            check_single_file_parts(options)

    def load(self, path, *, family, dtype, allow_pickle, checkpoint, options, prediction_type, clip_skip,
             zero_terminal_snr, mixed_precision="no"):
        from .loader import load_qwen_image

        if prediction_type not in (None, "flow"):
            raise UserError(f"Qwen-Image is a flow-matching model; prediction type {prediction_type!r} does not apply",
                            path=path)
        if clip_skip is not None:
            raise UserError("clip_skip applies to CLIP text encoders; Qwen-Image reads Qwen2.5-VL's last hidden "
                            "state", path=path)
        for key in ("guidance_scale", "model_prediction_type"):
            if key in options.model_fields_set and getattr(options, key) != QwenImageJobOptions.model_fields[key].default:
                raise UserError(f"{key} does not apply to Qwen-Image (no embedded guidance; the loss is on the raw "
                                "velocity, as in musubi)", path=path)
        return load_qwen_image(Path(path), dtype=dtype, checkpoint=checkpoint, options=options,
                               mixed_precision=mixed_precision)


PLUGIN = QwenImagePlugin()
