"""The Train page's form, generated from the job schema (`config.JobConfig`).

Every job key becomes a field; nested option tables (`addift.*`, `copier.*`, ...) become dotted
fields. A field left blank, or at the method's recommended value, is left out of the job, so
the method's defaults fill it exactly as with the CLI. Validation writes the job TOML and runs
the CLI's own `load_job(..., restrict_paths_to=workspace)`, so the messages are the CLI's.
"""

from __future__ import annotations

import re
import typing
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from ..config import JobConfig, apply_overrides
from ..errors import UserError
from ..options import path_keys

# (group, keys shown open, everything else of the group is folded). README's grouping.
GROUPS: list[tuple[str, list[str], list[str]]] = [
    ("Data", ["image_dir", "after_suffix", "caption_extension", "resolution"],
     ["after_dir", "num_repeats", "batch_size", "shuffle_caption", "keep_tokens", "keep_tokens_separator",
      "caption_separator", "caption_prefix", "caption_suffix", "caption_dropout_rate", "caption_dropout_every_n_epochs",
      "caption_tag_dropout_rate", "flip_aug", "class_tokens", "is_reg", "enable_bucket", "min_bucket_reso",
      "max_bucket_reso", "bucket_reso_steps", "bucket_no_upscale", "train_data_dir", "reg_data_dir",
      "dataset_config", "cache_latents", "cache_latents_to_disk", "skip_bad_images"]),
    ("Model", ["model", "model_family"], ["v_parameterization", "clip_skip", "allow_pickle", "preset_loras",
                          "sample_without_presets"]),
    ("Method", ["method"], ["per_pair_average", "average_rank", "diff_mask_threshold", "diff_mask_dilate"]),
    ("Network", ["network_dim", "network_alpha"],
     ["conv_dim", "conv_alpha", "network_dropout", "rank_dropout", "module_dropout", "network_only_if_contains",
      "network_ignore_if_contains", "network_train_unet_only", "network_train_text_encoder_only", "network_weights"]),
    ("Optimisation", ["learning_rate", "max_train_steps", "train_batch_size", "lr_scheduler", "seed"],
     ["unet_lr", "text_encoder_lr", "optimizer_type", "optimizer_args", "lr_warmup_steps", "lr_scheduler_num_cycles",
      "lr_scheduler_power", "max_train_epochs", "gradient_accumulation_steps", "max_grad_norm", "mixed_precision",
      "gradient_checkpointing", "min_snr_gamma", "noise_offset", "min_timestep", "max_timestep", "prior_loss_weight",
      "torch_compile"]),
    ("Output", ["output_name"], ["output_dir", "save_precision", "save_every_n_epochs", "save_every_n_steps",
                                 "save_state", "save_state_every_n_steps", "overwrite", "training_comment"]),
    ("Samples and logs", ["sample_prompt", "sample_multipliers", "sample_every_n_steps"],
     ["sample_prompts", "sample_every_n_epochs", "sample_at_first", "sample_sampler", "logging_dir", "log_with"]),
]

# Keys of the first [[datasets.subsets]] (the pair folder); the form shows them in "Data".
SUBSET_KEYS = ("image_dir", "after_dir", "after_suffix")
# Keys the UI turns into a prompt file (kohya syntax, `--m` per multiplier) when sample_prompts is blank.
UI_KEYS = {
    "sample_prompt": "preview prompt(s), one per line; blank: the 'before' caption of the first pair, so the "
                     "preview shows the change",
    "sample_multipliers": "LoRA weights of the preview grid's columns, comma-separated",
}
UI_DEFAULTS = {"sample_prompt": "", "sample_multipliers": "-1,0,1"}
FALLBACK_PROMPT = "a face"  # a folder without captions
CHECK_RESOLUTION = 512  # pairs are checked at this size when the job sets none
PREVIEW_STEPS = 8  # sampler steps of a preview: DDIM at 8 looks like 20 on the toy faces, and keeps sampling cheap
# Values the schema accepts that are almost surely a slip: (key, low, high, why). The form refuses them, naming
# the range (the CLI takes them: a job file is deliberate).
PLAUSIBLE = [
    ("learning_rate", 1e-7, 1.0, "LoRA learning rates are 1e-5 to 1e-2"),
    ("unet_lr", 1e-7, 1.0, "LoRA learning rates are 1e-5 to 1e-2"),
    ("text_encoder_lr", 1e-7, 1.0, "LoRA learning rates are 1e-5 to 1e-2"),
    ("max_train_steps", 1, 100_000, "a difference LoRA needs tens to thousands of steps"),
    ("network_dim", 1, 256, "usual ranks are 4 to 128"),
    ("train_batch_size", 1, 64, "larger batches rarely fit in memory"),
]
# Keys naming files or folders (marked in the schema, every family's included): relative to the workspace.
PATH_KEYS = {key.rsplit(".", 1)[-1] for key, _ in path_keys(JobConfig)}
SKIPPED = {"general", "datasets"}  # the pair folder fields and the top-level dataset keys stand for them



