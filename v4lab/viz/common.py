"""The widget pattern every v4lab notebook uses.

A topic module (``v4lab/viz/tour.py``, ``cost.py`` ...) writes three things per figure:

* ``x_data(**state) -> {"traces": [dict, ...], "layout": dict}`` — the numbers, cheap to recompute.
  Every trace dict carries its ``type``; the number of traces never depends on the state, so a
  widget can update trace ``i`` in place.
* ``build_x(**state) -> go.Figure`` — pure; the static fallback and what tests and the README use.
  Usually just ``figure_from(x_data(**state), base_layout)``.
* a :class:`Widget` subclass: ipywidgets controls + a ``go.FigureWidget`` that callbacks update in
  place (``fig.data[i].update(...)`` inside ``fig.batch_update()``). One method per control,
  ``on_<control>(value)``, which tests and ``v4lab bench widgets`` call directly.

Widgets register themselves with :func:`register` so the benchmark finds every notebook's widgets.
With no widget frontend (``V4LAB_STATIC=1``, or not running inside a Jupyter kernel) ``display()``
shows a static figure instead, and the ``fig`` attribute is a plain ``go.Figure``.
"""
from __future__ import annotations

import asyncio
import math
import os
from collections import OrderedDict
from typing import Any, Callable, Iterable

import numpy as np
import plotly.graph_objects as go

# One look for every notebook: a light template, compact margins.
BASE_LAYOUT = dict(template="plotly_white", margin=dict(l=60, r=20, t=60, b=50), height=420,
                   legend=dict(orientation="h", yanchor="bottom", y=1.02, xanchor="left", x=0))
COLORS = {"v3": "#9e9e9e", "v3.2": "#616161", "v4-flash": "#1f77b4", "v4-pro": "#d62728",
          "gqa8": "#bcbd22", "H200": "#2ca02c", "B200": "#9467bd"}

# Layout keys a callback may change; the template and sizes are set once by the builder.
_LIVE_LAYOUT_KEYS = ("title", "xaxis", "yaxis", "xaxis2", "yaxis2", "xaxis3", "yaxis3", "annotations", "shapes",
                     "barmode")

REGISTRY: dict[str, type["Widget"]] = {}

# Shown under a widget's static figure when IPython runs without a widget frontend.
STATIC_NOTE = "Static figure of the widget's default state: open in JupyterLab to move the sliders."


class LiveFigure(go.FigureWidget):
    """A ``go.FigureWidget`` whose first message to the frontend already holds the figure.

    plotly 7's FigureWidget opens its comm (sending the widget state) inside ``__init__`` *before*
    it fills ``_widget_data``/``_widget_layout``; those follow as an update, and a view that renders
    before the update lands (common for the first widgets while the frontend is still loading the
    widget code) draws an empty plot and never redraws (its ``change:_widget_data`` handler is a
    no-op). Measured in JupyterLab 4.6 + plotly 7.1: run-all left 2 of 4 plain FigureWidgets empty.
    Opening the comm only after ``__init__`` puts the data in the initial state.
    """

    def __init__(self, *args, **kwargs):
        self._v4lab_defer_open = True
        self._v4lab_drawn = -1            # the last update a browser view says it drew (-1: none drawn yet)
        super().__init__(*args, **kwargs)
        self._v4lab_defer_open = False
        self.observe(self._on_drawn, names="_js2py_traceDeltas")
        self.open()

    def _on_drawn(self, change) -> None:
        # plotly.js answers every update it draws (and its first drawing) with the figure's trace edit id
        msg = change["new"]
        if msg and isinstance(msg.get("trace_edit_id"), int):
            self._v4lab_drawn = max(self._v4lab_drawn, msg["trace_edit_id"])

    def missed_update(self) -> bool:
        """A browser view drew this figure once but not the last update sent to it: its frontend model is dead.

        anywidget 0.11 gives a model 2 s to load its ESM (plotly's is 5 MB, parsed again for every figure);
        past that it drops every later message to the model without a word, so the figure stays as first
        drawn (issue 22's frozen Lossless figure, seen on a busy machine during Run All)."""
        return 0 <= self._v4lab_drawn < self._last_trace_edit_id

    def open(self):
        if getattr(self, "_v4lab_defer_open", False):
            return
        super().open()


# How long a browser may take to draw an update before the figure is taken for dead and replaced (a live one
# answers within a second even on a busy machine), and how often one widget replaces its figure at most.
REDRAW_WAIT_S = 4.0
MAX_REPLACEMENTS = 3


class TextCache:
    """What a figure computed from one run of the notebook model on one text, kept per (model, text); with
    ``maxsize`` only the most recently used that many (a typed text must not grow memory without end)."""

    def __init__(self, maxsize: int | None = None):
        self.maxsize = maxsize
        self._items: OrderedDict = OrderedDict()

    def get(self, model, text: str, make: Callable[[], Any]):
        key = (id(model), text)
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        value = self._items[key] = make()
        while self.maxsize is not None and len(self._items) > self.maxsize:
            self._items.popitem(last=False)
        return value

    def __len__(self) -> int:
        return len(self._items)


