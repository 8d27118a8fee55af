"""Checks that run before any model is loaded or any work is done.

Every value a command or job takes is checked here for what the code after it can use (a
finite number, a size the model can make, a path that can be written), so that a bad value
stops the command at once with one line naming the value, instead of a traceback minutes
later or a result thrown away at the end.
"""

from __future__ import annotations

import errno
import math
import os
from pathlib import Path

from .errors import UserError

# Pixel sizes handed to the diffusers pipelines must be multiples of this.
SIZE_MULTIPLE = 8
MAX_SIZE = 16384
MAX_SEED = 2**63 - 1


# ---------------------------------------------------------------------------- numbers
def finite(value: float, option: str, path=None) -> float:
    if not math.isfinite(value):
        raise UserError(f"{option} must be a finite number, got {value}", path=path)
    return value


def at_least(value: int, minimum: int, option: str, path=None) -> int:
    if value < minimum:
        raise UserError(f"{option} must be at least {minimum}, got {value}", path=path)
    return value


def probability(value: float, option: str, path=None) -> float:
    """A threshold or rate between 0 and 1 (NaN fails every comparison, so it is refused by name)."""
    if not 0 <= value <= 1:  # False for NaN too
        raise UserError(f"{option} must be between 0 and 1, got {value}", path=path)
    return value


def seed(value: int, option: str = "--seed", path=None) -> int:
    if not 0 <= value <= MAX_SEED:
        raise UserError(f"{option} must be between 0 and 2^63-1, got {value}", path=path)
    return value


def image_size(value: int | None, option: str, path=None) -> int | None:
    """A width or height: positive, a multiple of 8, not absurd (None: the model's default)."""
    if value is None:
        return None
    if value < SIZE_MULTIPLE or value > MAX_SIZE or value % SIZE_MULTIPLE:
        raise UserError(f"{option} must be a multiple of {SIZE_MULTIPLE} between {SIZE_MULTIPLE} and {MAX_SIZE}, "
                        f"got {value}", path=path)
    return value


def sampler(name: str, option: str = "--sampler", path=None) -> str:
    from .models.samplers import SCHEDULERS

    if name.lower() not in SCHEDULERS:
        raise UserError(f"{option}: unknown sampler {name!r}; choose one of: {', '.join(SCHEDULERS)}", path=path)
    return name


def sample_prompts(prompts, source, default_sampler: str | None = None) -> None:
    """Dry-run a prompt list: every size, seed, scale, step count, sampler and multiplier usable."""
    for i, sp in enumerate(prompts, 1):
        what = f"prompt {i} ({sp.prompt[:40]!r})"
        image_size(sp.width, f"{what}: width (--w)", source)
        image_size(sp.height, f"{what}: height (--h)", source)
        if sp.seed is not None:
            seed(sp.seed, f"{what}: seed (--d)", source)
        if sp.cfg is not None:
            finite(sp.cfg, f"{what}: guidance scale (--l)", source)
        at_least(sp.steps, 1, f"{what}: steps (--s)", source)
        if sp.sampler or default_sampler:
            sampler(sp.sampler or default_sampler, f"{what}: sampler (--ss)", source)
        if "multiplier" in sp.extra:
            finite(sp.extra["multiplier"], f"{what}: multiplier (--m)", source)


# ---------------------------------------------------------------------------- paths
def _name_max(folder: Path) -> int:
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def _nearest_existing(path: Path) -> Path:
    p = path
    while not os.path.lexists(p) and p != p.parent:
        p = p.parent
    return p


def path_text(path: str | os.PathLike, option: str) -> Path:
    """No NUL byte and no component longer than the file system takes."""
    text = os.fspath(path)
    if "\0" in text:
        raise UserError(f"{option} holds a NUL character", path=text.replace("\0", "\\0"))
    p = Path(text)
    limit = _name_max(p.parent if p.parent != p else p)
    for part in p.parts:
        if len(os.fsencode(part)) > limit:
            raise UserError(f"{option}: the name {part[:20]}... is {len(os.fsencode(part))} bytes, longer than the "
                            f"file system allows ({limit})", path=text[:60] + "...", hint="choose a shorter name")
    return p