@dataclass
class FieldSpec:
    key: str  # dotted for nested tables: "addift.multiplier"
    group: str
    advanced: bool
    kind: str  # "bool", "optional_bool", "choice", "text"
    choices: list[str] | None
    default: Any  # the schema default (before method defaults)
    is_str: bool  # the value is taken as typed, not parsed as TOML
    help: str = ""

    @property
    def label(self) -> str:
        return self.key


def _unwrap(annotation) -> tuple[list, bool]:
    """The non-None members of an annotation, and whether None is allowed."""
    args = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, getattr(__import__("types"), "UnionType", None)) else (annotation,)
    return [a for a in args if a is not type(None)], any(a is type(None) for a in args)


def _spec(key: str, field, default, group: str, advanced: bool) -> FieldSpec:
    from ..config_help import describe

    members, optional = _unwrap(field.annotation)
    text = describe(key, field)  # the line of `difflora train --help-keys`
    if len(members) == 1 and typing.get_origin(members[0]) is Literal:
        choices = [str(c) for c in typing.get_args(members[0])]
        return FieldSpec(key, group, advanced, "choice", ([""] if optional else []) + choices, default, True, text)
    if members == [bool]:
        return FieldSpec(key, group, advanced, "optional_bool" if optional else "bool", None, default, False, text)
    return FieldSpec(key, group, advanced, "text", None, default, members == [str], text)


def _nested_models() -> dict[str, type[BaseModel]]:
    out = {}
    for name, f in JobConfig.model_fields.items():
        members, _ = _unwrap(f.annotation)
        if len(members) == 1 and isinstance(members[0], type) and issubclass(members[0], BaseModel) and name not in SKIPPED:
            out[name] = members[0]
    return out


def methods() -> list[str]:
    members, _ = _unwrap(JobConfig.model_fields["method"].annotation)
    return [str(m) for m in typing.get_args(members[0])]


def method_defaults(method: str) -> dict:
    from ..methods import METHODS

    return dict(METHODS[method].defaults) if method in METHODS else {}


def method_purpose(method: str) -> str:
    """What the method is for, as its module says (Method.purpose)."""
    from ..methods import METHODS

    return METHODS[method].purpose if method in METHODS else ""


def family_groups() -> dict[str, str]:
    """Each model family's job key -> its form group, named after the families that honour the key."""
    from ..models.registry import option_tables

    owners: dict[str, list[str]] = {}
    for plugin, table in option_tables():
        for key in table.model_fields:
            owners.setdefault(key, []).append(plugin.title)
    return {key: f"{' / '.join(titles)} models" for key, titles in owners.items()}


def family_group_names() -> dict[str, set[str]]:
    """Each family form group -> the model_family values whose plug-in honours its keys."""
    from ..models.registry import option_tables

    names: dict[str, set[str]] = {}
    groups = family_groups()
    for plugin, table in option_tables():
        for key in table.model_fields:
            names.setdefault(groups[key], set()).update(plugin.names)
    return names


def build_fields() -> list[FieldSpec]:
    """One FieldSpec per job key, in group order (unknown keys land in a folded 'Other' group)."""
    from ..config import SubsetConfig

    placed: dict[str, tuple[str, bool]] = {}
    for group, basic, advanced in GROUPS:
        for k in basic:
            placed[k] = (group, False)
        for k in advanced:
            placed.setdefault(k, (group, True))
    families = family_groups()
    nested = _nested_models()
    specs: list[FieldSpec] = []
    for key in SUBSET_KEYS:
        f = SubsetConfig.model_fields[key]
        specs.append(_spec(key, f, None, *placed[key]))
    for key, text in UI_KEYS.items():
        s = FieldSpec(key, *placed[key], "text", None, UI_DEFAULTS[key], True, text)
        specs.append(s)
    for name, f in JobConfig.model_fields.items():
        if name in SKIPPED:
            continue
        if name in nested:
            for sub, sf in nested[name].model_fields.items():
                specs.append(_spec(f"{name}.{sub}", sf, sf.default, f"{name} options", True))
            continue
        group, advanced = placed.get(name, (families[name], True) if name in families else ("Other", True))
        specs.append(_spec(name, f, f.default, group, advanced))
    order = {g: i for i, (g, _, _) in enumerate(GROUPS)}
    model_at = order["Model"]
    family_names = list(dict.fromkeys(families.values()))
    order.update({g: model_at + (i + 1) / 100 for i, g in enumerate(family_names)})  # right after Model
    method_at = order["Method"]
    order.update({f"{n} options": method_at + (i + 1) / 100 for i, n in enumerate(nested)})  # right after Method
    order["Other"] = len(order) + 1
    return sorted(specs, key=lambda s: (order.get(s.group, 99), s.advanced))


