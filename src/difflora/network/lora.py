"""The adapter network: one adapter module (LoRA/LoCon, LoHa, LoKr, optionally DoRA) per target.

The modules come from the registry in `adapters/` (the job's algorithm, or a file's keys);
each adds `multiplier · ΔW_eff · x` to one frozen Linear or Conv2d through a forward hook. The
multiplier is a float or one value per sample of the batch (the difference methods run +m and
-m in one pass). The state dict of a `LoRANetwork` is the file layout (kohya's for LoRA,
LyCORIS' for the others): `<lora_name>.lora_down.weight`, `<lora_name>.hada_w1_a`, ...,
`<lora_name>.alpha`, `<lora_name>.dora_scale`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.nn as nn

from ..errors import UserError
from .adapters import Adapter, AdapterOptions, adapter_class, group_modules, module_shapes, split_key


@dataclass
class LoRATarget:
    """A module a LoRA can attach to, with its kohya name."""

    name: str  # e.g. lora_unet_down_blocks_0_attentions_0_proj_in
    module: nn.Module  # nn.Linear or nn.Conv2d
    component: str  # "unet", "text_encoder", ...
    rank: int | None = None  # a family's own rank for this module (kohya FLUX in_dims), else network_dim

    @property
    def is_conv_kxk(self) -> bool:
        """A conv with a kernel larger than 1x1: sized by conv_dim/conv_alpha, as in kohya."""
        return isinstance(self.module, nn.Conv2d) and tuple(self.module.kernel_size) != (1, 1)


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
    adapter: AdapterOptions = field(default_factory=AdapterOptions)  # algorithm and its options


class LoRANetwork(nn.Module):
    """A set of adapter modules attached to a model; its state dict is the file layout."""

    def __init__(self, loras: Iterable[Adapter]):
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
        adapter = adapter_class(spec.adapter.algo)
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
                rank, alpha = t.rank or spec.network_dim, spec.network_alpha
            lora = adapter.new(t.name, t.module, rank, alpha, spec.adapter, spec.dropout, spec.rank_dropout,
                           spec.module_dropout)
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
        """Build a network whose modules (algorithm, shapes, alpha) are those of a file's tensors."""
        by_name = {t.name: t for t in targets}
        modules = group_modules(tensors, source)
        unknown = [n for n in modules if n not in by_name]
        if unknown:
            raise UserError(
                f"{len(unknown)} LoRA module(s) do not exist in this model, e.g. {unknown[0]}; "
                "the LoRA was made for another architecture",
                path=source,
            )
        loras = []
        for n, (adapter, parts) in modules.items():
            org = by_name[n].module
            alpha = parts.get("alpha")
            dora = tuple(parts["dora_scale"].shape) if "dora_scale" in parts else None  # the file's axis
            lora = adapter(n, org, adapter.from_file_shapes(org, module_shapes(parts)),
                           float(alpha) if alpha is not None else None, dora)
            lora.component = by_name[n].component
            loras.append(lora)
        net = cls(loras)
        for lora in loras:
            net.components[lora.lora_name] = lora.component
        net.load_weights(tensors, source=source)
        return net

    def load_weights(self, tensors: dict[str, torch.Tensor], source: str = "LoRA file", strict: bool = True) -> None:
        """Copy file-layout tensors into this network, reshaping 1x1-conv factors for Linear targets."""
        own = self.state_dict()
        missing = [k for k in own if k not in tensors and not k.endswith(".alpha")]
        unexpected = [k for k in tensors if k not in own]
        if strict and unexpected:
            raise UserError(f"{len(unexpected)} key(s) do not belong to this network, e.g. {unexpected[0]}", path=source)
        if strict and missing:
            raise UserError(f"{len(missing)} key(s) are missing, e.g. {missing[0]}", path=source)
        algos = "/".join(sorted({lora.title for lora in self.loras()}))
        own_modules = {split_key(k)[0] for k in own}
        foreign = next((k for k in unexpected if split_key(k)[0] in own_modules), None)
        if foreign is not None:  # a module of this network stored by another algorithm: its weights would be dropped
            raise UserError(f"module {split_key(foreign)[0]} is stored as another adapter algorithm "
                            f"({split_key(foreign)[1]}) than this job's {algos} network; set network_algo "
                            "(or network_module / network_args) to the file's algorithm", path=source)
        if not any(k in own for k in tensors if not k.endswith(".alpha")):  # an alpha alone is no weight
            raise UserError(f"none of the file's keys belong to this {algos} network (another adapter "
                            "algorithm or another architecture?)", path=source)
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
            lora.set_rank_scale_from_alpha()

    # ---- use
    def loras(self) -> list[Adapter]:
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

    def parameter_groups(self) -> dict[str, dict[str, nn.Parameter]]:
        """Trainable parameters by component ("unet", "text_encoder"), under their kohya names."""
        groups: dict[str, dict[str, nn.Parameter]] = {}
        for lora in self.loras():
            group = groups.setdefault(self.components.get(lora.lora_name, "unet"), {})
            group.update({f"{lora.lora_name}.{n}": p for n, p in lora.named_parameters()})
        return groups

    # ---- fuse into the base weights (presets)
    @torch.no_grad()
    def fuse(self, multiplier: float = 1.0) -> None:
        """Add multiplier·ΔW_eff to each frozen weight; `unfuse` restores the saved originals exactly."""
        if self._fused is not None:
            raise RuntimeError("network is already fused")
        self._fused = {}
        for lora in self.loras():
            w = lora.org_module.weight
            self._fused[lora.lora_name] = w.detach().clone()
            w.add_((multiplier * lora.effective_delta()).to(w.device, w.dtype))  # text encoders may sit on the CPU
            lora.detach()

    @torch.no_grad()
    def unfuse(self) -> None:
        if self._fused is None:
            return
        for lora in self.loras():
            lora.org_module.weight.copy_(self._fused[lora.lora_name])
        self._fused = None

    def drop_components(self, components) -> bool:
        """Forget the modules on these components (text encoders a model freed), with the fused originals they
        keep: nothing here holds the freed layers. True when any module was dropped."""
        gone = [n for n in self.names if self.components.get(n) in set(components)]
        for n in gone:
            delattr(self, n)
            self.names.remove(n)
            self.components.pop(n, None)
            if self._fused is not None:
                self._fused.pop(n, None)
        return bool(gone)

    def base_weights(self) -> dict[str, torch.Tensor]:
        """The frozen weight under each module (DoRA's delta and LyCORIS conv layouts need them)."""
        return {lora.lora_name: lora.org_module.weight.detach() for lora in self.loras()}

    def kohya_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        sd = {k: v.detach().to("cpu", copy=True) for k, v in self.state_dict().items()}
        if dtype is not None:
            sd = {k: v.to(dtype) for k, v in sd.items()}
        return sd
