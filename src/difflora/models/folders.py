"""Writing diffusers model folders that every reader loads.

transformers >= 5.6 saves `CLIPTextModel` without the `text_model.` key prefix. transformers 4
(kohya's pin), ComfyUI's diffusers loader and most other tools then find none of the text
encoder's weights and leave it randomly initialised, without an error. Every folder difflora
writes therefore stores the text encoder in the layout published SD checkpoints use
(`text_model.encoder.layers.0...`); transformers 5 reads that layout too.

transformers 5 also saves a tokenizer as `tokenizer.json` + `tokenizer_config.json` only. The
slow tokenizers of transformers 4 (kohya's SDXL loader builds `CLIPTokenizer` from `tokenizer_2`)
need `vocab.json` / `merges.txt` (CLIP's BPE) or `spiece.model` (T5's SentencePiece), and
transformers 4 fails on the `"extra_special_tokens": []` transformers 5 writes for T5. Every
tokenizer folder gets the files published checkpoints ship, derived from its `tokenizer.json`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..fileio import atomic_folder, load_safetensors
from ..errors import UserError

TEXT_MODEL_PREFIX = "text_model."
_CLIP_ARCHITECTURES = ("CLIPTextModel",)  # CLIPTextModelWithProjection still saves text_model.*


def prefix_text_encoder_keys(folder: Path) -> list[Path]:
    """Rewrite every CLIPTextModel weight file under `folder` with `text_model.` keys; returns the files changed."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    changed = []
    for cfg in sorted(Path(folder).glob("*/config.json")):
        try:
            arch = json.loads(cfg.read_text(encoding="utf-8")).get("architectures") or []
        except (OSError, ValueError):
            continue
        if not any(a in _CLIP_ARCHITECTURES for a in arch):
            continue
        for weights in sorted(cfg.parent.glob("*.safetensors")):
            with safe_open(str(weights), framework="pt") as f:
                keys = list(f.keys())
                if all(k.startswith(TEXT_MODEL_PREFIX) for k in keys):
                    continue
                metadata = f.metadata() or {}
                tensors = {(k if k.startswith(TEXT_MODEL_PREFIX) else TEXT_MODEL_PREFIX + k): f.get_tensor(k)
                           for k in keys}
            tmp = weights.with_name(f".{weights.name}.tmp")
            save_file(tensors, str(tmp), metadata=metadata)
            os.replace(tmp, weights)
            changed.append(weights)
    return changed


def write_legacy_tokenizer_files(folder: Path) -> list[Path]:
    """Beside every `*/tokenizer.json` under `folder`, the files older readers load: `vocab.json`, `merges.txt`
    and `special_tokens_map.json` for a BPE tokenizer (CLIP), `spiece.model` for a Unigram one (T5), and a
    `tokenizer_config.json` transformers 4 reads. Returns the files written."""
    written = []
    for tokenizer_json in sorted(Path(folder).glob("*/tokenizer.json")):
        tok_dir = tokenizer_json.parent
        data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
        config_path = tok_dir / "tokenizer_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.exists() else {}
        model = data["model"]
        if model["type"] == "BPE":
            merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
            files = {"vocab.json": json.dumps(model["vocab"], ensure_ascii=False),
                     "merges.txt": "#version: 0.2\n" + "".join(m + "\n" for m in merges)}
        elif model["type"] == "Unigram":
            files = {"spiece.model": _sentencepiece_model(data)}
        else:
            continue
        extra = config.pop("extra_special_tokens", None)
        if isinstance(extra, list):  # transformers 4 takes a dict here; a list is its additional_special_tokens
            if extra:
                config.setdefault("additional_special_tokens", extra)
        elif extra is not None:
            config["extra_special_tokens"] = extra
        files["tokenizer_config.json"] = json.dumps(config, indent=2, ensure_ascii=False)
        files["special_tokens_map.json"] = json.dumps(
            {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token", "additional_special_tokens")
             if config.get(k) is not None}, indent=2, ensure_ascii=False)
        for name, content in files.items():
            target = tok_dir / name
            target.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
            written.append(target)
    return written


def _sentencepiece_model(tokenizer: dict) -> bytes:
    """A SentencePiece `ModelProto` (spiece.model) holding a tokenizers Unigram model: its pieces and scores,
    the unknown piece, the special tokens as control pieces, and the normaliser's precompiled charsmap."""
    import base64

    from transformers.convert_slow_tokenizer import import_protobuf

    pb = import_protobuf()
    model = tokenizer["model"]
    special = {t["content"] for t in tokenizer.get("added_tokens", []) if t.get("special")}
    proto = pb.ModelProto()
    piece_type = pb.ModelProto.SentencePiece
    pieces = [piece for piece, _ in model["vocab"]]
    for i, (piece, score) in enumerate(model["vocab"]):
        entry = proto.pieces.add()
        entry.piece, entry.score = piece, score
        entry.type = (piece_type.UNKNOWN if i == model.get("unk_id") else
                      piece_type.CONTROL if piece in special else piece_type.NORMAL)
    spec = proto.trainer_spec
    spec.model_type = pb.TrainerSpec.UNIGRAM
    spec.vocab_size = len(pieces)
    spec.unk_id = model.get("unk_id") or 0
    spec.bos_id = -1
    spec.eos_id = pieces.index("</s>") if "</s>" in pieces else -1
    spec.pad_id = pieces.index("<pad>") if "<pad>" in pieces else -1
    spec.byte_fallback = bool(model.get("byte_fallback"))
    normalizer = proto.normalizer_spec
    charsmap = _find(tokenizer.get("normalizer"), "Precompiled")
    normalizer.name = "nmt_nfkc" if charsmap else "identity"
    if charsmap and charsmap.get("precompiled_charsmap"):
        normalizer.precompiled_charsmap = base64.b64decode(charsmap["precompiled_charsmap"])
    metaspace = _find(tokenizer.get("pre_tokenizer"), "Metaspace") or {}
    normalizer.add_dummy_prefix = metaspace.get("prepend_scheme", "always") != "never"
    normalizer.remove_extra_whitespaces = True
    normalizer.escape_whitespaces = True
    return proto.SerializeToString()


