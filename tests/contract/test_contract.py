"""The contract between the training runner and every family, adapter and method, checked at the denoiser.

In the style of diffusers' PeftLoraLoaderMixinTests: parametrised from the registries themselves
(`models.registry.family_names()`, `network.adapters.ALGO_NAMES`, `methods.METHODS`), so a family, adapter or
method added later is covered by adding it to its registry (a family also needs its `TinyFamily` entry in
tiny_families.py, which `test_every_registered_family_takes_part` demands).

What each training step's denoiser forward really receives is recorded by a forward pre-hook and checked against
the step's assembled batch and the stage that runs:

- every input row is the noised latent of an image of one of the stage's items (per-pair stages: that pair only),
  with the batch's noise, at the batch's timestep, inside the job's timestep window;
- its text (and pooled text) is an encoding of one of that item's captions;
- the family's own per-sample conditioning (SDXL's time_ids of that image's size, FLUX's guidance);
- the multiplier: per sample, non-zero on a trained prediction, zero on a frozen one; earlier stages' networks at
  1 where the stage keeps them active, else 0.

Then: the saved file, loaded onto a fresh model, gives the output the trained network gave in memory; the client's
own loader (diffusers `load_lora_weights`) gives it too where the family has one; stopping and resuming gives the
uninterrupted run's LoRA. Cross product (1-2 steps each, tiny models): every method on every family with LoRA,
every adapter on every family with the standard method, a per-pair average on every family.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from difflora.config import JobConfig, apply_method_defaults
from difflora.errors import TrainingStopped
from difflora.methods import METHODS
from difflora.methods.base import common_caption
from difflora.models.registry import family_names
from difflora.network.adapters import ALGO_NAMES
from difflora.network.apply import network_from_file
from difflora.train.loop import train
from difflora.train.stop import StopRequest
from tiny_families import ALL_TINY, EDIT_FAMILIES, TEST_FAMILIES, TINY_FAMILIES

FAMILIES = family_names() + tuple(TEST_FAMILIES)  # test-only ones: registered_test_families
VARIANTS = tuple(name for name, spec in TINY_FAMILIES.items() if spec.variant_of)  # e.g. FLUX.2 dev, klein-9B
# a variant trains each method once, each with another adapter: every method and every adapter in as many runs as
# methods (the edit methods run on the families' edit models, EDIT_FAMILIES)
VARIANT_METHODS = [name for name, m in METHODS.items() if not m.needs_control]
VARIANT_RUNS = list(zip(VARIANT_METHODS, (list(ALGO_NAMES) * len(VARIANT_METHODS))[: len(VARIANT_METHODS)]))
WINDOW = (200, 800)  # the timestep window every job sets (its own and ADDifT's)
IMAGE_WH = (40, 48)  # files larger than the training side and not square: SDXL's size conditioning shows
STANDARD = "standard"
PAIR_METHOD = next(name for name, m in METHODS.items() if m.needs_pairs)
# every method on every family; the edit methods (needs_control) on the edit-capable tiny models
METHOD_CASES = [(family, method) for method, m in METHODS.items()
                for family in (EDIT_FAMILIES if m.needs_control else FAMILIES)]


@pytest.fixture(autouse=True)
def registered_test_families(monkeypatch):
    """Test-only families (tiny_families.TEST_FAMILIES) registered around each contract test and gone afterwards,
    so the rest of the session sees the registry as the package has it. (Here, not in a conftest.py: a second
    module named conftest shadows tests/conftest.py for the test modules collected after it.)"""
    from difflora.models import registry

    monkeypatch.setattr(registry, "FAMILIES", list(registry.FAMILIES))
    for module in TEST_FAMILIES.values():
        registry.register_family(module)


def test_every_registered_family_takes_part():
    assert set(FAMILIES) <= set(TINY_FAMILIES), f"families without a tiny model: {set(FAMILIES) - set(TINY_FAMILIES)}"
    assert STANDARD in METHODS and {"lora", "locon", "loha", "lokr", "dora"} <= set(ALGO_NAMES)
    assert {TINY_FAMILIES[v].variant_of for v in VARIANTS} <= set(FAMILIES)
    assert {m for m, _ in VARIANT_RUNS} == set(VARIANT_METHODS) and {a for _, a in VARIANT_RUNS} == set(ALGO_NAMES)


# ---------------------------------------------------------------------------- the world
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Three pairs of 40x48 face images with a caption naming each, and each family's tiny model (built once)."""
    from difflora.toy import faces as F

    root = tmp_path_factory.mktemp("contract")
    pairs = root / "pairs"
    pairs.mkdir()
    for i in range(3):
        _, _, before, after = F.make_pair(100 + i, "eyes", "open", "closed")
        for name, img, state in ((f"{i:03d}", before, "open"), (f"{i:03d}_after", after, "closed")):
            Image.fromarray(img).resize(IMAGE_WH, Image.BILINEAR).save(pairs / f"{name}.png")
            (pairs / f"{name}.txt").write_text(f"a face, pair{i}, eyes {state}", encoding="utf-8")
    built: dict[str, Path] = {}

    def model_dir(family: str) -> Path:
        if family not in built:
            built[family] = root / "models" / family
            ALL_TINY[family].build(built[family])
        return built[family]

    return root, model_dir