def effective_default(spec: FieldSpec, method: str) -> Any:
    if spec.key in UI_DEFAULTS:
        return UI_DEFAULTS[spec.key]
    return method_defaults(method).get(spec.key, spec.default)


def display(value: Any) -> str:
    """A value as the form shows it: TOML's inline spelling, which is also what the field parses."""
    if value is None:
        return ""
    return value if isinstance(value, str) else toml_inline(value)


def toml_inline(value: Any) -> str:
    import json
    import re

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_inline(v) for v in value) + "]"
    if isinstance(value, dict):
        keys = (k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k) for k in value)
        return "{" + ", ".join(f"{k} = {toml_inline(v)}" for k, v in zip(keys, value.values())) + "}"
    return repr(value) if isinstance(value, float) else str(value)


def form_to_job(specs: list[FieldSpec], values: list, workspace, run_folder: Path | None = None) -> tuple[dict, dict]:
    """(job dict for the TOML, UI settings) from the form's values; paths made absolute inside the workspace."""
    by_key = dict(zip((s.key for s in specs), values))
    method = by_key.get("method") or "standard"
    data: dict = {}
    ui: dict = {}
    for spec in specs:
        value = by_key[spec.key]
        if spec.key in UI_KEYS:
            ui[spec.key] = (value or "").strip()  # blank: UI_DEFAULTS
            continue
        if spec.kind == "bool":
            if bool(value) == bool(effective_default(spec, method)):
                continue
            parsed = bool(value)
        elif spec.kind == "optional_bool":
            if value in (None, ""):
                continue
            parsed = value == "true" if isinstance(value, str) else bool(value)
        elif spec.kind == "choice":
            if value in (None, "") or (value == effective_default(spec, method) and spec.key != "method"):
                continue
            parsed = value
        else:
            text = (value or "").strip() if isinstance(value, str) else value
            if text in (None, ""):
                continue
            if spec.key in PATH_KEYS:
                parsed = str(workspace.resolve(text, spec.key))
            else:
                parsed = text if spec.is_str else apply_overrides({}, [f"v={text}"])["v"]  # as `--set key=value`
        node = data
        parts = spec.key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = parsed
    subset = {k: data.pop(k) for k in SUBSET_KEYS if k in data}
    if "image_dir" in subset:
        data["datasets"] = [{"subsets": [subset]}]
    elif len(subset):
        raise UserError("set image_dir (the pair folder) to use after_dir or after_suffix")
    if run_folder is not None and "output_dir" not in data:
        data["output_dir"] = str(run_folder / "output")
    return data, ui


def preview_prompts(ui: dict, data: dict) -> list[str]:
    """The preview's prompts: as typed, else the 'before' caption of the job's first pair."""
    typed = [p.strip() for p in (ui.get("sample_prompt") or "").splitlines() if p.strip()]
    if typed:
        return typed
    subset = ((data.get("datasets") or [{}])[0].get("subsets") or [{}])[0]
    folder = Path(subset.get("image_dir") or "")
    suffix = subset.get("after_suffix") or "_after"
    extension = data.get("caption_extension") or ".txt"
    if folder.is_dir():
        from ..data.images import IMAGE_EXTENSIONS

        befores = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS
                         and not p.stem.endswith(suffix))
        for image in befores:
            caption = image.with_suffix(extension)
            if caption.is_file():
                text = " ".join(caption.read_text(encoding="utf-8", errors="replace").split())
                if text:
                    return [text]
    return [FALLBACK_PROMPT]


def sample_multipliers(ui: dict) -> list[float]:
    text = ui.get("sample_multipliers") or UI_DEFAULTS["sample_multipliers"]
    try:
        mults = [float(m) for m in text.split(",") if m.strip()]
    except ValueError:
        raise UserError(f"sample_multipliers: comma-separated numbers, got {text!r}") from None
    if not mults:
        raise UserError("sample_multipliers: give at least one multiplier")
    return mults


def sample_layout(ui: dict, data: dict | None = None) -> list[dict]:
    """The (prompt, multiplier) of each image of the preview grid, row by row."""
    prompts = preview_prompts(ui, data or {})
    return [{"prompt": p, "multiplier": m} for p in prompts for m in sample_multipliers(ui)]


def prompt_file_text(prompts: list[str], seed: int = 1, steps: int = PREVIEW_STEPS, cfg: float = 4.0) -> str:
    """kohya prompt syntax, one line per prompt (the job's sample_sweep gives the columns), one seed for all."""
    return "".join(f"{p} --d {seed} --s {steps} --l {cfg:g}\n" for p in prompts)


