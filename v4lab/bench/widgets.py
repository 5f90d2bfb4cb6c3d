"""``v4lab bench widgets``: the latency of every widget callback, on CPU.

Every widget in :data:`v4lab.viz.REGISTRY` (all notebooks' widgets; see ``v4lab.viz.load_all``) is
built as a live ``go.FigureWidget`` and each control's callback (``on_<control>``) is called over
its sweep values, in order, a few passes; one record per (widget, control) with p50/p95/max in ms
against the issue's target (p95 <= 100 ms). A widget frontend adds rendering time in the browser
on top of this; this measures the Python side, which is what a callback can make slow.

The widgets that run the notebook model (``v4lab.viz.MODEL_WIDGETS``) are timed on the model the notebooks
use (``v4lab.viz.trained``: ``data/lab-v4`` when present); their records carry ``"weights"``. Two more records:

* ``attention.inspect`` / ``typing 256 (tiny-v4)``: typing new texts of 256 tokens into the inspector on
  ``data/tiny-v4`` (selected by ``$V4LAB_WEIGHTS`` for that record only), target p95 <= 100 ms;
* ``attention.inspect`` / ``typing 1024 (lab-v4)``: the same with texts of 1024 tokens on the lab model,
  target p95 <= 500 ms.
Every call there is a text not seen before, so every call runs the model once (the ``text`` records of the
sweep revisit the sample texts and mostly hit the per-text cache).

Widgets with ``needs_real_weights`` (``v4lab.viz.real``) read a DeepSeek-V4 download: they are timed on
``$V4LAB_REAL_WEIGHTS`` when it is configured, else on a synthetic ``tiny`` release written to a temporary
directory (said on stderr; their records carry ``"weights"``: the download's name or "synthetic tiny").
"""
from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from v4lab.errors import OneLineParser

TARGET_MS = 100.0
# typing a new text into notebook 02's inspector: (checkpoint, tokens, p95 target in ms); issue 15 (lab model,
# 1K tokens, 500 ms) and issue 21 (tiny-v4, at most 256 tokens as its texts were, 100 ms)
TYPING = (("tiny-v4", 256, 100.0), ("lab-v4", 1024, 500.0))


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    i = min(len(xs) - 1, max(0, int(round(q * (len(xs) - 1)))))
    return xs[i]


def run(quick: bool = False, progress: bool = False) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="v4lab-bench-") as tmp:
        return _run(quick, Path(tmp), progress)


def _real_weights(tmp: Path) -> tuple[Path, str]:
    """The download the real-weights widgets read: $V4LAB_REAL_WEIGHTS, else a synthetic tiny release."""
    from v4lab import real
    from v4lab.viz import real as vr
    if vr.configured():
        return real.real_weights_path(), real.open_real().config.name
    print("v4lab bench widgets: no real V4 download configured ($V4LAB_REAL_WEIGHTS); timing the real.* "
          "widgets on a synthetic tiny release", file=sys.stderr)
    return vr.write_demo_release(tmp / "synthetic-tiny"), "synthetic tiny"


def _run(quick: bool, tmp: Path, progress: bool = False) -> list[dict]:
    from v4lab.progress import bar
    from v4lab.viz import MODEL_WIDGETS, load_all, trained
    passes = 1 if quick else 3
    records = []
    weights = None                       # the real-weights download, found (or written) once
    widgets = sorted(load_all().items())
    with bar(len(widgets), "widgets", progress) as pb:
        for name, cls in widgets:
            pb.set_postfix_str(name)
            extra, kw = {}, {}
            if getattr(cls, "needs_real_weights", False):
                weights = weights or _real_weights(tmp)
                kw, extra = {"path": weights[0]}, {"weights": weights[1]}
            if name in MODEL_WIDGETS:
                extra = {"weights": trained.trained_model()[2].get("name", "synthetic")}
            try:
                records += _time_widget(name, cls, passes, kw, extra)
            except ValueError as e:       # one widget that fails on this model is a record, not the end of the run
                records.append({"bench": "widgets", "widget": name, "control": "-", "error": str(e), "ok": False,
                                **extra})
            pb.update(1)
    for name, tokens, target in TYPING:
        records += _typing(name, tokens, target, 4 if quick else 12)
    return records


