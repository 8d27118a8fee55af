"""The plugin hooks SD1/SD2 and SDXL share: kohya's U-Net block names, their kxk convs, and loading through the
family package's own model.py `load`. Light, as plugins must be (the model code is imported on load only)."""

from __future__ import annotations

import importlib

from . import unet_names
from .plugin import FamilyPlugin


class UNetPlugin(FamilyPlugin):
    def lora_block(self, name):
        return unet_names.block_of(name)

    def is_kxk_conv(self, name):
        return name.endswith(unet_names.KXK_SUFFIXES)

    def load(self, path, *, family, dtype, allow_pickle, checkpoint, options, prediction_type, clip_skip,
             zero_terminal_snr, mixed_precision="no"):
        model = importlib.import_module(".model", type(self).__module__)  # the subclass's package: sd or sdxl
        return model.load(path, family=family, dtype=dtype, allow_pickle=allow_pickle, prediction_type=prediction_type,
                          clip_skip=clip_skip, checkpoint=checkpoint, zero_terminal_snr=zero_terminal_snr)
