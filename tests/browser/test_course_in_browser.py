"""The course as a participant meets it: notebooks opened in JupyterLab in a real (headless) browser.

A fresh clone's notebooks are *untrusted* (trust is a signature in each user's own database), and
JupyterLab then renders only safe outputs: saved PNGs show, while a saved widget output falls back to
its text/plain, e.g. `interactive(children=(IntSlider(value=300, …` -- so every slider in the course
has a saved static figure next to it. `jupyter trust notebooks/*.ipynb` makes the saved widget state
(sliders and the picture they last showed) render as controls. Once the kernel runs the notebook its
new outputs are trusted, and widgets render as controls either way.

The notebooks run at the same time, one tab and one kernel each, with CI=1 (course.in_ci()). The
playground is opened twice: as a notebook in JupyterLab, and as `minisd playground` serves it (Voilà).

The fixtures: a JupyterLab server and a headless Chromium for the browser tests, both throw-away.

The server runs with everything of its own in a temporary folder (config, data -- so no notebook is
trusted --, runtime, settings, workspaces), autosave off (Run All never writes a notebook back), and a
kernel environment like a participant's: progress bars on (no TQDM_DISABLE), the inline matplotlib
backend (no MPLBACKEND), CI=1 so slow demos shorten (course.in_ci()), one OpenMP thread per kernel.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

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


def skip_without_browser() -> None:
    if os.environ.get("MINISD_BROWSER") == "0":  # a few minutes: MINISD_BROWSER=0 leaves them out
        pytest.skip("MINISD_BROWSER=0: the browser tests are left out")
    pytest.importorskip("playwright.sync_api", reason="the browser tests need the playwright package (pip install playwright)")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"the browser tests need Chromium at {CHROMIUM} (apt-get install chromium)")


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    skip_without_browser()
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


NOTEBOOKS = ["00_tour.ipynb", "01_forward_diffusion.ipynb", "08_guidance.ipynb", "10_lora.ipynb", "playground.ipynb"]
WITH_SLIDER = ["01_forward_diffusion.ipynb", "08_guidance.ipynb", "10_lora.ipynb"]
WITH_PROGRESS = ["10_lora.ipynb"]   # the training loop's bar (00's short bars close when done)
RUN_TIMEOUT_S = 420
# Browser console errors that say nothing about the course (none are known today).
HARMLESS_CONSOLE = [re.compile(p) for p in ()]
WIDGET_FALLBACK = re.compile(r"^(interactive|HBox|VBox|FloatProgress|IntProgress)\(")

IMAGES = "[...document.querySelectorAll('.jp-OutputArea-output img')].map(i => [i.naturalWidth, i.naturalHeight])"
IMAGES_LOADED = "[...document.querySelectorAll('.jp-OutputArea-output img')].every(i => i.complete)"
FALLBACK_TEXTS = ("[...document.querySelectorAll('.jp-OutputArea-output[data-mime-type=\"text/plain\"]')]"
                  ".map(e => e.textContent.trim())")
OUTPUT_TEXT = "[...document.querySelectorAll('.jp-OutputArea-output')].map(e => e.textContent).join('\\n')"
KERNEL_IDLE = ("window.jupyterapp && jupyterapp.shell.currentWidget"
               " && jupyterapp.shell.currentWidget.sessionContext.session?.kernel?.status === 'idle'")
RUN_FINISHED = (KERNEL_IDLE + " && ![...document.querySelectorAll('.jp-InputArea-prompt')]"
                ".some(e => e.textContent.includes('*'))")
NOT_EXECUTED = ("jupyterapp.shell.currentWidget.content.widgets"
                ".filter(c => c.model.type === 'code' && c.model.executionCount === null).length")
INTERACT_SRC = "document.querySelector('.widget-interact .jp-OutputArea-output img')?.src ?? null"


def saved_pngs(notebook: str) -> int:
    cells = json.loads((REPO / "notebooks" / notebook).read_text())["cells"]
    return sum("image/png" in out.get("data", {}) for c in cells for out in c.get("outputs", []))


def notebook_hashes() -> dict[str, str]:
    return {nb: hashlib.sha256((REPO / "notebooks" / nb).read_bytes()).hexdigest() for nb in NOTEBOOKS}


class Tab:
    """One notebook open in its own browser tab: what showed on opening, and the console's errors."""

    def __init__(self, browser, lab, notebook: str):
        self.notebook, self.console_errors = notebook, []
        self.page = browser.new_page()
        self.page.on("console", lambda m: self.console_errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.console_errors.append(f"page error: {e}"))
        self.page.goto(lab.url(notebook, workspace=notebook.split("_")[0].removesuffix(".ipynb")))
        n = saved_pngs(notebook)
        self.page.wait_for_function(f"document.querySelectorAll('.jp-OutputArea-output img').length >= {n}"
                                    f" && {IMAGES_LOADED}", timeout=120_000, polling=500)
        self.images_on_open = self.page.evaluate(IMAGES)
        self.fallbacks_on_open = [t for t in self.page.evaluate(FALLBACK_TEXTS) if WIDGET_FALLBACK.match(t)]

    def run_all(self) -> None:
        self.page.wait_for_function(KERNEL_IDLE, timeout=120_000, polling=500)
        self.started = time.time()
        self.page.evaluate("jupyterapp.commands.execute('notebook:run-all-cells')")

    def wait_until_run(self) -> float:
        """Seconds Run All took (measured from its start to the first check that finds it finished)."""
        self.page.wait_for_timeout(1000)
        self.page.wait_for_function(RUN_FINISHED, timeout=RUN_TIMEOUT_S * 1000, polling=1000)
        self.page.wait_for_function(IMAGES_LOADED, timeout=60_000, polling=500)
        return time.time() - self.started


