"""The adapter registry: the job's algorithm choice -> its module class, and a file's keys -> the class.

Algorithms (LyCORIS' names): `lora` (alias `locon`: LoRA with LoCon convs), `loha`, `lokr`;
`dora` is `lora` with DoRA's weight decomposition (`dora_wd`), which also works on LoHa and
LoKr. Everything that depends on the algorithm goes through this module: building a network,
reading a file's modules, checking a file against a model, metadata and `inspect`.

Job keys, both spellings normalised here into one `AdapterOptions`:
- kohya/LyCORIS: `network_module = "lycoris.kohya"`, `network_args = ["algo=loha", "conv_dim=8", ...]`
- difflora: `network_algo = "loha"` with `network_use_tucker`, `network_factor`, ... (config.py)
"""

from __future__ import annotations

import difflib
from typing import Mapping

import torch

from ...errors import UserError
from .base import Adapter, AdapterOptions, dora_scale_shape
from .lokr import LoKr
from .lora import LoRA
from .loha import LoHa

ADAPTERS: dict[str, type[Adapter]] = {cls.algo: cls for cls in (LoRA, LoHa, LoKr)}
# job spellings -> (algo, implied options)
ALGO_NAMES: dict[str, tuple[str, dict]] = {
    "lora": ("lora", {}), "locon": ("lora", {}), "loha": ("loha", {}), "lokr": ("lokr", {}),
    "dora": ("lora", {"dora_wd": True}),
}
# LyCORIS algorithms difflora does not train (the reference's support matrix says why they are risky)
_LYCORIS_OTHERS = ("ia3", "glora", "diag-oft", "boft", "full", "dylora")
# detection order of the clients (A1111, ComfyUI): each class's markers in registry order, then the weak ones
_MARKERS = tuple((m, cls) for cls in ADAPTERS.values() for m in cls.markers) + tuple(
    (m, cls) for cls in ADAPTERS.values() for m in cls.weak_markers)
KNOWN_SUFFIXES = {k for cls in ADAPTERS.values() for k in cls.keys} | {"alpha", "dora_scale"}
# the network_args of LyCORIS files (kohya metadata): the algorithms' own, DoRA's, and sd-scripts' dropout
LYCORIS_ARGS = ("algo", *dict.fromkeys(a for cls in ADAPTERS.values() for a in cls.lycoris_args), "dora_wd",
                "wd_on_output", "dropout")


def option_tables() -> list[type]:
    """Each algorithm's job-key table (composed into the job schema by config.py), without repeats."""
    return list(dict.fromkeys(cls.job_options for cls in ADAPTERS.values()))


def job_keys() -> tuple[str, ...]:
    """Every job key that chooses the adapter or its options (a state saved under others cannot resume)."""
    return ("network_algo", "network_module", "network_args",
            *dict.fromkeys(k for table in option_tables() for k in table.model_fields))
LYCORIS_MODULE = "lycoris.kohya"
KOHYA_LORA_MODULE = "networks.lora"


def resolve_algo(name: str) -> tuple[str, dict]:
    """(algo, implied options) for a job's algorithm name; one line with suggestions when unknown."""
    key = str(name).strip().lower()
    if key in ALGO_NAMES:
        return ALGO_NAMES[key]
    known = ", ".join(ALGO_NAMES)
    if key in _LYCORIS_OTHERS:
        raise UserError(f"network algo {name!r} is a LyCORIS algorithm difflora does not train; use one of {known}")
    close = difflib.get_close_matches(key, list(ALGO_NAMES), n=2, cutoff=0.5)
    hint = f" (did you mean {' or '.join(close)}?)" if close else ""
    raise UserError(f"unknown network algo {name!r}{hint}; known: {known}")


def adapter_class(algo: str) -> type[Adapter]:
    return ADAPTERS[resolve_algo(algo)[0]]


# ------------------------------------------------------------------ job options
def _parse_bool(key: str, value) -> bool:
    if isinstance(value, bool):
        return value
    v = str(value).strip().lower()
    if v in ("true", "1", "yes", "on"):
        return True
    if v in ("false", "0", "no", "off", "none", ""):
        return False
    raise UserError(f"network_args {key}={value!r}: expected true or false")


def _parse_int(key: str, value) -> int:
    try:
        return int(str(value).strip())
    except ValueError:
        raise UserError(f"network_args {key}={value!r}: expected an integer") from None