@pytest.fixture(scope="module")
def loaded_models() -> dict:
    return {}


@pytest.fixture(autouse=True)
def models_read_once(monkeypatch, loaded_models):
    """Each tiny model is read from its folder once per module; every run gets a deep copy of it as loaded (a
    copy costs about half a read: the SDXL one's ~1,000 modules, config and weights files)."""
    import copy

    import difflora.train.run as run_module

    real_load = run_module.load_model

    def load(path, **options):
        key = (str(path), repr(sorted(options.items())))
        if key not in loaded_models:
            loaded_models[key] = real_load(path, **options)
        return copy.deepcopy(loaded_models[key])

    monkeypatch.setattr(run_module, "load_model", load)


def make_job(world, family: str, method: str, out: Path, algo: str = "lora", **extra):
    root, model_dir = world
    spec = ALL_TINY[family]
    # every method's own step counts ("stage1_steps", ...) shortened to 2, whichever method it is
    options = METHODS[method].options
    method_table = {k: 2 for k in (options.model_fields if options else {}) if k.endswith("_steps")}
    if options and "min_timestep" in options.model_fields:
        method_table.update(min_timestep=WINDOW[0], max_timestep=WINDOW[1])
    job = {"model": str(model_dir(family)), "method": method, "resolution": spec.resolution, "train_batch_size": 2,
           "max_train_steps": 2, "learning_rate": 1e-2, "network_dim": 2, "network_alpha": 2.0, "network_algo": algo,
           "conv_dim": 2, "conv_alpha": 2.0, "min_timestep": WINDOW[0], "max_timestep": WINDOW[1],
           "output_dir": str(out), "output_name": "c", "log_with": "none", "seed": 3, "cache_latents": True,
           "datasets": [{"subsets": [{"image_dir": str(root / "pairs"), "caption_extension": ".txt"}]}],
           **spec.job_keys, **extra}
    if method_table:
        job[method] = {**method_table, **job.get(method, {})}
    return apply_method_defaults(JobConfig.model_validate(job))


# ---------------------------------------------------------------------------- recording the denoiser's inputs
@dataclasses.dataclass
class Seen:
    """One forward of the denoiser inside a training step."""

    stage: object  # methods.Stage
    batch: object  # methods.Batch the step assembled
    inputs: object  # tiny_families.DenoiserInputs
    encoded: list[tuple[str, object]]  # (caption, its Conditioning) the step's losses encoded so far
    trained_multiplier: float | torch.Tensor
    others: dict[str, float | torch.Tensor]  # earlier stages' networks -> multiplier
    grad: bool