@pytest.fixture(scope="module")
def hashes_before(lab):
    return notebook_hashes()


@pytest.fixture(scope="module")
def tabs(browser, lab, hashes_before):
    """The four notebooks opened, then Run All in all of them at once."""
    start = time.time()
    opened = {nb: Tab(browser, lab, nb) for nb in NOTEBOOKS}
    print(f"[browser] opened {len(opened)} notebooks in {time.time() - start:.0f} s")
    for tab in opened.values():
        tab.run_all()
    return opened


@pytest.fixture(scope="module")
def ran(tabs):
    seconds = {nb: tab.wait_until_run() for nb, tab in tabs.items()}
    print("[browser] Run All, seconds:", {nb: round(s) for nb, s in seconds.items()})
    return tabs


@pytest.mark.parametrize("notebook", NOTEBOOKS)
def test_saved_pictures_render_on_opening(tabs, notebook):
    tab = tabs[notebook]
    assert len(tab.images_on_open) >= saved_pngs(notebook), f"{notebook}: {tab.images_on_open}"
    assert all(w > 0 and h > 0 for w, h in tab.images_on_open), f"{notebook}: a saved picture did not load"


@pytest.mark.parametrize("notebook", NOTEBOOKS)
def test_run_all_renders_widgets_and_pictures(ran, notebook):
    page = ran[notebook].page
    assert page.evaluate(NOT_EXECUTED) == 0, f"{notebook}: Run All stopped early"
    assert "Traceback (most recent call last)" not in page.evaluate(OUTPUT_TEXT), f"{notebook}: a cell raised"
    fallbacks = [t for t in page.evaluate(FALLBACK_TEXTS) if WIDGET_FALLBACK.match(t)]
    assert not fallbacks, f"{notebook}: widgets shown as text: {fallbacks}"
    images = page.evaluate(IMAGES)
    assert images and all(w > 0 and h > 0 for w, h in images), f"{notebook}: {images}"
    if notebook in WITH_PROGRESS:
        assert page.locator(".jp-OutputArea-output .widget-hprogress").count() > 0, f"{notebook}: no progress bar"


