"""The figure check (v4lab.viz.check): each rule fails on a planted bad figure and passes its repaired twin;
then every registered widget, in every state its callback sweep reaches, passes every rule."""
import plotly.graph_objects as go
import pytest

from v4lab.viz import MODEL_WIDGETS, check, load_all

STEP8 = [[k / 8, c] for i, c in enumerate(["#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02",
                                             "#a6761d", "#666666"]) for k in (i, i + 1)]


def _fig(traces, **layout):
    return go.Figure(data=traces, layout=dict(margin=dict(t=60, b=50, l=60, r=20), height=420, **layout))


def test_two_dollars_in_a_title_fail_hover_does_not():
    bad = _fig([go.Bar(x=["a"], y=[1])], title="V4-Flash $4.76 vs V4-Pro $59.16")
    assert check.dollar_signs(bad) and "title" in check.dollar_signs(bad)[0]
    ann = _fig([go.Bar(x=["a"], y=[1])], annotations=[dict(text="$1 and $2", x=0, y=0)])
    assert check.dollar_signs(ann)
    axis = _fig([go.Bar(x=["a"], y=[1])], yaxis=dict(title="cost ($) per $1M"))
    assert check.dollar_signs(axis)
    ok = _fig([go.Bar(x=["a"], y=[1], hovertext="$1 vs $2")], title=r"V4-Flash \$4.76 vs V4-Pro US$ 59.16")
    assert check.dollar_signs(ok) == []


def test_heatmap_without_a_colour_bar_fails():
    bad = _fig([go.Heatmap(z=[[0, 1], [1, 0]], showscale=False)])
    assert check.colour_keys(bad)
    assert check.colour_keys(_fig([go.Heatmap(z=[[0, 1], [1, 0]])])) == []           # default: a bar
    printed = _fig([go.Heatmap(z=[[0, 1], [1, 0]], showscale=False, texttemplate="%{z:.2f}")])
    assert check.colour_keys(printed) == []
    texts = _fig([go.Heatmap(z=[[0, 1]], showscale=False, text=[["0", "1"]], texttemplate="%{text}")])
    assert check.colour_keys(texts) == []
    assert check.colour_keys(_fig([go.Heatmap(z=[[0, 1]], showscale=False, texttemplate="%{text}")]))
    shared = _fig([go.Heatmap(z=[[0, 1]], zmin=0, zmax=1, showscale=False, colorscale="Blues"),
                   go.Heatmap(z=[[1, 0]], zmin=0, zmax=1, colorscale="Blues", xaxis="x2")])
    assert check.colour_keys(shared) == []                                            # one bar for both
    scatter = _fig([go.Scatter(x=[0, 1], y=[0, 1], mode="markers", marker=dict(color=[0.1, 0.9]))])
    assert check.colour_keys(scatter)
    scatter.data[0].marker.showscale = True
    assert check.colour_keys(scatter) == []


def test_expert_ids_on_a_continuous_scale_fail():
    ids = [[0, 3, 7], [1, 6, 2]]
    bad = _fig([go.Heatmap(z=ids, colorscale="Turbo", colorbar=dict(title="expert"))])
    assert check.categorical_scales(bad)
    marked = _fig([go.Heatmap(z=ids, colorscale="Viridis", meta={"categorical": True})])
    assert check.categorical_scales(marked)
    ok = _fig([go.Heatmap(z=ids, colorscale=STEP8, zmin=-0.5, zmax=7.5, colorbar=dict(title="expert"))])
    assert check.categorical_scales(ok) == []
    probs = _fig([go.Heatmap(z=[[0.1, 0.7]], colorscale="Viridis", colorbar=dict(title="expert weight"))])
    assert check.categorical_scales(probs) == []                                      # not whole numbers


def test_an_empty_subplot_needs_a_reason():
    lay = dict(xaxis=dict(domain=[0, 0.45]), xaxis2=dict(domain=[0.55, 1]), yaxis2=dict(anchor="x2"))
    bad = _fig([go.Scatter(x=[0, 1], y=[1, 2]), go.Scatter(x=[], y=[], xaxis="x2", yaxis="y2")], **lay)
    assert check.empty_subplots(bad) == ["subplot x2/y2 is empty and no annotation says why"]
    said = _fig([go.Scatter(x=[0, 1], y=[1, 2]), go.Scatter(x=[], y=[], xaxis="x2", yaxis="y2")], **lay,
                annotations=[dict(text="window layer: no compressed entries", xref="x2 domain", yref="y2 domain",
                                  x=0.5, y=0.5, showarrow=False)])
    assert check.empty_subplots(said) == []
    elsewhere = _fig([go.Scatter(x=[0, 1], y=[1, 2]), go.Scatter(x=[], y=[], xaxis="x2", yaxis="y2")], **lay,
                     annotations=[dict(text="a note on the left panel", xref="paper", yref="paper", x=0.2, y=0.5)])
    assert check.empty_subplots(elsewhere)


