"""The UI's logic without a browser: the schema form, workspace paths, pair analysis, the run queue."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from difflora.errors import UserError
from difflora.ui import jobform as J
from difflora.ui import pairs as P
from difflora.ui.runs import FAILED, FINISHED, INTERRUPTED, QUEUED, Run, RunStore, Runner
from difflora.ui.workspace import Workspace


@pytest.fixture
def ws(tmp_path) -> Workspace:
    w = Workspace(tmp_path / "ws")
    from difflora.toy.evaluate import write_pairs

    write_pairs(w.root / "pairs" / "eyes", "eyes", 2, seed=0)
    return w


def form_values(specs, method="addift", **given):
    values = []
    for s in specs:
        if s.key in given:
            values.append(given[s.key])
        elif s.kind == "bool":
            values.append(bool(J.effective_default(s, method)))
        elif s.kind == "choice":
            values.append(method if s.key == "method" else (J.effective_default(s, method) or ""))
        else:
            values.append("")
    return values


def test_every_job_key_is_a_field_and_the_form_round_trips(ws):
    from difflora.config import JobConfig, load_job

    specs = J.build_fields()
    keys = {s.key for s in specs}
    for name, f in JobConfig.model_fields.items():
        if name in J.SKIPPED:
            continue
        nested = getattr(type(f.default), "model_fields", None)
        assert ({f"{name}.{k}" for k in nested} <= keys) if nested else (name in keys), name
    given = {"image_dir": "pairs/eyes", "learning_rate": "0.002", "addift.multiplier": "0.5", "flip_aug": "true",
             "lr_scheduler": "linear", "network_only_if_contains": '["attn"]', "training_comment": "1e-3 is a string"}
    by_key = {s.key: s for s in specs}
    values = form_values(specs, **{k: v for k, v in given.items()})
    data, ui = J.form_to_job(specs, values, ws)
    assert J.validate(data, ws) is None
    path = ws.root / "jobs" / "x.toml"
    path.write_text(J.job_toml(data))
    job = load_job(path, restrict_paths_to=ws.root)
    assert job.method == "addift" and job.learning_rate == 0.002 and job.addift.multiplier == 0.5
    assert job.flip_aug is True and job.lr_scheduler == "linear" and job.network_only_if_contains == ["attn"]
    assert job.training_comment == "1e-3 is a string"
    assert job.max_train_steps == 40 and job.network_dim == 4  # blank: ADDifT's recommended values
    assert job.datasets[0].subsets[0].image_dir == str(ws.root / "pairs" / "eyes")
    assert "max_train_steps" not in data and "lr_scheduler" in data
    assert J.job_to_values(specs, data, ui, ws) == values  # re-opening a job gives the same form
    assert by_key["addift.multiplier"].group == "addift options"


def test_form_errors_are_the_clis(ws, run_cli, tmp_path):
    specs = J.build_fields()
    data, _ = J.form_to_job(specs, form_values(specs, image_dir="pairs/eyes", learning_rate="-1"), ws)
    message = J.validate(data, ws)
    job = ws.root / "job.toml"
    job.write_text(J.job_toml(data))
    code, _, err = run_cli("train", job, "--restrict-paths", ws.root)
    assert code == 2
    assert err.strip() == f"difflora: error: {message.replace('job.toml', str(job), 1)}"
    assert "'learning_rate': Input should be greater than 0" in message
    assert J.group_of_error(message, specs) == "Optimisation"
    with pytest.raises(UserError, match="outside the allowed folder"):
        J.form_to_job(specs, form_values(specs, image_dir="../elsewhere"), ws)


def test_workspace_paths_stay_inside(ws, tmp_path):
    (tmp_path / "outside").mkdir()
    os.symlink(tmp_path / "outside", ws.root / "link")
    assert ws.resolve("pairs/eyes") == ws.root / "pairs" / "eyes"
    assert ws.resolve(str(ws.root / "pairs")) == ws.root / "pairs"
    for bad in ("..", "../outside", "/etc/passwd", "~", "link", "pairs/../../outside", "a\x00b"):
        with pytest.raises(UserError):
            ws.resolve(bad)
    with pytest.raises(UserError, match="letters, digits"):
        ws.new_folder("pairs", "../x")


def test_pair_analysis_uses_the_training_mask_and_warns(ws):
    from difflora.data.dataset import difference_mask, pair_difference

    folder = ws.root / "pairs" / "eyes"
    pair = P.find_pairs(folder)[0]
    view = P.analyse(pair, threshold=10, dilate=2, factor=4)
    assert view.warnings == []
    a, b = Image.open(pair.before).convert("RGB"), Image.open(pair.after).convert("RGB")
    diff = pair_difference(a, b)
    mask = difference_mask(diff, (16, 16), 10, 2).numpy()
    assert 0 < mask.mean() < 0.5  # the eyes, not the face
    tinted = (view.mask.astype(int) - (np.asarray(a) * 0.35).astype(int)).max(axis=2) > 20
    # the overlay is tinted exactly where the latent mask, upsampled 4x, is on
    assert np.array_equal(tinted, np.kron(mask, np.ones((4, 4))) > 0)
    assert view.heat[diff.numpy() == 0].max() == 0 and view.heat[diff.numpy() > 100].min() >= 0

    x = np.asarray(a)
    Image.fromarray(x).save(folder / "same.png")
    Image.fromarray(x).save(folder / "same_after.png")
    Image.fromarray(np.roll(x, (2, -3), axis=(0, 1))).save(folder / "shift_after.png")  # 2 down, 3 left
    Image.fromarray(x).save(folder / "shift.png")
    Image.fromarray(x).resize((48, 48)).save(folder / "small_after.png")
    Image.fromarray(x).save(folder / "small.png")
    warnings = {p.name: P.analyse(p).warnings for p in P.find_pairs(folder) if p.name in ("same", "shift", "small")}
    assert any("identical images" in w for w in warnings["same"])
    assert any(w.startswith("misaligned: 'after' is offset by (-3, 2) px") for w in warnings["shift"])
    assert any("size mismatch: before 64x64, after 48x48" in w for w in warnings["small"])


def test_uploads_get_the_clis_image_checks(ws, tmp_path):
    good = tmp_path / "a.png"
    Image.new("RGB", (32, 32), (10, 20, 30)).save(good)
    broken = tmp_path / "b.png"
    broken.write_bytes(good.read_bytes()[:60])
    big = tmp_path / "c.png"
    big.write_bytes(b"\x89PNG" + b"\0" * (P.MAX_UPLOAD_BYTES + 1))
    script = tmp_path / "d.sh"
    script.write_text("echo hi")
    dest = ws.root / "pairs" / "new"
    assert P.import_uploads([str(good)], dest) == ["a.png: 32x32"]
    with pytest.raises(UserError, match=r"^b.png: truncated or corrupt image .*; nothing was added$"):
        P.import_uploads([str(broken)], dest)  # the user's name for the file, not the upload copy's path
    with pytest.raises(UserError, match="over the 20 MiB limit"):
        P.import_uploads([str(big)], dest)
    with pytest.raises(UserError, match="not an image"):
        P.import_uploads([str(script)], dest)
    assert sorted(p.name for p in dest.iterdir()) == ["a.png"]


def wait_for(predicate, timeout_s=120):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("timed out")


def test_queue_survives_failures_and_marks_crashes(ws):
    store = RunStore(ws.runs)
    runner = Runner(store, ws.root, poll_s=0.1)
    runner.start()
    try:
        bad = runner.submit(Run("a-bad", "train", "bad", ["train", "missing.toml"], created=1.0))
        slow = runner.submit(Run("b-slow", "eval", "slow", ["toy", "pairs", "--change", "eyes=open:closed",
                                                           "--n", "100000", "--out", "many"], created=2.0))
        ok = runner.submit(Run("c-ok", "eval", "ok", ["toy", "pairs", "--change", "eyes=open:closed", "--n", "1",
                                                     "--out", "one"], created=3.0))
        wait_for(lambda: store.get(bad.id).status == FAILED)
        assert store.get(bad.id).error.endswith("missing.toml: config file not found")
        pid = wait_for(lambda: store.get(slow.id).pid)
        assert store.get(ok.id).status == QUEUED  # one at a time
        os.kill(pid, signal.SIGKILL)  # what the kernel's out-of-memory killer does
        wait_for(lambda: store.get(slow.id).status == FAILED)
        assert store.get(slow.id).error == "the process was killed by SIGKILL (out of memory?)"
        wait_for(lambda: store.get(ok.id).status == FINISHED)
        assert (store.folder(ok.id) / "one" / "000000_after.png").is_file()
    finally:
        runner.shutdown()


def test_a_run_left_running_by_a_dead_server_is_interrupted(ws):
    store = RunStore(ws.runs)
    store.save(Run("r1", "train", "t", ["train", "job.toml"], status="running", pid=2**22 + 7, started=time.time()))
    store.save(Run("r2", "train", "t", ["train", "job.toml"], status="queued"))
    Runner(store, ws.root)
    assert store.get("r1").status == INTERRUPTED and "resume" in store.get("r1").error
    assert store.get("r2").status == QUEUED
    assert json.loads((ws.runs / "r1" / "run.json").read_text())["status"] == INTERRUPTED


def test_ui_command_refuses_listen_without_auth(run_cli):
    code, _, err = run_cli("ui", "--listen")
    assert code == 2 and err.count("\n") == 1 and "--listen" in err and "--auth USER:PASS" in err
    code, _, err = run_cli("ui", "--listen", "--auth", "nopassword")
    assert code == 2 and "--auth takes USER:PASS" in err


class FakeRunner:
    """Takes submitted runs without starting them (what the Train page queues)."""

    def __init__(self, store: RunStore):
        self.store = store

    def submit(self, run: Run) -> Run:
        self.store.save(run)
        return run


def page_context(ws):
    from types import SimpleNamespace

    store = RunStore(ws.runs)
    return SimpleNamespace(ws=ws, store=store, runner=FakeRunner(store))


def test_every_form_field_has_its_help_keys_line():
    from difflora.commands.train import help_keys

    listing = help_keys()
    specs = J.build_fields()
    assert len(specs) > 150
    for s in specs:
        assert s.help, s.key
        if s.key not in J.UI_KEYS:
            assert s.help in listing, s.key  # the same words as `difflora train --help-keys`


def test_start_refuses_bad_data_in_the_forms_words_and_queues_nothing(ws, monkeypatch):
    from difflora.data import alignment
    from difflora.ui.pages.train import start_run

    ctx = page_context(ws)
    specs = J.build_fields()
    folder = ws.root / "pairs" / "eyes"

    def refused(**given) -> str:
        with pytest.raises(UserError) as info:
            start_run(ctx, specs, form_values(specs, **given))
        assert list(ws.runs.iterdir()) == []  # nothing queued, no run folder
        return str(info.value)

    assert refused(image_dir="pairs/missing") == "image_dir: pairs/missing: image folder not found"
    x = np.asarray(Image.open(folder / "000.png"))
    Image.fromarray(x).save(folder / "000_after.png")
    message = refused(image_dir="pairs/eyes")
    assert message.startswith("image_dir: pairs/eyes/000.png: the pair 000.png / 000_after.png is two identical")
    (folder / "000_after.png").unlink()
    assert "the pair partner of 000.png is missing" in refused(image_dir="pairs/eyes")
    Image.fromarray(255 - x).save(folder / "000_after.png")
    assert refused(image_dir="pairs/eyes", learning_rate="-1") == "learning_rate: Input should be greater than 0"
    assert refused(image_dir="pairs/eyes", learning_rate="1e9") == \
        "learning_rate: 1e+09 is outside 1e-07 to 1 (LoRA learning rates are 1e-5 to 1e-2)"
    assert refused(image_dir="pairs/eyes", max_train_steps="1000000").startswith(
        "max_train_steps: 1e+06 is outside 1 to 100000")
    message = refused(image_dir="pairs/eyes", resolution="17")
    assert message == "resolution 17x17 must be a multiple of 8 for this model"
    for message in ("learning_rate: Input", "image_dir: pairs/missing", message):
        assert J.group_of_error(message, specs) == ("Optimisation" if "rate" in message else "Data")

    # Start reads every pair but leaves the alignment measurement (~0.6 s a pair) to the Pairs page and the training
    measured = []
    monkeypatch.setattr(alignment, "misalignment", lambda *a: measured.append(a))
    run = start_run(ctx, specs, form_values(specs, image_dir="pairs/eyes"))
    assert measured == []
    job = (ctx.store.folder(run.id) / "job.toml").read_text()
    prompts = (ctx.store.folder(run.id) / "prompts.txt").read_text()
    # the preview: the first pair's "before" caption, at the sweep's weights, sampled as often as stays cheap
    before = " ".join((folder / "000.txt").read_text().split())
    assert prompts == f"{before} --d 42 --s {J.PREVIEW_STEPS} --l 4\n"
    assert "sample_sweep = [\n    -1.0,\n    0.0,\n    1.0,\n]" in job and "sample_every_n_steps" not in job


def test_presets_and_imports_fill_the_form(ws):
    from difflora.ui.pages.train import import_job, load_preset, preset_names, save_preset

    ctx = page_context(ws)
    specs = J.build_fields()
    values = form_values(specs, image_dir="pairs/eyes", learning_rate="0.002", **{"addift.multiplier": "0.5"})
    assert save_preset(ctx, specs, values, "my eyes") == "my_eyes"
    assert preset_names(ctx) == ["my_eyes"]
    assert load_preset(ctx, specs, "my_eyes") == values
    with pytest.raises(UserError, match="no such preset"):
        load_preset(ctx, specs, "other")

    # a kohya sd-scripts config: kohya's names read as difflora's, paths relative to the file
    (ws.root / "jobs" / "kohya.toml").write_text(
        'pretrained_model_name_or_path = "../models/base"\nlearning_rate = 3e-4\nmax_train_steps = 120\n'
        'xformers = true\nmethod = "addift"\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = "../pairs/eyes"\n')
    imported = dict(zip((s.key for s in specs), import_job(ctx, specs, "jobs/kohya.toml")))
    assert imported["model"] == "models/base" and imported["image_dir"] == "pairs/eyes"
    assert imported["learning_rate"] == "0.0003" and imported["max_train_steps"] == "120"
    (ws.root / "jobs" / "bad.toml").write_text("use_dreambooth_method = 3\n")
    with pytest.raises(UserError, match="^jobs/bad.toml: line 1: .*use_dreambooth_method"):
        import_job(ctx, specs, "jobs/bad.toml")


def test_pages_show_the_running_run_and_the_queue_from_the_registry():
    from difflora.ui.runs import default_run, queue_position, status_text

    runs = [Run("d", "train", "t", [], status="finished", created=4.0), Run("c", "train", "t", [], created=3.0),
            Run("b", "train", "t", [], created=2.0), Run("a", "train", "t", [], status="running", created=1.0)]
    assert default_run(runs).id == "a"
    assert [queue_position(runs, r) for r in "abcd"] == [None, 1, 2, None]
    assert status_text(runs, runs[1]) == "queued (2 run(s) ahead)" and status_text(runs, runs[3]) == "running"
    runs[3].status = "finished"
    assert default_run(runs).id == "b" and status_text(runs, runs[2]) == "queued (next)"


def test_eta_counts_the_sampling_still_to_come():
    from difflora.ui.progress import summarize

    events = [{"type": "stage_started", "time": 0.0, "steps": 40}]
    t = 0.0
    for step in range(1, 21):
        t += 1.0  # a second per step
        events.append({"type": "step", "time": t, "step": step, "steps": 40, "total_steps": 40, "loss": 0.1})
        if step in (10, 20):
            t += 5.0  # a five-second sampling pass every 10 steps
            events.append({"type": "sample_written", "time": t, "step": step, "paths": []})
    p = summarize(events)
    assert p.step_s == 1.0 and p.sample_pass_s == [5.0, 5.0]
    assert p.eta_s == 20 * 1.0 + 2 * 5.0  # steps 21-40, the pass at 30 and the final one at 40


def test_the_toy_demo_job_spends_at_most_a_quarter_of_its_time_sampling(ws):
    """The UI's default job on four toy pairs (ADDifT, 40 steps), from the event timestamps of a real run."""
    from difflora.config import load_job
    from difflora.train.loop import train
    from difflora.ui.pages.train import start_run
    from difflora.toy.evaluate import write_pairs

    write_pairs(ws.root / "pairs" / "four", "eyes", 4, seed=0)
    ctx = page_context(ws)
    specs = J.build_fields()
    run = start_run(ctx, specs, form_values(specs, image_dir="pairs/four"))
    seen = []
    train(load_job(ctx.store.folder(run.id) / "job.toml"), listeners=[lambda e: seen.append(e.to_dict())])
    steps = [e for e in seen if e["type"] == "step"]
    passes = [i for i, e in enumerate(seen) if e["type"] == "sample_written"]
    assert len(steps) == 40 and [seen[i]["step"] for i in passes] == [40]  # one pass: the finished LoRA
    sampling = sum(seen[i]["time"] - seen[i - 1]["time"] for i in passes)
    total = seen[-1]["time"] - seen[0]["time"]
    print(f"\nsampling {sampling:.1f} s of {total:.1f} s ({sampling / total:.0%})")
    assert sampling / total <= 0.25


