"""Stable Diffusion 1.x / 2.x: a diffusers U-Net with one CLIP text encoder (model.py), original-layout
single files through the shared ldm.py."""

from __future__ import annotations

from .. import unet_names
from ..unet_plugin import UNetPlugin


class StableDiffusionPlugin(UNetPlugin):
    names = ("sd1", "sd2")
    title = "Stable Diffusion 1.x / 2.x"

    def detect_folder(self, path, index):
        from .model import detect_folder

        return detect_folder(path, index)

    def detect_single_file(self, keys, metadata):
        from ..ldm import detect_checkpoint

        return detect_checkpoint(keys)

    def check_files(self, path, options):
        from ..folders import check_unet_folder

        check_unet_folder(path, ("text_encoder",))

    def owns_lora_names(self, names, metadata):
        return any(n.startswith(unet_names.SD_NAMES) for n in names)

    def family_of_version(self, version):
        v = version.lower()  # the toy world's "difflora_toy_v1" LoRAs are told apart by their module names
        return "sd1" if v.startswith("sd_v1") else "sd2" if v.startswith("sd_v2") else None


PLUGIN = StableDiffusionPlugin()
