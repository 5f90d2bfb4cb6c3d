"""A figure follows its slider however fast the slider moves (notebook 05's Lossless freeze, issue 22).

The browser saw the slider's readout move 14 → 19 → 6 → 5 while the figure stayed at 2^14, with nothing in
the notebook. Two paths in the Python half give exactly that: (1) a callback raising inside an ipywidgets
observer — ipywidgets sends it to the kernel log only — and (2) the in-place update diffing against the
data it *meant* to send last time: after an update that failed part-way, a later state equal to that
baseline sends nothing, so the frontend keeps a mix of states for good.

The test drives the real comm path: slider changes arrive as frontend ``update`` messages, the figure's
outgoing messages are captured and replayed onto a JSON copy of the figure the way plotly.js applies them
(``Plotly.update``), and after every move the replayed figure must equal the widget's own figure for the
slider's value. One planted transient failure (a bad value in one trace on one visit) stands for any
callback that raises; the figure must still follow every later move.
"""
import random

import pytest

from v4lab.viz import fp4


class CapturingComm:
    comm_id = "capture"
    kernel = True

    def __init__(self):
        self.sent = []

    def send(self, data=None, metadata=None, buffers=None):
        self.sent.append(data)

    def close(self, *a, **k):
        pass

    def on_msg(self, *a):
        pass

    def on_close(self, *a):
        pass


def _set_path(obj: dict, path: str, value):
    keys = path.split(".")
    for k in keys[:-1]:
        obj = obj.setdefault(k, {})
    obj[keys[-1]] = value


class ReplayedFigure:
    """The frontend's copy of a figure: the initial JSON, then every ``_py2js_update`` message applied."""

    def __init__(self, fig):
        j = fig.to_plotly_json()
        self.data, self.layout = [dict(t) for t in j["data"]], dict(j["layout"])

    def apply(self, messages):
        for m in messages:
            upd = (m or {}).get("state", {}).get("_py2js_update")
            if not upd:
                continue
            idx = upd.get("style_traces") or list(range(len(self.data)))
            for path, vals in (upd.get("style_data") or {}).items():
                for i, v in zip(idx, vals if isinstance(vals, list) and len(vals) == len(idx) else [vals] * len(idx)):
                    if v != "_undefined_":
                        _set_path(self.data[i], path, v)
            for path, v in (upd.get("layout_data") or {}).items():
                _set_path(self.layout, path, v)


def _frontend_moves(ctl, value):
    """What a slider drag sends: an ``update`` comm message with the new value."""
    ctl._handle_msg({"content": {"data": {"method": "update", "state": {"value": value}, "buffer_paths": []}},
                     "buffers": []})


def _shown(rep: ReplayedFigure) -> tuple:
    return (rep.layout["title"]["text"], list(rep.data[1]["x"]), list(rep.data[2]["y"]))


def _expected(spread: int) -> tuple:
    d = fp4.lossless_data(spread)
    return (d["layout"]["title"]["text"], [spread], list(d["traces"][2]["y"]))


@pytest.mark.parametrize("seed", [0, 1])
def test_lossless_figure_follows_fast_slider_moves(monkeypatch, seed):
    w = fp4.LosslessWidget(static=False)
    comm = CapturingComm()
    w.fig.comm = comm
    rep = ReplayedFigure(w.fig)
    ctl = w.controls["spread"]

    good = fp4.lossless_data
    fail_at, failed = 19, []

    def flaky(spread=14):                 # raises once, part-way through the update (trace 2 is invalid)
        d = good(spread)
        if spread == fail_at and not failed:
            failed.append(spread)
            d = {**d, "traces": d["traces"][:2] + [{**d["traces"][2], "marker": {"color": object()}}]}
        return d

    monkeypatch.setattr(fp4, "lossless_data", flaky)
    rng = random.Random(seed)
    moves = [19, 14, 6, 5, 19, 14] + [rng.choice(fp4.SPREADS) for _ in range(150)] + [5, 19, 5]
    for k, v in enumerate(moves):
        _frontend_moves(ctl, v)
        rep.apply(comm.sent)
        comm.sent.clear()
        if k == 0:                       # the planted failure: the figure stays whole, at the last good state
            assert failed and _shown(rep) == _expected(14), "a failed update left the figure half-updated"
            assert "spread = 19" in w.status.value                          # and the reader sees why
            continue
        assert _shown(rep) == _expected(v), f"move {k}: slider at {v}, the figure shows another state"
    assert failed and w.status.value == ""


