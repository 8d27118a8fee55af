"""Edit LoRAs and edit sliders for edit models (Qwen-Image-Edit, FLUX.1 Kontext, FLUX.2), from the same pairs.

An edit model denoises a target conditioned on a clean control image (reference tokens appended after the
target's, with offset position ids) and an instruction. Notation: b / a a pair's "before" / "after" latents, ε
the sample's noise, σ = t/1000, q(x) = (1-σ)·x + σ·ε, v_m(z | c) the velocity of the model with the LoRA at
multiplier m for noisy target tokens z and control c (the instruction p is left out), f = v_0 the frozen model,
M the pair's difference mask at latent resolution (1 where the pair differs, dilated), and mean(·) over every
latent element. The prediction covers the target tokens only, so every loss is on the target tokens only. A pair's
further control images (NAME_ref1.png, ...) follow the first control (b, or a on the slider's odd steps) in every
prediction's control list.

- edit:         L = mean((v_1(q(a) | b) - (ε - a))²)       (control = before, target = after, prompt = instruction)
- edit-slider:  even steps  L = mean(M·(v_{+m}(q(a) | b) - (ε - a))²) + λ·mean((1-M)·(v_{+m}(q(a) | b) - f(q(a) | b))²)
                odd steps   L = mean(M·(v_{-m}(q(b) | a) - (ε - b))²) + λ·mean((1-M)·(v_{-m}(q(b) | a) - f(q(b) | a))²)
  one ε and t per pair for both directions (drawn per step like every method's); λ = preserve_weight. Where the
  pair does not differ the LoRA keeps the frozen model's prediction, so its only learned effect is the edit; at
  multiplier 0 the base is untouched by construction (the LoRA adds m·ΔW).
- addift with `addift.control = true` (ADDifT for edit models): the frozen model's prediction for the other
  image is the target, both passes conditioned on the same control, the "before" image:
  v_{+m}(q(a) | b) → f(q(b) | b) on even steps, v_{-m}(q(b) | b) → f(q(a) | b) on odd ones (methods/addift.py).
"""

from __future__ import annotations

import torch
from pydantic import Field

from ..errors import UserError
from ..models.base import Conditioning
from ..options import Strict
from .base import Batch, DataSizes, Method, Stage, StepContext, per_sample_mse


def reference_keys(batch: Batch) -> list[str]:
    """The batch's further control images ("ref1", "ref2", ...: the pairs' NAME_ref1.png, ...), in order."""
    return sorted((k for k in batch.latents if k.startswith("ref")), key=lambda k: int(k[3:]))


def edit_conditioning(ctx: StepContext, batch: Batch, prompts: list[str], control: str) -> Conditioning:
    """The prompts with the pair image `control` ("x": before, "after") as each sample's first control image and
    the pair's reference images (NAME_ref1.png, ...) after it, packed as the family's edit pipeline does
    (Qwen-Image-Edit: the images also through its VL text encoder)."""
    model = ctx.model
    keys = [control] + reference_keys(batch)
    if model.controls_reach_text_encoder:
        with torch.no_grad():
            text = model.encode_prompts_with_controls(prompts, [list(ims) for ims in zip(*map(batch.image_fn, keys))])
    else:
        text = ctx.encode(prompts)
    return text.merged(model.control_conditioning([batch.latents[k] for k in keys]))


def require_control(model, method: str, job, data=None) -> None:
    """Stop with one line when `model` cannot take a control image, when a pair of `data` has more control images
    (before + NAME_ref1.png, ...) than the model takes or another number than the others (a batch packs one number),
    or when its prompts (which then include the control image) cannot be cached before its text encoder is freed."""
    if model.max_control_images < 1:
        raise UserError(f"method {method} needs an edit model that takes a control image (Qwen-Image-Edit, FLUX.1 "
                        f"Kontext, FLUX.2); this model is {model.modelspec_architecture}", path=model.source or None)
    pairs = [it for it in data.unique_items() + data.validation_items if it.is_pair] if data is not None else []
    for it in pairs:
        if 1 + len(it.ref_paths) > model.max_control_images:
            raise UserError(f"method {method}: this pair has {1 + len(it.ref_paths)} control images (the before image "
                            f"and {it.ref_paths[-1].name} before it) but {model.modelspec_architecture} takes at most "
                            f"{model.max_control_images}", path=it.path)
        if len(it.ref_paths) != len(pairs[0].ref_paths):
            raise UserError(f"method {method}: this pair has {len(it.ref_paths)} reference image(s) (NAME_ref1.png, "
                            f"...) but {pairs[0].path.name} has {len(pairs[0].ref_paths)}; give every pair the same "
                            "number", path=it.path)
    if model.controls_reach_text_encoder and job.cache_text_encoder_outputs:
        raise UserError(f"method {method} on {model.modelspec_architecture}: the control image goes through the text "
                        "encoder with each instruction, so its outputs cannot be cached up front; set "
                        "cache_text_encoder_outputs = false")


