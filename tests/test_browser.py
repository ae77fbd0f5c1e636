"""Every notebook runs cleanly in a real browser, and its widgets redraw their figures.

nbval (``make test``) checks the notebooks' outputs from a kernel; it never
renders a widget. This test does what a reader does: it starts JupyterLab on
127.0.0.1 (a free port, a random token), opens each ``notebooks/*.ipynb`` in
headless Chromium driven by Playwright, runs all cells (JupyterLab's own
"Run All Cells" command) and checks

* every code cell ran (it has an execution count) and no cell has an error
  output, in the notebook model and on the page;
* every widget on the page rendered (no "Error displaying widget");
* in every notebook with a widget (in its stored outputs or on the page),
  moving a control of the first interactive widget (a slider one step, by
  keyboard, or else a dropdown) changes the figure it draws (the ``src`` of
  the image in the widget's output), and the redraw shows no traceback.

It saves one screenshot per notebook (the widget cell after the move; for a
notebook without widgets, its first figure) into a temporary folder, so a
test run leaves the clone clean. The committed pictures of the notebooks in
a real browser, ``figures/browser/<notebook>.png``, are refreshed only on
request: ``make screenshots`` (``RINGBOOK_SCREENSHOTS=figures/browser``). On
a failure the page is saved under pytest's temporary directory and the
message says where.

What it runs on, so that the repository stays clean:

* JupyterLab serves a temporary copy of ``notebooks/*.ipynb`` (JupyterLab
  saves notebooks; the committed ones are never touched). The temporary root
  holds a copy of ``pyproject.toml`` (the notebooks find the repository root
  by looking for it upwards from their cwd) and of ``figures/`` with its
  subfolders (the notebooks read the committed benchmark JSON), so the figures
  the notebooks write land in the temporary ``figures/``.
* The kernel imports this checkout's ``ringbook`` (``PYTHONPATH``), as
  ``tools/build_notebooks.py`` does, and draws inline PNGs whatever
  ``MPLBACKEND`` the caller set.
* Jupyter's config, data, runtime, settings and workspace directories are
  temporary; ``tests/browser/overrides.json`` switches off the news and
  update pop-ups and toasts (clean screenshots, no network), attaches every
  cell to the page (no virtualisation, so page checks see every output) and
  switches off autosave.
* The server and the browser are stopped when the test ends, failed or not:
  running kernels are shut down through the REST API, then the server's
  process group gets SIGTERM, then SIGKILL.

Needs Chromium at ``/usr/bin/chromium`` (or ``$RINGBOOK_CHROMIUM``; ``make
test`` installs Debian's ``chromium`` when it is missing and it runs as root)
and the ``playwright`` Python package (``pip install -e ".[test]"``); no
Playwright browser download is used. ``RINGBOOK_SKIP_BROWSER=1`` skips it.
About 1.5 minutes on 2 idle CPU cores (3.5 on a loaded one): the
notebooks' own run time is most of it.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
# Where the screenshots go: a temporary folder, unless RINGBOOK_SCREENSHOTS names one (make screenshots).
SHOTS = Path(os.environ.get("RINGBOOK_SCREENSHOTS") or tempfile.mkdtemp(prefix="ringbook-screenshots-"))
OVERRIDES = Path(__file__).resolve().parent / "browser" / "overrides.json"
CHROMIUM = os.environ.get("RINGBOOK_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
STDERR = "application/vnd.jupyter.stderr"
VIEWPORT = {"width": 1400, "height": 1000}
SERVER_START_S = 90   # JupyterLab up and answering /api/status
PAGE_LOAD_S = 120     # JupyterLab loaded, the notebook open, its kernel idle
RUN_ALL_S = 300       # every cell of one notebook executed
REDRAW_S = 60         # a moved widget's figure redrawn

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("RINGBOOK_SKIP_BROWSER") == "1", reason="RINGBOOK_SKIP_BROWSER=1"),
]


def _has_widget(ipynb: Path) -> bool:
    nb = json.loads(ipynb.read_text())
    return any(
        WIDGET_VIEW in out.get("data", {})
        for cell in nb["cells"] if cell["cell_type"] == "code"
        for out in cell.get("outputs", [])
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A JupyterLab server on a temporary copy of the notebooks."""

    def __init__(self, base: Path):
        self.base = base
        self.port = _free_port()
        self.token = secrets.token_hex(24)
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = base / "jupyterlab.log"
        self.proc: subprocess.Popen | None = None

    def prepare(self) -> None:
        root = self.base / "root"
        (root / "notebooks").mkdir(parents=True)
        shutil.copy2(ROOT / "pyproject.toml", root / "pyproject.toml")  # the notebooks' repository-root marker
        # The committed results the notebooks read (figures/ and its subfolders), but not the screenshots.
        shutil.copytree(ROOT / "figures", root / "figures", ignore=shutil.ignore_patterns("browser"))
        for nb in NOTEBOOKS:
            shutil.copy2(nb, root / "notebooks" / nb.name)
        self.root = root
        for d in ("config", "data", "runtime", "lab-user-settings", "lab-workspaces", "lab-app-settings", "ipython"):
            (self.base / d).mkdir()
        shutil.copy2(OVERRIDES, self.base / "lab-app-settings" / "overrides.json")

    def start(self) -> None:
        env = dict(os.environ)
        env.update({
            "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
            "MPLBACKEND": "module://matplotlib_inline.backend_inline",
            "JUPYTER_CONFIG_DIR": str(self.base / "config"),
            "JUPYTER_DATA_DIR": str(self.base / "data"),
            "JUPYTER_RUNTIME_DIR": str(self.base / "runtime"),
            "JUPYTERLAB_SETTINGS_DIR": str(self.base / "lab-user-settings"),
            "JUPYTERLAB_WORKSPACES_DIR": str(self.base / "lab-workspaces"),
            "IPYTHONDIR": str(self.base / "ipython"),
            "JUPYTER_PLATFORM_DIRS": "1",
        })
        env.pop("JUPYTER_PATH", None)
        cmd = [
            sys.executable, "-m", "jupyter", "lab",
            "--no-browser", "--ServerApp.open_browser=False",
            "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={self.port}", "--ServerApp.port_retries=0",
            f"--ServerApp.token={self.token}",
            f"--ServerApp.root_dir={self.root / 'notebooks'}",
            f"--LabApp.app_settings_dir={self.base / 'lab-app-settings'}",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
            "--expose-app-in-browser",
        ]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            cmd.append("--allow-root")
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            cmd, cwd=self.root / "notebooks", env=env, stdout=self.log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"JupyterLab exited with status {self.proc.returncode} while starting:\n{self.log_tail()}")
            try:
                self.api("GET", "/api/status")
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"JupyterLab did not answer on {self.url} within {SERVER_START_S} s:\n{self.log_tail()}")
            time.sleep(0.5)

    def api(self, method: str, path: str, timeout: float = 10):
        req = urllib.request.Request(self.url + path, method=method, headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(req, timeout=timeout) as res:
            body = res.read()
        return json.loads(body) if body else None

    def shutdown_kernels(self) -> None:
        """Shut down every running kernel (they run in their own sessions, outside the server's group)."""
        try:
            for kernel in self.api("GET", "/api/kernels"):
                self.api("DELETE", f"/api/kernels/{kernel['id']}", timeout=30)
        except Exception:  # the server may be gone already; stop() still ends it
            pass

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no server log)"

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            children = []
            try:
                import psutil

                children = psutil.Process(self.proc.pid).children(recursive=True)
            except Exception:  # psutil is optional: the REST shutdown and SIGTERM cover the kernels
                pass
            if self.proc.poll() is None:
                self.shutdown_kernels()
                self._signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    self._signal(signal.SIGKILL)
                    self.proc.wait(timeout=15)
            for child in children:  # anything the server left behind
                try:
                    child.kill()
                except Exception:
                    pass
        finally:
            self.log.close()

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def playwright_browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail('the browser test needs the `playwright` Python package: pip install -e ".[test]" (or make test)')
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        pytest.fail(
            f"the browser test needs Chromium at {CHROMIUM}: install Debian's `chromium` package "
            "(apt-get install -y chromium; `make test` does it when run as root), "
            "or point RINGBOOK_CHROMIUM at a Chromium binary; RINGBOOK_SKIP_BROWSER=1 skips this test"
        )
    pw = sync_playwright().start()
    try:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()
    finally:
        pw.stop()


