"""The course as a participant meets it: notebooks opened in JupyterLab in a real (headless) browser.

A fresh clone's notebooks are *untrusted* (trust is a signature in each user's own database), and
JupyterLab then renders only safe outputs: saved PNGs show, while a saved widget output falls back to
its text/plain, e.g. `interactive(children=(IntSlider(value=300, …` -- so every slider in the course
has a saved static figure next to it. `jupyter trust notebooks/*.ipynb` makes the saved widget state
(sliders and the picture they last showed) render as controls. Once the kernel runs the notebook its
new outputs are trusted, and widgets render as controls either way.

The four notebooks run at the same time, one tab and one kernel each, with CI=1 (course.in_ci()).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[2]

NOTEBOOKS = ["00_tour.ipynb", "01_forward_diffusion.ipynb", "08_guidance.ipynb", "10_lora.ipynb"]
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
        self.page.goto(lab.url(notebook, workspace=notebook.split("_")[0]))
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
