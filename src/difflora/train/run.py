"""Everything a training run is set up with before its first step: processes, model, presets, data."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.dataset import TrainingData
from ..errors import UserError
from ..methods import DataSizes, Method, make_method
from ..models import load_model
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

        return DataSizes(len(unique), epoch_steps)


def prepare(job, resume: str | None = None) -> Run:
    """Check every input, then load the model, fuse presets and read the data (nothing is written yet).

    `resume`: a state folder, "auto" (this job's own), or None.
    """
    from accelerate import Accelerator

    accelerator = Accelerator(mixed_precision=job.mixed_precision, gradient_accumulation_steps=1,
                              cpu=not torch.cuda.is_available())
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
                       job=job)
    _check_family_keys(job, model)
    model.to(accelerator.device)
    presets = [network_from_file(model, p.path, p.multiplier, attach=False) for p in job.preset_loras]
    if initial_weights is not None:
        initial_weights = model.adapt_lora_file(initial_weights)
        check_lora_fits(model, initial_weights)
    for preset, spec in zip(presets, job.preset_loras):
        preset.fuse(spec.multiplier)
    if job.gradient_checkpointing:
        model.denoiser.enable_gradient_checkpointing()
    model.prepare_training(job, accelerator.device)
    if job.torch_compile:
        model.denoiser.compile()  # in place; LoRA hooks are traced with it, multiplier values are guarded

    data = TrainingData(job, model.resolution, model.latent_multiple, pairs=method.needs_pairs)
    log.info("%d training images (%d with repeats), %d regularisation, method %s", len(data.unique_items()),
             data.num_train_images, data.num_reg_images, method.name)
    if data.skipped:
        log.warning("skipped %d unreadable image(s) (skip_bad_images = true)", len(data.skipped))
    return Run(job=job, accelerator=accelerator, rank=accelerator.process_index, world=accelerator.num_processes,
               is_main=accelerator.is_main_process, out_dir=out_dir, final_path=final_path,
               state_dir=state_dir, resume=Path(resume) if resume else None, method=method, model=model, presets=presets, initial_weights=initial_weights,
               data=data, encode=PromptCache(model))


def _check_family_keys(job, model) -> None:
    """A FLUX key set for another family would silently do nothing: refuse it."""
    from ..models.flux_options import FLUX_ONLY_KEYS

    defaults = type(job).model_fields
    stray = sorted(k for k in set(FLUX_ONLY_KEYS) & job.model_fields_set if getattr(job, k) != defaults[k].default)
    if model.family != "flux" and stray:
        raise UserError(f"{', '.join(stray)} apply to FLUX models only; this model is {model.base_model_version}")


def cache_text_encoder_outputs(run, sample_prompts) -> None:
    """kohya's cache_text_encoder_outputs(_to_disk): every caption the run can use, encoded once up front
    (the captions of each image and pair, the tags each pair shares, "", the sample prompts)."""
    import numpy as np

    from ..data.captions import process_caption
    from ..methods.base import common_caption

    job = run.job
    if not (job.cache_text_encoder_outputs or job.cache_text_encoder_outputs_to_disk):
        return
    if any(it.rules.is_random for it in run.data.items):
        raise UserError("cache_text_encoder_outputs needs fixed captions: turn off shuffle_caption, caption_dropout_rate, "
                        "caption_dropout_every_n_epochs and caption_tag_dropout_rate (as kohya requires)")
    if not (job.network_train_unet_only or run.method.unet_only):
        raise UserError("cache_text_encoder_outputs cannot train text-encoder LoRAs: set network_train_unet_only = true")
    rng = np.random.default_rng(0)  # unused: fixed rules draw nothing
    captions = {""} | {sp.prompt for sp in sample_prompts}
    for it in run.data.items:
        before = process_caption(it.caption, it.rules, rng)
        captions.add(before)
        if it.is_pair:
            after = process_caption(it.after_caption, it.rules, rng)
            captions |= {after, common_caption(before, after)}
    cache_file = run.out_dir / "text_encoder_cache.safetensors" if job.cache_text_encoder_outputs_to_disk else None
    run.model.cache_text_encoder_outputs(sorted(captions), cache_file, write=run.is_main)
