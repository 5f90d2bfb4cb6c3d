"""The static site in Chromium: built by ``v4lab.site`` (three notebooks, the index and the glossary, once per
session), served from 127.0.0.1, opened with Playwright and Debian's Chromium.

Checked on the index, the glossary and each notebook page: every plotly figure drew its SVG with content, the
browser logged no JavaScript error, every request went to the local server (each one is intercepted; anything
else is aborted and reported), and the links between pages lead to pages that exist, glossary anchors
included. Screenshots go to ``test-artifacts/site-*.png``. Skipped, saying why, only without Chromium or
Playwright. Building the three pages runs their notebooks: about a minute on an idle 2-core machine.
"""
from __future__ import annotations

import functools
import http.server
import json
import re
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest
from browser_env import CHROMIUM, CHROMIUM_ARGS, skip_reason

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"

# Three notebooks with figures of several kinds (lines, bars, a table figure) and widgets shown statically.
PAGES = ["00_tour", "09_hardware_and_cost", "11_deploying_v4"]


@pytest.fixture(scope="module")
def served_site(tmp_path_factory):
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    from v4lab import site
    out = tmp_path_factory.mktemp("site")
    t0 = time.time()
    times = site.build(out, only=PAGES, jobs=2, log=lambda *_: None)
    build_s = time.time() - t0
    handler = functools.partial(_QuietHandler, directory=str(out))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "site-build-timing.json").write_text(json.dumps(
        {"build_s": round(build_s, 1), "pages_s": {k: round(v, 1) for k, v in times.items()}}))
    try:
        yield {"dir": out, "base": f"http://127.0.0.1:{server.server_address[1]}"}
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def browser_context():
    """One Chromium context for the module (its HTTP and code caches make plotly.js cheaper after the first
    page), with every request intercepted: only the local server may answer, anything else is aborted and kept."""
    from playwright.sync_api import sync_playwright
    outside: list[str] = []

    def route(r):
        u = urlparse(r.request.url)
        if (u.scheme in ("http", "https") and u.hostname == "127.0.0.1") or u.scheme in ("data", "blob", "about"):
            r.continue_()
        else:
            outside.append(r.request.url)
            r.abort()
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        ctx = b.new_context(viewport={"width": 1280, "height": 900})
        ctx.route("**/*", route)
        try:
            yield ctx, outside
        finally:
            b.close()


class Visit:
    """One page of the shared context, with its own record of JavaScript errors and of outside requests."""

    def __init__(self, browser_context, base: str):
        self.base = base
        ctx, self._outside = browser_context
        self._seen = len(self._outside)
        self.page = ctx.new_page()
        self.page.set_default_timeout(120_000)
        self.errors: list[str] = []
        self.page.on("console",
                     lambda m: self.errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))

    @property
    def outside(self) -> list[str]:
        return self._outside[self._seen:]

    def open(self, path: str):
        self.page.goto(f"{self.base}/{path}", wait_until="load")
        return self.page

    def close(self):
        self.page.close()


FIGURES_JS = """() => Array.from(document.querySelectorAll('.plotly-graph-div')).map(el => {
  const svg = el.querySelector('svg.main-svg');
  const box = svg ? svg.getBoundingClientRect() : {width: 0, height: 0};
  return {id: el.id, svg: !!svg, w: box.width, h: box.height, traces: (el.data || []).length,
          drawn: el.querySelectorAll('.main-svg path, .main-svg rect, .main-svg image').length};
})"""


def _figures_done(page, expected: int):
    page.wait_for_function(
        "n => document.querySelectorAll('.plotly-graph-div .main-svg').length >= n", arg=expected, timeout=120_000)
    return page.evaluate(FIGURES_JS)


def _local_links(page) -> list[str]:
    return page.evaluate("() => Array.from(document.querySelectorAll('a[href]')).map(a => a.getAttribute('href'))")


