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
