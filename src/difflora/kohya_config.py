"""kohya sd-scripts config keys in a job TOML: read as difflora's, or refused by name.

A config written for `train_network.py --config_file` should train unchanged when every option
it uses is supported. Three kinds of kohya keys are not difflora fields:
- renamed: the same setting under difflora's name (`pretrained_model_name_or_path` -> `model`);
- inert: settings that change nothing here at the value given (`save_model_as = "safetensors"`,
  `xformers = true`: difflora always uses PyTorch's SDPA attention), accepted with a note;
- unsupported: any other kohya option, or an inert one at a value that would change training;
  refused with one line naming the key.
Each accepted key is noted once per load. Keys that are difflora fields are never touched here.
"""

from __future__ import annotations

import ast
import logging
from typing import Any, Callable

from .errors import UserError

log = logging.getLogger(__name__)

RENAMED = {
    "pretrained_model_name_or_path": "model",
    "caption_extention": "caption_extension",  # kohya's legacy spelling
}

_ANY: Callable[[Any], bool] = lambda v: True  # noqa: E731
_OFF: Callable[[Any], bool] = lambda v: v in (None, False, 0, 0.0, "", [])  # noqa: E731

# kohya key -> (accepted when, why it changes nothing here)
INERT: dict[str, tuple[Callable[[Any], bool], str]] = {
    "save_model_as": (lambda v: v == "safetensors", "difflora always saves .safetensors"),
    "xformers": (_ANY, "difflora uses PyTorch's scaled-dot-product attention"),
    "mem_eff_attn": (_ANY, "difflora uses PyTorch's scaled-dot-product attention"),
    "max_data_loader_n_workers": (_ANY, "difflora caches latents and needs no loader workers"),
    "persistent_data_loader_workers": (_ANY, "difflora caches latents and needs no loader workers"),
    "vae_batch_size": (_ANY, "a speed setting of latent caching"),
    "lowram": (_ANY, "a loading-speed setting"),
    "highvram": (_ANY, "a loading-speed setting"),
    "tokenizer_cache_dir": (_ANY, "difflora builds tokenizers from local files only"),
    "loss_type": (lambda v: v == "l2", "difflora's loss is l2"),
    "huber_schedule": (_ANY, "used only with a huber loss_type"),
    "huber_c": (_ANY, "used only with a huber loss_type"),
    "huber_scale": (_ANY, "used only with a huber loss_type"),
    "multires_noise_discount": (_ANY, "used only with multires_noise_iterations"),
    "log_prefix": (_ANY, "TensorBoard run names are <output_name>_<start time>"),
    "log_tracker_name": (_ANY, "TensorBoard run names are <output_name>_<start time>"),
    "max_token_length": (lambda v: v in (None, 75), "prompts are 75 tokens, as kohya's default"),
    "token_warmup_min": (lambda v: v in (None, 1), "at kohya's default"),
    "token_warmup_step": (_OFF, "at kohya's default"),
    "output_config": (_OFF, "at kohya's default"),
    "no_metadata": (_OFF, "at kohya's default"),
    "dim_from_weights": (_OFF, "at kohya's default"),
    "wandb_run_name": (_ANY, "used only with log_with = \"wandb\""),  # kohya_ss's GUI always writes it
    "dynamo_backend": (lambda v: str(v).lower() == "no", "torch.compile is off (difflora's key: torch_compile)"),
    "skip_cache_check": (_ANY, "a speed setting of latent caching"),
    "disable_mmap_load_safetensors": (_ANY, "a loading-speed setting"),
    "mem_eff_save": (_ANY, "a memory setting of saving"),
    # kohya_ss's GUI writes these for itself; sd-scripts does not read them either
    "epoch": (_ANY, "a kohya_ss GUI setting sd-scripts does not read (its step count is in max_train_steps)"),
    "noise_offset_type": (_ANY, "a kohya_ss GUI setting sd-scripts does not read (noise_offset applies)"),
}
# Options that are off by default in kohya and have no difflora counterpart: fine while off.
for _key in ("full_fp16", "fp8_base", "fp8_base_unet", "color_aug", "random_crop",
             "face_crop_aug_range", "debiased_estimation_loss", "scale_v_pred_loss_like_noise_pred",
             "v_pred_like_loss", "weighted_captions", "masked_loss", "alpha_mask", "noise_offset_random_strength",
             "ip_noise_gamma", "ip_noise_gamma_random_strength", "multires_noise_iterations", "adaptive_noise_scale",
             "scale_weight_norms", "save_last_n_epochs", "save_last_n_epochs_state", "save_last_n_steps",
             "save_last_n_steps_state", "save_n_epoch_ratio", "save_state_on_train_end", "enable_wildcard",
             "secondary_separator", "in_json", "lr_decay_steps", "lr_scheduler_min_lr_ratio", "lr_scheduler_timescale",
             "lr_scheduler_type", "lr_scheduler_args", "initial_epoch", "initial_step", "skip_until_initial_step",
             "dataset_repeats", "base_weights_multiplier", "use_8bit_adam", "use_lion_optimizer", "v2", "resume",
             "huggingface_repo_id",
             "huggingface_repo_type", "huggingface_path_in_repo", "huggingface_token", "huggingface_repo_visibility",
             "save_state_to_huggingface", "resume_from_huggingface", "async_upload", "wandb_api_key", "wandb_run_name",
             "max_validation_steps", "validate_every_n_epochs", "lowvram", "log_config", "log_tracker_config",
             "fused_backward_pass", "stop_text_encoder_training", "train_inpainting", "vae", "split_mode",
             "single_blocks_to_swap", "double_blocks_to_swap", "show_timesteps", "show_timesteps_resolution"):
    INERT.setdefault(_key, (_OFF, "off, as kohya's default"))

