"""Resize a LoRA to a lower rank, keeping its strength.

Per module: the SVD of up @ down (from the factors, `network.lowrank.lowrank_svd`), keep k singular
directions, up = U_k·S_k, down = V_kᵀ, and new_alpha = (alpha/rank) · k, so the scale
alpha/rank and with it the LoRA's strength are unchanged. No clamping.

Rank choice (kohya's resize_lora.py): fixed `new_rank`, or a dynamic rule with parameter t,
capped at `new_rank` (kxk convs: `new_conv_rank`); a module whose largest singular value is
≤ 1e-6 gets rank 1. S is the spectrum of the flattened (out, in·kh·kw) matrix, zero-padded to
min(out, in·kh·kw) as kohya's dense SVD gives it.

`rule="kohya"` (default) reproduces kohya's rules literally, quirks included:
- sv_ratio:      k = clamp(count(S > S[0]/t), 1, len(S)−1) + 1
- sv_cumulative: k = clamp(searchsorted(cumsum(S)/ΣS, t) + 1, 1, len(S)−1) + 1
- sv_fro:        k = clamp(searchsorted(cumsum(S²)/ΣS², t²) + 1, 1, len(S)−1) + 1
  (sv_cumulative and sv_fro add 1 twice, so they keep one direction more than their target
  needs; sv_ratio keeps one direction below its threshold.)

`rule="minimal"`: the smallest rank that meets the target:
- sv_ratio:      k = count(S > S[0]/t)            (every kept S_i satisfies S[0]/S_i < t)
- sv_cumulative: k = searchsorted(cumsum(S)/ΣS, t) + 1     (retained Σ S ≥ t)
- sv_fro:        k = searchsorted(cumsum(S²)/ΣS², t²) + 1  (retained Frobenius norm ≥ t)

Difference from kohya, on purpose: the result never has more directions than the input
module's rank (kohya can return up to min(out, in) directions, the extra ones with singular
value zero, which carry nothing).

With a dynamic rule the summary reports the retained fraction of the Frobenius norm (mean and
lowest module), and a warning names the modules that keep less than the rule's target
(sv_fro / sv_cumulative: the parameter; sv_ratio: 90% of the norm) because `--new-rank` capped them.

LoHa, LoKr and DoRA inputs are resized through their dense ΔW (exact SVD): the output is a LoRA
of the chosen rank. DoRA modules and LyCORIS convs need the base model (`model`), as in svd-merge.
"""

from __future__ import annotations

import logging
import os
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError
from ..network import lowrank
from ..network.files import LoraFile, load_lora, save_dtype, save_lora
from .common import base_weights, check_lora_output, check_rank, is_kxk, resolve_device

log = logging.getLogger(__name__)

State = dict[str, torch.Tensor]
DYNAMIC_METHODS = ("sv_ratio", "sv_cumulative", "sv_fro")
MIN_SV = 1e-6
SV_RATIO_RETAINED_WARN = 0.9  # sv_ratio has no retained-fraction target of its own


@dataclass
class ModuleStats:
    name: str
    old_rank: int
    new_rank: int
    sum_retained: float  # Σ_{≤k} S / Σ S
    fro_retained: float  # sqrt(Σ_{≤k} S²) / sqrt(Σ S²)
    max_ratio: float  # S[0] / S[k−1]


def _clamp(i: int, n: int) -> int:
    return max(1, min(i, n - 1))


def dynamic_rank(S: torch.Tensor, method: str, param: float, rule: str = "kohya") -> int:
    """The rank a dynamic rule picks for the descending spectrum S (kohya's or the minimal rule)."""
    S = S.double()
    n = S.numel()
    if method == "sv_ratio":
        count = int((S > S[0] / param).sum())
        return _clamp(count, n) + 1 if rule == "kohya" else max(1, count)
    if method == "sv_cumulative":
        cum = torch.cumsum(S, 0) / S.sum()
        target = param
    elif method == "sv_fro":
        cum = torch.cumsum(S * S, 0) / (S * S).sum()
        target = param * param
    else:
        raise UserError(f"unknown dynamic method {method!r}; use one of {', '.join(DYNAMIC_METHODS)}")
    idx = int(torch.searchsorted(cum, torch.tensor([target], dtype=cum.dtype))[0]) + 1
    return _clamp(idx, n) + 1 if rule == "kohya" else max(1, min(idx, n))


