"""Z-Image (Tongyi-MAI's 6B single-stream DiT, Turbo and Base): the family's plug-in.

Light on purpose (the job schema is built from it): torch-heavy modules load in `load`. Package:
transformer.py (diffusers' class with ComfyUI's fused qkv, both weight layouts), model.py (the family),
files.py (folders and ComfyUI's files), lora.py (LoRA names), options.py (job keys), tiny.py (tests, benches).
"""

from __future__ import annotations

import re
from pathlib import Path

from ...errors import UserError
from ..plugin import FamilyPlugin
from .options import ZImageJobOptions

_BLOCK = re.compile(r"^lora_unet_(layers|noise_refiner|context_refiner)_(\d+)_")


class ZImagePlugin(FamilyPlugin):
    names = ("zimage",)
    title = "Z-Image (Turbo, Base)"
    options = ZImageJobOptions
    kohya_network_module = "networks.lora_zimage"  # musubi-tuner's
    # ADDifT: TrainTrain (hako-mikan/sd-webui-traintrain 7b58929, "fix zimage") has no Z-Image preset; its
    # Z-Image path trains only modules named "layers" (difflora's default set), turns the SNR weighting off and
    # is used with the Action_XL preset's values: rank 4, alpha 1, lr 2e-4, timesteps 500-1000, multiplier
    # 0.25. 100 steps as on SDXL (the preset's 30 are with CAME at batch 1). Not measured on Z-Image weights.
    method_defaults = {
        "addift": {"max_train_steps": 100, "learning_rate": 2e-4, "network_dim": 4, "network_alpha": 1.0,
                   "addift": {"min_timestep": 500, "max_timestep": 1000, "multiplier": 0.25}},
    }

    def detect_folder(self, path, index):
        cls = str(index.get("_class_name", ""))
        if not cls.startswith("ZImage"):
            return None
        if "Omni" in cls or "ControlNet" in cls:
            raise UserError(f"this is a {cls} folder; difflora trains Z-Image Turbo and Base (ZImagePipeline)",
                            path=path)
        return "zimage"

    def detect_single_file(self, keys, metadata):
        bare = {k.split("diffusion_model.", 1)[-1] for k in keys}
        if not {"cap_pad_token", "x_pad_token", "noise_refiner.0.feed_forward.w1.weight"} <= bare:
            return None
        if "siglip_embedder.0.weight" in bare:
            raise UserError("this is a Z-Image Omni transformer (siglip_embedder), which difflora does not train; "
                            "use Z-Image Turbo or Base")
        return "zimage"

    def owns_lora_names(self, names, metadata):
        from .lora import looks_like_zimage

        if metadata.get("ss_base_model_version"):
            return metadata["ss_base_model_version"] == "zimage"
        return looks_like_zimage(sorted({n.split(".lora_")[0].split(".alpha")[0] for n in names}))

    def family_of_version(self, version):
        return "zimage" if version == "zimage" else None

    def lora_block(self, name):
        m = _BLOCK.match(name)
        return f"{m[1]}_{m[2]}" if m else None

    generate_file_keys = {"text_encoder": "Qwen3-4B file (qwen_3_4b.safetensors)",
                          "vae": "FLUX.1 autoencoder file (ae.safetensors)",
                          "qwen3_tokenizer": "folder with Qwen3's tokenizer.json"}

    def add_generate_arguments(self, parser):
        group = parser.add_argument_group("Z-Image (musubi's names; --cfg is Base's guidance, Turbo runs without CFG)")
        group.add_argument("--zimage-variant", choices=["turbo", "base"], default=None,
                           help="Z-Image Turbo or Base (the weights cannot tell)")

    def generate_options(self, args):
        value = vars(args).get("zimage_variant")
        return {} if value is None else {"zimage_variant": value}

    def check_files(self, path, options):
        from .files import check_folder

        if Path(path).is_dir():
            stray = [k for k in ("text_encoder", "vae", "qwen3_tokenizer") if getattr(options, k)]
            if stray:
                raise UserError(f"{', '.join(stray)} name files for a single-file transformer; a diffusers folder "
                                "has its own", path=path)
            check_folder(Path(path))

    def load(self, path, *, family, dtype, allow_pickle, checkpoint, options, prediction_type, clip_skip,
             zero_terminal_snr, mixed_precision="no"):
        from .files import load_zimage

        if prediction_type not in (None, "flow"):
            raise UserError(f"Z-Image is a flow-matching model; prediction type {prediction_type!r} does not apply",
                            path=path)
        if clip_skip is not None:
            raise UserError("clip_skip does not apply to Z-Image (its Qwen3 text encoder is read at the "
                            "second-to-last layer, as the pipeline does)", path=path)
        if options.guidance_scale != ZImageJobOptions.model_fields["guidance_scale"].default:
            raise UserError("guidance_scale is FLUX.1-dev's embedded guidance; Z-Image has none (Base's CFG is "
                            "generate's --cfg and the sample prompts' --l)", path=path)
        return load_zimage(Path(path), dtype=dtype, checkpoint=checkpoint, options=options,
                           mixed_precision=mixed_precision)


PLUGIN = ZImagePlugin()
