"""FLUX.1 layouts: BFL single-file keys <-> diffusers FluxTransformer2DModel keys, configs, LoRA names.

BFL fuses q/k/v (double blocks) and q/k/v/MLP-in (single blocks `linear1`) into one Linear;
diffusers splits them. The final adaLN modulation is (shift, scale) in BFL and (scale, shift) in
diffusers. Everything else is a rename. Both directions are pure tensor reshuffles, so a round
trip is exact.
"""

from __future__ import annotations

import re

import torch

from .transformer import FluxParams

BFL_PREFIXES = ("model.diffusion_model.", "diffusion_model.")

# (BFL suffix inside a double block, diffusers suffixes inside transformer_blocks.i) - renames
_DOUBLE_RENAMES = {
    "img_mod.lin": "norm1.linear",
    "txt_mod.lin": "norm1_context.linear",
    "img_attn.proj": "attn.to_out.0",
    "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.net.0.proj",
    "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj",
    "txt_mlp.2": "ff_context.net.2",
}
_DOUBLE_NORMS = {
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight",
    "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
}
_DOUBLE_FUSED = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
_SINGLE_RENAMES = {"linear2": "proj_out", "modulation.lin": "norm.linear"}
_SINGLE_NORMS = {"norm.query_norm.scale": "attn.norm_q.weight", "norm.key_norm.scale": "attn.norm_k.weight"}
_SINGLE_FUSED = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
_TOP_RENAMES = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
}
_FINAL_MOD = ("final_layer.adaLN_modulation.1", "norm_out.linear")


def module_map(params: FluxParams) -> dict[str, tuple[str, ...]]:
    """Every BFL Linear -> its diffusers Linear(s) (several when BFL fuses them)."""
    out: dict[str, tuple[str, ...]] = {k: (v,) for k, v in _TOP_RENAMES.items()
                                       if params.guidance_embed or not k.startswith("guidance_in")}
    for i in range(params.depth):
        for b, d in _DOUBLE_RENAMES.items():
            out[f"double_blocks.{i}.{b}"] = (f"transformer_blocks.{i}.{d}",)
        for b, ds in _DOUBLE_FUSED.items():
            out[f"double_blocks.{i}.{b}"] = tuple(f"transformer_blocks.{i}.{d}" for d in ds)
    for i in range(params.depth_single_blocks):
        for b, d in _SINGLE_RENAMES.items():
            out[f"single_blocks.{i}.{b}"] = (f"single_transformer_blocks.{i}.{d}",)
        out[f"single_blocks.{i}.linear1"] = tuple(f"single_transformer_blocks.{i}.{d}" for d in _SINGLE_FUSED)
    return out


def split_sizes(bfl_module: str, params: FluxParams) -> list[int]:
    """Output sizes of the diffusers pieces of a fused BFL Linear."""
    h = params.hidden_size
    if bfl_module.endswith("linear1"):
        return [h, h, h, int(h * params.mlp_ratio)]
    return [h, h, h]


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def strip_bfl_prefix(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in BFL_PREFIXES:
        if any(k.startswith(prefix) for k in sd):
            return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return sd


def bfl_to_diffusers(sd: dict[str, torch.Tensor], params: FluxParams) -> dict[str, torch.Tensor]:
    """BFL transformer state dict (bare keys) -> diffusers FluxTransformer2DModel state dict."""
    out: dict[str, torch.Tensor] = {}
    norms = {f"double_blocks.{i}.{b}": f"transformer_blocks.{i}.{d}"
             for i in range(params.depth) for b, d in _DOUBLE_NORMS.items()}
    norms.update({f"single_blocks.{i}.{b}": f"single_transformer_blocks.{i}.{d}"
                  for i in range(params.depth_single_blocks) for b, d in _SINGLE_NORMS.items()})
    for bfl, targets in module_map(params).items():
        for kind in ("weight", "bias"):
            t = sd.get(f"{bfl}.{kind}")
            if t is None:
                continue
            if len(targets) == 1:
                out[f"{targets[0]}.{kind}"] = t
            else:
                for name, piece in zip(targets, torch.split(t, split_sizes(bfl, params), dim=0)):
                    out[f"{name}.{kind}"] = piece.contiguous()
    for bfl, d in norms.items():
        out[d] = sd[bfl]
    for kind in ("weight", "bias"):
        out[f"{_FINAL_MOD[1]}.{kind}"] = _swap_halves(sd[f"{_FINAL_MOD[0]}.{kind}"])
    return out


def diffusers_to_bfl(sd: dict[str, torch.Tensor], params: FluxParams) -> dict[str, torch.Tensor]:
    """diffusers FluxTransformer2DModel state dict -> BFL bare keys."""
    out: dict[str, torch.Tensor] = {}
    for bfl, targets in module_map(params).items():
        for kind in ("weight", "bias"):
            pieces = [sd.get(f"{t}.{kind}") for t in targets]
            if any(p is None for p in pieces):
                continue
            out[f"{bfl}.{kind}"] = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)
    for i in range(params.depth):
        for b, d in _DOUBLE_NORMS.items():
            out[f"double_blocks.{i}.{b}"] = sd[f"transformer_blocks.{i}.{d}"]
    for i in range(params.depth_single_blocks):
        for b, d in _SINGLE_NORMS.items():
            out[f"single_blocks.{i}.{b}"] = sd[f"single_transformer_blocks.{i}.{d}"]
    for kind in ("weight", "bias"):
        out[f"{_FINAL_MOD[0]}.{kind}"] = _swap_halves(sd[f"{_FINAL_MOD[1]}.{kind}"])
    return out


