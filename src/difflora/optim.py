"""Optimizers and learning-rate schedules with kohya's names and parameter-group rules."""

from __future__ import annotations

import logging

import torch

from .errors import UserError

log = logging.getLogger(__name__)


def param_groups(network, job, stage_lr: float | None) -> list[dict]:
    """kohya: text-encoder LoRAs use text_encoder_lr, U-Net LoRAs unet_lr, both fall back to
    learning_rate; a group whose lr is 0 is dropped (frozen). A stage's own lr overrides both.
    LoRA+ (kohya's loraplus_*_ratio): each component's `lora_up` weights form a second group at
    lr x ratio."""
    groups = []
    for component, named in network.parameter_groups().items():
        if stage_lr is not None:
            lr = stage_lr
        elif component == "unet":
            lr = job.unet_lr if job.unet_lr is not None else job.learning_rate
        else:
            lr = job.text_encoder_lr if job.text_encoder_lr is not None else job.learning_rate
        if not lr:
            for p in named.values():
                p.requires_grad_(False)
            log.info("%s LoRA has learning rate 0: not trained", component)
            continue
        ratio = loraplus_ratio(job, component)
        up = {n: p for n, p in named.items() if ratio is not None and "lora_up" in n}
        rest = [p for n, p in named.items() if n not in up]
        if rest:
            groups.append({"params": rest, "lr": lr, "name": component})
        if up:
            groups.append({"params": list(up.values()), "lr": lr * ratio, "name": f"{component}_plus"})
    if not groups:
        raise UserError("nothing to train: every parameter group has learning rate 0")
    return groups


def loraplus_ratio(job, component: str) -> float | None:
    """LoRA+ ratio of a component: its own key, else loraplus_lr_ratio (kohya's fallback)."""
    own = job.loraplus_unet_lr_ratio if component == "unet" else job.loraplus_text_encoder_lr_ratio
    return own if own is not None else job.loraplus_lr_ratio


def make_optimizer(name: str, groups: list[dict], args: dict, device: torch.device):
    args = dict(args)
    lr = groups[0]["lr"]
    try:
        if name == "AdamW":
            if "foreach" not in args:
                args.setdefault("fused", True)  # one kernel for all parameters: 3x faster than foreach on CPU
            return torch.optim.AdamW(groups, lr=lr, **args)
        if name == "SGD":
            args.setdefault("momentum", 0.9)
            args.setdefault("nesterov", True)
            return torch.optim.SGD(groups, lr=lr, **args)
        if name == "AdamW8bit":
            if device.type != "cuda":
                raise UserError("optimizer_type AdamW8bit needs a CUDA GPU (bitsandbytes); use AdamW on CPU")
            try:
                import bitsandbytes as bnb
            except ImportError:
                raise UserError("optimizer_type AdamW8bit needs bitsandbytes: pip install 'difflora[cuda]'") from None
            return bnb.optim.AdamW8bit(groups, lr=lr, **args)
        if name == "Lion":
            from lion_pytorch import Lion

            return Lion(groups, lr=lr, **args)
        if name == "Prodigy":
            from prodigyopt import Prodigy

            if lr <= 0.1:
                log.warning("Prodigy adapts the step size itself; learning_rate around 1.0 is usual (got %g)", lr)
            return Prodigy(groups, lr=lr, **args)
    except TypeError as e:
        raise UserError(f"optimizer_args do not fit {name}: {e}") from None
    raise UserError(f"unknown optimizer_type {name!r}")


def warmup_steps(value: int | float, total: int) -> int:
    """kohya: an int is steps, a float below 1 is a fraction of the total."""
    if isinstance(value, float) and value < 1:
        return int(value * total)
    return int(value)


def make_scheduler(name: str, optimizer, total_steps: int, warmup: int | float, num_cycles: int, power: float):
    from diffusers.optimization import get_scheduler

    kwargs = dict(num_warmup_steps=warmup_steps(warmup, total_steps), num_training_steps=total_steps)
    if name == "cosine_with_restarts":
        kwargs["num_cycles"] = num_cycles
    if name == "polynomial":
        kwargs["power"] = power
    if name == "constant":
        kwargs.pop("num_warmup_steps")
        kwargs.pop("num_training_steps")
    return get_scheduler(name, optimizer, **kwargs)
