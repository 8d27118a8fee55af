"""The LoRA network, with kohya sd-scripts' maths.

Each `LoRAModule` adds `up(down(x)) * multiplier * alpha/rank` to the output of one frozen
Linear or Conv2d, through a forward hook, so the base model's weights and state-dict keys
are never touched. For a 3x3 conv, `down` carries the kernel, stride and padding and `up` is
1x1 (LoCon), exactly as kohya and peft build them.

The multiplier is either a float or a tensor with one value per sample of the batch: the
difference methods run +m and -m in one forward pass. The state dict of a `LoRANetwork` is
the kohya file layout: `<lora_name>.lora_down.weight`, `<lora_name>.lora_up.weight`,
`<lora_name>.alpha`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError


@dataclass
class LoRATarget:
    """A module a LoRA can attach to, with its kohya name."""

    name: str  # e.g. lora_unet_down_blocks_0_attentions_0_proj_in
    module: nn.Module  # nn.Linear or nn.Conv2d
    component: str  # "unet", "text_encoder", ...

    @property
    def is_conv_kxk(self) -> bool:
        """A conv with a kernel larger than 1x1: sized by conv_dim/conv_alpha, as in kohya."""
        return isinstance(self.module, nn.Conv2d) and tuple(self.module.kernel_size) != (1, 1)


class LoRAModule(nn.Module):
    def __init__(self, name: str, org: nn.Module, rank: int, alpha: float | None,
                 dropout: float | None = None, rank_dropout: float | None = None,
                 module_dropout: float | None = None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"{name}: rank must be >= 1, got {rank}")
        self.lora_name = name
        if isinstance(org, nn.Conv2d):
            self.lora_down = nn.Conv2d(org.in_channels, rank, org.kernel_size, org.stride, org.padding, bias=False)
            self.lora_up = nn.Conv2d(rank, org.out_channels, 1, 1, bias=False)
        elif isinstance(org, nn.Linear):
            self.lora_down = nn.Linear(org.in_features, rank, bias=False)
            self.lora_up = nn.Linear(rank, org.out_features, bias=False)
        else:
            raise TypeError(f"{name}: LoRA needs a Linear or Conv2d, got {type(org).__name__}")
        if alpha is None or float(alpha) == 0.0:
            alpha = rank  # kohya: no alpha means no scaling
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self.rank = rank
        self.scale = float(alpha) / rank
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        d = self.lora_down
        self._down_is_1x1 = isinstance(d, nn.Conv2d) and d.kernel_size == (1, 1) and d.stride == (1, 1) \
            and d.padding == (0, 0) and d.dilation == (1, 1) and d.groups == 1
        self.multiplier: float | torch.Tensor = 1.0
        self.enabled = True
        self._org = [org]  # a list, so the frozen module is not registered as a child
        self._hook = None

    @property
    def org_module(self) -> nn.Module:
        return self._org[0]

    def attach(self) -> None:
        if self._hook is None:
            self._hook = self.org_module.register_forward_hook(self._forward_hook)

    def detach(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def set_rank_scale_from_alpha(self) -> None:
        self.scale = float(self.alpha) / self.rank

    def _forward_hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        m = self.multiplier
        if not self.enabled or (not isinstance(m, torch.Tensor) and m == 0.0):
            return output
        if self.training and self.module_dropout and torch.rand(()) < self.module_dropout:
            return output
        # In place: the frozen layer's backward never needs its own output, and a full-size
        # temporary per LoRA layer is the largest cost of the branch on CPU.
        return output.add_(self.delta(inputs[0], m).to(output.dtype))

    def delta(self, x: torch.Tensor, multiplier: float | torch.Tensor = 1.0) -> torch.Tensor:
        """The LoRA branch's contribution for input x (the value added to the frozen output).

        Scales are applied where tensors are small: a per-sample multiplier on the rank-r
        activation, a scalar folded into the (out x r) up weight.
        """
        w = self.lora_down.weight
        if self._down_is_1x1:
            h = conv1x1_as_matmul(w, x.to(w.dtype))
        else:
            h = self.lora_down(x.to(w.dtype))
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
            if multiplier.numel() != h.shape[0]:
                raise RuntimeError(
                    f"{self.lora_name}: per-sample multiplier has {multiplier.numel()} values but the batch has "
                    f"{h.shape[0]} samples"
                )
            h = h * multiplier.to(h.device, h.dtype).view(-1, *([1] * (h.dim() - 1)))
            coeff = scale
        else:
            coeff = multiplier * scale
        up = self.lora_up.weight * coeff
        if isinstance(self.lora_up, nn.Conv2d):
            return conv1x1_as_matmul(up, h)
        return F.linear(h, up)

    def weight_delta(self) -> torch.Tensor:
        """Dense ΔW = scale · up @ down in the shape of the frozen weight (multiplier not applied)."""
        return lora_weight_delta(self.lora_up.weight, self.lora_down.weight, self.scale,
                                 tuple(self.org_module.weight.shape))


def conv1x1_as_matmul(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A bias-free 1x1 convolution (weight (O, C, 1, 1), x (B, C, H, W)) as one batched matmul.

    LoRA's 1x1 convs are thin (r channels on one side); on CPU a convolution call costs about
    twice a matmul for them (per-layer micro-benchmark in bench/README.md).
    """
    b, c, hgt, wid = x.shape
    out = torch.matmul(weight.reshape(weight.shape[0], c), x.reshape(b, c, hgt * wid))
    return out.view(b, weight.shape[0], hgt, wid)


