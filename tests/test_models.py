"""Model loading: diffusers folders, single-file checkpoints, pickle policy, bad folders."""

from __future__ import annotations

import shutil

import pytest
import torch

from difflora.errors import UserError
from difflora.models import load_model


@pytest.mark.parametrize("variant", ["sd1", "sd2"])
def test_single_file_loads_the_same_weights_as_its_folder(tmp_path, sd15_layout_dirs, variant):
    folder = load_model(sd15_layout_dirs[variant])
    single = tmp_path / "model.safetensors"
    folder.save(single)
    loaded = load_model(single)
    assert loaded.family == variant and loaded.base_model_version == folder.base_model_version
    for comp in ("unet", "vae", "text_encoder"):
        a, b = getattr(folder, comp).state_dict(), getattr(loaded, comp).state_dict()
        assert set(a) == set(b)
        assert all(torch.equal(a[k], b[k]) for k in a), comp
    # The same weights give the same prediction up to float32 rounding: the kernels' summation order
    # depends on the tensors' memory alignment (mmap'd folder weights vs copied single-file weights)
    # and on the CPU (1e-4 apart on an AVX-512 EPYC). The bound is this machine's own float32 rounding
    # error, measured against the model in float64; a wrong config or layout misses it by orders.
    x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([123])
    exact = load_model(sd15_layout_dirs[variant], dtype=torch.float64)
    reference = exact.predict(x.double(), t, exact.encode_prompts(["a face, red hair"]))
    rounding = (folder.predict(x, t, folder.encode_prompts(["a face, red hair"])).double() - reference).abs().max()
    error = (loaded.predict(x, t, loaded.encode_prompts(["a face, red hair"])).double() - reference).abs().max()
    floor = 64 * torch.finfo(torch.float32).eps * reference.abs().max()
    assert error <= 8 * rounding + floor, (float(error), float(rounding), float(floor))


def test_single_file_without_metadata_infers_the_layout(tmp_path, sd15_layout_dirs):
    from safetensors.torch import load_file, save_file

    folder = load_model(sd15_layout_dirs["sd1"])
    single = tmp_path / "model.safetensors"
    folder.save(single)
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(str(single)), str(bare))  # as a third-party file: no difflora metadata
    loaded = load_model(bare)
    for comp in ("unet", "vae"):
        a, b = getattr(folder, comp).state_dict(), getattr(loaded, comp).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), comp
    assert len(loaded.tokenizer) == 49408  # CLIP's BPE from the bundled vocabulary
    assert loaded.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_pickle_checkpoints_need_explicit_permission(tmp_path, tiny_sd1_dir):
    from safetensors.torch import load_file

    model = load_model(tiny_sd1_dir)
    single = tmp_path / "m.safetensors"
    model.save(single)
    ckpt = tmp_path / "m.ckpt"
    torch.save({"state_dict": load_file(str(single))}, ckpt)
    with pytest.raises(UserError, match=r"m\.ckpt.*pickle.*--allow-pickle"):
        load_model(ckpt)
    loaded = load_model(ckpt, allow_pickle=True)
    assert torch.equal(loaded.unet.conv_in.weight, model.unet.conv_in.weight)


def test_bad_model_folders(tmp_path, tiny_sd1_dir):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_sd1_dir, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(UserError, match="broken.*vae"):
        load_model(broken)
    with pytest.raises(UserError, match="not found"):
        load_model(tmp_path / "nope")
    lora_like = tmp_path / "lora.safetensors"
    from safetensors.torch import save_file

    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(lora_like))
    with pytest.raises(UserError, match="LoRA file, not a model"):
        load_model(lora_like)


def test_comfyui_scaled_fp8_weights_are_descaled_and_unusable_scales_refused():
    """The de-scaling FLUX.2, Z-Image and Qwen-Image share: fp8 weight times its scale (per tensor or per row),
    markers and activation scales dropped, an fp8 weight without a scale read as scaled by 1 (ComfyUI's rule)."""
    from difflora.models.comfy_files import dequantize_scaled_fp8

    stored = torch.tensor([[1.0, -2.0], [0.5, 448.0]])  # exact in float8_e4m3fn
    sd = {"a.weight": stored.to(torch.float8_e4m3fn), "a.scale_weight": torch.tensor([0.25])}
    out = dequantize_scaled_fp8(sd, "m.safetensors")
    assert list(out) == ["a.weight"] and out["a.weight"].dtype == torch.float32
    assert torch.allclose(out["a.weight"], torch.tensor([[0.25, -0.5], [0.125, 112.0]]), rtol=0, atol=1e-6)
    rows = {"a.weight": stored.to(torch.float8_e4m3fn), "a.weight_scale": torch.tensor([2.0, 0.5]),
            "a.input_scale": torch.ones(()), "b.weight": stored.to(torch.float8_e4m3fn),
            "b.bias": torch.tensor([3.0, 4.0])}
    out = dequantize_scaled_fp8(rows, "m.safetensors", torch.bfloat16)
    assert sorted(out) == ["a.weight", "b.bias", "b.weight"] and {v.dtype for v in out.values()} == {torch.bfloat16}
    assert out["a.weight"].float().tolist() == [[2.0, -4.0], [0.25, 224.0]]
    assert out["b.weight"].float().tolist() == [[1.0, -2.0], [0.5, 448.0]]
    plain = {"a.weight": stored}
    assert dequantize_scaled_fp8(plain, "m.safetensors") is plain  # nothing scaled, nothing asked: untouched
    assert dequantize_scaled_fp8(plain, "m.safetensors", torch.float16)["a.weight"].dtype == torch.float16
    for bad, why in ((dict(sd, **{"a.scale_weight": torch.ones(2, 2)}), "a block-wise fp8 scale of shape"),
                     ({"a.weight": stored, "a.weight_scale": torch.tensor(2.0)}, "a scaled float32"),
                     (dict(sd, **{"a.weight_scale_2": torch.tensor(2.0)}), "a double-scaled weight")):
        with pytest.raises(UserError) as e:
            dequantize_scaled_fp8(bad, "m.safetensors")
        assert str(e.value).startswith("m.safetensors: a.weight")
        assert why in str(e.value) and "\n" not in str(e.value)