def test_legend_in_the_title_or_a_title_taller_than_the_margin_fails():
    names = ["H200 BF16 roof", "H200 FP8 roof", "B200 BF16 roof", "B200 FP8 roof", "B200 FP4 roof"]
    traces = [go.Scatter(x=[1, 2], y=[1, 2], name=n, legendgroup=n[:4]) for n in names]
    legend = dict(orientation="h", yanchor="bottom", y=1.02, x=0)
    two_lines = dict(text="first line of the title<br>second line of the title", font=dict(size=13))
    bad = go.Figure(traces, dict(height=480, margin=dict(t=90, b=50), legend=legend, title=two_lines))
    assert any("reaches into the title" in p for p in check.legend_and_title(bad))
    pinned = dict(two_lines, y=0.98, yanchor="top")           # title at the top, legend below it
    ok = go.Figure(traces, dict(height=480, margin=dict(t=150, b=50), legend=legend, title=pinned))
    assert check.legend_and_title(ok) == []
    tall = _fig([go.Bar(x=["a"], y=[1])], title=dict(text="1<br>2<br>3<br>4", font=dict(size=13)))
    assert any("taller than the top margin" in p for p in check.legend_and_title(tall))
    wide = _fig([go.Bar(x=["a"], y=[1])], title=dict(text="x" * 200, font=dict(size=13)))
    assert any("does not fit" in p for p in check.legend_and_title(wide))


def test_labels_longer_than_their_description_width_fail():
    import ipywidgets as W
    bad = {"n": W.IntSlider(description="noise (surrogate)"),
           "d": W.Dropdown(options=["random surrogate (60 sublayers)", "b"], description="source")}
    probs = check.label_widths(bad)
    assert len(probs) == 2 and "'n'" in probs[0] and "'d'" in probs[1]
    ok = {"n": W.IntSlider(description="noise (surrogate)", style={"description_width": "130px"}),
          "d": W.Dropdown(options=["random surrogate (60 sublayers)", "b"], description="source",
                          layout=W.Layout(width="360px"))}
    assert check.label_widths(ok) == []


def test_points_or_labels_outside_a_fixed_range_fail():
    out = _fig([go.Scatter(x=[0, 12], y=[1, 2], mode="markers")], xaxis=dict(range=[-10, 10]))
    assert check.axis_ranges(out)
    label = _fig([go.Scatter(x=[9.9], y=[1], mode="markers+text", text=["5606 TFLOP/s"], textposition="middle right")],
                 xaxis=dict(range=[0, 10]))
    assert check.axis_ranges(label)
    label.data[0].textposition = "middle left"
    assert check.axis_ranges(label) == []
    assert check.axis_ranges(_fig([go.Scatter(x=[0, 12], y=[1, 2], mode="markers")])) == []     # autorange


def test_check_figure_names_the_rule():
    bad = _fig([go.Heatmap(z=[[0, 1]], showscale=False)], title="$1 vs $2")
    probs = check.check_figure(bad)
    assert any(p.startswith("dollar_signs:") for p in probs) and any(p.startswith("colour_keys:") for p in probs)


# ------------------------------------------------------------------ every widget, every swept state
REGISTRY = load_all()


def _params():
    for name in sorted(REGISTRY):
        marks = []
        if name in MODEL_WIDGETS or name == "tiny.attention_maps":
            marks.append(pytest.mark.slow)
        yield pytest.param(name, marks=marks, id=name)


@pytest.fixture(scope="module")
def demo_release(tmp_path_factory):
    from v4lab.viz.real import write_demo_release
    return write_demo_release(tmp_path_factory.mktemp("release") / "release")


@pytest.mark.parametrize("name", list(_params()))
def test_every_widget_state_passes_the_figure_check(name, demo_release):
    cls = REGISTRY[name]
    kw = {"path": demo_release} if getattr(cls, "needs_real_weights", False) else {}
    w = cls(static=True, **kw)
    problems = {p: "default" for p in check.check_figure(w.fig)}
    for c in w.control_names:
        for v in w.sweep_values(c):
            getattr(w, f"on_{c}")(v)
            for p in check.check_figure(w.fig):
                problems.setdefault(p, f"{c}={v!r}")
    live = cls(static=False, **kw)
    problems.update({p: "controls" for p in check.label_widths(live.controls)})
    assert not problems, "\n".join(f"[{s}] {p}" for p, s in problems.items())


def test_every_static_notebook_figure_passes_the_figure_check():
    from v4lab.viz.screenshots import EXPERIMENT_FIGURES, STATIC_FIGURES, static_figures
    figs = static_figures()
    assert set(figs) == set(STATIC_FIGURES) | {f"experiment.{e}" for e in EXPERIMENT_FIGURES}
    problems = {n: check.check_figure(f) for n, f in figs.items()}
    assert not any(problems.values()), {n: p for n, p in problems.items() if p}