def _parse_float(key: str, value) -> float:
    try:
        return float(str(value).strip())
    except ValueError:
        raise UserError(f"network_args {key}={value!r}: expected a number") from None


# LyCORIS / kohya network_args difflora understands -> (normalised key, parser)
_NETWORK_ARGS = {
    "algo": ("algo", str),
    "conv_dim": ("conv_dim", _parse_int), "conv_alpha": ("conv_alpha", _parse_float),
    "use_tucker": ("use_tucker", _parse_bool), "use_cp": ("use_tucker", _parse_bool),
    "use_conv_cp": ("use_tucker", _parse_bool),
    "factor": ("factor", _parse_int), "decompose_both": ("decompose_both", _parse_bool),
    "full_matrix": ("full_matrix", _parse_bool), "dora_wd": ("dora_wd", _parse_bool),
    "wd_on_output": ("wd_on_output", _parse_bool),
    "dropout": ("dropout", _parse_float), "rank_dropout": ("rank_dropout", _parse_float),
    "module_dropout": ("module_dropout", _parse_float),
    "preset": ("preset", str),
    "loraplus_lr_ratio": ("loraplus_lr_ratio", _parse_float),
    "loraplus_unet_lr_ratio": ("loraplus_unet_lr_ratio", _parse_float),
    "loraplus_text_encoder_lr_ratio": ("loraplus_text_encoder_lr_ratio", _parse_float),
}


# network_args kohya's networks.lora (block-wise) and kohya_ss's LyCORIS presets pass, which difflora does not do:
# key -> why. The switches among them are accepted while off (the GUI writes every one, `use_scalar=False`).
_REFUSED_ARGS = {
    **dict.fromkeys(("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas"),
                    "per-block ranks are not supported: every module trains at network_dim / conv_dim"),
    **dict.fromkeys(("down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold"),
                    "per-block learning rates are not supported: every module learns at unet_lr"),
    "use_scalar": "LyCORIS' trained scalar per module is not supported",
    "rank_dropout_scale": "rank dropout is not rescaled here",
    "bypass_mode": "difflora's adapters always run beside the frozen layer, never fused into it",
    "train_norm": "normalisation layers are not trained",
    "constraint": "a Diag-OFT option (difflora does not train OFT)",
    "rescaled": "a Diag-OFT option (difflora does not train OFT)",
    "block_size": "a DyLoRA option (difflora does not train DyLoRA)",
    "train_on_input": "an IA3 option (difflora does not train IA3)",
}
_SWITCHES = ("use_scalar", "rank_dropout_scale", "bypass_mode", "train_norm", "rescaled", "train_on_input")


def client_limits(options: AdapterOptions, trains_kxk_convs: bool) -> list[str]:
    """What the usual clients cannot apply of a file these options write (one warning each, before training).
    LoKr's Tucker core (`lokr_t2`, on kxk convs with use_tucker): Forge raises on each such layer and drops the
    whole LoRA, ComfyUI skips those layers; A1111 applies it (measured with each client's code)."""
    if options.algo == "lokr" and options.use_tucker and trains_kxk_convs:
        return ["LoKr with network_use_tucker writes a Tucker core (lokr_t2) on the kxk convs: Forge cannot apply such "
                "a file (the whole LoRA fails) and ComfyUI skips those layers; only A1111 applies it. Leave "
                "network_use_tucker off for those clients"]
    return []


