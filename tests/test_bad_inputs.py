"""Every case of the bad-input corpus (tests/bad_inputs) through the real CLI.

An error case: exit code 2, one line on stderr starting with "difflora: error: " that names the
file and the problem, and the output folder exactly as it was. A handled case: exit code 0, its
warning in the log, files already in the output folder untouched, and its own check.
"""

from __future__ import annotations

import hashlib
import logging
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "bad_inputs"))
from make_corpus import CASES, Workspace, readme_table  # noqa: E402


def _snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir",
                                         p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_corpus_case(case, tmp_path, tiny_sd1_dir, run_cli, caplog, monkeypatch):
    ws = Workspace(tmp_path, tiny_sd1_dir)
    monkeypatch.chdir(tmp_path)
    args = case.build(ws)
    before = _snapshot(ws.out)
    model_before = _snapshot(tiny_sd1_dir)
    with caplog.at_level(logging.WARNING):
        code, out, err = run_cli(*args)
    warnings = " | ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    if case.outcome == "error":
        assert code == 2, (code, err, out)
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1, err
        line = lines[0]
        assert line.startswith("difflora: error: "), line
        assert case.names in line, (case.names, line)
        for needle in case.needles:
            assert needle.lower() in line.lower(), (needle, line)
        assert "Traceback" not in err
        assert _snapshot(ws.out) == before  # nothing written, nothing touched, no lock left behind
    else:
        assert code == 0, err
        for needle in case.log:
            assert needle in warnings, (needle, warnings)
        after = _snapshot(ws.out)
        assert {k: v for k, v in after.items() if k in before} == before  # earlier results untouched
        if case.check:
            case.check(ws)
    assert _snapshot(tiny_sd1_dir) == model_before


def test_corpus_is_large_and_covers_both_outcomes():
    assert len(CASES) >= 30
    assert len({c.name for c in CASES}) == len(CASES)
    assert {c.outcome for c in CASES} == {"error", "ok"}
    for c in CASES:
        assert c.what
        if c.outcome == "error":
            assert c.names and c.needles, c.name


def test_readme_lists_every_case():
    readme = (Path(__file__).parent / "bad_inputs" / "README.md").read_text(encoding="utf-8")
    assert readme_table() in readme, "run: python tests/bad_inputs/make_corpus.py --readme"
