"""The network part of a LoRA file's kohya metadata: `ss_network_module` and `ss_network_args`.

Plain LoRA/LoCon files say `networks.lora` (kohya's module); LoHa, LoKr, DoRA and Tucker LoCon
say `lycoris.kohya`, with the algorithm and its options in `ss_network_args` as sd-scripts
writes them (a JSON object of strings, `"dropout": null` included). No client reads them (they
detect the algorithm from the keys), but metadata viewers and tools display them.
"""

from __future__ import annotations

import json

from .adapters import KOHYA_LORA_MODULE, LYCORIS_MODULE, AdapterOptions


def is_lycoris(options: AdapterOptions) -> bool:
    return options.algo != "lora" or options.use_tucker or options.dora_wd


def network_metadata(options: AdapterOptions, network_dim: int, network_alpha: float, conv_dim: int | None,
                     conv_alpha: float | None, extra_args: dict[str, object] | None = None) -> dict[str, str]:
    """ss_network_module / ss_network_dim / ss_network_alpha / ss_network_args for these options."""
    args: dict[str, object] = {}
    if conv_dim:
        args["conv_dim"] = conv_dim
        args["conv_alpha"] = conv_alpha if conv_alpha is not None else 1.0
    args.update({k: v for k, v in (extra_args or {}).items() if v is not None})
    md = {"ss_network_dim": str(network_dim), "ss_network_alpha": _fmt(network_alpha)}
    if is_lycoris(options):
        args = {**options.network_args(), **args}
        md["ss_network_module"] = LYCORIS_MODULE
        md["ss_network_args"] = json.dumps({**{k: _fmt(v) for k, v in args.items()}, "dropout": None})
    else:
        md["ss_network_module"] = KOHYA_LORA_MODULE
        if args:
            md["ss_network_args"] = json.dumps({k: _fmt(v) for k, v in args.items()})
    return md


def _fmt(v: object) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)
