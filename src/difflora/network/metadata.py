"""The network part of a LoRA file's kohya metadata: `ss_network_module` and `ss_network_args`.

Plain LoRA/LoCon files say `networks.lora` (kohya's module); LoHa, LoKr, DoRA and Tucker LoCon
say `lycoris.kohya`, with the algorithm and its options in `ss_network_args` as sd-scripts
writes them (a JSON object of strings, `"dropout": null` included). No client reads them (they
detect the algorithm from the keys), but metadata viewers and tools display them.
"""

from __future__ import annotations

import json

from .adapters import KOHYA_LORA_MODULE, LYCORIS_ARGS, LYCORIS_MODULE, AdapterOptions


def network_metadata(options: AdapterOptions, conv_dim: int | None, conv_alpha: float | None,
                     extra_args: dict[str, object] | None = None) -> dict[str, str]:
    """ss_network_module / ss_network_args for these options (save_lora fills dim/alpha from the tensors)."""
    args: dict[str, object] = {"conv_dim": conv_dim or None, "conv_alpha": conv_alpha if conv_dim else None,
                               **(extra_args or {})}
    args = {k: v for k, v in args.items() if v is not None}
    md: dict[str, str] = {}
    if options.is_lycoris:
        args = {**options.network_args(), **args}
        md["ss_network_module"] = LYCORIS_MODULE
        md["ss_network_args"] = json.dumps({**{k: str(v) for k, v in args.items()}, "dropout": None})
    else:
        md["ss_network_module"] = KOHYA_LORA_MODULE
        if args:
            md["ss_network_args"] = json.dumps({k: str(v) for k, v in args.items()})
    return md


def describe_plain_lora(md: dict[str, str]) -> None:
    """Metadata of a file whose tensors are plain LoRA (a LoHa difference written as LoRA, a resize):
    `networks.lora`, without LyCORIS' algorithm arguments."""
    md["ss_network_module"] = KOHYA_LORA_MODULE
    try:
        args = json.loads(md.get("ss_network_args") or "{}")
    except ValueError:
        return
    if isinstance(args, dict) and any(k in args for k in LYCORIS_ARGS):
        kept = {k: v for k, v in args.items() if k not in LYCORIS_ARGS}
        if kept:
            md["ss_network_args"] = json.dumps(kept)
        else:
            md.pop("ss_network_args")
