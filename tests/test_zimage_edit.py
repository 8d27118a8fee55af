"""Edit methods on the Z-Image family (the flow world's Omni-layout edit model): what reaches the transformer, and
edit / edit-slider LoRAs trained on a tiny flow-world folder, through `difflora generate --control`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from difflora.toy import flow_model

TINY = flow_model.transformer_config(dim=32, n_layers=2, n_refiner_layers=1, n_heads=2)
INSTRUCTION = flow_model.instruction("eyes", "closed")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A flow-world folder (random weights, the real layout and marks) and two eyes open -> closed pairs."""
    from difflora.data.instructions import write_instruction
    from difflora.toy import faces
    from difflora.toy.train_flow import write_flow_folder

    root = tmp_path_factory.mktemp("zimage_edit")
    torch.manual_seed(0)
    tok = flow_model.build_tokenizer()
    tr = flow_model.build_transformer(TINY)
    with torch.no_grad():  # diffusers zero-initialises the final layer's modulation: give the output an effect
        for p in tr.parameters():
            if p.dim() == 2 and not p.abs().sum():
                p.normal_(0, 0.05)
    model = write_flow_folder(tr, flow_model.build_text_encoder(tok), tok, root / "model")
    pairs = root / "pairs"
    pairs.mkdir()
    for i in range(2):
        _, _, before, after = faces.make_pair(300 + i, "eyes", "open", "closed")
        Image.fromarray(before).save(pairs / f"{i:03d}.png")
        Image.fromarray(after).save(pairs / f"{i:03d}_after.png")
        write_instruction(pairs / f"{i:03d}.png", INSTRUCTION)
    return model, pairs


