"""Merge LoRAs into a model, or into one LoRA.

Into a model: W ← W + ratio · ΔW_eff for every module of every file (Linear, 1x1 and kxk conv,
text encoder included), files applied one after another, so ranks, alphas and algorithms may
all differ: ΔW_eff = (alpha/rank) · up @ down for LoRA, the LoHa/LoKr product for those, and for
DoRA the weight-decomposed delta V·d/‖V‖ − W, scaled by the ratio as A1111 and ComfyUI apply a
strength. The output keeps the input's form: diffusers folder in, folder out; single file in,
single .safetensors out.

LoRA + LoRA takes plain LoRA/LoCon files; other adapter types are merged through their dense
deltas by `svd-merge` (a refusal says so).

LoRA + LoRA, two modes:

- ``exact`` (default): ranks are concatenated, so the result's ΔW is exactly Σ ratio_i · ΔW_i
  for any ranks and alphas (`network.lowrank.combine_exact`; alpha = rank, scale 1).
- ``kohya``: kohya's merge_lora.py. Per module, base_alpha comes from the first file that has
  the module; file i is scaled by s = sqrt(alpha_i/base_alpha) · ratio_i, up by |s| and down by
  s, so the ratio acts squared (ratio 0.5 alone gives 0.25 · ΔW). Default: the ups and the
  downs are summed element-wise (equal ranks needed; the product has cross terms up_i·down_j).
  ``concat``: ups/downs concatenated along the rank, alpha = base_alpha, so file i contributes
  ratio_i·|ratio_i|·(r_i/Σr)·ΔW_i. Alpha of the result is base_alpha in both.

``shuffle`` permutes each module's rank axis (down rows, up columns) with a seeded generator;
the delta does not change.
"""

from __future__ import annotations

import logging
import math
import os
import zlib
from pathlib import Path

import torch

from ..errors import UserError
from ..fileio import require_finite
from ..network import lowrank
from ..network.adapters import module_dense
from ..network.apply import check_lora_fits
from ..network.files import LoraFile, save_dtype, save_lora
from .common import check_lora_output, check_ratios, load_loras, merged_metadata, states

log = logging.getLogger(__name__)

State = dict[str, torch.Tensor]


# ------------------------------------------------------------------ LoRA + LoRA
def merge_loras_exact(loras: list[LoraFile], ratios: list[float]) -> State:
    """Σ ratio_i · ΔW_i per module, exactly (rank Σ r_i, alpha = rank)."""
    try:
        return lowrank.combine_exact(states(loras), ratios)
    except ValueError as e:  # layouts were checked on load; keep the message if something slips through
        raise UserError(str(e)) from None


def merge_loras_kohya(loras: list[LoraFile], ratios: list[float], concat: bool = False) -> State:
    """kohya merge_lora.py's LoRA merge, formula for formula (see the module docstring)."""
    ups: dict[str, list[torch.Tensor]] = {}
    downs: dict[str, list[torch.Tensor]] = {}
    base: dict[str, tuple[float, tuple[int, ...], tuple[int, ...], str]] = {}  # alpha, down shape, up shape, file
    for lf, ratio in zip(loras, ratios):
        for name in lf.module_names():
            rank, alpha = lf.rank_alpha(name)
            down = lf.tensors[f"{name}.lora_down.weight"].float()
            up = lf.tensors[f"{name}.lora_up.weight"].float()
            if name not in base:
                base[name] = (alpha, tuple(down.shape), tuple(up.shape), lf.path)
                ups[name], downs[name] = [], []
            base_alpha, down_shape, up_shape, first = base[name]
            if alpha / base_alpha < 0:
                raise UserError(f"module {name}: alpha {alpha:g} has the opposite sign of {base_alpha:g} in "
                                f"{Path(first).name}; kohya's sqrt(alpha/base_alpha) is undefined", path=lf.path)
            # keep the first file's tensor layout (2-D or 4-D), with this file's rank
            down = down.reshape(rank, *down_shape[1:])
            up = up.reshape(up_shape[0], rank, *up_shape[2:])
            if not concat and tuple(down.shape) != down_shape:
                raise UserError(
                    f"weights shape mismatch merging {name}: rank {rank} here, {down_shape[0]} in "
                    f"{Path(first).name}; kohya mode sums factors element-wise and needs equal ranks "
                    "(use --concat, --mode exact or svd-merge for different ranks)", path=lf.path)
            s = math.sqrt(alpha / base_alpha) * ratio
            ups[name].append(up * abs(s))
            downs[name].append(down * s)
    out: State = {}
    for name in sorted(base):
        if concat:
            up, down = torch.cat(ups[name], dim=1), torch.cat(downs[name], dim=0)
        else:
            up, down = torch.stack(ups[name]).sum(0), torch.stack(downs[name]).sum(0)
        out[f"{name}.lora_down.weight"] = down.contiguous()
        out[f"{name}.lora_up.weight"] = up.contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(base[name][0]))
    return out


