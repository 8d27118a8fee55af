"""`difflora train` end to end on the tiny Qwen-Image (real 60 blocks, 32 px pairs, a few steps): every method and
adapter writes a LoRA of the musubi names that changes the images; the low-VRAM keys give the same LoRA; family keys
of other models are refused; the tools take the family's files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import _write_pairs
from test_qwen_image import comfy_key_map, comfy_not_loaded
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


METHODS = {
    "standard": {},
    "addift": {},
    "slider": {},
    "copier": {"copier": {"stage1_steps": 2, "stage2_steps": 2, "stage1_learning_rate": 1e-2,
                          "stage2_learning_rate": 1e-2}},
    "differential": {"differential": {"before_steps": 2, "after_steps": 2, "learning_rate": 1e-2}},
}


@pytest.mark.parametrize("method", [m if m in ("standard", "addift") else pytest.param(m, marks=pytest.mark.slow)
                                    for m in METHODS])
def test_each_method_trains_a_musubi_named_lora_that_changes_the_images(qwen_env, tmp_path, method):
    job = _job(qwen_env, tmp_path, method, **METHODS[method])
    path = train(job)
    names = {k.split(".")[0] for k in load_file(str(path))}
    assert names == KOHYA  # 840 modules: img_mod / txt_mod included, as musubi / ai-toolkit / DiffSynth
    md = read_metadata_only(path)
    assert md["ss_base_model_version"] == "qwen_image" and md["modelspec.architecture"] == "Qwen-Image"
    assert md["ss_timestep_sampling"] == "shift" and md["ss_discrete_flow_shift"] == "2.2"  # Qwen's defaults
    assert _changes_images(qwen_env, path, job) > 1e-4, method


@pytest.mark.parametrize("algo", ["loha", "lokr", pytest.param("dora", marks=pytest.mark.slow)])
def test_each_adapter_trains_and_loads_back(qwen_env, tmp_path, algo):
    extra = {"network_dora": True} if algo == "dora" else {"network_algo": algo}
    job = _job(qwen_env, tmp_path, "standard", output_name=algo, save_format="comfyui", **extra)
    path = train(job)
    keys = load_file(str(path))
    # LyCORIS / DoRA modules keep kohya's names in a comfyui file (ComfyUI maps them); plain LoRA would be lora_A/B
    assert {k.split(".")[0] for k in keys} == KOHYA
    assert any(k.endswith(("hada_w1_a", "lokr_w1", "dora_scale")) for k in keys)
    key_map = comfy_key_map(_load(qwen_env / "model").transformer.state_dict())
    assert comfy_not_loaded(keys, key_map) == (840, [])  # ComfyUI loads every key of the file
    assert _changes_images(qwen_env, path, job) > 1e-4


def test_per_pair_average_and_presets(qwen_env, tmp_path):
    avg = train(_job(qwen_env, tmp_path, "addift", per_pair_average=True, output_name="avg"))
    job = _job(qwen_env, tmp_path, "standard", output_name="with_preset",
               preset_loras=[{"path": str(avg), "multiplier": 0.5}])
    out = train(job)
    averaged = load_file(str(avg))
    assert {k.split(".")[0] for k in averaged} == KOHYA == {k.split(".")[0] for k in load_file(str(out))}
    assert max(float(v.abs().max()) for k, v in averaged.items() if k.endswith("lora_up.weight")) > 0


def test_low_vram_keys_give_the_same_lora(qwen_env, tmp_path):
    """Cached text-encoder outputs (Qwen2.5-VL freed), 50 blocks swapped and per-block checkpointing change where
    things are, not the maths; qwen_shift sampling runs too."""
    base = dict(max_train_steps=2, timestep_sampling="qwen_shift")
    plain = load_file(str(train(_job(qwen_env, tmp_path / "a", "standard", **base))))
    low = train(_job(qwen_env, tmp_path / "b", "standard", cache_text_encoder_outputs=True,
                     network_train_unet_only=True, blocks_to_swap=50, gradient_checkpointing=True, **base))
    low = load_file(str(low))
    assert plain.keys() == low.keys()
    assert max(float((plain[k] - low[k]).abs().max()) for k in plain) < 1e-5
    assert any(float(plain[k].abs().max()) > 0 for k in plain if "lora_up" in k)


def test_fp8_base_trains_a_lora_close_to_full_precision(qwen_env, tmp_path):
    """fp8_base: block weights stored in float8_e4m3fn (bf16 compute); the trained LoRA stays near fp32's."""
    full = load_file(str(train(_job(qwen_env, tmp_path / "a", "standard"))))
    fp8 = load_file(str(train(_job(qwen_env, tmp_path / "b", "standard", fp8_base=True))))
    model = _load(qwen_env / "model", fp8_base=True)
    assert model.transformer.transformer_blocks[0].attn.to_q.weight.dtype == torch.float8_e4m3fn
    assert model.transformer.transformer_blocks[0].attn.to_q(torch.ones(1, 16, dtype=torch.bfloat16)).isfinite().all()
    ups = [k for k in full if k.endswith("lora_up.weight")]
    rel = max(float((full[k].float() - fp8[k].float()).norm() / full[k].float().norm().clamp_min(1e-12)) for k in ups)
    assert 0 < rel < 0.5, rel