# ---- the browser half: a frontend model that stopped drawing is replaced (the cause of the freeze) ----------
# anywidget 0.11 drops every message to a model whose ESM took over 2 s to load: the figure is drawn once and
# never again. plotly.js answers each update it draws with ``_js2py_traceDeltas`` (the update's trace edit id);
# these tests play that frontend.

def _browser_draws(fig, edit_id=None):
    """A view's answer after drawing (first drawing: the model's edit id as it knows it)."""
    fig._handle_msg({"content": {"data": {"method": "update", "buffer_paths": [], "state": {
        "_js2py_traceDeltas": {"trace_deltas": [], "trace_edit_id":
                               fig._last_trace_edit_id if edit_id is None else edit_id}}}}, "buffers": []})


def _displayed(w):
    box = w.box()
    w._boxes.append(box)                  # what display() records
    return box


def test_live_figure_is_kept():
    w = fp4.LosslessWidget(static=False)
    w.fig.comm = CapturingComm()
    _displayed(w)
    _browser_draws(w.fig)
    for v in (15, 16, 3):
        _frontend_moves(w.controls["spread"], v)
        _browser_draws(w.fig)
        assert not w.fig.missed_update() and not w.replace_dead_figure()
    assert w.replacements == 0


def test_figure_never_drawn_is_kept():
    """No view at all (nbclient, a closed notebook): nothing to revive, nothing replaced."""
    w = fp4.LosslessWidget(static=False)
    w.fig.comm = CapturingComm()
    _displayed(w)
    _frontend_moves(w.controls["spread"], 15)
    assert not w.replace_dead_figure()


def test_dead_figure_is_replaced_with_the_current_state():
    w = fp4.LosslessWidget(static=False)
    w.fig.comm = CapturingComm()
    box = _displayed(w)
    old = w.fig
    _browser_draws(old, 0)                # drawn once, as created
    for v in (19, 6, 5):                   # then deaf: no update is drawn
        _frontend_moves(w.controls["spread"], v)
    assert old.missed_update()
    assert w.replace_dead_figure()
    assert w.fig is not old and box.children[-1] is w.fig and old.comm is None       # swapped, old closed
    assert w.fig.layout.title.text == fp4.lossless_data(5)["layout"]["title"]["text"]
    assert list(w.fig.data[1].x) == [5]
    w.fig.comm = CapturingComm()
    _frontend_moves(w.controls["spread"], 7)                         # and the new one follows
    assert list(w.fig.data[1].x) == [7]


def test_replacement_is_scheduled_after_a_move(monkeypatch):
    """In a kernel the check runs on the event loop REDRAW_WAIT_S after the last move, with no further move."""
    import asyncio

    from v4lab.viz import common
    monkeypatch.setattr(common, "REDRAW_WAIT_S", 0.05)
    w = fp4.LosslessWidget(static=False)
    w.fig.comm = CapturingComm()
    _displayed(w)
    old = w.fig
    _browser_draws(old, 0)

    async def moves():
        for v in (19, 14, 6, 5):
            _frontend_moves(w.controls["spread"], v)
        await asyncio.sleep(0.3)

    asyncio.run(moves())
    assert w.fig is not old and w.replacements == 1
    assert list(w.fig.data[1].x) == [5]