def check_dynamic(method: str | None, param: float | None, rule: str) -> None:
    if rule not in ("kohya", "minimal"):
        raise UserError(f"unknown --dynamic-rule {rule!r}; use kohya or minimal")
    if method is None:
        if param is not None:
            raise UserError("--param needs --dynamic (sv_ratio, sv_cumulative or sv_fro)")
        return
    if method not in DYNAMIC_METHODS:
        raise UserError(f"unknown dynamic method {method!r}; use one of {', '.join(DYNAMIC_METHODS)}")
    if param is None:
        raise UserError(f"--dynamic {method} needs --param")
    if method == "sv_ratio" and not param > 1.0:
        raise UserError(f"sv_ratio's --param is the largest allowed S[0]/S[k] ratio and must be > 1, got {param}")
    if method in ("sv_cumulative", "sv_fro") and not 0.0 < param <= 1.0:
        raise UserError(f"{method}'s --param is a retained fraction in (0, 1], got {param}")


def resize_lora(lora: LoraFile, new_rank: int, new_conv_rank: int | None = None, dynamic: str | None = None,
                param: float | None = None, rule: str = "kohya", device: str | torch.device = "cpu",
                base: dict[str, torch.Tensor] | None = None) -> tuple[State, list[ModuleStats]]:
    """The resized kohya state dict (CPU, float32) and per-module statistics."""
    from tqdm import tqdm

    check_rank(new_rank, "--new-rank")
    check_rank(new_conv_rank, "--new-conv-rank")
    check_dynamic(dynamic, param, rule)
    device = resolve_device(str(device))
    sd = {k: v.to(device=device, dtype=torch.float32) for k, v in lora.tensors.items()}
    out: State = {}
    stats: list[ModuleStats] = []
    if base is not None:
        base = {k: v.to(device) for k, v in base.items()}
    modules = lowrank.by_module(sd)
    for name in tqdm(sorted(modules), desc="resize", leave=False):
        try:
            f = lowrank.factors(modules[name], name, 1.0, base)
        except UserError as e:
            raise UserError(str(e), path=lora.path) from None
        scale = f.coeff
        old_rank = f.down.shape[0]
        f.coeff = 1.0  # kohya: the SVD is of up @ down without the scale
        up, down, s = lowrank.lowrank_svd([f], old_rank)
        s = s.double().cpu()
        full = torch.zeros(min(f.up.shape[0], f.down.shape[1]), dtype=torch.float64)
        full[: s.numel()] = s
        cap = (new_conv_rank or new_rank) if is_kxk(f.down_shape) else new_rank
        if dynamic is None:
            k = cap
        else:
            k = dynamic_rank(full, dynamic, param, rule)
        if full[0] <= MIN_SV:
            k = 1
        k = max(1, min(k, cap, old_rank, up.shape[1]))
        total, total2 = float(full.sum()), float((full * full).sum())
        kept = full[:k]
        stats.append(ModuleStats(
            name, old_rank, k,
            sum_retained=float(kept.sum()) / total if total > 0 else 1.0,
            fro_retained=float((kept * kept).sum().sqrt()) / total2 ** 0.5 if total2 > 0 else 1.0,
            max_ratio=float(full[0] / full[k - 1]) if full[k - 1] > 0 else float("inf"),
        ))
        rebuilt = lowrank._rebuild(name, up[:, :k], down[:k], f, alpha=scale * k)
        out.update({key: v.to("cpu") for key, v in rebuilt.items()})
    return out, stats


def format_stats(stats: list[ModuleStats]) -> str:
    lines = [f"{'module':<72} {'rank':>9}  {'sum(S)':>7}  {'fro':>7}  {'S0/Sk':>8}"]
    for st in stats:
        lines.append(f"{st.name:<72} {st.old_rank:>4}->{st.new_rank:<4} {st.sum_retained:>7.1%}  "
                     f"{st.fro_retained:>7.1%}  {st.max_ratio:>8.2f}")
    fro = [st.fro_retained for st in stats]
    if fro:
        std = statistics.pstdev(fro) if len(fro) > 1 else 0.0
        lines.append(f"average Frobenius norm retention: {statistics.fmean(fro):.2%} | std: {std:.3f}")
    return "\n".join(lines)