def test_other_families_keys_are_refused(qwen_env, tmp_path, tiny_sd1_dir):
    with pytest.raises(UserError, match="guidance_scale does not apply to Qwen-Image"):
        train(_job(qwen_env, tmp_path, "standard", guidance_scale=2.0))
    sd_job = _job(qwen_env, tmp_path, "standard", model=str(tiny_sd1_dir), vae="some/qwen_image_vae.safetensors",
                  resolution=16)
    with pytest.raises(UserError, match="vae applies to .*Qwen-Image-Edit models only; this model is Stable Diffusion"):
        train(sd_job)
    assert not (tmp_path / "standard.safetensors").exists()


def test_tools_take_qwen_image_files(qwen_env, tmp_path, run_cli):
    """merge into the model, merge, svd-merge, resize, extract and inspect on a trained Qwen-Image LoRA."""
    lora = train(_job(qwen_env, tmp_path, "standard", network_dim=4))
    code, out, err = run_cli("inspect", lora)
    assert code == 0, err
    assert "840" in out
    code, _, err = run_cli("resize", "--model", lora, "--new-rank", "2", "--save-to", tmp_path / "r2.safetensors")
    assert code == 0, err
    code, _, err = run_cli("merge", "--models", lora, tmp_path / "r2.safetensors", "--ratios", "0.5", "0.5",
                           "--save-to", tmp_path / "m.safetensors")
    assert code == 0, err
    code, _, err = run_cli("svd-merge", "--models", lora, tmp_path / "r2.safetensors", "--ratios", "1", "1",
                           "--new-rank", "4", "--save-to", tmp_path / "s.safetensors")
    assert code == 0, err
    merged = tmp_path / "merged"
    code, _, err = run_cli("merge", "--models", lora, "--model", qwen_env / "model", "--save-to", merged)
    assert code == 0, err
    code, _, err = run_cli("extract", "--model-org", qwen_env / "model", "--model-tuned", merged, "--dim", "4",
                           "--save-to", tmp_path / "x.safetensors")
    assert code == 0, err
    base = _load(qwen_env / "model")
    net = network_from_file(base, lora, 1.0)
    net.fuse(1.0)
    fused = base.transformer.state_dict()
    written = _load(merged).transformer.state_dict()
    assert max(float((fused[k] - written[k]).abs().max()) for k in fused) < 1e-5
    extracted = {k.split(".")[0] for k in load_file(str(tmp_path / "x.safetensors"))}
    assert extracted == KOHYA  # the extracted LoRA has the trained modules' names
