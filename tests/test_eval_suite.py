"""The evaluation suite: its smallest configuration end to end, and the metrics it reports."""

from __future__ import annotations

import json

import pytest

from difflora.toy import evaluate as E


def test_smallest_suite_runs_and_writes_every_field(tmp_path, run_cli):
    out = tmp_path / "ev"
    args = ("eval", "--suite", "ci", "--method", "addift", "--train-seeds", "0", "--m", "4",
            "--set", "max_train_steps=4", "--out", out, "--grids", "--keep-loras")
    code, stdout, _ = run_cli(*args)
    assert code == 0, stdout
    # the UI's Evaluate page shows the -w/0/+w grid and offers the trained LoRA (kept beside the cell)
    (cell_json,) = (out / "cells").glob("*.json")
    lora = cell_json.with_suffix(".safetensors")
    assert cell_json.with_suffix(".png").is_file() and lora.is_file()
    assert any(k.endswith("lora_up.weight") for k in __import__("safetensors").safe_open(str(lora), "pt").keys())
    data = json.loads((out / "eval.json").read_text())
    (cell,) = data["cells"]
    assert cell["task"] == "eyes" and cell["method"] == "addift" and cell["n_pairs"] == 8
    assert cell["train_steps"] == 4 and cell["m"] == 4 and cell["overrides"] == ["max_train_steps=4"]
    assert (cell["train_seed"], cell["pair_seed"], cell["prompt_seed"], cell["weight"]) == (0, 0, 0, 1.0)
    for key in ("edit_success", "reverse_success", "base_after_rate", "preservation", "preservation_minus"):
        assert 0.0 <= cell[key] <= 1.0
    assert cell["outside_change"] > 0  # a trained LoRA changes some pixels
    # The per-start breakdown covers the 4 prompts, and its edit rates add up to the overall one.
    starts = cell["by_start"]
    assert set(starts) <= {"open", "closed"} and sum(s["n"] for s in starts.values()) == 4
    assert sum(s["n"] * s["edit"] for s in starts.values()) == pytest.approx(4 * cell["edit_success"])
    summary = data["summary"]["addift (8 pairs)"]
    assert summary["tasks"]["eyes"]["seeds"] == [0]
    assert summary["summary"]["worst_edit_success"]["task"] == "eyes"
    assert "| addift | 8 | 1 | 0 |" in (out / "eval.md").read_text()

    # A rerun takes the cached cell: same numbers, cell file untouched.
    (cell_file,) = (out / "cells").glob("*.json")
    before = cell_file.stat().st_mtime_ns
    assert run_cli(*args)[0] == 0
    assert cell_file.stat().st_mtime_ns == before
    assert json.loads((out / "eval.json").read_text())["cells"] == [cell]


def _j(**attrs):
    base = {"skin": "light", "hair": "black", "background": "blue", "eyes": "open", "mouth": "smiling",
            "glasses": "none", "style": "flat"}
    return dict(base, **attrs)


def test_metrics_by_start_value_for_a_multi_valued_start():
    # hair-any: * -> red. Three seeds start black, brown, red at multiplier 0.
    zero = [_j(hair="black"), _j(hair="brown"), _j(hair="red")]
    plus = [_j(hair="red"), _j(hair="brown", skin="dark"), _j(hair="red")]
    minus = [_j(hair="black"), _j(hair="red"), _j(hair="blonde")]
    m = E.judged_metrics("hair-any", minus, zero, plus)
    assert m["edit_success"] == pytest.approx(2 / 3)
    assert m["edit_from_before"] == pytest.approx(1 / 2)  # of the two that did not start red
    assert m["reverse_success"] == pytest.approx(2 / 3)  # any value but red counts as "before"
    assert m["reverse_from_after"] == 1.0  # the one that started red left red
    assert m["base_after_rate"] == pytest.approx(1 / 3)
    assert m["preservation"] == pytest.approx(2 / 3) and m["preservation_minus"] == 1.0
    assert m["by_start"] == {"black": {"n": 1, "edit": 1.0, "reverse": 1.0},
                             "brown": {"n": 1, "edit": 0.0, "reverse": 0.0},
                             "red": {"n": 1, "edit": 1.0, "reverse": 1.0}}
    assert m["extra"]["changed_by_plus"]["skin"] == pytest.approx(1 / 3)


def test_pairs_of_a_multi_valued_start_cycle_through_the_other_values(tmp_path):
    E.write_pairs(tmp_path, "hair-any", 6, seed=3)
    starts = [(tmp_path / f"{i:03d}.txt").read_text().split(", ")[2] for i in range(6)]
    assert starts == ["black hair", "brown hair", "blonde hair"] * 2
    assert all((tmp_path / f"{i:03d}_after.txt").read_text().split(", ")[2] == "red hair" for i in range(6))


