"""What every adapter shares: the forward hook, the runtime multiplier, dropouts and DoRA.

An adapter module adds `multiplier · ΔW_eff · x` to the output of one frozen Linear or Conv2d
through a forward hook, so the base model's weights and keys are never touched. ΔW_eff is the
algorithm's scaled delta s·ΔW, or with DoRA (`dora_scale`) the weight-decomposed delta

    ΔW_eff = V · d / ‖V‖_col − W,   V = W + s·ΔW,   d of shape (1, I[, 1, 1]),

the input-axis convention that A1111 and ComfyUI both merge as trained. The multiplier acts
linearly on ΔW_eff, as both clients apply a strength (so multiplier 0 is the base model and
DoRA at strength m behaves the same in training, sampling and the UIs).

The multiplier is a float or a tensor with one value per sample of the batch: the difference
methods run +m and −m in one forward pass.

A subclass declares its file keys and owns four things: `plan` (tensor shapes for a fresh
module), `init_fresh` (LyCORIS's initialisation), `dense` (ΔW from a dict of its tensors, the
formula the clients use) and the shape checks of a file. `LowRank` subclasses also give their
factors to the tools.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

from ...options import Strict


class AdapterJobKeys(Strict):
    """The job keys of options every algorithm takes (LyCORIS' use_tucker / dora_wd, difflora's spelling)."""

    network_use_tucker: bool = Field(False, description="kxk convs with a Tucker core (lora_mid / hada_t1,t2 / "
                                                        "lokr_t2)")
    network_dora: bool = Field(False, description="DoRA weight decomposition on lora, loha or lokr (LyCORIS "
                                                  "dora_wd)")


@dataclass(frozen=True)
class AdapterOptions:
    """The normalised adapter choice of a job (LyCORIS' network_args, difflora's names)."""

    algo: str = "lora"
    use_tucker: bool = False  # 3x3 convs: Tucker core (lora_mid / hada_t* / lokr_t2)
    factor: int = -1  # LoKr: Kronecker factor bound (-1: most square)
    decompose_both: bool = False  # LoKr: the small factor low-rank too
    full_matrix: bool = False  # LoKr: no low-rank factors at all
    dora_wd: bool = False  # DoRA weight decomposition on top of the algorithm
    # DoRA's magnitude per output row (peft's lora_magnitude_vector, what diffusers loads) instead of per input
    # channel (what A1111 and ComfyUI apply): set for save_format = "diffusers"
    dora_on_output: bool = False

    @property
    def is_lycoris(self) -> bool:
        """Anything but plain LoRA/LoCon: a `lycoris.kohya` file."""
        return self.algo != "lora" or self.use_tucker or self.dora_wd

    def network_args(self) -> dict[str, str]:
        """The LyCORIS network_args these options stand for (kohya metadata: strings)."""
        args = {"algo": self.algo}
        if self.use_tucker:
            args["use_tucker"] = "True"
        if self.algo == "lokr":  # the LoKr-only options travel only with LoKr
            args["factor"] = str(self.factor)
            if self.decompose_both:
                args["decompose_both"] = "True"
            if self.full_matrix:
                args["full_matrix"] = "True"
        if self.dora_wd:
            args["dora_wd"] = "True"
            args["wd_on_output"] = str(self.dora_on_output)
        return args


class _Weight(nn.Module):
    """Holds one `.weight`, so a state-dict key reads `<name>.lora_down.weight` as in the files."""

    def __init__(self, tensor: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(tensor)


def conv1x1_as_matmul(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A bias-free 1x1 convolution (weight (O, C, 1, 1), x (B, C, H, W)) as one batched matmul.

    Adapter 1x1 convs are thin (r channels on one side); on CPU a convolution call costs about
    twice a matmul for them (per-layer micro-benchmark in bench/README.md).
    """
    b, c, hgt, wid = x.shape
    out = torch.matmul(weight.reshape(weight.shape[0], c), x.reshape(b, c, hgt * wid))
    return out.view(b, weight.shape[0], hgt, wid)


def input_axis_norm(w: torch.Tensor) -> torch.Tensor:
    """‖W‖ per input channel (over output rows and the kernel), shape (1, I[, 1, 1])."""
    return w.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1).reshape(1, w.shape[1], *([1] * (w.dim() - 2)))


