"""Exact low-rank arithmetic on adapter state dicts, shared by the training methods and the tools.

A LoRA module's delta is ΔW = (alpha/rank) · up @ down. A weighted sum of such deltas is itself
a product of concatenated factors, so it can be stored exactly at rank Σ r_i (`combine_exact`),
and its best rank-k approximation comes from the factors with two thin QRs and the SVD of a
(Σr x Σr) matrix instead of an SVD of the dense (out x in·k·k) matrix (`lowrank_svd`).

Modules of the other adapters (LoHa, LoKr, DoRA) have no such factors: `factors` takes their
dense ΔW (DoRA's needs the base weight) and its exact SVD, at its numerical rank, so they take
part in the same arithmetic. `kohya_svd_merge` is kohya svd_merge_lora.py's algorithm, step for step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F

from ..errors import UserError
from .adapters import detect, has_factors, is_kohya_lora, module_dense, module_rank_alpha, module_shapes, split_key

log = logging.getLogger(__name__)

State = dict[str, torch.Tensor]


def module_names(sd: State) -> list[str]:
    return sorted({split_key(k)[0] for k in sd})


def module_parts(sd: State, name: str) -> dict[str, torch.Tensor]:
    prefix = name + "."
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def by_module(sd: State) -> dict[str, State]:
    """The state split into one state per module, in one pass (asking `module_parts` per module reads every key
    once per module: quadratic in an SDXL-sized file's ~1,000 modules)."""
    out: dict[str, State] = {}
    for k, v in sd.items():
        out.setdefault(split_key(k)[0], {})[k] = v
    return out


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


def dense_delta(sd: State, name: str, ratio: float = 1.0, base: Mapping[str, torch.Tensor] | None = None
                ) -> torch.Tensor:
    """ratio · ΔW_eff of one module (any adapter) as a 2-D (out, in·kh·kw) matrix."""
    parts = module_parts(sd, name)
    return ratio * _dense_named(detect(parts), parts, name, base)


def _dense_named(cls, parts, name: str, base: Mapping[str, torch.Tensor] | None) -> torch.Tensor:
    if "dora_scale" in parts and (base is None or name not in base):
        raise UserError(f"module {name} is DoRA: its delta depends on the base model's weights; "
                        "pass the base model (--model)")
    return module_dense(cls, parts, None if base is None else base.get(name))


@dataclass
class Factors:
    """One module of one adapter file: ΔW = coeff · up2d @ down2d (2-D views), plus the LoRA layout to rebuild it."""

    up: torch.Tensor  # (out, r)
    down: torch.Tensor  # (r, in·kh·kw)
    coeff: float
    down_shape: tuple[int, ...]  # lora_down shape of the LoRA it becomes (rank replaced when rebuilding)
    up_is_4d: bool


def weight_shape_of(sd: State, name: str, base: Mapping[str, torch.Tensor] | None = None) -> tuple[int, ...]:
    """The frozen weight's shape of a module: from the base model when given, else from the tensors.

    LoHa and plain LoKr files flatten a conv's kernel into one axis, so without the model their
    layer shape is unknown; a UserError says to pass it.
    """
    if base is not None and name in base:
        return tuple(base[name].shape)
    parts = module_parts(sd, name)
    cls = detect(parts)
    shape = cls.weight_shape(module_shapes(parts))
    if shape is None:
        raise UserError(f"{cls.title} module {name} flattens its layer's kernel, so its shape as a LoRA is unknown "
                        "without the model; pass the base model (--model)")
    return shape


def factors(sd: State, name: str, ratio: float = 1.0, base: Mapping[str, torch.Tensor] | None = None) -> Factors:
    """The module as LoRA factors: its own for a LoRA, the exact SVD of its dense ΔW otherwise."""
    parts = module_parts(sd, name)
    cls = detect(parts)
    if has_factors(cls, parts):
        up, down = cls.factors({k: v.float() for k, v in parts.items()})
        scale = module_rank_alpha(cls, parts)[2]
        shape = weight_shape_of(sd, name, base)
        down_shape = (down.shape[0], *shape[1:]) if len(shape) == 4 else tuple(down.shape)
        return Factors(up, down, ratio * scale, down_shape, len(shape) == 4)
    shape = weight_shape_of(sd, name, base)
    dense = _dense_named(cls, parts, name, base)
    u, s, vh = torch.linalg.svd(dense.double(), full_matrices=False)
    tol = s[0] * max(dense.shape) * torch.finfo(torch.float32).eps
    r = max(1, int((s > tol).sum()))
    return Factors((u[:, :r] * s[:r]).float(), vh[:r].float(), ratio, (r, *shape[1:]), len(shape) == 4)


def _rebuild(name: str, up2d: torch.Tensor, down2d: torch.Tensor, like: Factors, alpha: float) -> State:
    r = down2d.shape[0]
    down = down2d.reshape(r, *like.down_shape[1:]) if len(like.down_shape) == 4 else down2d
    up = up2d.reshape(up2d.shape[0], r, 1, 1) if like.up_is_4d or len(like.down_shape) == 4 else up2d
    return {f"{name}.lora_down.weight": down.contiguous(), f"{name}.lora_up.weight": up.contiguous(),
            f"{name}.alpha": torch.tensor(float(alpha))}


def _check_same_layout(name: str, fs: list[Factors]) -> None:
    first = fs[0]
    for f in fs[1:]:
        if f.up.shape[0] != first.up.shape[0] or f.down.shape[1] != first.down.shape[1]:
            raise ValueError(f"{name}: the LoRAs disagree on the module's shape "
                             f"({tuple(first.up.shape)}x{tuple(first.down.shape)} vs {tuple(f.up.shape)}x{tuple(f.down.shape)})")


def _module_factors(modules: list[dict[str, State]], ratios: list[float], name: str,
                    base: Mapping[str, torch.Tensor] | None) -> list[Factors]:
    """`modules`: each state as `by_module` splits it."""
    fs = [factors(m[name], name, r, base) for m, r in zip(modules, ratios) if name in m]
    _check_same_layout(name, fs)
    return fs


def combine_exact(states: list[State], ratios: list[float], base: Mapping[str, torch.Tensor] | None = None) -> State:
    """Σ ratio_i · ΔW_i per module as a LoRA, stored exactly: ranks concatenated, alpha = rank (scale 1)."""
    out: State = {}
    modules = [by_module(s) for s in states]
    for name in sorted(set().union(*modules)):
        fs = _module_factors(modules, ratios, name, base)
        up = torch.cat([f.up for f in fs], dim=1)
        down = torch.cat([f.coeff * f.down for f in fs], dim=0)
        out.update(_rebuild(name, up, down, fs[0], alpha=down.shape[0]))
    return out


def lowrank_svd(fs: list[Factors], rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best rank-k approximation of Σ coeff_i·up_i@down_i from the factors.

    Returns (up2d = U_k·S_k, down2d = V_kᵀ, all singular values), exactly the truncated SVD of
    the dense sum, at the cost of QRs of (out x R) and (in x R) and an R x R SVD.
    """
    U = torch.cat([f.up for f in fs], dim=1).double()  # (out, R)
    D = torch.cat([f.coeff * f.down for f in fs], dim=0).double()  # (R, in)
    qu, ru = torch.linalg.qr(U)  # U = qu @ ru
    qd, rd = torch.linalg.qr(D.T)  # Dᵀ = qd @ rd
    small = ru @ rd.T  # U @ D = qu @ small @ qdᵀ
    p, s, vh = torch.linalg.svd(small)
    k = max(1, min(rank, s.shape[0], U.shape[0], D.shape[1]))
    up = (qu @ p[:, :k]) * s[:k]
    down = vh[:k] @ qd.T
    return up.float(), down.float(), s.float()


def _is_kxk(f: Factors) -> bool:
    return len(f.down_shape) == 4 and tuple(f.down_shape[2:]) != (1, 1)


def svd_rerank(states: list[State], ratios: list[float], rank: int, conv_rank: int | None = None,
               base: Mapping[str, torch.Tensor] | None = None) -> State:
    """Σ ratio_i · ΔW_i brought to `rank` (kxk convs: `conv_rank`) via `lowrank_svd`, alpha = rank.

    A module's rank is min(asked, Σ r_i, in, out): directions with singular value zero are left out.
    """
    out: State = {}
    modules = [by_module(s) for s in states]
    for name in sorted(set().union(*modules)):
        fs = _module_factors(modules, ratios, name, base)
        k = conv_rank if (_is_kxk(fs[0]) and conv_rank) else rank
        up, down, _ = lowrank_svd(fs, k)
        out.update(_rebuild(name, up, down, fs[0], alpha=down.shape[0]))
    return out


def clamp_factors(up: torch.Tensor, down: torch.Tensor, q: float) -> tuple[torch.Tensor, torch.Tensor]:
    """kohya's clamp: hi = quantile(cat(up, down), q) over signed values; clamp both to [-hi, hi]."""
    vals = torch.cat([up.flatten(), down.flatten()])
    if vals.numel() > 2**24:  # torch.quantile's limit; sample deterministically
        vals = vals[torch.linspace(0, vals.numel() - 1, 2**24).long()]
    hi = torch.quantile(vals, q)
    return up.clamp(-hi, hi), down.clamp(-hi, hi)


def _kohya_lora_delta(parts: Mapping[str, torch.Tensor], ratio: float) -> torch.Tensor:
    """ratio · ΔW of a kohya LoRA module with svd_merge_lora.py's exact operations (float32)."""
    down, up = parts["lora_down.weight"], parts["lora_up.weight"]
    alpha = parts.get("alpha", down.shape[0])
    scale = alpha / down.shape[0]
    if down.dim() == 2:
        return ratio * (up @ down) * scale
    if tuple(down.shape[2:]) == (1, 1):
        return ratio * (up.squeeze(3).squeeze(2) @ down.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3) * scale
    return ratio * F.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3) * scale


def kohya_svd_merge(states: list[State], ratios: list[float], rank: int, conv_rank: int, clamp_quantile: float,
                    base: Mapping[str, torch.Tensor] | None = None) -> tuple[State, dict[str, int]]:
    """kohya svd_merge_lora.py's merge, operation for operation (float32).

    The dense sum Σ ratio·scale·up@down is built as kohya builds it, then a full SVD of it, the
    first k = min(asked, in, out) directions (padded with zero-value directions where the sum's
    rank is lower), up = U_k·S_k and down = V_kᵀ, both clamped to ±the `clamp_quantile` quantile
    of their joint signed values (so the result depends on the SVD's sign convention, as
    kohya's does), alpha = k. Non-LoRA modules enter through their dense ΔW.
    Returns the state and, per module whose sum has a lower rank than k, that rank.
    """
    sums: dict[str, torch.Tensor] = {}
    for sd, ratio in zip(states, ratios):
        for name, own in sorted(by_module(sd).items()):
            parts = module_parts(own, name)
            cls = detect(parts)
            if is_kohya_lora(cls, parts):
                delta = _kohya_lora_delta(parts, ratio)
            else:
                shape = weight_shape_of(own, name, base)
                delta = ratio * _dense_named(cls, parts, name, base).reshape(shape)
            if name in sums and sums[name].shape != delta.shape:
                raise UserError(f"module {name} has shape {tuple(delta.shape)} in one file and "
                                f"{tuple(sums[name].shape)} in another; the LoRAs were made for different architectures")
            sums[name] = sums.get(name, torch.zeros(delta.shape, dtype=torch.float32)) + delta
    out: State = {}
    short: dict[str, int] = {}
    for name, mat in sums.items():
        conv2d = mat.dim() == 4
        kernel = tuple(mat.shape[2:]) if conv2d else None
        kxk = conv2d and kernel != (1, 1)
        out_dim, in_dim = mat.shape[0:2]
        if conv2d:
            mat = mat.flatten(start_dim=1) if kxk else mat.squeeze(3).squeeze(2)
        k = min(conv_rank if kxk else rank, in_dim, out_dim)
        U, S, Vh = torch.linalg.svd(mat)
        true_rank = int(torch.linalg.matrix_rank(mat))
        if true_rank < k:
            short[name] = true_rank
        U = U[:, :k] @ torch.diag(S[:k])
        Vh = Vh[:k, :]
        U, Vh = clamp_factors(U, Vh, clamp_quantile)
        if conv2d:
            U = U.reshape(out_dim, k, 1, 1)
            Vh = Vh.reshape(k, in_dim, kernel[0], kernel[1])
        out[f"{name}.lora_up.weight"] = U.contiguous()
        out[f"{name}.lora_down.weight"] = Vh.contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(k))
    return out, short
