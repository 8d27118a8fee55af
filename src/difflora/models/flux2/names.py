"""FLUX.2 names: BFL's layout (single files, ComfyUI, musubi, kohya LoRA names) <-> diffusers' modules.

The transformer is diffusers' `Flux2Transformer2DModel` with its double-block q/k/v projections fused
(`attn.to_qkv`, `attn.to_added_qkv`: diffusers' own `fuse_projections` layout), so every Linear a kohya
LoRA names is one module of it: `double_blocks.N.img_attn.qkv` is `transformer_blocks.N.attn.to_qkv`.
FLUX.1's tables do not apply: modulation is global (`double_stream_modulation_img.lin`, ...), no Linear
has a bias, the MLPs are SwiGLU (`ff.linear_in` / `linear_out`) and the single blocks are
`attn.to_qkv_mlp_proj` / `attn.to_out`.

LoRA spellings read and written here (one module name each; the reference lists in the
tests): kohya `lora_unet_<bfl with _>`; ComfyUI / ai-toolkit `diffusion_model.<bfl>` (lora_A/B, no alpha:
the scale is baked into lora_B, because diffusers' FLUX.2 loader fails on `.alpha` keys with that prefix);
diffusers `transformer.<diffusers>` with q/k/v split (A shared, B's rows split, scale baked, DoRA's
per-row `lora_magnitude_vector` split with them); DiffSynth's
bare diffusers names with `.default.`; musubi's `convert_lora.py --target other` files, whose
`img_attn_qkv` / `img_attn_proj` spellings (musubi #905) are repaired on reading.
"""

from __future__ import annotations

import json
import re

import torch

from ...errors import UserError

# per double block: BFL module -> fused diffusers module
DOUBLE = {"img_attn.qkv": "attn.to_qkv", "img_attn.proj": "attn.to_out.0", "img_mlp.0": "ff.linear_in",
          "img_mlp.2": "ff.linear_out", "txt_attn.qkv": "attn.to_added_qkv", "txt_attn.proj": "attn.to_add_out",
          "txt_mlp.0": "ff_context.linear_in", "txt_mlp.2": "ff_context.linear_out"}
DOUBLE_NORMS = {"img_attn.norm.query_norm": "attn.norm_q", "img_attn.norm.key_norm": "attn.norm_k",
                "txt_attn.norm.query_norm": "attn.norm_added_q", "txt_attn.norm.key_norm": "attn.norm_added_k"}
SINGLE = {"linear1": "attn.to_qkv_mlp_proj", "linear2": "attn.to_out"}
SINGLE_NORMS = {"norm.query_norm": "attn.norm_q", "norm.key_norm": "attn.norm_k"}
GLOBAL = {"img_in": "x_embedder", "txt_in": "context_embedder",
          "time_in.in_layer": "time_guidance_embed.timestep_embedder.linear_1",
          "time_in.out_layer": "time_guidance_embed.timestep_embedder.linear_2",
          "guidance_in.in_layer": "time_guidance_embed.guidance_embedder.linear_1",
          "guidance_in.out_layer": "time_guidance_embed.guidance_embedder.linear_2",
          "double_stream_modulation_img.lin": "double_stream_modulation_img.linear",
          "double_stream_modulation_txt.lin": "double_stream_modulation_txt.linear",
          "single_stream_modulation.lin": "single_stream_modulation.linear",
          "final_layer.linear": "proj_out",
          "final_layer.adaLN_modulation.1": "norm_out.linear"}
