"""The FLUX.1 transformer in Black Forest Labs' layout (module names as in `flux1-dev.safetensors`).

BFL's layout is the one kohya's LoRA names are made from (`double_blocks.0.img_attn.qkv` ->
`lora_unet_double_blocks_0_img_attn_qkv`), with fused q/k/v and a fused single-block
`linear1` (q, k, v, MLP in). Keeping the model in this layout makes every kohya module one
nn.Linear, so LoRA hooks attach and merge without splitting; diffusers folders are converted to
it on load (models/flux_convert.py). The maths equals diffusers' FluxTransformer2DModel
(checked in tests to 1e-5 fp32).

Inputs are packed latents: (B, L_img, in_channels) image tokens, (B, L_txt, context_in_dim) T5
states, (B, vec_in_dim) pooled CLIP, timesteps σ in [0, 1], guidance (dev) and position ids
(B, L, 3).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass
class FluxParams:
    in_channels: int = 64
    out_channels: int = 64
    vec_in_dim: int = 768
    context_in_dim: int = 4096
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19
    depth_single_blocks: int = 38
    axes_dim: list[int] = field(default_factory=lambda: [16, 56, 56])
    theta: int = 10_000
    qkv_bias: bool = True
    guidance_embed: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


FLUX_DEV = FluxParams()
FLUX_SCHNELL = FluxParams(guidance_embed=False)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0, time_factor: float = 1000.0) -> torch.Tensor:
    """Sinusoidal embedding of σ·1000, cosines first (BFL and diffusers agree on this order)."""
    t = time_factor * t.float()
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope(pos: torch.Tensor, dim: int, theta: int) -> torch.Tensor:
    """Rotation angles' (cos, sin) for one position axis: (..., n, dim/2, 2)."""
    scale = torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim
    omega = 1.0 / (theta ** scale)
    angles = pos.double()[..., None] * omega
    return torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1).float()


def apply_rope(x: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs (x0, x1) of head channels of x (B, H, L, D) by their angle:
    (x0·cos − x1·sin, x0·sin + x1·cos), BFL's rotation, written as x·cos + (−x1, x0)·sin with pe = (cos, sin)
    (2, B, 1, L, D): its backward is two products, where the 2x2-matrix form's element selection cost zero-filled
    copies (3% of a CPU training step)."""
    xf = x.float()
    x0, x1 = xf.unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack([-x1, x0], dim=-1).flatten(-2)
    return (xf * pe[0] + rotated * pe[1]).type_as(x)


class PositionEmbedder(nn.Module):
    def __init__(self, theta: int, axes_dim: list[int]):
        super().__init__()
        self.theta = theta
        self.axes_dim = list(axes_dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """(cos, sin) of every head channel: (2, B, 1, L, D), each pair's angle repeated for its two channels."""
        emb = torch.cat([rope(ids[..., i], d, self.theta) for i, d in enumerate(self.axes_dim)], dim=-2)
        return emb.movedim(-1, 0).repeat_interleave(2, dim=-1).unsqueeze(2)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden)
        self.silu = nn.SiLU()
        self.out_layer = nn.Linear(hidden, hidden)

    def forward(self, x):
        return self.out_layer(self.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        return x.to(dtype) * self.scale.to(dtype)


class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)

    def forward(self, q, k, v):
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)


class Modulation(nn.Module):
    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim)

    def forward(self, vec):
        return self.lin(F.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)


