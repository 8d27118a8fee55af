"""Qwen-Image LoRA names: kohya/musubi <-> ComfyUI <-> diffusers, and reading the peers' spellings.

Every spelling names a Linear of diffusers' `QwenImageTransformer2DModel` (ComfyUI's native names are the same):
- kohya / musubi-tuner: `lora_unet_transformer_blocks_0_attn_to_q` + lora_down / lora_up / alpha (our default);
- ComfyUI / ai-toolkit / musubi's `convert_lora.py --target other`: `diffusion_model.transformer_blocks.0.attn.to_q`
  + lora_A / lora_B (ai-toolkit writes no alpha: scale 1);
- diffusers / SimpleTuner: `transformer.transformer_blocks.0.attn.to_q` + lora_A / lora_B, scale baked in;
- DiffSynth-Studio: bare `transformer_blocks.0.attn.to_q` + lora_A.default / lora_B.default (alpha = rank);
- LyCORIS / SimpleTuner: `lycoris_transformer_blocks_0_attn_to_q`.
`load_lora` (network/files.py) already turns the lora_A/B files into kohya-style names with their prefix mangled in
(`lora_unet_diffusion_model_...`); `adapt_lora_file` maps every form to the kohya name of the module.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ...errors import UserError
from ...network.adapters import KNOWN_SUFFIXES, detect, is_kohya_lora

OUTSIDE_BLOCKS = ("img_in", "txt_in", "time_text_embed.timestep_embedder.linear_1",
                  "time_text_embed.timestep_embedder.linear_2", "norm_out.linear", "proj_out")


def module_paths(transformer: nn.Module) -> dict[str, str]:
    """kohya name -> diffusers module path, for every Linear of the transformer."""
    return {f"lora_unet_{name}".replace(".", "_"): name for name, m in transformer.named_modules()
            if isinstance(m, nn.Linear)}


def _spellings(paths: dict[str, str]) -> dict[str, str]:
    """Every way a peer names a module (with its prefix, dotted or mangled) -> the kohya name."""
    out = {}
    for kohya, path in paths.items():
        flat = path.replace(".", "_")
        for form in (kohya, path, f"diffusion_model.{path}", f"transformer.{path}", f"lycoris_{flat}",
                     f"lora_unet_diffusion_model_{flat}", f"lora_unet_transformer_{flat}"):
            out[form] = kohya
    return out


def _split(key: str, spellings: dict[str, str]) -> tuple[str, str] | None:
    """(kohya module name, suffix) of a tensor key in any spelling, or None."""
    for suffix in sorted(KNOWN_SUFFIXES):
        if key.endswith("." + suffix):
            head = key[: -len(suffix) - 1]
            if head in spellings:
                return spellings[head], suffix
    return None


FOREIGN = (("lora_unet_double_blocks", "FLUX.1"), ("lora_unet_single_blocks", "FLUX.1"),
           ("lora_unet_down_blocks", "Stable Diffusion"), ("lora_unet_input_blocks", "SDXL"),
           ("lora_unet_layers_", "Z-Image"), ("lora_te", "Stable Diffusion / SDXL / FLUX.1 text-encoder"))


def adapt_lora_file(model, lora):
    """Check a LoRA file is for Qwen-Image and bring any peer's spelling to kohya names."""
    from ...network.files import LoraFile

    version = lora.metadata.get("ss_base_model_version", "")
    if version and not version.startswith("qwen_image"):
        raise UserError(f"LoRA was trained for {version} (ss_base_model_version), not Qwen-Image", path=lora.path)
    spellings = _spellings(module_paths(model.transformer))
    out = {}
    for key, value in lora.tensors.items():
        found = _split(key, spellings)
        if found is None:
            for prefix, title in FOREIGN:
                if key.startswith(prefix):
                    raise UserError(f"this is a {title} LoRA ({key.split('.')[0]}), not a Qwen-Image LoRA",
                                    path=lora.path)
            raise UserError(f"{key}: no module of the Qwen-Image transformer has this name (a LoRA of another "
                            "model, or a damaged file)", path=lora.path)
        out[f"{found[0]}.{found[1]}"] = value
    return LoraFile(out, lora.metadata, lora.path, lora.source_format)


def export_lora(model, tensors: dict[str, torch.Tensor], save_format: str) -> dict[str, torch.Tensor]:
    """kohya tensors in the layout the job asked for. "comfyui": `diffusion_model.<path>` with lora_A / lora_B and
    alpha/rank baked into lora_B (ComfyUI, ai-toolkit and diffusers read it at scale 1); LoHa / LoKr / DoRA modules
    keep kohya's names there, which ComfyUI maps too (its generic `lora_unet_` branch) and which every LoRA reader
    here and in diffusers splits correctly. "diffusers": `transformer.<path>` lora_A / lora_B, baked, with DoRA's
    per-row `lora_magnitude_vector`; LoRA and DoRA only (diffusers reads no LoHa / LoKr file for Qwen-Image)."""
    if save_format == "kohya":
        return tensors
    if save_format not in ("comfyui", "diffusers"):
        raise UserError(f"save_format = {save_format!r} is not available for Qwen-Image (kohya, comfyui, diffusers)")
    paths = module_paths(model.transformer)
    prefix = "diffusion_model." if save_format == "comfyui" else "transformer."
    names = sorted({k.split(".", 1)[0] for k in tensors})
    out = {}
    for name in names:
        parts = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.split(".", 1)[0] == name}
        path = prefix + paths[name]
        cls = detect(parts)
        if save_format == "diffusers":  # peft's lora_A / lora_B (+ DoRA's per-row lora_magnitude_vector)
            from ...network.files import peft_lora_parts

            down, up, magnitude = peft_lora_parts(parts, name)
            out[f"{path}.lora_A.weight"], out[f"{path}.lora_B.weight"] = down, up
            if magnitude is not None:
                out[f"{path}.lora_magnitude_vector"] = magnitude
        elif cls is not None and is_kohya_lora(cls, parts):
            down, up = (parts[k] for k in cls.required)
            alpha = float(parts["alpha"]) if "alpha" in parts else float(down.shape[0])
            out[f"{path}.lora_A.weight"] = down
            out[f"{path}.lora_B.weight"] = (up.float() * (alpha / down.shape[0])).to(up.dtype)
        else:
            out.update({f"{name}.{suffix}": v for suffix, v in parts.items()})
    return out


def check_save_format(save_format: str, adapter) -> None:
    """Before training: diffusers' Qwen-Image loader reads peft lora_A / lora_B (+ DoRA's per-row
    lora_magnitude_vector), no LoHa, LoKr or Tucker core."""
    if save_format != "diffusers":
        return
    from ...network.adapters import ADAPTERS

    if not ADAPTERS[adapter.algo].low_rank or adapter.use_tucker:
        what = ADAPTERS[adapter.algo].title + (" + Tucker" * adapter.use_tucker)
        raise UserError(f'save_format = "diffusers" with {what}: diffusers loads Qwen-Image LoRAs as peft lora_A / '
                        'lora_B (+ DoRA\'s magnitude), which holds no LoHa, LoKr or Tucker core; save kohya or comfyui '
                        '(ComfyUI applies them)')
    from ...network.files import warn_dora_for_diffusers

    warn_dora_for_diffusers(adapter)
