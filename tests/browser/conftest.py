"""A JupyterLab server and a headless Chromium for the browser tests, both throw-away.

The server runs with everything of its own in a temporary folder (config, data -- so no notebook is
trusted --, runtime, settings, workspaces), autosave off (Run All never writes a notebook back), and a
kernel environment like a participant's: progress bars on (no TQDM_DISABLE), the inline matplotlib
backend (no MPLBACKEND), CI=1 so slow demos shorten (course.in_ci()), one OpenMP thread per kernel.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
TOKEN = "minisd-browser-test"
# Without these Chromium keeps reaching for the network (updates, sync, QUIC), which a CI box may not have.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# JupyterLab settings, written as user settings: no autosave, every cell in the DOM, no news from the web.
LAB_SETTINGS = {
    "@jupyterlab/docmanager-extension/plugin": {"autosave": False},
    "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
}


def pytest_configure(config):
    config.addinivalue_line("markers", "browser: opens the course notebooks in JupyterLab in headless Chromium")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_settings(folder: Path) -> None:
    for plugin, values in LAB_SETTINGS.items():
        path = folder / f"{plugin}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))


class Lab:
    """A running `jupyter lab` on 127.0.0.1: its URL, environment and log."""

    def __init__(self, tmp: Path):
        self.tmp, self.port = tmp, free_port()
        self.env = {k: v for k, v in os.environ.items() if k not in ("TQDM_DISABLE", "MPLBACKEND")}
        self.env.update(CI="1", OMP_NUM_THREADS="1", IPYTHONDIR=str(tmp / "ipython"),
                        JUPYTER_CONFIG_DIR=str(tmp / "config"), JUPYTER_DATA_DIR=str(tmp / "data"),
                        JUPYTER_RUNTIME_DIR=str(tmp / "runtime"))
        write_settings(tmp / "settings")
        self.log_path = tmp / "server.log"

    def start(self) -> None:
        self._log = self.log_path.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--allow-root", f"--port={self.port}",
             "--ServerApp.ip=127.0.0.1", f"--ServerApp.token={TOKEN}", f"--ServerApp.root_dir={REPO}",
             "--LabApp.expose_app_in_browser=True",          # window.jupyterapp: run Lab commands, read kernel state
             "--LabApp.extension_manager=readonly",          # no PyPI look-ups
             f"--LabApp.user_settings_dir={self.tmp / 'settings'}", f"--LabApp.workspaces_dir={self.tmp / 'ws'}"],
            env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"jupyter lab exited with {self.process.returncode}:\n{self.log()}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/api/status?token={TOKEN}", timeout=2)
                return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"jupyter lab did not answer within 120 s:\n{self.log()}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()

    def url(self, notebook: str, workspace: str) -> str:
        """The notebook opened in its own workspace, so several tabs can each hold one."""
        return f"http://127.0.0.1:{self.port}/lab/workspaces/{workspace}/tree/notebooks/{notebook}?reset&token={TOKEN}"

    def trust(self, notebook: str) -> None:
        """Sign a notebook in this server's own trust database (the file is not modified)."""
        subprocess.run([sys.executable, "-m", "jupyter", "trust", str(REPO / "notebooks" / notebook)],
                       env=self.env, check=True, capture_output=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    if os.environ.get("MINISD_BROWSER") != "1":  # they take minutes: opt in
        pytest.skip("the browser tests run with MINISD_BROWSER=1 (JupyterLab + Chromium, several minutes)")
    pytest.importorskip("playwright.sync_api", reason="the browser tests need the playwright package (pip install playwright)")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"the browser tests need Chromium at {CHROMIUM} (apt-get install chromium)")
    server = Lab(tmp_path_factory.mktemp("lab"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser(lab):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(lab.tmp / "chromium"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1000})
        yield context
        context.close()
