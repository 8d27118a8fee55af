"""Errors at the right depth: a loader turns a library's complaint about a file into a UserError (exit 2, the file
named), but memory running out or a library failing is an internal error (one line, exit 1, -v: traceback)."""

from __future__ import annotations

import pytest
import torch

from difflora.errors import is_internal_failure


def _raise(exc):
    def fail(*args, **kwargs):
        raise exc
    return fail


@pytest.mark.parametrize("exc, code", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB"), 1),
    (MemoryError(), 1),
    (ImportError("cannot import name 'x' from 'diffusers'"), 1),
    (ValueError("Cannot load <class 'UNet2DConditionModel'>: config.json is malformed"), 2),
    (OSError("Error no file named diffusion_pytorch_model.safetensors found in directory unet"), 2),
])
def test_loading_a_model_folder_tells_bad_input_from_internal_failures(tiny_sd1_dir, tmp_path, run_cli,
                                                                        monkeypatch, exc, code):
    import diffusers

    monkeypatch.setattr(diffusers.UNet2DConditionModel, "from_pretrained", _raise(exc))
    got, _, err = run_cli("generate", "--model", tiny_sd1_dir, "--prompt", "a face", "--steps", 1,
                          "--out", tmp_path / "out")
    assert got == code, err
    assert len(err.strip().splitlines()) == 1
    if code == 2:
        assert err.startswith(f"difflora: error: {tiny_sd1_dir}: could not load the model folder")
    else:
        assert f"internal error in difflora generate ({tiny_sd1_dir}): {type(exc).__name__}" in err and "-v" in err
    assert not (tmp_path / "out").exists()


def test_reading_a_lora_file_tells_bad_input_from_memory(tmp_path, run_cli, monkeypatch):
    from safetensors.torch import save_file

    import difflora.fileio as fileio

    path = tmp_path / "a.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 4), "lora_unet_x.lora_up.weight": torch.zeros(4, 2)},
              str(path))
    monkeypatch.setattr(fileio, "load_file", _raise(MemoryError()))
    code, _, err = run_cli("inspect", path)
    assert code == 1 and f"internal error in difflora inspect ({path}): MemoryError" in err
    monkeypatch.setattr(fileio, "load_file", _raise(RuntimeError("Error while deserializing header: invalid")))
    code, _, err = run_cli("inspect", path)
    assert code == 2 and err.startswith(f"difflora: error: {path}: could not read safetensors file")


def test_internal_failures_are_told_by_kind_and_by_torchs_out_of_memory_message():
    assert is_internal_failure(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_internal_failure(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert is_internal_failure(AttributeError("'NoneType' object has no attribute 'config'"))
    assert not is_internal_failure(RuntimeError("Error(s) in loading state_dict for FluxTransformer: size mismatch"))
    assert not is_internal_failure(KeyError("text_model.embeddings.token_embedding.weight"))