class Probe:
    """Hooks the run (its model, its steps) and records every denoiser forward a training step makes."""

    def __init__(self, monkeypatch, family: str):
        import difflora.train.batches as batches
        import difflora.train.loop as loop
        import difflora.train.stages as stages

        self.spec = ALL_TINY[family]
        self.seen: list[Seen] = []
        self.run = None
        self.current = None  # (runner, stage progress, batch) while a step runs
        self.encoded: list[tuple[str, object]] = []
        real_prepare, real_step, real_context = loop.prepare, stages.StageRunner._step, stages.step_context
        real_encode = batches.PromptCache.__call__

        def encode(cache, captions):
            cond = real_encode(cache, captions)
            if self.current is not None:
                self.encoded += [(c, cond[i:i + 1]) for i, c in enumerate(captions)]
            return cond

        def prepare(job, resume=None):
            self.run = real_prepare(job, resume)
            self.run.model.denoiser.register_forward_pre_hook(self._record, with_kwargs=True)
            model, real_with_controls = self.run.model, self.run.model.encode_prompts_with_controls

            def with_controls(prompts, controls):  # an edit model whose text encoder sees the control image
                cond = real_with_controls(prompts, controls)
                if self.current is not None:
                    self.encoded += [(c, cond[i:i + 1]) for i, c in enumerate(prompts)]
                return cond

            model.encode_prompts_with_controls = with_controls
            return self.run

        def step(runner, sp, index):
            self.current, self.encoded = (runner, sp, None), []
            try:
                return real_step(runner, sp, index)
            finally:
                self.current = None

        def step_context(run, network, index, batch):
            if self.current is not None:
                self.current = (*self.current[:2], batch)
            return real_context(run, network, index, batch)

        monkeypatch.setattr(loop, "prepare", prepare)
        monkeypatch.setattr(stages.StageRunner, "_step", step)
        monkeypatch.setattr(stages, "step_context", step_context)
        monkeypatch.setattr(batches.PromptCache, "__call__", encode)

    def _record(self, module, args, kwargs):
        if self.current is None or self.current[2] is None:
            return
        runner, sp, batch = self.current
        self.seen.append(Seen(sp.stage, batch, self.spec.read(self.run.model, args, kwargs), list(self.encoded),
                              _multiplier(sp.network), {n: _multiplier(net) for n, net in runner.results.items()},
                              torch.is_grad_enabled()))


def _multiplier(network):
    m = network.loras()[0].multiplier
    return m.detach().clone() if isinstance(m, torch.Tensor) else float(m)


# ---------------------------------------------------------------------------- checking what was seen
def contract_problems(probe: Probe, job) -> list[str]:
    """Every way the recorded forwards break the contract (empty: none)."""
    run, spec = probe.run, probe.spec
    model, unique = run.model, run.data.unique_items()
    problems = []
    for k, s in enumerate(probe.seen):
        where = f"forward {k} (stage {s.stage.name}, step {s.batch.step})"
        allowed = range(len(unique)) if s.stage.items is None else s.stage.items
        n, rows = len(s.batch), s.inputs.latents.shape[0]
        if rows % n:
            problems.append(f"{where}: {rows} rows for a batch of {n}")
            continue
        for r in range(rows):
            t = s.batch.timesteps[r % n]
            if not torch.allclose(s.inputs.timesteps[r].float(), t.float(), rtol=1e-5, atol=1e-3):
                problems.append(f"{where} row {r}: timestep {float(s.inputs.timesteps[r])}, batch drew {float(t)}")
            if not WINDOW[0] <= float(t) < WINDOW[1]:
                problems.append(f"{where} row {r}: timestep {float(t)} outside the window {WINDOW}")
            item = _identify(model, s.inputs.latents[r], s.batch.noise[r % n], t, unique)
            if item is None:
                problems.append(f"{where} row {r}: not the noised latent of any training image")
                continue
            if item not in allowed:
                problems.append(f"{where} row {r}: an image of item {item}, outside the stage's items {list(allowed)}")
            own = set(_captions(unique[item]))
            if not _encodes_own(s.inputs.text[r], s.encoded, spec.text_key, own):
                problems.append(f"{where} row {r}: the text is no encoding of item {item}'s captions {sorted(own)}")
            if spec.pooled_key is not None:
                if s.inputs.pooled is None:
                    problems.append(f"{where}: no pooled text")
                elif not _encodes_own(s.inputs.pooled[r], s.encoded, spec.pooled_key, own):
                    problems.append(f"{where} row {r}: the pooled text is no encoding of item {item}'s captions")
            with Image.open(unique[item].path) as im:
                image_hw = (im.height, im.width)
            extra = spec.check_extras(s.inputs, r, image_hw, job)
            if extra:
                problems.append(f"{where} row {r}: {extra}")
            control = s.inputs.extras.get("control")
            if run.method.needs_control and control is None:
                problems.append(f"{where} row {r}: an edit method's prediction without a control image")
            if control is not None and not any(torch.allclose(control[r], unique[item].latents[k].to(control),
                                                              rtol=1e-4, atol=1e-4) for k in ("x", "after")):
                problems.append(f"{where} row {r}: the control is neither clean image of item {item}")
        problems += [f"{where}: {p}" for p in _multiplier_problems(s, rows)]
    return problems