@pytest.fixture(scope="module")
def jupyterlab(tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("jupyterlab"))
    try:
        server.prepare()
        server.start()
        yield server
    finally:
        server.stop()


# JavaScript run in the page. `window.jupyterapp` is there because of --expose-app-in-browser.
JS_NOTEBOOK_READY = """name => {
    const app = window.jupyterapp;
    const panel = app && app.shell.currentWidget;
    if (!panel || !panel.context || panel.context.path !== name || !panel.context.isReady) return false;
    const kernel = panel.sessionContext.session && panel.sessionContext.session.kernel;
    return !!kernel && kernel.status === 'idle' && !!panel.content.node.querySelector('.jp-Cell');
}"""

# Not awaited: the bounded wait on JS_DONE below decides how long a run may take.
JS_RUN_ALL = """() => {
    window.jupyterapp.commands.execute('notebook:run-all-cells').catch(e => console.error('run-all-cells:', e));
}"""

JS_STATE = """() => {
    const panel = window.jupyterapp.shell.currentWidget;
    const cells = panel.content.model.cells;
    const state = {kernel: panel.sessionContext.session.kernel.status, code: 0, notRun: [], errors: []};
    for (let i = 0; i < cells.length; i++) {
        const cell = cells.get(i);
        if (cell.type !== 'code') continue;
        state.code += 1;
        if (cell.executionCount === null || cell.executionCount === undefined) state.notRun.push(i);
        for (const out of cell.outputs.toJSON()) {
            if (out.output_type === 'error') state.errors.push(`cell ${i}: ${out.ename}: ${out.evalue}`);
        }
    }
    return state;
}"""

