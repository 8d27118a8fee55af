"""LoKr: ΔW = kron(w1, w2) (LyCORIS `algo=lokr`).

O = out_l·out_k and I = in_m·in_n are split by `factorization(dim, factor)`; w1 is the small
factor (out_l, in_m), w2 the large one (out_k, in_n[, kh, kw]). Keys `lokr_w1` or `lokr_w1_a` +
`lokr_w1_b` (w1 low-rank only with `decompose_both`), `lokr_w2` or `lokr_w2_a` + `lokr_w2_b`
(w2 low-rank when rank < max(out_k, in_n)/2 and not `full_matrix`), with `use_tucker` on a kxk
conv `lokr_t2` (r, r, kh, kw) and a transposed `lokr_w2_a` (r, out_k); otherwise a conv's
`lokr_w2_b` is 2-D (r, in_n·kh·kw). Scale alpha / rank with the rank of w2_b (else w1_b); when
both factors are full matrices the scale is 1 and the stored alpha is the rank, as LyCORIS
writes it and as A1111/ComfyUI read it. Initialisation as LyCORIS: w2 (or w2_b) zero, the rest
kaiming-uniform.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from pydantic import Field

from .base import Adapter, AdapterJobKeys, AdapterOptions


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n) with m·n = dimension, m ≤ n: `factor` itself when it divides, else the most square
    pair with m ≤ factor (-1: no bound). LyCORIS' split, e.g. 320 -> (16, 20), f=8: 320 -> (8, 40)."""
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return (m, n) if m <= n else (n, m)
    bound = dimension if factor < 0 else factor
    m, n = 1, dimension
    while m < n:
        new_m = m + 1
        while dimension % new_m:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > m + n or new_m > bound:
            break
        m, n = new_m, new_n
    return (m, n) if m <= n else (n, m)


class LoKrJobKeys(AdapterJobKeys):
    network_factor: int = Field(-1, description="LoKr Kronecker factor (-1: most square split)")
    network_decompose_both: bool = Field(False, description="LoKr: the small Kronecker factor low-rank too")
    network_full_matrix: bool = Field(False, description="LoKr: both Kronecker factors full matrices (scale 1)")


