"""A tiny model family that exists only in the tests: the template a new family follows.

It touches nothing outside this package but its registration (`register_family("template_family")`, done by
tests/test_template_family.py for its own tests): this light `__init__.py` declares the family (`PLUGIN`),
model.py holds the loaded model (a `ModelFamily`), its file layout and a builder of a random tiny model.
A flow-matching denoiser of one conv block over a 2x autoencoder, with a character-level text encoder.
"""

from __future__ import annotations

from difflora.models.plugin import FamilyPlugin

PIPELINE_CLASS = "DiffloraTemplatePipeline"  # model_index.json's _class_name of its folders
LORA_PREFIXES = ("lora_unet_template_", "lora_te_template_")


class TemplatePlugin(FamilyPlugin):
    names = ("template",)
    title = "Template family (tests)"

    def detect_folder(self, path, index):
        return "template" if index.get("_class_name") == PIPELINE_CLASS else None

    def owns_lora_names(self, names, metadata):
        return any(n.startswith(LORA_PREFIXES) for n in names)

    def family_of_version(self, version):
        return "template" if version.startswith("template") else None

    def load(self, path, *, family, dtype, allow_pickle, checkpoint, options, prediction_type, clip_skip,
             zero_terminal_snr, mixed_precision="no"):
        from .model import load

        return load(path, dtype)


PLUGIN = TemplatePlugin()