def below_target(stats: list[ModuleStats], dynamic: str, param: float) -> list[ModuleStats]:
    """Modules that keep less than the dynamic rule's target (capped by --new-rank / their rank)."""
    if dynamic == "sv_fro":
        return [st for st in stats if st.fro_retained < param - 1e-9]
    if dynamic == "sv_cumulative":
        return [st for st in stats if st.sum_retained < param - 1e-9]
    return [st for st in stats if st.fro_retained < SV_RATIO_RETAINED_WARN]


def resize_file(model: str | os.PathLike, save_to: str | os.PathLike, *, new_rank: int = 4,
                new_conv_rank: int | None = None, dynamic: str | None = None, param: float | None = None,
                rule: str = "kohya", device: str = "cpu", save_precision: str | None = None,
                base_model: str | os.PathLike | None = None, allow_pickle: bool = False
                ) -> tuple[dict, list[ModuleStats]]:
    """`difflora resize`. Returns (summary, per-module statistics)."""
    save_to = check_lora_output(save_to)
    out_dtype = save_dtype(save_precision or "float")
    check_rank(new_rank, "--new-rank")
    check_rank(new_conv_rank, "--new-conv-rank")
    check_dynamic(dynamic, param, rule)
    lora = load_lora(model)
    base = base_weights(base_model, [lora], allow_pickle)
    tensors, stats = resize_lora(lora, new_rank, new_conv_rank, dynamic, param, rule, device, base)
    md = {k: v for k, v in lora.metadata.items()
          if not k.startswith("sshs_") and k not in ("ss_network_dim", "ss_network_alpha")}
    old_dim = lora.metadata.get("ss_network_dim") or _uniform([st.old_rank for st in stats])
    comment = lora.metadata.get("ss_training_comment", "")
    if dynamic is None:
        md["ss_training_comment"] = f"dimension is resized from {old_dim} to {new_rank}; {comment}"
    else:
        md["ss_training_comment"] = f"Dynamic resize with {dynamic}: {param} from {old_dim}; {comment}"
    _update_conv_args(md, tensors)
    summary = {}
    if dynamic is not None and stats:
        fro = [st.fro_retained for st in stats]
        low = min(stats, key=lambda st: st.fro_retained)
        summary = {"mean_fro_retained": statistics.fmean(fro), "min_fro_retained": low.fro_retained,
                   "min_fro_module": low.name}
        short = below_target(stats, dynamic, param)
        if short:
            log.warning("%d module(s) keep less than %s %g asks because --new-rank capped them (lowest: %s keeps "
                        "%.1f%% of its Frobenius norm at rank %d); raise --new-rank / --new-conv-rank to keep more",
                        len(short), dynamic, param, short[0].name, 100 * short[0].fro_retained, short[0].new_rank)
            summary["below_target"] = [st.name for st in short]
    written = save_lora(tensors, save_to, md, dtype=out_dtype)
    return ({"output": str(Path(save_to)), "modules": len(stats), "network_dim": written["ss_network_dim"],
             "network_alpha": written["ss_network_alpha"], **summary}, stats)


def _uniform(values: list) -> str:
    if not values or len(set(values)) != 1:
        return "Dynamic"
    v = float(values[0])
    return str(int(v)) if v.is_integer() else str(v)


def _update_conv_args(md: dict[str, str], tensors: State) -> None:
    """Keep ss_network_args' conv_dim / conv_alpha true to the resized kxk convs."""
    import json

    try:
        args = json.loads(md.get("ss_network_args", "{}")) or {}
    except ValueError:
        return
    if not isinstance(args, dict) or "conv_dim" not in args:
        return
    names = [n for n in lowrank.module_names(tensors) if is_kxk(tuple(tensors[f"{n}.lora_down.weight"].shape))]
    if not names:
        return
    args["conv_dim"] = _uniform([int(tensors[f"{n}.lora_down.weight"].shape[0]) for n in names])
    args["conv_alpha"] = _uniform([float(tensors[f"{n}.alpha"]) for n in names])
    md["ss_network_args"] = json.dumps(args)
