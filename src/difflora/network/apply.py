"""Attach LoRA files to a loaded model, refusing files made for another architecture."""

from __future__ import annotations

import os

import torch.nn as nn

from ..errors import UserError
from .files import LoraFile, load_lora
from .lora import LoRANetwork


def family_of(version: str) -> str:
    """The model family (sd1, sd2, sdxl, ...) of a kohya ss_base_model_version."""
    v = version.lower()
    return "sdxl" if v.startswith("sdxl") else "sd2" if v.startswith("sd_v2") else "sd1" if v.startswith("sd_v1") else v


def check_lora_fits(model, lora: LoraFile) -> None:
    """Raise a UserError naming the file when the LoRA cannot belong to `model`."""
    version = lora.metadata.get("ss_base_model_version")
    if version and family_of(version) in ("sd1", "sd2", "sdxl") and family_of(version) != family_of(model.base_model_version):
        raise UserError(
            f"LoRA was trained for {version} (ss_base_model_version) but the model is {model.base_model_version}",
            path=lora.path,
        )
    targets = {t.name: t.module for t in model.lora_targets(conv=True)}
    for name in lora.module_names():
        module = targets.get(name)
        if module is None:
            raise UserError(f"module {name} does not exist in this model; the LoRA was made for another architecture",
                            path=lora.path)
        down = lora.tensors[f"{name}.lora_down.weight"]
        up = lora.tensors[f"{name}.lora_up.weight"]
        if isinstance(module, nn.Linear):
            need_in, need_out = module.in_features, module.out_features
            have_in = down.shape[1] if down.dim() == 2 or down.shape[2:] == (1, 1) else None
        else:
            need_in, need_out = module.in_channels, module.out_channels
            have_in = down.shape[1]
            if down.dim() == 4 and tuple(down.shape[2:]) != tuple(module.kernel_size):
                have_in = None
        if have_in != need_in or up.shape[0] != need_out:
            raise UserError(
                f"module {name} has shape down {tuple(down.shape)} / up {tuple(up.shape)} but the model needs "
                f"{need_in} in / {need_out} out; the LoRA was made for another architecture",
                path=lora.path,
            )


def network_from_file(model, lora: LoraFile | str | os.PathLike, multiplier: float = 1.0,
                      attach: bool = True) -> LoRANetwork:
    if not isinstance(lora, LoraFile):
        lora = load_lora(lora)
    check_lora_fits(model, lora)
    net = LoRANetwork.from_weights(model.lora_targets(conv=True), lora.tensors, source=lora.path)
    net.to(model.device)
    net.set_multiplier(multiplier)
    net.eval()
    if attach:
        net.apply_to()
    return net
