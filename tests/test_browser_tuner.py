"""The reward tuner of notebook 01 as a person meets it: JupyterLab in a real (headless) browser.

Starts JupyterLab on the loopback address with a random token, opens a copy of notebook 01 in headless
Chromium (Debian's `chromium`, driven by Playwright), runs all cells from the Run menu, drags the
`politeness` slider with the mouse, and checks that the ranked table and the plotly histogram change;
then presses "Save config" and checks that the saved JSON changed. Screenshots go to
`test-artifacts/browser/`. JupyterLab is shut down on every path.

The copy of the notebook lives in a temporary folder (JupyterLab's root) with `run_dir` set to an
absolute temporary path, so the test writes nothing into the repository except its screenshots.
Skipped only when `/usr/bin/chromium` or the `playwright` module is missing; `.ci/run` installs both.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "01_reward_design.ipynb"
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "test-artifacts" / "browser"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
SERVER_START_S = 60  # JupyterLab answering /api/status
NOTEBOOK_RUN_S = 120  # Run All Cells, from the click to the last cell's summary.json
UI_S = 30  # one UI reaction: a slider drag re-rendering the table and the histogram, a save

pytestmark = [pytest.mark.browser, pytest.mark.timeout(300)]


def _require_browser():
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: install Debian's `chromium` package (.ci/run does)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("the `playwright` Python package is missing: `pip install -e '.[test]'` (make test does)")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until(predicate, timeout: float, what: str, interval: float = 0.2):
    """Poll `predicate` until it returns something truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


class Lab:
    """A JupyterLab server on 127.0.0.1 serving `root`, started and stopped by the test."""

    def __init__(self, root: Path, state: Path):
        self.root, self.state = root, state
        self.port, self.token = _free_port(), secrets.token_hex(24)
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = state / "jupyterlab.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        # Private config, runtime, settings and workspace folders: nothing from the user's own Jupyter
        # set-up leaks in, and no saved workspace or news prompt covers the notebook.
        env = dict(os.environ)
        for var, sub in [("JUPYTER_CONFIG_DIR", "config"), ("JUPYTER_RUNTIME_DIR", "runtime"),
                         ("JUPYTERLAB_SETTINGS_DIR", "settings"), ("JUPYTERLAB_WORKSPACES_DIR", "workspaces"),
                         ("IPYTHONDIR", "ipython")]:
            env[var] = str(self.state / sub)
            (self.state / sub).mkdir(parents=True, exist_ok=True)
        notification = self.state / "settings" / "@jupyterlab" / "apputils-extension"
        notification.mkdir(parents=True, exist_ok=True)
        (notification / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false"}))
        env["RLHF_PROJECT_ROOT"] = str(ROOT)  # the kernel finds data/ here; run_dir is absolute anyway
        env["PYTHONUNBUFFERED"] = "1"
        cmd = [
            sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={self.port}",
            "--ServerApp.port_retries=0", f"--IdentityProvider.token={self.token}",
            f"--ServerApp.root_dir={self.root}", "--LabApp.news_url=None",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
            "--LabApp.extension_manager=readonly",
        ] + (["--allow-root"] if os.geteuid() == 0 else [])  # CI runs as root
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=self.root, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        _wait_until(self._ready, SERVER_START_S, f"JupyterLab on {self.base} (log: {self.log_path})")

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"JupyterLab exited with {self.proc.returncode}:\n{self.log()}")
        try:
            with urllib.request.urlopen(f"{self.base}/api/status?token={self.token}", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""

    def stop(self) -> None:
        """Shut the server down through its API (kernels included), then terminate, then kill."""
        if self.proc is None:
            return
        try:
            if self.proc.poll() is None:
                try:
                    req = urllib.request.Request(f"{self.base}/api/shutdown", method="POST",
                                                 headers={"Authorization": f"token {self.token}"})
                    urllib.request.urlopen(req, timeout=5).close()
                    self.proc.wait(timeout=15)
                except (urllib.error.URLError, OSError, subprocess.TimeoutExpired):
                    pass
            for sig in (signal.SIGTERM, signal.SIGKILL):  # the server's own process group
                if self.proc.poll() is not None:
                    break
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
            # kernels run in sessions of their own; any still alive (a server that had to be killed) are
            # known by their connection file, which lies in this server's private runtime folder
            for pid in self._kernels_left():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        finally:
            self._log.close()

    def _kernels_left(self) -> list[int]:
        mark = str(self.state / "runtime").encode()
        pids = []
        for entry in Path("/proc").glob("[0-9]*"):
            try:
                if mark in entry.joinpath("cmdline").read_bytes() and int(entry.name) != os.getpid():
                    pids.append(int(entry.name))
            except (OSError, ValueError):
                continue
        return pids


@pytest.fixture
def lab(tmp_path):
    _require_browser()
    root, run_dir, state = tmp_path / "lab", tmp_path / "run", tmp_path / "state"
    for d in (root, run_dir, state):
        d.mkdir()
    nb = nbformat.read(str(NOTEBOOK), as_version=4)
    params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    params.source, n = re.subn(r'^run_dir: str = .*?(  #.*)?$', f"run_dir: str = {str(run_dir)!r}\\1",
                               params.source, count=1, flags=re.M)
    assert n == 1, f"no run_dir line in the parameters cell of {NOTEBOOK.name}"
    nbformat.write(nb, str(root / NOTEBOOK.name))
    server = Lab(root, state)
    try:
        server.start()
        server.run_dir = run_dir
        yield server
    finally:
        server.stop()


@pytest.fixture
def page(lab, tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1000})
        try:
            context.set_default_timeout(UI_S * 1000)
            yield context.pages[0] if context.pages else context.new_page()
        finally:
            context.close()