# Every other train_network.py option (the ones with the same name in difflora are fields and never get here).
KOHYA_ONLY = {"base_weights", "text_encoder_lr", "optimizer_args", "resolution", "log_with",
              "mixed_precision", "optimizer_type", "lr_warmup_steps", "ddp_timeout", "ddp_gradient_as_bucket_view",
              "ddp_static_graph", "sample_every_n_epochs", "metadata_title", "metadata_author", "metadata_description",
              "metadata_license", "metadata_tags", "network_dropout", "caption_separator", "config_file",
              # other families' scripts (SD3, Lumina, HunyuanImage, Anima), as kohya_ss's GUI writes them
              "clip_g", "clip_g_dropout_rate", "clip_l_dropout_rate", "t5_dropout_rate", "save_clip", "save_t5xxl",
              "t5xxl_device", "t5xxl_dtype", "text_encoder_batch_size", "enable_scaled_pos_embed",
              "pos_emb_random_crop_rate", "gemma2",
              "gemma2_max_token_length", "system_prompt", "use_flash_attn", "use_sage_attn", "byt5", "fp8_scaled",
              "fp8_vl", "text_encoder_cpu", "attn_mode", "split_attn", "vae_chunk_size", "vae_disable_cache", "qwen3",
              "qwen3_max_token_length", "llm_adapter_path", "t5_tokenizer_path", "t5_max_token_length",
              "unsloth_offload_checkpointing", "qwen_image_vae_2d", "compile", "compile_backend", "compile_mode",
              "compile_dynamic", "compile_fullgraph", "compile_cache_size_limit",
              "model_type"}  # flux_train_network.py's other models (chroma); its default needs no key
_OPTIMIZERS = {"adamw": "AdamW", "adamw8bit": "AdamW8bit", "lion": "Lion", "prodigy": "Prodigy", "sgd": "SGD"}


def _unsupported(key: str, value: Any, why: str = "") -> UserError:
    return UserError(f"'{key} = {value!r}' is a kohya option difflora does not support{why}",
                     hint="remove it from the config (see `difflora train --help-keys` for what difflora takes)")


def _kv_list(key: str, value: list) -> dict:
    """kohya's `["weight_decay=0.01", "betas=0.9,0.99"]` -> {"weight_decay": 0.01, "betas": (0.9, 0.99)}."""
    out = {}
    for item in value:
        k, sep, v = str(item).partition("=")
        if not sep:
            raise UserError(f"'{key}' entry {item!r} is not KEY=VALUE")
        try:
            out[k.strip()] = ast.literal_eval(v.strip())
        except (ValueError, SyntaxError):
            out[k.strip()] = v.strip()
    return out


def normalise(data: dict, fields: set[str]) -> dict:
    """Rewrite the kohya keys of a job dict in place as difflora keys; refuse unsupported ones.

    `fields` are the job's own keys: those are left to the schema whatever their value.
    """
    notes: list[str] = []

    def take(key: str, target: str, value: Any, note: str) -> None:
        if target in data and target != key:
            raise UserError(f"both '{key}' (kohya) and '{target}' are set; keep one")
        data[target] = value
        notes.append(note)

    for key in list(data):
        value = data[key]
        if key in RENAMED and key not in fields:
            del data[key]
            take(key, RENAMED[key], value, f"kohya key '{key}' read as '{RENAMED[key]}'")
        elif key == "v2" and "v2" not in fields:
            del data[key]
            if value:
                take(key, "model_family", "sd2", "kohya key 'v2 = true' read as model_family = \"sd2\"")
        elif key in ("use_8bit_adam", "use_lion_optimizer") and key not in fields and not isinstance(value, bool):
            raise UserError(f"'{key}' takes true or false (a TOML boolean, unquoted), not {value!r}")
        elif key in ("use_8bit_adam", "use_lion_optimizer") and key not in fields and value:
            del data[key]
            take(key, "optimizer_type", "AdamW8bit" if key == "use_8bit_adam" else "Lion",
                 f"kohya key '{key}' read as optimizer_type")
        elif key == "base_weights" and key not in fields:
            paths = value if isinstance(value, list) else [value]
            mults = data.pop("base_weights_multiplier", None)
            mults = mults if isinstance(mults, list) else [1.0 if mults is None else mults] * len(paths)
            if len(mults) != len(paths):
                raise UserError(f"'base_weights' has {len(paths)} file(s) but 'base_weights_multiplier' has {len(mults)}")
            bad = next((m for m in mults if isinstance(m, bool) or not isinstance(m, (int, float))), None)
            if bad is not None:
                raise UserError(f"'base_weights_multiplier' takes numbers, got {bad!r}")
            if not all(isinstance(p, str) for p in paths):
                raise UserError(f"'base_weights' takes file paths, got {paths!r}")
            del data[key]
            take(key, "preset_loras", [{"path": p, "multiplier": float(m)} for p, m in zip(paths, mults)],
                 "kohya key 'base_weights' read as preset_loras")
        elif key in INERT and key not in fields:
            accepted, why = INERT[key]
            if not accepted(value):
                raise _unsupported(key, value, " at this value")
            del data[key]
            notes.append(f"kohya key '{key}' has no effect: {why}")
        elif key not in fields and is_kohya_option(key):
            raise _unsupported(key, value)
    _family_network_args(data, notes)
    _normalise_values(data, notes)
    for note in notes:
        log.info(note)
    return data


