"""The training loop, top to bottom.

    load model -> fuse preset LoRAs -> read and cache data -> for each stage of the method:
    build the LoRA, optimizer, schedule -> steps (batch, loss, backward, all-reduce, clip,
    update) with logging, samples and saves -> finalize -> save the LoRA.

Everything random in a step (sample order, caption shuffles, flips, noise, timesteps,
dropout) is derived from (seed, stage, step, micro-batch, position in the global batch), so a
resumed run continues exactly, and N processes at per-device batch b train the same LoRA as one
process at batch N·b (gradients are averaged explicitly, in a fixed order).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
import os
import signal
import socket
import time
from pathlib import Path

import numpy as np
import torch

from ..config import JobConfig
from ..data.captions import process_caption
from ..data.dataset import TrainingData, _seed_of, difference_mask
from ..errors import TrainingStopped, UserError
from ..methods import Batch, StepContext, make_method
from ..models import load_model
from ..models.base import Conditioning
from ..network.apply import network_from_file
from ..network.files import load_lora, save_dtype, save_lora
from ..network.lora import LoRANetwork
from .checkpoint import load_state, save_state
from .optim import make_optimizer, make_scheduler, param_groups

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- helpers
class OutputLock:
    """`<output_dir>/<output_name>.lock`: a second run writing the same outputs refuses to start.

    The lock is created atomically (O_CREAT | O_EXCL). A lock whose process is gone (same host) is
    stale and taken over; a lock from another host is respected, since its process cannot be checked.
    With --ignore-lock the run proceeds without taking the lock, and leaves the other run's lock alone.
    """

    def __init__(self, out_dir: Path, name: str, ignore: bool):
        self.path = out_dir / f"{name}.lock"
        self.ignore = ignore
        self.held = False

    def _holder(self) -> tuple[bool, dict]:
        try:
            info = json.loads(self.path.read_text())
        except (ValueError, OSError):
            return True, {}  # unreadable: assume it is held
        if info.get("host") != socket.gethostname():
            return True, info
        return _pid_alive(int(info.get("pid", -1))), info

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.ignore:
            log.warning("--ignore-lock: not taking %s", self.path)
            return self
        payload = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}).encode()
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                alive, info = self._holder()
                if alive:
                    raise UserError(f"another training run (pid {info.get('pid', '?')} on {info.get('host', '?')}) is "
                                    "writing to this folder; wait for it, choose another output_dir/output_name, or "
                                    "pass --ignore-lock", path=self.path) from None
                log.warning("removing a stale lock left by pid %s", info.get("pid"))
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "wb") as fh:
                fh.write(payload)
            self.held = True
            return self
        raise UserError("could not take the output lock (another run keeps creating it)", path=self.path)

    def __exit__(self, *exc):
        if self.held:
            self.path.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StopFlag:
    """SIGINT/SIGTERM ask the loop to save and stop after the current step."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested:  # second signal: stop now
            raise KeyboardInterrupt
        self.requested = True
        log.warning("stop requested (signal %d): saving after this step", signum)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def job_fingerprint(job: JobConfig) -> str:
    """Settings that change what is trained (not where it is written)."""
    d = job.model_dump(exclude={"output_dir", "logging_dir", "sample_every_n_steps", "sample_every_n_epochs",
                                "sample_prompts", "save_every_n_steps", "save_every_n_epochs", "save_state",
                                "save_state_every_n_steps", "overwrite", "log_with"})
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def lora_metadata(job: JobConfig, model, data: TrainingData, method, steps: int, epoch: int, started: float,
                  session_id: int) -> dict[str, str]:
    """kohya's ss_* training metadata (all values strings)."""
    net_args = {"conv_dim": job.conv_dim, "conv_alpha": job.conv_alpha, "rank_dropout": job.rank_dropout,
                "module_dropout": job.module_dropout}
    md = {
        "ss_session_id": session_id, "ss_training_started_at": started, "ss_training_finished_at": time.time(),
        "ss_output_name": job.output_name, "ss_steps": steps, "ss_epoch": epoch,
        "ss_training_comment": job.training_comment, "ss_sd_model_name": Path(model.source).name,
        "ss_network_module": "networks.lora", "ss_network_dropout": job.network_dropout,
        "ss_network_args": json.dumps({k: str(v) for k, v in net_args.items() if v is not None}),
        "ss_clip_skip": job.clip_skip, "ss_learning_rate": job.learning_rate, "ss_unet_lr": job.unet_lr,
        "ss_text_encoder_lr": job.text_encoder_lr, "ss_optimizer": job.optimizer_type + (
            f"({','.join(f'{k}={v}' for k, v in job.optimizer_args.items())})" if job.optimizer_args else ""),
        "ss_lr_scheduler": job.lr_scheduler, "ss_lr_warmup_steps": job.lr_warmup_steps,
        "ss_max_train_steps": job.max_train_steps, "ss_gradient_checkpointing": job.gradient_checkpointing,
        "ss_gradient_accumulation_steps": job.gradient_accumulation_steps, "ss_mixed_precision": job.mixed_precision,
        "ss_max_grad_norm": job.max_grad_norm, "ss_seed": job.seed, "ss_noise_offset": job.noise_offset,
        "ss_min_snr_gamma": job.min_snr_gamma, "ss_prior_loss_weight": job.prior_loss_weight,
        "ss_num_train_images": data.num_train_images, "ss_num_reg_images": data.num_reg_images,
        "ss_num_skipped_images": len(data.skipped),
        "ss_cache_latents": job.cache_latents, "ss_tag_frequency": json.dumps(data.tag_frequency()),
        "ss_datasets": json.dumps([{"batch_size_per_device": b} for b in data.batch_sizes]),
        "ss_resolution": f"({model.resolution}, {model.resolution})",
        "ss_loss_type": "l2", "ss_min_timestep": job.min_timestep, "ss_max_timestep": job.max_timestep,
    }
    md = {k: str(v) for k, v in md.items()}
    md.update(model.lora_metadata())
    md.update(method.metadata())
    if job.preset_loras:
        md["difflora_preset_loras"] = json.dumps([{"file": Path(p.path).name, "multiplier": p.multiplier}
                                                  for p in job.preset_loras])
    return md


