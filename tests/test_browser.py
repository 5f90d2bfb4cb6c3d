"""The notebooks in a real JupyterLab, driven by Playwright with Debian's Chromium.

For each case: start JupyterLab headless (own port and token, every JUPYTER_* dir in a tmp dir), open
a copy of the notebook, Run All, check no cell raised, move a slider with the keyboard, and watch the
plotly figure's data change in the DOM. Screenshots of every widget go to ``test-artifacts/``
(git-ignored). Skipped, saying why, only when Chromium or Playwright is missing.

Add a notebook by adding a ``Case``: which slider (n-th ``.widget-slider`` on the page) to move,
which key moves it away from its start, and which figure (n-th ``.js-plotly-plot``) must change.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from browser_env import CHROMIUM, CHROMIUM_ARGS, skip_reason

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"

LAB_OVERRIDES = {
    "@jupyterlab/apputils-extension:notification": {"fetchNews": "false", "checkForUpdates": False},
    "@jupyterlab/docmanager-extension:plugin": {"autosave": False},
}


@dataclass(frozen=True)
class Case:
    notebook: str
    slider: int          # index among the page's .widget-slider elements
    key: str             # ArrowRight / ArrowLeft: a direction that moves it off its start value
    figure: int          # index among the page's .js-plotly-plot elements
    timeout_s: float = 240
    # fast moves: keys pressed without waiting, then the figure's title must name the slider's readout
    # (``follows`` formatted with it) — the notebook 05 freeze of issue 22
    rapid: tuple = ()
    follows: str = ""
    # Run All on a busy machine: each large widget module (plotly's 5 MB ESM, loaded once per figure) waits this
    # long before it finishes loading, until Run All is done. anywidget 0.11 gives a model 2 s to load and
    # otherwise drops every later message to it, silently (issue 22's Lossless freeze). With a delay the case
    # also checks that the timeout happened (the console says "Failed to initialize model").
    slow_esm_ms: int = 0


CASES = [
    Case("00_tour.ipynb", slider=0, key="ArrowLeft", figure=0),          # context 1M -> 512K
    Case("09_hardware_and_cost.ipynb", slider=0, key="ArrowRight", figure=0),   # roofline: batch 64 -> 128
    Case("02_compressed_attention.ipynb", slider=0, key="ArrowLeft", figure=0),  # query position last -> last-1
    Case("07_tiny_v4.ipynb", slider=0, key="ArrowRight", figure=0),      # routing: token 8 -> 9
    Case("10_decode_step_by_step.ipynb", slider=0, key="ArrowRight", figure=0),   # decode: token 129 -> 130
    Case("11_deploying_v4.ipynb", slider=0, key="ArrowRight", figure=0),  # routing: 1,000 -> 3,000 turns a month
    # lossless: spread 14 -> 15, then fast moves, after a Run All whose widget modules load slowly (issue 22's
    # freeze: the readout moved, the figure stayed at 2^14, no error in the notebook)
    Case("05_fp4.ipynb", slider=1, key="ArrowRight", figure=1, slow_esm_ms=3000,
         rapid=("ArrowRight",) * 4 + ("ArrowLeft",) * 13 + ("ArrowRight",) * 2, follows="spread 2^{} "),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str):
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


@pytest.fixture
def lab(tmp_path):
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    root = tmp_path / "nb"
    root.mkdir()
    settings = tmp_path / "app-settings"
    settings.mkdir()
    (settings / "overrides.json").write_text(json.dumps(LAB_OVERRIDES))
    env = dict(os.environ)
    for k, sub in (("JUPYTER_CONFIG_DIR", "config"), ("JUPYTER_DATA_DIR", "data"),
                   ("JUPYTER_RUNTIME_DIR", "runtime"), ("IPYTHONDIR", "ipython")):
        env[k] = str(tmp_path / sub)
    env.pop("V4LAB_STATIC", None)
    port, token = _free_port(), os.urandom(12).hex()
    jupyter = Path(sys.executable).with_name("jupyter")
    cmd = [str(jupyter), "lab", "--no-browser", "--allow-root", "--ip", "127.0.0.1", "--port", str(port),
           f"--ServerApp.token={token}", f"--ServerApp.root_dir={root}", "--LabApp.expose_app_in_browser=True",
           f"--LabServerApp.app_settings_dir={settings}", f"--LabServerApp.workspaces_dir={tmp_path / 'ws'}",
           f"--LabServerApp.user_settings_dir={tmp_path / 'user-settings'}"]
    log = open(tmp_path / "lab.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            _get(f"{base}/api/status?token={token}")
            break
        except Exception:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f"JupyterLab did not start:\n{(tmp_path / 'lab.log').read_text()[-3000:]}")
            time.sleep(0.5)
    try:
        yield {"base": base, "token": token, "root": root, "log": tmp_path / "lab.log"}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def _wait_kernel_ready(lab, deadline):
    """/api/kernels: idle AND a websocket connected (the status bar says idle too early)."""
    while time.time() < deadline:
        try:
            ks = _get(f"{lab['base']}/api/kernels?token={lab['token']}")
        except Exception:          # a 500 while the kernel is still starting: ask again
            time.sleep(0.5)
            continue
        if ks and all(k.get("execution_state") == "idle" and k.get("connections", 0) >= 1 for k in ks):
            return
        time.sleep(0.5)
    pytest.fail("kernel never became idle with a connection")


def _copy_without_skipped_cells(src: Path, dst: Path) -> None:
    """The notebook without its ``# NBVAL_SKIP`` cells (minutes-long reruns that nbval skips too), and with
    the exercises' solution cells unfolded: a collapsed input shows no execution prompt, which is how this
    test sees that a cell ran (the solutions still run; nbval checks what they assert)."""
    nb = json.loads(src.read_text())
    nb["cells"] = [c for c in nb["cells"]
                   if not (c["cell_type"] == "code" and "NBVAL_SKIP" in "".join(c["source"]).split("\n", 1)[0])]
    for c in nb["cells"]:
        c.get("metadata", {}).pop("jupyter", None)
    dst.write_text(json.dumps(nb))


# A JavaScript Blob of more than 1 MB (a widget's ESM: anywidget imports it from a blob URL) gets a top-level
# wait of window.__v4labSlowEsmMs first: the module loads that much later, as on a busy machine.
SLOW_ESM_JS = """(() => {
  window.__v4labSlowEsmMs = DELAY_MS;
  const Plain = window.Blob;
  window.Blob = class extends Plain {
    constructor(parts, opts) {
      const ms = window.__v4labSlowEsmMs;
      if (ms && opts && opts.type === "text/javascript" && parts && parts.length === 1
          && typeof parts[0] === "string" && parts[0].length > 1e6) {
        parts = [`await new Promise(r => setTimeout(r, ${ms}));\n` + parts[0]];
      }
      super(parts, opts);
    }
  };
})()"""


FIG_SIGNATURE = """el => JSON.stringify({
  title: (el.querySelector('.gtitle') || {}).textContent || '',
  data: (el.data || []).map(t => [t.x, t.y, t.text])
})"""


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.notebook if isinstance(c, Case) else None)
def test_notebook_in_jupyterlab(lab, case):
    from playwright.sync_api import sync_playwright

    src = ROOT / "notebooks" / case.notebook
    if not src.exists():
        pytest.skip(f"{case.notebook} does not exist yet")
    _copy_without_skipped_cells(src, lab["root"] / case.notebook)
    ARTIFACTS.mkdir(exist_ok=True)
    stem = Path(case.notebook).stem
    t0 = time.time()
    deadline = t0 + case.timeout_s
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        if case.slow_esm_ms:
            page.add_init_script(SLOW_ESM_JS.replace("DELAY_MS", str(case.slow_esm_ms)))
        console = []                      # the browser's errors, kept next to the screenshots
        page.on("console", lambda m: console.append(f"{m.type}: {m.text}") if m.type in ("error", "warning") else None)
        page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
        try:
            page.goto(f"{lab['base']}/lab/tree/{case.notebook}?reset&token={lab['token']}")
            page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60_000)
            _wait_kernel_ready(lab, deadline)
            run_all = "() => window.jupyterapp.commands.execute('notebook:run-all-cells')"
            page.evaluate(run_all)
            # every code cell gets an execution count: no "[*]" (running) and no "[ ]" (not run) left
            prompts_js = """() => Array.from(document.querySelectorAll('.jp-CodeCell .jp-InputPrompt'))
                              .map(e => e.textContent.trim())"""
            t_run, retries = time.time(), 0
            while True:
                prompts = page.evaluate(prompts_js)
                if prompts and all(x.startswith("[") and x[1:-2].strip().isdigit() for x in prompts):
                    break
                # Seen once on a loaded machine: Run All reached the notebook (selection at the last cell)
                # before the kernel connection did, and nothing ran. Nothing started after 30 s: ask again.
                if all(x == "[ ]:" for x in prompts) and time.time() - t_run > 30 and retries < 3:
                    _wait_kernel_ready(lab, deadline)
                    page.evaluate(run_all)
                    t_run, retries = time.time(), retries + 1
                if time.time() > deadline:
                    page.screenshot(path=str(ARTIFACTS / f"{stem}-timeout.png"), full_page=True)
                    pytest.fail(f"cells did not all run within {case.timeout_s}s: {prompts}")
                time.sleep(1)
            run_s = time.time() - t0
            if case.slow_esm_ms:
                page.wait_for_selector(".js-plotly-plot .main-svg", state="attached", timeout=150_000)
                time.sleep(case.slow_esm_ms / 1000 + 2)          # the last figures' modules finish loading
                page.evaluate("() => { window.__v4labSlowEsmMs = 0; }")
                assert any("Failed to initialize model" in m for m in console), \
                    f"the slow widget modules did not reproduce anywidget's timeout: {console}"
            errors = page.evaluate("""() => Array.from(document.querySelectorAll('.jp-OutputArea-output'))
                .map(e => e.textContent).filter(t => t.includes('Traceback') || t.includes('Error:'))""")
            assert errors == [], errors[:1]
            try:
                # attached, not visible: JupyterLab does not paint output scrolled out of view
                page.wait_for_selector(".js-plotly-plot .main-svg", state="attached", timeout=150_000)
            except Exception:
                out = page.locator(".jp-OutputArea-output").filter(has_text="rror")
                target = out.first if out.count() else page.locator(".jp-OutputArea-output").nth(1)
                target.scroll_into_view_if_needed()
                page.screenshot(path=str(ARTIFACTS / f"{stem}-no-figure.png"))
                raise
            figs = page.locator(".js-plotly-plot")
            sliders = page.locator(".widget-slider .noUi-handle")
            assert figs.count() > case.figure and sliders.count() > case.slider
            fig = figs.nth(case.figure)
            fig.scroll_into_view_if_needed()
            before = fig.evaluate(FIG_SIGNATURE)
            slider = page.locator(".widget-slider").nth(case.slider)
            readout = slider.locator(".widget-readout")
            r0 = readout.inner_text()
            handle = sliders.nth(case.slider)
            handle.scroll_into_view_if_needed()
            handle.focus()
            handle.press(case.key)
            t_key = time.time()
            while readout.inner_text() == r0 and time.time() - t_key < 3:
                time.sleep(0.2)
            if readout.inner_text() == r0:          # keyboard ignored: drag the handle instead
                box = handle.bounding_box()
                x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
                page.mouse.move(x, y)
                page.mouse.down()
                page.mouse.move(x + (-40 if case.key == "ArrowLeft" else 40), y, steps=8)
                page.mouse.up()
            assert readout.inner_text() != r0, f"the slider did not move (readout {r0!r})"
            after, t_move = before, time.time()
            while after == before and time.time() < max(deadline, t_move + 45):   # kernel round trip
                time.sleep(0.25)
                after = fig.evaluate(FIG_SIGNATURE)
            assert after != before, "the figure did not change after moving the slider"
            b, a = json.loads(before), json.loads(after)
            assert a["data"] != b["data"], "the plotly traces' data did not change"
            if case.rapid:
                handle.focus()
                for k in case.rapid:                 # as fast as the keyboard goes: no waiting in between
                    handle.press(k)
                want = case.follows.format(readout.inner_text().strip())
                t_fast, title = time.time(), ""
                while time.time() - t_fast < 60:
                    title = fig.evaluate(FIG_SIGNATURE)
                    if want in json.loads(title)["title"]:
                        break
                    time.sleep(0.25)
                fig.screenshot(path=str(ARTIFACTS / f"{stem}-rapid.png"))
                assert want in json.loads(title)["title"], f"after fast moves the figure does not show {want!r}"
            # screenshots: the whole page, and each widget (controls + figure)
            page.screenshot(path=str(ARTIFACTS / f"{stem}-page.png"))
            boxes = page.locator(".jp-OutputArea-output .widget-vbox")
            for i in range(boxes.count()):
                boxes.nth(i).scroll_into_view_if_needed()
                boxes.nth(i).screenshot(path=str(ARTIFACTS / f"{stem}-widget{i}.png"))
            total = time.time() - t0
            (ARTIFACTS / f"{stem}-timing.json").write_text(json.dumps(
                {"run_all_s": round(run_s, 1), "total_s": round(total, 1), "figures": figs.count(),
                 "widgets": boxes.count()}))
        finally:
            (ARTIFACTS / f"{stem}-console.txt").write_text("\n".join(console))
            browser.close()
