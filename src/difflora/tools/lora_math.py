"""Exact LoRA arithmetic on kohya state dicts.

A module's delta is ΔW = (alpha/rank) · up @ down. A weighted sum of such deltas is itself
a product of concatenated factors, so it can be stored exactly at rank Σ r_i
(`combine_exact`), and its best rank-k approximation can be computed from the factors with
two thin QRs and the SVD of an (Σr x Σr) matrix instead of an SVD of the dense
(out x in·k·k) matrix (`lowrank_svd`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

State = dict[str, torch.Tensor]


def module_names(sd: State) -> list[str]:
    return sorted({k[: -len(".lora_down.weight")] for k in sd if k.endswith(".lora_down.weight")})


@dataclass
class Factors:
    """One module of one LoRA: ΔW = coeff · up2d @ down2d (2-D views), plus the layout to rebuild it."""

    up: torch.Tensor  # (out, r)
    down: torch.Tensor  # (r, in·kh·kw)
    coeff: float
    down_shape: tuple[int, ...]  # original lora_down shape (rank replaced when rebuilding)
    up_is_4d: bool


def factors(sd: State, name: str, ratio: float = 1.0) -> Factors:
    down = sd[f"{name}.lora_down.weight"].float()
    up = sd[f"{name}.lora_up.weight"].float()
    rank = down.shape[0]
    alpha = sd.get(f"{name}.alpha")
    scale = (float(alpha) if alpha is not None else float(rank)) / rank
    return Factors(up.reshape(up.shape[0], rank), down.reshape(rank, -1), ratio * scale, tuple(down.shape), up.dim() == 4)


def dense_delta(sd: State, name: str, ratio: float = 1.0) -> torch.Tensor:
    """ratio · ΔW as a 2-D (out, in·kh·kw) matrix."""
    f = factors(sd, name, ratio)
    return f.coeff * (f.up @ f.down)


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


def combine_exact(states: list[State], ratios: list[float]) -> State:
    """Σ ratio_i · ΔW_i per module, stored exactly: ranks concatenated, alpha = rank (scale 1)."""
    out: State = {}
    names = sorted(set().union(*(module_names(s) for s in states)))
    for name in names:
        fs = [factors(s, name, r) for s, r in zip(states, ratios) if f"{name}.lora_down.weight" in s]
        _check_same_layout(name, fs)
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


def svd_rerank(states: list[State], ratios: list[float], rank: int, conv_rank: int | None = None,
               clamp_quantile: float | None = None) -> State:
    """Σ ratio_i · ΔW_i brought to `rank` (3x3 convs: `conv_rank`), alpha = rank, via `lowrank_svd`.

    clamp_quantile (kohya: 0.99) clamps both factors to ±quantile of their joint values.
    """
    out: State = {}
    names = sorted(set().union(*(module_names(s) for s in states)))
    for name in names:
        fs = [factors(s, name, r) for s, r in zip(states, ratios) if f"{name}.lora_down.weight" in s]
        _check_same_layout(name, fs)
        is_kxk = len(fs[0].down_shape) == 4 and tuple(fs[0].down_shape[2:]) != (1, 1)
        k = conv_rank if (is_kxk and conv_rank) else rank
        up, down, _ = lowrank_svd(fs, k)
        if clamp_quantile is not None:
            up, down = clamp_factors(up, down, clamp_quantile)
        out.update(_rebuild(name, up, down, fs[0], alpha=down.shape[0]))
    return out


def clamp_factors(up: torch.Tensor, down: torch.Tensor, q: float) -> tuple[torch.Tensor, torch.Tensor]:
    """kohya's clamp: hi = quantile(cat(up, down), q) over signed values; clamp both to [-hi, hi]."""
    vals = torch.cat([up.flatten(), down.flatten()])
    if vals.numel() > 2**24:  # torch.quantile's limit; sample deterministically
        vals = vals[torch.linspace(0, vals.numel() - 1, 2**24).long()]
    hi = torch.quantile(vals, q)
    return up.clamp(-hi, hi), down.clamp(-hi, hi)


def scale_state(sd: State, ratio: float) -> State:
    """ratio · ΔW for every module (applied to down, so the sign survives)."""
    out = dict(sd)
    for name in module_names(sd):
        out[f"{name}.lora_down.weight"] = sd[f"{name}.lora_down.weight"].float() * ratio
    return out