def test_control_reaches_the_zimage_transformer_as_an_omni_group(folder):
    """generate's conditioning with a control image: x = [[control latents, target]], noise mask [[0, 1]], the
    instruction in the Omni pipeline's three caption segments; the output equals the flow world's training forward
    (toy/flow_model.edit_forward, negated)."""
    from difflora.models import load_model

    model_dir, pairs = folder
    model = load_model(model_dir)
    assert model.edit and model.max_control_images == 1
    control = Image.open(pairs / "000.png").convert("RGB")
    seen = {}
    model.transformer.register_forward_pre_hook(lambda mod, args, kwargs: seen.update(args=args, kwargs=kwargs),
                                                with_kwargs=True)
    cond = model.encode_with_controls([INSTRUCTION], [[control]])
    noisy = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = model.predict(noisy, torch.tensor([700.0]), cond)
    x, t, caps = seen["args"]
    pixels = torch.from_numpy(np.asarray(control, np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    with torch.no_grad():
        reference = model.encode_images(pixels, sample=False)
    assert len(x) == 1 and len(x[0]) == 2
    assert torch.equal(x[0][0][:, 0], reference[0]) and torch.equal(x[0][1][:, 0], noisy[0])
    assert seen["kwargs"]["image_noise_mask"] == [[0, 1]] and seen["kwargs"]["siglip_feats"] == [None]
    assert float(t) == pytest.approx(0.3)  # Z-Image's clock, 1 - σ
    te, tok = model.text_encoders["text_encoder"], model.tokenizer
    with torch.no_grad():
        want_caps = flow_model.encode_segments(tok, te, flow_model.edit_texts(INSTRUCTION))
        want = -flow_model.edit_forward(model.transformer, reference, noisy, torch.tensor([0.3]), [want_caps])
    assert [c.shape for c in caps[0]] == [c.shape for c in want_caps]
    assert max((a - b).abs().max().item() for a, b in zip(caps[0], want_caps)) < 1e-5
    assert (got - want).abs().max().item() < 1e-5
    without = model.predict(noisy, torch.tensor([700.0]), model.encode_prompts([INSTRUCTION]))
    assert (got - without).abs().max().item() > 1e-3  # the control changes the prediction


def _train(model_dir: Path, pairs: Path, out: Path, method: str) -> Path:
    from difflora.config import JobConfig, apply_method_defaults
    from difflora.train.loop import train

    job = {"model": str(model_dir), "method": method, "resolution": 64, "train_batch_size": 2, "max_train_steps": 2,
           "learning_rate": 5e-2, "network_dim": 2, "network_alpha": 2.0, "output_dir": str(out), "output_name": "e",
           "log_with": "none", "seed": 3, "datasets": [{"subsets": [{"image_dir": str(pairs)}]}]}
    return train(apply_method_defaults(JobConfig.model_validate(job)))


def _cli_image(model_dir: Path, lora: Path | None, weight: float, control: Path, out: Path) -> np.ndarray:
    from difflora.cli import main

    args = ["generate", "--model", str(model_dir), "--prompt", INSTRUCTION, "--control", str(control), "--steps", "3",
            "--seed", "5", "--out", str(out)]
    if lora is not None:
        args += ["--lora", f"{lora}:{weight}"]
    assert main(args) == 0
    (image,) = sorted(out.glob("*.png"))
    return np.asarray(Image.open(image), np.float32)


def _reference_edit(model, lora: Path, weight: float, control: Path) -> np.ndarray:
    """The flow world's own edit sampler (toy/flow_model.sample_edit, what its edit ability is judged with) with the
    LoRA file applied at `weight`."""
    from difflora.network.apply import network_from_file

    net = network_from_file(model, lora, weight)
    pixels = torch.from_numpy(np.asarray(Image.open(control).convert("RGB"), np.float32) / 127.5 - 1)
    with torch.no_grad():
        ref = model.encode_images(pixels.permute(2, 0, 1)[None], sample=False)
        lat = flow_model.sample_edit(model, ref, [INSTRUCTION], [5], steps=3, guidance=4.0)
        img = model.decode_latents(lat).float().clamp(-1, 1)
    net.remove()
    return np.round(((img[0] + 1) / 2).permute(1, 2, 0).numpy() * 255)


@pytest.mark.parametrize("method", ["edit", "edit-slider"])
def test_edit_lora_trained_on_zimage_is_what_generate_control_draws(folder, tmp_path, method):
    """An edit (and edit-slider) LoRA trains on the flow world's Z-Image; `generate --control` with its file draws
    the flow world's own edit sampler's image with that LoRA (at +1, and at -1 for the slider), not the base's."""
    from difflora.models import load_model

    model_dir, pairs = folder
    lora = _train(model_dir, pairs, tmp_path / "lora", method)
    model = load_model(model_dir)
    control = pairs / ("000_after.png" if method == "edit-slider" else "000.png")
    base = _cli_image(model_dir, None, 0.0, control, tmp_path / "base")
    for weight in (1.0, -1.0) if method == "edit-slider" else (1.0,):
        got = _cli_image(model_dir, lora, weight, control, tmp_path / f"w{weight:g}")
        assert np.abs(got - base).max() > 2  # the LoRA changes the edit
        assert np.abs(got - _reference_edit(model, lora, weight, control)).max() <= 1  # uint8 rounding


def test_eval_on_the_flow_world_scores_edit_variants_from_held_out_before_images(folder, tmp_path, monkeypatch):
    """`difflora eval --world flow` (the smallest configuration: the ci suite, one pair, two images, two training
    steps) on a tiny flow world: one row per variant (ADDifT for edit models, the edit slider), each scored from
    held-out 'before' images (0, +1) and their 'after' images (-1), every number a share of the shipped judge's
    readings."""
    import json

    import difflora.toy.judge as judge_module
    from difflora.cli import main
    from difflora.toy import faces

    model_dir, _ = folder
    real = judge_module.load_judge()
    calls = []

    class Recording:
        def predict(self, images):
            calls.append((list(images), real.predict(images)))
            return calls[-1][1]

    monkeypatch.setattr(judge_module, "load_judge", lambda: Recording())
    out = tmp_path / "eval"
    assert main(["eval", "--world", "flow", "--model", str(model_dir), "--suite", "ci", "--method", "addift-control",
                 "--method", "edit-slider", "--m", "2", "--pairs", "1", "--train-seeds", "0",
                 "--set", "max_train_steps=2", "--out", str(out)]) == 0
    result = json.loads((out / "eval.json").read_text())
    assert result["world"] == "flow"
    assert [(c["task"], c["method"], c["world"]) for c in result["cells"]] == [("eyes", "addift-control", "flow"),
                                                                               ("eyes", "edit-slider", "flow")]
    summary = (out / "eval.md").read_text().split("\n\n")[0].splitlines()
    assert len(summary) == 4 and summary[2].startswith("| addift-control | 1 |")
    assert summary[3].startswith("| edit-slider | 1 |")
    assert len(calls) == 5 + 5  # per variant: inputs and outputs judged in turn
    (before, j_before), (_, j_zero), (plus, j_plus), (after, j_after), (_, j_minus) = calls[5:]
    assert [r["eyes"] for r in j_before] == ["open", "open"] and [r["eyes"] for r in j_after] == ["closed"] * 2
    assert all(np.abs(b.astype(int) - a.astype(int)).max() > 0 for b, a in zip(before, after))
    cell = result["cells"][1]
    others = [a for a in faces.CAPTION_ORDER if a != "eyes"]
    assert cell["extra"]["protocol"] == "edit"
    assert cell["edit_success"] == np.mean([r["eyes"] == "closed" for r in j_plus])
    assert cell["base_after_rate"] == np.mean([r["eyes"] == "closed" for r in j_zero])
    assert cell["reverse_success"] == np.mean([r["eyes"] == "open" for r in j_minus])
    assert cell["preservation"] == np.mean([all(p[a] == i[a] for a in others) for p, i in zip(j_plus, j_before)])
    change = np.mean([np.abs(p.astype(float) - b.astype(float)).mean() for p, b in zip(plus, before)]) / 255
    assert 0 < cell["outside_change"] <= 2 * change  # measured against the input image, outside the eyes


@pytest.mark.parametrize("argv", [["demo", "--world", "flow"], ["eval", "--world", "flow"],
                                  ["eval", "--method", "edit"]])
def test_flow_world_commands_without_its_model_stop_in_one_line(tmp_path, capsys, monkeypatch, argv):
    """An install without the flow world's model (its assets folder missing): `--world flow` without --model says so
    (exit 2, nothing written); an edit variant on the sd world is refused the same way."""
    from dataclasses import replace

    from difflora.cli import main
    from difflora.toy import worlds

    monkeypatch.setitem(worlds.WORLDS, "flow", replace(worlds.WORLDS["flow"], asset=tmp_path / "no_toy_flow"))

    out = tmp_path / "out"
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert ("flow world's model is not installed; pass --model FOLDER" in err if "flow" in argv
            else "--method edit needs a base model that edits (--world flow)" in err)
    assert not out.exists()