class LoKr(Adapter):
    algo = "lokr"
    title = "LoKr"
    keys = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
    required = ()  # one of each alternative; see check_shapes
    markers = ("lokr_w1", "lokr_w1_a", "lokr_w2", "lokr_w2_a")
    lycoris_args = ("use_tucker", "factor", "decompose_both", "full_matrix")
    job_options = LoKrJobKeys
    output_rows = ("lokr_w1", "lokr_w1_a")  # w1's rows index the Kronecker product's outer row blocks
    tucker_keys = ("lokr_t2",)

    @classmethod
    def traits(cls, shapes):
        return tuple(t for t, on in (("tucker", "lokr_t2" in shapes), ("w1 low-rank", "lokr_w1_a" in shapes),
                                     ("w2 full", "lokr_w2" in shapes)) if on)

    @classmethod
    def plan(cls, org: nn.Module, rank: int, options: AdapterOptions) -> dict[str, tuple[int, ...]]:
        out_dim, in_dim = org.weight.shape[:2]
        kernel = tuple(org.weight.shape[2:])
        out_l, out_k = factorization(out_dim, options.factor)
        in_m, in_n = factorization(in_dim, options.factor)
        shapes: dict[str, tuple[int, ...]] = {}
        if options.decompose_both and rank < max(out_l, in_m) / 2 and not options.full_matrix:
            shapes.update(lokr_w1_a=(out_l, rank), lokr_w1_b=(rank, in_m))
        else:
            shapes["lokr_w1"] = (out_l, in_m)
        if rank >= max(out_k, in_n) / 2 or options.full_matrix:
            shapes["lokr_w2"] = (out_k, in_n, *kernel)
        elif options.use_tucker and kernel not in ((), (1, 1)):
            shapes.update(lokr_t2=(rank, rank, *kernel), lokr_w2_a=(rank, out_k), lokr_w2_b=(rank, in_n))
        else:
            shapes.update(lokr_w2_a=(out_k, rank), lokr_w2_b=(rank, in_n * math.prod(kernel)))
        return shapes

    @classmethod
    def stored_alpha(cls, shapes, rank: int, alpha: float | None) -> float | None:
        # both factors full: no rank to divide by; LyCORIS stores alpha = rank (scale 1)
        return float(rank) if cls._both_full(shapes) else alpha

    def init_fresh(self) -> None:
        with torch.no_grad():
            if "lokr_w2" in self.shapes:
                nn.init.zeros_(self.lokr_w2)
            else:
                if "lokr_t2" in self.shapes:
                    nn.init.kaiming_uniform_(self.lokr_t2, a=math.sqrt(5))
                nn.init.kaiming_uniform_(self.lokr_w2_a, a=math.sqrt(5))
                nn.init.zeros_(self.lokr_w2_b)
            if "lokr_w1" in self.shapes:
                nn.init.kaiming_uniform_(self.lokr_w1, a=math.sqrt(5))
            else:
                nn.init.kaiming_uniform_(self.lokr_w1_a, a=math.sqrt(5))
                nn.init.kaiming_uniform_(self.lokr_w1_b, a=math.sqrt(5))

    @staticmethod
    def dense(t):
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
        if "lokr_w2" in t:
            w2 = t["lokr_w2"]
        elif "lokr_t2" in t:
            w2 = torch.einsum("i j h w, i o, j c -> o c h w", t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
        else:
            w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        out = torch.kron(w1, w2.contiguous())
        return out.reshape(out.shape[0], -1)

    @staticmethod
    def _both_full(shapes) -> bool:
        return "lokr_w1_b" not in shapes and "lokr_w2_b" not in shapes

    @staticmethod
    def rank_of(shapes):
        for key in ("lokr_w2_b", "lokr_w1_b"):
            if key in shapes:
                return int(shapes[key][0])
        return 0  # both factors full: no rank

    @classmethod
    def scale_of(cls, shapes, alpha):
        return 1.0 if cls._both_full(shapes) else alpha / cls.rank_of(shapes)

    @classmethod
    def _w1_shape(cls, shapes):
        if "lokr_w1" in shapes:
            return tuple(shapes["lokr_w1"])
        return shapes["lokr_w1_a"][0], shapes["lokr_w1_b"][1]

    @classmethod
    def _w2_flat(cls, shapes):
        if "lokr_w2" in shapes:
            w2 = shapes["lokr_w2"]
            return w2[0], math.prod(w2[1:])
        if "lokr_t2" in shapes:
            return shapes["lokr_w2_a"][1], shapes["lokr_w2_b"][1] * math.prod(shapes["lokr_t2"][2:])
        return shapes["lokr_w2_a"][0], shapes["lokr_w2_b"][1]

    @classmethod
    def flat_shape(cls, shapes):
        (a, c), (b, d) = cls._w1_shape(shapes), cls._w2_flat(shapes)
        return int(a * b), int(c * d)

    @classmethod
    def kernel(cls, shapes):
        if "lokr_w2" in shapes:
            k = tuple(shapes["lokr_w2"][2:])
            return () if k in ((), (1, 1)) else k
        return tuple(shapes["lokr_t2"][2:]) if "lokr_t2" in shapes else None

    @classmethod
    def check_shapes(cls, name, shapes):
        for half, keys in (("w1", ("lokr_w1_a", "lokr_w1_b")), ("w2", ("lokr_w2_a", "lokr_w2_b"))):
            has_full, has_parts = f"lokr_{half}" in shapes, [k in shapes for k in keys]
            if has_full == any(has_parts) or (any(has_parts) and not all(has_parts)):
                missing = [k for k in keys if k not in shapes]
                return (f"needs lokr_{half} or both {' and '.join(keys)}" +
                        (f"; {missing[0]} is missing" if any(has_parts) and missing else ""))
        if "lokr_w1" in shapes and len(shapes["lokr_w1"]) != 2:
            return f"lokr_w1 must be 2-D, is {tuple(shapes['lokr_w1'])}"
        if "lokr_w1_a" in shapes and shapes["lokr_w1_a"][1] != shapes["lokr_w1_b"][0]:
            return f"inconsistent shapes: lokr_w1_a {tuple(shapes['lokr_w1_a'])}, lokr_w1_b {tuple(shapes['lokr_w1_b'])}"
        if "lokr_w2_a" in shapes:
            a, b = shapes["lokr_w2_a"], shapes["lokr_w2_b"]
            if "lokr_t2" in shapes:
                t = shapes["lokr_t2"]
                ok = len(a) == len(b) == 2 and a[0] == b[0] and len(t) == 4 and tuple(t[:2]) == (a[0], a[0])
            else:
                ok = len(a) == len(b) == 2 and a[1] == b[0]
            if not ok:
                return f"inconsistent shapes: lokr_w2_a {tuple(a)}, lokr_w2_b {tuple(b)}"
        elif "lokr_t2" in shapes:
            return "lokr_t2 without lokr_w2_a / lokr_w2_b"
        return None

    def options(self):
        return {"tucker": "lokr_t2" in self.shapes, "w1": "low-rank" if "lokr_w1_a" in self.shapes else "full",
                "w2": "full" if "lokr_w2" in self.shapes else "low-rank"}
