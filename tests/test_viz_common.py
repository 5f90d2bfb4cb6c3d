"""The widget pattern: static fallback, in-place updates, the registry."""
import plotly.graph_objects as go
import pytest

from v4lab.viz import common, load_all
from v4lab.viz.common import Widget, apply_data, figure_from, register, static_mode


class _Toy(Widget):
    name = ""                      # not registered
    defaults = {"k": 1}

    def validate(self, s):
        common.check_choice("k", s["k"], (1, 2, 3))

    def data(self):
        k = self.state["k"]
        return {"traces": [dict(type="scatter", x=[0, 1], y=[0, k], line=dict(color="red")),
                           dict(type="bar", x=["a"], y=[10])],
                "layout": {"title": {"text": f"k={k}"}}}

    def make_controls(self):
        import ipywidgets as W
        return {"k": W.IntSlider(value=self.state["k"], min=1, max=3)}

    def sweep_values(self, c):
        return [1, 2, 3]

    def on_k(self, v):
        self.set(k=v)


def test_static_mode_env(monkeypatch):
    monkeypatch.setenv("V4LAB_STATIC", "1")
    assert static_mode()
    monkeypatch.setenv("V4LAB_STATIC", "0")
    assert static_mode()        # pytest runs outside a Jupyter kernel: still no widget frontend


@pytest.mark.parametrize("static", [True, False])
def test_widget_updates_in_place(static):
    w = _Toy(static=static)
    assert isinstance(w.fig, go.FigureWidget) != static
    fig_id = id(w.fig)
    w.on_k(3)
    assert id(w.fig) == fig_id
    assert list(w.fig.data[0].y) == [0, 3] and w.fig.layout.title.text == "k=3"
    assert w.control_names == ["k"]
    if static:
        assert w.display() is not None      # no IPython: the static figure comes back
    else:
        assert "k" in w.controls
        w.controls["k"].value = 2           # the observer calls on_k
        assert list(w.fig.data[0].y) == [0, 2]


def test_bad_state_names_key():
    with pytest.raises(ValueError, match="k = 7: must be one of"):
        _Toy(static=True, k=7)
    with pytest.raises(ValueError, match="unknown state key 'q'"):
        _Toy(static=True, q=1)
    w = _Toy(static=True)
    with pytest.raises(ValueError, match="k = 9"):
        w.on_k(9)
    assert w.state["k"] == 1                 # a rejected value leaves the state alone


def test_apply_data_sends_only_changes(monkeypatch):
    fig = figure_from(_Toy(static=True).data())
    old = _Toy(static=True).data()
    new = _Toy(static=True, k=2).data()
    seen = []
    for tr in fig.data:
        orig = tr.update
        monkeypatch.setattr(tr, "update", lambda d, orig=orig: (seen.append(set(d)), orig(d)))
    apply_data(fig, new, old)
    assert seen == [{"y"}]                   # the bar and the unchanged line props are not touched
    with pytest.raises(ValueError, match="trace count"):
        apply_data(fig, {"traces": new["traces"][:1]})


def test_register_rejects_duplicates_and_unnamed():
    with pytest.raises(ValueError, match="'name' must be set"):
        register(_Toy)
    reg = load_all()
    some = next(iter(reg.values()))

    class Dup(_Toy):
        name = some.name
    with pytest.raises(ValueError, match="already registered"):
        register(Dup)


def test_registry_lists_every_notebook_widget(tmp_path):
    reg = load_all()
    assert {"tour.context", "cost.bill", "cost.long_context", "cost.escalation", "cost.roofline",
            "deploy.routing", "deploy.checklist"} <= set(reg)
    demo = None
    for name, cls in reg.items():
        kw = {}
        if getattr(cls, "needs_real_weights", False):    # v4lab.viz.real: read a synthetic tiny release
            from v4lab.viz.real import write_demo_release
            demo = demo or write_demo_release(tmp_path / "release")
            kw = {"path": demo}
        w = cls(static=True, **kw)
        for c in w.control_names:
            assert len(list(w.sweep_values(c))) >= 2, (name, c)