def output_axis_norm(w: torch.Tensor) -> torch.Tensor:
    """‖W‖ per output row, shape (O, 1[, 1, 1]) (LyCORIS ≥ 3.2's default axis, read only)."""
    return w.reshape(w.shape[0], -1).norm(dim=1).reshape(w.shape[0], *([1] * (w.dim() - 1)))


def dora_delta(w: torch.Tensor, delta: torch.Tensor, dora_scale: torch.Tensor) -> torch.Tensor:
    """V·d/‖V‖ − W with V = W + delta; the norm's axis is the one `dora_scale` is shaped for."""
    v = w.to(delta.dtype) + delta
    d = dora_scale.to(v.dtype)
    on_input = d.shape[0] == 1 and d.shape[1] == w.shape[1]
    norm = input_axis_norm(v) if on_input else output_axis_norm(v)
    return v * (d / (norm + torch.finfo(v.dtype).eps)) - w.to(delta.dtype)


def dora_scale_shape(weight_shape: tuple[int, ...], on_output: bool = False) -> tuple[int, ...]:
    """The shape difflora writes: input axis, keepdim (1, I[, 1, 1]); on the output axis (O, 1[, 1, 1])."""
    if on_output:
        return (weight_shape[0], *([1] * (len(weight_shape) - 1)))
    return (1, weight_shape[1], *([1] * (len(weight_shape) - 2)))


