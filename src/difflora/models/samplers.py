"""The samplers of the diffusers pipelines the U-Net families generate with, under kohya's names
(--sample_sampler, prompt files' --ss, generate's --sampler). Light: validate.py checks names with it."""

from __future__ import annotations

from ..errors import UserError

# kohya's --sample_sampler names -> (diffusers scheduler class, extra config)
SCHEDULERS: dict[str, tuple[str, dict]] = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "k_lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "k_euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "k_euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm_2": ("KDPM2DiscreteScheduler", {}),
    "k_dpm_2": ("KDPM2DiscreteScheduler", {}),
    "dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "k_dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "dpmsolver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver"}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmsingle": ("DPMSolverSinglestepScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
}


def make_scheduler(name: str, config: dict):
    import diffusers

    key = name.lower()
    if key not in SCHEDULERS:
        raise UserError(f"unknown sampler {name!r}; choose one of: {', '.join(SCHEDULERS)}")
    cls_name, extra = SCHEDULERS[key]
    cfg = {k: v for k, v in config.items() if not k.startswith("_")}
    return getattr(diffusers, cls_name).from_config({**cfg, **extra})
