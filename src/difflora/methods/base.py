"""The interface between the training loop and a training method.

A method is a list of stages plus a loss per stage. A stage trains one LoRA network for some
steps on some of the data; earlier stages' networks can stay active (the copier's stage 2
trains on top of stage 1). `finalize` turns the stages' results into the file the user gets.
The loop knows nothing else about a method.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Annotated, Callable, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import BeforeValidator

from ..errors import UserError
from ..models.base import Conditioning, SampleSize
from ..network.lora import LoRANetwork, NetworkSpec
from ..options import Strict

log = logging.getLogger(__name__)

# How a pair's two images are captioned: both on the tags their captions share ("common"), each
# on its own caption ("own"; TrainTrain's ADDifT calls this "fixed_roles", accepted as an alias), or none.
CaptionMode = Annotated[Literal["common", "own", "empty"],
                        BeforeValidator(lambda v: "own" if v == "fixed_roles" else v)]
# The captions a batch's prompts are made of (Method.caption_keys): an item's own ("x"), a pair's "after"
# caption, the tags a pair's two captions share ("common"), none ("empty"), or a pair's edit instruction
# ("instruction": its NAME.instruction.txt, else the job's edit_instruction, else its "after" caption).
CAPTION_KEYS = ("x", "after", "common", "empty", "instruction")


def pair_caption_keys(mode: str) -> tuple[str, ...]:
    """The captions a pair method in caption mode `mode` (CaptionMode) encodes."""
    return {"common": ("common",), "empty": ("empty",)}.get(mode, ("x", "after"))


@dataclass
class Batch:
    """One process's share of a global batch, with per-sample noise and timesteps already drawn."""

    latents: dict[str, torch.Tensor]  # "x" (and for pairs "after"), (B, C, h, w)
    captions: dict[str, list[str]]  # "x" (and "after")
    noise: torch.Tensor  # (B, C, h, w), one draw per sample, shared by both images of a pair
    timesteps: torch.Tensor  # (B,)
    loss_weight: torch.Tensor  # (B,) prior_loss_weight for regularisation images, else 1
    step: int = 0
    # (threshold, dilate) -> (B, 1, h, w) where each pair differs, at latent resolution
    mask_fn: Callable[[float, int], torch.Tensor] | None = None
    sizes: list[SampleSize] | None = None  # each sample's original size, crop and bucket (SDXL's time_ids)
    # "x" / "after" -> the pairs' images as PIL, cut to the batch's bucket (for a family whose text encoder sees
    # the control image: Qwen-Image-Edit)
    image_fn: Callable[[str], list] | None = None

    def __len__(self) -> int:
        return self.noise.shape[0]

    def difference_masks(self, threshold: float, dilate: int) -> torch.Tensor | None:
        """Where each pair differs (summed |RGB| difference above `threshold`, dilated by `dilate` pixels).

        Built when asked: most steps of most methods never need them.
        """
        return None if self.mask_fn is None else self.mask_fn(threshold, dilate)


