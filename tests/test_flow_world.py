"""The flow world (`difflora toy train-base --world flow`) on a microscopic schedule: a resumed run matches an
uninterrupted one, the folder loads through the zimage family and generates, a LoRA trained on it carries
Z-Image's kohya names, and an edit (Omni-layout) forward puts the loss on the target's tokens only."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from difflora.toy import faces, flow_model
from difflora.toy.train_flow import FlowTrainConfig, train_flow

# The shipped run's later phases from step 1 here (contrast pairs of any attribute: 4 edit triples may hold no
# mouth change), so the resumed run below also repeats their draws.
MICRO = FlowTrainConfig(n_images=6, n_edit_pairs=4, steps=4, batch=2, edit_batch=2, edit_every=1, warmup=2,
                        checkpoint_every=2, transformer=flow_model.transformer_config(dim=32, n_layers=2,
                                                                                      n_refiner_layers=1, n_heads=2),
                        contrast_attributes=tuple(faces.CAPTION_ORDER),
                        phases=[{"from_step": 1, "region_overlap": "sum", "edit_loss_region_weighted": True,
                                 "contrast_pairs": 2, "contrast_loss_weight": 1.0}])
KOHYA_COMFY = set((Path(__file__).parent / "data" / "zimage_keys" / "zimage_kohya_comfy.txt").read_text().split())


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "transformer" / "diffusion_pytorch_model.safetensors")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow_world")
    full = train_flow(root / "full_out", root / "full_work", MICRO)
    return root, full


def test_resumed_flow_training_matches_uninterrupted(trained):
    from difflora.toy.train_flow import FlowTrainer

    root, full = trained

    def run(steps):  # the training stage alone (no export), in one work folder
        trainer = FlowTrainer(root / "part_work", replace(MICRO, steps=steps))
        transformer, _ = trainer.train(*trainer.cache_latents(trainer.load_vae()))
        return transformer.state_dict()

    early = run(2)  # interrupted after 2 steps (the latent cache is reused), then resumed to 4
    resumed, a = run(4), _weights(full)
    assert a.keys() == resumed.keys()
    assert max((a[k] - resumed[k]).abs().max().item() for k in a) < 1e-5
    assert max((a[k] - early[k]).abs().max().item() for k in a) > 1e-4  # the steps after the restart moved it


def test_flow_folder_loads_as_zimage_base_and_generates_faces_size(trained):
    from difflora.models import load_model
    from difflora.models.zimage.model import ZImageModel

    _, full = trained
    model = load_model(full)  # no zimage_variant given: the folder records "base"
    assert isinstance(model, ZImageModel) and model.variant == "base"
    assert model.resolution == 64 and model.latent_downscale == 4
    assert model.vae.config.shift_factor == 0.0 and model.vae.config.scaling_factor == pytest.approx(0.32811)
    assert json.loads((full / "vae" / "config.json").read_text())["_name_or_path"] == "vae"  # no machine path
    img = model.text_to_image(["a face, red hair"], [1], steps=2)
    assert img.shape == (1, 64, 64, 3) and np.isfinite(img).all()


@pytest.mark.parametrize("which", ["micro", "shipped"])
def test_lora_trained_on_the_flow_model_carries_zimage_kohya_names(trained, tmp_path, which):
    from conftest import _write_pairs
    from difflora.config import JobConfig, apply_method_defaults
    from difflora.network.adapters import by_module
    from difflora.toy.worlds import WORLDS
    from difflora.train.loop import train

    full = trained[1] if which == "micro" else Path(WORLDS["flow"].model_path(None))
    _write_pairs(tmp_path / "pairs", 2, 64)
    job = apply_method_defaults(JobConfig.model_validate({
        "model": str(full), "method": "standard", "resolution": 64, "train_batch_size": 2, "max_train_steps": 1,
        "output_dir": str(tmp_path / "lora"), "output_name": "lora", "log_with": "none", "seed": 1,
        "datasets": [{"subsets": [{"image_dir": str(tmp_path / "pairs"), "caption_extension": ".txt"}]}]}))
    names = set(by_module(load_file(str(train(job)))))
    assert names and names <= KOHYA_COMFY
    layers = {"micro": 2, "shipped": 4}[which]
    assert {n.split("_")[3] for n in names} == {str(i) for i in range(layers)}  # every layer


def test_edit_forward_puts_the_loss_on_the_target_tokens_only():
    torch.manual_seed(0)
    tok = flow_model.build_tokenizer()
    te = flow_model.build_text_encoder(tok)
    tr = flow_model.build_transformer(MICRO.transformer)
    seen = {}

    def keep(module, args, output):
        output.retain_grad()
        seen["out"] = output

    tr.all_final_layer["2-1"].register_forward_hook(keep)
    segments = [flow_model.encode_segments(tok, te, flow_model.edit_texts(flow_model.instruction("hair", "red")))]
    ref = torch.randn(1, 4, 8, 8, requires_grad=True)
    noisy = torch.randn(1, 4, 8, 8)
    out = flow_model.edit_forward(tr, ref, noisy, torch.tensor([0.3]), segments)
    assert out.shape == noisy.shape
    out.pow(2).mean().backward()
    rows = seen["out"].grad[0].abs().sum(-1) > 0
    assert int(rows.sum()) == 16  # the target's 4x4 patches; the reference's 16 and the captions' get none
    assert ref.grad.abs().sum() > 0  # ...while the reference still conditions the target through attention


def test_tokenizer_keeps_prompt_words_whole_and_wraps_prompts_as_zimage_does():
    from difflora.models.zimage.model import PROMPT_TEMPLATE

    tok = flow_model.build_tokenizer()
    text = "a face, dark skin, blonde hair, gray background, eyes closed, neutral, no glasses, detailed"
    assert len(tok(text).input_ids) == len(text.replace(",", " ,").split())  # one token per word and comma
    assert flow_model.t2i_text("x") == PROMPT_TEMPLATE.format("x")
    assert tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False,
                                   add_generation_prompt=True) == PROMPT_TEMPLATE.format("x")
    ids = tok(flow_model.edit_texts("change to red hair")).input_ids
    assert all(tok.convert_ids_to_tokens(i)[0] in ("<|im_start|>", "<|vision_end|>") for i in ids)


def test_phases_take_effect_from_their_step():
    cfg = FlowTrainConfig()
    assert cfg.at_step(5999).region_loss_weights["mouth"] == 8.0 and cfg.at_step(5999).contrast_pairs == 0
    assert cfg.at_step(6000).region_loss_weights["mouth"] == 32.0 and cfg.at_step(6000).region_overlap == "sum"
    assert cfg.at_step(7000).contrast_pairs == 4 and cfg.at_step(7000).contrast_loss_weight == 0.0
    assert cfg.at_step(8500).contrast_loss_weight == 1.0 and cfg.at_step(8500).region_loss_weights["mouth"] == 32.0


def test_region_weights_take_the_larger_or_the_sum_where_regions_overlap():
    from difflora.toy.train_flow import FlowTrainer

    regions = torch.zeros(1, 3, 2, 2)
    regions[0, 0, 0, 0] = regions[0, 2, 0, 0] = 1  # eyes and glasses overlap at (0, 0)
    regions[0, 1, 1, 1] = 1  # the mouth alone at (1, 1)
    weights = {"eyes": 8.0, "mouth": 32.0, "glasses": 8.0}
    top = FlowTrainer._loss_weight(FlowTrainConfig(region_loss_weights=weights), regions)[0, 0]
    both = FlowTrainer._loss_weight(FlowTrainConfig(region_loss_weights=weights, region_overlap="sum"), regions)[0, 0]
    assert top.tolist() == [[9.0, 1.0], [1.0, 33.0]]
    assert both.tolist() == [[17.0, 1.0], [1.0, 33.0]]


def test_contrast_pairs_share_noise_and_sigma_and_their_captions_differ_in_the_changed_word_only(trained):
    from difflora.toy.train_flow import FlowTrainer

    root, _ = trained
    trainer = FlowTrainer(root / "full_work", MICRO)
    data, attrs, edits = trainer.cache_latents(trainer.load_vae())
    cfg = MICRO.at_step(3)
    captions, noisy, model_t, target, regions = trainer._contrast_pairs(
        cfg, np.random.default_rng(0), torch.Generator().manual_seed(0), data, attrs, edits)
    assert len(captions) == noisy.shape[0] == 2 * cfg.contrast_pairs
    for k in range(0, len(captions), 2):
        assert model_t[k] == model_t[k + 1]
        one_minus_sigma = model_t[k]
        # x_t = (1-σ)·x0 + σ·ε and target = x0 - ε: the same ε when x_t's difference is (1-σ) times the targets'
        torch.testing.assert_close(noisy[k] - noisy[k + 1], one_minus_sigma * (target[k] - target[k + 1]),
                                   atol=1e-5, rtol=1e-5)
        assert (target[k] - target[k + 1]).abs().max() > 1e-3  # two different clean latents
        a, b = set(captions[k].split(", ")), set(captions[k + 1].split(", "))
        assert len(a - b) == len(b - a) == 1  # the changed attribute's phrase, named in both
        assert torch.equal(regions[k], regions[k + 1])


def test_text_to_image_loss_is_the_weighted_error_plus_the_contrast_pairs_difference_error(trained, monkeypatch):
    """t2i = mean(w·(out − target)²) over every row + λ·mean(w_a·((out_a − out_b) − (target_a − target_b))²) over the
    contrast pairs (a, b); the transformer stubbed to 0.5·x_t so its outputs, and the pairs' differences, are known."""
    from difflora.toy.train_flow import FlowTrainer

    root, _ = trained
    cfg = replace(MICRO, edit_batch=0, phases=[{"from_step": 0, "contrast_pairs": 2, "contrast_loss_weight": 3.0}])
    trainer = FlowTrainer(root / "full_work", cfg)
    data, attrs, edits = trainer.cache_latents(trainer.load_vae())
    transformer, te = trainer.build()
    seen = {"targets": [], "weights": []}
    real_noised, real_pairs, real_weight = trainer._noised, trainer._contrast_pairs, FlowTrainer._loss_weight

    def noised(x0, gen):
        out = real_noised(x0, gen)
        seen["targets"].insert(0, out[2])  # the batch's rows come first
        return out

    def pairs(*args):
        out = real_pairs(*args)
        seen["targets"].append(out[3])
        return out

    def stub(transformer, noisy, model_t, caps):
        seen["out"] = 0.5 * noisy
        return seen["out"]

    monkeypatch.setattr(trainer, "_noised", noised)
    monkeypatch.setattr(trainer, "_contrast_pairs", pairs)
    monkeypatch.setattr(FlowTrainer, "_loss_weight", staticmethod(
        lambda c, r: seen["weights"].append(real_weight(c, r)) or seen["weights"][-1]))
    monkeypatch.setattr(flow_model, "t2i_forward", stub)
    t2i, edit = trainer.losses(transformer, te, data, attrs, edits, step=1)
    assert edit is None
    out, target, w = seen["out"], torch.cat(seen["targets"]), seen["weights"][-1]
    b = cfg.batch
    told, want = out[b:][0::2] - out[b:][1::2], target[b:][0::2] - target[b:][1::2]
    expected = (w * (out - target) ** 2).mean() + 3.0 * (w[b:][0::2] * (told - want) ** 2).mean()
    torch.testing.assert_close(t2i, expected, rtol=1e-5, atol=1e-7)
    assert 3.0 * (w[b:][0::2] * (told - want) ** 2).mean() > 1e-3 * t2i  # the contrast term is not negligible
