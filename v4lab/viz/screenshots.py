"""Render every registered widget's figure (its default state, the static fallback) to a PNG.

    python -m v4lab.viz.screenshots [OUT_DIR] [--only NAME ...]      # default docs/img/widgets, every widget

Used for the README. Drives Debian's Chromium through Playwright, fully offline: plotly.js is inlined
from the plotly package. Needs /usr/bin/chromium (or $V4LAB_CHROMIUM).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

CHROMIUM = os.environ.get("V4LAB_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m v4lab.viz.screenshots", description=__doc__.split("\n")[0])
    ap.add_argument("out", nargs="?", default="docs/img/widgets", help="output folder (default docs/img/widgets)")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="only these widgets (registry names)")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    out = Path(args.out)
    if not Path(CHROMIUM).exists():
        sys.stderr.write(f"v4lab: error: no Chromium at {CHROMIUM}\n")
        return 2
    from playwright.sync_api import sync_playwright
    from tqdm import tqdm

    from v4lab.viz import load_all
    registry = load_all()
    if args.only:
        unknown = sorted(set(args.only) - set(registry))
        if unknown:
            sys.stderr.write(f"v4lab: error: --only {unknown[0]!r}: not a widget; known: {', '.join(sorted(registry))}\n")
            return 2
        registry = {k: v for k, v in registry.items() if k in args.only}
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        page = browser.new_page(viewport={"width": 980, "height": 520})
        for name, cls in tqdm(sorted(registry.items()), desc="widgets"):
            if getattr(cls, "needs_real_weights", False):
                tqdm.write(f"{name}: skipped (reads a real V4 download; no screenshot of synthetic weights)")
                continue
            fig = cls(static=True).figure()
            fig.update_layout(width=960, height=max(420, fig.layout.height or 420))
            html = Path(tmp) / f"{name}.html"
            fig.write_html(html, include_plotlyjs=True, full_html=True)
            page.goto(html.as_uri())
            page.wait_for_selector(".js-plotly-plot .main-svg")
            page.locator(".js-plotly-plot").first.screenshot(path=str(out / f"{name}.png"))
        browser.close()
    n = sum(not getattr(c, "needs_real_weights", False) for c in registry.values())
    print(f"wrote {n} screenshots to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