def shuffle_ranks(state: State, seed: int) -> State:
    """Permute each module's rank axis; the generator is seeded from (seed, module name)."""
    out = dict(state)
    for name in lowrank.module_names(state):
        down, up = state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"]
        g = torch.Generator().manual_seed((int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
        perm = torch.randperm(down.shape[0], generator=g)
        out[f"{name}.lora_down.weight"] = down[perm].contiguous()
        out[f"{name}.lora_up.weight"] = up[:, perm].contiguous()
    return out


# ------------------------------------------------------------------ into a model
@torch.no_grad()
def merge_into_model(model, loras: list[LoraFile], ratios: list[float]) -> int:
    """W ← W + ratio·ΔW_eff for every module of every file (any adapter); returns the module count.

    Every file is checked against the model (check_lora_fits) before any weight changes. The
    delta is computed in float32 and added to the weight in float32, then cast back to its dtype.
    """
    loras = [model.adapt_lora_file(lf) for lf in loras]  # FLUX: diffusers / ai-toolkit names -> kohya
    for lf in loras:
        check_lora_fits(model, lf)
    targets = {t.name: t.module for t in model.lora_targets(conv=True)}
    count = 0
    for lf, ratio in zip(loras, ratios):
        for name in lf.module_names():
            w = targets[name].weight
            cls, parts = lf.modules[name]
            delta = module_dense(cls, {k: v.to(w.device) for k, v in parts.items()}, w.float()).reshape(w.shape)
            w.copy_((w.float() + ratio * delta).to(w.dtype))
            count += 1
    return count


# ------------------------------------------------------------------ the whole tool
def merge_files(models: list[str | os.PathLike], ratios: list[float] | None, save_to: str | os.PathLike, *,
                model: str | os.PathLike | None = None, mode: str = "exact", concat: bool = False,
                shuffle: bool = False, seed: int = 0, precision: str = "float", save_precision: str | None = None,
                allow_pickle: bool = False) -> dict:
    """`difflora merge`: into `model` when given, else LoRA + LoRA. Returns a summary."""
    ratios = check_ratios(models, ratios)
    if mode not in ("exact", "kohya"):
        raise UserError(f"unknown merge mode {mode!r}; use exact or kohya")
    out_dtype = save_dtype(save_precision or precision)
    math_dtype = save_dtype(precision)
    save_to = Path(save_to)
    if model is not None:
        if concat or shuffle or mode != "exact":
            raise UserError("--mode, --concat and --shuffle apply to LoRA + LoRA merges, not to merging into a model")
        return _merge_into_model_files(Path(model), models, ratios, save_to, math_dtype, out_dtype, allow_pickle)
    if concat and mode != "kohya":
        raise UserError("--concat is a kohya-mode option (exact mode always concatenates ranks); add --mode kohya")
    check_lora_output(save_to)
    loras = load_loras(models)
    for lf in loras:
        if not lf.is_plain_lora():
            algos = sorted({cls.title for cls, _ in lf.modules.values()})
            raise UserError(f"is a {'/'.join(algos)} file; LoRA + LoRA merge takes plain LoRA/LoCon files. Merge other "
                            "adapter types through their dense deltas at a stated rank: difflora svd-merge --models ... "
                            "--new-rank R (with --model BASE for DoRA or LyCORIS convs)", path=lf.path)
    merged = merge_loras_kohya(loras, ratios, concat) if mode == "kohya" else merge_loras_exact(loras, ratios)
    if shuffle:
        merged = shuffle_ranks(merged, seed)
    md = merged_metadata(loras)
    md["ss_training_comment"] = (f"merged by difflora ({mode}{' concat' if concat else ''}): "
                                 + ", ".join(f"{Path(lf.path).name} x {r:g}" for lf, r in zip(loras, ratios)))
    written = save_lora(merged, save_to, md, dtype=out_dtype)
    return {"output": str(save_to), "modules": len(lowrank.module_names(merged)),
            "network_dim": written["ss_network_dim"], "network_alpha": written["ss_network_alpha"]}


def _merge_into_model_files(model_path: Path, models, ratios, save_to: Path, math_dtype, out_dtype, allow_pickle) -> dict:
    from ..models import load_model

    if not model_path.exists():
        raise UserError("model not found", path=model_path)
    single = not model_path.is_dir()
    if save_to.resolve() == model_path.resolve():
        raise UserError("--save-to is the input model; choose another path", path=save_to)
    if single:
        if save_to.suffix.lower() != ".safetensors":
            raise UserError("the input model is a single file, so the merged model is one too; "
                            "give --save-to a .safetensors path", path=save_to)
        if save_to.is_dir():
            raise UserError("is a folder; the merged model of a single-file input is a .safetensors file", path=save_to)
    else:
        if save_to.suffix.lower() in (".safetensors", ".ckpt"):
            raise UserError("the input model is a diffusers folder, so the merged model is one too; "
                            "give --save-to a folder path", path=save_to)
        if save_to.exists():
            raise UserError("output folder already exists; choose another path", path=save_to)
    loras = load_loras(models)
    m = load_model(model_path, dtype=math_dtype, allow_pickle=allow_pickle)
    n = merge_into_model(m, loras, ratios)
    merged = {t.name: t.module.weight.detach().to(out_dtype) for t in m.lora_targets(conv=True)}
    require_finite(merged, save_to, "merged model")
    m.save(save_to, single_file=single, dtype=out_dtype)
    return {"output": str(save_to), "modules": n, "form": "single file" if single else "diffusers folder"}