def write_lora(path, rank: int = 4, seed: int = 0):
    """A small kohya LoRA file (two linear modules) and a training state's tensors beside it."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name in ("lora_unet_a_proj", "lora_unet_b_proj"):
        tensors[f"{name}.lora_down.weight"] = torch.randn(rank, 8, generator=g)
        tensors[f"{name}.lora_up.weight"] = torch.randn(8, rank, generator=g)
        tensors[f"{name}.alpha"] = torch.tensor(float(rank))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    state = path.parent / f"{path.stem}-state"
    state.mkdir(exist_ok=True)
    save_file({"optimizer.exp_avg.0": torch.zeros(3)}, str(state / "state.safetensors"))


def test_tools_pick_loras_by_run_guard_outputs_and_say_what_they_wrote(ws):
    from difflora.ui.pages.tools import file_rank, notes_after, refuse_overwrite, tool_argv
    from difflora.ui.pickers import lora_choices, model_choices
    from difflora.ui.subcommand import run_cli

    ctx = page_context(ws)
    write_lora(ws.root / "runs" / "20260101-a" / "output" / "eyes.safetensors")
    write_lora(ws.root / "runs" / "20260102-b" / "output" / "smile.safetensors", seed=1)
    write_lora(ws.root / "loras" / "mine.safetensors", seed=2)
    assert lora_choices(ws) == [("smile · run 20260102-b", "runs/20260102-b/output/smile.safetensors"),
                                ("eyes · run 20260101-a", "runs/20260101-a/output/eyes.safetensors"),
                                ("loras/mine.safetensors", "loras/mine.safetensors")]  # no training state
    assert model_choices(ws) == [("the embedded toy model", "")]

    eyes = "runs/20260101-a/output/eyes.safetensors"
    assert file_rank(ctx, eyes) == 4
    f = {"lora": eyes, "new_rank": 8, "dynamic": "", "param": 0.9, "save_to": "tools/resized.safetensors"}
    run_cli(tool_argv(ctx, "resize", f), ws.root)
    assert notes_after(ctx, "resize", f, 4) == [
        "the file's rank is 4: asking for 8 wrote rank 4 (a resize never adds rank)"]
    assert file_rank(ctx, "tools/resized.safetensors") == 4
    assert notes_after(ctx, "resize", dict(f, new_rank=2), 4) == []
    with pytest.raises(UserError, match="tools/resized.safetensors exists; tick 'overwrite'"):
        refuse_overwrite(ctx, "tools/resized.safetensors", False)
    refuse_overwrite(ctx, "tools/resized.safetensors", True)

    f = {"loras": [eyes, eyes], "ratios": "1 -1", "model": "", "mode": "exact", "save_to": "tools/zero.safetensors"}
    run_cli(tool_argv(ctx, "merge", f), ws.root)
    assert notes_after(ctx, "merge", f, None) == [
        "the merged LoRA is zero everywhere: the inputs cancel at these ratios"]
    f = dict(f, ratios="1 0.5", save_to="tools/sum.safetensors")
    run_cli(tool_argv(ctx, "merge", f), ws.root)
    assert notes_after(ctx, "merge", f, None) == []


def test_the_model_picker_lists_folders_single_files_and_allowed_symlinks(tmp_path):
    from safetensors.torch import save_file
    import torch

    from difflora.ui.pickers import lora_choices, model_choices

    outside = tmp_path / "shared_models" / "sd15"
    outside.mkdir(parents=True)
    (outside / "model_index.json").write_text("{}")
    save_file({"unet.w": torch.zeros(1)}, str(outside / "unet.safetensors"))  # a component, not a model
    w = Workspace(tmp_path / "ws", allowed=[tmp_path / "shared_models"])
    (w.root / "models").mkdir()
    os.symlink(outside, w.root / "models" / "sd15")
    save_file({"model.diffusion_model.x.weight": torch.zeros(1)}, str(w.root / "models" / "one.safetensors"))
    write_lora(w.root / "models" / "not_a_model.safetensors")
    assert model_choices(w) == [("the embedded toy model", ""),
                                ("models/one.safetensors (single file)", "models/one.safetensors"),
                                ("models/sd15 (diffusers folder)", "models/sd15")]
    assert w.resolve("models/sd15", "model", role="read") == outside  # trusted with --allow-path
    assert [v for _, v in lora_choices(w)] == ["models/not_a_model.safetensors"]


def test_pairs_page_makes_toy_pairs_adds_a_pair_from_slots_aligns_and_diffs_tags(ws, tmp_path):
    from difflora.ui.pages.pairs import add_pair, make_toy_pairs, prep_folder, tag_diff

    ctx = page_context(ws)
    dest = make_toy_pairs(ctx, "glasses", 2, "specs")
    assert sorted(p.name for p in dest.iterdir()) == ["000.png", "000.txt", "000_after.png", "000_after.txt",
                                                      "001.png", "001.txt", "001_after.png", "001_after.txt"]
    with pytest.raises(UserError, match="already holds files"):
        make_toy_pairs(ctx, "glasses", 2, "specs")

    # two slots, the user's own file names: saved as NAME.png / NAME_after.png
    x = np.asarray(Image.open(dest / "000.png"))
    Image.fromarray(x).save(tmp_path / "IMG_0001.PNG")
    Image.fromarray(np.roll(np.asarray(Image.open(dest / "000_after.png")), (0, 2), axis=(0, 1))).save(
        tmp_path / "edited.png")
    assert add_pair(ctx, "pairs/specs", "", str(tmp_path / "IMG_0001.PNG"), str(tmp_path / "edited.png")) == \
        ["IMG_0001.png: 64x64", "IMG_0001_after.png: 64x64"]
    assert P.find_pairs(dest)[-1].name == "IMG_0001"
    with pytest.raises(UserError, match="IMG_0001.png"):  # never over a file without the replace box
        add_pair(ctx, "pairs/specs", "IMG_0001", str(tmp_path / "edited.png"), str(tmp_path / "edited.png"))
    with pytest.raises(UserError, match="both slots"):
        add_pair(ctx, "pairs/specs", "x", str(tmp_path / "edited.png"), None)
    assert not list((ws.root / ".gradio").glob("pair-*"))  # the staging folders are gone

    # align: a new folder beside the pairs, the shifted pair registered, the originals untouched
    original = (dest / "IMG_0001_after.png").read_bytes()
    out, report = prep_folder(ctx, "pairs/specs", "align")
    assert out == "pairs/specs_aligned" and "IMG_0001" in report
    assert (dest / "IMG_0001_after.png").read_bytes() == original
    aligned = np.asarray(Image.open(ws.root / out / "IMG_0001_after.png")).astype(int)
    shifted = np.asarray(Image.open(dest / "IMG_0001_after.png")).astype(int)
    unshifted = np.asarray(Image.open(dest / "000_after.png")).astype(int)
    assert np.abs(aligned - unshifted).mean() < np.abs(shifted - unshifted).mean() / 4

    assert tag_diff("a face, eyes open, red hair", "a face, eyes closed, red hair") == \
        "**only before:** `eyes open`  \n**only after:** `eyes closed`"
    assert tag_diff("a, b", "b, a").startswith("The captions have the same tags")


def test_a_pairs_edit_instruction_is_its_own_file_and_shows_with_the_pair(ws):
    from difflora.ui.pages.pairs import show_pairs

    before = ws.root / "pairs" / "eyes" / "000.png"
    path = ws.root / "pairs" / "eyes" / "000.instruction.txt"
    assert P.read_instruction(before) is None
    P.write_instruction(before, " close the eyes ")
    assert path.read_text() == "close the eyes\n" and P.read_instruction(before) == "close the eyes"
    with pytest.raises(UserError, match="one line"):
        P.write_instruction(before, "close\nthe eyes")
    assert path.read_text() == "close the eyes\n"
    items, _, names = show_pairs(page_context(ws), "pairs/eyes", "_after", 10.0, 2, "")
    assert names == ["000", "001"]  # the instruction file is no pair of its own
    assert items[0][1].endswith(" · edit: close the eyes") and "edit:" not in items[1][1]
    assert (ws.root / "pairs" / "eyes" / "000.txt").is_file()  # the caption is another file, untouched
    P.write_instruction(before, "  ")  # blank: the pair has no instruction of its own
    assert not path.exists()


def test_a_pairs_further_control_images_are_shown_with_it_not_as_pairs(ws):
    """NAME_ref1.png beside NAME.png is the pair's second control image (data/dataset.py): the Pairs page shows
    it between before and after and says so, and lists no pair of its own."""
    from difflora.ui.pages.pairs import _composite, show_pairs

    folder = ws.root / "pairs" / "eyes"
    ref = np.zeros((64, 64, 3), np.uint8)
    ref[:, :32] = (200, 30, 30)
    Image.fromarray(ref).save(folder / "000_ref1.png")
    pairs = P.find_pairs(folder)
    assert [(p.name, [r.name for r in p.refs]) for p in pairs] == [("000", ["000_ref1.png"]), ("001", [])]
    view = P.analyse(pairs[0])
    assert len(view.refs) == 1 and np.array_equal(view.refs[0], ref)
    plain = _composite(P.analyse(pairs[1]))
    assert _composite(view).size == (plain.size[0] * 3 // 2, plain.size[1])  # before | ref1 | after
    items, _, names = show_pairs(page_context(ws), "pairs/eyes", "_after", 10.0, 2, "")
    assert names == ["000", "001"]
    assert items[0][1].startswith("000 · 2 control images (before, 000_ref1.png) → after · ")
    assert "control images" not in items[1][1]

    Image.fromarray(ref).save(folder / "001_ref2.png")  # no 001_ref1: training refuses the pair
    gap = P.find_pairs(folder)[1]
    assert [r.name for r in gap.refs] == ["001_ref2.png"]
    assert any("skip 001_ref1" in w for w in P.analyse(gap).warnings)


def test_edit_preview_runs_generate_with_the_pairs_control_images_and_instruction(ws, monkeypatch):
    """The Pairs page's edit preview: `difflora generate` with the picked pair's before image and its NAME_ref1.png
    as --control (in that order), its instruction as the prompt (the typed one first), the chosen LoRA swept;
    the gallery shows the controls, then the grid. The CLI itself is stubbed: generate --control is tested on
    real edit models in tests/test_edit.py."""
    from difflora.ui.pages import pairs as page

    calls = []

    def fake_cli(argv, cwd):
        calls.append(argv)
        out = Path(argv[argv.index("--out") + 1])
        out.mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(out / "000_grid.png")
        return ""

    monkeypatch.setattr(page, "run_cli", fake_cli)
    folder = ws.root / "pairs" / "eyes"
    Image.new("RGB", (64, 64), (9, 9, 9)).save(folder / "000_ref1.png")
    P.write_instruction(folder / "000.png", "close the eyes")
    (ws.root / "loras").mkdir()
    (ws.root / "loras" / "edit.safetensors").write_bytes(b"x")
    ctx = page_context(ws)
    items = page.edit_preview(ctx, "pairs/eyes", "_after", "000", "", "loras/edit.safetensors", "", "-1,0,1", 4)
    argv = calls[0]
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "--control"] == [str(folder / "000.png"),
                                                                               str(folder / "000_ref1.png")]
    assert argv[argv.index("--prompt") + 1] == "close the eyes" and "--model" not in argv
    assert argv[argv.index("--lora") + 1] == f"{ws.root / 'loras' / 'edit.safetensors'}:1"
    assert argv[argv.index("--sweep") + 1] == "-1,0,1" and argv[argv.index("--steps") + 1] == "4"
    grid = Path(argv[argv.index("--out") + 1]) / "000_grid.png"
    assert grid.parent.parent == ws.root / "previews"
    assert [path for path, _ in items] == [str(folder / "000.png"), str(folder / "000_ref1.png"), str(grid)]
    page.edit_preview(ctx, "pairs/eyes", "_after", "000", "", "loras/edit.safetensors", " open the eyes ")
    assert calls[1][calls[1].index("--prompt") + 1] == "open the eyes"  # typed in the page, not yet saved
    page.edit_preview(ctx, "pairs/eyes", "_after", "001", "", "loras/edit.safetensors", "")
    after_caption = P.read_caption(folder / "001_after.png")
    assert after_caption and calls[2][calls[2].index("--prompt") + 1] == after_caption  # no instruction file
    assert [calls[2][i + 1] for i, a in enumerate(calls[2]) if a == "--control"] == [str(folder / "001.png")]
    with pytest.raises(UserError, match="choose an edit LoRA"):
        page.edit_preview(ctx, "pairs/eyes", "_after", "000", "", "", "")
    assert len(calls) == 3


def test_the_live_page_shows_each_sample_rows_control_image_at_its_left(ws):
    """An edit run's sampling event names each prompt row's control ("before") image, relative to the run folder
    (`control`); the Live page draws it left of the row, at the row's height. A fabricated event: the training
    side of the convention lands separately."""
    from difflora.generate import make_grid
    from difflora.ui.pages.live import sampling_grids
    from difflora.ui.progress import readable

    ctx = page_context(ws)
    layout = [{"prompt": p, "multiplier": m} for p in ("open", "close") for m in (-1.0, 0.0, 1.0)]
    run = Run("20260101-edit", "train", "edit", [], info={"layout": layout})
    ctx.store.save(run)
    folder = ctx.store.folder(run.id)
    tiles = [[np.full((32, 32, 3), (40 * i + 20, 200, 60 * j), np.uint8) for j in range(3)] for i in range(2)]
    grid = np.asarray(make_grid(tiles, ["weight -1", "weight 0", "weight +1"], row_labels=["open", "close"], scale=2,
                                title="edit at step 4"))
    (folder / "output" / "sample").mkdir(parents=True)
    Image.fromarray(grid).save(folder / "output" / "sample" / "edit_000004_sweep.png")
    colours = [(250, 0, 0), (0, 0, 250)]
    for i, c in enumerate(colours):
        Image.fromarray(np.full((16, 24, 3), c, np.uint8)).save(ws.root / "pairs" / f"before{i}.png")
    event = {"type": "sample_written", "time": 1.0, "step": 4,
             "paths": [str(folder / "output" / "sample" / "edit_000004_sweep.png")]}

    def shown(**extra):
        (folder / "events.jsonl").write_text(json.dumps({**event, **extra}) + "\n")
        from difflora.ui.progress import read_events, summarize

        [(image, caption)] = sampling_grids(ctx, run, summarize(read_events(folder / "events.jsonl")))
        assert caption == "step 4"
        return np.asarray(image)

    plain = readable(grid)
    assert np.array_equal(shown(), plain)  # no control: the grid as the training wrote it
    image = shown(control=["../../pairs/before0.png", "../../pairs/before1.png"])
    assert np.array_equal(image[:, -plain.shape[1]:], plain)  # the grid itself untouched, at the right
    f = plain.shape[0] // grid.shape[0]  # the grid enlarged to a readable height
    top, row_h = (grid.shape[0] - 2 * 64) * f, 64 * f  # the labels above two rows of 64 px tiles
    for i, c in enumerate(colours):
        y = top + i * row_h
        assert tuple(image[y + row_h // 2, 2]) == c and tuple(image[y + 1, 2]) == c and tuple(image[y + row_h - 2, 2]) == c
        assert tuple(image[y + row_h // 2, row_h * 24 // 16 + 1]) == (255, 255, 255)  # width at the row's height
    assert image.shape[1] == plain.shape[1] + row_h * 24 // 16 + 8

    # samples written one image per prompt (no sweep): one grid of them, a column each, enlarged to be read
    event["paths"] = [str(ws.root / "pairs" / f"before{i}.png") for i in range(2)]
    row = shown()
    assert row.shape[0] >= 256 and tuple(row[-2, 1]) == colours[0] and tuple(row[-2, -2]) == colours[1]