def require_instructions(data, method: str) -> None:
    """Every pair (trained or held out) needs a prompt: its NAME.instruction.txt, edit_instruction or a caption."""
    missing = data.pairs_without_instruction()
    if missing:
        raise UserError(f"method {method}: this pair has no instruction (write {missing[0].name}, a caption, or set "
                        "edit_instruction)", path=missing[0])


def edit_loss(ctx: StepContext, batch: Batch) -> torch.Tensor:
    obj = ctx.model.objective
    target, eps, t = batch.latents["after"], batch.noise, batch.timesteps
    cond = edit_conditioning(ctx, batch, batch.captions["instruction"], "x")
    noisy = obj.add_noise(target, eps, t)
    pred = ctx.predict(noisy, t, cond, multiplier=1.0)
    loss = per_sample_mse(obj.prediction(pred, noisy, t), obj.target(target, eps, t))
    return loss * batch.loss_weight * ctx.timestep_weight(t)


class Edit(Method):
    name = "edit"
    purpose = ("For edit models (Qwen-Image-Edit, FLUX.1 Kontext, FLUX.2): the 'before' image is the control, the "
               "'after' image the target, the pair's instruction the prompt. The LoRA learns to do the edit.")
    needs_pairs = True
    needs_control = True
    unet_only = True  # the instruction's encoding is a condition: a text-encoder LoRA would get no gradient
    defaults = {"max_train_steps": 200, "learning_rate": 1e-4, "lr_scheduler": "constant", "network_dim": 16,
                "network_alpha": 16.0}

    def caption_keys(self):
        return ("instruction",)

    def check_inputs(self, model, data) -> None:
        require_control(model, self.name, self.job, data)
        require_instructions(data, self.name)

    def stages(self, data: DataSizes) -> list[Stage]:
        return [Stage("main", self.main_steps(data), self.spec(), edit_loss, init_from_job_weights=True)]


class EditSliderOptions(Strict):
    """`[edit-slider]`: +m edits before → after, -m after → before; the loss is in the module docstring."""

    multiplier: float = Field(1.0, gt=0)  # m
    preserve_weight: float = Field(1.0, ge=0)  # λ: keep the frozen prediction where the pair does not differ
    diff_mask_threshold: float = Field(10.0, ge=0)  # sum of |RGB| difference (0-765) counted as changed
    diff_mask_dilate: int = Field(2, ge=0)  # pixels
    # "instruction": both directions see the pair's instruction (the sign alone carries the direction);
    # "empty": no prompt, the multiplier alone is the edit
    prompt: str = Field("instruction", pattern="^(instruction|empty)$")


def edit_slider_loss(ctx: StepContext, batch: Batch) -> torch.Tensor:
    o = getattr(ctx.job, "edit-slider")
    obj = ctx.model.objective
    forward = batch.step % 2 == 0
    control, target = ("x", "after") if forward else ("after", "x")
    x0, eps, t = batch.latents[target], batch.noise, batch.timesteps
    prompts = batch.captions["instruction"] if o.prompt == "instruction" else [""] * len(batch)
    cond = edit_conditioning(ctx, batch, prompts, control)
    noisy = obj.add_noise(x0, eps, t)
    pred = ctx.predict(noisy, t, cond, multiplier=o.multiplier if forward else -o.multiplier)
    mask = batch.difference_masks(o.diff_mask_threshold, o.diff_mask_dilate)
    loss = per_sample_mse(obj.prediction(pred, noisy, t), obj.target(x0, eps, t), mask)
    if o.preserve_weight:
        loss = loss + o.preserve_weight * per_sample_mse(pred, ctx.predict_frozen(noisy, t, cond), 1 - mask)
    return loss * ctx.timestep_weight(t)


class EditSlider(Method):
    name = "edit-slider"
    trains_both_directions = True
    purpose = ("An edit whose strength is the LoRA's multiplier, for edit models: at +m the 'before' image is edited "
               "towards 'after', at -m an 'after' image back; untouched where the pair does not differ.")
    options = EditSliderOptions
    needs_pairs = True
    needs_control = True
    unet_only = True
    defaults = {"max_train_steps": 200, "learning_rate": 1e-4, "lr_scheduler": "constant", "network_dim": 16,
                "network_alpha": 16.0}

    def caption_keys(self):
        return ("instruction",) if getattr(self.job, "edit-slider").prompt == "instruction" else ("empty",)

    def check_inputs(self, model, data) -> None:
        require_control(model, self.name, self.job, data)
        if getattr(self.job, "edit-slider").prompt == "instruction":
            require_instructions(data, self.name)

    def stages(self, data: DataSizes) -> list[Stage]:
        return [Stage("main", self.main_steps(data), self.spec(), edit_slider_loss, init_from_job_weights=True)]

    def metadata(self) -> dict[str, str]:
        return {"ss_training_method": self.name,
                "difflora_edit_slider_multiplier": str(getattr(self.job, "edit-slider").multiplier)}