JS_DONE = """() => {
    const panel = window.jupyterapp.shell.currentWidget;
    const cells = panel.content.model.cells;
    if (panel.sessionContext.session.kernel.status !== 'idle') return false;
    for (let i = 0; i < cells.length; i++) {
        const cell = cells.get(i);
        if (cell.type !== 'code') continue;
        const out = cell.outputs.toJSON();
        if (out.some(o => o.output_type === 'error')) return true;  // the run stopped here
        if (cell.executionCount === null || cell.executionCount === undefined) return false;
    }
    return true;
}"""

# The figure a widget draws: the data URI of the image in its output widget.
JS_WIDGET_IMAGE = """el => {
    const img = el.querySelector('.widget-output img');
    return img ? img.getAttribute('src') : null;
}"""

JS_REDRAWN = f"""([el, before]) => {{
    const src = ({JS_WIDGET_IMAGE})(el);
    if (src && src !== before) return true;
    const err = el.querySelectorAll(".jp-OutputArea-output[data-mime-type='{STDERR}']");
    return Array.from(err).some(e => e.innerText.includes('Traceback'));
}}"""


def _move_control(widget) -> str:
    """Move one control of ``widget`` (an ipywidgets box) and say which; the kernel then redraws."""
    handles = widget.locator(".widget-slider .noUi-handle")
    if handles.count():
        handle = handles.first
        before = handle.get_attribute("aria-valuenow")
        at_max = before is not None and before == handle.get_attribute("aria-valuemax")
        handle.focus()
        handle.press("ArrowLeft" if at_max else "ArrowRight")
        return f"slider {before} -> {handle.get_attribute('aria-valuenow')}"
    selects = widget.locator(".widget-dropdown select")
    if selects.count():
        select = selects.first
        options = select.locator("option").all_text_contents()
        current = select.input_value()
        choice = next(o for o in options if o.replace("\xa0", " ") != current)  # ipywidgets shows spaces as nbsp
        select.select_option(label=choice)
        return f"dropdown {current} -> {choice}"
    raise AssertionError("the widget has no slider or dropdown to move")


def _shown_errors(page) -> list[str]:
    """Tracebacks on the page: errors and stderr streams both render as stderr text (warnings have none).

    With windowing off, every cell's outputs are on the page, widget outputs included.
    """
    texts = page.locator(f".jp-OutputArea-output[data-mime-type='{STDERR}']").all_inner_texts()
    return [t[:2000] for t in texts if "Traceback" in t]


