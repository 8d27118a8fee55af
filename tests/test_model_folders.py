"""Model folders difflora writes store CLIP text encoders as published checkpoints do (`text_model.` keys)."""

from __future__ import annotations

import shutil

import torch
from safetensors.torch import load_file, save_file

from difflora.models import default_model_path, load_model


def _te_keys(folder):
    return list(load_file(str(folder / "text_encoder" / "model.safetensors")))


def test_shipped_model_text_encoder_is_in_the_published_layout_and_loads_both_ways(tmp_path):
    shipped = default_model_path()
    keys = _te_keys(shipped)
    assert keys and all(k.startswith("text_model.") for k in keys)
    # the transformers-5 layout (no prefix) of the same tensors loads to the same weights
    flat = tmp_path / "flat"
    shutil.copytree(shipped, flat)
    tensors = load_file(str(shipped / "text_encoder" / "model.safetensors"))
    save_file({k.removeprefix("text_model."): v for k, v in tensors.items()},
              str(flat / "text_encoder" / "model.safetensors"), metadata={"format": "pt"})
    a, b = load_model(shipped).text_encoder, load_model(flat).text_encoder
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    # every weight in the file reached the model (nothing left at its random initialisation)
    own = {k.removeprefix("text_model."): v for k, v in tensors.items()}
    assert all(torch.equal(sa[k], own[k]) for k in own)


def test_saved_model_folders_use_the_published_layout(tmp_path, tiny_sd1_dir):
    model = load_model(tiny_sd1_dir)
    assert all(k.startswith("text_model.") for k in _te_keys(tiny_sd1_dir))
    model.save(tmp_path / "copy")
    assert all(k.startswith("text_model.") for k in _te_keys(tmp_path / "copy"))
    again = load_model(tmp_path / "copy").text_encoder.state_dict()
    assert all(torch.equal(v, again[k]) for k, v in model.text_encoder.state_dict().items())