def output_folder(path: str | os.PathLike, option: str) -> Path:
    """A folder we will write into: an existing folder we can write, or one we can create."""
    p = path_text(path, option)
    if p.exists() and not p.is_dir():
        raise UserError(f"{option} is an existing file, not a folder", path=p, hint="choose a folder path")
    base = _nearest_existing(p)
    if not base.is_dir():
        raise UserError(f"{option}: cannot create a folder here, {base} is a file", path=p)
    if base == p:  # an existing folder: ask, without touching it
        read_only = bool(os.statvfs(p).f_flag & os.ST_RDONLY)
        if read_only or not os.access(p, os.W_OK | os.X_OK):
            raise UserError(f"{option}: cannot write in this folder "
                            f"({'read-only file system' if read_only else 'permission denied'})", path=p)
    else:
        _probe_writable(base, p, option)
    return p


def _probe_writable(folder: Path, wanted: Path, option: str) -> None:
    """Make and remove a folder where ours will be made: the sure test of writing there (as root too)."""
    from .fileio import temp_sibling

    probe = temp_sibling(folder / "probe")
    try:
        probe.mkdir()
    except OSError as e:
        raise UserError(f"{option}: cannot write in {folder} ({e.strerror})", path=wanted) from None
    probe.rmdir()


def output_file(path: str | os.PathLike, option: str) -> Path:
    """A file we will write: not a folder, its folder writable or creatable, its name short enough."""
    p = path_text(path, option)
    if p.is_dir():
        raise UserError(f"{option} is a folder; give a file path", path=p)
    output_folder(p.parent if str(p.parent) else Path("."), f"{option}'s folder")
    return p


def name_part(text: str, option: str, path=None) -> str:
    """A piece of a file name (an output_name, a suffix): no separator, no NUL, not too long."""
    if not text or text in (".", ".."):
        raise UserError(f"{option} must be a file name, got {text!r}", path=path)
    if "\0" in text:
        raise UserError(f"{option} holds a NUL character", path=path)
    bad = [c for c in ("/", os.sep, os.altsep) if c and c in text]
    if bad:
        raise UserError(f"{option} {text!r} contains the path separator {bad[0]!r}; it must be a name, not a path",
                        path=path, hint="put the folder in output_dir")
    if len(os.fsencode(text)) > 200:  # room for the suffixes a run adds (-step00000010, .safetensors)
        raise UserError(f"{option} is {len(os.fsencode(text))} bytes long; names up to 200 bytes leave room for "
                        "the suffixes added to it", path=path)
    return text


def input_folder(path: str | os.PathLike, option: str) -> Path:
    """A folder we read: it exists, is a folder and can be listed (a symlink loop cannot)."""
    p = path_text(path, option)
    try:
        os.listdir(p)
    except FileNotFoundError:
        raise UserError(f"{option}: folder not found", path=p) from None
    except NotADirectoryError:
        raise UserError(f"{option} is a file, not a folder", path=p) from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UserError(f"{option} is a symlink loop", path=p, hint="point it at a real folder") from None
        raise UserError(f"{option} cannot be read ({e.strerror})", path=p) from None
    return p


# ---------------------------------------------------------------------------- against a loaded model
def clip_skip(model, value: int | None, option: str = "--clip-skip", path=None) -> None:
    """clip_skip n uses the n-th text-encoder layer from the end: n must name a layer the encoder has."""
    if value is None:
        return
    at_least(value, 1, option, path)
    for name, encoder in model.text_encoders.items():
        layers = getattr(getattr(encoder, "config", None), "num_hidden_layers", None)
        if layers is not None and value > layers:
            raise UserError(f"{option} {value} is beyond the {layers} layers of the model's {name}", path=path,
                            hint=f"use 1 to {layers}")