def _run_and_check(page, server: Server, ipynb: Path) -> str:
    """Open, run and check one notebook in ``page``; move its widget; save the screenshot."""
    name = ipynb.name
    page_errors: list[str] = []
    page.on("pageerror", lambda exc: page_errors.append(str(exc)))
    # A workspace per notebook, reset: nothing another test opened is restored.
    page.goto(f"{server.url}/lab/workspaces/{ipynb.stem}/tree/{name}?reset&token={server.token}",
              wait_until="domcontentloaded", timeout=PAGE_LOAD_S * 1000)
    try:
        page.wait_for_function(JS_NOTEBOOK_READY, arg=name, timeout=PAGE_LOAD_S * 1000, polling=500)
    except Exception as exc:
        raise AssertionError(
            f"{name}: JupyterLab did not open the notebook with an idle kernel within {PAGE_LOAD_S} s ({exc}); "
            f"page errors: {page_errors}\nserver log:\n{server.log_tail()}"
        ) from None

    t0 = time.monotonic()
    page.evaluate(JS_RUN_ALL)  # Run > Run All Cells
    try:
        page.wait_for_function(JS_DONE, timeout=RUN_ALL_S * 1000, polling=1000)
    except Exception:
        raise AssertionError(
            f"{name}: the cells did not finish within {RUN_ALL_S} s: {page.evaluate(JS_STATE)}\n"
            f"server log:\n{server.log_tail()}"
        ) from None
    summary = f"ran in {time.monotonic() - t0:.0f} s"

    state = page.evaluate(JS_STATE)
    assert not state["errors"], f"{name}: cells raised in the browser: {state['errors']}"
    assert state["code"] and not state["notRun"], f"{name}: code cells not run (indices): {state['notRun']}"
    shown = _shown_errors(page)
    assert not shown, f"{name}: the page shows an error:\n{shown[0]}"
    broken = [t for t in page.locator(".jupyter-widgets").all_inner_texts() if "Error displaying widget" in t]
    assert not broken, f"{name}: a widget failed to render: {broken[:3]}"

    widgets = page.locator(".widget-interact")
    if _has_widget(ipynb) or widgets.count():
        assert widgets.count(), f"{name} stores a widget, but no interactive widget rendered on the page"
        widget = widgets.first
        widget.scroll_into_view_if_needed()
        before = widget.evaluate(JS_WIDGET_IMAGE)
        assert before, f"{name}: the widget shows no figure before a control is moved"
        moved = _move_control(widget)
        buttons = widget.locator("button.widget-button")
        if buttons.count():  # a widget that measures on demand (notebook 05) redraws when its button is pressed
            buttons.first.click()
            moved += f", then pressed {buttons.first.inner_text().strip()!r}"
        try:  # until the figure changes, or the redraw shows a traceback
            page.wait_for_function(JS_REDRAWN, arg=[widget.element_handle(), before],
                                   timeout=REDRAW_S * 1000, polling=250)
        except Exception:
            raise AssertionError(f"{name}: moving the widget ({moved}) did not change its figure within {REDRAW_S} s") from None
        shown = _shown_errors(page)
        assert not shown, f"{name}: moving the widget ({moved}) shows an error:\n{shown[0]}"
        assert widget.evaluate(JS_WIDGET_IMAGE) != before, f"{name}: moving the widget ({moved}) did not change its figure"
        summary += f"; {moved} redrew the figure"
        target = widget
    else:
        figures = page.locator(".jp-OutputArea-output img")
        target = figures.first if figures.count() else page.locator(".jp-Cell").first

    # The screenshot: the widget cell (or the first figure) at the top of the notebook's view,
    # the side bar closed (its file list shows modification times).
    page.evaluate("() => window.jupyterapp.shell.collapseLeft()")
    target.evaluate("el => el.closest('.jp-Cell').scrollIntoView({block: 'start'})")
    page.wait_for_timeout(500)
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{ipynb.stem}.png"))
    return summary


@pytest.mark.skipif(not NOTEBOOKS, reason="no notebooks/*.ipynb")
@pytest.mark.parametrize("ipynb", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_in_the_browser_and_its_widgets_redraw(ipynb: Path, jupyterlab: Server, playwright_browser):
    context = playwright_browser.new_context(viewport=VIEWPORT, device_scale_factor=1)
    context.set_default_timeout(60_000)  # clicks, keys, screenshots on a loaded 2-core machine
    try:
        page = context.new_page()
        try:
            print(f"{ipynb.name}: {_run_and_check(page, jupyterlab, ipynb)}")
        except AssertionError as exc:
            shot = jupyterlab.base / f"failed-{ipynb.stem}.png"
            try:
                page.screenshot(path=str(shot))
            except Exception:
                raise exc from None
            raise AssertionError(f"{exc}\n(screenshot of the page: {shot})") from None
    finally:
        context.close()
        jupyterlab.shutdown_kernels()