def _captions(item) -> list[str]:
    out = [item.caption, ""]
    if item.is_pair:
        out += [item.after_caption, common_caption(item.caption, item.after_caption), item.instruction or ""]
    return out


def _identify(model, row, noise, t, unique) -> int | None:
    """The unique item one of whose images, noised with the batch's noise at t, is this input row."""
    for index, it in enumerate(unique):
        for key in ("x", "after"):
            if key not in it.latents:
                continue
            expected = model.objective.add_noise(it.latents[key][None].to(row), noise[None].to(row), t[None])[0]
            if torch.allclose(row, expected, rtol=1e-4, atol=1e-4):
                return index
    return None


def _encodes_own(value: torch.Tensor, encoded: list[tuple[str, object]], key: str, own: set[str]) -> bool:
    """Whether `value` is what the step encoded for one of the item's own captions (a tiny tokenizer may give
    captions that differ in one unknown word the same encoding: any caption with this encoding may be the one)."""
    same = {c for c, cond in encoded if torch.allclose(cond.tensors[key][0].to(value), value, rtol=1e-4, atol=1e-5)}
    return bool(same & own)


def _multiplier_problems(s: Seen, rows: int) -> list[str]:
    out = []
    m = s.trained_multiplier
    values = m if isinstance(m, torch.Tensor) else torch.full((rows,), m)
    if values.shape != (rows,):
        out.append(f"multiplier of shape {tuple(values.shape)} for {rows} rows")
    elif s.grad and not bool((values != 0).all()):
        out.append(f"a trained prediction with multiplier {values.tolist()}")
    elif not s.grad and bool((values != 0).any()):
        out.append(f"a frozen prediction with the trained network at {values.tolist()}")
    for name, other in s.others.items():
        want = 1.0 if name in s.stage.keep_active else 0.0
        got = other if isinstance(other, float) else other.tolist()
        if got != want:
            out.append(f"earlier stage {name} at multiplier {got}, expected {want}")
    return out


def _train_and_check(world, monkeypatch, tmp_path, family, method, algo="lora", **extra):
    probe = Probe(monkeypatch, family)
    job = make_job(world, family, method, tmp_path / "out", algo, **extra)
    path = train(job)
    assert probe.seen, "no training forward was recorded"
    stages = {s.stage.name for s in probe.seen}
    assert stages == {st.name for st in probe.run.method.stages(probe.run.data_sizes())}, stages
    assert contract_problems(probe, job) == []
    reference = probe.spec.saved_modules
    if reference is not None:
        assert {k.split(".", 1)[0] for k in load_file(str(path))} == reference()
    return probe, job, path


# ---------------------------------------------------------------------------- the suite
@pytest.mark.parametrize(("family", "method"), METHOD_CASES)
def test_each_method_step_receives_its_stage_data_and_conditioning(world, monkeypatch, tmp_path, family, method):
    _train_and_check(world, monkeypatch, tmp_path, family, method)


@pytest.mark.parametrize("family", FAMILIES)
def test_per_pair_stages_see_their_own_pair_only(world, monkeypatch, tmp_path, family):
    """... and the file of their average, loaded, changes the output."""
    probe, _, path = _train_and_check(world, monkeypatch, tmp_path, family, PAIR_METHOD, per_pair_average=True)
    assert {tuple(s.stage.items) for s in probe.seen} == {(0,), (1,), (2,)}
    model = probe.run.model
    base = _fixed_output(model)
    network_from_file(model, path, 1.0)
    assert float((_fixed_output(model) - base).abs().max()) > 1e-4


@pytest.mark.parametrize("algo", list(ALGO_NAMES))
@pytest.mark.parametrize("family", FAMILIES)
def test_each_adapter_trains_and_its_file_gives_the_trained_output(world, monkeypatch, tmp_path, family, algo):
    """The file loaded onto the model = the network in memory at the end of training = diffusers' loader."""
    _check_file_gives_trained_output(world, monkeypatch, tmp_path, family, STANDARD, algo)


