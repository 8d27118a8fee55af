"""SVD merge of two LoRAs on the real SD1.5 layout: difflora's factor SVD vs a dense per-module SVD.

Two random LoRAs (rank 32, alphas 16 and 8, ratios 0.7 and -0.5) over every kohya target of
the real SD1.5 text encoder and U-Net (the U-Net with its 3x3 ResNet/sampler convs, "C3Lier";
`--no-conv` for attention/MLP only). Module shapes come from the real architecture built on the
meta device; only the LoRA factors are allocated. Both are merged to rank 16 on the CPU:

- difflora: `network.lowrank.svd_rerank`, the SVD computed from the factors (thin QRs of the stacked
  factors and the SVD of a 64 x 64 matrix per module);
- peer, as kohya's svd_merge_lora.py does it: accumulate the dense ΔW = Σ ratio·scale·up@down
  in float32, then `torch.linalg.svd` of it. The peer is given `full_matrices=False` (kohya
  calls the default full_matrices=True, which is slower still), so its time is a lower bound
  of kohya's.

All modules are timed for both methods, in one run (`--subset N`: every N-th module only, for
a quick run; it says so, and both methods are then timed on that subset). Accuracy:
(a) difflora vs the peer on every module: max |ΔW16_ours − ΔW16_peer| absolute, and divided by
    the module's max |ΔW16| (relative), maximum over modules. This is dominated by the float32
    peer's own rounding when the 16th and 17th singular values are close;
(b) both against a float64 dense SVD (untimed) on the modules where (a) is largest plus a fixed
    spread of modules: this is where the ≤ 1e-4 relative target is checked for difflora.
The full run takes 8-10 minutes on 2 cores shared with other work (measured: peer 461 s at load ~4),
mostly the peer's SVDs of the 3x3 convs; `--subset 10` takes under a minute.

    OMP_NUM_THREADS=1 python bench/svd_merge.py [--threads 1] [--no-conv] [--subset N]
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import time
from pathlib import Path

import torch

from difflora.fileio import write_json_atomic
from difflora.models.sd.model import text_encoder_lora_targets, unet_lora_targets
from difflora.toy.tiny import build_real_architecture
from difflora.network import lowrank as lora_math

RANK_IN, RANK_OUT = 32, 16
ALPHAS = (16.0, 8.0)
RATIOS = (0.7, -0.5)
REF_WORST, REF_SPREAD = 6, 8  # modules checked against a float64 dense SVD


def module_shapes(conv: bool) -> list[tuple[str, tuple[int, ...], bool]]:
    """(kohya name, weight shape, is conv) of every SD1.5 target, from the meta-device model."""
    unet, te = build_real_architecture("sd1", device="meta")
    targets = text_encoder_lora_targets(te) + unet_lora_targets(unet, conv)
    return [(t.name, tuple(t.module.weight.shape), isinstance(t.module, torch.nn.Conv2d)) for t in targets]


def random_lora(shapes, rank: int, alpha: float, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape, is_conv in shapes:
        out, inp = shape[0], shape[1]
        if is_conv:
            down = torch.randn(rank, inp, *shape[2:], generator=g) / (inp * shape[2] * shape[3]) ** 0.5
            up = torch.randn(out, rank, 1, 1, generator=g) * 0.05
        else:
            down = torch.randn(rank, inp, generator=g) / inp ** 0.5
            up = torch.randn(out, rank, generator=g) * 0.05
        sd[f"{name}.lora_down.weight"] = down
        sd[f"{name}.lora_up.weight"] = up
        sd[f"{name}.alpha"] = torch.tensor(alpha)
    return sd


def dense_svd_merge(states, ratios, names, rank: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """kohya's svd_merge_lora.py per module: dense accumulation in float32, then a full SVD."""
    out = {}
    for name in names:
        mat = None
        for sd, ratio in zip(states, ratios):
            d = lora_math.dense_delta(sd, name, ratio)  # ratio · alpha/rank · up @ down, (out, in·kh·kw)
            mat = d if mat is None else mat + d
        u, s, vh = torch.linalg.svd(mat, full_matrices=False)
        k = min(rank, mat.shape[0], mat.shape[1])
        out[name] = (u[:, :k] * s[:k], vh[:k])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--no-conv", action="store_true", help="attention/MLP modules only (no 3x3 convs)")
    ap.add_argument("--subset", type=int, default=1, help="time the dense peer on every N-th module (default 1: all)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "svd_merge.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)

    shapes = module_shapes(conv=not args.no_conv)
    names_all = [n for n, _, _ in shapes]
    states = [random_lora(shapes, RANK_IN, a, seed=i) for i, a in enumerate(ALPHAS)]
    names = names_all[:: max(1, args.subset)]
    subset_note = ("all modules" if args.subset <= 1 else
                   f"every {args.subset}-th module ({len(names)} of {len(names_all)}); both methods timed on this subset")
    print(f"SD1.5 {'TE + U-Net C3Lier' if not args.no_conv else 'TE + U-Net LierLa'}: {len(names_all)} modules, "
          f"two rank-{RANK_IN} LoRAs -> rank {RANK_OUT}, CPU, {args.threads} thread(s); timed on {subset_note}")
    keep = set(names)
    sub_states = [{k: v for k, v in sd.items() if k.split(".", 1)[0] in keep} for sd in states]

    t = time.perf_counter()
    ours = lora_math.svd_rerank(sub_states, list(RATIOS), RANK_OUT, RANK_OUT)
    t_ours = time.perf_counter() - t
    print(f"difflora factor SVD: {t_ours:8.2f} s")

    t = time.perf_counter()
    dense = dense_svd_merge(sub_states, list(RATIOS), names, RANK_OUT)
    t_dense = time.perf_counter() - t
    print(f"dense SVD (peer):    {t_dense:8.2f} s")

    # (a) difflora vs the timed float32 peer, every module
    rows = []  # (rel, abs, rel_fro, name)
    for name in names:
        d_ours = lora_math.dense_delta(ours, name).double()
        d_dense = dense[name][0].double() @ dense[name][1].double()
        diff = float((d_ours - d_dense).abs().max())
        rows.append((diff / float(d_dense.abs().max()), diff,
                     float(torch.linalg.norm(d_ours - d_dense) / torch.linalg.norm(d_dense)), name))
    max_rel, max_abs, max_fro = max(r[0] for r in rows), max(r[1] for r in rows), max(r[2] for r in rows)
    worst = max(rows)[3]
    ratio = t_dense / t_ours
    print(f"speed-up:            {ratio:8.1f}x   (target >= 5x)")
    print(f"difflora vs float32 peer, all {len(names)} modules: max |dW16_ours - dW16_dense| absolute {max_abs:.3g}; "
          f"relative to the module's max |dW16| {max_rel:.3g} (worst {worst}); relative Frobenius {max_fro:.3g}")

    # (b) which one is right: a float64 dense SVD (untimed) on the modules where they disagree most, plus a
    # fixed spread of modules; target <= 1e-4 relative for difflora
    by_disagreement = [r[3] for r in sorted(rows, reverse=True)[:REF_WORST]]
    spread = names[:: max(1, len(names) // REF_SPREAD)][:REF_SPREAD]
    ref_names = list(dict.fromkeys(by_disagreement + spread))
    ref_ours, ref_dense = 0.0, 0.0
    for name in ref_names:
        mat = sum(lora_math.factors(sd, name, r).coeff * (sd[f"{name}.lora_up.weight"].double().flatten(1)
                                                           @ sd[f"{name}.lora_down.weight"].double().flatten(1))
                  for sd, r in zip(sub_states, RATIOS))
        u, sv, vh = torch.linalg.svd(mat, full_matrices=False)
        d_ref = (u[:, :RANK_OUT] * sv[:RANK_OUT]) @ vh[:RANK_OUT]
        scale = float(d_ref.abs().max())
        ref_ours = max(ref_ours, float((lora_math.dense_delta(ours, name).double() - d_ref).abs().max()) / scale)
        ref_dense = max(ref_dense, float((dense[name][0].double() @ dense[name][1].double() - d_ref).abs().max()) / scale)
    print(f"against a float64 dense SVD on {len(ref_names)} modules ({REF_WORST} most disagreeing + {len(spread)} spread): "
          f"max relative error difflora {ref_ours:.2g} (target <= 1e-4), float32 dense peer {ref_dense:.2g}")

    write_json_atomic(args.out, {
        "benchmark": "svd_merge",
        "architecture": "SD1.5 (real shapes, meta device)",
        "modules_total": len(names_all),
        "modules_timed": len(names),
        "subset": subset_note,
        "conv_3x3": not args.no_conv,
        "rank_in": RANK_IN, "rank_out": RANK_OUT, "alphas": list(ALPHAS), "ratios": list(RATIOS),
        "threads": args.threads,
        "seconds_difflora_factor_svd": round(t_ours, 3),
        "seconds_dense_svd": round(t_dense, 3),
        "dense_svd_note": "float32 dense accumulation + torch.linalg.svd(full_matrices=False) per module, "
                          "as kohya svd_merge_lora.py (which uses full_matrices=True)",
        "speedup": round(ratio, 2),
        "vs_peer_max_abs_diff": max_abs,
        "vs_peer_max_rel_diff": max_rel,
        "vs_peer_max_rel_fro_diff": max_fro,
        "rel_diff_definition": "max over modules of max|dW16_ours - dW16_dense| / max|dW16_dense|; "
                               "fro: ||dW16_ours - dW16_dense||_F / ||dW16_dense||_F",
        "worst_module": worst,
        "float64_reference": {
            "modules": ref_names,
            "max_rel_err_difflora": ref_ours,
            "max_rel_err_dense_float32_peer": ref_dense,
            "note": "best rank-16 approximation from a float64 dense SVD; relative = max|err| / max|dW16|",
        },
        "torch": torch.__version__,
        "machine": platform.machine(),
        "python": sys.version.split()[0],
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    })
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