def register(cls: type["Widget"]) -> type["Widget"]:
    """Class decorator: make a widget discoverable by ``v4lab bench widgets`` and the tests."""
    if not cls.name:
        raise ValueError(f"widget class {cls.__name__}: 'name' must be set to register it")
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise ValueError(f"widget name {cls.name!r}: already registered by {REGISTRY[cls.name].__name__}")
    REGISTRY[cls.name] = cls
    return cls


def static_mode() -> bool:
    """True when no widget frontend can exist: ``V4LAB_STATIC=1`` or not inside a Jupyter kernel."""
    if os.environ.get("V4LAB_STATIC", "").strip() not in ("", "0"):
        return True
    try:
        from IPython import get_ipython
    except ImportError:
        return True
    ip = get_ipython()
    return ip is None or not hasattr(ip, "kernel")


def figure_from(data: dict, layout: dict | None = None) -> go.Figure:
    """A static figure from ``x_data`` output plus a fixed base layout."""
    lay = dict(BASE_LAYOUT)
    lay.update(layout or {})
    for k, v in data.get("layout", {}).items():     # merged one level deep, as a live update merges
        lay[k] = {**lay[k], **v} if isinstance(v, dict) and isinstance(lay.get(k), dict) and k != "title" else v
    return go.Figure(data=[dict(t) for t in data["traces"]], layout=lay)


def apply_data(fig: go.Figure, data: dict, last: dict | None = None) -> None:
    """Update ``fig`` in place from ``x_data`` output (same trace count and order).

    With ``last`` (the data applied before), only the properties that changed are sent: plotly
    validates every property it is given, and that, not the arithmetic, dominates a callback.
    """
    traces = data["traces"]
    if len(traces) != len(fig.data):
        raise ValueError(f"figure update: {len(traces)} traces for a figure with {len(fig.data)}; "
                         "a builder must keep its trace count fixed")
    old_traces = last["traces"] if last is not None else [{}] * len(traces)
    old_layout = last.get("layout", {}) if last is not None else {}
    with fig.batch_update():
        for tr, new, old in zip(fig.data, traces, old_traces):
            changed = {k: _as_array(v) for k, v in new.items() if k != "type" and (k not in old or old[k] != v)}
            if changed:
                tr.update(changed)
        lay = {k: v for k, v in data.get("layout", {}).items()
               if k in _LIVE_LAYOUT_KEYS and (k not in old_layout or old_layout[k] != v)}
        if lay:
            # plotly's update() merges lists of annotations/shapes element by element (a shorter list leaves
            # stale items behind, an empty one changes nothing): lists are assigned whole.
            fig.layout.update({k: v for k, v in lay.items() if not isinstance(v, (list, tuple))})
            for k, v in lay.items():
                if isinstance(v, (list, tuple)):
                    fig.layout[k] = v


def _as_array(v):
    """A matrix (list of equal-length lists of numbers, None = a gap) → a float numpy array with NaN gaps,
    anything else unchanged: plotly validates a nested list element by element in Python (~8 K cells of an
    inspector heatmap took ~80 ms a text), a numpy array in one copy; both draw the same (NaN is a gap)."""
    if not (isinstance(v, list) and v and all(isinstance(r, list) for r in v)):
        return v
    if len({len(r) for r in v}) != 1 or not all(x is None or (isinstance(x, (int, float)) and not isinstance(x, bool))
                                                for r in v for x in r):
        return v
    return np.array([[np.nan if x is None else x for x in r] for r in v], dtype=float)


def fmt3(x: float) -> str:
    """Three significant figures, trailing zeros kept: 42 -> '42.0', 0.0504 -> '0.0504', 35700 -> '35700'."""
    if x == 0 or not math.isfinite(x):
        return f"{x:g}"
    if abs(float(f"{x:.3g}")) >= 1000:
        return f"{x:.0f}"
    return f"{x:#.3g}".rstrip(".")


def si(x: float, unit: str = "") -> str:
    """Three significant figures with a k/M/G/T/P prefix: si(35700e9, 'FLOP') -> '35.7 TFLOP'."""
    for p, f in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= f * 0.9995:
            return f"{fmt3(x / f)} {p}{unit}".rstrip()
    return f"{fmt3(x)} {unit}".rstrip()