@pytest.mark.parametrize("method,algo", VARIANT_RUNS, ids=[f"{m}-{a}" for m, a in VARIANT_RUNS])
@pytest.mark.parametrize("variant", VARIANTS)
def test_each_variant_trains_every_method_and_adapter(world, monkeypatch, tmp_path, variant, method, algo):
    """Another variant of a family (its own block counts and names): each method's steps keep the contract, and
    its file (of the variant's reference modules) gives the method's final network's output, in diffusers' loader
    too (plain LoRA)."""
    _check_file_gives_trained_output(world, monkeypatch, tmp_path, variant, method, algo)


def _check_file_gives_trained_output(world, monkeypatch, tmp_path, family, method, algo):
    """Standard method: the file's output is the trained network's, still attached at 1 when the result is
    saved. Other methods (a result combined from stages' networks, per-sample multipliers): the file's output is
    that of the result the method finalised, made a network in memory."""
    import difflora.train.checkpoint as checkpoint
    from difflora.network.lora import LoRANetwork

    in_memory = {}
    real_save = checkpoint.Checkpointer.save_result

    def save_result(self, tensors, global_step, per_epoch):
        if method == STANDARD:
            in_memory["out"] = _fixed_output(self.run.model)
        in_memory["final"] = {k: v.detach().clone() for k, v in tensors.items()}
        return real_save(self, tensors, global_step, per_epoch)

    monkeypatch.setattr(checkpoint.Checkpointer, "save_result", save_result)
    probe, _, path = _train_and_check(world, monkeypatch, tmp_path, family, method, algo)
    model = probe.run.model  # training left it as loaded (its networks removed), with the job's family options
    base = _fixed_output(model)
    if method != STANDARD:
        final = LoRANetwork.from_weights(model.lora_targets(conv=True), in_memory["final"]).to(model.device)
        final.apply_to()
        in_memory["out"] = _fixed_output(model)
        final.remove()
    net = network_from_file(model, path, 1.0)
    loaded = _fixed_output(model)
    assert float((loaded - base).abs().max()) > 1e-4  # the LoRA changes the output
    torch.testing.assert_close(loaded, in_memory["out"], rtol=1e-4, atol=1e-5)
    client = TINY_FAMILIES[family].client_unet
    if client is not None and ALGO_NAMES[algo] == ("lora", {}):
        x, t, cond = _fixed_inputs(model)
        with torch.no_grad():
            ours = model.predict(x, t, cond)
        net.remove()
        torch.testing.assert_close(client(world[1](family), path, {"x": x, "t": t, "cond": cond}), ours,
                                   rtol=1e-4, atol=1e-5)


def _fixed_inputs(model):
    """A 4x4 latent of the family's channels (4 for most tiny families, FLUX.2's 128), t = 500 and one caption's
    encoding."""
    side = 4 * model.latent_downscale
    with torch.no_grad():
        channels = model.encode_images(torch.zeros(1, 3, side, side), sample=False).shape[1]
    x = torch.randn(1, channels, 4, 4, generator=torch.Generator().manual_seed(0))
    return x, torch.tensor([500]), model.encode_prompts(["a face, pair1, eyes open"])


@torch.no_grad()
def _fixed_output(model) -> torch.Tensor:
    x, t, cond = _fixed_inputs(model)
    return model.predict(x, t, cond)


@pytest.mark.parametrize("family", FAMILIES)
def test_resume_gives_the_uninterrupted_lora(world, tmp_path, family):
    full = load_file(str(train(make_job(world, family, STANDARD, tmp_path / "full", max_train_steps=3))))
    stop = StopRequest()

    def stop_after_first(event):
        if event.type == "step" and event.global_step == 1:
            stop.request()

    job = make_job(world, family, STANDARD, tmp_path / "cut", max_train_steps=3)
    with pytest.raises(TrainingStopped):
        train(job, listeners=[stop_after_first], stop=stop)
    resumed = load_file(str(train(job, resume="auto")))
    assert set(resumed) == set(full)
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_addift_for_edit_models_conditions_both_passes_on_the_before_image(world, monkeypatch, tmp_path):
    """addift.control: every prediction (frozen and trained) carries the pair's "before" image as its control."""
    probe, _, _ = _train_and_check(world, monkeypatch, tmp_path, "flux2", "addift", addift={"control": True})
    unique = probe.run.data.unique_items()
    for s in probe.seen:
        for r in range(s.inputs.latents.shape[0]):
            assert any(torch.equal(s.inputs.extras["control"][r], it.latents["x"].to(s.inputs.extras["control"]))
                       for it in unique)
    assert {s.grad for s in probe.seen} == {True, False}