# ------------------------------------------------------------------ configs
def params_from_diffusers_config(cfg: dict) -> FluxParams:
    heads, head_dim = int(cfg.get("num_attention_heads", 24)), int(cfg.get("attention_head_dim", 128))
    patch = int(cfg.get("patch_size", 1))
    in_ch = int(cfg.get("in_channels", 64)) * patch * patch
    return FluxParams(
        in_channels=in_ch, out_channels=int(cfg.get("out_channels") or in_ch),
        vec_in_dim=int(cfg.get("pooled_projection_dim", 768)), context_in_dim=int(cfg.get("joint_attention_dim", 4096)),
        hidden_size=heads * head_dim, num_heads=heads, depth=int(cfg.get("num_layers", 19)),
        depth_single_blocks=int(cfg.get("num_single_layers", 38)), axes_dim=list(cfg.get("axes_dims_rope", [16, 56, 56])),
        guidance_embed=bool(cfg.get("guidance_embeds", False)),
    )


def diffusers_config_from_params(p: FluxParams) -> dict:
    return {
        "_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": p.in_channels,
        "out_channels": p.out_channels, "num_layers": p.depth, "num_single_layers": p.depth_single_blocks,
        "attention_head_dim": p.hidden_size // p.num_heads, "num_attention_heads": p.num_heads,
        "joint_attention_dim": p.context_in_dim, "pooled_projection_dim": p.vec_in_dim,
        "guidance_embeds": p.guidance_embed, "axes_dims_rope": list(p.axes_dim),
    }


_BLOCK = re.compile(r"^(double_blocks|single_blocks)\.(\d+)\.")


def params_from_bfl_state_dict(shapes: dict[str, tuple[int, ...]], axes_dim: list[int] | None = None) -> FluxParams:
    """Read the architecture from the tensor shapes of a BFL transformer (bare keys).

    The rotary split of the head (axes_dim) is not in the shapes: FLUX.1's [16, 56, 56] unless given
    (difflora writes it into the metadata of files it saves from other sizes).
    """
    depth = {"double_blocks": 0, "single_blocks": 0}
    for k in shapes:
        m = _BLOCK.match(k)
        if m:
            depth[m[1]] = max(depth[m[1]], int(m[2]) + 1)
    hidden, in_ch = shapes["img_in.weight"]
    head_dim = shapes["double_blocks.0.img_attn.norm.query_norm.scale"][0] if depth["double_blocks"] else \
        shapes["single_blocks.0.norm.query_norm.scale"][0]
    mlp_hidden = shapes["double_blocks.0.img_mlp.0.weight"][0] if depth["double_blocks"] else \
        shapes["single_blocks.0.linear1.weight"][0] - 3 * hidden
    if head_dim != 128 and axes_dim is None:
        raise ValueError(f"head size {head_dim}: FLUX.1 has 128")
    return FluxParams(
        in_channels=in_ch, out_channels=shapes["final_layer.linear.weight"][0], vec_in_dim=shapes["vector_in.in_layer.weight"][1],
        context_in_dim=shapes["txt_in.weight"][1], hidden_size=hidden, mlp_ratio=mlp_hidden / hidden,
        num_heads=hidden // head_dim, depth=depth["double_blocks"], depth_single_blocks=depth["single_blocks"],
        axes_dim=list(axes_dim or [16, 56, 56]), guidance_embed="guidance_in.in_layer.weight" in shapes,
    )
