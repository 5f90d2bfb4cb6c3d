"""Render every registered widget's figure (its default state, the static fallback) to a PNG.

    python -m v4lab.viz.screenshots [OUT_DIR] [--only NAME ...]      # default docs/img/widgets, every widget
    python -m v4lab.viz.screenshots test-artifacts/states --states   # the states issue 22 looked at

With ``--states`` each widget in :data:`STATES` is also rendered in the named states (``NAME@STATE.png``):
the states a browser walk-through found hard to read, kept so a reader of the PNGs can judge them again.

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


# widget -> [(label, {control: value})]: the states issue 22 names (applied in order through on_<control>)
STATES = {
    "tour.context": [("1M", {"context": 2 ** 20}), ("1K", {"context": 2 ** 10})],
    "moe.bias": [("delta+0.5", {"delta": 0.5}), ("delta-0.5", {"delta": -0.5})],
    "moe.affinity": [("shift+6", {"shift": 6.0})],
    "attention.inspect": [("window-layer", {"layer": 0}), ("hca-layer", {"layer": 2}),
                          ("query4", {"layer": 1, "position": 4})],
    "attention.compression": [("hca-layer", {"layer": 2})],
    "attention.compare": [("attention", {"measure": "attention"})],
    "attention.cost": [("1K", {"context": 1024})],
    "mhc.sinkhorn": [("iters3", {"iters": 3})],
    "mhc.gains": [("final", {"source": "final"})],
    "clamp.preacts": [("layer1", {"layer": 1})],
    "fp4.lossless": [("spread19", {"spread": 19}), ("spread5", {"spread": 5})],
    "fp4.block_error": [("student3-1024", {"dist": "student3", "block": 1024})],
    "stability.ar": [("churn", {"metric": "churn"})],
    "tiny.attention_maps": [("query127", {"query": 127}), ("head0", {"head": 0})],
    "kernels.compare": [("moe", {"kernel": "moe"})],
    "kernels.roofline": [("B200", {"gpu": "B200"})],
}


# notebook figures that are not widgets (module, builder with no arguments): NAME.png with --states
STATIC_FIGURES = {"moe.routing_load": ("moe", "build_routing"), "mhc.training": ("mhc", "build_training"),
                  "fp4.qat": ("fp4", "build_qat"), "stability.overhead": ("stability", "build_overhead"),
                  "stability.training_loads": ("stability", "build_training_loads"),
                  "moe.expansion_static": ("moe", "build_expansion")}


# the stored full runs of `v4lab experiment NAME` (benchmarks/experiments/NAME.json): experiment.NAME.png
EXPERIMENT_FIGURES = ("clamp", "ar", "qat", "subfp4", "mhc")


def static_figures(only: list[str] | None = None) -> dict:
    """name -> figure for :data:`STATIC_FIGURES` and the stored experiments (``only``: a subset of names)."""
    import importlib

    from v4lab.viz import experiments as exp_viz
    figs = {n: getattr(importlib.import_module(f"v4lab.viz.{m}"), f)() for n, (m, f) in STATIC_FIGURES.items()
            if only is None or n in only}
    figs.update({f"experiment.{e}": getattr(exp_viz, f"build_{e}")(exp_viz.load(e)) for e in EXPERIMENT_FIGURES
                 if only is None or f"experiment.{e}" in only})
    return figs


def _apply_state(w, changes: dict) -> None:
    for c, v in changes.items():
        if c not in w.control_names:
            raise ValueError(f"state {changes}: {c!r} is not a control of {w.name} ({w.control_names})")
        getattr(w, f"on_{c}")(v)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m v4lab.viz.screenshots", description=__doc__.split("\n")[0])
    ap.add_argument("out", nargs="?", default="docs/img/widgets", help="output folder (default docs/img/widgets)")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="only these widgets (registry names)")
    ap.add_argument("--states", action="store_true", help="also render the states in STATES (NAME@STATE.png)")
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
        unknown = sorted(set(args.only) - set(registry) - set(STATIC_FIGURES)
                         - {f"experiment.{e}" for e in EXPERIMENT_FIGURES})
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
            w = cls(static=True)
            shots = [(name, {})] + [(f"{name}@{label}", ch) for label, ch in (STATES.get(name, []) if args.states else [])]
            for stem, changes in shots:
                _apply_state(w, changes)
                fig = w.figure()
                fig.update_layout(width=960, height=max(420, fig.layout.height or 420))
                html = Path(tmp) / f"{stem}.html"
                fig.write_html(html, include_plotlyjs="directory", full_html=True)
                page.goto(html.as_uri(), timeout=180_000)
                page.wait_for_selector(".js-plotly-plot .main-svg")
                page.locator(".js-plotly-plot").first.screenshot(path=str(out / f"{stem}.png"))
        if args.states:
            for stem, fig in static_figures(args.only).items():
                fig.update_layout(width=960)
                html = Path(tmp) / f"{stem}.html"
                fig.write_html(html, include_plotlyjs="directory", full_html=True)
                page.goto(html.as_uri(), timeout=180_000)
                page.wait_for_selector(".js-plotly-plot .main-svg")
                page.locator(".js-plotly-plot").first.screenshot(path=str(out / f"{stem}.png"))
        browser.close()
    n = sum(not getattr(c, "needs_real_weights", False) for c in registry.values())
    print(f"wrote {n} screenshots to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