# its output halves are BFL's (shift, scale) in our transformer (files.FinalNormShiftScale), diffusers' (scale, shift)
SWAPPED_OURS = "norm_out.linear"
# fused modules of our transformer -> diffusers' own split modules
SPLIT = {"attn.to_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
         "attn.to_added_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}


def module_map(n_double: int, n_single: int, guidance: bool, norms: bool = False) -> dict[str, str]:
    """BFL module path -> our (fused diffusers) module path: every Linear a LoRA may name, or (norms=True) every
    weight of the model."""
    out = {}
    for i in range(n_double):
        for b, d in {**DOUBLE, **(DOUBLE_NORMS if norms else {})}.items():
            out[f"double_blocks.{i}.{b}"] = f"transformer_blocks.{i}.{d}"
    for i in range(n_single):
        for b, d in {**SINGLE, **(SINGLE_NORMS if norms else {})}.items():
            out[f"single_blocks.{i}.{b}"] = f"single_transformer_blocks.{i}.{d}"
    for b, d in GLOBAL.items():
        if guidance or not b.startswith("guidance_in"):
            out[b] = d
    return out


def kohya_name(bfl: str) -> str:
    return "lora_unet_" + bfl.replace(".", "_")


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


# ------------------------------------------------------------------ weights
def strip_prefix(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BFL files come bare or under ComfyUI's `model.diffusion_model.`."""
    for prefix in ("model.diffusion_model.", "diffusion_model."):
        if any(k.startswith(prefix) for k in sd):
            return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return sd


def bfl_to_fused(sd: dict[str, torch.Tensor], n_double: int, n_single: int, guidance: bool) -> dict[str, torch.Tensor]:
    """A BFL-layout state dict -> our transformer's (KeyError names a missing BFL tensor)."""
    out = {}
    for b, d in module_map(n_double, n_single, guidance, norms=True).items():
        is_norm = b.endswith("_norm")
        out[f"{d}.weight"] = sd[f"{b}.scale" if is_norm else f"{b}.weight"]
    return out


def fused_to_bfl(sd: dict[str, torch.Tensor], n_double: int, n_single: int, guidance: bool) -> dict[str, torch.Tensor]:
    out = {}
    for b, d in module_map(n_double, n_single, guidance, norms=True).items():
        out[f"{b}.scale" if b.endswith("_norm") else f"{b}.weight"] = sd[f"{d}.weight"]
    return out


def diffusers_to_fused(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' split q/k/v -> the fused projections, the final adaLN in BFL's (shift, scale) order."""
    out = dict(sd)
    if f"{SWAPPED_OURS}.weight" in out:
        out[f"{SWAPPED_OURS}.weight"] = _swap_halves(out[f"{SWAPPED_OURS}.weight"])
    for k in [k for k in sd if k.endswith(".attn.to_q.weight") or k.endswith(".attn.add_q_proj.weight")]:
        block = k.rsplit(".attn.", 1)[0]
        fused, pieces = next((f, p) for f, p in SPLIT.items() if k.endswith(p[0] + ".weight"))
        out[f"{block}.{fused}.weight"] = torch.cat([out.pop(f"{block}.{p}.weight") for p in pieces])
    return out


def fused_to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        fused = next((f for f in SPLIT if k.endswith(f".{f}.weight")), None)
        if fused is None:
            out[k] = _swap_halves(v) if k == f"{SWAPPED_OURS}.weight" else v
            continue
        block = k[: -len(f".{fused}.weight")]
        for piece, w in zip(SPLIT[fused], v.chunk(3, dim=0)):
            out[f"{block}.{piece}.weight"] = w.contiguous()
    return out


# ------------------------------------------------------------------ LoRA files
_SUFFIXES = (".lora_A.default.weight", ".lora_B.default.weight", ".lora_A.weight", ".lora_B.weight",
             ".lora_down.weight", ".lora_up.weight", ".alpha", ".dora_scale", ".lora_magnitude_vector.weight",
             ".lora_magnitude_vector.default", ".lora_magnitude_vector")
_MAGNITUDE = (".lora_magnitude_vector.weight", ".lora_magnitude_vector.default", ".lora_magnitude_vector")
_DOWN = (".lora_A.default.weight", ".lora_A.weight", ".lora_down.weight")
_MUSUBI_OTHER = re.compile(r"\.(img|txt)_attn_(qkv|proj)$")  # musubi #905: `img_attn_qkv` for `img_attn.qkv`


def _split_key(key: str, path) -> tuple[str, str]:
    for s in _SUFFIXES:
        if key.endswith(s):
            return key[: -len(s)], s
    raise UserError(f"unrecognised key {key!r} in a FLUX.2 LoRA (only LoRA's lora_A/lora_B, lora_down/lora_up, "
                    "alpha, dora_scale and lora_magnitude_vector are read in this spelling)", path=path)


def is_peer_spelling(keys) -> bool:
    """A FLUX.2 LoRA not in kohya names: diffusion_model.<bfl>, transformer.<diffusers> or bare diffusers."""
    return any(k.startswith(("diffusion_model.", "transformer.", "transformer_blocks.", "single_transformer_blocks.",
                             "base_model.model."))
               for k in keys)


def peer_to_kohya(tensors: dict[str, torch.Tensor], metadata: dict[str, str], modules: dict[str, str],
                  split_rows: dict[str, int], path=None) -> dict[str, torch.Tensor]:
    """A peer's FLUX.2 LoRA -> kohya names over our modules.

    `modules`: BFL path -> our module path (module_map); `split_rows`: our fused module -> rows of one piece.
    Scales come from `.alpha` keys, else the file's peft `lora_alpha`, else 1 (alpha = rank: ai-toolkit,
    diffusers and DiffSynth bake it in). Split q/k/v pieces of one fused module are stacked: with one shared down
    (what difflora's diffusers export writes) their ups one under another, back to the module that wrote them;
    otherwise their downs one under another and their ups block-diagonal, so ΔW is the same and alpha is the
    stacked rank. peft's DoRA `lora_magnitude_vector` (per output row) stacks with the rows: dora_scale (O, 1).
    """
    try:
        peft_alpha = json.loads(metadata.get("lora_adapter_metadata", "{}")).get("lora_alpha")
    except (ValueError, AttributeError):
        peft_alpha = None
    ours_of_bfl = modules
    bfl_of_ours = {v: k for k, v in modules.items()}
    piece_of = {}  # diffusers split module -> (fused module, index)
    for ours in modules.values():
        for fused, pieces in SPLIT.items():
            if ours.endswith("." + fused):
                block = ours[: -len(fused) - 1]
                for i, p in enumerate(pieces):
                    piece_of[f"{block}.{p}"] = (ours, i)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        mod, suffix = _split_key(key, path)
        parts.setdefault(mod, {})[suffix] = value
    fused_pieces: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]] = {}
    out: dict[str, torch.Tensor] = {}
    for mod, p in parts.items():
        down = next((p[s] for s in _DOWN if s in p), None)
        up = next((p[s] for s in (".lora_B.default.weight", ".lora_B.weight", ".lora_up.weight") if s in p), None)
        if down is None or up is None:
            raise UserError(f"module {mod} lacks its {'down (lora_A)' if down is None else 'up (lora_B)'} weight",
                            path=path)
        rank = down.shape[0]
        alpha = float(p[".alpha"]) if ".alpha" in p else float(peft_alpha if peft_alpha is not None else rank)
        magnitude = next((p[s].reshape(-1, 1) for s in _MAGNITUDE if s in p), p.get(".dora_scale"))
        bfl = _bfl_path(mod)
        if bfl is not None:
            if bfl not in ours_of_bfl:
                raise UserError(f"module {mod} is not a module of this FLUX.2 transformer", path=path)
            name = kohya_name(bfl)
            out[f"{name}.lora_down.weight"], out[f"{name}.lora_up.weight"] = down, up
            out[f"{name}.alpha"] = torch.tensor(alpha)
            if magnitude is not None:
                out[f"{name}.dora_scale"] = magnitude
            continue
        diff = _diffusers_path(mod)
        if diff in piece_of:
            fused, i = piece_of[diff]
            fused_pieces.setdefault(fused, {})[i] = (down.float(), up.float() * (alpha / rank), magnitude)
            continue
        if diff not in bfl_of_ours:
            raise UserError(f"module {mod} is not a module of this FLUX.2 transformer", path=path)
        bfl = bfl_of_ours[diff]
        name = kohya_name(bfl)
        out[f"{name}.lora_down.weight"] = down
        out[f"{name}.lora_up.weight"] = _swap_halves(up) if diff == SWAPPED_OURS else up
        out[f"{name}.alpha"] = torch.tensor(alpha)
        if magnitude is not None:
            out[f"{name}.dora_scale"] = _swap_halves(magnitude) if diff == SWAPPED_OURS else magnitude
    for fused, pieces in fused_pieces.items():
        rows = split_rows[fused]
        name = kohya_name(bfl_of_ours[fused])
        magnitudes = [m for _, _, m in pieces.values() if m is not None]
        if magnitudes and len(magnitudes) != 3:
            raise UserError(f"{name}: DoRA's magnitude is on only some of its q/k/v pieces", path=path)
        if magnitudes:
            out[f"{name}.dora_scale"] = torch.cat([pieces[i][2] for i in range(3)])
        if len(pieces) == 3 and all(torch.equal(pieces[i][0], pieces[0][0]) for i in range(3)):
            out[f"{name}.lora_down.weight"] = pieces[0][0]
            out[f"{name}.lora_up.weight"] = torch.cat([pieces[i][1] for i in range(3)])
            out[f"{name}.alpha"] = torch.tensor(float(pieces[0][0].shape[0]))
            continue
        rank = sum(d.shape[0] for d, _, _ in pieces.values())
        down = torch.cat([pieces[i][0] for i in sorted(pieces)])
        up = torch.zeros(3 * rows, rank)
        col = 0
        for i in sorted(pieces):
            d, u, _ = pieces[i]
            up[i * rows:(i + 1) * rows, col:col + d.shape[0]] = u
            col += d.shape[0]
        out[f"{name}.lora_down.weight"], out[f"{name}.lora_up.weight"] = down, up
        out[f"{name}.alpha"] = torch.tensor(float(rank))
    return out


def _bfl_path(mod: str) -> str | None:
    for prefix in ("model.diffusion_model.", "diffusion_model."):
        if mod.startswith(prefix):
            return _MUSUBI_OTHER.sub(lambda m: f".{m[1]}_attn.{m[2]}", mod[len(prefix):])
    return None


def _diffusers_path(mod: str) -> str:
    for prefix in ("base_model.model.", "transformer."):
        if mod.startswith(prefix):
            mod = mod[len(prefix):]
    return mod


def kohya_to_comfyui(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`diffusion_model.<bfl>`: LoRA modules as lora_A / lora_B with the scale baked into lora_B and no alpha
    (diffusers' FLUX.2 loader refuses `.alpha` in this spelling); other adapters keep their keys and alpha."""
    from ...network.adapters import group_modules, module_rank_alpha

    out: dict[str, torch.Tensor] = {}
    for name, (cls, parts) in group_modules(tensors, "LoRA").items():
        if not name.startswith("lora_unet_"):
            raise UserError(f"module {name} has no ComfyUI FLUX.2 name")
        mod = "diffusion_model." + bfl_of_kohya(name)
        own = dict(parts)
        if cls.low_rank:  # up @ down: the scale goes into the up factor, as ai-toolkit writes it
            _, _, scale = module_rank_alpha(cls, parts)
            down, up = (own.pop(k) for k in cls.required)
            out[f"{mod}.lora_A.weight"] = down
            out[f"{mod}.lora_B.weight"] = (up.float() * scale).to(down.dtype)
            own.pop("alpha", None)
        for suffix, v in own.items():
            out[f"{mod}.{suffix}"] = v
    return out


_KOHYA_BFL = re.compile(r"^(double_blocks|single_blocks)_(\d+)_(.+)$")


def bfl_of_kohya(name: str) -> str:
    """lora_unet_double_blocks_0_img_attn_qkv -> double_blocks.0.img_attn.qkv (the BFL module path)."""
    rest = name[len("lora_unet_"):]
    m = _KOHYA_BFL.match(rest)
    inner_names = ({**DOUBLE} if m and m[1] == "double_blocks" else SINGLE) if m else GLOBAL
    tail = m[3] if m else rest
    for b in inner_names:
        if b.replace(".", "_") == tail:
            return f"{m[1]}.{m[2]}.{b}" if m else b
    raise UserError(f"module {name} is not a FLUX.2 transformer module")


def kohya_to_diffusers(tensors: dict[str, torch.Tensor], modules: dict[str, str]) -> dict[str, torch.Tensor]:
    """`transformer.<diffusers>` peft keys: fused q/k/v split into diffusers' to_q/k/v (each gets the whole
    lora_A and its rows of lora_B), the final adaLN's lora_B halves in diffusers' (scale, shift) order, scale
    baked into lora_B, DoRA's per-row magnitude as peft's lora_magnitude_vector; LoRA and DoRA only."""
    from ...network.adapters import group_modules
    from ...network.files import peft_lora_parts

    out: dict[str, torch.Tensor] = {}
    for name, (_, parts) in group_modules(tensors, "LoRA").items():
        down, up, magnitude = peft_lora_parts(parts, name)
        ours = modules[bfl_of_kohya(name)]
        fused = next((f for f in SPLIT if ours.endswith("." + f)), None)
        if fused is None:
            if ours == SWAPPED_OURS:  # rows in diffusers' (scale, shift) order, DoRA's magnitude with them
                up = _swap_halves(up)
                magnitude = None if magnitude is None else _swap_halves(magnitude)
            pieces = [(ours, up, magnitude)]
        else:  # diffusers' split q/k/v: the whole lora_A, each its rows of lora_B and of the magnitude
            block = ours[: -len(fused) - 1]
            mags = [None] * 3 if magnitude is None else magnitude.chunk(3)
            pieces = [(f"{block}.{p}", rows, m) for p, rows, m in zip(SPLIT[fused], up.chunk(3, dim=0), mags)]
        for module, rows, m in pieces:
            out[f"transformer.{module}.lora_A.weight"] = down.clone() if fused else down
            out[f"transformer.{module}.lora_B.weight"] = rows.contiguous()
            if m is not None:
                out[f"transformer.{module}.lora_magnitude_vector"] = m.contiguous()
    return out