def parse_network_args(args, handled: tuple[str, ...] = ()) -> dict[str, object]:
    """kohya's `network_args` ("key=value" strings, or a table) -> normalised, typed options.

    A misspelt or unsupported key is refused with one line naming it (and the closest known key).
    `handled`: keys a family's network module reads, already applied to the job (config.py).
    """
    pairs: list[tuple[str, object]] = []
    if isinstance(args, Mapping):
        pairs = list(args.items())
    else:
        for item in args or []:
            if "=" not in str(item):
                raise UserError(f"network_args entry {item!r} is not key=value")
            k, v = str(item).split("=", 1)
            pairs.append((k.strip(), v.strip()))
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in handled or key == "verbose":  # verbose: sd-scripts prints its module list
            continue
        if key in _REFUSED_ARGS:
            if key in _SWITCHES and not _parse_bool(key, value):
                continue
            raise UserError(f"network_args {key}={value}: {_REFUSED_ARGS[key]}; remove it")
        if key not in _NETWORK_ARGS:
            close = difflib.get_close_matches(key, list(_NETWORK_ARGS), n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise UserError(f"unknown network_args option {key!r}{hint}; known: {', '.join(sorted(_NETWORK_ARGS))}")
        if value is None or (isinstance(value, str) and value.lower() == "none" and key.endswith("dropout")):
            continue  # sd-scripts injects "dropout": None
        name, parse = _NETWORK_ARGS[key]
        out[name] = parse(key, value) if parse is not str else str(value)
    if out.get("wd_on_output"):
        raise UserError("network_args wd_on_output=true: difflora writes DoRA's magnitude on the input axis, the one "
                        "A1111 and ComfyUI merge as trained (both mis-merge output-axis files); remove it")
    out.pop("wd_on_output", None)
    preset = out.pop("preset", None)
    if preset is not None and str(preset).lower() not in ("attn-mlp", "full"):
        raise UserError(f"network_args preset={preset!r} is not supported; difflora wraps kohya's modules "
                        "(attention and MLP, plus 3x3 convs with conv_dim)")
    return out


def adapter_options(algo: str = "lora", *, use_tucker: bool = False, factor: int = -1, decompose_both: bool = False,
                    full_matrix: bool = False, dora_wd: bool = False, dora_on_output: bool = False) -> AdapterOptions:
    """The normalised options; `algo` may be an alias (`locon`, `dora`)."""
    name, implied = resolve_algo(algo)
    dora = dora_wd or implied.get("dora_wd", False)
    opts = AdapterOptions(algo=name, use_tucker=use_tucker, factor=factor, decompose_both=decompose_both,
                          full_matrix=full_matrix, dora_wd=dora, dora_on_output=dora and dora_on_output)
    if opts.factor == 0 or opts.factor < -1:
        raise UserError(f"network factor must be -1 (most square) or a positive integer, got {factor}")
    return opts


# ------------------------------------------------------------------ files
def split_key(key: str) -> tuple[str, str]:
    """'lora_unet_x.hada_w1_a' -> ('lora_unet_x', 'hada_w1_a')."""
    name, _, suffix = key.partition(".")
    return name, suffix


def detect(suffixes) -> type[Adapter] | None:
    """The algorithm of one module from its key suffixes (the clients' order), or None."""
    present = set(suffixes)
    for marker, cls in _MARKERS:
        if marker in present:
            return cls
    return None


def by_module(tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """A file's tensors per module name, by key suffix."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, suffix = split_key(key)
        grouped.setdefault(name, {})[suffix] = value
    return grouped


def group_modules(tensors: Mapping[str, torch.Tensor], source: str) -> dict[str, tuple[type[Adapter], dict]]:
    """A file's tensors per module with the module's class, checked; a UserError naming the key otherwise."""
    for key in tensors:
        if split_key(key)[1] not in KNOWN_SUFFIXES:
            raise UserError(f"unrecognised key {key!r}; not a LoRA, LoCon, LoHa, LoKr or DoRA file", path=source)
    grouped = by_module(tensors)
    out = {}
    for name, parts in sorted(grouped.items()):
        cls = detect(parts)
        if cls is None:
            raise UserError(f"module {name} has only {', '.join(sorted(parts))}; its adapter tensors are missing",
                            path=source)
        foreign = sorted(s for s in parts if s not in (*cls.keys, "alpha", "dora_scale"))
        if foreign:
            raise UserError(f"{name}.{foreign[0]} does not belong to a {cls.title} module", path=source)
        missing = [k for k in cls.required if k not in parts]
        if missing:
            raise UserError(f"{cls.title} module {name} is missing {name}.{missing[0]}", path=source)
        shapes = {k: tuple(v.shape) for k, v in parts.items() if k not in ("alpha", "dora_scale")}
        problem = cls.check_shapes(name, shapes)
        if problem:
            raise UserError(f"{cls.title} module {name}: {problem}", path=source)
        for part, t in parts.items():
            if not torch.isfinite(t.float()).all():
                raise UserError(f"{name}.{part} contains NaN or Inf values; the file is damaged", path=source)
        a = parts.get("alpha")
        if a is not None and a.numel() != 1:
            raise UserError(f"{name}.alpha must be a scalar, has shape {tuple(a.shape)}", path=source)
        d = parts.get("dora_scale")
        if d is not None:
            problem = _dora_problem(tuple(d.shape), cls.flat_shape(shapes))
            if problem:
                raise UserError(f"{name}.dora_scale {problem}", path=source)
        out[name] = (cls, parts)
    return out


def _dora_problem(shape: tuple[int, ...], flat: tuple[int, int]) -> str | None:
    out_dim, in_flat = flat
    if len(shape) not in (2, 4) or any(s != 1 for s in shape[2:]):
        return (f"has shape {shape}; DoRA magnitudes are (1, in[, 1, 1]) (or LyCORIS' (out, 1[, 1, 1])), "
                "never 1-D (the clients mis-broadcast it)")
    if shape[0] == 1 and in_flat % shape[1] == 0 and in_flat // shape[1] in (1, 4, 9, 16, 25, 49):
        return None
    if shape[0] == out_dim and shape[1] == 1:
        return None
    return f"has shape {shape}, which fits neither the input axis nor the output axis of a {out_dim}x{in_flat} delta"


def has_factors(cls: type[Adapter], parts: Mapping[str, torch.Tensor]) -> bool:
    """ΔW_eff = up @ down with explicit factors: a low-rank algorithm without DoRA."""
    return cls.low_rank and "dora_scale" not in parts


def is_kohya_lora(cls: type[Adapter], parts: Mapping[str, torch.Tensor]) -> bool:
    """The form kohya's networks.lora and its tools take: LoRA/LoCon without Tucker core or DoRA."""
    return cls.low_rank and set(parts) <= set(cls.required) | {"alpha"}


def module_shapes(parts: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in parts.items() if k not in ("alpha", "dora_scale")}


def module_rank_alpha(cls: type[Adapter], parts: Mapping[str, torch.Tensor]) -> tuple[int, float, float]:
    """(rank, alpha, scale) of a file's module as the clients compute them (no alpha: scale 1)."""
    shapes = module_shapes(parts)
    rank = cls.rank_of(shapes)
    a = parts.get("alpha")
    alpha = float(a) if a is not None and float(a) != 0.0 else float(rank)
    scale = cls.scale_of(shapes, alpha) if rank else 1.0
    if a is None:
        scale = 1.0
    return rank, alpha, scale


def module_dense(cls: type[Adapter], parts: Mapping[str, torch.Tensor], base_weight: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """The module's effective ΔW at strength 1 as a 2-D float32 (out, in·kh·kw) matrix.

    DoRA needs the base weight (its delta depends on it); without one a UserError says so.
    """
    t = {k: v.float() for k, v in parts.items() if k not in ("alpha", "dora_scale")}
    delta = cls.dense(t) * module_rank_alpha(cls, parts)[2]
    d = parts.get("dora_scale")
    if d is None:
        return delta
    if base_weight is None:
        raise UserError("a DoRA module's delta depends on the base model's weights; pass the base model (--model)")
    w = base_weight.detach().float()
    from .base import dora_delta

    return dora_delta(w, delta.reshape(w.shape), d.float()).reshape(delta.shape)


__all__ = ["ADAPTERS", "ALGO_NAMES", "client_limits", "LYCORIS_ARGS", "job_keys", "option_tables", "Adapter", "AdapterOptions", "KOHYA_LORA_MODULE", "LYCORIS_MODULE", "LoHa",
           "LoKr", "LoRA", "adapter_class", "adapter_options", "by_module", "detect", "dora_scale_shape", "group_modules",
           "has_factors", "is_kohya_lora", "module_dense", "module_rank_alpha", "module_shapes", "normalise_job_keys", "adapter_options_of",
           "parse_network_args", "resolve_algo", "split_key"]


# ------------------------------------------------------------------ job keys -> one normalised form
# network_args key -> the job field difflora spells it as
_ARG_FIELDS = {"use_tucker": "network_use_tucker", "factor": "network_factor", "decompose_both": "network_decompose_both",
               "full_matrix": "network_full_matrix", "dora_wd": "network_dora", "conv_dim": "conv_dim",
               "conv_alpha": "conv_alpha", "dropout": "network_dropout", "rank_dropout": "rank_dropout",
               "module_dropout": "module_dropout", "loraplus_lr_ratio": "loraplus_lr_ratio",
               "loraplus_unet_lr_ratio": "loraplus_unet_lr_ratio",
               "loraplus_text_encoder_lr_ratio": "loraplus_text_encoder_lr_ratio"}
_LORAPLUS = ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")
_LYCORIS_ONLY = ("algo", "use_tucker", "factor", "decompose_both", "full_matrix", "dora_wd")


def normalise_job_keys(job, family_modules: Mapping[str, tuple[str, ...]] | None = None) -> dict[str, object]:
    """Fold kohya's `network_module` / `network_args` into difflora's keys and check them.

    Returns the job fields to update: `network_algo` becomes the canonical algorithm (`lora`,
    `loha`, `lokr`; `dora` becomes `lora` + `network_dora`), `network_module` says `lycoris.kohya`
    for anything but plain LoRA, and the options given in `network_args` land in their fields.
    A key given both ways with different values, a LyCORIS option under `networks.lora`, or an
    unknown option is refused with one line.
    """
    module = job.network_module
    family_modules = dict(family_modules or {})
    if module not in (KOHYA_LORA_MODULE, LYCORIS_MODULE, *family_modules):
        known = ", ".join(repr(m) for m in (KOHYA_LORA_MODULE, LYCORIS_MODULE, *family_modules))
        raise UserError(f"'network_module = {module!r}' is a kohya option difflora does not support; use one of "
                        f"{known}")
    args = parse_network_args(job.network_args, family_modules.get(module, ()))
    lycoris_args = [k for k in _LYCORIS_ONLY if k in args]
    if module != LYCORIS_MODULE and lycoris_args:
        raise UserError(f"network_args {lycoris_args[0]}=... is a LyCORIS option; set network_module = "
                        f"\"{LYCORIS_MODULE}\" (or use network_algo = ...)")
    given = job.model_fields_set
    values = {name: getattr(job, name) for name in ("network_algo", *_ARG_FIELDS.values())}
    if "algo" in args:
        if "network_algo" in given and resolve_algo(job.network_algo) != resolve_algo(args["algo"]):
            raise UserError(f"network_algo = {job.network_algo!r} and network_args algo={args['algo']} disagree; "
                            "give one")
        values["network_algo"] = args.pop("algo")
    for arg, value in args.items():
        name = _ARG_FIELDS[arg]
        if name in given and getattr(job, name) != value:
            raise UserError(f"{name} = {getattr(job, name)!r} and network_args {arg}={value} disagree; give one")
        values[name] = value
    if module == LYCORIS_MODULE and "network_module" in given:
        # kohya/LyCORIS spelling: kxk convs at network_dim/alpha unless told otherwise (recomputed on every
        # validation, so a method's default network_dim reaches them too)
        if "conv_dim" not in given and "conv_dim" not in args:
            values["conv_dim"] = job.network_dim
        if "conv_alpha" not in given and "conv_alpha" not in args:
            values["conv_alpha"] = job.network_alpha
    opts = adapter_options(values["network_algo"], use_tucker=values["network_use_tucker"],
                           factor=values["network_factor"], decompose_both=values["network_decompose_both"],
                           full_matrix=values["network_full_matrix"], dora_wd=values["network_dora"])
    values.update(network_algo=opts.algo, network_dora=opts.dora_wd,
                  network_module=LYCORIS_MODULE if opts.is_lycoris else module)
    loraplus = {k: values[k] for k in _LORAPLUS if values[k] is not None}
    for key, ratio in loraplus.items():
        if ratio <= 0:
            raise UserError(f"{key} = {ratio:g}: the ratio must be greater than 0")
    if loraplus and opts.algo != "lora":
        raise UserError(f"{next(iter(loraplus))}: LoRA+ scales the lr of lora_up weights, which {opts.algo} has none "
                        "of; remove it or use network_algo = \"lora\"")
    return values


def adapter_options_of(job) -> AdapterOptions:
    """The normalised adapter choice of a job (after `normalise_job_keys`). DoRA saved for diffusers trains peft's
    output-axis magnitude, the one diffusers loads (`lora_magnitude_vector`)."""
    return adapter_options(job.network_algo, use_tucker=job.network_use_tucker, factor=job.network_factor,
                           decompose_both=job.network_decompose_both, full_matrix=job.network_full_matrix,
                           dora_wd=job.network_dora, dora_on_output=job.save_format == "diffusers")