def _find(component: dict | None, kind: str) -> dict | None:
    """The first `kind` part of a tokenizers normalizer / pre-tokenizer (plain or inside a Sequence)."""
    if not component:
        return None
    if component.get("type") == kind:
        return component
    for part in component.get("normalizers") or component.get("pretokenizers") or []:
        found = _find(part, kind)
        if found:
            return found
    return None


def publish_layout(folder: Path) -> None:
    """What every folder writer runs on its finished temporary folder: text encoders and tokenizers in the
    layout published checkpoints use (above), so transformers 4, kohya and ComfyUI load them whole."""
    prefix_text_encoder_keys(folder)
    write_legacy_tokenizer_files(folder)


def save_pipeline_folder(pipe, path: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
    """`pipe.save_pretrained` into a new folder, text encoders in the published layout, all or nothing."""
    with atomic_folder(path) as tmp:  # beside the target, umask permissions; stale ones from killed saves are removed
        if dtype is not None:
            pipe.to(dtype=dtype)
        pipe.save_pretrained(tmp, safe_serialization=True)
        if dtype is not None:
            pipe.to(dtype=torch.float32)
        publish_layout(tmp)


def save_model(model, path: str | os.PathLike, single_file: bool | None, dtype: torch.dtype | None,
               write_single_file, scheduler_class: str) -> None:
    """A family's `save`: `write_single_file(model, path, dtype)` for a .safetensors path (or single_file),
    else a diffusers folder whose scheduler is `scheduler_class` over the model's noise schedule."""
    import diffusers

    path = Path(path)
    if single_file is None:
        single_file = path.suffix.lower() == ".safetensors"
    if single_file:
        write_single_file(model, path, dtype=dtype)
        return
    pipe = model.pipeline("ddim")
    pipe.scheduler = getattr(diffusers, scheduler_class).from_config(model.scheduler_config)
    save_pipeline_folder(pipe, path, dtype)


def read_json_config(path: Path) -> dict:
    """A component's config file as a dict; not JSON, not an object or unreadable: one line naming the file."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise UserError(f"not a readable JSON config ({str(e)[:80]})", path=path) from None
    if not isinstance(config, dict):
        raise UserError(f"not a config: a JSON {type(config).__name__}, expected an object", path=path)
    return config


def check_config(path: Path, positive_ints: tuple[str, ...] = (), int_lists: tuple[str, ...] = (),
                 bools: tuple[str, ...] = ()) -> None:
    """A component's config file before a loader reads it: a JSON object, and each listed key that it holds of
    the type the model needs (a positive integer, a list of them, true/false). Missing keys are the loader's
    defaults; a file that is absent is the loader's to report."""
    if not path.is_file():
        return
    config = read_json_config(path)

    def positive(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value > 0

    for key in positive_ints:
        if key in config and not positive(config[key]):
            raise UserError(f"{key} = {config[key]!r}: expected a positive integer", path=path)
    for key in int_lists:
        value = config.get(key, [1])
        if not isinstance(value, list) or not value or not all(positive(v) for v in value):
            raise UserError(f"{key} = {value!r}: expected a list of positive integers", path=path)
    for key in bools:
        if key in config and not isinstance(config[key], bool):
            raise UserError(f"{key} = {config[key]!r}: expected true or false", path=path)


# The keys of a diffusers U-Net / VAE config that size its layers (read by every U-Net family's loader)
UNET_INTS = ("in_channels", "out_channels")
VAE_INTS = ("in_channels", "out_channels", "latent_channels")
CHANNEL_LISTS = ("block_out_channels",)


def check_unet_folder(path: Path, text_encoders: tuple[str, ...]) -> None:
    """A U-Net family's folder: the configs of its U-Net, VAE and text encoders, before diffusers reads them."""
    if not path.is_dir():
        return
    check_config(path / "unet" / "config.json", UNET_INTS, CHANNEL_LISTS)
    check_config(path / "vae" / "config.json", VAE_INTS, CHANNEL_LISTS)
    for name in text_encoders:
        check_config(path / name / "config.json", ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                   "intermediate_size", "max_position_embeddings"))
    check_config(path / "scheduler" / "scheduler_config.json", ("num_train_timesteps",))


def read_transformer_folder(folder: Path, class_names: tuple[str | None, ...], supported: str
                            ) -> tuple[dict[str, torch.Tensor], dict]:
    """A diffusers folder's transformer/ (`folder`): its state dict from the safetensors shards and its config,
    whose _class_name must be one of `class_names` (None: a config without one); `supported` ends the refusal."""
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise UserError("model folder is missing transformer/config.json", path=folder.parent)
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    if cfg.get("_class_name") not in class_names:
        raise UserError(f"transformer is {cfg.get('_class_name')}; {supported}", path=folder.parent)
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    files = sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()}) if index.exists() \
        else [folder / "diffusion_pytorch_model.safetensors"]
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        if not f.exists():
            raise UserError(f"transformer weights missing: {f.name} (only .safetensors is read)", path=folder.parent)
        sd.update(load_safetensors(f)[0])
    return sd, cfg
