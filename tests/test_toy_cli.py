"""`difflora toy dataset | pairs | judge` on the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from difflora.cli import main
from difflora.toy import faces


def _run(args, capsys):
    code = main(list(map(str, args)))
    out, err = capsys.readouterr()
    return code, out, err


def _read(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_dataset_writes_kohya_layout(tmp_path, capsys):
    out = tmp_path / "ds"
    code, _, _ = _run(["toy", "dataset", "--n", 6, "--out", out, "--seed", 3, "--repeats", 4], capsys)
    assert code == 0
    assert [p.name for p in out.iterdir()] == ["4_face"]
    folder = out / "4_face"
    names = sorted(p.name for p in folder.iterdir())
    assert names == [f"{i:06d}.{ext}" for i in range(6) for ext in ("png", "txt")]
    for i in range(6):
        img = _read(folder / f"{i:06d}.png")
        assert img.shape == (64, 64, 3)
        attrs = faces.parse_caption((folder / f"{i:06d}.txt").read_text())
        assert set(attrs) == set(faces.ATTRIBUTES)  # full caption
        assert not faces.is_held_out(attrs)
    # The same seed gives the same faces; a larger --n extends a smaller one.
    code, _, _ = _run(["toy", "dataset", "--n", 8, "--out", tmp_path / "ds2", "--seed", 3, "--repeats", 4], capsys)
    assert code == 0
    for i in range(6):
        a, b = folder / f"{i:06d}.png", tmp_path / "ds2" / "4_face" / f"{i:06d}.png"
        assert np.array_equal(_read(a), _read(b))
        assert a.with_suffix(".txt").read_text() == b.with_suffix(".txt").read_text()
    assert not list(tmp_path.rglob("*.tmp"))


def test_dataset_default_repeats_and_held_out(tmp_path, capsys):
    code, _, _ = _run(["toy", "dataset", "--n", 5, "--out", tmp_path / "h", "--held-out"], capsys)
    assert code == 0
    folder = tmp_path / "h" / "1_face"
    captions = sorted(folder.glob("*.txt"))
    assert len(captions) == 5
    assert all(faces.is_held_out(faces.parse_caption(p.read_text())) for p in captions)


def test_pairs_write_documented_layout(tmp_path, capsys):
    out = tmp_path / "pairs"
    code, stdout, _ = _run(["toy", "pairs", "--change", "glasses=none:glasses", "--n", 3, "--out", out], capsys)
    assert code == 0 and "3 pairs" in stdout
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(f"{i:06d}{s}.{e}" for i in range(3) for s in ("", "_after") for e in ("png", "txt"))
    for i in range(3):
        before = faces.parse_caption((out / f"{i:06d}.txt").read_text())
        after = faces.parse_caption((out / f"{i:06d}_after.txt").read_text())
        assert before["glasses"] == "none" and after["glasses"] == "glasses"
        assert {k for k in faces.ATTRIBUTES if before[k] != after[k]} == {"glasses"}
        b, a = _read(out / f"{i:06d}.png"), _read(out / f"{i:06d}_after.png")
        assert np.any(a != b)


def test_non_empty_output_is_refused_without_overwrite(tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    keep = out / "keep.txt"
    keep.write_text("mine")
    for cmd in (["toy", "dataset", "--n", 2, "--out", out], ["toy", "pairs", "--change", "eyes=open:closed", "--n", 2, "--out", out]):
        code, _, err = _run(cmd, capsys)
        assert code == 2
        assert "not empty" in err and "--overwrite" in err and str(out) in err
        assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    # With --overwrite only the command's own files are written; others stay.
    code, _, _ = _run(["toy", "pairs", "--change", "eyes=open:closed", "--n", 2, "--out", out, "--overwrite"], capsys)
    assert code == 0
    assert keep.read_text() == "mine"
    assert len(list(out.glob("*.png"))) == 4
    code, _, _ = _run(["toy", "pairs", "--change", "eyes=closed:open", "--n", 1, "--out", out, "--overwrite"], capsys)
    assert code == 0
    assert keep.read_text() == "mine"
    assert len(list(out.glob("*.png"))) == 4  # pair 1 of the first run is kept, not deleted
    assert faces.parse_caption((out / "000000.txt").read_text())["eyes"] == "closed"
    # An existing file where the folder should be is refused too.
    code, _, err = _run(["toy", "dataset", "--n", 1, "--out", keep], capsys)
    assert code == 2 and "not a folder" in err


@pytest.mark.parametrize(
    "change, expected",
    [
        ("eyes=open:shut", "open, closed"),
        ("nose=big:small", "skin, hair, background, eyes, mouth, glasses, style"),
        ("eyes-open-closed", "ATTRIBUTE=BEFORE:AFTER"),
    ],
)
def test_pairs_bad_change_is_a_user_error(tmp_path, capsys, change, expected):
    code, _, err = _run(["toy", "pairs", "--change", change, "--out", tmp_path / "p"], capsys)
    assert code == 2
    assert expected in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "p").exists()


def test_judge_prints_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "pairs"
    assert _run(["toy", "pairs", "--change", "mouth=smiling:neutral", "--n", 3, "--out", out, "--seed", 5], capsys)[0] == 0
    (out / "notes.txt").write_text("not a caption")  # ignored: no image beside it
    from PIL import Image

    Image.new("RGB", (200, 70), "white").save(out / "000_grid.png")  # a generate/eval grid: skipped, not judged
    code, stdout, _ = _run(["toy", "judge", out], capsys)
    assert code == 0
    lines = stdout.splitlines()
    assert lines[0].split() == ["file", *faces.ATTRIBUTES]
    assert any(line.startswith("000000_after.png") for line in lines)
    assert "agreement with captions (6 of 6 images captioned)" in stdout
    report = json.loads((out / "judge.json").read_text())
    assert len(report["images"]) == 6
    assert report["attributes"] == {a: list(v) for a, v in faces.ATTRIBUTES.items()}
    by_file = {r["file"]: r for r in report["images"]}
    assert by_file["000000_after.png"]["predicted"]["mouth"] == "neutral"
    assert by_file["000000.png"]["predicted"]["mouth"] == "smiling"
    for r in report["images"]:
        assert r["caption"] == faces.parse_caption((out / r["file"]).with_suffix(".txt").read_text())
        assert all(r["match"].values()), r
    assert report["agreement"]["mouth"] == {"matched": 6, "named": 6, "rate": 1.0}

    # A mismatching caption is flagged in the table and counted; --json picks the report path.
    (out / "000001.txt").write_text("a face, eyes closed, glasses")
    truth = faces.parse_caption((out / "000001_after.txt").read_text())
    target = tmp_path / "report.json"
    code, stdout, _ = _run(["toy", "judge", out, "--json", target], capsys)
    assert code == 0 and target.is_file()
    report = json.loads(target.read_text())
    row = next(r for r in report["images"] if r["file"] == "000001.png")
    assert set(row["caption"]) == {"eyes", "glasses"}
    assert row["match"]["eyes"] == (truth["eyes"] == "closed")
    assert report["agreement"]["glasses"]["named"] == 6
    if truth["glasses"] == "none":
        assert "none!=glasses" in stdout


def test_judge_recursive_and_errors(tmp_path, capsys):
    ds = tmp_path / "ds"
    assert _run(["toy", "dataset", "--n", 2, "--out", ds], capsys)[0] == 0
    code, _, err = _run(["toy", "judge", ds], capsys)
    assert code == 2 and "no images" in err and "--recursive" in err
    code, stdout, _ = _run(["toy", "judge", ds, "-r", "--json", tmp_path / "j.json"], capsys)
    assert code == 0 and "1_face/000000.png" in stdout
    code, _, err = _run(["toy", "judge", tmp_path / "missing"], capsys)
    assert code == 2 and "folder not found" in err
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "x.png").write_bytes(b"not a png")
    code, _, err = _run(["toy", "judge", tmp_path / "broken"], capsys)
    assert code == 2 and "cannot read image" in err


def _subprocess(args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "difflora", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=120)


def test_help_and_subprocess_exit_codes(tmp_path, run_cli):
    code, out, _ = run_cli("toy", "--help")
    assert code == 0
    for sub in ("dataset", "pairs", "judge"):
        assert sub in out
    code, out, _ = run_cli("toy", "pairs", "--help")
    assert code == 0 and "000000_after.png" in out
    code, out, _ = run_cli("toy", "dataset", "--help")
    assert code == 0 and "<R>_face/000000.png" in out
    # `python -m difflora` itself: its exit codes and streams
    r = _subprocess(["toy", "pairs", "--change", "hair=black:green", "--out", tmp_path / "p"], tmp_path)
    assert r.returncode == 2
    assert "valid values: black, brown, blonde, red" in r.stderr
    r = _subprocess(["toy", "pairs", "--change", "hair=black:red", "--n", 1, "--out", tmp_path / "p"], tmp_path)
    assert r.returncode == 0 and (tmp_path / "p" / "000000_after.png").is_file()
