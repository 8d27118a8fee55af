"""Browser tests of `difflora ui`: a real server process driven by headless Chromium (Debian's package).

The browser is Debian's `chromium`, never a download: when chromium is not on PATH and we
are root, it is installed with apt-get (once per machine). When it cannot be had, the tests FAIL
(not skip), so CI shows it. Playwright (PyPI) drives that executable.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

# The flags this machine's notes recommend: no GPU, no sandbox as root, nothing that reaches the network.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SRC = Path(__file__).resolve().parents[2] / "src"


def ensure_chromium() -> str:
    """Path of Debian's chromium (found on PATH), installing the package when it is missing and we may."""
    found = shutil.which("chromium")
    if found:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.fail("chromium is missing: install Debian's chromium package (apt-get install -y chromium)")
    lock = Path(tempfile.gettempdir()) / "difflora-chromium-install.lock"
    with open(lock, "w") as fh:  # two xdist workers: one installs, the other waits
        import fcntl

        fcntl.flock(fh, fcntl.LOCK_EX)
        if not shutil.which("chromium"):
            env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
            for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
                done = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if done.returncode != 0:
                    pytest.fail(f"{' '.join(cmd)} failed: {done.stderr.strip()[-500:]}")
    found = shutil.which("chromium")
    if not found:
        pytest.fail("apt-get installed chromium but it is still not on PATH")
    return found


@pytest.fixture(scope="session")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: pip install -e '.[test]'")
    path = ensure_chromium()
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})  # a fresh profile per test
    pg = context.new_page()
    pg.set_default_timeout(60_000)
    outside: list[str] = []
    pg.on("request", lambda r: outside.append(r.url) if not r.url.startswith(("http://127.0.0.1", "data:", "blob:"))
          else None)
    yield pg
    context.close()
    assert outside == [], f"the page requested something off the machine: {outside[:5]}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`difflora ui` in its own process, as a user starts it."""

    def __init__(self, workspace: Path, log: Path):
        self.workspace, self.log, self.port = workspace, log, free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def start(self, timeout_s: float = 120) -> "Server":
        env = dict(os.environ, PYTHONPATH=str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   OMP_NUM_THREADS="1", TQDM_DISABLE="1")
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen([sys.executable, "-m", "difflora", "ui", "--workspace", str(self.workspace),
                                          "--port", str(self.port)], stdout=fh, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited: {self.log.read_text()[-2000:]}")
            if "difflora ui: http" in self.log.read_text(errors="replace"):
                return self
            time.sleep(0.2)
        raise AssertionError(f"the server did not start in {timeout_s} s: {self.log.read_text()[-2000:]}")

    def stop(self, timeout_s: float = 120) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


@pytest.fixture
def server_factory(tmp_path):
    servers: list[Server] = []

    def make(workspace: Path) -> Server:
        s = Server(workspace, tmp_path / f"server{len(servers)}.log")
        servers.append(s)
        return s.start()

    yield make
    for s in servers:
        s.stop()


@pytest.fixture(scope="session")
def screenshots(tmp_path_factory) -> Path:
    """Screenshots of every page; DIFFLORA_UI_DOCS=1 also copies the README's two into docs/."""
    return tmp_path_factory.mktemp("ui_screenshots")