def _check_links(served_site, hrefs: list[str], source: str):
    """Every link to a page of this site leads to a file that exists (and an anchor that exists in it)."""
    bad, checked = [], 0
    for href in hrefs:
        if re.match(r"^[a-z]+:", href) or href.startswith("#"):
            continue
        path, _, frag = href.partition("#")
        if not path.endswith(".html"):
            continue
        target = served_site["dir"] / path
        stem = Path(path).stem
        if not target.exists():
            if re.match(r"^\d\d_", stem) and stem not in PAGES:
                continue                        # a notebook this test does not build
            bad.append(href)
            continue
        checked += 1
        if frag and f'id="{frag}"' not in target.read_text(encoding="utf-8"):
            bad.append(href)
    assert not bad, f"{source}: links to missing pages or anchors: {bad}"
    return checked


@pytest.mark.parametrize("name", PAGES)
def test_notebook_page(served_site, browser_context, name):
    html_text = (served_site["dir"] / f"{name}.html").read_text(encoding="utf-8")
    expected = html_text.count("Plotly.newPlot(")
    assert expected > 0, f"{name}.html has no plotly figure"
    assert html_text.count('src="_static/plotly.min.js"') == 1, "plotly.js must be loaded exactly once"
    v = Visit(browser_context, served_site["base"])
    try:
        page = v.open(f"{name}.html")
        figs = _figures_done(page, expected)
        assert len(figs) == expected
        empty = [f for f in figs if not (f["svg"] and f["w"] > 0 and f["h"] > 0 and f["traces"] > 0 and f["drawn"] > 0)]
        assert not empty, f"{name}: figures not drawn: {empty}"
        notes = page.locator(".v4lab-static-note[data-widget]").count()
        assert notes >= 1, f"{name}: no widget figure carries the 'open in JupyterLab' note"
        page.screenshot(path=str(ARTIFACTS / f"site-{name}.png"))
        page.locator(".plotly-graph-div").first.scroll_into_view_if_needed()
        page.screenshot(path=str(ARTIFACTS / f"site-{name}-figure.png"))
        _check_links(served_site, _local_links(page), f"{name}.html")
        # the page's own way back: the nav bar to the glossary and the index
        page.click("nav.v4lab-site-nav a[href='glossary.html']")
        page.wait_for_selector("h3#gqa-8", state="attached")
        assert not v.errors, v.errors
        assert not v.outside, f"requests that left the machine: {v.outside}"
    finally:
        v.close()


def test_index_and_glossary(served_site, browser_context):
    v = Visit(browser_context, served_site["base"])
    try:
        page = v.open("index.html")
        links = _local_links(page)
        for name in PAGES:
            assert f"{name}.html" in links, f"the index does not link {name}.html"
        assert "glossary.html" in links
        page.screenshot(path=str(ARTIFACTS / "site-index.png"))
        assert _check_links(served_site, links, "index.html") >= len(PAGES) + 1
        # follow one link from the index and come back
        page.click(f"a[href='{PAGES[1]}.html']")
        page.wait_for_selector(".plotly-graph-div .main-svg", state="attached")
        assert page.url.endswith(f"/{PAGES[1]}.html")
        page.go_back()
        page.click("main a[href='glossary.html']")
        page.wait_for_selector("h3#mla", state="attached")
        glossary_links = _local_links(page)
        anchors = [h[1:] for h in glossary_links if h.startswith("#")]
        missing = [a for a in anchors if page.locator(f"[id='{a}']").count() == 0]
        assert anchors and not missing, f"glossary.html: table of contents links without a target: {missing}"
        assert page.locator("math").count() > 10, "the glossary's equations were not rendered as MathML"
        page.screenshot(path=str(ARTIFACTS / "site-glossary.png"))
        _check_links(served_site, glossary_links, "glossary.html")
        assert not v.errors, v.errors
        assert not v.outside, f"requests that left the machine: {v.outside}"
    finally:
        v.close()


def test_outside_requests_are_caught(served_site, browser_context):
    # the interception itself: a page that asks the network for a script is seen and refused
    (served_site["dir"] / "probe.html").write_text(
        '<html><body><script src="https://cdn.example.org/x.js"></script></body></html>')
    v = Visit(browser_context, served_site["base"])
    try:
        v.open("probe.html")
        assert v.outside == ["https://cdn.example.org/x.js"]
    finally:
        v.close()
