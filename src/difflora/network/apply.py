"""Attach adapter files (any algorithm) to a loaded model, refusing files made for another architecture."""

from __future__ import annotations

import math
import os

from ..errors import UserError
from .adapters import dora_scale_shape, module_shapes
from .files import LoraFile, load_lora
from .lora import LoRANetwork


def check_lora_fits(model, lora: LoraFile) -> None:
    """Raise a UserError naming the file when the LoRA's modules do not fit `model` (after the model's own
    `adapt_lora_file`, which checks the family)."""
    targets = {t.name: t.module for t in model.lora_targets(conv=True)}
    for name, (cls, parts) in lora.modules.items():
        module = targets.get(name)
        if module is None:
            raise UserError(f"module {name} does not exist in this model; the LoRA was made for another architecture",
                            path=lora.path)
        weight = tuple(module.weight.shape)
        need = (weight[0], math.prod(weight[1:]))
        have = cls.flat_shape(module_shapes(parts))
        kernel = cls.kernel(module_shapes(parts))
        if have != need or (kernel is not None and len(weight) == 4 and kernel and kernel != weight[2:]):
            raise UserError(
                f"{cls.title} module {name} makes a {have[0]} out x {have[1]} in delta but the model's layer is "
                f"{'x'.join(map(str, weight))}; the LoRA was made for another architecture",
                path=lora.path,
            )
        d = parts.get("dora_scale")
        if d is not None and tuple(d.shape) not in (dora_scale_shape(weight), (weight[0], *([1] * (len(weight) - 1)))):
            raise UserError(f"{name}.dora_scale has shape {tuple(d.shape)}; this layer needs "
                            f"{dora_scale_shape(weight)} (DoRA magnitude per input channel)", path=lora.path)


def network_from_file(model, lora: LoraFile | str | os.PathLike, multiplier: float = 1.0,
                      attach: bool = True) -> LoRANetwork:
    if not isinstance(lora, LoraFile):
        lora = load_lora(lora)
    lora = model.adapt_lora_file(lora)  # the family's own checks and layouts (FLUX: diffusers names)
    check_lora_fits(model, lora)
    net = LoRANetwork.from_weights(model.lora_targets(conv=True), lora.tensors, source=lora.path)
    net.to(model.device)
    net.set_multiplier(multiplier)
    net.eval()
    if attach:
        net.apply_to()
    return net
