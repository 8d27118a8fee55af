"""FLUX.1-dev, FLUX.1-schnell and FLUX.1 Kontext [dev]: model.py (the family), transformer.py (BFL-layout model, equal to
diffusers'), convert.py (BFL <-> diffusers keys), files.py (folders, BFL + clip_l/t5xxl/ae files),
lora.py (kohya <-> diffusers LoRA names), options.py (job keys)."""

from __future__ import annotations

import re

from ..plugin import FamilyPlugin
from .options import FluxJobOptions

# generate's flags for single-file transformers (kohya's names); each is the option-table key of its dest
_FILE_FLAGS = (("--clip-l", "CLIP-L text encoder file (clip_l.safetensors)"),
               ("--t5xxl", "T5-XXL encoder file (t5xxl_fp16.safetensors)"),
               ("--ae", "FLUX autoencoder file (ae.safetensors)"),
               ("--t5xxl-tokenizer", "folder with T5's tokenizer.json or spiece.model"))

_KOHYA_NAMES = ("lora_unet_double_blocks_", "lora_unet_single_blocks_", "lora_te3_")
_BLOCK = re.compile(r"^lora_(unet|te\d)_(double_blocks_\d+|single_blocks_\d+|text_model_encoder_layers_\d+|encoder_block_\d+)")


_TYPE_DIMS = ("img_attn_dim", "txt_attn_dim", "img_mlp_dim", "txt_mlp_dim", "img_mod_dim", "txt_mod_dim", "single_dim",
              "single_mod_dim")


class FluxPlugin(FamilyPlugin):
    names = ("flux",)
    title = "FLUX.1"
    options = FluxJobOptions
    model_variants = {"kontext": "FLUX.1 Kontext [dev], whose single file has FLUX.1-dev's keys"}
    kohya_network_module = "networks.lora_flux"
    kohya_network_args = ("train_blocks", "train_t5xxl", "in_dims")
    refused_network_args = {
        "split_qkv": "difflora trains FLUX's fused qkv as one module (exact in every client; sd-scripts' split_qkv "
                     "files load at 1/3 strength elsewhere)",
        **dict.fromkeys(_TYPE_DIMS, "per-module-type ranks are not supported: every module trains at network_dim"),
        **dict.fromkeys(("train_double_block_indices", "train_single_block_indices"),
                        "blocks are chosen with train_blocks or network_only_if_contains / network_ignore_if_contains"),
        **dict.fromkeys(("ggpo_sigma", "ggpo_beta"), "GGPO's weight perturbation is not supported"),
        **dict.fromkeys(("network_reg_lrs", "network_reg_dims"),
                        "per-module learning rates and ranks by regular expression are not supported"),
    }

    def detect_folder(self, path, index):
        # Kontext folders too; FLUX.2 / Fill folders: the loader then says what is supported
        return "flux" if str(index.get("_class_name", "")).startswith("Flux") else None

    def detect_single_file(self, keys, metadata):
        bare = {k.split("diffusion_model.", 1)[-1] for k in keys}
        if any(k.startswith(("double_blocks.", "single_blocks.", "double_stream_modulation")) for k in bare):
            return "flux"
        return None

    def owns_lora_names(self, names, metadata):
        # kohya's names, or diffusers' / ai-toolkit's transformer paths as network/files.py reads them
        return any(n.startswith(_KOHYA_NAMES) or "transformer_blocks_" in n for n in names)

    def family_of_version(self, version):
        return "flux" if version.lower().startswith("flux1") else None

    def lora_block(self, name):
        m = _BLOCK.match(name)
        return f"{m.group(1)}:{m.group(2).replace('text_model_encoder_layers_', 'layer_')}" if m else None

    def add_generate_arguments(self, parser):
        group = parser.add_argument_group("FLUX.1 (single-file transformers: kohya's names)")
        for flag, text in _FILE_FLAGS:
            group.add_argument(flag, default=None, help=text)
        group.add_argument("--guidance-scale", type=float, default=None,
                           help="FLUX.1-dev's embedded guidance (default 3.5)")

    def generate_options(self, args):
        keys = [flag[2:].replace("-", "_") for flag, _ in _FILE_FLAGS] + ["guidance_scale"]
        given = vars(args)
        return {k: given[k] for k in keys if given.get(k) is not None}

    def check_files(self, path, options):
        """A folder's transformer / VAE / text-encoder configs; a single file's component files (clip_l, t5xxl, ae)."""
        from ...fileio import read_safetensors_header
        from ..folders import CHANNEL_LISTS, VAE_INTS, check_config

        if path.is_dir():
            check_config(path / "transformer" / "config.json",
                         ("in_channels", "num_layers", "num_single_layers", "attention_head_dim", "num_attention_heads",
                          "joint_attention_dim", "pooled_projection_dim", "patch_size"), bools=("guidance_embeds",))
            check_config(path / "vae" / "config.json", VAE_INTS, CHANNEL_LISTS)
            check_config(path / "text_encoder" / "config.json", ("hidden_size", "num_hidden_layers"))
            check_config(path / "text_encoder_2" / "config.json", ("d_model", "num_layers", "num_heads", "d_ff"))
            return
        for key in ("clip_l", "t5xxl", "ae"):
            component = getattr(options, key)
            if component is not None:
                read_safetensors_header(component)  # there, a file, a sane header: before the transformer is read

    def load(self, path, *, family, dtype, allow_pickle, checkpoint, options, prediction_type, clip_skip,
             zero_terminal_snr, mixed_precision="no"):
        from .model import load

        return load(path, dtype=dtype, checkpoint=checkpoint, options=options, prediction_type=prediction_type,
                    mixed_precision=mixed_precision)


PLUGIN = FluxPlugin()
