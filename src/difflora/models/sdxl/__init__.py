"""SDXL base: a diffusers U-Net with CLIP-L and OpenCLIP bigG, micro-conditioned on image geometry
(model.py); original-layout single files."""

from __future__ import annotations

from .. import unet_names
from ..unet_plugin import UNetPlugin


class StableDiffusionXLPlugin(UNetPlugin):
    names = ("sdxl",)
    title = "SDXL"
    # ADDifT: TrainTrain's ADDifT_Action_XL preset (rank 4, alpha 1, lr 2e-4, timesteps 500-1000, m 0.25) at
    # 100 steps (the preset's 30 are with CAME at batch 1); not measured here (no SDXL weights offline), so the
    # toy world's 40 steps at lr 6e-3 and "auto" window are not carried over. Its SD1.5 preset differs only in lr.
    method_defaults = {
        "addift": {"max_train_steps": 100, "learning_rate": 2e-4, "network_dim": 4, "network_alpha": 1.0,
                   "addift": {"min_timestep": 500, "max_timestep": 1000, "multiplier": 0.25}},
    }

    def detect_folder(self, path, index):
        from .model import detect_folder

        return detect_folder(path, index)

    def detect_single_file(self, keys, metadata):
        return "sdxl" if any(k.startswith("conditioner.embedders.") for k in keys) else None

    def check_files(self, path, options):
        from ..folders import check_unet_folder

        check_unet_folder(path, ("text_encoder", "text_encoder_2"))

    def owns_lora_names(self, names, metadata):
        return any(n.startswith(unet_names.SDXL_NAMES) for n in names)

    def family_of_version(self, version):
        return "sdxl" if version.lower().startswith("sdxl") else None


PLUGIN = StableDiffusionXLPlugin()
