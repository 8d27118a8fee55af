"""The UI's logic without a browser: the schema form, workspace paths, pair analysis, the run queue."""

from __future__ import annotations

import json
import os
import signal
import time

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
    with pytest.raises(UserError, match="truncated or corrupt"):
        P.import_uploads([str(broken)], dest)
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