@pytest.mark.parametrize("cls,expect_data", [(common.LiveFigure, True), (go.FigureWidget, False)])
def test_live_figure_sends_data_in_its_first_message(cls, expect_data):
    """plotly's FigureWidget opens its comm before filling _widget_data (empty first render in
    JupyterLab); LiveFigure opens it afterwards. The plain class is the wrong variant, caught."""
    seen = []

    class Probe(cls):
        def open(self):
            if self.comm is None and not getattr(self, "_v4lab_defer_open", False):
                seen.append(len(getattr(self, "_widget_data", []) or []))
            super().open()

    f = Probe(go.Figure(go.Scatter(x=[1, 2], y=[3, 4])))
    assert f.comm is not None and len(seen) == 1
    assert (seen[0] == 1) is expect_data


def test_apply_data_replaces_annotation_lists_whole():
    """plotly's layout.update merges lists element-wise: fewer or no annotations must not leave stale ones."""
    import plotly.graph_objects as go

    from v4lab.viz.common import apply_data
    fig = go.Figure(data=[dict(type="bar", x=[1])], layout=dict(annotations=[dict(text="a"), dict(text="b")]))
    last = {"traces": [{}], "layout": {"annotations": ["old"]}}
    apply_data(fig, {"traces": [dict(type="bar", x=[1])], "layout": {"annotations": [dict(text="c")]}}, last)
    assert [a.text for a in fig.layout.annotations] == ["c"]
    apply_data(fig, {"traces": [dict(type="bar", x=[1])], "layout": {"annotations": []}}, last)
    assert len(fig.layout.annotations) == 0


def test_number_formats_and_label_positions():
    from v4lab.viz.common import fmt3, label_positions, si
    assert [fmt3(x) for x in (42, 50.4, 0.0504, 999.96, 5606.3)] == ["42.0", "50.4", "0.0504", "1000", "5606"]
    assert si(35.7e12, "FLOP") == "35.7 TFLOP" and si(3.68e9, "B") == "3.68 GB" and si(80.337, "ms") == "80.3 ms"
    # V3 / V3.2 / V4-Pro FLOPs at 1K lie within a few px on a log axis: three rows, not one pile
    assert label_positions([111, 108, 106, 29.5], 20, 40000, 330) == \
        ["top left", "middle left", "bottom left", "middle left"]
    assert label_positions([262, 50.4, 42, 5.27, 3.68], 0.005, 300, 330, side="right") == \
        ["middle right", "top right", "bottom right", "top right", "bottom right"]
    assert label_positions([1, 100], 0.1, 1000, 300) == ["middle left", "middle left"]    # far apart: unmoved


def test_apply_data_sends_a_matrix_as_an_array_with_nan_gaps():
    """A heatmap's z (list of lists, None = gap) reaches the figure as a float array with NaN gaps, the
    same numbers; ragged or non-numeric lists are left as they are."""
    import numpy as np
    import plotly.graph_objects as go

    from v4lab.viz.common import _as_array, apply_data
    fig = go.Figure([go.Heatmap(z=[[0.0]]), go.Bar(x=["a"], y=[1])])
    apply_data(fig, {"traces": [dict(type="heatmap", z=[[0.25, None], [None, 1.5]]),
                                dict(type="bar", x=["a", "b"], y=[1, 2])]})
    z = np.asarray(fig.data[0].z, dtype=float)
    assert z.shape == (2, 2) and z[0, 0] == 0.25 and z[1, 1] == 1.5 and np.isnan(z[0, 1]) and np.isnan(z[1, 0])
    assert list(fig.data[1].x) == ["a", "b"]
    for kept in ([[1, 2], [3]], [["a", "b"]], [[True, False]], [1, 2], []):
        assert _as_array(kept) is kept
