"""V3 → V4, side by side (notebook 01): two block diagrams built from :func:`v4lab.diff.block_diff`.

Each side is one decoder block of that model, its parameters from top (first in the forward) to bottom,
one box per parameter tensor with its shape; a box's colour says what happened to it between the two
models (unchanged, changed shape, only in the older, only in the newer). Rows are aligned, so a parameter
that exists on one side only leaves a gap on the other. Static (no controls): the data are the configs.
"""
from __future__ import annotations

import plotly.graph_objects as go

from v4lab import diff as D
from v4lab.viz.common import figure_from

STATUS_COLORS = {"unchanged": "#c7c7c7", "changed": "#ff7f0e", "removed": "#1f77b4", "added": "#d62728"}
STATUS_TEXT = {"unchanged": "same shape", "changed": "shape changed", "removed": "only in {a}",
               "added": "new in {b}"}
STAGE_NAMES = ("mHC (attention site)", "attention norm", "attention", "mHC (FFN site)", "FFN norm", "MoE")


def _shape(s) -> str:
    return "×".join(map(str, s))


def block_diff_data(a: str = "v3", b: str = "v4-pro") -> dict:
    """Traces (one per status, fixed count 4, then 2 for the stage labels) and layout of the two diagrams."""
    d = D.diff(a, b)
    rows = d["block"]
    n = len(rows)
    traces = []
    for status in D.STATUSES:
        xs, ys, texts, hover = [], [], [], []
        for j, r in enumerate(rows):
            if r["status"] != status:
                continue
            for side, x in (("a", 0), ("b", 1)):
                if r[side] is None:
                    continue
                xs.append(x)
                ys.append(n - 1 - j)
                texts.append(f"{r['name']}  {_shape(r[side])}")
                other = r["b" if side == "a" else "a"]
                hover.append(f"{r['name']}: {d[side]} {_shape(r[side])}"
                             + (f", {d['b' if side == 'a' else 'a']} {_shape(other)}" if other else ""))
        traces.append(dict(type="bar", orientation="h", x=[0.96] * len(xs), base=[x + 0.02 for x in xs], y=ys,
                           width=0.82, name=STATUS_TEXT[status].format(a=d["a"], b=d["b"]),
                           marker=dict(color=STATUS_COLORS[status]), text=texts, textposition="inside",
                           insidetextanchor="start", textfont=dict(size=10, color="#000000"),
                           hovertext=hover, hoverinfo="text"))
    # stage brackets on the left: where the mHC / norm / attention / MoE rows start
    stage_y, stage_t = [], []
    for s, label in enumerate(STAGE_NAMES):
        js = [j for j, r in enumerate(rows) if D._stage(r["name"]) == s]
        if js:
            stage_y.append(n - 1 - (js[0] + js[-1]) / 2)
            stage_t.append(label)
    traces.append(dict(type="scatter", mode="text", x=[-0.02] * len(stage_y), y=stage_y, text=stage_t,
                       textposition="middle left", showlegend=False, hoverinfo="skip", textfont=dict(size=11)))
    ne = d["n_experts"]
    title = (f"One block, {d['a']} (layer {d['layer_a']}) vs {d['b']} (layer {d['layer_b']}): "
             f"routed experts {ne[0]} → {ne[1]} (ffn.experts.* = one expert's shape)")
    layout = {"title": {"text": title, "font": {"size": 13}}, "barmode": "overlay", "height": 26 * n + 170,
              "xaxis": {"range": [-0.55, 2.02], "tickvals": [0.5, 1.5], "ticktext": [d["a"], d["b"]],
                        "side": "top", "showgrid": False, "zeroline": False},
              "yaxis": {"visible": False, "range": [-0.8, n - 0.2]},
              "margin": {"l": 20, "r": 20, "t": 90, "b": 40},
              "legend": {"orientation": "h", "y": -0.02, "yanchor": "top", "x": 0}}
    return {"traces": traces, "layout": layout}


def build_block_diff(a: str = "v3", b: str = "v4-pro") -> go.Figure:
    """Static figure of :func:`block_diff_data`."""
    return figure_from(block_diff_data(a, b))
