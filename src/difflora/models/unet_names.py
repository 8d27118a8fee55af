"""kohya's LoRA module names of the U-Net families (SD1/SD2: diffusers paths, SDXL: LDM paths) and their CLIP text
encoders, for telling a file's family and blocks apart without a model. Light: imported by the plugins."""

from __future__ import annotations

import re

SD_NAMES = ("lora_te_text_model_", "lora_unet_down_blocks_", "lora_unet_up_blocks_", "lora_unet_mid_block_")
SDXL_NAMES = ("lora_te1_text_model_", "lora_te2_text_model_", "lora_unet_input_blocks_", "lora_unet_output_blocks_",
              "lora_unet_middle_block_")
# kxk convs whose LyCORIS factors flatten the kernel
KXK_SUFFIXES = ("_conv", "_conv1", "_conv2", "_conv_in", "_conv_out", "_in_layers_2", "_out_layers_3", "_op")

_BLOCK = re.compile(r"^lora_(unet|te\d?)_(down_blocks_\d+|mid_block|up_blocks_\d+|input_blocks_\d+|middle_block|"
                    r"output_blocks_\d+|text_model_encoder_layers_\d+)")


def block_of(name: str) -> str | None:
    """'unet:down_blocks_1', 'te:layer_3', ... or None for a module outside the blocks."""
    m = _BLOCK.match(name)
    return f"{m.group(1)}:{m.group(2).replace('text_model_encoder_layers_', 'layer_')}" if m else None