def _heads(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, L, 3·H·D) -> three (B, H, L, D)."""
    b, length, _ = qkv.shape
    q, k, v = qkv.view(b, length, 3, num_heads, -1).permute(2, 0, 3, 1, 4)
    return q, k, v


def attention(q, k, v, pe, mask=None):
    q, k = apply_rope(q, pe), apply_rope(k, pe)
    x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    b, h, length, d = x.shape
    return x.transpose(1, 2).reshape(b, length, h * d)


def _mlp(hidden: int, mlp_hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(hidden, mlp_hidden), nn.GELU(approximate="tanh"), nn.Linear(mlp_hidden, hidden))


class DoubleStreamBlock(nn.Module):
    def __init__(self, hidden: int, num_heads: int, mlp_ratio: float, qkv_bias: bool):
        super().__init__()
        mlp_hidden = int(hidden * mlp_ratio)
        self.num_heads = num_heads
        for side in ("img", "txt"):
            setattr(self, f"{side}_mod", Modulation(hidden, double=True))
            setattr(self, f"{side}_norm1", nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6))
            setattr(self, f"{side}_attn", SelfAttention(hidden, num_heads, qkv_bias))
            setattr(self, f"{side}_norm2", nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6))
            setattr(self, f"{side}_mlp", _mlp(hidden, mlp_hidden))

    def forward(self, img, txt, vec, pe, mask=None):
        i_shift1, i_scale1, i_gate1, i_shift2, i_scale2, i_gate2 = self.img_mod(vec)
        t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = self.txt_mod(vec)
        iq, ik, iv = _heads(self.img_attn.qkv((1 + i_scale1) * self.img_norm1(img) + i_shift1), self.num_heads)
        iq, ik = self.img_attn.norm(iq, ik, iv)
        tq, tk, tv = _heads(self.txt_attn.qkv((1 + t_scale1) * self.txt_norm1(txt) + t_shift1), self.num_heads)
        tq, tk = self.txt_attn.norm(tq, tk, tv)
        attn = attention(torch.cat([tq, iq], 2), torch.cat([tk, ik], 2), torch.cat([tv, iv], 2), pe, mask)
        n_txt = txt.shape[1]
        txt_attn, img_attn = attn[:, :n_txt].contiguous(), attn[:, n_txt:].contiguous()
        img = img + i_gate1 * self.img_attn.proj(img_attn)
        img = img + i_gate2 * self.img_mlp((1 + i_scale2) * self.img_norm2(img) + i_shift2)
        txt = txt + t_gate1 * self.txt_attn.proj(txt_attn)
        txt = txt + t_gate2 * self.txt_mlp((1 + t_scale2) * self.txt_norm2(txt) + t_shift2)
        return img, txt


class SingleStreamBlock(nn.Module):
    def __init__(self, hidden: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.hidden = hidden
        self.num_heads = num_heads
        self.mlp_hidden = int(hidden * mlp_ratio)
        self.linear1 = nn.Linear(hidden, hidden * 3 + self.mlp_hidden)
        self.linear2 = nn.Linear(hidden + self.mlp_hidden, hidden)
        self.norm = QKNorm(hidden // num_heads)
        self.pre_norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(hidden, double=False)

    def forward(self, x, vec, pe, mask=None):
        shift, scale, gate = self.modulation(vec)
        qkv, mlp = torch.split(self.linear1((1 + scale) * self.pre_norm(x) + shift), [3 * self.hidden, self.mlp_hidden], -1)
        q, k, v = _heads(qkv, self.num_heads)
        q, k = self.norm(q, k, v)
        out = self.linear2(torch.cat([attention(q, k, v, pe, mask), self.mlp_act(mlp)], 2))
        return x + gate * out


class LastLayer(nn.Module):
    def __init__(self, hidden: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x, vec):
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=1)
        return self.linear((1 + scale[:, None]) * self.norm_final(x) + shift[:, None])


class FluxTransformer(nn.Module):
    """FLUX.1 (dev with the guidance embedder, schnell without)."""

    def __init__(self, params: FluxParams):
        super().__init__()
        p = self.params = params
        if p.hidden_size % p.num_heads or sum(p.axes_dim) != p.hidden_size // p.num_heads:
            raise ValueError("hidden_size / num_heads must equal sum(axes_dim)")
        self.pe_embedder = PositionEmbedder(p.theta, p.axes_dim)
        self.img_in = nn.Linear(p.in_channels, p.hidden_size)
        self.time_in = MLPEmbedder(256, p.hidden_size)
        self.vector_in = MLPEmbedder(p.vec_in_dim, p.hidden_size)
        self.guidance_in = MLPEmbedder(256, p.hidden_size) if p.guidance_embed else nn.Identity()
        self.txt_in = nn.Linear(p.context_in_dim, p.hidden_size)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(p.hidden_size, p.num_heads, p.mlp_ratio, p.qkv_bias) for _ in range(p.depth))
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(p.hidden_size, p.num_heads, p.mlp_ratio) for _ in range(p.depth_single_blocks))
        self.final_layer = LastLayer(p.hidden_size, p.out_channels)
        self.gradient_checkpointing = False
        self.checkpoint_cpu_offload = False
        self.block_swap = None  # low_vram.BlockSwap when blocks_to_swap is set

    @property
    def dtype(self) -> torch.dtype:
        return self.img_in.bias.dtype

    def blocks(self) -> list[nn.Module]:
        return [*self.double_blocks, *self.single_blocks]

    def enable_gradient_checkpointing(self, cpu_offload: bool = False) -> None:
        self.gradient_checkpointing = True
        self.checkpoint_cpu_offload = cpu_offload
        if self.block_swap is not None:
            self.block_swap.checkpoint_others = True

    def _run(self, block, *args):
        if self.block_swap is not None:
            return self.block_swap.run(block, *args)
        if self.gradient_checkpointing and torch.is_grad_enabled():
            if self.checkpoint_cpu_offload:
                with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
                    return checkpoint(block, *args, use_reentrant=False)
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward(self, img, img_ids, txt, txt_ids, timesteps, y, guidance=None, txt_mask=None):
        """txt_mask (B, L_txt), 1 for real T5 tokens: padded text keys are masked out (apply_t5_attn_mask)."""
        dtype = self.dtype
        img = self.img_in(img.to(dtype))
        vec = self.time_in(timestep_embedding(timesteps, 256).to(dtype))
        if self.params.guidance_embed:
            if guidance is None:
                raise ValueError("this FLUX model has a guidance embedder (dev): pass guidance")
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256).to(dtype))
        vec = vec + self.vector_in(y.to(dtype))
        txt = self.txt_in(txt.to(dtype))
        pe = self.pe_embedder(torch.cat([txt_ids, img_ids], dim=1))
        mask = None
        if txt_mask is not None:
            keys = torch.cat([txt_mask.bool(), torch.ones(img.shape[:2], dtype=torch.bool, device=img.device)], 1)
            mask = keys[:, None, None, :]
        for block in self.double_blocks:
            img, txt = self._run(block, img, txt, vec, pe, mask)
        x = torch.cat([txt, img], 1)
        for block in self.single_blocks:
            x = self._run(block, x, vec, pe, mask)
        return self.final_layer(x[:, txt.shape[1]:], vec)