def job_toml(data: dict) -> str:
    import tomli_w

    return tomli_w.dumps(data)


def validate(data: dict, workspace, with_data: bool = False) -> str | None:
    """None, or the CLI's one-line error for this job (the job file named as 'job.toml').

    With `with_data`, the training's own loader (data/dataset.py) also reads every image and pair as a
    run would, without a model: missing folders and partners, unreadable images, identical pairs.
    """
    from ..config import load_job
    from ..data.dataset import TrainingData
    from ..methods import METHODS

    tmp = workspace.root / ".gradio" / f"validate-{uuid.uuid4().hex}.toml"
    try:
        tmp.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(job_toml(data), encoding="utf-8")
        job = load_job(tmp, restrict_paths_to=workspace.policy)
        if with_data:
            # the model's size is not known before loading it: pairs are compared at SD's 512 unless set
            resolution = job.resolution if isinstance(job.resolution, int) else CHECK_RESOLUTION
            try:
                loaded = TrainingData(job, resolution, 8, pairs=METHODS[job.method].needs_pairs)
                # reads the pixels and refuses identical pairs; the alignment warnings are the Pairs page's (and
                # the training log's): measuring them took ~0.6 s a pair before a refusal could be shown
                loaded.cache_latents(None, encode=False, measure_alignment=False)
            except UserError as e:  # paths as the form shows them; a problem naming no field is the pair folder's
                text = str(e).replace(str(workspace.root) + "/", "")
                return text if field_of_error(text, build_fields()) else f"image_dir: {text}"
    except UserError as e:
        return str(e).replace(str(tmp), "job.toml")
    finally:
        tmp.unlink(missing_ok=True)
    return None


def form_message(message: str, specs: list[FieldSpec]) -> str:
    """A CLI message in the form's words: no job file or line, a dataset key named by its field."""
    import re

    text = re.sub(r"^(job\.toml: )?(line \d+: )?", "", message)
    text = re.sub(r"datasets\[0\]\.subsets\[0\]\.", "", text)
    text = re.sub(r"'datasets', 0, 'subsets', 0, '(\w+)'", r"'\1'", text)
    labels = {s.key: s.label for s in specs}
    m = re.match(r"^'?([\w.]+)'?: ", text)
    if m and m.group(1) in labels:
        text = f"{labels[m.group(1)]}: " + text[m.end():]
    return text


def field_of_error(message: str, specs: list[FieldSpec]) -> FieldSpec | None:
    for spec in sorted(specs, key=lambda s: -len(s.key)):  # 'addift.multiplier' before 'multiplier'
        if re.search(rf"(^|[^\w.]){re.escape(spec.key)}([^\w]|$)", message):
            return spec
    return None


def implausible(data: dict) -> list[str]:
    """Values the schema accepts but nobody means, each with the range that makes sense."""
    out = []
    for key, low, high, why in PLAUSIBLE:
        value = data.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not low <= value <= high:
            out.append(f"{key}: {value:g} is outside {low:g} to {high:g} ({why})")
    return out


def group_of_error(message: str, specs: list[FieldSpec]) -> str | None:
    """The form group whose key an error names ('learning_rate', 'addift.multiplier', 'datasets...')."""
    spec = field_of_error(message, specs)
    if spec is not None:
        return spec.group
    if "datasets" in message or "training data" in message:
        return "Data"
    return None


def job_to_values(specs: list[FieldSpec], data: dict, ui: dict, workspace, run_folder: Path | None = None) -> list:
    """The form's values for a saved job (the inverse of form_to_job), for re-opening or cloning a run."""
    method = data.get("method", "standard")
    subset = ((data.get("datasets") or [{}])[0].get("subsets") or [{}])[0]
    values = []
    for spec in specs:
        if spec.key in UI_KEYS:
            values.append(ui.get(spec.key, ""))
            continue
        node = subset if spec.key in SUBSET_KEYS else data
        for p in spec.key.split(".")[:-1]:
            node = node.get(p, {}) if isinstance(node, dict) else {}
        value = node.get(spec.key.split(".")[-1]) if isinstance(node, dict) else None
        if spec.key == "output_dir" and run_folder is not None and value == str(run_folder / "output"):
            value = None
        if spec.kind == "bool":
            values.append(bool(effective_default(spec, method) if value is None else value))
        elif spec.kind == "optional_bool":
            values.append("" if value is None else ("true" if value else "false"))
        elif spec.kind == "choice":
            values.append(value if value is not None else (effective_default(spec, method) or ""))
        elif value is None:
            values.append("")
        elif spec.key in PATH_KEYS:
            values.append(workspace.relative(value))
        else:
            values.append(value if spec.is_str else display(value))
    return values
