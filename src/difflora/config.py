"""Job configuration: one TOML file, validated with pydantic, kohya's option names and defaults.

The dataset part follows kohya's layout ([general] / [[datasets]] / [[datasets.subsets]]),
either inline or in a separate file named by `dataset_config`. Errors name the key and the
line it is on; unknown keys are refused (a misspelt key never silently does nothing).
Relative paths are resolved against the folder of the file that names them.
"""

from __future__ import annotations

import logging
import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (PrivateAttr, BaseModel, Field, TypeAdapter, ValidationError, create_model, field_validator,
                      model_validator)

from . import kohya_config
from .errors import UserError
from .fileio import read_text_file
from .methods import METHODS
from .models.registry import family_names, option_tables
from .network.adapters import adapter_options_of, normalise_job_keys
from .network.adapters import job_keys as adapter_job_keys
from .network.adapters import option_tables as adapter_option_tables
from .options import ReadPath, Strict, WritePath, path_values
from .pathpolicy import PathPolicy

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ dataset (kohya layout)
def _file_name_part(v: str | None, what: str) -> str | None:
    """A suffix or extension that becomes part of a file name: no folders, no NUL."""
    if v is not None and ("/" in v or "\\" in v or "\x00" in v):
        raise ValueError(f"must be {what} without a path separator or NUL byte, got {v!r}")
    return v


class SubsetOptions(Strict):
    """Options allowed at [general], [[datasets]] and [[datasets.subsets]] level."""

    num_repeats: int | None = Field(None, ge=1)
    shuffle_caption: bool | None = None
    keep_tokens: int | None = Field(None, ge=0)
    keep_tokens_separator: str | None = None
    caption_separator: str | None = None
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    caption_extension: str | None = None
    caption_dropout_rate: float | None = Field(None, ge=0, le=1)
    caption_dropout_every_n_epochs: int | None = Field(None, ge=0)
    caption_tag_dropout_rate: float | None = Field(None, ge=0, le=1)
    flip_aug: bool | None = None
    class_tokens: str | None = None
    is_reg: bool | None = None

    @field_validator("caption_extension")
    @classmethod
    def _plain_extension(cls, v: str | None) -> str | None:
        return _file_name_part(v, "a file extension")


class DatasetOptions(SubsetOptions):
    resolution: int | tuple[int, int] | None = None
    batch_size: int | None = Field(None, ge=1)
    enable_bucket: bool | None = None
    min_bucket_reso: int | None = Field(None, ge=8)
    max_bucket_reso: int | None = Field(None, ge=8)
    bucket_reso_steps: int | None = Field(None, ge=8)
    bucket_no_upscale: bool | None = None


class SubsetConfig(SubsetOptions):
    image_dir: ReadPath
    # Pairs for the difference methods: the "after" image of NAME.png is NAME<after_suffix>.png in
    # the same folder, or NAME.png in `after_dir`.
    after_dir: ReadPath | None = None
    after_suffix: str | None = None

    @field_validator("after_suffix")
    @classmethod
    def _plain_suffix(cls, v: str | None) -> str | None:
        return _file_name_part(v, "a file-name suffix")


class DatasetConfig(DatasetOptions):
    subsets: list[SubsetConfig] = Field(min_length=1)


class DatasetFile(Strict):
    general: DatasetOptions = DatasetOptions()
    datasets: list[DatasetConfig] = Field(min_length=1)


# ------------------------------------------------------------------ the job
class PresetLora(Strict):
    path: ReadPath
    multiplier: float = 1.0


# Job keys that decide which modules the LoRA has, their ranks, and what the optimizer state holds:
# a training state saved under other values cannot be resumed.
SHAPE_KEYS = ("method", "network_dim", "conv_dim", "network_train_unet_only", "network_train_text_encoder_only",
              "network_only_if_contains", "network_ignore_if_contains", "per_pair_average", "optimizer_type",
              *adapter_job_keys(), "loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")

OptimizerName = Literal["AdamW", "AdamW8bit", "Lion", "Prodigy", "SGD"]
SchedulerName = Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"]