class Adapter(nn.Module):
    """One trainable adapter on one frozen Linear/Conv2d (see the module docstring)."""

    algo: ClassVar[str]
    title: ClassVar[str]  # for people: "LoRA/LoCon", "LoHa", ...
    keys: ClassVar[tuple[str, ...]]  # every tensor key it may own, `alpha` and `dora_scale` aside
    required: ClassVar[tuple[str, ...]]  # keys a file must have
    low_rank: ClassVar[bool] = False  # ΔW = up @ down with explicit factors (the LoRA tools' input)
    # keys that identify the algorithm in a file, in the clients' (A1111, ComfyUI) detection order; weak ones
    # decide only when no algorithm's markers are present
    markers: ClassVar[tuple[str, ...]]
    weak_markers: ClassVar[tuple[str, ...]] = ()
    lycoris_args: ClassVar[tuple[str, ...]] = ("use_tucker",)  # the network_args it reads besides algo, dora_wd
    job_options: ClassVar[type[Strict]] = AdapterJobKeys  # their job keys (difflora's spelling)
    # keys whose first axis is the output rows (without a Tucker core), and the Tucker core's keys: a module on a
    # fused projection splits exactly into its pieces' modules (split_output_rows)
    output_rows: ClassVar[tuple[str, ...]] = ()
    tucker_keys: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def split_output_rows(cls, parts: Mapping[str, torch.Tensor], n: int) -> list[dict[str, torch.Tensor]] | None:
        """A module's tensors as the n modules of its n equal slices of output rows, exactly: each its rows of the
        row factors, its own copy of the others (alpha too); None where no such split exists (a Tucker core, a
        row factor whose rows do not divide by n, a magnitude per input channel)."""
        rows = [k for k in parts if k in cls.output_rows or (k == "dora_scale" and parts[k].shape[1:] == (1,))]
        if any(k in parts for k in cls.tucker_keys) or any(parts[k].shape[0] % n for k in rows) or (
                "dora_scale" in parts and "dora_scale" not in rows):
            return None
        chunks = {k: parts[k].chunk(n, dim=0) for k in rows}
        return [{k: (chunks[k][i].contiguous() if k in chunks else v.clone()) for k, v in parts.items()}
                for i in range(n)]

    @classmethod
    def stack_output_rows(cls, pieces: list[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor] | None:
        """The inverse: pieces with the same keys and equal shared factors back to one module (their row factors
        stacked); None when they differ."""
        first = pieces[0]
        if any(set(p) != set(first) for p in pieces) or any(k in first for k in cls.tucker_keys) or (
                "dora_scale" in first and first["dora_scale"].shape[1:] != (1,)):
            return None
        rows = [k for k in first if k in cls.output_rows or k == "dora_scale"]
        if any(not torch.equal(p[k], first[k]) for p in pieces for k in first if k not in rows):
            return None
        return {k: torch.cat([p[k] for p in pieces]) if k in rows else first[k] for k in first}

    def __init__(self, name: str, org: nn.Module, shapes: Mapping[str, tuple[int, ...]], alpha: float,
                 dora: tuple[int, ...] | None = None, dropout: float | None = None, rank_dropout: float | None = None,
                 module_dropout: float | None = None):
        super().__init__()
        if not isinstance(org, (nn.Linear, nn.Conv2d)):
            raise TypeError(f"{name}: adapters attach to Linear or Conv2d, got {type(org).__name__}")
        self.lora_name = name
        self._org = [org]  # a list, so the frozen module is not registered as a child
        self.shapes = dict(shapes)
        for key, shape in self.shapes.items():
            self._create(key, torch.empty(shape))
        self.rank = self.rank_of(self.shapes)
        if alpha is None or float(alpha) == 0.0:
            alpha = self.rank  # kohya/LyCORIS: no alpha means no scaling
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self.scale = self.scale_of(self.shapes, float(alpha))
        if dora is not None:  # DoRA magnitude of this shape, initialised to W's norms on its axis (W' = W at start)
            w = org.weight.detach().float()
            on_input = dora[0] == 1 and dora[1] == w.shape[1]
            self.dora_scale = nn.Parameter((input_axis_norm(w) if on_input else output_axis_norm(w)).reshape(dora))
        else:
            self.dora_scale = None
        self.dropout, self.rank_dropout, self.module_dropout = dropout, rank_dropout, module_dropout
        self.multiplier: float | torch.Tensor = 1.0
        self._hook = None

    # ---- declared by each algorithm
    @classmethod
    def plan(cls, org: nn.Module, rank: int, options: AdapterOptions) -> dict[str, tuple[int, ...]]:
        """Tensor shapes of a fresh module on `org` (LyCORIS' layout for these options)."""
        raise NotImplementedError

    @classmethod
    def traits(cls, shapes: Mapping[str, tuple[int, ...]]) -> tuple[str, ...]:
        """What a file's module shows of its options beyond the algorithm ("tucker", ...), for `inspect`."""
        return ()

    def init_fresh(self) -> None:
        """LyCORIS' initialisation: ΔW = 0 at step 0."""
        raise NotImplementedError

    @staticmethod
    def dense(t: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """ΔW before the scale, as a 2-D (out, in·kh·kw) matrix, from the module's tensors."""
        raise NotImplementedError

    @staticmethod
    def rank_of(shapes: Mapping[str, tuple[int, ...]]) -> int:
        """The rank the clients divide alpha by."""
        raise NotImplementedError

    @classmethod
    def from_file_shapes(cls, org: nn.Module, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        """The module's tensor shapes for a file's tensors on `org` (load_weights reshapes to them)."""
        return dict(shapes)

    @classmethod
    def stored_alpha(cls, shapes: Mapping[str, tuple[int, ...]], rank: int, alpha: float | None) -> float | None:
        """The alpha a fresh module stores for the job's alpha."""
        return alpha

    @classmethod
    def new(cls, name: str, org: nn.Module, rank: int, alpha: float | None = None,
            options: AdapterOptions = AdapterOptions(), dropout: float | None = None,
            rank_dropout: float | None = None, module_dropout: float | None = None) -> "Adapter":
        """A freshly initialised module (ΔW = 0) of `rank` on `org`."""
        if rank < 1:
            raise ValueError(f"{name}: rank must be >= 1, got {rank}")
        shapes = cls.plan(org, rank, options)
        dora = dora_scale_shape(tuple(org.weight.shape), options.dora_on_output) if options.dora_wd else None
        module = cls(name, org, shapes, cls.stored_alpha(shapes, rank, alpha), dora, dropout, rank_dropout,
                     module_dropout)
        module.init_fresh()
        return module

    @classmethod
    def scale_of(cls, shapes: Mapping[str, tuple[int, ...]], alpha: float) -> float:
        return alpha / cls.rank_of(shapes)

    @classmethod
    def flat_shape(cls, shapes: Mapping[str, tuple[int, ...]]) -> tuple[int, int]:
        """(out, in·kh·kw) of ΔW, from the shapes alone."""
        raise NotImplementedError

    @classmethod
    def kernel(cls, shapes: Mapping[str, tuple[int, ...]]) -> tuple[int, ...] | None:
        """The conv kernel when the tensors carry it, () for a matrix, None when they cannot tell."""
        raise NotImplementedError

    @classmethod
    def weight_shape(cls, shapes: Mapping[str, tuple[int, ...]]) -> tuple[int, ...] | None:
        """The frozen layer's weight shape as far as the tensors tell it (None: kernel flattened away)."""
        kernel = cls.kernel(shapes)
        if kernel is None:
            return None
        out_dim, in_flat = cls.flat_shape(shapes)
        return (out_dim, in_flat // math.prod(kernel), *kernel) if kernel else (out_dim, in_flat)

    @staticmethod
    def factors(t: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(up (O, r), down (r, I·kh·kw)) with ΔW = up @ down, for `low_rank` algorithms."""
        raise NotImplementedError

    @classmethod
    def check_shapes(cls, name: str, shapes: Mapping[str, tuple[int, ...]]) -> str | None:
        """None, or what is wrong with a file's tensors for this algorithm (one phrase)."""
        raise NotImplementedError

    def options(self) -> dict[str, object]:
        """What `inspect` shows about this module beyond algo/rank/alpha."""
        return {}

    # ---- shared
    def _create(self, key: str, tensor: torch.Tensor) -> None:
        if key.endswith(".weight"):
            self.add_module(key[: -len(".weight")], _Weight(tensor))
        else:
            self.register_parameter(key, nn.Parameter(tensor))

    def tensor(self, key: str) -> torch.Tensor:
        if key.endswith(".weight"):
            return getattr(self, key[: -len(".weight")]).weight
        return getattr(self, key)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: self.tensor(k) for k in self.shapes}

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
        if float(self.alpha) == 0.0:
            self.alpha.fill_(self.rank)  # kohya: alpha 0 means no scaling
        self.scale = self.scale_of(self.shapes, float(self.alpha))

    def weight_delta(self) -> torch.Tensor:
        """s·ΔW in the frozen weight's shape, float32 (multiplier not applied, DoRA not applied)."""
        t = {k: v.float() for k, v in self.tensors().items()}
        return (self.dense(t) * self.scale).reshape(self.org_module.weight.shape)

    def effective_delta(self) -> torch.Tensor:
        """What multiplier 1 adds to the frozen weight: s·ΔW, or the DoRA delta."""
        delta = self.weight_delta()
        if self.dora_scale is None:
            return delta
        return dora_delta(self.org_module.weight.detach().float(), delta, self.dora_scale)

    def _forward_hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        m = self.multiplier
        if not isinstance(m, torch.Tensor) and m == 0.0:
            return output
        if self.training and self.module_dropout and torch.rand(()) < self.module_dropout:
            return output
        # In place: the frozen layer's backward never needs its own output, and a full-size
        # temporary per adapter layer is the largest cost of the branch on CPU.
        return output.add_(self.delta(inputs[0], m).to(output.dtype))

    def delta(self, x: torch.Tensor, multiplier: float | torch.Tensor = 1.0) -> torch.Tensor:
        """The adapter's contribution for input x: multiplier · (ΔW_eff applied to x)."""
        w = self.effective_delta()
        if self.training and self.rank_dropout:
            # LyCORIS' rank dropout for dense adapters: drop output rows of ΔW, keep the expectation
            keep = (torch.rand(w.shape[0], device=w.device) > self.rank_dropout).to(w.dtype)
            w = w * keep.view(-1, *([1] * (w.dim() - 1))) / (1.0 - self.rank_dropout)
        out = self._apply_weight(x.to(w.dtype), w)
        if self.training and self.dropout:
            out = F.dropout(out, p=self.dropout)
        return self._scale_by(out, multiplier)

    def _apply_weight(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        org = self.org_module
        if isinstance(org, nn.Linear):
            return F.linear(x, w)
        return F.conv2d(x, w, None, org.stride, org.padding, org.dilation, org.groups)

    def _scale_by(self, out: torch.Tensor, multiplier: float | torch.Tensor) -> torch.Tensor:
        if isinstance(multiplier, torch.Tensor):
            self._check_batch(multiplier, out.shape[0])
            return out * multiplier.to(out.device, out.dtype).view(-1, *([1] * (out.dim() - 1)))
        return out * multiplier

    def _check_batch(self, multiplier: torch.Tensor, batch: int) -> None:
        if multiplier.numel() != batch:
            raise RuntimeError(f"{self.lora_name}: per-sample multiplier has {multiplier.numel()} values but the "
                               f"batch has {batch} samples")
