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
                     extra_args: dict[str, object] | None = None, *, given_args: list[str] | None = None,
                     network_dim: int | None = None, network_alpha: float | None = None,
                     network_dropout: float | None = None, lora_module: str = KOHYA_LORA_MODULE) -> dict[str, str]:
    """ss_network_module / ss_network_args (and dim/alpha for LyCORIS files) as sd-scripts writes them.

    `given_args` are the job's own `network_args` strings: sd-scripts writes them as given (`preset`,
    `conv_alpha=1`), with `"dropout"` (network_dropout) added. `lora_module` is the family's kohya
    module for plain LoRA files (`networks.lora_flux` for FLUX). A LyCORIS file's ss_network_dim /
    ss_network_alpha are the configured values, as sd-scripts writes them (save_lora fills a plain
    LoRA's from the tensors).
    """
    args: dict[str, object] = {"conv_dim": conv_dim or None, "conv_alpha": conv_alpha if conv_dim else None,
                               **(extra_args or {})}
    args = {k: str(v) for k, v in args.items() if v is not None}
    as_given = dict(str(item).split("=", 1) for item in given_args or [] if "=" in str(item))
    as_given = {k.strip(): v.strip() for k, v in as_given.items()}
    md: dict[str, str] = {}
    if options.is_lycoris:
        md["ss_network_module"] = LYCORIS_MODULE
        md["ss_network_args"] = json.dumps({**options.network_args(), **args, **as_given, "dropout": network_dropout})
        if network_dim is not None:
            md["ss_network_dim"] = str(network_dim)
        if network_alpha is not None:
            md["ss_network_alpha"] = _number(network_alpha)
    else:
        md["ss_network_module"] = lora_module
        if as_given:
            md["ss_network_args"] = json.dumps({**args, **as_given, "dropout": network_dropout})
        elif args:
            md["ss_network_args"] = json.dumps(args)
    return md


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def describe_plain_lora(md: dict[str, str]) -> None:
    """Metadata of a file whose tensors are plain LoRA (a LoHa difference written as LoRA, a resize):
    `networks.lora`, without LyCORIS' algorithm arguments."""
    md["ss_network_module"] = KOHYA_LORA_MODULE
    for key in ("ss_network_dim", "ss_network_alpha"):  # the configured LyCORIS values: the tensors decide now
        md.pop(key, None)
    try:
        args = json.loads(md.get("ss_network_args") or "{}")
    except ValueError:
        return
    lycoris_only = (*LYCORIS_ARGS, "preset")
    if isinstance(args, dict) and any(k in args for k in lycoris_only):
        kept = {k: v for k, v in args.items() if k not in lycoris_only}
        if kept:
            md["ss_network_args"] = json.dumps(kept)
        else:
            md.pop("ss_network_args")
