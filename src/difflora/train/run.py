"""Everything a training run is set up with before its first step: processes, model, presets, data."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import validate
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
                       prediction_type="v_prediction" if job.v_parameterization else None, clip_skip=job.clip_skip)
    validate.clip_skip(model, job.clip_skip, "clip_skip", getattr(job, "_source", None))
    model.to(accelerator.device)
    presets = [network_from_file(model, p.path, p.multiplier, attach=False) for p in job.preset_loras]
    if initial_weights is not None:
        check_lora_fits(model, initial_weights)
    for preset, spec in zip(presets, job.preset_loras):
        preset.fuse(spec.multiplier)
    if job.gradient_checkpointing:
        model.denoiser.enable_gradient_checkpointing()
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