def _family_network_args(data: dict, notes: list[str]) -> None:
    """A family's sd-scripts network module (`networks.lora_flux`): its network_args that are the family's option
    keys set them (`train_t5xxl=True` -> train_t5xxl = true), the ones difflora does not do are refused with the
    reason. The strings stay in network_args, which the LoRA's ss_network_args repeats as given."""
    from .models.registry import FAMILIES

    plugin = next((p for p in FAMILIES if p.kohya_network_module == data.get("network_module")), None)
    args = data.get("network_args")
    if plugin is None or not isinstance(args, list):
        return
    for item in args:
        key, _, text = str(item).partition("=")
        key, text = key.strip(), text.strip()
        if key in plugin.refused_network_args and text not in ("False", "None", ""):
            raise UserError(f"network_args {key}={text} ({plugin.kohya_network_module}): "
                            f"{plugin.refused_network_args[key]}; remove it")
        if key not in plugin.kohya_network_args:
            continue
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        if plugin.options.model_fields[key].annotation is bool and not isinstance(value, bool):
            # sd-scripts compares with the string "True": any other spelling trains without the option
            raise UserError(f"network_args {key}={text}: sd-scripts reads only {key}=True as true; write True or False")
        if key in data and data[key] != value:
            raise UserError(f"both '{key} = {data[key]!r}' and network_args {key}={text} are set; keep one")
        data[key] = value
        notes.append(f"kohya network_args {key}={text} read as {key} = {value!r}")


def _normalise_values(data: dict, notes: list[str]) -> None:
    """kohya spellings of values for keys difflora shares."""
    res = data.get("resolution")
    if isinstance(res, str):
        try:
            parts = [int(p) for p in res.replace("x", ",").split(",") if p.strip()]
        except ValueError:
            raise UserError(f"'resolution' = {res!r}: expected \"512\" or \"512,768\"") from None
        data["resolution"] = parts[0] if len(parts) == 1 or parts[0] == parts[1] else parts[:2]
        notes.append(f"kohya resolution {res!r} read as {data['resolution']}")
    if isinstance(data.get("optimizer_args"), list):
        data["optimizer_args"] = _kv_list("optimizer_args", data["optimizer_args"])
    opt = data.get("optimizer_type")
    if isinstance(opt, str) and opt not in _OPTIMIZERS.values() and opt.lower() in _OPTIMIZERS:
        data["optimizer_type"] = _OPTIMIZERS[opt.lower()]
    elif opt == "":
        data["optimizer_type"] = "AdamW"  # kohya's "" means AdamW
    te_lr = data.get("text_encoder_lr")
    if isinstance(te_lr, list):
        # kohya: one rate per text encoder (SDXL's two, FLUX's CLIP-L and T5); difflora has one for all
        if len(set(te_lr)) > 1:
            raise _unsupported("text_encoder_lr", te_lr, " with a different rate per text encoder")
        data["text_encoder_lr"] = te_lr[0] if te_lr else None
    warm = data.get("lr_warmup_steps")
    if isinstance(warm, str) and warm.endswith("%"):
        try:
            data["lr_warmup_steps"] = float(warm[:-1]) / 100
        except ValueError:
            raise UserError(f"'lr_warmup_steps' = {warm!r}: expected a number, a ratio or \"N%\"") from None
    if data.get("log_with") == "wandb" or data.get("log_with") == "all":
        raise _unsupported("log_with", data["log_with"], " (TensorBoard only: log_with = \"tensorboard\")")


def is_kohya_option(key: str) -> bool:
    """Whether an unknown key is one of kohya's own (for the unknown-key message)."""
    return key in RENAMED or key in INERT or key in KOHYA_ONLY or key.startswith(("metadata_", "huggingface_", "wandb_",
                                                                                 "ddp_", "lr_scheduler_"))
