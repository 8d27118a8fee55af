"""`difflora train` and the LoRA tools on the tiny Qwen-Image (real 60 blocks, 32 px pairs, 2 steps), for what the
contract suite (tests/contract: every method and adapter trained on this family, checked at the denoiser) does not
check: musubi's names and Qwen-Image's metadata in a trained file, LyCORIS in a ComfyUI file, the low-VRAM keys and
fp8_base, other families' keys, and every LoRA tool on the family's folder and ComfyUI files, results checked."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import _write_pairs
from test_qwen_image import _random_lora, comfy_key_map, comfy_not_loaded
from difflora.config import JobConfig, apply_method_defaults
from difflora.errors import UserError
from difflora.generate import GenerationRequest, generate
from difflora.models import load_model
from difflora.models.registry import family_options_of
from difflora.network.apply import network_from_file
from difflora.network.files import read_metadata_only
from difflora.train.loop import train


def _load(path, **options):
    return load_model(path, options=options)


KOHYA = set((Path(__file__).parent / "data" / "qwen_image_keys" / "qwen_image_kohya.txt").read_text().split())


@pytest.fixture(scope="module")
def qwen_env(tmp_path_factory):
    from difflora.models.qwen_image.tiny import write_tiny_folder

    root = tmp_path_factory.mktemp("qwen_train")
    write_tiny_folder(root / "model")
    _write_pairs(root / "pairs", 2, 32)
    return root


def _job(root: Path, out: Path, method: str, **extra):
    job = {"model": str(root / "model"), "method": method, "resolution": 32, "train_batch_size": 2,
           "max_train_steps": 2, "learning_rate": 1e-2, "output_dir": str(out), "output_name": method,
           "log_with": "none", "seed": 5,
           "datasets": [{"subsets": [{"image_dir": str(root / "pairs"), "caption_extension": ".txt"}]}]}
    job.update(extra)
    return apply_method_defaults(JobConfig.model_validate(job))


def _changes_images(root: Path, path: Path, job) -> float:
    model = _load(root / "model", **family_options_of(job))
    net = network_from_file(model, path, 1.0)
    req = GenerationRequest(prompts=["a face, red hair"], seeds=[3], steps=2, cfg=1.0, width=32, height=32)
    req.multipliers = {0: [1.0]}
    on = generate(model, [net], req, output="float")[0]
    req.multipliers = {0: [0.0]}
    off = generate(model, [net], req, output="float")[0]
    return float(np.abs(on - off).max())


def test_a_trained_lora_has_musubis_names_and_qwen_image_metadata(qwen_env, tmp_path, monkeypatch):
    """... and trained over a preset LoRA, which is fused into the model it trains on (kohya's base_weights)."""
    import difflora.train.loop as loop

    preset = _random_lora(_load(qwen_env / "model"), tmp_path / "preset.safetensors", seed=4)
    seen, real_prepare = {}, loop.prepare

    def prepare(*args, **kwargs):  # the model training starts from, and the run to look at afterwards
        seen["run"] = real_prepare(*args, **kwargs)
        seen["start"] = _predict(seen["run"].model)
        return seen["run"]

    monkeypatch.setattr(loop, "prepare", prepare)
    job = _job(qwen_env, tmp_path, "standard", preset_loras=[{"path": str(preset), "multiplier": 0.5}])
    path = train(job)
    assert {k.split(".")[0] for k in load_file(str(path))} == KOHYA  # 840: img_mod / txt_mod as musubi's
    md = read_metadata_only(path)
    assert md["ss_base_model_version"] == "qwen_image" and md["modelspec.architecture"] == "Qwen-Image"
    assert md["ss_timestep_sampling"] == "shift" and md["ss_discrete_flow_shift"] == "2.2"  # Qwen's defaults
    assert md["ss_weighting_scheme"] == "none"  # musubi's default
    assert "preset.safetensors" in md["difflora_preset_loras"]
    # training starts from the base with the preset at 0.5, and leaves the base as it was loaded
    base = _load(qwen_env / "model")
    with_preset = _predict(base, [network_from_file(base, preset, 0.5)])
    assert float((with_preset - _predict(base)).abs().max()) > 1e-3
    torch.testing.assert_close(seen["start"], with_preset, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(_predict(seen["run"].model), _predict(base), rtol=0, atol=0)
    assert _changes_images(qwen_env, path, job) > 1e-4


def test_lycoris_in_a_comfyui_file_keeps_kohya_names_and_comfyui_loads_every_key(qwen_env, tmp_path):
    job = _job(qwen_env, tmp_path, "standard", output_name="lokr", save_format="comfyui", network_algo="lokr")
    keys = load_file(str(train(job)))
    # LyCORIS / DoRA modules keep kohya's names in a comfyui file (ComfyUI maps them); plain LoRA would be lora_A/B
    assert {k.split(".")[0] for k in keys} == KOHYA
    assert any(k.endswith("lokr_w1") for k in keys)
    key_map = comfy_key_map(_load(qwen_env / "model").transformer.state_dict())
    assert comfy_not_loaded(keys, key_map) == (840, [])  # ComfyUI loads every key of the file


def test_low_vram_keys_give_the_same_lora_and_fp8_base_a_close_one(qwen_env, tmp_path):
    """Cached text-encoder outputs (Qwen2.5-VL freed), 50 blocks swapped and per-block checkpointing change where
    things are, not the maths; fp8_base (block weights in float8_e4m3fn, bf16 compute) stays near fp32's LoRA;
    qwen_shift sampling runs too."""
    base = dict(max_train_steps=2, timestep_sampling="qwen_shift")
    plain = load_file(str(train(_job(qwen_env, tmp_path / "a", "standard", **base))))
    low = load_file(str(train(_job(qwen_env, tmp_path / "b", "standard", cache_text_encoder_outputs=True,
                                   network_train_unet_only=True, blocks_to_swap=50, gradient_checkpointing=True,
                                   **base))))
    assert plain.keys() == low.keys()
    assert max(float((plain[k] - low[k]).abs().max()) for k in plain) < 1e-5
    ups = [k for k in plain if k.endswith("lora_up.weight")]
    assert any(float(plain[k].abs().max()) > 0 for k in ups)
    fp8 = load_file(str(train(_job(qwen_env, tmp_path / "c", "standard", fp8_base=True, **base))))
    a, b = (torch.cat([lora[k].float().flatten() for k in ups]) for lora in (plain, fp8))
    cosine = float(a @ b / (a.norm() * b.norm()))
    rel = max(float((plain[k].float() - fp8[k].float()).norm() / plain[k].float().norm().clamp_min(1e-12))
              for k in ups)
    # measured: cosine 0.986, worst module 0.58 (Adam's first steps follow the gradients' signs); the LoRA of
    # another seed: cosine -0.03, worst module 2.1
    assert cosine > 0.95 and 0 < rel < 1, (cosine, rel)
    model = _load(qwen_env / "model", fp8_base=True)
    to_q = model.transformer.transformer_blocks[0].attn.to_q
    assert to_q.weight.dtype == torch.float8_e4m3fn
    assert to_q(torch.ones(1, to_q.in_features, dtype=torch.bfloat16)).isfinite().all()


def test_other_families_keys_are_refused(qwen_env, tmp_path, tiny_sd1_dir):
    with pytest.raises(UserError, match="guidance_scale does not apply to Qwen-Image"):
        train(_job(qwen_env, tmp_path, "standard", guidance_scale=2.0))
    sd_job = _job(qwen_env, tmp_path, "standard", model=str(tiny_sd1_dir), vae="some/qwen_image_vae.safetensors",
                  resolution=16)
    with pytest.raises(UserError, match="vae applies to .*Qwen-Image-Edit models only; this model is Stable Diffusion"):
        train(sd_job)
    assert not (tmp_path / "standard.safetensors").exists()


def _predict(model, networks=()):
    x = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            return model.predict(x, torch.tensor([500.0]), model.encode_prompts(["a face, red hair"]))
    finally:
        for net in networks:
            net.remove()


def test_lora_tools_on_qwen_image_folders_and_comfyui_files(qwen_env, tmp_path, run_cli):
    """inspect, resize, merge, svd-merge, merge into the folder and into ComfyUI's transformer file, extract: each
    output keeps musubi's names and gives the output its inputs say it should."""
    from difflora.models.qwen_image.tiny import write_tiny_single_files

    files = write_tiny_single_files(qwen_env / "model", tmp_path / "comfy")
    base = _load(qwen_env / "model")
    a = _random_lora(base, tmp_path / "a.safetensors", seed=1)
    b = _random_lora(base, tmp_path / "b.safetensors", seed=2)
    plain = _predict(base)
    with_a = _predict(base, [network_from_file(base, a, 1.0)])
    assert float((with_a - plain).abs().max()) > 1e-3

    code, out, err = run_cli("inspect", a)
    assert code == 0, err
    assert "840" in out and "qwen_image" in out
    # resize to the full rank 4 keeps the LoRA; to rank 2 it keeps the names
    for rank in (4, 2):
        code, _, err = run_cli("resize", "--model", a, "--new-rank", rank, "--save-to", tmp_path / f"r{rank}.safetensors")
        assert code == 0, err
        resized = load_file(str(tmp_path / f"r{rank}.safetensors"))
        assert {k.split(".")[0] for k in resized} == KOHYA
        assert {v.shape[0] for k, v in resized.items() if k.endswith("lora_down.weight")} == {rank}
    torch.testing.assert_close(_predict(base, [network_from_file(base, tmp_path / "r4.safetensors", 1.0)]), with_a,
                               rtol=1e-4, atol=1e-4)
    # merge (exact: ranks concatenated) and svd-merge at full rank give a at 0.5 + b at 0.5
    both = _predict(base, [network_from_file(base, a, 0.5), network_from_file(base, b, 0.5)])
    code, _, err = run_cli("merge", "--models", a, b, "--ratios", "0.5", "0.5", "--save-to", tmp_path / "m.safetensors")
    assert code == 0, err
    code, _, err = run_cli("svd-merge", "--models", a, b, "--ratios", "0.5", "0.5", "--new-rank", "8",
                           "--save-to", tmp_path / "s.safetensors")
    assert code == 0, err
    for merged in ("m", "s"):
        path = tmp_path / f"{merged}.safetensors"
        assert {k.split(".")[0] for k in load_file(str(path))} == KOHYA
        torch.testing.assert_close(_predict(base, [network_from_file(base, path, 1.0)]), both, rtol=1e-4, atol=1e-4)
    # merged into the diffusers folder and into ComfyUI's transformer file: the model with a attached
    code, _, err = run_cli("merge", "--models", a, "--model", qwen_env / "model", "--save-to", tmp_path / "merged")
    assert code == 0, err
    code, _, err = run_cli("merge", "--models", a, "--model", files["diffusion_model"],
                           "--save-to", tmp_path / "merged.safetensors")
    assert code == 0, err
    torch.testing.assert_close(_predict(_load(tmp_path / "merged")), with_a, rtol=1e-4, atol=1e-4)
    single = _load(tmp_path / "merged.safetensors", text_encoder=str(files["text_encoder"]), vae=str(files["vae"]))
    torch.testing.assert_close(_predict(single), with_a, rtol=1e-4, atol=1e-4)
    # extract at a's rank from the base and the merged ComfyUI file: a again
    code, _, err = run_cli("extract", "--model-org", files["diffusion_model"], "--model-tuned",
                           tmp_path / "merged.safetensors", "--dim", "4", "--save-to", tmp_path / "x.safetensors")
    assert code == 0, err
    assert {k.split(".")[0] for k in load_file(str(tmp_path / "x.safetensors"))} == KOHYA
    torch.testing.assert_close(_predict(base, [network_from_file(base, tmp_path / "x.safetensors", 1.0)]), with_a,
                               rtol=1e-3, atol=1e-3)
