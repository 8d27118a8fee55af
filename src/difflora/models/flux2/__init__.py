"""FLUX.2 (Black Forest Labs, late 2025): dev (32B, Mistral Small 3.1 text encoder) and klein 4B / 9B (Qwen3
4B / 8B), klein as step-distilled and base models: the family's plug-in.

Layouts that load, offline: diffusers folders (Flux2Pipeline, Flux2KleinPipeline) and BFL / ComfyUI single
files with `text_encoder` and `vae` job keys (musubi's names). Package: model.py (the family), files.py
(folders, single files, saving), names.py (BFL <-> diffusers weights and every LoRA spelling), variants.py
(sizes), options.py (job keys), low_vram.py (block swap on diffusers' blocks), tiny.py (tests, benches).
Light on purpose: torch-heavy modules load in `load`.
"""

from __future__ import annotations

import re
from pathlib import Path

from ...errors import UserError
from ..plugin import FamilyPlugin
from .options import Flux2JobOptions

_VERSIONS = ("dev", "klein-4b", "klein-base-4b", "klein-9b", "klein-base-9b")
# FLUX.1's per-block modulation: in a LoRA, it names FLUX.1 (FLUX.2's modulation is global)
_FLUX1_ONLY = re.compile(r"(double_blocks[._]\d+[._](img|txt)_mod|single_blocks[._]\d+[._]modulation)")
_FLUX2_ONLY = re.compile(r"stream_modulation|to_qkv_mlp_proj|ff\.linear_in|ff_context\.linear_in|to_added_qkv")
_BLOCK = re.compile(r"^lora_unet_(double_blocks_\d+|single_blocks_\d+)")


class Flux2Plugin(FamilyPlugin):
    names = ("flux2",)
    title = "FLUX.2"
    options = Flux2JobOptions
    kohya_network_module = "networks.lora_flux_2"  # musubi-tuner's

    def detect_folder(self, path, index):
        # asked before FLUX.1, whose detection claims every Flux* pipeline
        return "flux2" if str(index.get("_class_name", "")).startswith("Flux2") else None

    def detect_single_file(self, keys, metadata):
        # BFL's FLUX.2 layout has global modulation outside the blocks (ComfyUI's test)
        bare = {k.split("diffusion_model.", 1)[-1] for k in keys}
        return "flux2" if "double_stream_modulation_img.lin.weight" in bare else None

    def owns_lora_names(self, names, metadata):
        version = metadata.get("ss_base_model_version", "")
        if version:
            return version.startswith("flux2")
        joined = " ".join(names)
        if _FLUX2_ONLY.search(joined):
            return True
        blocks = any(n.startswith(("lora_unet_double_blocks_", "lora_unet_single_blocks_", "diffusion_model.double_",
                                   "diffusion_model.single_")) for n in names)
        return blocks and not _FLUX1_ONLY.search(joined) and not any(n.startswith("lora_te") for n in names)

    def family_of_version(self, version):
        return "flux2" if version.lower().startswith("flux2") else None

    def lora_block(self, name):
        m = _BLOCK.match(name)
        return m.group(1) if m else None

    generate_file_keys = {"text_encoder": "a Qwen3 file or folder (klein), the Mistral Small 3.1 folder (dev)",
                          "vae": "flux2-vae.safetensors or a diffusers vae/ folder",
                          "qwen3_tokenizer": "folder with Qwen3's tokenizer.json (klein)"}

    def add_generate_arguments(self, parser):
        group = parser.add_argument_group("FLUX.2 (--cfg is klein base's CFG and dev's embedded guidance)")
        group.add_argument("--model-version", choices=_VERSIONS, default=None,
                           help="which FLUX.2 a single file is (klein base and distilled share their weights)")

    def generate_options(self, args):
        value = vars(args).get("model_version")
        return {} if value is None else {"model_version": value}

    def check_files(self, path, options):
        """A folder: no single-file keys, its components' configs, weight index and shared widths; a single
        file: its text_encoder / vae files' headers (all before any weight is read)."""
        from .files import check_component_files, check_folder

        if Path(path).is_dir():
            stray = [k for k in ("text_encoder", "vae", "qwen3_tokenizer", "model_version") if getattr(options, k)]
            if stray:
                raise UserError(f"{', '.join(stray)} apply to a FLUX.2 single file; this diffusers folder has its own",
                                path=path)
            check_folder(Path(path))
        else:
            check_component_files(options)

    def load(self, path, *, family, dtype, allow_pickle, checkpoint, options, prediction_type, clip_skip,
             zero_terminal_snr, mixed_precision="no"):
        from .files import load_flux2

        if prediction_type not in (None, "flow"):
            raise UserError(f"FLUX.2 is a flow-matching model; prediction type {prediction_type!r} does not apply",
                            path=path)
        if clip_skip is not None:
            raise UserError("clip_skip does not apply to FLUX.2 (its text input is fixed hidden layers)", path=path)
        return load_flux2(Path(path), dtype=dtype, checkpoint=checkpoint, options=options,
                          mixed_precision=mixed_precision)


PLUGIN = Flux2Plugin()