def label_positions(ys, lo: float, hi: float, plot_px: float, side: str = "left", log: bool = True,
                    min_px: float = 14) -> list[str]:
    """``textposition`` per point so labels of points closer than ``min_px`` on the y axis do not overlap:
    of two neighbours the upper label moves up, the lower down (``lo``/``hi``: the axis span)."""
    def px(y):
        if log:
            return plot_px * (math.log10(max(y, 1e-300)) - math.log10(lo)) / max(math.log10(hi / lo), 1e-12)
        return plot_px * (y - lo) / max(hi - lo, 1e-300)
    pos = ["middle " + side] * len(ys)
    order = sorted(range(len(ys)), key=lambda i: -ys[i])
    clusters = [[order[0]]] if order else []
    for a, b in zip(order, order[1:]):         # runs of labels closer than min_px to their neighbour
        if px(ys[a]) - px(ys[b]) < min_px:
            clusters[-1].append(b)
        else:
            clusters.append([b])
    for c in clusters:                         # 2: up, down; 3: up, middle, down; more: cycle
        rows = ["top", "bottom"] if len(c) == 2 else ["top", "middle", "bottom"]
        for k, i in enumerate(c if len(c) > 1 else []):
            pos[i] = f"{rows[k % len(rows)]} {side}"
    return pos


