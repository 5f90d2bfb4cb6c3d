"""Notebook 00's figures: every callback swept, the figure checked against v4lab.accounting."""
import pytest

from v4lab import accounting
from v4lab.viz import tour
from v4lab.viz.common import sweep

N_KV = len(tour.MODELS) + 1          # + GQA-8 baseline
N_FL = len(tour.MODELS)


def test_family_table_reproduces_the_report():
    rows = {r["model"]: r for r in tour.family(accounting.ONE_M)}
    assert rows["v3.2"]["kv_vs_v32"] == 1.0
    assert abs(rows["v4-pro"]["kv_vs_v32"] - 0.10) < 0.01 and abs(rows["v4-pro"]["flops_vs_v32"] - 0.27) < 0.015
    assert abs(rows["v4-flash"]["kv_vs_v32"] - 0.07) < 0.01 and abs(rows["v4-flash"]["flops_vs_v32"] - 0.10) < 0.01
    text = tour.family_table()
    assert "V4-Pro" in text and f"{100 * rows['v4-pro']['kv_vs_v32']:.1f}%" in text


@pytest.mark.parametrize("static", [True, False])
def test_context_sweep_moves_points_not_lines(static):
    w = tour.ContextWidget(static=static)
    lines_before = [list(t.y) for t in w.fig.data[:N_KV + N_FL]]
    titles = set()
    for ctx, _ in sweep(w, "context"):
        kv_pts, fl_pts = w.fig.data[N_KV + N_FL], w.fig.data[N_KV + N_FL + 1]
        assert set(kv_pts.x) == {ctx} and set(fl_pts.x) == {ctx}
        for m, y in zip(tour.MODELS, kv_pts.y):
            assert y == pytest.approx(accounting.kv_cache(m, ctx)["total_bytes"] / 1e9)
        assert kv_pts.y[-1] == pytest.approx(accounting.gqa8("v4-pro", ctx)["total_bytes"] / 1e9)
        for m, y in zip(tour.MODELS, fl_pts.y):
            assert y == pytest.approx(accounting.decode_flops(m, ctx)["total"] / 1e9)
        assert w.fig.layout.shapes[0].x0 == ctx
        titles.add(w.fig.layout.title.text)
    assert len(titles) == len(tour.CONTEXT_STOPS)            # the title follows the slider
    assert [list(t.y) for t in w.fig.data[:N_KV + N_FL]] == lines_before


def test_weights_toggle_switches_flops_curves():
    w = tour.ContextWidget(static=True, context=2 ** 17)
    fl_lines = slice(N_KV, N_KV + N_FL)
    got = {}
    for weights, _ in sweep(w, "weights"):
        got[weights] = [list(t.y) for t in w.fig.data[fl_lines]]
        for m, t in zip(tour.MODELS, w.fig.data[fl_lines]):
            i = tour.CONTEXTS.index(2 ** 17)
            assert t.y[i] == pytest.approx(accounting.decode_flops(m, 2 ** 17, weights=weights)["total"] / 1e9)
    assert got["A"] != got["B"]
    kv = [list(t.y) for t in w.fig.data[:N_KV]]
    w.on_weights("A")
    assert [list(t.y) for t in w.fig.data[:N_KV]] == kv       # the KV panel does not depend on it


def test_bad_values_name_the_control():
    with pytest.raises(ValueError, match="context = 1000"):
        tour.ContextWidget(static=True, context=1000)
    w = tour.ContextWidget(static=True)
    with pytest.raises(ValueError, match="weights = 'Z'"):
        w.on_weights("Z")
    with pytest.raises(ValueError, match="context"):
        tour.build_context(context=3)


def test_build_context_is_the_static_fallback():
    fig = tour.build_context(2 ** 16, "A")
    w = tour.ContextWidget(static=True, context=2 ** 16, weights="A")
    assert fig.to_plotly_json()["data"] == w.fig.to_plotly_json()["data"]


def test_notebook_map(tmp_path):
    (tmp_path / "00_tour.ipynb").write_text("{}")
    text = tour.notebook_map(tmp_path)
    assert "[Tour](00_tour.ipynb)" in text and "MoE expansion *(coming)*" in text
    assert text.count("\n") == len(tour.NOTEBOOKS) + 1
