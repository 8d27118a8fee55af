"""Everything a training run is set up with before its first step: processes, model, presets, data."""

from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import validate
from ..config import apply_family_defaults
from ..data.captions import process_caption
from ..data.dataset import TrainingData, difference_mask
from ..errors import UserError
from ..methods import DataSizes, Method, make_method
from ..models import load_model
from ..models.registry import family_options_of
from ..network.apply import check_lora_fits, network_from_file
from ..network.files import load_lora
from .batches import PromptCache

log = logging.getLogger(__name__)


@dataclass
class Run:
    job: object  # JobConfig
    accelerator: object
    rank: int
    world: int
    is_main: bool  # this process writes files and reports progress
    out_dir: Path
    final_path: Path
    state_dir: Path
    resume: Path | None  # the state folder to continue from
    method: Method
    model: object  # ModelFamily
    presets: list  # fused preset LoRAs (LoRANetwork), in job.preset_loras order
    initial_weights: object | None  # network_weights, loaded
    data: TrainingData
    encode: PromptCache
    targets: dict[bool, list]  # the model's LoRA targets without / with the kxk convs, found before any sharding

    def lora_targets(self, conv: bool) -> list:
        return self.targets[conv]

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def data_sizes(self) -> DataSizes:
        """Unique items and optimizer steps per epoch, for the method to size its stages."""
        unique = self.data.unique_items()

        def epoch_steps(items: list[int] | None) -> int:
            allowed = None if items is None else {id(unique[i]) for i in items}
            batches = len(self.data.epoch_batches(0, self.world, allowed))
            return max(1, batches // self.job.gradient_accumulation_steps)

        @functools.cache  # per-pair averaging asks once per pair
        def difference_coverage() -> float:
            def grid(it) -> tuple[int, int]:  # the latent grid (uncached latents: the pixels over the VAE's stride)
                h, w = it.latents["pixel_diff"].shape
                return (h // self.model.latent_downscale, w // self.model.latent_downscale)

            shares = [difference_mask(it.latents["pixel_diff"], grid(it), 10.0, 2).mean() for it in unique]
            return float(torch.stack(shares).mean())

        pairs = bool(unique) and all("pixel_diff" in it.latents for it in unique)
        return DataSizes(len(unique), epoch_steps, difference_coverage if pairs else None)


def prepare(job, resume: str | None = None) -> Run:
    """Check every input, then load the model, fuse presets, read the data, encode the prompts (cached
    text-encoder outputs) and only then move the denoiser to the device (nothing is written yet).

    `resume`: a state folder, "auto" (this job's own), or None.
    """
    from .distributed import make_accelerator

    accelerator = make_accelerator(job)
    method = make_method(job)
    out_dir = Path(job.output_dir)
    final_path, state_dir = out_dir / f"{job.output_name}.safetensors", out_dir / f"{job.output_name}-state"
    if resume == "auto":
        resume = str(state_dir)
    if final_path.exists() and not (job.overwrite or resume):
        raise UserError("the output LoRA already exists; set overwrite = true, choose another output_name, "
                        "or pass --resume to continue its run", path=final_path)
    for preset in job.preset_loras:
        load_lora(preset.path)  # check every input before anything is written
    initial_weights = load_lora(job.network_weights) if job.network_weights else None

    model = load_model(job.model, allow_pickle=job.allow_pickle, family=job.model_family,
                       prediction_type="v_prediction" if job.v_parameterization else None, clip_skip=job.clip_skip,
                       zero_terminal_snr=job.zero_terminal_snr or None, options=family_options_of(job),
                       options_source=job._source, mixed_precision=job.mixed_precision)
    apply_family_defaults(job, model.family)
    _check_network_module(job, model)
    model.check_save_format(job.save_format, job.adapter_options())
    _warn_client_limits(job, model)
    validate.clip_skip(model, job.clip_skip, "clip_skip", getattr(job, "_source", None))
    model.check_complete()  # a component missing for training stops here, before anything is encoded
    device = accelerator.device
    if not _caches_prompts(job):
        model.to(device)  # the text encoders run at every step: everything on the device from the start
    presets = [network_from_file(model, p.path, p.multiplier, attach=False) for p in job.preset_loras]
    if initial_weights is not None:
        initial_weights = model.adapt_lora_file(initial_weights)
        check_lora_fits(model, initial_weights)
    for preset, spec in zip(presets, job.preset_loras):
        preset.fuse(spec.multiplier)  # into the weights as loaded (before the half cast)
    _set_precision(model, job, accelerator.native_amp or accelerator.mixed_precision != "fp16")

    data = TrainingData(job, model.resolution, model.latent_multiple, pairs=method.needs_pairs)
    log.info("%d training images (%d with repeats), %d regularisation, method %s", len(data.unique_items()),
             data.num_train_images, data.num_reg_images, method.name)
    if data.skipped:
        log.warning("skipped %d unreadable image(s) (skip_bad_images = true)", len(data.skipped))
    method.check_inputs(model, data)
    # Encoding first: with cached text-encoder outputs the text encoders are alone on the device while every
    # prompt is encoded, and gone (or on the CPU) before the denoiser arrives (FLUX: T5-XXL 9.5 GB and the
    # fp8 transformer ~12 GB are never on the GPU together, as in kohya).
    # a disk cache is written once, by the main process; the others then read it
    with accelerator.main_process_first() if job.cache_text_encoder_outputs_to_disk else contextlib.nullcontext():
        encode = _prompt_cache(model, job, out_dir, device, data, presets, method)
    _prepare_denoiser(model, job, device)
    # (FSDP renames the classes of the modules it shards, which some families' target lists go by)
    targets = {conv: model.lora_targets(conv=conv) for conv in (False, True)}
    if job.fsdp:
        from .distributed import shard_frozen

        shard_frozen(model.denoiser, accelerator.num_processes)
    return Run(job=job, accelerator=accelerator, rank=accelerator.process_index, world=accelerator.num_processes,
               is_main=accelerator.is_main_process, out_dir=out_dir, final_path=final_path,
               state_dir=state_dir, resume=Path(resume) if resume else None, method=method, model=model, presets=presets, initial_weights=initial_weights,
               data=data, encode=encode, targets=targets)


def _check_network_module(job, model) -> None:
    """sd-scripts' network module of another family (`networks.lora_flux` on SDXL) is refused: kohya would not
    train that model with it either."""
    from ..models.registry import FAMILIES, plugin_for
    from ..network.adapters import KOHYA_LORA_MODULE, LYCORIS_MODULE

    own = plugin_for(model.family)
    if job.network_module in (KOHYA_LORA_MODULE, LYCORIS_MODULE, own.kohya_network_module):
        return  # networks.lora: any family's LoRA, as difflora has always read it
    other = next((p for p in FAMILIES if p.kohya_network_module == job.network_module), None)
    if other is not None:
        raise UserError(f"network_module = {job.network_module!r} is sd-scripts' LoRA module for {other.title}; this "
                        f"model is {own.title} (use {own.kohya_network_module!r})", path=getattr(job, "_source", None))


def _warn_client_limits(job, model) -> None:
    """Once per run, before training: what the save_format's clients cannot apply of the file (LoKr's Tucker core)."""
    from ..network.adapters import client_limits

    kxk = bool(job.conv_dim) and any(t.module.weight.dim() == 4 and t.module.weight.shape[2:] != (1, 1)
                                     for t in model.lora_targets(conv=True))
    for line in client_limits(job.adapter_options(), kxk):
        log.warning(line)


def _prepare_denoiser(model, job, device) -> None:
    """Attention, checkpointing and the family's settings (block swap: its blocks stay on the CPU), then the
    denoiser and the VAE (and the text encoders unless their outputs are cached) to the device, then
    torch_compile."""
    if not job.sdpa:
        model.use_plain_attention()
    if job.gradient_checkpointing:
        model.denoiser.enable_gradient_checkpointing()
    model.prepare_training(job, device)
    model.to(device, text_encoders=not _caches_prompts(job))
    if job.torch_compile:
        model.denoiser.compile()  # in place; LoRA hooks are traced with it, multiplier values are guarded


def _caches_prompts(job) -> bool:
    return bool(job.cache_text_encoder_outputs or job.cache_text_encoder_outputs_to_disk)


HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}


def _set_precision(model, job, autocast: bool) -> None:
    """kohya's mixed precision: frozen weights in the half dtype (the VAE too unless no_half_vae); the LoRA
    weights stay fp32 (bf16 with full_bf16) and autocast runs the maths. Without autocast (accelerate has
    none for fp16 on the CPU) the weights stay fp32: half weights would meet fp32 activations."""
    half = HALF.get(job.mixed_precision)
    if half is None:
        return
    if not autocast:
        log.warning('mixed_precision = "%s" has no autocast on this device (fp16 needs a GPU); training in fp32 '
                    '(use "bf16" for mixed precision on the CPU)', job.mixed_precision)
        return
    for module in [model.denoiser, *model.text_encoders.values()]:
        module.to(dtype=half)
    if not job.no_half_vae:
        model.vae.to(dtype=half)


def _prompt_cache(model, job, out_dir: Path, device, data: TrainingData, presets: list, method: Method) -> PromptCache:
    """The prompt encoder of the run. With cache_text_encoder_outputs every prompt of the run is encoded here, by
    the text encoders alone on the device; then a family that drops them (FLUX: T5-XXL is 9.5 GB) frees them and
    the others move them to the CPU. Captions that change at every step (shuffle_caption) leave nothing to encode
    up front: refused for FLUX (as in kohya); elsewhere each is encoded on the CPU when it first comes."""
    if not _caches_prompts(job):
        return PromptCache(model)
    up_front = model.drops_cached_text_encoders or _varying_caption(data) is None
    prompts = run_prompts(job, data, method.caption_keys()) if up_front else None
    if up_front:
        for te in _text_encoders(model):
            te.to(device)
    elif device.type != "cpu":
        for te in _text_encoders(model):
            te.to("cpu", dtype=torch.float32)  # each caption encoded when it first comes; the GPU keeps the denoiser
    cache = PromptCache(model, *_disk_cache(model, job, out_dir))
    if prompts is not None:
        table = cache.encode_all(prompts)
        _release_text_encoders(model, job, device, table, presets, cache)
    return cache


def _text_encoders(model) -> list:
    return [te for te in model.text_encoders.values() if te is not None]


def _disk_cache(model, job, out_dir: Path) -> tuple[Path | None, str]:
    """cache_text_encoder_outputs_to_disk: the folder and what the encodings depend on (model, text-encoder
    dtypes, clip_skip, fused presets)."""
    if not job.cache_text_encoder_outputs_to_disk:
        return None, ""
    source = Path(model.source)
    stat = source.stat() if source.exists() else None
    te_dtypes = [str(next(te.parameters()).dtype) for te in _text_encoders(model)]
    identity = repr((str(source.resolve()) if stat else model.source, stat and stat.st_mtime_ns, model.family,
                     job.clip_skip, te_dtypes, [(str(p.path), p.multiplier) for p in job.preset_loras]))
    return out_dir / "te_cache", identity


def _release_text_encoders(model, job, device, table: dict, presets: list, cache: PromptCache) -> None:
    """After every prompt was encoded: FLUX frees its text encoders (the model answers from `table`), the others
    keep `table` in the prompt cache and move theirs to the CPU (fp32 there: sampling may still encode)."""
    if not model.drops_cached_text_encoders:
        cache.keep(table)
        for te in _text_encoders(model):
            te.to("cpu", dtype=torch.float32 if device.type != "cpu" else None)
        return
    gone = model.drop_text_encoders(table)
    for preset in presets:  # their text-encoder parts hold the freed layers (and copies of their weights)
        if preset.drop_components(gone) and job.sample_without_presets:
            log.warning("sample_without_presets: the cached prompts keep the presets' text-encoder part "
                        "(the text encoders were freed by cache_text_encoder_outputs)")


def _varying_caption(data: TrainingData):
    """(the job key, the item) of the first trained caption that changes at every step, or None."""
    held_out = {id(it) for it in data.validation_items}  # validated on fixed captions (train/validation.py)
    for it in data.unique_items() + data.validation_items:
        if id(it) not in held_out and (it.rules.shuffle_caption or it.rules.caption_tag_dropout_rate):
            return ("shuffle_caption" if it.rules.shuffle_caption else "caption_tag_dropout_rate"), it
    return None


def run_prompts(job, data: TrainingData, caption_keys: tuple[str, ...]) -> list[str]:
    """Every prompt a run can encode: "" (caption dropout), each item's captions of the kinds the method declares
    (Method.caption_keys: its own, a pair's "after" caption, the tags the two share) as processed, for training and
    validation items, and the sample prompts. Refused when captions change randomly at every step: there is no
    fixed set to encode."""
    import dataclasses

    from ..data.instructions import instruction_for
    from ..prompts import load_prompt_file
    from ..methods.base import common_caption

    varying = _varying_caption(data)
    if varying is not None:
        key, it = varying
        raise UserError(f"cache_text_encoder_outputs encodes every caption once and then frees the text "
                        f"encoders, so {key} (a new caption at every step) cannot be used with it, as in "
                        "kohya; turn one of them off", path=it.path)
    prompts = [""]
    rng = np.random.default_rng(0)  # unused: the rules below draw nothing
    for it in data.unique_items() + data.validation_items:
        rules = dataclasses.replace(it.rules, caption_dropout_rate=0.0, caption_dropout_every_n_epochs=0,
                                    shuffle_caption=False, caption_tag_dropout_rate=0.0)
        captions = {"x": process_caption(it.caption, rules, rng), "empty": ""}
        if it.is_pair:
            captions["after"] = process_caption(it.after_caption, rules, rng)
            captions["common"] = common_caption(captions["x"], captions["after"])
            captions["instruction"] = instruction_for(it.instruction, job.edit_instruction, captions["after"])
        prompts += [captions[k] for k in caption_keys if k in captions]
    if job.sample_prompts:
        prompts += [p.prompt for p in load_prompt_file(job.sample_prompts)]
    return list(dict.fromkeys(prompts))
