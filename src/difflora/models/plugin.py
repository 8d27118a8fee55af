"""What a model family declares to the rest of difflora: one `FamilyPlugin` per family package.

A family is one package `models/<name>/` whose `__init__.py` defines `PLUGIN = <Name>Plugin()` and
imports nothing heavy (the job schema is built from it before any model is loaded); the package
is registered with one `register_family("difflora.models.<name>")` line in `models/registry.py`.
Every hook is a method here with a default, so callers never probe a family for what it has.
The loaded model is a `models/base.py:ModelFamily`, whose own hooks cover training and generation.
"""

from __future__ import annotations

import argparse
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..options import Strict

if TYPE_CHECKING:
    from .base import ModelFamily


class NoOptions(Strict):
    """The option table of a family without job keys of its own."""


class FamilyPlugin(ABC):
    names: tuple[str, ...]  # the model_family values this family loads ("sd1", "sd2")
    title: str  # what users call it, for messages ("Stable Diffusion 1.x / 2.x")
    # The family's job keys, top-level in the job TOML under kohya's / musubi's names; keys several families
    # honour come from the tables of models/shared_options.py. The job schema holds every family's table; a
    # key no table of the loaded family declares, set to another value than its default, is refused.
    # A key naming a file or folder is typed options.ReadPath (an input) or WritePath: relative values resolve
    # from the job file's folder and --restrict-paths / the UI keep it inside their folder (pathpolicy.py).
    options: type[Strict] = NoOptions
    # The values of the shared `model_variant` key (shared_options.ModelVariantKeys) this family loads, each with
    # what it means (generate's --model-variant help); empty: the family's table does not include the key.
    model_variants: dict[str, str] = {}
    # Recommended values per method for keys a job leaves unset: {"addift": {"max_train_steps": 100, ...}};
    # a method table's keys go in a nested dict under the method's name.
    method_defaults: dict[str, dict[str, Any]] = {}
    # sd-scripts' network module for this family's LoRA ("networks.lora_flux"): a kohya config naming it trains
    # this family's LoRA, and plain LoRA files say it in ss_network_module. Its network_args that are option keys
    # of this family (same name: train_t5xxl) set them; the ones difflora does not do are refused with the reason
    # (accepted while off: kohya_ss's GUI writes `split_qkv=False`).
    kohya_network_module: str = "networks.lora"
    kohya_network_args: tuple[str, ...] = ()
    refused_network_args: dict[str, str] = {}

    # ---- recognising files (cheap: configs and tensor names, never weights)
    def detect_folder(self, path: Path, index: dict) -> str | None:
        """The family name when the diffusers folder at `path` (its model_index.json is `index`) is one of its
        models, else None. May raise a UserError for a model clearly of the family but unusable (SDXL refiner)."""
        return None

    def detect_single_file(self, keys: set[str], metadata: dict[str, str]) -> str | None:
        """The same for a single-file checkpoint, from its tensor names and safetensors metadata."""
        return None

    @abstractmethod
    def owns_lora_names(self, names: set[str], metadata: dict[str, str]) -> bool:
        """Whether a LoRA file with these kohya module names (network/files.LoraFile.module_names()) or, in the
        layouts the family reads, tensor names was made for this family. Every family answers: a LoRA no family
        owns is refused by the tools that combine files, never silently passed."""

    def family_of_version(self, version: str) -> str | None:
        """The model_family a kohya `ss_base_model_version` names when it is one of this family's ("sd_v2_v" ->
        "sd2"), else None; a LoRA whose version names another family than the model's is refused."""
        return None

    def lora_block(self, name: str) -> str | None:
        """The block a kohya module name belongs to ("unet:down_blocks_1", "double_blocks_3"), for `inspect` and
        block-wise options; None outside the blocks."""
        return None

    def is_kxk_conv(self, name: str) -> bool:
        """Whether a kohya module name is a kxk convolution (LyCORIS flattens its kernel into the factors)."""
        return False

    # ---- `difflora generate`
    # Option-table keys that name a companion file or folder of a single-file model (Z-Image's and Qwen-Image's
    # `text_encoder`, `vae`), with what each means for this family: generate adds one `--text-encoder`-style flag
    # per key, shared by the families that declare it (its help lists each one's meaning).
    generate_file_keys: dict[str, str] = {}

    def add_generate_arguments(self, parser: argparse.ArgumentParser) -> None:
        """The family's own flags (FLUX: --clip-l, --t5xxl, ...) other than its generate_file_keys; their dest names
        are option-table keys."""

    def generate_options(self, args: argparse.Namespace) -> dict[str, Any]:
        """The option-table values the user gave through this family's add_generate_arguments flags (unset flags
        left out)."""
        return {}

    # ---- loading
    def check_files(self, path: Path, options: Strict) -> None:
        """Raise a UserError naming the file when the family's file layout at `path` is incomplete or wrong."""

    @abstractmethod
    def load(self, path: Path, *, family: str, dtype, allow_pickle: bool, checkpoint, options: Strict,
             prediction_type: str | None, clip_skip: int | None, zero_terminal_snr: bool | None,
             mixed_precision: str = "no") -> "ModelFamily":
        """Load the model. `checkpoint` is the already-read (tensors, metadata) of a single file, None for a
        folder; `options` an instance of `self.options`; `mixed_precision` the job's, for families that load
        their frozen weights in it (FLUX in bf16)."""