def categorical_colorscale(n: int) -> list:
    """A stepwise colour scale for ``n`` categories 0..n-1 (use zmin = -0.5, zmax = n - 0.5): each id one
    colour of a qualitative palette, so neighbouring ids do not look alike."""
    from plotly.colors import qualitative as Q
    palette = Q.D3 if n <= 10 else Q.Dark24 if n <= 24 else (Q.Alphabet * (n // 26 + 1))
    scale = []
    for i in range(n):
        scale += [[i / n, palette[i]], [(i + 1) / n, palette[i]]]
    return scale


def check_choice(arg: str, value: Any, choices: Iterable) -> Any:
    choices = list(choices)
    if value not in choices:
        raise ValueError(f"{arg} = {value!r}: must be one of {choices}")
    return value


def check_range(arg: str, value: float, lo: float, hi: float) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{arg} = {value!r}: must be a number in [{lo}, {hi}]") from None
    if not (lo <= v <= hi):
        raise ValueError(f"{arg} = {value!r}: must lie in [{lo}, {hi}]")
    return v


class Widget:
    """Base of every notebook widget.

    Subclasses set ``name`` (registry key), ``defaults`` (the state), implement ``data()`` (the
    figure's numbers for ``self.state``), ``layout()`` (fixed base layout) and ``make_controls()``
    (name → ipywidget whose ``value`` feeds ``on_<name>``), and ``sweep_values(control)`` (the values
    a sweep visits: tests and the benchmark use it). ``on_<name>`` methods usually just call
    :meth:`set`.
    """

    name: str = ""
    defaults: dict[str, Any] = {}

    def __init__(self, static: bool | None = None, **state):
        unknown = sorted(set(state) - set(self.defaults))
        if unknown:
            raise ValueError(f"{type(self).__name__}: unknown state key {unknown[0]!r}; "
                             f"known keys are {sorted(self.defaults)}")
        self.state = {**self.defaults, **state}
        self.validate(self.state)
        self.static = static_mode() if static is None else bool(static)
        self._last = self.data()
        fig = figure_from(self._last, self.layout())
        self.fig = fig if self.static else LiveFigure(fig)
        self.controls: dict[str, Any] = {}
        self.status = None                  # an HTML line under the controls: a callback's error, if any
        self._boxes: list = []              # the displayed boxes holding self.fig (to swap in a new figure)
        self._check = None                  # the pending check that the browser drew the last update
        self.replacements = 0
        if not self.static:
            import ipywidgets as W
            self.status = W.HTML(value="")
            self.controls = self.make_controls()
            for cname, ctl in self.controls.items():
                ctl.observe(lambda ch, cname=cname: self._on_change(cname, ch["new"]), names="value")

    def _on_change(self, control: str, value) -> None:
        """Observer of every control. ipywidgets would send a callback's exception only to the kernel log
        (invisible in the notebook) and leave the figure behind the control; here it is shown under the
        controls, and the next update resends the whole figure."""
        try:
            getattr(self, f"on_{control}")(value)
        except Exception as e:                                  # noqa: BLE001 - shown to the reader
            import html
            try:
                self.set()                  # redraw the last good state in full (the diff baseline is gone)
            except Exception:               # noqa: BLE001 - the message below already says what failed
                pass
            self.status.value = (f"<span style='color:#b00'>{html.escape(control)} = {html.escape(repr(value))}: "
                                 f"{html.escape(type(e).__name__)}: {html.escape(str(e))}</span>")
            return
        finally:
            self._check_drawn_later()
        if self.status.value:
            self.status.value = ""

    def _check_drawn_later(self) -> None:
        """In REDRAW_WAIT_S, on the kernel's event loop, replace the figure if the browser did not draw it."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:                # not inside a kernel's loop (a test calling on_x): nothing to watch
            return
        if self._check is not None:
            self._check.cancel()
        self._check = loop.call_later(REDRAW_WAIT_S, self.replace_dead_figure)

    def replace_dead_figure(self) -> bool:
        """If the figure's frontend model stopped drawing updates, put a new figure with the current state in
        its place in every displayed box (a new model loads its ESM again, now on an idle page)."""
        self._check = None
        if not isinstance(self.fig, LiveFigure) or not self.fig.missed_update():
            return False
        if self.replacements >= MAX_REPLACEMENTS:
            return False
        old, self.fig = self.fig, LiveFigure(figure_from(self.data(), self.layout()))
        self._last = None                   # the next update sends everything
        self.replacements += 1
        for box in self._boxes:
            _swap_child(box, old, self.fig)
        old.close()
        return True

    # ---- to implement ------------------------------------------------------------------------
    def data(self) -> dict:
        raise NotImplementedError

    def layout(self) -> dict:
        return {}

    def make_controls(self) -> dict:
        return {}

    def sweep_values(self, control: str) -> list:
        raise NotImplementedError

    def validate(self, state: dict) -> None:
        """Raise ValueError naming the key for a bad state value."""

    # ---- shared ------------------------------------------------------------------------------
    @property
    def control_names(self) -> list[str]:
        return [m[3:] for m in dir(self) if m.startswith("on_") and callable(getattr(self, m))]

    def set(self, **changes) -> None:
        """Change state and update the figure in place (what every ``on_<name>`` does)."""
        new = {**self.state, **changes}
        self.validate(new)
        old, self.state = self.state, new
        try:
            data = self.data()
            # The diff is against what the figure was last sent. Until this update has gone through
            # that is unknown (an exception part-way leaves some traces updated): then resend everything.
            last, self._last = self._last, None
            apply_data(self.fig, data, last)
        except Exception:
            self.state = old
            raise
        self._last = data

    def figure(self) -> go.Figure:
        """A static copy of the current figure (``build_x`` for the current state)."""
        return figure_from(self.data(), self.layout())

    def box(self):
        import ipywidgets as W
        ctl = list(self.controls.values())
        return W.VBox([W.HBox(ctl, layout=W.Layout(flex_flow="row wrap")), self.status, self.fig])

    def display(self):
        """Show the live widget, or a static figure without a widget frontend."""
        from IPython.display import display
        if self.static:
            fig = self.figure()
            try:
                from IPython import get_ipython
                if get_ipython() is None:
                    return fig
            except ImportError:
                return fig
            display(fig)
            # Inside IPython but without widgets (V4LAB_STATIC=1, the static site): the sliders cannot move, so
            # say so. plotly's display drops display metadata, so the mark v4lab.site looks for rides on the note.
            from IPython.display import HTML
            display(HTML(f"<p>{STATIC_NOTE}</p>"), metadata={"v4lab": {"widget": self.name}})
            return None
        box = self.box()
        self._boxes.append(box)
        display(box)
        return None

    show = display


def _swap_child(box, old, new) -> None:
    """Replace widget ``old`` by ``new`` wherever it sits in the tree of boxes under ``box``."""
    children = getattr(box, "children", None)
    if children is None:
        return
    if any(c is old for c in children):
        box.children = tuple(new if c is old else c for c in children)
    for c in box.children:
        _swap_child(c, old, new)


def sweep(widget: Widget, control: str, values: Iterable | None = None):
    """Call ``on_<control>`` for each value; yields (value, copy of the figure's trace data)."""
    cb = getattr(widget, f"on_{control}")
    for v in (widget.sweep_values(control) if values is None else values):
        cb(v)
        yield v, [t.to_plotly_json() for t in widget.fig.data]


def _round_floats(x, digits: int):
    if isinstance(x, float):
        return float(f"{x:.{digits}g}")
    if isinstance(x, (list, tuple)):
        return [_round_floats(v, digits) for v in x]
    if isinstance(x, dict):
        return {k: _round_floats(v, digits) for k, v in x.items()}
    return x


def stored_result(path, run: Callable[..., dict], recompute: bool = False, digits: int | None = 7,
                  **kwargs) -> dict:
    """An experiment too slow for a notebook cell, stored as JSON at ``path``.

    Without ``recompute`` or keywords the stored file is read (and written first if missing). Otherwise
    ``run(**kwargs)`` runs again; with its defaults (no keywords) the file is refreshed. Floats are kept
    to ``digits`` significant digits (None: as JSON writes them) so the file stays small and stable."""
    import json
    from pathlib import Path

    path = Path(path)
    if not recompute and not kwargs and path.exists():
        return json.loads(path.read_text())
    result = json.loads(json.dumps(run(**kwargs)))                 # plain floats, lists and dicts
    if digits is not None:
        result = _round_floats(result, digits)
    if not kwargs:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, separators=(",", ":")) + "\n")
    return result