class JobOptions(DatasetOptions):
    """Every job key except the method tables and the model families' keys (see JobConfig)."""

    _source: str | None = PrivateAttr(None)  # the job file, for errors about its values

    # model
    model: ReadPath | None = None  # None: the embedded toy model
    model_family: Literal[family_names()] | None = None  # detected from the files when unset
    v_parameterization: bool = False
    zero_terminal_snr: bool = False  # rescale the noise schedule to zero terminal SNR (kohya's option)
    clip_skip: int | None = Field(None, ge=1)
    allow_pickle: bool = False
    preset_loras: list[PresetLora] = []
    sample_without_presets: bool = False

    # method (`method` and one table per method: see JobConfig)
    per_pair_average: bool = False  # train one LoRA per pair and average their deltas (DiffSynth-Studio)
    average_rank: int | None = Field(None, ge=1)  # SVD the average back to this rank (None: exact)
    # the edit methods' instruction for pairs without a NAME.instruction.txt (then: the pair's caption)
    edit_instruction: str | None = None

    # network
    network_dim: int = Field(4, ge=1)
    network_alpha: float = 1.0
    conv_dim: int | None = Field(None, ge=1)
    conv_alpha: float | None = None
    network_dropout: float | None = Field(None, ge=0, lt=1)
    rank_dropout: float | None = Field(None, ge=0, lt=1)
    module_dropout: float | None = Field(None, ge=0, lt=1)
    network_only_if_contains: list[str] = []  # keep only modules whose kohya name contains one of these
    network_ignore_if_contains: list[str] = []  # drop modules whose kohya name contains one of these
    network_train_unet_only: bool = False
    network_train_text_encoder_only: bool = False
    network_weights: ReadPath | None = None
    # adapter (network/adapters): difflora's keys, or kohya's network_module + network_args
    network_module: str = "networks.lora"  # "lycoris.kohya" for LoHa/LoKr/DoRA, as sd-scripts
    network_args: list[str] = []  # kohya/LyCORIS "key=value" strings: algo, conv_dim, factor, dora_wd, ...
    network_algo: str = "lora"  # network/adapters: the algorithms' names; their options are their own tables

    # optimisation
    learning_rate: float = Field(1e-4, gt=0)
    unet_lr: float | None = Field(None, ge=0)
    text_encoder_lr: float | None = Field(None, ge=0)
    # LoRA+ (kohya's network_args of the same names): lora_up weights learn at lr x ratio
    loraplus_lr_ratio: float | None = Field(None, gt=0)
    loraplus_unet_lr_ratio: float | None = Field(None, gt=0)  # the denoiser's; default loraplus_lr_ratio
    loraplus_text_encoder_lr_ratio: float | None = Field(None, gt=0)  # the text encoders'; default loraplus_lr_ratio
    optimizer_type: OptimizerName = "AdamW"
    optimizer_args: dict[str, Any] = {}
    lr_scheduler: SchedulerName = "constant"
    lr_warmup_steps: int | float = Field(0, ge=0)
    lr_scheduler_num_cycles: int = Field(1, ge=1)
    lr_scheduler_power: float = 1.0
    max_train_steps: int = Field(1600, ge=1)
    max_train_epochs: int | None = Field(None, ge=1)
    train_batch_size: int = Field(1, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_grad_norm: float = Field(1.0, ge=0)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"  # frozen weights in this dtype, LoRA weights in fp32
    full_bf16: bool = False  # LoRA weights and optimizer state in bf16 too (needs mixed_precision = "bf16")
    no_half_vae: bool = False  # keep the VAE in fp32 under mixed precision (SDXL's VAE overflows in fp16)
    sdpa: bool = True  # PyTorch scaled-dot-product attention (false: the plain attention processor)
    gradient_checkpointing: bool = False
    min_snr_gamma: float | None = Field(None, gt=0)
    noise_offset: float | None = Field(None, ge=0)
    min_timestep: int = Field(0, ge=0, le=1000)
    max_timestep: int = Field(1000, ge=1, le=1000)
    prior_loss_weight: float = Field(1.0, ge=0)
    seed: int = 42
    torch_compile: bool = False
    # several processes (accelerate launch / torchrun): DDP by default; FSDP2 shards the frozen model over the
    # GPUs; DeepSpeed ZeRO with kohya's key names
    fsdp: bool = False
    deepspeed: bool = False
    zero_stage: Literal[0, 1, 2, 3] | None = None  # None: 2, kohya's default

    # data
    train_data_dir: ReadPath | None = None
    reg_data_dir: ReadPath | None = None
    dataset_config: ReadPath | None = None
    general: DatasetOptions = DatasetOptions()
    datasets: list[DatasetConfig] = []
    cache_latents: bool = True
    cache_latents_to_disk: bool = False
    # prompt encodings computed once per caption (and kept on disk), the text encoders off the GPU
    cache_text_encoder_outputs: bool = False
    cache_text_encoder_outputs_to_disk: bool = False
    skip_bad_images: bool = False
    # validation (kohya's names; validation_data_dir is difflora's: a held-out folder instead of a split)
    validation_split: float = Field(0.0, ge=0.0, lt=1.0)
    validation_seed: int | None = None  # None: the job's seed
    validation_data_dir: ReadPath | None = None
    validate_every_n_steps: int | None = Field(None, ge=1)

    # output
    output_dir: WritePath = "output"
    output_name: str = "last"
    save_precision: Literal["float", "fp16", "bf16"] | None = None
    save_every_n_epochs: int | None = Field(None, ge=1)
    save_every_n_steps: int | None = Field(None, ge=1)
    save_state: bool = False
    # LoRA file layout: diffusers, comfyui, musubi (Z-Image's split q/k/v names) for families that have one
    save_format: Literal["kohya", "musubi", "comfyui", "diffusers"] = "kohya"
    save_state_every_n_steps: int | None = Field(None, ge=1)
    overwrite: bool = False
    training_comment: str | None = None

    # samples and logs
    sample_every_n_steps: int | None = Field(None, ge=1)
    sample_every_n_epochs: int | None = Field(None, ge=1)
    sample_at_first: bool = False
    sample_prompts: ReadPath | None = None
    sample_sampler: str | None = None  # None: the family's (ddim; FLUX: euler)
    sample_sweep: list[float] | None = Field(None, min_length=1)  # a grid per sampling step at these multipliers
    logging_dir: WritePath | None = None
    log_with: Literal["tensorboard", "none"] = "tensorboard"

    @field_validator("output_name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        if not v or "/" in v or "\\" in v or v.startswith("."):
            raise ValueError("must be a plain file name without folders")
        return v

    @model_validator(mode="after")
    def _consistent(self):
        if self.network_train_unet_only and self.network_train_text_encoder_only:
            raise ValueError("network_train_unet_only and network_train_text_encoder_only cannot both be true")
        if self.min_timestep >= self.max_timestep:
            raise ValueError("min_timestep must be smaller than max_timestep")
        method = METHODS.get(getattr(self, "method", "standard"))
        trains_te = not self.network_train_unet_only and not (method is not None and method.unet_only)
        if (self.cache_text_encoder_outputs or self.cache_text_encoder_outputs_to_disk) and trains_te:
            raise ValueError("cache_text_encoder_outputs needs network_train_unet_only = true: the text encoders "
                             "run once per caption, so a text-encoder LoRA could not be trained")
        if self.full_bf16 and self.mixed_precision != "bf16":
            raise ValueError('full_bf16 needs mixed_precision = "bf16"')
        if self.fsdp and self.deepspeed:
            raise ValueError("fsdp and deepspeed cannot both be true: choose one way to shard the training")
        if self.zero_stage is not None and not self.deepspeed:
            raise ValueError("zero_stage needs deepspeed = true")
        try:
            normalised = normalise_job_keys(self, _family_network_modules())
        except UserError as e:
            raise ValueError(str(e)) from None
        for name, value in normalised.items():  # values from network_args meet their field's limits too
            if value != getattr(self, name):
                field = type(self).model_fields[name]
                try:
                    TypeAdapter(Annotated[field.annotation, *field.metadata] if field.metadata else field.annotation)\
                        .validate_python(value)
                except ValidationError as e:
                    raise ValueError(f"{name} (from network_args) = {value!r}: {e.errors()[0]['msg'].lower()}") from None
        self.__dict__.update(normalised)  # not setattr: an assignment validates the model again
        return self

    def adapter_options(self):
        """The job's adapter (algorithm and options), normalised."""
        return adapter_options_of(self)


def _family_network_modules() -> dict[str, tuple[str, ...]]:
    """Each family's own sd-scripts network module -> the network_args it reads (kohya_config applied them)."""
    from .models.registry import FAMILIES

    return {p.kohya_network_module: (*p.kohya_network_args, *p.refused_network_args) for p in FAMILIES
            if p.kohya_network_module != "networks.lora"}


def _job_schema() -> type[JobOptions]:
    """JobOptions + `method` + each registered method's option table under the method's name + every adapter
    algorithm's and model family's keys, top-level (models/registry.py refuses a key of another family than
    the model's)."""
    tables = {name: (m.options, m.options()) for name, m in METHODS.items() if m.options is not None}
    keys = list(dict.fromkeys([*adapter_option_tables(), *(table for _, table in option_tables())]))
    keys = [t for t in keys if not any(o is not t and issubclass(o, t) for o in keys)]  # one MRO: leaves only
    return create_model("JobConfig", __base__=(JobOptions, *keys), __module__=__name__,
                        __doc__="A validated job TOML.",
                        method=(Literal[tuple(METHODS)], "standard"), **tables)


JobConfig = _job_schema()


# ------------------------------------------------------------------ loading
def _toml_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text
    except RecursionError:
        raise UserError(f"--set value {text[:40]!r}... is nested too deeply") from None


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """`--set key=value` (dotted keys reach into tables: addift.multiplier=0.5)."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set needs KEY=VALUE, got {item!r}")
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise UserError(f"--set {item!r}: {p} is not a table")
        node[parts[-1]] = _toml_value(value.strip())
    return data


def _key_line(text: str, loc: tuple) -> int | None:
    """Best-effort line number of the key a pydantic error points at."""
    keys = [str(x) for x in loc if not isinstance(x, int)]
    if not keys:
        return None
    target = keys[-1]
    lines = text.splitlines()
    tables = [k for k in keys[:-1]]
    header = ".".join(tables)
    in_table = not tables
    for i, line in enumerate(lines, 1):
        s = line.strip()
        m = re.match(r"^\[\[?\s*([^\]]+?)\s*\]\]?", s)
        if m:
            in_table = (m.group(1) == header) if tables else False
            continue
        if in_table and re.match(rf"^\s*{re.escape(target)}\s*=", line):
            return i
    for i, line in enumerate(lines, 1):  # fall back to any occurrence
        if re.match(rf"^\s*{re.escape(target)}\s*=", line) or re.match(rf"^\s*\[\[?\s*{re.escape(target)}\s*\]\]?", line.strip()):
            return i
    return None


def _model_at(model, loc: tuple):
    """The pydantic model class a location inside the config refers to (for suggestions)."""
    import typing

    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part)) if model else None
        if field is None:
            return None
        ann = field.annotation
        args = [a for a in typing.get_args(ann) if isinstance(a, type)] or [ann]
        model = next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), None)
    return model


def format_errors(e: ValidationError, text: str, path: str) -> UserError:
    err = e.errors()[0]
    loc = tuple(err.get("loc", ()))
    key = ".".join(str(x) for x in loc) or "(top level)"
    line = _key_line(text, loc)
    where = f"line {line}: " if line else ""
    if err.get("type") == "extra_forbidden":
        import difflib

        model = _model_at(JobConfig, loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1) if model else []
        hint = f"did you mean '{close[0]}'?" if close else "see `difflora train --help-keys`"
        msg = f"{where}unknown key '{key}' ({hint})"
    else:
        msg = f"{where}'{key}': {err.get('msg', 'invalid value')}"
    more = len(e.errors()) - 1
    if more:
        msg += f" (and {more} more problem{'s' if more > 1 else ''})"
    return UserError(msg, path=path)


def read_toml(path: Path) -> tuple[dict, str]:
    text = read_text_file(path, "config file", "a TOML config file")
    try:
        return tomllib.loads(text), text
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"invalid TOML: {e}", path=path) from None
    except RecursionError:
        raise UserError("invalid TOML: arrays or tables nested too deeply", path=path) from None


def _resolve(base: Path, value: str | None) -> str | None:
    if value is None:
        return None
    if "\x00" in value:
        raise UserError(f"path {value!r} contains a NUL character")
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def resolve_paths(table: Strict, base: Path) -> None:
    """Every path-typed key of `table` (nested tables too) resolved against `base`, the folder of its file."""
    for _, owner, name, _ in list(path_values(table)):
        value = getattr(owner, name)
        if value is not None:
            setattr(owner, name, _resolve(base, value))


def check_paths(table: Strict, policy: PathPolicy, config: Path) -> None:
    """Every path-typed key of `table` against the restricted-paths policy."""
    for key, owner, name, role in path_values(table):
        policy.check(getattr(owner, name), key, role, config)


def apply_method_defaults(job: JobConfig) -> JobConfig:
    """Fill keys the user did not set with the chosen method's recommended values."""
    for key, value in METHODS[job.method].defaults.items():
        if key not in job.model_fields_set:
            setattr(job, key, value)
            job.model_fields_set.discard(key)  # still "not set by the user"
    return job


def apply_family_defaults(job: JobConfig, family: str) -> JobConfig:
    """Fill keys the user did not set with the model family's recommended values for the method
    (models/<family>.py METHOD_DEFAULTS; e.g. ADDifT on SDXL). Runs once the model is known."""
    from .models.registry import method_defaults

    for key, value in method_defaults(family, job.method).items():
        if isinstance(value, dict):
            table = getattr(job, key)
            for sub_key, sub_value in value.items():
                if sub_key not in table.model_fields_set:
                    setattr(table, sub_key, sub_value)
                    table.model_fields_set.discard(sub_key)
        elif key not in job.model_fields_set:
            setattr(job, key, value)
            job.model_fields_set.discard(key)
    return job


def load_job(path: str | Path, overrides: list[str] | None = None,
             restrict_paths_to: str | Path | PathPolicy | None = None) -> JobConfig:
    """Read, validate and resolve a job TOML.

    Relative paths are resolved against the folder of the file that names them. With
    `restrict_paths_to` (a folder, or a PathPolicy with trusted folders; for the UI and
    `--restrict-paths`), the config file and every path it names must resolve (symlinks followed)
    inside it, else a UserError.
    """
    path = Path(path)
    policy = restrict_paths_to if isinstance(restrict_paths_to, PathPolicy) or restrict_paths_to is None \
        else PathPolicy(restrict_paths_to)
    if policy is not None:
        policy.check(str(path), "config file", "read", path)
    data, text = read_toml(path)
    data = apply_overrides(data, overrides or [])
    try:
        data = kohya_config.normalise(data, set(JobConfig.model_fields))
    except UserError as e:
        raise e if e.path else UserError(str(e), path=path) from None
    try:
        job = apply_method_defaults(JobConfig.model_validate(data))
    except ValidationError as e:
        raise format_errors(e, text, str(path)) from None
    try:
        _resolve_job_paths(job, path, policy)
    except UserError as e:
        raise e if e.path else UserError(str(e), path=path) from None
    job._source = str(path)
    return job


def _resolve_job_paths(job: JobConfig, path: Path, policy: PathPolicy | None) -> None:
    resolve_paths(job, path.resolve().parent)
    if policy is not None:
        check_paths(job, policy, path)
        _check_prompt_controls(job, policy)
    _drop_unused_empty_prompt_file(job)
    if job.dataset_config:
        if job.datasets:
            raise UserError("give either dataset_config or inline [[datasets]], not both", path=path)
        ds_path = Path(job.dataset_config)
        ds_data, ds_text = read_toml(ds_path)
        try:
            ds = DatasetFile.model_validate(ds_data)
        except ValidationError as e:
            raise format_errors(e, ds_text, str(ds_path)) from None
        try:
            resolve_paths(ds, ds_path.resolve().parent)
        except UserError as e:
            raise e if e.path else UserError(str(e), path=ds_path) from None
        if policy is not None:
            check_paths(ds, policy, ds_path)
        job.general = ds.general
        job.datasets = ds.datasets
    if not job.datasets and not job.train_data_dir:
        raise UserError("no training data: set train_data_dir, dataset_config or [[datasets]]", path=path)


def _check_prompt_controls(job: JobConfig, policy: PathPolicy) -> None:
    """A sample prompt's `--ci` control images are files the run reads: the same policy as the job's path keys."""
    from .prompts import load_prompt_file

    if not job.sample_prompts or not Path(job.sample_prompts).is_file():
        return  # a missing prompt file is reported by validation, naming it
    for sp in load_prompt_file(job.sample_prompts):
        for control in sp.extra.get("controls", []):
            policy.check(control, "sample_prompts --ci", "read", Path(job.sample_prompts))


def _drop_unused_empty_prompt_file(job: JobConfig) -> None:
    """kohya_ss's GUI names an (often empty) prompt file in every config; sd-scripts reads it only when it
    samples. An empty file with no sampling scheduled is ignored, as there; otherwise validation reads it."""
    scheduled = job.sample_every_n_steps or job.sample_every_n_epochs or job.sample_at_first
    prompt_file = Path(job.sample_prompts) if job.sample_prompts else None
    if scheduled or prompt_file is None or not prompt_file.is_file():
        return
    lines = prompt_file.read_text(encoding="utf-8", errors="replace").splitlines()
    if not any(line.strip() and not line.strip().startswith("#") for line in lines):
        log.info("sample_prompts %s has no prompts and no sampling is scheduled: ignored", prompt_file)
        job.sample_prompts = None