def _shot(page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path))
    return path


def _state(tuner) -> dict:
    """What a person reads off the tuner: the agreement line, the table, the histogram's title and bars."""
    plot = tuner.locator(".js-plotly-plot")
    return {"agreement": tuner.locator("p", has_text="Spearman rank agreement").text_content(),
            "table": tuner.locator("table.reward-table").text_content(),
            "title": plot.locator(".gtitle").text_content(),
            "bars": plot.locator(".trace.bars path").evaluate_all("ps => ps.map(p => p.getAttribute('d'))")}


def test_reward_tuner_in_jupyterlab(lab, page):
    for old in ARTIFACTS.glob("*.png"):
        old.unlink()
    try:
        _drive_tuner(lab, page)
    except Exception as e:
        try:
            where = f"screenshot {_shot(page, '99_failure.png')}"
        except Exception as shot_error:  # a browser that died cannot take one
            where = f"no screenshot ({shot_error.__class__.__name__})"
        raise AssertionError(f"{e.__class__.__name__}; {where}; JupyterLab log tail:\n{lab.log()}") from e


def _drive_tuner(lab, page):
    from playwright.sync_api import expect

    config_path = lab.run_dir / "rewards" / "reward_config.json"
    summary_path = lab.run_dir / "rewards" / "summary.json"
    politeness = lambda config: next(t["weight"] for t in config["terms"] if t["type"] == "politeness")

    # a widget that fails in the browser often says so only in the console
    errors = []
    page.on("pageerror", lambda e: errors.append(f"uncaught: {e}"))
    page.on("console", lambda m: errors.append(f"console.error: {m.text}") if m.type == "error" else None)

    page.goto(f"{lab.base}/lab/tree/{NOTEBOOK.name}?token={lab.token}")
    notebook = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden)")
    expect(notebook).to_be_visible(timeout=60_000)
    # the kernel is started, connected and idle before anything runs (before that the status bar says
    # "No Kernel | Initializing", then "Connecting", and Run All would ask which kernel to start)
    expect(page.locator(".jp-StatusBar-Widget")).to_contain_text("Python 3 (ipykernel) | Idle", timeout=60_000)
    expect(notebook.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']")).to_be_attached()

    # Run → Run All Cells, from the menu bar, as a person does
    page.locator(".lm-MenuBar-item", has_text=re.compile(r"^Run$")).click()
    page.get_by_role("menuitem", name=re.compile(r"^Run All Cells")).click()

    # the tuner renders: a prompt picker, a slider per component, the histogram, Save, the ranked table
    tuner = notebook.locator(".widget-vbox", has=page.locator(".widget-hslider")).filter(
        has=page.locator("table.reward-table")).last
    slider = tuner.locator(".widget-hslider", has=page.locator("label", has_text=re.compile(r"^politeness$")))
    expect(slider).to_be_visible(timeout=NOTEBOOK_RUN_S * 1000)
    expect(tuner.locator("table.reward-table")).to_be_visible()
    expect(tuner.locator(".js-plotly-plot .gtitle")).to_contain_text("Spearman with gold")
    expect(tuner.locator(".widget-hslider")).to_have_count(8)
    picker = tuner.locator(".widget-dropdown select")
    status = tuner.locator(".widget-html", has_text="Saved")

    # the whole notebook has run: its last code cell wrote summary.json, and no cell is still queued
    _wait_until(summary_path.exists, NOTEBOOK_RUN_S, f"{summary_path} (Run All Cells finishing)")
    expect(notebook.locator(".jp-InputPrompt", has_text="[*]")).to_have_count(0, timeout=NOTEBOOK_RUN_S * 1000)
    saved_by_cell = json.loads(config_path.read_text())
    assert politeness(saved_by_cell) == 0.0

    # bring the top of the tuner (prompt picker, sliders, histogram, Save button) into view. JupyterLab
    # lays out cells outside the window lazily, with estimated heights, so one scroll can land short
    # while the cells it passes take their real size: scroll again until the handle stays in view.
    def handle_in_view() -> bool:
        tuner.evaluate("el => el.scrollIntoView({block: 'start'})")
        page.wait_for_timeout(300)
        return slider.locator(".noUi-handle").evaluate(
            "h => { const r = h.getBoundingClientRect(); return r.top >= 0 && r.bottom <= window.innerHeight; }")

    _wait_until(handle_in_view, 15, "the tuner's sliders to scroll into view")
    expect(slider.locator(".noUi-handle")).to_be_in_viewport()
    expect(tuner.locator(".js-plotly-plot")).to_be_in_viewport()
    # everything reads as it should: the picker shows "all prompts", no slider's readout is cut off
    # (ipywidgets writes the options' spaces as no-break spaces)
    shown = picker.evaluate("s => s.selectedIndex < 0 ? null : s.options[s.selectedIndex].text.replace(/\\u00a0/g, ' ')")
    assert shown == "all prompts", f"the prompt picker shows {shown!r}, not 'all prompts'"
    clipped = tuner.locator(".widget-hslider .widget-readout").evaluate_all(
        "rs => rs.filter(r => { const a = r.getBoundingClientRect(), b = r.closest('.widget-box').getBoundingClientRect();"
        " return r.scrollWidth > r.clientWidth + 1 || a.right > b.right + 1; }).map(r => r.textContent)")
    assert not clipped, f"slider readouts cut off by their container: {clipped}"
    before = _state(tuner)
    assert before["bars"], "the histogram has no bars"
    print(f"\nrendered:      {before['agreement']!r} | {before['title']!r}")
    shots = [_shot(page, "01_tuner_rendered.png")]

    # drag the politeness handle to about 60% of its track, with the mouse
    readout = slider.locator(".widget-readout")
    expect(readout).to_have_text("0.00")
    handle, track = slider.locator(".noUi-handle"), slider.locator(".noUi-base")
    h, t = handle.bounding_box(), track.bounding_box()
    y = h["y"] + h["height"] / 2
    page.mouse.move(h["x"] + h["width"] / 2, y)
    page.mouse.down()
    page.mouse.move(t["x"] + 0.6 * t["width"], y, steps=12)
    page.mouse.up()
    expect(readout).not_to_have_text("0.00")
    new_weight = float(readout.text_content())
    assert 0.3 <= new_weight <= 0.9, new_weight

    # the kernel re-ranks, and the table, the agreement and the histogram follow
    expect(tuner.locator("table.reward-table")).not_to_have_text(before["table"])
    expect(tuner.locator("p", has_text="Spearman rank agreement")).not_to_have_text(before["agreement"])
    expect(tuner.locator(".js-plotly-plot .gtitle")).not_to_have_text(before["title"])
    page.wait_for_function(
        "([plot, old]) => { const d = Array.from(plot.querySelectorAll('.trace.bars path')).map(p => p.getAttribute('d'));"
        " return d.length > 0 && d.join('|') !== old; }",
        arg=[tuner.locator(".js-plotly-plot").element_handle(), "|".join(before["bars"])], timeout=UI_S * 1000)
    after = _state(tuner)
    print(f"politeness {new_weight:.2f}: {after['agreement']!r} | {after['title']!r}")
    for key in before:
        assert after[key] != before[key], f"the {key} did not change when the politeness slider moved"
    shots.append(_shot(page, "02_after_politeness_slider.png"))

    # the prompt picker narrows the table to one prompt and goes back to all of them
    one = picker.evaluate("s => s.options[1].text")
    picker.select_option(label=one)
    prompt_cells = tuner.locator("table.reward-table td:nth-child(2)")
    expect(prompt_cells.first).to_have_text(one.split(":")[0])
    expect(prompt_cells).to_have_text([one.split(":")[0]] * prompt_cells.count())
    picker.select_option(label="all prompts")
    expect(tuner.locator("table.reward-table")).to_have_text(after["table"])

    # Save config writes the tuned weights, and says so
    status_before = status.text_content()
    mtime = config_path.stat().st_mtime_ns
    tuner.get_by_role("button", name="Save config").click()
    expect(status).not_to_have_text(status_before)
    expect(status).to_contain_text("Saved at")
    _wait_until(lambda: config_path.stat().st_mtime_ns != mtime, UI_S, f"{config_path} rewritten")
    saved_by_button = json.loads(config_path.read_text())
    assert politeness(saved_by_button) == pytest.approx(new_weight), (politeness(saved_by_button), new_weight)
    assert saved_by_button != saved_by_cell
    shots.append(_shot(page, "03_after_save.png"))
    assert not errors, "errors in the browser console:\n" + "\n".join(errors)
    print("screenshots:", *map(str, shots))