# ---------------------------------------------------------------------------- the loop
def train(job: JobConfig, resume: str | None = None, ignore_lock: bool = False,
          on_step=None) -> Path | None:
    """Train a LoRA for `job`; returns the saved file (None on non-main processes).

    `on_step(stage, step, seconds)` is called after every optimizer step (benchmarks use it).
    """
    from accelerate import Accelerator

    accelerator = Accelerator(mixed_precision=job.mixed_precision, gradient_accumulation_steps=1,
                              cpu=not torch.cuda.is_available())
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    device = accelerator.device
    out_dir = Path(job.output_dir)
    final_path = out_dir / f"{job.output_name}.safetensors"
    state_dir = out_dir / f"{job.output_name}-state"
    method = make_method(job)
    if job.per_pair_average and not method.inner.needs_pairs:
        raise UserError(f"per_pair_average needs a pair method (copier, addift, slider, differential), not {job.method}")
    if resume == "auto":
        resume = str(state_dir)
    if final_path.exists() and not (job.overwrite or resume):
        raise UserError("the output LoRA already exists; set overwrite = true, choose another output_name, "
                        "or pass --resume to continue its run", path=final_path)
    for preset in job.preset_loras:
        load_lora(preset.path)  # check every input before anything is written
    initial_weights = load_lora(job.network_weights) if job.network_weights else None

    # -- model and presets
    model = load_model(job.model, allow_pickle=job.allow_pickle, family=job.model_family,
                       prediction_type="v_prediction" if job.v_parameterization else None, clip_skip=job.clip_skip)
    model.to(device)
    presets = [network_from_file(model, p.path, p.multiplier, attach=False) for p in job.preset_loras]
    if initial_weights is not None:
        from ..network.apply import check_lora_fits

        check_lora_fits(model, initial_weights)
    for preset, spec in zip(presets, job.preset_loras):
        preset.fuse(spec.multiplier)
    if job.gradient_checkpointing:
        model.denoiser.enable_gradient_checkpointing()
    if job.torch_compile:
        model.denoiser.compile()  # in place; LoRA hooks are traced with it, multiplier values are guarded

    # -- data
    unet_down = 2 ** (len(model.denoiser.config.block_out_channels) - 1)
    data = TrainingData(job, model.resolution, model.latent_downscale * unet_down, pairs=method.needs_pairs)
    unique = data.unique_items()
    log.info("%d training images (%d with repeats), %d regularisation, method %s", len(unique),
             data.num_train_images, data.num_reg_images, method.name)
    if data.skipped:
        log.warning("skipped %d unreadable image(s) (skip_bad_images = true)", len(data.skipped))

    with OutputLock(out_dir, job.output_name, ignore_lock) if main else contextlib.nullcontext(), StopFlag() as stop:
        data.cache_latents(model, out_dir / "latent_cache" if job.cache_latents_to_disk else None,
                           encode=job.cache_latents or job.cache_latents_to_disk)
        encode = PromptCache(model)

        stages = method.stages(len(unique))
        state = load_state(resume) if resume else None
        if state is not None and state.get("fingerprint") != job_fingerprint(job):
            log.warning("resuming with changed settings; the result will differ from an uninterrupted run")
        results: dict[str, LoRANetwork] = {}
        session_id = int(state["session_id"]) if state else int(np.random.SeedSequence().entropy % 2**31)
        started = float(state["started"]) if state else time.time()
        writer = None
        if main and job.log_with == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            run_name = f"{job.output_name}_{dt.datetime.fromtimestamp(started):%Y%m%d-%H%M%S}"
            writer = SummaryWriter(str(Path(job.logging_dir or out_dir / "logs") / run_name))
        sample_prompts = None
        if job.sample_prompts:
            from ..data.prompts import load_prompt_file

            sample_prompts = load_prompt_file(job.sample_prompts)

        total_step, per_epoch = 0, 1
        for si, stage in enumerate(stages):
            # ---- network for this stage
            spec = stage.spec
            for name, net in results.items():
                net.set_multiplier(1.0 if name in stage.keep_active else 0.0)
            if state is not None and si < state["stage_index"]:
                net = LoRANetwork.from_weights(model.lora_targets(conv=True), state["completed"][stage.name])
                results[stage.name] = net.to(device).apply_to()
                net.requires_grad_(False)
                total_step += stage.steps
                continue
            torch.manual_seed(_seed_of(job.seed, "init", si))
            network = LoRANetwork.create(model.lora_targets(conv=bool(spec.conv_dim)), spec)
            if stage.init_from_job_weights and initial_weights is not None:
                network.load_weights(initial_weights.tensors, source=initial_weights.path, strict=False)
            network.to(device).apply_to().train()
            optimizer = make_optimizer(job.optimizer_type, param_groups(network, job, stage.learning_rate),
                                       job.optimizer_args, device)
            scheduler = make_scheduler(job.lr_scheduler, optimizer, stage.steps, job.lr_warmup_steps,
                                       job.lr_scheduler_num_cycles, job.lr_scheduler_power)
            start = 0
            if state is not None and si == state["stage_index"]:
                network.load_state_dict(state["network"])
                optimizer.load_state_dict(state["optimizer"])
                scheduler.load_state_dict(state["scheduler"])
                start = int(state["step"])
                log.info("resuming stage %s at step %d", stage.name, start)
            params = [p for p in network.parameters() if p.requires_grad]
            # Text-encoder LoRAs in training: encode every step. Otherwise cache (earlier stages' TE LoRAs are fixed).
            encode.reset(trains_text_encoder=any(
                p.requires_grad for n, lora in network.named_children()
                if network.components.get(n) != "unet" for p in lora.parameters()))
            allowed = {id(unique[i]) for i in stage.items} if stage.items is not None else None
            per_epoch = max(1, len(data.epoch_batches(0, world, allowed)) // job.gradient_accumulation_steps)
            steps = stage.steps
            if job.max_train_epochs and stage.name == "main":
                steps = job.max_train_epochs * per_epoch
            stage_label = stage.name if len(stages) > 1 else None

            def save_checkpoint(step: int, tag: str | None, with_state: bool, params_are: str = "current"):
                """The current stage's LoRA (optional) and the training state, both atomically."""
                if not main:
                    return
                if tag is not None:
                    name = job.output_name + (f"-{stage_label}" if stage_label else "") + f"-{tag}.safetensors"
                    save_lora(network.kohya_state_dict(), out_dir / name, lora_metadata(
                        job, model, data, method, total_step + step, step // per_epoch, started, session_id),
                        dtype=save_dtype(job.save_precision))
                if with_state:
                    save_state(state_dir, {
                        "stage_index": si, "stage_name": stage.name, "step": step, "network": network.state_dict(),
                        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "completed": {k: v.state_dict() for k, v in results.items()},
                        "fingerprint": job_fingerprint(job), "session_id": session_id, "started": started,
                        "params": params_are,
                    })

            # ---- steps
            from tqdm import tqdm

            if sample_prompts and main and job.sample_at_first and si == 0 and start == 0:
                _sample(model, [network], presets, job, sample_prompts, out_dir, 0)
            bar = tqdm(total=steps, initial=start, desc=stage.name, dynamic_ncols=True, **({} if main else {"disable": True}))
            loss_avg = None
            t_start = time.time()
            for step in range(start, steps):
                t_step = time.perf_counter()
                torch.manual_seed(_seed_of(job.seed, "dropout", si, step, rank))  # network dropouts
                optimizer.zero_grad(set_to_none=True)
                step_loss = torch.zeros(())
                for micro in range(job.gradient_accumulation_steps):
                    position = step * job.gradient_accumulation_steps + micro
                    epoch, global_batch = _batch_at(data, position, world, allowed)
                    batch = _make_batch(data, global_batch, rank, world, job, si, step, micro, epoch, stage, model)
                    ctx = StepContext(model=model, network=network, job=job, step=step, encode=encode)
                    with accelerator.autocast():
                        loss = stage.loss(ctx, batch).mean() / job.gradient_accumulation_steps
                    loss.backward()
                    step_loss += loss.detach().float()
                step_loss = _all_reduce(params, step_loss, world)
                grad_norm = torch.nn.utils.clip_grad_norm_(params, job.max_grad_norm if job.max_grad_norm > 0 else float("inf"))
                if not torch.isfinite(step_loss) or not torch.isfinite(grad_norm):
                    save_checkpoint(step, "last-good", with_state=True, params_are="before the failing step")
                    raise TrainingStopped(
                        f"non-finite {'loss' if not torch.isfinite(step_loss) else 'gradient'} at step {step + 1} of "
                        f"stage {stage.name}; training stopped and the weights before that step were saved "
                        f"({job.output_name}-last-good.safetensors and the state for --resume); earlier saves are "
                        "untouched. Try a lower learning_rate, max_grad_norm = 1.0, or mixed_precision = 'no'/'bf16'")
                optimizer.step()
                scheduler.step()
                done = step + 1
                if on_step is not None:
                    on_step(stage.name, done, time.perf_counter() - t_step)
                loss_value = float(step_loss)
                loss_avg = loss_value if loss_avg is None else 0.95 * loss_avg + 0.05 * loss_value
                lr = scheduler.get_last_lr()[0]
                bar.update(1)
                bar.set_postfix(loss=f"{loss_avg:.4f}", lr=f"{lr:.2e}")
                if writer:
                    writer.add_scalar(f"loss/{stage.name}", loss_value, total_step + done)
                    for g in optimizer.param_groups:
                        writer.add_scalar(f"lr/{stage.name}/{g.get('name', 'group')}", g["lr"], total_step + done)

                # ---- samples, saves, stop requests
                epoch_end = done % per_epoch == 0
                if sample_prompts and main and (
                        (job.sample_every_n_steps and done % job.sample_every_n_steps == 0)
                        or (job.sample_every_n_epochs and epoch_end and (done // per_epoch) % job.sample_every_n_epochs == 0)):
                    _sample(model, [network] + list(results.values()), presets, job, sample_prompts,
                            out_dir, total_step + done)
                lora_tag = None
                if job.save_every_n_steps and done % job.save_every_n_steps == 0 and done < steps:
                    lora_tag = f"step{done:08d}"
                if job.save_every_n_epochs and epoch_end and (done // per_epoch) % job.save_every_n_epochs == 0 and done < steps:
                    lora_tag = f"{done // per_epoch:06d}"
                want_state = (job.save_state and lora_tag is not None) or bool(
                    job.save_state_every_n_steps and done % job.save_state_every_n_steps == 0 and done < steps)
                stop_now = _any_process(stop.requested, world)
                if stop_now:
                    save_checkpoint(done, "interrupted", with_state=True)
                    raise TrainingStopped(f"stopped at step {done} of stage {stage.name}; the LoRA and training state "
                                          f"were saved to {out_dir}; continue with --resume")
                if lora_tag or want_state:
                    save_checkpoint(done, lora_tag, want_state)
            bar.close()
            log.info("stage %s: %d steps in %.1f s", stage.name, steps - start, time.time() - t_start)
            network.eval().requires_grad_(False)
            results[stage.name] = network
            total_step += steps
            if stage.save_as and main:
                save_lora(network.kohya_state_dict(), out_dir / f"{job.output_name}-{stage.save_as}.safetensors",
                          lora_metadata(job, model, data, method, total_step, 0, started, session_id),
                          dtype=save_dtype(job.save_precision))
            state = None  # later stages start fresh

        # ---- finalize
        final = method.finalize(results)
        if main:
            md = lora_metadata(job, model, data, method, total_step, total_step // max(1, per_epoch), started, session_id)
            save_lora(final, final_path, md, dtype=save_dtype(job.save_precision))
            if sample_prompts and (job.sample_every_n_steps or job.sample_every_n_epochs):
                for net in results.values():
                    net.set_multiplier(0.0)
                result_net = LoRANetwork.from_weights(model.lora_targets(conv=True), final).to(device).apply_to()
                _sample(model, [result_net], presets, job, sample_prompts, out_dir, total_step)
                result_net.remove()
            if job.save_state:
                save_checkpoint(steps, None, with_state=True)
        for net in results.values():
            net.remove()
        for preset in presets:
            preset.unfuse()
        if writer:
            writer.close()
        accelerator.wait_for_everyone()
    if not main:
        return None
    log.info("saved %s", final_path)
    return final_path


class PromptCache:
    """Prompt encoding, cached per caption while no text-encoder LoRA is being trained."""

    def __init__(self, model):
        self.model = model
        self.cache: dict[str, Conditioning] = {}
        self.trains_text_encoder = False

    def reset(self, trains_text_encoder: bool) -> None:
        self.cache.clear()  # an earlier stage's text-encoder LoRA may have changed the embeddings
        self.trains_text_encoder = trains_text_encoder

    def __call__(self, captions: list[str]) -> Conditioning:
        if self.trains_text_encoder:
            return self.model.encode_prompts(captions)
        missing = [c for c in dict.fromkeys(captions) if c not in self.cache]
        if missing:
            with torch.no_grad():
                enc = self.model.encode_prompts(missing)
            for i, c in enumerate(missing):
                self.cache[c] = enc[i:i + 1]
        return Conditioning.cat([self.cache[c] for c in captions])


# ---------------------------------------------------------------------------- batches
def _batch_at(data: TrainingData, position: int, world: int, allowed) -> tuple[int, list[int]]:
    """The global batch at a position in the endless sequence of epochs."""
    epoch = 0
    while True:
        batches = data.epoch_batches(epoch, world, allowed)
        if position < len(batches):
            return epoch, batches[position]
        position -= len(batches)
        epoch += 1


def _make_batch(data, global_batch, rank, world, job, si, step, micro, epoch, stage, model) -> Batch:
    """This process's slice of a global batch, with every random draw derived from its position."""
    per = len(global_batch) // world
    latents: dict[str, list] = {}
    captions: dict[str, list[str]] = {}
    noise, timesteps, weights, diffs = [], [], [], []
    for j in range(rank * per, (rank + 1) * per):
        it = data.items[global_batch[j]]
        seed = _seed_of(job.seed, si, step, micro, j)
        rng = np.random.default_rng(seed)
        gen = torch.Generator().manual_seed(seed)
        flip = it.flip_aug and rng.random() < 0.5
        keys = ["x", "after"] if it.is_pair else ["x"]
        for k in keys:
            latents.setdefault(k, []).append(data.latent_for(it, k, flip, model, gen))
        captions.setdefault("x", []).append(process_caption(it.caption, it.rules, rng, epoch))
        if it.is_pair:
            captions.setdefault("after", []).append(process_caption(it.after_caption, it.rules, rng, epoch))
            diffs.append(it.latents["pixel_diff"].flip(-1) if flip else it.latents["pixel_diff"])
        shape = latents["x"][-1].shape
        eps = torch.randn(shape, generator=gen)
        if job.noise_offset:
            eps = eps + job.noise_offset * torch.randn(shape[0], 1, 1, generator=gen)
        noise.append(eps)
        if stage.timesteps is not None:
            timesteps.append(stage.timesteps(step, 1, gen)[0])
        else:
            timesteps.append(torch.randint(job.min_timestep, job.max_timestep, (1,), generator=gen)[0])
        weights.append(job.prior_loss_weight if it.is_reg else 1.0)
    device = model.device
    latent_hw = tuple(latents["x"][-1].shape[-2:])

    def masks():  # only when a loss asks for them
        return torch.stack([difference_mask(d, latent_hw, job.diff_mask_threshold, job.diff_mask_dilate)
                            for d in diffs])[:, None].to(device)

    return Batch(
        latents={k: torch.stack(v).to(device) for k, v in latents.items()},
        captions=captions,
        noise=torch.stack(noise).to(device),
        timesteps=torch.stack(timesteps).long().to(device),
        loss_weight=torch.tensor(weights, dtype=torch.float32, device=device),
        step=step,
        mask_fn=masks if diffs else None,
    )


def _all_reduce(params, loss: torch.Tensor, world: int) -> torch.Tensor:
    """Average gradients and loss over processes (one flat buffer, fixed order); returns the mean loss.

    A non-finite gradient anywhere shows up in the clipped total norm, which the caller checks.
    """
    if world > 1:
        import torch.distributed as dist

        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().float() for p in params]
                         + [loss.reshape(1).float().to(params[0].device)])
        dist.all_reduce(flat)
        flat /= world
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p).to(p.dtype)
            offset += n
        loss = flat[-1].cpu()
    return loss


def _any_process(flag: bool, world: int) -> bool:
    if world == 1:
        return flag
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t)
    return bool(t.item() > 0)


@torch.no_grad()
def _sample(model, networks, presets, job, prompts, out_dir: Path, step: int) -> None:
    from ..generate import GenerationRequest, generate, parameters_text, save_png

    training = [n.training for n in networks]
    multipliers = [[lora.multiplier for lora in n.loras()] for n in networks]
    for n in networks:
        n.eval()
    if job.sample_without_presets:
        for p in presets:
            p.unfuse()
    try:
        for i, sp in enumerate(prompts):
            seed = sp.seed if sp.seed is not None else job.seed + i
            req = GenerationRequest(prompts=[sp.prompt], seeds=[seed], negative=[sp.negative], steps=sp.steps,
                                    sampler=sp.sampler or job.sample_sampler, cfg=sp.cfg, width=sp.width, height=sp.height)
            mult = sp.extra.get("multiplier", 1.0)
            req.multipliers = {0: [mult]}
            img = generate(model, networks[:1], req)[0]
            params = parameters_text(sp.prompt, sp.negative, req.steps, req.sampler, req.cfg, seed,
                                     (img.shape[1], img.shape[0]), Path(model.source).name,
                                     [(job.output_name, mult)])
            save_png(img, out_dir / "sample" / f"{job.output_name}_{step:06d}_{i:02d}.png", params)
    finally:
        if job.sample_without_presets:
            for p, spec in zip(presets, job.preset_loras):
                p.fuse(spec.multiplier)
        for n, t, ms in zip(networks, training, multipliers):
            n.train(t)
            for lora, m in zip(n.loras(), ms):
                lora.multiplier = m
