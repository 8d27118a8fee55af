"""Edit models: per-pair instructions, the edit methods' losses on numbers, control images through the families."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from difflora.data.instructions import instruction_path, read_instruction, write_instruction
from difflora.errors import UserError


def test_instruction_file_next_to_the_before_image(tmp_path):
    before = tmp_path / "cat.png"
    assert instruction_path(before) == tmp_path / "cat.instruction.txt"
    assert read_instruction(before) is None
    write_instruction(before, "  make the fur orange \n")
    assert (tmp_path / "cat.instruction.txt").read_text(encoding="utf-8") == "make the fur orange\n"
    assert read_instruction(before) == "make the fur orange"
    with pytest.raises(UserError, match="one line"):
        write_instruction(before, "two\nlines")
    assert read_instruction(before) == "make the fur orange"  # a refused write leaves the file as it was
    write_instruction(before, "   ")
    assert not instruction_path(before).exists() and read_instruction(before) is None


# ------------------------------------------------------------------ the losses on numbers
class _EditModel:
    """A stand-in edit model: velocity = 0.5·z + 0.25·control + m (m: the LoRA's multiplier), flow matching."""

    max_control_images, controls_reach_text_encoder = 1, False

    def __init__(self):
        from difflora.models.objectives import FlowMatchingObjective

        self.objective, self.m = FlowMatchingObjective(1000), 0.0

    def control_conditioning(self, controls):
        from difflora.models.base import Conditioning

        return Conditioning({"control": controls[0]})

    def predict(self, noisy, t, cond):
        return 0.5 * noisy + 0.25 * cond.tensors["control"] + self.m


class _Multiplier:
    def __init__(self, model):
        self.model = model

    def set_multiplier(self, m):
        self.model.m = float(m)


def _slider_context(step: int, preserve: float):
    from types import SimpleNamespace

    from difflora.methods.base import Batch, StepContext
    from difflora.models.base import Conditioning

    model = _EditModel()
    b = torch.tensor([[[[0.2, -0.4], [1.0, 0.0]]]])  # before
    a = torch.tensor([[[[0.2, 0.6], [-1.0, 0.0]]]])  # after: differs from before in two cells
    eps = torch.tensor([[[[0.5, 0.1], [-0.3, 0.7]]]])
    mask = torch.tensor([[[[1.0, 1.0], [1.0, 0.0]]]])  # the two cells, dilated onto a third
    batch = Batch(latents={"x": b, "after": a}, captions={"instruction": ["close the eyes"]}, noise=eps,
                  timesteps=torch.tensor([400.0]), loss_weight=torch.ones(1), step=step, mask_fn=lambda *_: mask)
    job = SimpleNamespace(min_snr_gamma=0, **{"edit-slider": SimpleNamespace(
        multiplier=0.5, preserve_weight=preserve, diff_mask_threshold=10.0, diff_mask_dilate=2, prompt="instruction")})
    ctx = StepContext(model=model, network=_Multiplier(model), job=job, step=step,
                      encode=lambda prompts: Conditioning({"txt": torch.zeros(len(prompts), 1)}))
    return ctx, batch


def test_edit_slider_loss_is_its_formula():
    """README: even steps mean(M·(v_{+m}(q(a)|b) - (ε - a))²) + λ·mean((1-M)·(v_{+m} - f)²); odd steps the same with
    a and b swapped at -m. With v_m = 0.5·z + 0.25·c + m: σ = 0.4, m = 0.5, λ = 2, numbers worked by hand."""
    from difflora.methods.edit import edit_slider_loss

    # even: z = 0.6·a + 0.4·ε = [[0.32, 0.40], [-0.72, 0.28]]; v = 0.5z + 0.25b + 0.5 = [[0.71, 0.6], [0.39, 0.64]];
    # ε - a = [[0.3, -0.5], [0.7, 0.7]]; in the mask: 0.41² + 1.1² + 0.31² = 0.1681 + 1.21 + 0.0961 = 1.4742 -> /4;
    # outside it (one cell) v - f = m = 0.5: 0.25 -> /4, ·λ
    ctx, batch = _slider_context(0, 2.0)
    assert float(edit_slider_loss(ctx, batch)[0]) == pytest.approx(1.4742 / 4 + 2.0 * 0.25 / 4, abs=1e-6)
    # odd: z = 0.6·b + 0.4·ε = [[0.32, -0.2], [0.48, 0.28]]; v = 0.5z + 0.25a - 0.5 = [[-0.29, -0.45], [-0.51, -0.36]];
    # ε - b = [[0.3, 0.5], [-1.3, 0.7]]; in the mask: 0.59² + 0.95² + 0.79² = 0.3481 + 0.9025 + 0.6241 = 1.8747 -> /4;
    # outside: m² again
    ctx, batch = _slider_context(1, 2.0)
    assert float(edit_slider_loss(ctx, batch)[0]) == pytest.approx(1.8747 / 4 + 2.0 * 0.25 / 4, abs=1e-6)
    ctx, batch = _slider_context(1, 0.0)  # no preservation: the mask's cells alone
    assert float(edit_slider_loss(ctx, batch)[0]) == pytest.approx(1.8747 / 4, abs=1e-6)


# ------------------------------------------------------------------ trained edit LoRAs in diffusers' edit pipelines
def _pairs(folder: Path, side: int, n: int = 2) -> Path:
    """n face pairs (eyes open -> closed) of side x side pixels, each with its instruction file."""
    from difflora.toy import faces as F

    folder.mkdir(parents=True)
    for i in range(n):
        _, _, before, after = F.make_pair(200 + i, "eyes", "open", "closed")
        Image.fromarray(before).resize((side, side), Image.BILINEAR).save(folder / f"{i:03d}.png")
        Image.fromarray(after).resize((side, side), Image.BILINEAR).save(folder / f"{i:03d}_after.png")
        write_instruction(folder / f"{i:03d}.png", "close the eyes")
    return folder


def _train_edit(model_dir: Path, pairs: Path, out: Path, method: str, **keys) -> Path:
    from difflora.config import JobConfig, apply_method_defaults
    from difflora.train.loop import train

    job = {"model": str(model_dir), "method": method, "resolution": 32, "train_batch_size": 1, "max_train_steps": 2,
           "learning_rate": 2e-2, "network_dim": 2, "network_alpha": 2.0, "output_dir": str(out), "output_name": "e",
           "log_with": "none", "seed": 3, "datasets": [{"subsets": [{"image_dir": str(pairs)}]}], **keys}
    return train(apply_method_defaults(JobConfig.model_validate(job)))


def _difflora_control_image(model, lora_path: Path, control: Path, prompt: str, **req) -> np.ndarray:
    from difflora.generate import GenerationRequest, control_images, generate
    from difflora.network.apply import network_from_file

    lora = network_from_file(model, lora_path)
    try:
        return generate(model, [lora], GenerationRequest([prompt], [3], controls=[control_images(model, [control])],
                                                         **req), output="float")[0]
    finally:
        lora.remove()


@pytest.fixture(scope="module")
def klein_folder(tmp_path_factory) -> Path:
    """A tiny FLUX.2 klein 4B folder, shared by the tests that only read it."""
    from difflora.models.flux2.tiny import write_tiny

    return write_tiny(tmp_path_factory.mktemp("klein") / "m", "klein-4b")["folder"]


def test_flux2_edit_slider_file_in_flux2_klein_pipeline_equals_generate_control(tmp_path, klein_folder):
    """An edit slider trained on tiny FLUX.2 klein: Flux2KleinPipeline(image=...) + load_lora_weights gives the image
    `generate --control` gives, at +1 and at -1 (the reverse edit)."""
    from diffusers import Flux2KleinPipeline

    from difflora.models import load_model

    folder = klein_folder
    pairs = _pairs(tmp_path / "pairs", 64)  # the pipeline's smallest reference image; trained at 32
    path = _train_edit(folder, pairs, tmp_path / "out", "edit-slider")
    model = load_model(folder)
    control = pairs / "000.png"
    pipe = Flux2KleinPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    call = dict(prompt="close the eyes", height=32, width=32, num_inference_steps=2, guidance_scale=4.0,
                output_type="np")
    without = pipe(image=Image.open(control).convert("RGB"), generator=torch.Generator().manual_seed(3), **call)
    pipe.load_lora_weights(str(path), adapter_name="edit")
    for weight in (1.0, -1.0):
        pipe.set_adapters(["edit"], [weight])
        want = pipe(image=Image.open(control).convert("RGB"), generator=torch.Generator().manual_seed(3),
                    **call).images[0]
        model_req = dict(steps=2, cfg=4.0, multipliers={0: [weight]}, width=32, height=32)
        got = _difflora_control_image(model, path, control, "close the eyes", **model_req)
        assert np.abs(want - without.images[0]).max() > 1e-3  # the LoRA changes the edit
        assert np.abs(got - want).max() <= 1e-4, weight


def _qwen_vl_processor(folder: Path):
    """transformers' Qwen2VLProcessor over the folder's PIL image processor and tokenizer: its constructor demands
    a video processor, which needs torchvision (not installable here), so the object is made without it; its
    __call__ (what the edit pipelines use: text and images) needs none."""
    from transformers import Qwen2VLProcessor, Qwen2Tokenizer

    from difflora.models.qwen_image.tiny import tiny_image_processor

    tok = Qwen2Tokenizer.from_pretrained(folder / "processor")
    proc = Qwen2VLProcessor.__new__(Qwen2VLProcessor)
    proc.image_processor, proc.tokenizer, proc.video_processor, proc.chat_template = tiny_image_processor(), tok, None, None
    proc.image_token, proc.video_token = "<|image_pad|>", "<|video_pad|>"
    proc.image_token_id, proc.video_token_id = (tok.convert_tokens_to_ids(t) for t in (proc.image_token, proc.video_token))
    return proc


def test_qwen_image_edit_file_in_qwen_image_edit_pipeline_equals_generate_control(tmp_path, monkeypatch):
    """An edit LoRA trained on tiny Qwen-Image-Edit: QwenImageEditPipeline(image=...) + load_lora_weights gives the
    image `generate --control` gives. Both sides size the reference at a 64² area instead of 1024² (the tiny VAE
    takes 30 s for a 1024² image on one thread), and the control is 64² (no resampling on either side)."""
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit as edit_pipeline
    from diffusers import QwenImageEditPipeline

    import difflora.models.qwen_image.model as qwen
    from difflora.models import load_model
    from difflora.models.qwen_image.tiny import write_tiny_folder

    area = 64 * 64
    real_dimensions = edit_pipeline.calculate_dimensions
    monkeypatch.setattr(edit_pipeline, "calculate_dimensions", lambda _area, ratio: real_dimensions(area, ratio))
    monkeypatch.setattr(qwen, "EDIT_IMAGE_AREA", area)
    folder = write_tiny_folder(tmp_path / "m", "edit", num_layers=4)
    pairs = _pairs(tmp_path / "pairs", 64, n=1)
    path = _train_edit(folder, pairs, tmp_path / "out", "edit")
    model = load_model(folder)
    control = pairs / "000.png"
    pipe = QwenImageEditPipeline.from_pretrained(folder, processor=_qwen_vl_processor(folder), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    call = dict(prompt="close the eyes", height=32, width=32, num_inference_steps=2, true_cfg_scale=1.0,
                output_type="np")
    without = pipe(image=Image.open(control).convert("RGB"), generator=torch.Generator().manual_seed(3), **call)
    pipe.load_lora_weights(str(path))
    want = pipe(image=Image.open(control).convert("RGB"), generator=torch.Generator().manual_seed(3), **call).images[0]
    got = _difflora_control_image(model, path, control, "close the eyes", steps=2, cfg=1.0, width=32, height=32)
    assert np.abs(want - without.images[0]).max() > 1e-3  # the LoRA changes the edit
    assert np.abs(got - want).max() <= 1e-4


def test_flux_kontext_edit_slider_file_in_flux_kontext_pipeline_equals_generate_control(tmp_path, monkeypatch):
    """An edit slider trained on tiny FLUX.1 Kontext (a FluxKontextPipeline folder, FLUX.1-dev's block names):
    FluxKontextPipeline(image=...) + load_lora_weights gives the image `generate --control` gives, at +1 and -1. The
    control (72x56) is resized by both to the preferred Kontext size nearest its aspect ratio, with Lanczos; both
    sides' preferred sizes are small ones (the tiny VAE takes seconds per 1024² image on one thread). Saved for
    diffusers (save_format): its converter of kohya FLUX files assumes FLUX.1's full widths."""
    import diffusers.pipelines.flux.pipeline_flux_kontext as kontext_pipeline
    from diffusers import FluxKontextPipeline

    import difflora.models.flux.model as flux
    from difflora.models import load_model
    from difflora.toy.tiny_flux import build_tiny_flux

    sizes = [(48, 80), (64, 64), (80, 48), (64, 48)]  # (width, height); 72x56 is nearest 64x48
    monkeypatch.setattr(kontext_pipeline, "PREFERRED_KONTEXT_RESOLUTIONS", sizes)
    monkeypatch.setattr(flux, "KONTEXT_RESOLUTIONS", tuple(sizes))
    folder = tmp_path / "kontext"
    build_tiny_flux("kontext", 1, 1).save(folder)
    pairs = _pairs(tmp_path / "pairs", 64)
    path = _train_edit(folder, pairs, tmp_path / "out", "edit-slider", save_format="diffusers")
    model = load_model(folder)
    assert model.kontext and model.max_control_images == 1
    control = tmp_path / "control.png"
    Image.open(pairs / "000.png").convert("RGB").resize((72, 56), Image.BILINEAR).save(control)
    assert control_images_size(model, control) == (64, 48)
    pipe = FluxKontextPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    call = dict(prompt="close the eyes", height=32, width=32, max_area=32 * 32, num_inference_steps=2,
                guidance_scale=3.5, output_type="np")
    without = pipe(image=Image.open(control).convert("RGB"), generator=torch.Generator().manual_seed(3), **call)
    pipe.load_lora_weights(str(path), adapter_name="edit")
    for weight in (1.0, -1.0):
        pipe.set_adapters(["edit"], [weight])
        want = pipe(image=Image.open(control).convert("RGB"), generator=torch.Generator().manual_seed(3),
                    **call).images[0]
        got = _difflora_control_image(model, path, control, "close the eyes", steps=2, multipliers={0: [weight]},
                                      width=32, height=32)
        assert np.abs(want - without.images[0]).max() > 1e-3  # the LoRA changes the edit
        assert np.abs(got - want).max() <= 1e-4, weight


def control_images_size(model, path: Path) -> tuple[int, int]:
    from difflora.generate import control_images

    return control_images(model, [path])[0].size


def test_model_variant_kontext_loads_a_single_file_as_kontext_and_other_families_refuse_it(tmp_path, caplog):
    """A FLUX.1 Kontext single file has FLUX.1-dev's keys: model_variant = "kontext" says it (a file named *kontext*
    without it loads as dev, with a warning); the shared key's values belong to their families."""
    from difflora.models import load_model
    from difflora.models.registry import family_options, plugin_for
    from difflora.toy.tiny_flux import build_tiny_flux

    build_tiny_flux("kontext", 1, 1).save(tmp_path / "flux1-kontext-tiny.safetensors")
    path = tmp_path / "flux1-kontext-tiny.safetensors"
    kontext = load_model(path, options={"model_variant": "kontext"})
    assert kontext.kontext and kontext.max_control_images == 1
    assert kontext.modelspec_architecture == "flux-1-kontext-dev/lora"
    with caplog.at_level("WARNING"):
        dev = load_model(path)
    assert not dev.kontext and dev.max_control_images == 0
    assert sum('model_variant = "kontext"' in r.getMessage() for r in caplog.records) == 1
    with pytest.raises(UserError, match="model_variant = 'kontext' is not a Qwen-Image"):
        family_options(plugin_for("qwen_image"), {"model_variant": "kontext"})
    with pytest.raises(UserError, match="model_variant = 'edit' is not a FLUX.1 model"):
        family_options(plugin_for("flux"), {"model_variant": "edit"})
    with pytest.raises(UserError, match="model_variant applies to FLUX.1 / Qwen-Image.* models only"):
        family_options(plugin_for("sd1"), {"model_variant": "kontext"})
    assert family_options(plugin_for("qwen_image"), {"model_variant": "edit_2509"}).model_variant == "edit_2509"


# ------------------------------------------------------------------ several control images per pair
def _add_references(pairs: Path, n: int, names=None) -> None:
    """NAME_ref1.png ... NAME_refn.png next to each before image (another colour each, so their latents differ)."""
    for before in sorted(pairs.glob("*.png")):
        if before.stem.endswith("_after") or "_ref" in before.stem or (names and before.stem not in names):
            continue
        for i in range(1, n + 1):
            Image.new("RGB", Image.open(before).size, (60 * i, 200 - 50 * i, 90)).save(pairs / f"{before.stem}_ref{i}.png")


def test_flux2_edit_takes_each_pairs_reference_images_after_the_before_image(tmp_path, monkeypatch, klein_folder):
    """A pair with NAME_ref1.png and NAME_ref2.png trains FLUX.2 klein with three reference token groups after the
    target's: the before image at t = 10, ref1 at 20, ref2 at 30 (the pipelines' ids), each the clean latent of its
    own file; the reference files are not training items themselves."""
    from difflora.train import loop

    folder = klein_folder
    pairs = _pairs(tmp_path / "pairs", 32)
    _add_references(pairs, 2)
    seen, runs = [], []
    real_prepare = loop.prepare

    def prepare(*args, **kwargs):  # the run's model: record what its transformer receives
        run = real_prepare(*args, **kwargs)
        runs.append(run)
        run.model.transformer.register_forward_pre_hook(
            lambda _m, _a, kw: seen.append((kw["hidden_states"].detach(), kw["img_ids"].detach())), with_kwargs=True)
        return run

    monkeypatch.setattr(loop, "prepare", prepare)
    _train_edit(folder, pairs, tmp_path / "out", "edit", max_train_steps=1, train_batch_size=2)
    data = runs[0].data
    assert sorted(it.path.name for it in data.unique_items()) == ["000.png", "001.png"]
    assert [p.name for p in data.unique_items()[0].ref_paths] == ["000_ref1.png", "000_ref2.png"]
    tokens, ids = seen[0]
    ids = ids[0] if ids.dim() == 3 else ids
    groups = sorted({float(t) for t in ids[:, 0]})
    assert groups == [0.0, 10.0, 20.0, 30.0]
    per_group = [(ids[:, 0] == g).nonzero()[:, 0] for g in groups]
    assert len({len(g) for g in per_group}) == 1  # the tests' controls have the target's size
    items = {it.path.name: it for it in data.unique_items()}
    for row in range(tokens.shape[0]):
        match = [name for name, it in items.items()
                 if torch.allclose(tokens[row, per_group[1]].T.reshape(it.latents["x"].shape), it.latents["x"])]
        assert len(match) == 1, row
        it = items[match[0]]
        for g, key in ((2, "ref1"), (3, "ref2")):
            got = tokens[row, per_group[g]].T.reshape(it.latents[key].shape)
            assert torch.allclose(got, it.latents[key]), (row, key)
        assert not torch.allclose(it.latents["ref1"], it.latents["ref2"])


def test_more_control_images_than_the_family_takes_exit_2_naming_the_pair(tmp_path, run_cli):
    """FLUX.1 Kontext takes one control image: a pair with NAME_ref1.png is refused before training with one line
    naming it; pairs with unequal numbers of references (one batch packs one number) likewise."""
    from difflora.toy.tiny_flux import build_tiny_flux

    build_tiny_flux("kontext", 1, 1).save(tmp_path / "kontext")
    pairs = _pairs(tmp_path / "pairs", 32)
    _add_references(pairs, 1, names={"001"})
    job = tmp_path / "job.toml"
    job.write_text(f'model = "{(tmp_path / "kontext").as_posix()}"\nmethod = "edit"\nresolution = 32\n'
                   f'output_dir = "{(tmp_path / "out").as_posix()}"\nlog_with = "none"\n'
                   f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{pairs.as_posix()}"\n', encoding="utf-8")
    code, _, err = run_cli("train", job)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1, err
    assert "001.png" in lines[0] and "2 control images" in lines[0] and "at most 1" in lines[0], lines[0]
    assert not list(tmp_path.glob("out/*.safetensors"))


def test_flux2_control_over_1024_squared_is_resized_as_the_klein_pipeline_resizes_it(klein_folder, monkeypatch):
    """generate --control on FLUX.2: an image over 1024² pixels is brought down with Lanczos to that area and cut
    (not resampled) to multiples of 16, the pixels Flux2KleinPipeline hands its VAE (captured there)."""
    from diffusers import Flux2KleinPipeline

    from difflora.data.images import to_tensor
    from difflora.models import load_model

    rng = np.random.default_rng(5)
    image = Image.fromarray(rng.integers(0, 256, (1000, 1130, 3), dtype=np.uint8))  # 1130 x 1000: over 1024²
    pipe = Flux2KleinPipeline.from_pretrained(klein_folder, local_files_only=True)
    handed = []

    class Captured(Exception):
        pass

    def capture(images, **_):
        handed.extend(images)
        raise Captured

    monkeypatch.setattr(pipe, "prepare_image_latents", capture)
    with pytest.raises(Captured):
        pipe(image=image, prompt="a face", height=32, width=32, num_inference_steps=1, output_type="np")
    ours = load_model(klein_folder).resize_control(image)
    assert ours.size == (1088, 960) and tuple(handed[0].shape[-2:]) == (960, 1088)
    assert torch.allclose(to_tensor(ours), handed[0][0].float(), atol=1e-6)


def test_samples_during_edit_training_edit_a_before_image_or_the_prompts_own_control(tmp_path, monkeypatch):
    """An edit job's samples: a prompt without --ci edits a pair's before image (prompt i the i-th pair, held-out
    first: here the one validation pair), a prompt with `--ci FILE` (relative to the prompt file) edits that file;
    both resized as the pipeline does, at the prompt's multiplier."""
    import difflora.models.flux.model as flux
    from difflora.toy.tiny_flux import build_tiny_flux
    from difflora.train import loop, sampling

    monkeypatch.setattr(flux, "KONTEXT_RESOLUTIONS", ((32, 32),))  # the tiny VAE at the training size
    build_tiny_flux("kontext", 1, 1).save(tmp_path / "kontext")
    pairs = _pairs(tmp_path / "pairs", 40, n=3)
    Image.new("RGB", (48, 40), (10, 200, 30)).save(tmp_path / "other.png")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("close the eyes --m -1 --s 1\nclose the eyes --ci other.png --s 1\n", encoding="utf-8")
    seen = []
    real = flux.FluxModel.generate_request

    def record(self, networks, req, *args, **kwargs):
        seen.append((req.controls, req.multipliers[0][0]))
        return real(self, networks, req, *args, **kwargs)

    monkeypatch.setattr(flux.FluxModel, "generate_request", record)
    runs, real_prepare = [], loop.prepare
    monkeypatch.setattr(loop, "prepare", lambda *a, **kw: runs.append(real_prepare(*a, **kw)) or runs[-1])
    emitted, real_event = [], sampling.SampleWritten
    monkeypatch.setattr(sampling, "SampleWritten", lambda **kw: emitted.append(kw) or real_event(**kw))
    _train_edit(tmp_path / "kontext", pairs, tmp_path / "out", "edit", max_train_steps=1, sample_at_first=True,
                sample_prompts=str(prompts), validation_split=0.34)
    (held_out,) = [it.path for it in runs[0].data.validation_items]
    # the event names each prompt's control, so the UI's Live page can draw before -> after
    assert [[Path(p).resolve() for p in ps] for ps in emitted[0]["control"]] == \
        [[Path(held_out).resolve()], [(tmp_path / "other.png").resolve()]]
    assert len(seen) >= 2 and all(c is not None for c, _ in seen)
    (first, m_first), (second, _) = seen[:2]
    assert m_first == -1.0
    want = {"first": Image.open(held_out).convert("RGB").resize((32, 32), Image.LANCZOS),
            "second": Image.open(tmp_path / "other.png").convert("RGB").resize((32, 32), Image.LANCZOS)}
    assert np.array_equal(np.asarray(first[0][0]), np.asarray(want["first"]))
    assert np.array_equal(np.asarray(second[0][0]), np.asarray(want["second"]))