def lora_weight_delta(up: torch.Tensor, down: torch.Tensor, scale: float,
                      weight_shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """ΔW = scale · up @ down for Linear, 1x1 and kxk conv factors (kohya's formula)."""
    out_dim, rank = up.shape[0], up.shape[1]
    d = (up.reshape(out_dim, rank).float() @ down.reshape(rank, -1).float()) * scale
    if down.dim() == 4:
        d = d.reshape(out_dim, down.shape[1], down.shape[2], down.shape[3])
    if weight_shape is not None:
        d = d.reshape(weight_shape)
    return d


@dataclass
class NetworkSpec:
    """How to size a network; kohya's names and defaults."""

    network_dim: int = 4
    network_alpha: float = 1.0
    conv_dim: int | None = None
    conv_alpha: float | None = None
    dropout: float | None = None
    rank_dropout: float | None = None
    module_dropout: float | None = None
    train_unet: bool = True
    train_text_encoder: bool = True
    only_if_contains: tuple[str, ...] = ()  # e.g. ("attn2_",): cross-attention only (TrainTrain's network_element)
    ignore_if_contains: tuple[str, ...] = ()


class LoRANetwork(nn.Module):
    """A set of LoRA modules attached to a model; its state dict is the kohya file layout."""

    def __init__(self, loras: Iterable[LoRAModule]):
        super().__init__()
        self.names: list[str] = []
        self.components: dict[str, str] = {}
        for lora in loras:
            if lora.lora_name in self.names:
                raise ValueError(f"duplicate LoRA module name {lora.lora_name}")
            self.add_module(lora.lora_name, lora)
            self.names.append(lora.lora_name)
        self._fused: dict[str, torch.Tensor] | None = None

    # ---- construction
    @classmethod
    def create(cls, targets: list[LoRATarget], spec: NetworkSpec) -> "LoRANetwork":
        loras = []
        conv_alpha = spec.conv_alpha if spec.conv_alpha is not None else 1.0  # kohya's default
        for t in targets:
            if spec.only_if_contains and not any(s in t.name for s in spec.only_if_contains):
                continue
            if any(s in t.name for s in spec.ignore_if_contains):
                continue
            if t.component == "unet" and not spec.train_unet:
                continue
            if t.component != "unet" and not spec.train_text_encoder:
                continue
            if t.is_conv_kxk:
                if not spec.conv_dim:
                    continue
                rank, alpha = spec.conv_dim, conv_alpha
            else:
                rank, alpha = spec.network_dim, spec.network_alpha
            lora = LoRAModule(t.name, t.module, rank, alpha, spec.dropout, spec.rank_dropout, spec.module_dropout)
            lora.component = t.component
            loras.append(lora)
        if not loras:
            raise UserError("no LoRA modules match the network settings (check network_only_if_contains / "
                            "network_ignore_if_contains and the train_unet / train_text_encoder switches)")
        net = cls(loras)
        for lora in loras:
            net.components[lora.lora_name] = lora.component
        return net

    @classmethod
    def from_weights(cls, targets: list[LoRATarget], tensors: dict[str, torch.Tensor],
                     source: str = "LoRA file") -> "LoRANetwork":
        """Build a network whose modules, ranks and alphas are those of a kohya state dict."""
        by_name = {t.name: t for t in targets}
        names = sorted({k.split(".", 1)[0] for k in tensors if k.endswith("lora_down.weight")})
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise UserError(
                f"{len(unknown)} LoRA module(s) do not exist in this model, e.g. {unknown[0]}; "
                "the LoRA was made for another architecture",
                path=source,
            )
        loras = []
        for n in names:
            down = tensors[f"{n}.lora_down.weight"]
            up = tensors.get(f"{n}.lora_up.weight")
            if up is None:
                raise UserError(f"module {n} has lora_down but no lora_up", path=source)
            rank = down.shape[0]
            alpha_t = tensors.get(f"{n}.alpha")
            alpha = float(alpha_t) if alpha_t is not None else float(rank)
            lora = LoRAModule(n, by_name[n].module, rank, alpha)
            lora.component = by_name[n].component
            loras.append(lora)
        net = cls(loras)
        for lora in loras:
            net.components[lora.lora_name] = lora.component
        net.load_weights(tensors, source=source)
        return net

    def load_weights(self, tensors: dict[str, torch.Tensor], source: str = "LoRA file", strict: bool = True) -> None:
        """Copy kohya-layout tensors into this network, reshaping 1x1-conv factors for Linear targets."""
        own = self.state_dict()
        missing = [k for k in own if k not in tensors and not k.endswith(".alpha")]
        unexpected = [k for k in tensors if k not in own]
        if strict and unexpected:
            raise UserError(f"{len(unexpected)} key(s) do not belong to this network, e.g. {unexpected[0]}", path=source)
        if strict and missing:
            raise UserError(f"{len(missing)} key(s) are missing, e.g. {missing[0]}", path=source)
        with torch.no_grad():
            for k, v in tensors.items():
                if k not in own:
                    continue
                target = own[k]
                if v.numel() != target.numel():
                    raise UserError(f"{k} has shape {tuple(v.shape)}, this model needs {tuple(target.shape)}", path=source)
                if not torch.isfinite(v).all():
                    raise UserError(f"{k} contains NaN or Inf values", path=source)
                target.copy_(v.reshape(target.shape).to(target.dtype))
        for lora in self.loras():
            if float(lora.alpha) == 0.0:
                lora.alpha.fill_(lora.rank)  # kohya: alpha 0 means no scaling
            lora.set_rank_scale_from_alpha()

    # ---- use
    def loras(self) -> list[LoRAModule]:
        return [getattr(self, n) for n in self.names]

    def apply_to(self) -> "LoRANetwork":
        for lora in self.loras():
            lora.attach()
        return self

    def remove(self) -> None:
        for lora in self.loras():
            lora.detach()

    def set_multiplier(self, multiplier: float | torch.Tensor, component: str | None = None) -> None:
        """Set the strength: a float, or one value per sample of the next batches.

        `component` limits it to one part ("unet", "text_encoder"): with classifier-free
        guidance the U-Net sees twice the text encoder's batch.
        """
        for lora in self.loras():
            if component is None or self.components.get(lora.lora_name) == component:
                lora.multiplier = multiplier

    def set_enabled(self, enabled: bool) -> None:
        for lora in self.loras():
            lora.enabled = enabled

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        groups: dict[str, list[nn.Parameter]] = {}
        for lora in self.loras():
            groups.setdefault(self.components.get(lora.lora_name, "unet"), []).extend(lora.parameters())
        return groups

    # ---- fuse into the base weights (presets)
    @torch.no_grad()
    def fuse(self, multiplier: float = 1.0) -> None:
        """Add multiplier·ΔW to each frozen weight; `unfuse` restores the saved originals exactly."""
        if self._fused is not None:
            raise RuntimeError("network is already fused")
        self._fused = {}
        for lora in self.loras():
            w = lora.org_module.weight
            self._fused[lora.lora_name] = w.detach().clone()
            w.add_((multiplier * lora.weight_delta()).to(w.dtype))
            lora.detach()

    @torch.no_grad()
    def unfuse(self) -> None:
        if self._fused is None:
            return
        for lora in self.loras():
            lora.org_module.weight.copy_(self._fused[lora.lora_name])
        self._fused = None

    def kohya_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        sd = {k: v.detach().to("cpu", copy=True) for k, v in self.state_dict().items()}
        if dtype is not None:
            sd = {k: v.to(dtype) for k, v in sd.items()}
        return sd