# ---------------------------------------------------------------------------- a training job
MAX_RANK = 8192  # wider than any layer of the supported models: a larger rank only allocates memory


def _walk(value, key: str = ""):
    """(dotted key, value) for every leaf of a job: fields of nested options, list items, dict entries."""
    fields = getattr(type(value), "model_fields", None)
    if fields is not None:
        for name in fields:
            yield from _walk(getattr(value, name), f"{key}.{name}" if key else name)
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _walk(v, f"{key}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _walk(v, f"{key}[{i}]")
    else:
        yield key, value


class _JobErrors:
    """Errors about one job file, each naming the key and (when found) its line."""

    def __init__(self, path):
        self.path = path
        try:
            self.text = Path(path).read_text(encoding="utf-8") if path is not None else ""
        except (OSError, UnicodeDecodeError):
            self.text = ""

    def __call__(self, key: str, message: str | UserError, hint: str | None = None) -> UserError:
        import re

        if isinstance(message, UserError):  # a check's own error: keep its words, name the key instead of the path
            text = str(message)
            message = text[len(message.path) + 2:] if message.path and text.startswith(f"{message.path}: ") else text

        last = re.split(r"[.\[\]]+", key.strip("]"))[-1]
        line = next((i for i, text in enumerate(self.text.splitlines(), 1)
                     if re.match(rf"^\s*{re.escape(last)}\s*=", text)), None)
        where = f"line {line}: " if line else ""
        named = message if message.startswith(key) else f"{key}: {message}"
        return UserError(f"{where}{named}", path=self.path, hint=hint)


def job(job, path=None) -> None:
    """Every value, path and sample prompt of a training job, before any model is loaded.

    Raises the first problem as a UserError naming the key (and its line in `path`).
    """
    error = _JobErrors(path)
    for key, value in _walk(job):
        if isinstance(value, float) and not math.isfinite(value):
            raise error(key, f"must be a finite number, got {value}")
    for key in ("seed", "validation_seed"):
        value = getattr(job, key)
        if value is not None and not 0 <= value <= MAX_SEED:
            raise error(key, f"must be between 0 and 2^63-1, got {value}")
    for key, value in _walk(job):
        leaf = key.rsplit(".", 1)[-1].split("[")[0]
        if leaf == "resolution" and value is not None and (value < SIZE_MULTIPLE or value > MAX_SIZE
                                                             or value % SIZE_MULTIPLE):
            raise error(key, f"must be a multiple of {SIZE_MULTIPLE} between {SIZE_MULTIPLE} and {MAX_SIZE}, "
                             f"got {value}")
        if (leaf.endswith("network_dim") or leaf in ("conv_dim", "average_rank", "rerank")) and \
                isinstance(value, int) and value > MAX_RANK:
            raise error(key, f"{value} is larger than any layer of the supported models (at most {MAX_RANK}); "
                             "a rank above a layer's width adds nothing", hint="usual ranks are 4 to 128")
    _optimizer_dry_run(job, error)
    _distributed(job, error)
    _job_paths(job, error)
    if job.sample_sampler is not None:
        sampler(job.sample_sampler, "sample_sampler", path)
    if job.sample_prompts:
        from .prompts import load_prompt_file

        sample_prompts(load_prompt_file(job.sample_prompts), job.sample_prompts, job.sample_sampler)


def _distributed(job, error) -> None:
    """What the fsdp / deepspeed keys need: one line naming the key."""
    import importlib.util

    import torch

    if job.deepspeed and job.zero_stage == 3:
        raise error("zero_stage", "ZeRO-3 partitions the parameters DeepSpeed is given, which are the LoRA's (the "
                                  "frozen model stays outside it): the LoRA would exist only in pieces between steps, "
                                  "where saves and validation read it; use zero_stage = 2, or fsdp = true to shard "
                                  "the frozen model")
    if job.deepspeed and importlib.util.find_spec("deepspeed") is None:
        raise error("deepspeed", "needs the deepspeed package, which is not installed (pip install deepspeed)")
    if job.deepspeed and not torch.cuda.is_available():
        raise error("deepspeed", "needs CUDA GPUs (on CPUs several processes train with DDP, which needs no setting)")
    if not job.fsdp:
        return
    # A sharded model runs only with every process taking part, and its weights exist only in pieces.
    if job.sample_prompts:
        raise error("fsdp", "samples are drawn by the first process alone, which a sharded model cannot do; "
                            "leave sample_prompts unset (validation_split works: every process validates)")
    if job.per_pair_average:
        raise error("fsdp", "per_pair_average trains each pair on one process alone, which a sharded model "
                            "cannot do; train without fsdp (the pairs spread over the processes already)")
    if job.torch_compile:
        raise error("fsdp", "cannot be combined with torch_compile yet")
    if job.adapter_options().is_lycoris:
        raise error("fsdp", "trains plain LoRA/LoCon only (LyCORIS adapters and DoRA read the frozen weights, which "
                            "FSDP holds in pieces outside the forward)")


def _optimizer_dry_run(job, error) -> None:
    """Build the job's optimizer and schedule for one parameter: bad optimizer_args fail here, not after loading."""
    import torch

    from .optim import make_optimizer, make_scheduler

    lr = job.learning_rate
    param = torch.nn.Parameter(torch.zeros(2))
    try:
        opt = make_optimizer(job.optimizer_type, [{"params": [param], "lr": lr}], job.optimizer_args,
                             torch.device("cpu"))
        make_scheduler(job.lr_scheduler, opt, job.max_train_steps, job.lr_warmup_steps, job.lr_scheduler_num_cycles,
                       job.lr_scheduler_power)
    except UserError as e:
        if "CUDA" in str(e) or "pip install" in str(e):  # needs the GPU or an extra: checked where it runs
            return
        raise error("optimizer_args", str(e)) from None
    except (ValueError, TypeError, RuntimeError) as e:
        raise error("optimizer_args", f"{job.optimizer_type} refuses them: {e}") from None


def _job_paths(job, error) -> None:
    try:
        name_part(job.output_name, "output_name")
    except UserError as e:
        raise error("output_name", e) from None
    checks = [("output_dir", job.output_dir, output_folder)]
    if job.log_with == "tensorboard":
        checks.append(("logging_dir", job.logging_dir or str(Path(job.output_dir) / "logs"), output_folder))
    for key in ("train_data_dir", "reg_data_dir", "validation_data_dir"):
        if getattr(job, key):
            checks.append((key, getattr(job, key), input_folder))
    for di, ds in enumerate(job.datasets):
        for si, sub in enumerate(ds.subsets):
            checks.append((f"datasets[{di}].subsets[{si}].image_dir", sub.image_dir, input_folder))
            if sub.after_dir:
                checks.append((f"datasets[{di}].subsets[{si}].after_dir", sub.after_dir, input_folder))
    for key, value, check in checks:
        if check is input_folder and not os.path.lexists(value):
            continue  # a missing data folder is reported by the data loader, naming the folder
        try:
            check(value, key)
        except UserError as e:
            raise error(key, e) from None
    _job_writes(job, error)


def _job_writes(job, error) -> None:
    """The run's outputs never land on what it reads: the LoRA over its network_weights, output_dir inside
    the model folder or a data folder."""
    from .fileio import check_writes

    reads = [job.model, job.network_weights, job.sample_prompts, job.dataset_config, job.train_data_dir,
             job.reg_data_dir, job.validation_data_dir, *(preset.path for preset in job.preset_loras)]
    reads += [path for ds in job.datasets for sub in ds.subsets for path in (sub.image_dir, sub.after_dir)]
    out = Path(job.output_dir)
    for key, target in (("output_dir", out), ("output_name", out / f"{job.output_name}.safetensors")):
        try:
            check_writes([(target, key)], [r for r in reads if r is not None and os.path.lexists(r)])
        except UserError as e:
            raise error(key, e) from None
