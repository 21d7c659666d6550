"""Notebook 01 in a real JupyterLab, driven in headless Chromium through Playwright.

Starts JupyterLab on 127.0.0.1 with a random token (everything it writes goes to pytest's tmp_path), opens
``01_masking.ipynb``, runs all cells from the Run menu, moves the explorer's r_t slider with the keyboard and checks
that the "chosen by loss" count and the AnatoMask panel of the plot changed. Screenshots land in tmp_path.

Opt-in: ``make test-browser`` (see conftest.py). Uses Debian's chromium (scripts/ensure_chromium.sh), never a
browser downloaded by Playwright.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from anatomask_lab.masking import mask_counts

REPO = Path(__file__).resolve().parents[2]
NOTEBOOK = "01_masking.ipynb"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# As root in a closed network: no sandbox, no GPU, no background connections (they are refused here anyway).
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 120_000  # per browser wait; the machine is small and shared, the whole test takes ~25 s

pytestmark = pytest.mark.browser


# -- JupyterLab server ----------------------------------------------------------------------------------------------
class Lab:
    """A running JupyterLab: its base URL, token, log file and process."""

    def __init__(self, url: str, token: str, log: Path, proc: subprocess.Popen) -> None:
        self.url, self.token, self.log, self.proc = url, token, log, proc

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def get(self, path: str, *, with_token: bool = True):
        """(status, headers, body) of a GET that does not follow redirects."""
        headers = {"Authorization": f"token {self.token}"} if with_token else {}
        opener = urllib.request.build_opener(_NoRedirect)
        try:
            with opener.open(urllib.request.Request(self.url + path, headers=headers), timeout=5) as r:
                return r.status, r.headers, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.headers, e.read()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM JupyterLab (it shuts its kernels down), then SIGKILL what is left of its own process group."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    try:  # a kernel that outlived the server (its own session started with the server's, see start_new_session)
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


@pytest.fixture
def lab(tmp_path):
    """JupyterLab on 127.0.0.1:<free port> with a random token, serving a copy of the notebooks; always stopped."""
    root, home = tmp_path / "root", tmp_path / "jupyter"
    root.mkdir()
    shutil.copy(REPO / "notebooks" / NOTEBOOK, root / NOTEBOOK)
    # The kernel is this interpreter (the repo's .venv): a kernelspec on JUPYTER_PATH, which is searched first.
    spec = home / "data" / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (.venv)", "language": "python"}))
    # No "official Jupyter news?" popup and no update check (no network here, and it would cover the page).
    settings = home / "lab-settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False}))

    env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTER", "IPYTHON"))}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        JUPYTER_PATH=str(home / "data"), JUPYTER_CONFIG_DIR=str(home / "config"), JUPYTER_DATA_DIR=str(home / "data"),
        JUPYTER_RUNTIME_DIR=str(home / "runtime"), IPYTHONDIR=str(home / "ipython"),
        JUPYTERLAB_SETTINGS_DIR=str(home / "lab-settings"), JUPYTERLAB_WORKSPACES_DIR=str(home / "workspaces"),
    )
    port, token = _free_port(), secrets.token_hex(24)
    cmd = [str(Path(sys.executable).parent / "jupyter"), "lab", "--no-browser", "--allow-root",
           "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
           f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
           "--LabApp.extension_manager=readonly", "--LabApp.news_url=",
           "--LabApp.check_for_updates_class=jupyterlab.handlers.announcements.NeverCheckForUpdate"]
    log = tmp_path / "jupyterlab.log"
    with open(log, "w") as log_file:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                start_new_session=True)
    server = Lab(f"http://127.0.0.1:{port}", token, log, proc)
    try:
        deadline = time.monotonic() + 60
        while True:  # wait for /api/status to answer the token
            assert proc.poll() is None, f"JupyterLab exited with {proc.returncode}; log:\n{server.log_tail()}"
            try:
                if server.get("/api/status")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, (
                f"JupyterLab did not answer on 127.0.0.1:{port} within 60 s; log:\n{server.log_tail()}")
            time.sleep(0.25)
        yield server
    finally:
        _stop(proc)


# -- the test -------------------------------------------------------------------------------------------------------
def test_notebook_01_runs_and_r_t_slider_redraws(lab, tmp_path):
    from playwright.sync_api import sync_playwright  # imported here so that `make test` collects without it

    # The server is on 127.0.0.1 only, and refuses requests without the token.
    status, _, _ = lab.get("/api/contents", with_token=False)
    assert status == 403, f"/api/contents without the token answered {status}, expected 403"
    status, headers, _ = lab.get("/lab", with_token=False)
    assert status == 302 and "/login" in headers.get("Location", ""), (
        f"/lab without the token answered {status} (Location {headers.get('Location')}), expected 302 to /login")
    port = int(lab.url.rsplit(":", 1)[1])
    with socket.socket() as s:  # another loopback address: refused when bound to 127.0.0.1 alone
        assert s.connect_ex(("127.0.0.2", port)) != 0, "JupyterLab also listens beyond 127.0.0.1"
    # ... and the notebook's kernel is the repo's .venv interpreter.
    kernelspecs = json.loads(lab.get("/api/kernelspecs")[2])
    argv = kernelspecs["kernelspecs"]["python3"]["spec"]["argv"]
    assert argv[0] == sys.executable, f"kernel python3 runs {argv[0]}, expected {sys.executable}"

    shots = tmp_path / "screenshots"
    shots.mkdir()
    page_errors: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1000})
        try:
            page = browser.pages[0] if browser.pages else browser.new_page()
            page.set_default_timeout(TIMEOUT_MS)
            page.on("pageerror", lambda e: page_errors.append(str(e)))
            try:
                _drive(page, lab, shots)
            except Exception:
                page.screenshot(path=shots / "failure.png")
                print(f"failure screenshot: {shots / 'failure.png'}\npage errors: {page_errors}\n"
                      f"JupyterLab log:\n{lab.log_tail()}")
                raise
        finally:
            browser.close()
    print(f"screenshots: {sorted(str(p) for p in shots.iterdir())}")


def _drive(page, lab: Lab, shots: Path) -> None:
    """Open the notebook, run all cells, move r_t one notch at a time and check the label and the plot."""
    statusbar = "document.querySelector('#jp-main-statusbar')?.innerText.includes('{}')"
    page.goto(f"{lab.url}/lab/tree/{NOTEBOOK}?token={lab.token}")
    page.wait_for_selector(".jp-Notebook")
    page.wait_for_function(statusbar.format("Python 3 (.venv) | Idle"))  # our kernel is up

    # Run > Run All Cells, then wait until every code cell has an execution count and the last one printed.
    page.click("li.lm-MenuBar-item:has-text('Run')")
    page.click(".lm-Menu-item:has(.lm-Menu-itemLabel:text-is('Run All Cells'))")
    # JupyterLab renders only the cells in view (windowed notebook), so the prompts of cells scrolled away are
    # blank: wait for the last code cell to show the execution count that every code cell run once gives
    n_code = sum(c["cell_type"] == "code" for c in json.loads((REPO / "notebooks" / NOTEBOOK).read_text())["cells"])
    page.wait_for_function("""n => {
        const prompts = [...document.querySelectorAll('.jp-CodeCell .jp-InputArea-prompt')];
        return prompts.length > 0 && prompts.at(-1).innerText.trim() === `[${n}]:`;
    }""", arg=n_code)
    errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr'], "
                          ".jp-RenderedText[data-mime-type='application/vnd.jupyter.error']")
    assert errors.count() == 0, f"a cell failed: {errors.first.inner_text()[:2000]}"
    assert "'n_masked'" in page.locator(".jp-CodeCell").last.locator(".jp-OutputArea").inner_text()

    # The explorer: its r_t slider, its counts label and its plotly FigureWidget, rendered.
    explorer = page.locator(".widget-vbox:has(.widget-hslider label:text-is('r_t'))")
    assert explorer.count() == 1, f"expected one MaskExplorer widget, found {explorer.count()}"
    handle = explorer.locator(".widget-hslider:has(label:text-is('r_t')) .noUi-handle")
    info = explorer.locator(".widget-html-content:has-text('chosen by loss')")
    plot = explorer.locator(".js-plotly-plot")
    plot.locator("g.subplot.x2y2 image").last.wait_for()  # the AnatoMask panel's mask overlay is drawn
    explorer.scroll_into_view_if_needed()
    explorer.screenshot(path=shots / "explorer_before.png")
    before = _state(explorer, handle, info, plot)
    n_masked, n, gamma = before["n_masked"], before["n"], before["gamma"]
    assert (n_masked, before["n_top"]) == mask_counts(n, gamma, before["r_t"]), f"label disagrees: {before}"

    # Move r_t with the keyboard: four steps of 0.05 to the right (0.50 -> 0.70).
    handle.focus()
    for _ in range(4):
        handle.press("ArrowRight")
    page.wait_for_function("h => Math.abs(parseFloat(h.getAttribute('aria-valuenow')) - 0.7) < 1e-6",
                           arg=handle.element_handle())
    expected_top = mask_counts(n, gamma, 0.7)[1]
    info.filter(has_text=f"{expected_top} chosen by loss").wait_for()  # the kernel answered
    page.wait_for_function("([p, old]) => [...p.querySelectorAll('g.subplot.x2y2 image')].at(-1)"
                           "?.getAttribute('href') !== old", arg=[plot.element_handle(), before["anatomask_png"]])
    after = _state(explorer, handle, info, plot)
    explorer.screenshot(path=shots / "explorer_after.png")
    page.screenshot(path=shots / "lab_after.png")

    assert after["n_top"] == expected_top != before["n_top"], f"chosen-by-loss count: {before} -> {after}"
    assert after["n_masked"] == n_masked, "moving r_t must not change the masked count"
    assert after["anatomask_png"] != before["anatomask_png"], "the AnatoMask panel did not change"
    assert after["random_png"] == before["random_png"], "the random panel changed, but r_t does not drive it"


def _state(explorer, handle, info, plot) -> dict:
    """Slider values, the label's counts, and the rendered mask-overlay images of both panels (PNG data URLs)."""
    text = info.inner_text()
    m = re.search(r"(\d+) of (\d+) patches masked .*?; (\d+) chosen by loss", text)
    assert m, f"unexpected counts label: {text!r}"
    overlay = "g.subplot.{} image >> nth=-1"  # per panel: the grey image first, the red mask overlay last
    gamma = explorer.locator(".widget-hslider:has(label:text-is('gamma')) .noUi-handle")
    return {"r_t": float(handle.get_attribute("aria-valuenow")), "gamma": float(gamma.get_attribute("aria-valuenow")),
            "n_masked": int(m[1]), "n": int(m[2]), "n_top": int(m[3]),
            "random_png": plot.locator(overlay.format("xy")).get_attribute("href"),
            "anatomask_png": plot.locator(overlay.format("x2y2")).get_attribute("href")}