@pytest.mark.parametrize("notebook", WITH_SLIDER)
def test_moving_a_slider_changes_the_picture(ran, notebook):
    """After Run All (whose last cells may unload what the slider uses), two key presses on the
    first slider redraw its picture without an error."""
    page = ran[notebook].page
    page.bring_to_front()
    before = page.evaluate(INTERACT_SRC)
    assert before, f"{notebook}: the slider shows no picture"
    handle = page.locator(".widget-interact .widget-slider .noUi-handle").first
    handle.scroll_into_view_if_needed()
    handle.focus()
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowRight")
    changed = f"(({INTERACT_SRC}) ?? {json.dumps(before)}) !== {json.dumps(before)}"
    page.wait_for_function(changed, timeout=120_000, polling=500)
    page.wait_for_function(KERNEL_IDLE, timeout=120_000, polling=500)
    error = page.locator(".widget-interact .jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
    assert error.count() == 0, f"{notebook}: {error.first.text_content()}"


def test_trusted_notebook_shows_saved_widget_state(browser, lab):
    """`jupyter trust` lets the saved slider and its saved picture render with no kernel run."""
    notebook = "11_controlnet.ipynb"   # not one the tests run: its widgets come from the file alone
    lab.trust(notebook)
    page = browser.new_page()
    page.goto(lab.url(notebook, workspace="trusted"))
    page.wait_for_selector(".widget-interact .widget-slider", timeout=120_000)
    page.wait_for_function(IMAGES_LOADED, timeout=60_000, polling=500)
    assert page.evaluate(INTERACT_SRC), "the saved picture of the slider is missing"
    page.close()


@pytest.mark.parametrize("notebook", NOTEBOOKS)
def test_no_browser_console_errors(ran, notebook):
    errors = [e for e in ran[notebook].console_errors if not any(p.search(e) for p in HARMLESS_CONSOLE)]
    assert not errors, f"{notebook}: {errors}"


def test_server_log_clean_and_notebooks_untouched(ran, lab, hashes_before):
    log = lab.log()
    assert "Traceback" not in log, log[log.index("Traceback") - 2000:][:6000]
    assert notebook_hashes() == hashes_before, "a notebook file changed on disk"


# ─── the playground as `minisd playground` serves it ──────────────────────────────────────────────────
VIEWS = "[...document.querySelectorAll('img.minisd-playground-view')].map(i => i.src)"
VIEWS_SHOWN = ("[...document.querySelectorAll('img.minisd-playground-view')]"
               ".filter(i => i.complete && i.naturalWidth > 0).length")


class Playground:
    """`minisd playground --no-browser` on a free port, its kernel set up as the notebooks' are."""

    def __init__(self, lab: Lab):
        self.port, self.log_path = free_port(), lab.tmp / "playground.log"
        self._log = self.log_path.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "minisd", "playground", "--no-browser", f"--port={self.port}"],
            env=lab.env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"minisd playground exited with {self.process.returncode}:\n{self.log()}")
            try:   # listening (a page request would start a kernel)
                socket.create_connection(("127.0.0.1", self.port), timeout=2).close()
                return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"minisd playground did not answer within 120 s:\n{self.log()}")

    def stop(self) -> None:
        self.process.send_signal(2)   # Ctrl-C: minisd removes its temporary folder
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture(scope="module")
def playground(browser, lab):
    server = Playground(lab)
    page = browser.new_page()
    errors = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: errors.append(f"request failed: {r.url}"))
    # Voilà links Font Awesome's stylesheet from a CDN, which an offline room cannot reach; the widgets
    # work without its icons. Answered empty here, so that any other failed request still shows.
    page.route("https://cdn.jsdelivr.net/npm/@fortawesome/**", lambda route: route.fulfill(
        status=200, content_type="text/css", body=""))
    start = time.time()
    page.goto(f"http://127.0.0.1:{server.port}/")
    page.wait_for_function(f"{VIEWS_SHOWN} >= 2", timeout=180_000, polling=250)
    print(f"[browser] the playground showed its first pictures after {time.time() - start:.1f} s")
    yield server, page, errors
    page.close()
    server.stop()


def redrawn(page, action, view: int = 0) -> float:
    """Seconds from `action()` until picture `view` changes."""
    before = page.evaluate(VIEWS)[view]
    start = time.time()
    action()
    page.wait_for_function(f"({VIEWS})[{view}] !== {json.dumps(before)} && {VIEWS_SHOWN} >= 2",
                           timeout=60_000, polling=50)
    return time.time() - start


def test_playground_serves_controls_and_pictures(playground):
    _, page, _ = playground
    assert page.locator(".widget-text input").count() >= 2, "the prompt boxes are missing"
    assert page.locator(".widget-slider").count() >= 3, "the sliders are missing"
    assert page.locator(".widget-checkbox input").count() == 2, "the LoRA and ControlNet switches are missing"
    fallbacks = [t for t in page.evaluate(OUTPUT_TEXT).split("\n") if WIDGET_FALLBACK.match(t.strip())]
    assert not fallbacks, f"widgets shown as text: {fallbacks}"


def test_playground_redraws_when_a_control_moves(playground):
    """A new seed, a new prompt and the LoRA switch each draw again; the step scrubber repaints."""
    _, page, _ = playground
    seed = page.locator(".widget-text", has_text="seed").locator("input")
    prompt = page.locator(".widget-text", has_text="prompt").locator("input")
    seconds = {
        "seed": redrawn(page, lambda: (seed.fill("7"), seed.press("Enter"))),
        "prompt": redrawn(page, lambda: (prompt.fill("a green square at the top"), prompt.press("Enter"))),
        "LoRA": redrawn(page, lambda: page.locator(".widget-checkbox input").first.check(), view=1),
    }
    handle = page.locator(".widget-slider").filter(has_text=re.compile(r"^step\d")).locator(".noUi-handle")
    handle.focus()
    seconds["step scrubber"] = redrawn(page, lambda: page.keyboard.press("ArrowLeft"))
    print("[browser] playground, seconds from a change to its new picture:",
          {k: round(v, 2) for k, v in seconds.items()})
    status = page.locator(".widget-html").last.text_content()
    assert "Error" not in status, status


def test_playground_no_console_errors_and_clean_log(playground):
    server, _, errors = playground
    assert not [e for e in errors if not any(p.search(e) for p in HARMLESS_CONSOLE)], errors
    assert "Traceback" not in server.log(), server.log()[-6000:]
