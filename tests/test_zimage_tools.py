"""The CLI on Z-Image files: generate with the family's sampler, merge into the model (ComfyUI single file and
diffusers folder), merge / svd-merge / resize LoRAs, extract from two models, inspect."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from difflora.models import load_model
from difflora.network.apply import network_from_file
from test_zimage import random_lora


@pytest.fixture(scope="module")
def zfiles(tmp_path_factory):
    from difflora.models.zimage.tiny import write_tiny_zimage

    return write_tiny_zimage(tmp_path_factory.mktemp("zimage_tools"))


@pytest.fixture(scope="module")
def zmodel(zfiles):
    return load_model(zfiles["folder"], options={"zimage_variant": "turbo"})


def _predict(model):
    x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model.predict(x, torch.tensor([500.0]), model.encode_prompts(["a face"]))


def test_generate_cli_uses_the_zimage_sampler(zfiles, zmodel, tmp_path, run_cli):
    lora = random_lora(zmodel, tmp_path)
    code, out, err = run_cli("generate", "--model", str(zfiles["folder"]), "--zimage-variant", "turbo", "--lora",
                             str(lora), "--prompt", "a face", "--steps", "2", "--width", "32", "--height", "32",
                             "--out", str(tmp_path / "out"))
    assert code == 0, err
    assert len(list((tmp_path / "out").glob("*.png"))) == 1
    code, out, err = run_cli("generate", "--model", str(zfiles["folder"]), "--prompt", "a face", "--steps", "2",
                             "--out", str(tmp_path / "out2"))
    assert code == 2 and "zimage_variant" in err and not (tmp_path / "out2").exists()


@pytest.mark.parametrize("target", ["transformer", "folder"])
def test_merge_into_the_model_equals_the_attached_lora(zfiles, zmodel, tmp_path, run_cli, target):
    lora = random_lora(zmodel, tmp_path)
    out = tmp_path / ("merged.safetensors" if target == "transformer" else "merged")
    code, _, err = run_cli("merge", "--model", str(zfiles[target]), "--models", str(lora), "--save-to", str(out))
    assert code == 0, err
    if target == "transformer":
        merged = load_model(out, options={"text_encoder": str(zfiles["text_encoder"]), "vae": str(zfiles["vae"])})
    else:
        merged = load_model(out, options={"zimage_variant": "turbo"})
    net = network_from_file(zmodel, lora)
    try:
        attached = _predict(zmodel)
    finally:
        net.remove()
    assert torch.allclose(_predict(merged), attached, atol=1e-4)
    assert not torch.allclose(_predict(zmodel), attached, atol=1e-3)


def test_lora_tools_and_extract_keep_zimage_names(zfiles, zmodel, tmp_path, run_cli):
    a, b = random_lora(zmodel, tmp_path / "a", seed=1), random_lora(zmodel, tmp_path / "b", seed=2)
    names = set(load_file(str(a)))
    for cmd in (["merge", "--models", str(a), str(b), "--save-to", str(tmp_path / "ab.safetensors")],
                ["svd-merge", "--models", str(a), str(b), "--new-rank", "2", "--save-to", str(tmp_path / "svd.safetensors")],
                ["resize", "--model", str(a), "--new-rank", "1", "--save-to", str(tmp_path / "r1.safetensors")]):
        code, _, err = run_cli(*cmd)
        assert code == 0, (cmd, err)
        assert set(load_file(cmd[-1])) == names, cmd[0]  # alpha, down and up of the same 150 native modules
    merged = tmp_path / "merged.safetensors"
    assert run_cli("merge", "--model", str(zfiles["transformer"]), "--models", str(a), "--save-to", str(merged))[0] == 0
    code, _, err = run_cli("extract", "--model-org", str(zfiles["transformer"]), "--model-tuned", str(merged),
                           "--dim", "2", "--save-to", str(tmp_path / "extracted.safetensors"))
    assert code == 0, err
    extracted = load_file(str(tmp_path / "extracted.safetensors"))
    assert {k.split(".")[0] for k in extracted} == {k.split(".")[0] for k in names}  # the modules a LoRA changed
    code, out, err = run_cli("inspect", str(a))
    assert code == 0 and "zimage" in out
    assert np.isfinite([float(v.float().abs().max()) for v in extracted.values()]).all()
