"""The UI's sandbox and server without a browser: uploads, the "copy as CLI" target, the workspace
lock, the port, --workspace naming a file, damaged run records."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys

import pytest
from PIL import Image

from difflora.errors import UserError
from difflora.ui import pairs as P
from difflora.ui.runs import Run, RunStore, _FIELD_TYPES
from difflora.ui.workspace import Workspace


@pytest.fixture
def ws(tmp_path) -> Workspace:
    return Workspace(tmp_path / "ws")


def _png(path, colour=(10, 20, 30)):
    Image.new("RGB", (32, 32), colour).save(path)
    return path


def test_a_refused_upload_batch_writes_nothing(ws, tmp_path):
    good, other = _png(tmp_path / "a.png"), _png(tmp_path / "b.png", (200, 0, 0))
    broken = tmp_path / "c.png"
    broken.write_bytes(good.read_bytes()[:60])
    dest = ws.root / "pairs" / "new"
    with pytest.raises(UserError, match="truncated or corrupt"):
        P.import_uploads([str(good), str(other), str(broken)], dest)  # the bad one comes last
    assert not dest.exists()
    caption = tmp_path / "a.txt"
    caption.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8"):
        P.import_uploads([str(good), str(caption)], dest)
    assert not dest.exists()
    upper = tmp_path / "up"
    upper.mkdir()
    _png(upper / "A.PNG")
    with pytest.raises(UserError, match="two uploads are named"):
        P.import_uploads([str(good), str(upper / "A.PNG")], dest)
    assert not dest.exists()


def test_uploads_never_replace_a_file_without_confirmation(ws, tmp_path):
    dest = ws.root / "pairs" / "eyes"
    dest.mkdir()
    first = _png(tmp_path / "a.png")
    assert P.import_uploads([str(first)], dest) == ["a.png: 32x32"]
    kept = (dest / "a.png").read_bytes()
    second = tmp_path / "again"
    second.mkdir()
    _png(second / "a.png", (250, 250, 0))
    _png(second / "b.png")
    with pytest.raises(UserError, match="would replace files in the folder .first: a.png"):
        P.import_uploads([str(second / "b.png"), str(second / "a.png")], dest)
    assert (dest / "a.png").read_bytes() == kept and not (dest / "b.png").exists()
    P.import_uploads([str(second / "b.png"), str(second / "a.png")], dest, replace=True)
    assert (dest / "a.png").read_bytes() == (second / "a.png").read_bytes()


def test_a_failed_upload_write_removes_what_the_batch_created(ws, tmp_path, monkeypatch):
    import errno

    files = [str(_png(tmp_path / f"{n}.png")) for n in "abc"]
    real = P.shutil.copyfile
    calls = []

    def full_disk(src, dst):
        calls.append(src)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(P.shutil, "copyfile", full_disk)
    dest = ws.root / "pairs" / "full"
    with pytest.raises(UserError, match="no space left"):
        P.import_uploads(files, dest)
    assert not dest.exists()


def test_copy_as_cli_target_stays_in_the_jobs_folder(ws):
    from difflora.ui.pages.train import cli_job_path

    assert cli_job_path(ws, "my-lora") == ws.root / "jobs" / "my-lora.toml"
    for bad in ("../../x/victim", "/etc/passwd", "a/b", ".."):
        with pytest.raises(UserError, match="output_name"):
            cli_job_path(ws, bad)
    (ws.root / "jobs" / "evil.toml").symlink_to(ws.root.parent / "victim.toml")
    with pytest.raises(UserError, match="outside the allowed folder"):
        cli_job_path(ws, "evil")


def test_restrict_arguments_carry_the_trusted_folders(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    ws = Workspace(tmp_path / "ws", [models])
    assert ws.restrict_arguments() == ["--restrict-paths", str(ws.root), "--allow-path", str(models)]
    assert ws.resolve(models / "m.safetensors", "model", role="read") == models / "m.safetensors"
    with pytest.raises(UserError, match="outside the allowed folder"):
        ws.resolve(models / "out", "output_dir")
    with pytest.raises(UserError, match="--allow-path: not a folder"):
        Workspace(tmp_path / "ws", [tmp_path / "nope"])


def test_one_server_per_workspace(ws):
    with ws.lock():
        with pytest.raises(UserError, match=f"another difflora ui \\(pid {os.getpid()}\\) serves this workspace"):
            ws.lock().__enter__()
    assert not (ws.root / ".server.lock").exists()
    # a lock left by a killed server is stale and taken over
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (ws.root / ".server.lock").write_text(dead.stdout)
    with ws.lock() as lock:
        assert lock.held and (ws.root / ".server.lock").read_text().strip() == str(os.getpid())


def test_port_in_use_and_workspace_naming_a_file(tmp_path, run_cli):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, _, err = run_cli("ui", "--workspace", tmp_path / "ws", "--port", str(port))
    assert code == 2 and len(err.strip().splitlines()) == 1 and f"--port {port}" in err and "another program" in err
    assert not (tmp_path / "ws" / ".server.lock").exists()
    (tmp_path / "afile").write_text("x")
    code, _, err = run_cli("ui", "--workspace", tmp_path / "afile")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "afile" in err and "a file" in err


@pytest.mark.parametrize("field,value", [("created", "yesterday"), ("argv", "train job.toml"), ("argv", [1, 2]),
                                         ("pid", "12"), ("info", []), ("resume", 1), ("attempts", True)])
def test_a_damaged_run_record_is_skipped(ws, field, value, caplog):
    store = RunStore(ws.runs)
    store.save(Run("good", "train", "t", ["train", "job.toml"], created=2.0))
    store.save(Run("bad", "train", "t", ["train", "job.toml"], created=1.0))
    path = ws.runs / "bad" / "run.json"
    record = json.loads(path.read_text())
    record[field] = value
    path.write_text(json.dumps(record))
    assert [r.id for r in store.all()] == ["good"]
    assert f"field {field!r}" in caplog.text and "damaged run record" in caplog.text
    path.write_text("[1, 2]")
    assert [r.id for r in store.all()] == ["good"]


def test_every_run_field_has_a_declared_type():
    assert set(_FIELD_TYPES) == {f.name for f in dataclasses.fields(Run)}
