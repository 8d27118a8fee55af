"""What a trained LoRA file says about its run: kohya's ss_* keys plus the model's and method's own."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from ..models.registry import plugin_for
from ..network.metadata import network_metadata

FINGERPRINT_EXCLUDES = {"output_dir", "logging_dir", "sample_every_n_steps", "sample_every_n_epochs", "sample_prompts",
                        "sample_sweep",
                        "save_every_n_steps", "save_every_n_epochs", "save_state", "save_state_every_n_steps",
                        "overwrite", "log_with"}


def job_fingerprint(job) -> str:
    """Settings that change what is trained (not where it is written)."""
    d = job.model_dump(exclude=FINGERPRINT_EXCLUDES)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


class RunMetadata:
    """The ss_* metadata of every LoRA one run writes; only steps, epoch and finish time vary per file.

    Learning rates are the ones that ran: a stage with its own rate (the copier's, the differential's)
    is recorded with it, not with the job's learning_rate.
    """

    def __init__(self, job, model, data, method, stages, started: float, session_id: int):
        self.job, self.model, self.data, self.method = job, model, data, method
        self.stages = stages
        self.started, self.session_id = started, session_id

    def learning_rates(self) -> tuple[float, float | None, float | None]:
        """(learning_rate, unet_lr, text_encoder_lr) of the stage that made the result (the last one)."""
        j = self.job
        own = self.stages[-1].learning_rate if self.stages else None
        if own is not None:
            return own, own, own
        return j.learning_rate, j.unet_lr, j.text_encoder_lr

    def for_lora(self, steps: int, epoch: int) -> dict[str, str]:
        job, model, data = self.job, self.model, self.data
        lr, unet_lr, te_lr = self.learning_rates()
        md = {
            "ss_session_id": self.session_id, "ss_training_started_at": self.started,
            "ss_training_finished_at": time.time(), "ss_output_name": job.output_name, "ss_steps": steps,
            "ss_epoch": epoch, "ss_training_comment": job.training_comment,
            "ss_sd_model_name": Path(model.source).name, "ss_network_dropout": job.network_dropout,
            **network_metadata(job.adapter_options(), job.conv_dim, job.conv_alpha,
                               {"rank_dropout": job.rank_dropout, "module_dropout": job.module_dropout,
                                **{k: getattr(job, k) for k in ("loraplus_lr_ratio", "loraplus_unet_lr_ratio",
                                                                "loraplus_text_encoder_lr_ratio")}},
                               given_args=job.network_args, network_dim=job.network_dim,
                               network_alpha=job.network_alpha, network_dropout=job.network_dropout,
                               lora_module=plugin_for(model.family).kohya_network_module),
            "ss_clip_skip": job.clip_skip, "ss_learning_rate": lr, "ss_unet_lr": unet_lr,
            "ss_text_encoder_lr": te_lr, "ss_optimizer": job.optimizer_type + (
                f"({','.join(f'{k}={v}' for k, v in job.optimizer_args.items())})" if job.optimizer_args else ""),
            "ss_lr_scheduler": job.lr_scheduler, "ss_lr_warmup_steps": job.lr_warmup_steps,
            "ss_max_train_steps": sum(s.steps for s in self.stages),
            "ss_gradient_checkpointing": job.gradient_checkpointing,
            "ss_gradient_accumulation_steps": job.gradient_accumulation_steps,
            "ss_mixed_precision": job.mixed_precision, "ss_max_grad_norm": job.max_grad_norm, "ss_seed": job.seed,
            "ss_noise_offset": job.noise_offset, "ss_min_snr_gamma": job.min_snr_gamma,
            "ss_prior_loss_weight": job.prior_loss_weight, "ss_num_train_images": data.num_train_images,
            "ss_num_reg_images": data.num_reg_images, "ss_num_skipped_images": len(data.skipped),
            "ss_cache_latents": job.cache_latents, "ss_tag_frequency": json.dumps(data.tag_frequency()),
            "ss_datasets": json.dumps([{"batch_size_per_device": b} for b in data.batch_sizes]),
            "ss_resolution": f"({model.resolution}, {model.resolution})",
            "ss_loss_type": "l2", "ss_min_timestep": job.min_timestep, "ss_max_timestep": job.max_timestep,
        }
        md = {k: str(v) for k, v in md.items()}
        if len(self.stages) > 1:
            md["difflora_stage_learning_rates"] = json.dumps(
                {s.name: s.learning_rate if s.learning_rate is not None else job.learning_rate for s in self.stages})
        md.update(model.lora_metadata())
        md.update(self.method.metadata())
        if job.preset_loras:
            md["difflora_preset_loras"] = json.dumps([{"file": Path(p.path).name, "multiplier": p.multiplier}
                                                      for p in job.preset_loras])
        return md
