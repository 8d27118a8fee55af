"""difflora's generation equals diffusers' own LoRA loading; the CLI writes PNGs with parameters."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from difflora.generate import GenerationRequest, generate
from difflora.models import load_model
from difflora.network.apply import network_from_file
from difflora.network.files import save_lora
from difflora.network.lora import LoRANetwork, NetworkSpec


def _random_lora(model, path, conv: bool, seed: int = 0):
    net = LoRANetwork.create(model.lora_targets(conv=conv),
                             NetworkSpec(network_dim=4, network_alpha=2, conv_dim=4 if conv else None, conv_alpha=1))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lora in net.loras():
            lora.lora_up.weight.copy_(torch.randn(lora.lora_up.weight.shape, generator=g) * 0.3)
    save_lora(net.kohya_state_dict(), path, metadata=model.lora_metadata())
    return path


@pytest.mark.parametrize("variant", ["sd1", "sd2"])
@pytest.mark.parametrize("conv", [False, True], ids=["attention", "conv"])
def test_diffusers_load_lora_weights_gives_the_same_image(tmp_path, sd15_layout_dirs, variant, conv):
    from diffusers import StableDiffusionPipeline

    from difflora.models.samplers import make_scheduler

    model_dir = sd15_layout_dirs[variant]
    model = load_model(model_dir)
    lora = _random_lora(model, tmp_path / "l.safetensors", conv)
    net = network_from_file(model, lora, 0.8)
    req = GenerationRequest(prompts=["a face, red hair"], seeds=[7], steps=4, sampler="euler", cfg=3.0, width=64, height=64)
    ours = generate(model, [net], req, output="float")[0]
    net.set_multiplier(0.0)
    ours_base = generate(model, [net], req, output="float")[0]

    pipe = StableDiffusionPipeline.from_pretrained(model_dir, local_files_only=True, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.scheduler = make_scheduler("euler", pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(lora), adapter_name="x")
    pipe.set_adapters(["x"], [0.8])
    theirs = pipe(prompt=["a face, red hair"], generator=torch.Generator().manual_seed(7), num_inference_steps=4,
                  guidance_scale=3.0, height=64, width=64, output_type="np").images[0]
    assert np.abs(ours_base - theirs).max() > 1e-2  # the LoRA matters
    assert np.abs(ours - theirs).max() < 1e-4


def test_generate_cli_writes_pngs_with_parameters_and_a_sweep_grid(tmp_path, tiny_sd1_dir, run_cli):
    model = load_model(tiny_sd1_dir)
    lora = _random_lora(model, tmp_path / "l.safetensors", conv=False)
    out = tmp_path / "out"
    code, stdout, _ = run_cli("generate", "--model", tiny_sd1_dir, "--prompt", "a face, red hair", "--lora",
                              f"{lora}:0.5", "--sweep", "-1,0,1", "--n-images", "2", "--steps", "3", "--out", out)
    assert code == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["000_0_c00_w-1.png", "000_0_c01_w+0.png", "000_0_c02_w+1.png", "000_1_c00_w-1.png",
                     "000_1_c01_w+0.png", "000_1_c02_w+1.png", "000_grid.png"]  # sorted by seed, then multiplier
    info = Image.open(out / "000_0_c00_w-1.png").text
    assert "Seed: 0" in info["parameters"] and "Lora: l:-1" in info["parameters"]
    minus, zero, plus = (np.asarray(Image.open(out / f"000_0_c{c}.png")) for c in ("00_w-1", "01_w+0", "02_w+1"))
    assert (minus != zero).any() and (plus != zero).any()
    # multiplier 0 in a sweep equals a plain generation without the LoRA
    code, _, _ = run_cli("generate", "--model", tiny_sd1_dir, "--prompt", "a face, red hair", "--steps", "3",
                         "--out", tmp_path / "plain")
    assert np.array_equal(zero, np.asarray(Image.open(tmp_path / "plain" / "000_0.png")))


def test_generate_refuses_to_overwrite_without_flag(tmp_path, tiny_sd1_dir, run_cli):
    out = tmp_path / "out"
    args = ("generate", "--model", tiny_sd1_dir, "--prompt", "a face", "--steps", "2", "--out", out)
    assert run_cli(*args)[0] == 0
    before = (out / "000_0.png").read_bytes()
    code, _, err = run_cli(*args[:-2], "--seed", "0", "--negative", "blue", "--out", out)
    assert code == 2 and "already exist" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert (out / "000_0.png").read_bytes() == before  # nothing replaced
    code, _, _ = run_cli(*args[:-2], "--negative", "blue", "--out", out, "--overwrite")
    assert code == 0 and (out / "000_0.png").read_bytes() != before


def test_grid_labels_are_readable_and_titled():
    from difflora.generate import make_grid, weight_label

    assert [weight_label(m) for m in (-1, 0, 1, 0.5)] == ["weight -1", "weight 0", "weight +1", "weight +0.5"]
    tile = np.zeros((64, 64, 3), np.uint8)
    plain = make_grid([[tile] * 3], [weight_label(m) for m in (-1, 0, 1)], scale=2)
    titled = make_grid([[tile] * 3], [weight_label(m) for m in (-1, 0, 1)], scale=2, title="a face  |  LoRA: x")
    assert titled.size[0] == plain.size[0] and titled.size[1] > plain.size[1]  # a title line above the labels
    header = np.asarray(plain)[: plain.size[1] - 128]
    assert header.shape[0] >= 16 and (header < 128).sum() > 100  # label glyphs drawn at a readable size


def test_generate_restores_the_multipliers_it_was_given(tiny_sd1_dir):
    """One scope for multipliers: generate runs at the request's values and leaves every LoRA as it found it."""
    from difflora.generate import lora_multipliers

    model = load_model(tiny_sd1_dir)
    net = LoRANetwork.create(model.lora_targets(), NetworkSpec(network_dim=2, network_alpha=2)).apply_to()
    net.set_multiplier(0.7)
    req = GenerationRequest(prompts=["a face"] * 2, seeds=[1, 1], steps=2, cfg=3.0, multipliers={0: [1.0, -1.0]})
    generate(model, [net], req)
    assert {float(lora.multiplier) for lora in net.loras()} == {0.7}
    with lora_multipliers([net], {0: 0.0}):
        assert {float(lora.multiplier) for lora in net.loras()} == {0.0}
        net.set_multiplier(torch.tensor([2.0, 3.0]))
    assert all(isinstance(lora.multiplier, float) and lora.multiplier == 0.7 for lora in net.loras())
    net.remove()


def test_progress_advances_once_per_denoising_step_of_each_batch(tiny_sd1_dir):
    """The bars of generate/demo/eval are driven by the sampler: total = batches x steps, reached exactly."""
    from difflora.generate import progress_total

    class Counter:
        n = 0

        def update(self, k):
            self.n += k

    model = load_model(tiny_sd1_dir)
    req = GenerationRequest(prompts=["a face"] * 5, seeds=list(range(5)), steps=3, cfg=3.0)
    counter = Counter()
    with_bar = generate(model, [], req, batch_size=2, progress=counter)
    assert progress_total(req, 2) == 9 and counter.n == 9
    assert all(np.array_equal(a, b) for a, b in zip(with_bar, generate(model, [], req, batch_size=2)))