def _typing(name: str, tokens: int, target_ms: float, n: int) -> list[dict]:
    """Typing ``n`` new texts of ``tokens`` tokens into the inspector on ``data/<name>``: every call runs the
    model once (consecutive slices of the model's held-out text, none seen before), then redraws."""
    import os

    from v4lab.viz import attention, trained
    path = trained.find_trained(name=name)
    if path is None:
        return []
    _, tok, _ = trained.trained_model(name=name)
    ids = tok.encode(trained.heldout_text(path) or "").ids
    texts = [t for t in (tok.decode(ids[i * tokens:(i + 1) * tokens]) for i in range(n + 1)) if t.strip()]
    if len(texts) < 2:
        return []
    old = os.environ.get(trained.WEIGHTS_ENV)
    os.environ[trained.WEIGHTS_ENV] = str(path)      # this record only: the widgets read the notebook model
    try:
        w = attention.InspectWidget(static=False, text=texts[0])
        times, lengths = [], []
        for t in texts[1:]:
            t0 = time.perf_counter()
            w.on_text(t)
            times.append((time.perf_counter() - t0) * 1e3)
            lengths.append(w.run.n_tokens)
    finally:
        if old is None:
            os.environ.pop(trained.WEIGHTS_ENV, None)
        else:
            os.environ[trained.WEIGHTS_ENV] = old
    p95 = _pct(times, 0.95)
    return [{"bench": "widgets", "widget": "attention.inspect", "control": f"typing {tokens} ({name})",
             "calls": len(times), "p50_ms": round(statistics.median(times), 2), "p95_ms": round(p95, 2),
             "max_ms": round(max(times), 2), "init_ms": None, "tokens": round(statistics.mean(lengths)),
             "target_p95_ms": target_ms, "ok": p95 <= target_ms, "weights": name}]


def _time_widget(name, cls, passes: int, kw: dict, extra: dict, only: str | None = None) -> list[dict]:
    """One record per control of one widget (``only``: that control): its callback over the sweep values,
    `passes` times."""
    records = []
    t0 = time.perf_counter()
    w = cls(static=False, **kw)
    init_ms = (time.perf_counter() - t0) * 1e3
    for control in ([only] if only else w.control_names):
        cb = getattr(w, f"on_{control}")
        values = list(w.sweep_values(control))
        times = []
        for p in range(passes):
            for v in (values if p % 2 == 0 else values[::-1]):
                t = time.perf_counter()
                cb(v)
                times.append((time.perf_counter() - t) * 1e3)
        cb(w.defaults[control]) if control in w.defaults else None
        p95 = _pct(times, 0.95)
        records.append({"bench": "widgets", "widget": name, "control": control, "calls": len(times),
                        "p50_ms": round(statistics.median(times), 2), "p95_ms": round(p95, 2),
                        "max_ms": round(max(times), 2), "init_ms": round(init_ms, 1),
                        "target_p95_ms": TARGET_MS, "ok": p95 <= TARGET_MS, **extra})
    return records


def main(argv: list[str] | None = None) -> int:
    ap = OneLineParser(prog="v4lab bench widgets", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="one sweep pass per control")
    ap.add_argument("--json", action="store_true", help="print a JSON list of records")
    from v4lab.progress import add_argument, enabled
    add_argument(ap)
    args = ap.parse_args(argv)
    recs = run(args.quick, enabled(not args.no_progress))
    if args.json:
        print(json.dumps(recs, indent=1))
        return 0
    print(f"{'widget':<22} {'control':<19} {'calls':>5} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8}  "
          f"p95 <= target  weights")
    for r in recs:
        if "error" in r:
            print(f"{r['widget']:<22} ERROR: {r['error']}")
            continue
        print(f"{r['widget']:<22} {r['control']:<19} {r['calls']:>5} {r['p50_ms']:>8.1f} {r['p95_ms']:>8.1f} "
              f"{r['max_ms']:>8.1f}  {'yes' if r['ok'] else 'NO':<3} {r['target_p95_ms']:>5g}  {r.get('weights', '')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