def test_suites_are_disjoint_and_cover_every_attribute():
    tune, test = set(E.SUITES["tune"]), set(E.SUITES["test"])
    assert not tune & test
    for subset in (tune, test):
        assert {E.TASKS[t].attribute for t in subset} == set(E.faces.ATTRIBUTES)


def test_cell_keys_separate_seeds_settings_and_weights():
    a = E.Cell("eyes", "addift", 8)
    keys = {a.key(), E.Cell("eyes", "addift", 8, train_seed=1).key(), E.Cell("eyes", "addift", 8, pair_seed=1).key(),
            E.Cell("eyes", "addift", 8, prompt_seed=1).key(), E.Cell("eyes", "addift-tt", 8).key(),
            E.Cell("eyes", "addift", 8, overrides=("max_train_steps=5",)).key(),
            E.Cell("eyes", "addift", 8, weight=0.5).key()}
    assert len(keys) == 7
    assert E.Cell("eyes", "addift", 8, weight=1.0).key() == a.key()  # the variant's own weight


def test_evaluate_can_leave_the_summary_files_to_its_caller(tmp_path):
    # bench/quality_report.py reports several evaluate() runs that share one cell folder; a run must not
    # overwrite that folder's eval.json / eval.md with its own subset.
    (tmp_path / "eval.md").write_text("the whole section")
    cell = E.Cell("eyes", "addift", 8, m=4)
    (tmp_path / "cells").mkdir()
    r = E.TaskResult("eyes", "addift", 8, 1.0, 1.0, 0.5, 1.0, 1.0, 0.01, 100, 9.0, m=4)
    (tmp_path / "cells" / f"{cell.key()}.json").write_text(json.dumps(E.asdict(r)))
    results = E.evaluate(["eyes"], ["addift"], [8], tmp_path, m=4, cached_only=True, write_summary=False)
    assert [x.edit_success for x in results] == [1.0]
    assert (tmp_path / "eval.md").read_text() == "the whole section" and not (tmp_path / "eval.json").exists()
    E.evaluate(["eyes"], ["addift"], [8], tmp_path, m=4, cached_only=True)
    assert "| addift | 8 | 1 | 0 |" in (tmp_path / "eval.md").read_text()


def test_a_default_changed_since_the_baseline_changes_the_cell_key(tmp_path, monkeypatch):
    """Keys hash the settings that differ from the baseline plain job (assets/eval_baseline.json), not
    from today's defaults: a method-table default changed in the code (simulated by a baseline that
    recorded another value) retrains its cells; a key the baseline lacks counts only off its default."""
    cell = E.Cell("eyes", "addift", 8, m=32)
    key, settings = cell.key(), json.loads(cell.settings())
    assert "addift.multiplier" not in settings and settings["max_train_steps"] == 40
    baseline = json.loads(E._BASELINE.read_text(encoding="utf-8"))
    assert baseline["addift.multiplier"] == 0.25 and baseline["max_train_steps"] == 1600
    moved = dict(baseline, **{"addift.multiplier": 0.3})
    (tmp_path / "moved.json").write_text(json.dumps(moved), encoding="utf-8")
    monkeypatch.setattr(E, "_BASELINE", tmp_path / "moved.json")
    assert json.loads(cell.settings())["addift.multiplier"] == 0.25 and cell.key() != key
    fewer = {k: v for k, v in baseline.items() if k != "addift.self_reg_weight"}
    (tmp_path / "fewer.json").write_text(json.dumps(fewer), encoding="utf-8")
    monkeypatch.setattr(E, "_BASELINE", tmp_path / "fewer.json")
    assert cell.key() == key


def test_another_methods_table_does_not_enter_a_cell_key(monkeypatch, tmp_path):
    """The copier's cells do not move when ADDifT's table changes (its min_timestep default did)."""
    copier = E.Cell("eyes", "copier", 8, m=32)
    key = copier.key()
    assert not any(k.startswith("addift.") for k in json.loads(copier.settings()))
    baseline = json.loads(E._BASELINE.read_text(encoding="utf-8"))
    (tmp_path / "b.json").write_text(json.dumps(dict(baseline, **{"addift.multiplier": 0.3})), encoding="utf-8")
    monkeypatch.setattr(E, "_BASELINE", tmp_path / "b.json")
    assert copier.key() == key


def test_the_auto_window_rule_is_part_of_a_cell_key(monkeypatch):
    """Retuning the "auto" window's constants retrains the default's cells."""
    from difflora.methods import addift

    cell = E.Cell("eyes", "addift", 8, m=32)
    key = cell.key()
    monkeypatch.setattr(addift, "GLOBAL_MIN_TIMESTEP", 650)
    assert cell.key() != key
    assert E.Cell("eyes", "addift-100", 8, m=32).key().endswith("0e972bf3")  # a pinned window: unchanged
