"""LoRA / LoCon: ΔW = up @ down (kohya `networks.lora`, LyCORIS `algo=lora|locon`).

Keys `lora_down.weight`, `lora_up.weight`, optional `lora_mid.weight` (Tucker core of a kxk
conv), `alpha`. Shapes: Linear down (r, I), up (O, r); conv down (r, I, kh, kw) with the
conv's stride and padding, up (O, r, 1, 1); with `use_tucker` on a kxk conv, down is
(r, I, 1, 1) and the core `lora_mid` (r, r, kh, kw) carries stride and padding.
ΔW = einsum("i j h w, o i, j c -> o c h w", mid, up, down) with the core.

The forward runs the factors (rank-r activations), not the dense ΔW: cheap on any layer.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import Adapter, AdapterOptions, conv1x1_as_matmul


class LoRA(Adapter):
    algo = "lora"
    title = "LoRA/LoCon"
    keys = ("lora_down.weight", "lora_up.weight", "lora_mid.weight")
    required = ("lora_down.weight", "lora_up.weight")
    low_rank = True
    markers = ("lora_down.weight",)
    weak_markers = ("lora_up.weight",)
    output_rows = ("lora_up.weight",)
    tucker_keys = ("lora_mid.weight",)

    @classmethod
    def traits(cls, shapes):
        return ("tucker",) if "lora_mid.weight" in shapes else ()

    @classmethod
    def plan(cls, org: nn.Module, rank: int, options: AdapterOptions) -> dict[str, tuple[int, ...]]:
        if isinstance(org, nn.Linear):
            return {"lora_down.weight": (rank, org.in_features), "lora_up.weight": (org.out_features, rank)}
        kernel = tuple(org.kernel_size)
        if options.use_tucker and kernel != (1, 1):
            return {"lora_down.weight": (rank, org.in_channels, 1, 1), "lora_mid.weight": (rank, rank, *kernel),
                    "lora_up.weight": (org.out_channels, rank, 1, 1)}
        return {"lora_down.weight": (rank, org.in_channels, *kernel), "lora_up.weight": (org.out_channels, rank, 1, 1)}

    @classmethod
    def from_file_shapes(cls, org: nn.Module, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        # a 1x1-conv file on a Linear (SD2's proj_in) or the reverse: same numbers, the target's layout
        return cls.plan(org, shapes["lora_down.weight"][0], AdapterOptions(use_tucker="lora_mid.weight" in shapes))

    def init_fresh(self) -> None:
        down, up = self.lora_down.weight, self.lora_up.weight
        with torch.no_grad():
            # draws the generator as building nn.Linear/nn.Conv2d factors did, so a seed gives the same LoRA
            nn.init.kaiming_uniform_(down, a=math.sqrt(5))
            if "lora_mid.weight" in self.shapes:
                nn.init.kaiming_uniform_(self.lora_mid.weight, a=math.sqrt(5))
            nn.init.kaiming_uniform_(up, a=math.sqrt(5))
            nn.init.kaiming_uniform_(down, a=math.sqrt(5))
            nn.init.zeros_(up)

    @staticmethod
    def factors(t: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(up (O, r), down (r, I·kh·kw)) with ΔW = up @ down (the Tucker core folded into down)."""
        down, up = t["lora_down.weight"], t["lora_up.weight"]
        rank = down.shape[0]
        up2d = up.reshape(up.shape[0], rank)
        mid = t.get("lora_mid.weight")
        if mid is None:
            return up2d, down.reshape(rank, -1)
        core = torch.einsum("i j h w, j c -> i c h w", mid, down.reshape(rank, -1))
        return up2d, core.reshape(mid.shape[0], -1)

    @staticmethod
    def dense(t: Mapping[str, torch.Tensor]) -> torch.Tensor:
        up, down = LoRA.factors(t)
        return up @ down

    @staticmethod
    def rank_of(shapes):
        return int(shapes["lora_down.weight"][0])

    @classmethod
    def flat_shape(cls, shapes):
        down, up = shapes["lora_down.weight"], shapes["lora_up.weight"]
        kernel = shapes["lora_mid.weight"][2:] if "lora_mid.weight" in shapes else down[2:]
        return int(up[0]), int(down[1] * math.prod(kernel))

    @classmethod
    def kernel(cls, shapes):
        k = tuple(shapes["lora_mid.weight"][2:]) if "lora_mid.weight" in shapes else tuple(shapes["lora_down.weight"][2:])
        return () if k in ((), (1, 1)) else k

    @classmethod
    def weight_shape(cls, shapes):
        down = shapes["lora_down.weight"]
        out_dim, in_flat = cls.flat_shape(shapes)
        if len(down) == 2:
            return out_dim, in_flat
        kernel = tuple(shapes["lora_mid.weight"][2:]) if "lora_mid.weight" in shapes else tuple(down[2:])
        return (out_dim, down[1], *kernel)  # a 4-D down is a conv, 1x1 included

    @classmethod
    def check_shapes(cls, name, shapes):
        down, up, mid = shapes["lora_down.weight"], shapes["lora_up.weight"], shapes.get("lora_mid.weight")
        if len(down) not in (2, 4) or len(up) != len(down) or up[1] != down[0] or tuple(up[2:]) not in ((), (1, 1)):
            return f"inconsistent shapes: lora_down {tuple(down)}, lora_up {tuple(up)}"
        if mid is not None and (len(mid) != 4 or tuple(mid[:2]) != (down[0], down[0]) or tuple(down[2:]) != (1, 1)):
            return f"lora_mid {tuple(mid)} does not fit lora_down {tuple(down)} (Tucker core (r, r, kh, kw))"
        return None

    def options(self):
        return {"tucker": "lora_mid.weight" in self.shapes}

    # ---- the factored forward (no dense ΔW)
    def delta(self, x: torch.Tensor, multiplier: float | torch.Tensor = 1.0) -> torch.Tensor:
        if self.dora_scale is not None:
            return super().delta(x, multiplier)
        org = self.org_module
        down = self.lora_down.weight
        x = x.to(down.dtype)
        if isinstance(org, nn.Linear):
            h = F.linear(x, down)
        elif "lora_mid.weight" in self.shapes:
            h = F.conv2d(conv1x1_as_matmul(down, x), self.lora_mid.weight, None, org.stride, org.padding, org.dilation)
        elif down.shape[2:] == (1, 1) and org.stride == (1, 1) and org.padding == (0, 0) and org.dilation == (1, 1):
            h = conv1x1_as_matmul(down, x)
        else:
            h = F.conv2d(x, down, None, org.stride, org.padding, org.dilation)
        if self.training and self.dropout:
            h = F.dropout(h, p=self.dropout)
        scale = self.scale
        if self.training and self.rank_dropout:
            keep = (torch.rand(h.shape[0], self.rank, device=h.device) > self.rank_dropout).to(h.dtype)
            # [B, r] broadcast over tokens (B, T, r) or space (B, r, H, W)
            keep = keep.view(h.shape[0], 1, self.rank) if h.dim() == 3 else keep.view(*keep.shape, *([1] * (h.dim() - 2)))
            h = h * keep
            scale = scale / (1.0 - self.rank_dropout)
        if isinstance(multiplier, torch.Tensor):
            self._check_batch(multiplier, h.shape[0])
            # the per-sample multiplier on the rank-r activation, where tensors are small
            h = h * multiplier.to(h.device, h.dtype).view(-1, *([1] * (h.dim() - 1)))
            coeff = scale
        else:
            coeff = multiplier * scale
        up = self.lora_up.weight * coeff
        if isinstance(org, nn.Linear):
            return F.linear(h, up)
        return conv1x1_as_matmul(up, h)