@dataclass
class StepContext:
    """What a loss function may use: the model, the network being trained, and helpers."""

    model: object  # ModelFamily
    network: LoRANetwork
    job: object  # JobConfig
    step: int
    encode: Callable[[list[str]], Conditioning]  # cached prompt encoding
    # the batch's per-sample conditioning from image geometry (SDXL's time_ids), or None; predictions on
    # k·B inputs (several directions of one batch, concatenated) get it tiled k times
    sample_cond: Conditioning | None = None

    def predict(self, noisy: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                multiplier: float | torch.Tensor) -> torch.Tensor:
        """The denoiser's output with the trained LoRA at `multiplier` (float or one per sample)."""
        self.network.set_multiplier(multiplier)
        return self.model.predict(noisy, t, cond.merged(self.sample_cond))

    @torch.no_grad()  # not inference_mode: its tensors cannot be saved for the loss's backward (and measured no faster)
    def predict_frozen(self, noisy: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The frozen model's output (trained LoRA off), without autograd."""
        self.network.set_multiplier(0.0)
        return self.model.predict(noisy, t, cond.merged(self.sample_cond)).detach()

    def timestep_weight(self, t: torch.Tensor) -> torch.Tensor | float:
        """Per-sample loss weight at timesteps t: min-SNR-γ (min_snr_gamma) times the objective's own weighting
        (flow matching's weighting_scheme)."""
        gamma = self.job.min_snr_gamma
        snr = self.model.objective.min_snr_weight(t, gamma) if gamma else 1.0
        return snr * self.model.objective.loss_weight(t)


def common_caption(a: str, b: str) -> str:
    """The comma-separated tags two captions share, in a's order."""
    tb = {t.strip() for t in b.split(",")}
    return ", ".join(t.strip() for t in a.split(",") if t.strip() in tb)


def pair_captions(batch: Batch, which: str) -> list[str]:
    """Captions by key ("x", "after"), or "common": the tags each pair's two captions share."""
    if which == "common":
        return [common_caption(a, b) for a, b in zip(batch.captions["x"], batch.captions["after"])]
    return batch.captions[which]


def branch_captions(batch: Batch, mode: str) -> tuple[list[str], list[str]]:
    """Captions for a pair's (before, after) images: "common" (both the shared tags), "empty",
    or each image its own ("own")."""
    if mode == "common":
        shared = pair_captions(batch, "common")
        return shared, shared
    if mode == "empty":
        return [""] * len(batch), [""] * len(batch)
    return batch.captions["x"], batch.captions["after"]


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error over (C, H, W) for each sample, optionally weighted per element."""
    err = F.mse_loss(pred.float(), target.float(), reduction="none")
    if weight is not None:
        err = err * weight
    return err.mean(dim=tuple(range(1, err.dim())))


@dataclass
class Stage:
    name: str
    steps: int
    spec: NetworkSpec
    loss: Callable[[StepContext, Batch], torch.Tensor]  # per-sample loss (B,)
    learning_rate: float | None = None  # None: the job's learning_rate / unet_lr / text_encoder_lr
    items: list[int] | None = None  # indices of unique dataset items this stage sees (None: all)
    keep_active: list[str] = field(default_factory=list)  # earlier stages whose LoRA stays on at 1.0
    timesteps: Callable[[int, int, torch.Generator], torch.Tensor] | None = None  # (step, n, gen) -> (n,)
    save_as: str | None = None  # also save this stage's LoRA as <output_name>-<save_as>.safetensors
    init_from_job_weights: bool = False  # start from the job's network_weights


@dataclass
class DataSizes:
    """What a method needs to know about the data to size its stages."""

    n_items: int  # unique items (pairs, for pair methods)
    epoch_steps: Callable[[list[int] | None], int]  # optimizer steps in one epoch over these items (None: all)
    # mean share of latent cells where a pair differs (|RGB| > 10, dilated 2 px); None without pairs
    difference_coverage: Callable[[], float] | None = None


class Method:
    """A training method: its option table, recommended defaults, stages and result.

    Adding a method = a module with a subclass + one line in methods/__init__.py's METHODS;
    the job schema (config.py) picks up `options` as the table named after the method.
    """

    name = "method"
    options: ClassVar[type[Strict] | None] = None  # the `[<name>]` table of a job, None: no options
    needs_pairs = False
    needs_control = False  # True: an edit model's control image conditions every prediction (methods/edit.py)
    trains_both_directions = False  # True: trained at +m towards "after" and at -m back, so -1 is scored as reverse

    def samples_take_control(self) -> bool:
        """Whether the LoRA is trained conditioned on the pairs' "before" images, so that samples during training
        edit one (a held-out pair's by default)."""
        return self.needs_control
    unet_only = False  # True: the text encoder is never trained (its LoRA would get no gradient)
    defaults: ClassVar[dict] = {}  # recommended job values, used for keys the user did not set
    purpose: ClassVar[str] = ""  # one or two sentences for people choosing a method (the UI shows it)

    def __init__(self, job):
        self.job = job
        if self.unet_only:
            self._check_unet_only(job)

    def _check_unet_only(self, job) -> None:
        if job.network_train_text_encoder_only:
            raise UserError(f"method {self.name} trains the U-Net only (its loss gives a text-encoder LoRA no "
                            "gradient); network_train_text_encoder_only = true leaves nothing to train")
        if "network_train_unet_only" in job.model_fields_set and not job.network_train_unet_only:
            log.warning("method %s trains the U-Net only (its loss gives a text-encoder LoRA no gradient): "
                        "network_train_unet_only = false is ignored", self.name)

    def caption_keys(self) -> tuple[str, ...]:
        """The captions (CAPTION_KEYS) this method's losses encode, for training and validation items alike:
        with cached text-encoder outputs exactly these are encoded before the text encoders leave."""
        return ("x",)

    def check_inputs(self, model, data) -> None:
        """Before training, with the loaded model and the dataset (data/dataset.TrainingData): raise a UserError
        when this method cannot train on them (the edit methods: a model without control images)."""

    def main_steps(self, data: DataSizes, items: list[int] | None = None) -> int:
        """A single-stage method's length: max_train_epochs epochs when set (kohya: it wins), else max_train_steps."""
        if self.job.max_train_epochs:
            return self.job.max_train_epochs * data.epoch_steps(items)
        return self.job.max_train_steps

    def spec(self, dim: int | None = None, alpha: float | None = None) -> NetworkSpec:
        j = self.job
        return NetworkSpec(
            network_dim=dim or j.network_dim, network_alpha=j.network_alpha if alpha is None else alpha,
            conv_dim=j.conv_dim, conv_alpha=j.conv_alpha, dropout=j.network_dropout, rank_dropout=j.rank_dropout,
            module_dropout=j.module_dropout, train_unet=not j.network_train_text_encoder_only,
            train_text_encoder=not (j.network_train_unet_only or self.unet_only),
            only_if_contains=tuple(j.network_only_if_contains), ignore_if_contains=tuple(j.network_ignore_if_contains),
            adapter=j.adapter_options(),
        )

    def stages(self, data: DataSizes) -> list[Stage]:
        raise NotImplementedError

    def finalize(self, results: dict[str, LoRANetwork]) -> dict[str, torch.Tensor]:
        """The kohya state dict the user gets; by default the last stage's network."""
        return list(results.values())[-1].kohya_state_dict()

    def metadata(self) -> dict[str, str]:
        return {"ss_training_method": self.name}
