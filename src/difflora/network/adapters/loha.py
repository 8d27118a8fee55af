"""LoHa: ΔW = (w1_a @ w1_b) ⊙ (w2_a @ w2_b) (LyCORIS `algo=loha`).

Keys `hada_w1_a`, `hada_w1_b`, `hada_w2_a`, `hada_w2_b`, `alpha`, with `use_tucker` on a kxk
conv also `hada_t1`, `hada_t2` (no `.weight` suffix). Shapes: `hada_w*_a` (O, r), `hada_w*_b`
(r, I·kh·kw), 2-D even for a conv (the kernel flattened into the last axis); with Tucker
`hada_w*_a` is (r, O) (transposed), `hada_w*_b` (r, I) and `hada_t*` (r, r, kh, kw), each half
W_k = einsum("i j h w, j c, i o -> o c h w", t_k, w_k_b, w_k_a). Scale alpha / w1_b.shape[0].
Initialisation as LyCORIS: w1_b ~ N(0, 1), w1_a ~ N(0, 0.1), w2_b ~ N(0, 1), w2_a = 0, t ~ N(0, 0.1).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .base import Adapter, AdapterOptions

_PAIRS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


class LoHa(Adapter):
    algo = "loha"
    title = "LoHa"
    keys = (*_PAIRS, "hada_t1", "hada_t2")
    required = _PAIRS
    markers = ("hada_w1_a", "hada_w1_b")
    output_rows = ("hada_w1_a", "hada_w2_a")
    tucker_keys = ("hada_t1", "hada_t2")

    @classmethod
    def traits(cls, shapes):
        return ("tucker",) if "hada_t1" in shapes else ()

    @classmethod
    def plan(cls, org: nn.Module, rank: int, options: AdapterOptions) -> dict[str, tuple[int, ...]]:
        out_dim, in_dim = org.weight.shape[:2]
        kernel = tuple(org.weight.shape[2:])
        if options.use_tucker and kernel not in ((), (1, 1)):
            return {key: shape for k in (1, 2) for key, shape in (
                (f"hada_w{k}_a", (rank, out_dim)), (f"hada_w{k}_b", (rank, in_dim)), (f"hada_t{k}", (rank, rank, *kernel)))}
        flat_in = in_dim * math.prod(kernel)
        return {"hada_w1_a": (out_dim, rank), "hada_w1_b": (rank, flat_in),
                "hada_w2_a": (out_dim, rank), "hada_w2_b": (rank, flat_in)}

    def init_fresh(self) -> None:
        with torch.no_grad():
            if "hada_t1" in self.shapes:
                nn.init.normal_(self.hada_t1, std=0.1)
                nn.init.normal_(self.hada_t2, std=0.1)
            nn.init.normal_(self.hada_w1_b, std=1.0)
            nn.init.normal_(self.hada_w1_a, std=0.1)
            nn.init.normal_(self.hada_w2_b, std=1.0)
            nn.init.zeros_(self.hada_w2_a)

    @staticmethod
    def dense(t):
        if "hada_t1" in t:
            halves = [torch.einsum("i j h w, j c, i o -> o c h w", t[f"hada_t{k}"], t[f"hada_w{k}_b"], t[f"hada_w{k}_a"])
                      for k in (1, 2)]
            return (halves[0] * halves[1]).reshape(halves[0].shape[0], -1)
        return (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])

    @staticmethod
    def rank_of(shapes):
        return int(shapes["hada_w1_b"][0])

    @classmethod
    def flat_shape(cls, shapes):
        if "hada_t1" in shapes:
            return int(shapes["hada_w1_a"][1]), int(shapes["hada_w1_b"][1] * math.prod(shapes["hada_t1"][2:]))
        return int(shapes["hada_w1_a"][0]), int(shapes["hada_w1_b"][1])

    @classmethod
    def kernel(cls, shapes):
        return tuple(shapes["hada_t1"][2:]) if "hada_t1" in shapes else None

    @classmethod
    def check_shapes(cls, name, shapes):
        tucker = "hada_t1" in shapes
        if tucker != ("hada_t2" in shapes):
            return "has one of hada_t1 / hada_t2 but not the other"
        if any(len(shapes[k]) != 2 for k in _PAIRS):
            return "hada_w*_a / hada_w*_b must be 2-D, are " + ", ".join(f"{tuple(shapes[k])}" for k in _PAIRS)
        r = shapes["hada_w1_b"][0]
        for k in (1, 2):
            a, b = shapes[f"hada_w{k}_a"], shapes[f"hada_w{k}_b"]
            if tucker:
                t = shapes[f"hada_t{k}"]
                ok = a[0] == b[0] == r and len(t) == 4 and tuple(t[:2]) == (r, r)
            else:
                ok = a[1] == b[0] == r
            if not ok:
                return f"inconsistent shapes: hada_w{k}_a {tuple(a)}, hada_w{k}_b {tuple(b)}" + (
                    f", hada_t{k} {tuple(shapes[f'hada_t{k}'])}" if tucker else "")
        if cls._half_shape(shapes, 1) != cls._half_shape(shapes, 2):
            return "the two Hadamard halves have different shapes"
        return None

    @staticmethod
    def _half_shape(shapes, k):
        if "hada_t1" in shapes:
            return shapes[f"hada_w{k}_a"][1], shapes[f"hada_w{k}_b"][1], tuple(shapes[f"hada_t{k}"][2:])
        return shapes[f"hada_w{k}_a"][0], shapes[f"hada_w{k}_b"][1]

    def options(self):
        return {"tucker": "hada_t1" in self.shapes}
