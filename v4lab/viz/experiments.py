"""Figures of the stored `v4lab experiment NAME` results (benchmarks/experiments/NAME.json): one
``build_NAME(result)`` per experiment, plus ``load`` and ``effect_line``. Static figures, no widgets."""
from __future__ import annotations

import json
import math
from pathlib import Path

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from v4lab.quant import FP8_BLOCK, bits_per_weight
from v4lab.viz.common import BASE_LAYOUT

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "experiments"
NAMES = ("clamp", "ar", "qat", "subfp4", "mhc")
# qualitative palette (plotly's D3), one colour per run in a figure
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")
# release formats (bits per weight incl. scales): BF16; FP8 E4M3 with one E8M0 scale per 128×128; MXFP4
RELEASE_BITS = {"BF16": 16.0, "FP8 E4M3 (128×128 scales)": 8 + 8 / FP8_BLOCK ** 2,
                "MXFP4 (1×32 scales)": bits_per_weight("e2m1", 32)}


def load(name: str, directory: Path | str | None = None) -> dict:
    """The stored result of experiment ``name`` (a ValueError names the file when it is missing)."""
    if name not in NAMES:
        raise ValueError(f"name = {name!r}: must be one of {NAMES}")
    path = Path(directory or RESULTS) / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"{path}: no stored result; run `v4lab experiment {name} --out {path}`")
    return json.loads(path.read_text())


def effect_line(res: dict) -> str:
    """One line: baseline vs treatment on the metric, the effect, whether it was a quick run, the command."""
    m = res["metric"]
    b, t = res["baseline"], res["treatment"]
    return (f"{res['name']}: {m} — {b['label']}: {b[m]:.4g}; {t['label']}: {t[m]:.4g}; effect {res['effect']:+.3g}"
            f"{' (quick run)' if res.get('quick') else ''}  [{res.get('command', '')}]")


def _layout(fig: go.Figure, title: str, height: int = 420) -> go.Figure:
    fig.update_layout(**{**BASE_LAYOUT, "height": height}, title=dict(text=title, font=dict(size=14)))
    return fig


def build_clamp(res: dict) -> go.Figure:
    """Loss, max |pre-activation| and max |MoE output| per step for no clamp, clamp 10 and the too-tight
    clamp of the first seed (× where a run diverged), the clamp limit drawn on the pre-activations."""
    runs = res["details"]["runs"]
    fig = make_subplots(rows=1, cols=3, horizontal_spacing=0.08,
                        subplot_titles=("training loss (nats/token)", "max |W1 x|, |W3 x| (log)",
                                        "max |MoE output| (log)"))
    for i, (label, r) in enumerate(runs.items()):
        c = PALETTE[i % len(PALETTE)]
        steps = list(range(len(r["loss"])))
        for col, key in ((1, "loss"), (2, "preact_max"), (3, "moe_max")):
            fig.add_scatter(x=steps, y=r[key], name=label, mode="lines", line=dict(color=c), legendgroup=label,
                            showlegend=col == 1, row=1, col=col)
        if r["diverged_at"] is not None:               # × on the loss too: its curve hides under the others
            for col, key, where in ((1, "loss", "top right"), (3, "moe_max", "middle right")):
                fig.add_scatter(x=[steps[-1]], y=[r[key][-1]], mode="markers+text", marker=dict(symbol="x", size=12,
                                color=c), text=[f"NaN at step {r['diverged_at']}"], textposition=where,
                                showlegend=False, row=1, col=col)
    n = max(len(r["loss"]) for r in runs.values())
    fig.add_scatter(x=[0, n - 1], y=[10, 10], mode="lines", line=dict(dash="dash", color="#616161"),
                    name="clamp limit L = 10", row=1, col=2)
    fig.update_yaxes(type="log", dtick=1, row=1, col=2)                 # one tick per decade
    fig.update_yaxes(type="log", dtick=1, row=1, col=3)
    fig.update_xaxes(title_text="optimiser step")
    s = res["settings"]
    fig = _layout(fig, f"SwiGLU clamp: experts at {s['expert_lr_mult']:g}× lr, h cast to FP8 "
                       f"(micro V4, seed {s['seeds'][0]})")
    fig.update_layout(margin=dict(t=80, b=110), legend=dict(y=-0.3))
    return fig


def clamp_table(res: dict) -> str:
    """One line per seed and variant of a clamp result (survival, losses, spikes, max activations), then
    the too-tight clamp's mean cost and the fp32 check."""
    d = res["details"]

    def num(v: float | None, fmt: str) -> str:
        return "—" if v is None else format(v, fmt)
    lines = [f"{'seed':>4} {'variant':>9} {'diverged at':>11} {'held-out':>8} {'final':>6} {'spikes':>6} "
             f"{'max preact':>10} {'max |MoE|':>9}"]
    for seed, runs in d["by_seed"].items():
        for label, r in runs.items():
            lines.append(f"{seed:>4} {label:>9} {num(r['diverged_at'], 'd'):>11} {num(r['heldout_loss'], '.3f'):>8} "
                         f"{num(r['final_loss'], '.3f'):>6} {r['spikes']:>6} {num(r['max_preact'], '.3g'):>10} "
                         f"{num(r['max_moe'], '.3g'):>9}")
    if d.get("tight_cost") is not None:
        lines.append(f"clamp 1 − clamp 10, held-out loss, mean over seeds: {d['tight_cost']:+.3f} nats")
    for label, r in (d.get("fp32") or {}).items():
        lines.append(f"fp32 (no FP8 cast), seed {res['settings']['seeds'][0]}, {label}: held-out "
                     f"{num(r['heldout_loss'], '.3f')}, max |MoE output| {num(r['max_moe'], '.3g')}")
    return "\n".join(lines)


def build_clamp_seeds(res: dict) -> go.Figure:
    """Left: the metric (held-out loss; a diverged run at the cap ln V) of every seed and variant, hollow
    markers for diverged runs. Right: the fp32 check (no FP8 cast), max |MoE output| per step."""
    by_seed, cap = res["details"]["by_seed"], res["settings"]["loss_cap"]
    fp32 = res["details"].get("fp32") or {}
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.12, subplot_titles=(
        "held-out loss per seed (diverged: scored ln V)", "fp32, no FP8 cast: max |MoE output| (log)"))
    labels = list(next(iter(by_seed.values())))
    for i, label in enumerate(labels):
        c = PALETTE[i % len(PALETTE)]
        rows = [(seed, runs[label]) for seed, runs in by_seed.items()]
        fig.add_scatter(x=[f"seed {sd}" for sd, _ in rows], y=[r["scored_loss"] for _, r in rows], name=label,
                        mode="markers", legendgroup=label, marker=dict(color=c, size=11, symbol=[
                            "circle-open" if r["diverged_at"] is not None else "circle" for _, r in rows]),
                        hovertemplate="%{x}: %{y:.3f} nats<extra>" + label + "</extra>", row=1, col=1)
        if label in fp32:
            f = fp32[label]
            fig.add_scatter(x=list(range(len(f["moe_max"]))), y=f["moe_max"], name=label, legendgroup=label,
                            showlegend=False, line=dict(color=c), row=1, col=2)
    fig.add_hline(y=cap, line=dict(dash="dot", color="#616161"), row=1, col=1,
                  annotation_text=f"ln V = {cap:.3f}: diverged", annotation_position="bottom right")
    fig.update_yaxes(title_text="nats/token", row=1, col=1)
    fig.update_yaxes(type="log", row=1, col=2)
    fig.update_xaxes(title_text="optimiser step", row=1, col=2)
    if not fp32:
        fig.add_annotation(text="no fp32 check in this run", xref="x2 domain", yref="y2 domain", x=0.5, y=0.5,
                           showarrow=False)
    fig = _layout(fig, "Every seed, and the same runs without the FP8 cast")
    fig.update_layout(margin=dict(t=80, b=90), legend=dict(y=-0.25))
    return fig


def build_subfp4(res: dict) -> go.Figure:
    """Held-out loss against bits per weight (log x), one trace per scope, release formats as vertical lines."""
    d = res["details"]
    fig = go.Figure()
    markers = {"experts": "circle", "attention": "square", "all": "diamond"}
    for i, scope in enumerate(d["config"]["scopes"]):
        rows = [x for x in d["ptq"] if x["scope"] == scope]
        fig.add_scatter(x=[x["bits"] for x in rows], y=[x["loss"] for x in rows], mode="markers",
                        marker=dict(symbol=markers.get(scope, "circle"), size=9, color=PALETTE[i]),
                        name=f"PTQ: {scope}", text=[f"{x['fmt']} / block {x['block']}" for x in rows],
                        hovertemplate="%{text}<br>%{x:.3g} bits<br>loss %{y:.3f}<extra></extra>")
    q = [x for x in d["qat"] if x["fmt"] != "none"]
    if q:
        fig.add_scatter(x=[x["bits"] for x in q], y=[x["loss_after"] for x in q], mode="markers",
                        marker=dict(symbol="star", size=13, color=PALETTE[4]),
                        name=f"experts after {d['config']['qat_steps']} QAT steps", text=[x["fmt"] for x in q],
                        hovertemplate="%{text} + QAT<br>loss %{y:.3f}<extra></extra>")
    fig.add_hline(y=d["bf16"], line=dict(dash="dot", color="#616161"),
                  annotation_text=f"as released: {d['bf16']:.3f}", annotation_position="bottom left")
    for name, bits in RELEASE_BITS.items():   # a log axis takes shapes and annotations in log10 units
        fig.add_shape(type="line", x0=math.log10(bits), x1=math.log10(bits), y0=0, y1=1, yref="paper",
                      line=dict(dash="dash", color="#757575"))
        fig.add_annotation(x=math.log10(bits), y=1.0, yref="paper", text=f"{name}<br>{bits / 8:.3g} B/param",
                           showarrow=False, font=dict(size=10), yanchor="top", xanchor="right", align="right")
    fig.update_xaxes(type="log", title_text="bits per weight (element + E8M0 scale share; bytes = bits / 8)",
                     tickvals=[2.25, 3.25, 4.25, 8, 16], ticktext=["2.25", "3.25", "4.25", "8", "16"],
                     range=[math.log10(2), math.log10(17)])
    fig.update_yaxes(title_text="held-out loss (nats/token)")
    return _layout(fig, "tiny-v4 below FP4: held-out loss vs bits per weight", height=480)


def build_ar(res: dict) -> go.Figure:
    """The 2×2 (AR × rollback) around the same provoked spike. Left: each cell's loss minus the run without the
    spike, per step (the steps training kept: after a rollback, the replay), so batch-to-batch noise cancels;
    shading marks the steps AR-only routed with parameters from Δt steps earlier. Right: the post-spike loss
    of each cell and of the run without the spike (grey). The every-parameter contrast is not drawn: its
    losses, a nat higher, would flatten these differences."""
    d, s = res["details"], res["settings"]
    names = list(d["excess"])
    fig = make_subplots(rows=1, cols=2, column_widths=[0.62, 0.38], horizontal_spacing=0.12,
                        subplot_titles=("loss − no-spike run's (nats/token)",
                                        f"mean loss, steps {s['spike_at'] + 1}–{s['spike_at'] + s['ar_duration']}"))
    for i, name in enumerate(names):
        xy = d["excess"][name]
        fig.add_scatter(x=[p[0] for p in xy], y=[p[1] for p in xy], name=name, legendgroup=name,
                        line=dict(color=PALETTE[i], dash="dot" if "rollback" in name else "solid"), row=1, col=1)
    ar = d["cells"]["AR only"]
    on = [st for st, flag in zip(ar["step"], ar["ar_on"]) if flag]
    if on:
        fig.add_vrect(x0=min(on) - 0.5, x1=max(on) + 0.5, fillcolor="#9e9e9e", opacity=0.15, line_width=0,
                      annotation_text=f"AR on (Δt = {s['ar_lag']})", annotation_position="top left", row=1, col=1)
    labels = [*names, "no spike"]
    vals = [d["cells"][n]["post_spike_loss"] for n in labels]
    fig.add_bar(x=labels, y=vals, marker_color=[*PALETTE[:len(names)], "#9e9e9e"],
                text=[f"{v:.3f}" for v in vals], textposition="outside", showlegend=False, row=1, col=2)
    lo, hi = min(vals), max(vals)
    fig.update_yaxes(range=[lo - 0.5 * (hi - lo), hi + 0.25 * (hi - lo)], title_text="nats/token", row=1, col=2)
    fig.update_xaxes(title_text="optimiser step", row=1, col=1)
    fig.update_xaxes(tickangle=30, row=1, col=2)
    fig = _layout(fig, f"A router spike (router update × {s['spike_lr_mult']:g} at step {s['spike_at']}), "
                       f"tiny-v4: AR alone {res['effect']:+.3f} nats", height=470)
    fig.update_layout(margin=dict(t=80, b=130), legend=dict(orientation="h", y=-0.3))
    return fig


def build_qat(res: dict) -> go.Figure:
    """Left: held-out loss of the fine-tuned full-precision masters, PTQ (masters rounded to MXFP4) and FP4
    QAT, the released model as a dotted line. Right: per routed expert, the relative MXFP4 rounding error of
    each arm's masters against how far the PTQ masters moved from the released weights."""
    d = res["details"]
    fig = make_subplots(rows=1, cols=2, column_widths=[0.45, 0.55], horizontal_spacing=0.12,
                        subplot_titles=("held-out loss (nats/token)", "per routed expert: rounding error"))
    labels = ["full-precision<br>masters", "PTQ: rounded<br>to FP4", "QAT:<br>FP4 experts"]
    vals = [d["ptq_masters"], res["baseline"]["heldout_loss"], res["treatment"]["heldout_loss"]]
    fig.add_bar(x=labels, y=vals, marker_color=list(PALETTE[:3]), text=[f"{v:.4f}" for v in vals],
                textposition="outside", showlegend=False, row=1, col=1)
    span = max(vals) - min(vals)
    lo, hi = min(vals) - max(0.02, 2 * span), max(vals) + max(0.02, 2 * span)
    fig.update_yaxes(range=[lo, hi], row=1, col=1)
    rel = d["released"]
    fig.add_annotation(x=0.5, y=hi, xref="x", yref="y", showarrow=False, yanchor="top",
                       text=f"released lab-v4 before fine-tuning: {rel:.4f}", font=dict(size=11))
    for i, arm in enumerate(("ptq", "qat")):
        ex = d["experts"][arm]
        name = "masters after full-precision fine-tune" if arm == "ptq" else "masters after QAT fine-tune"
        fig.add_scatter(x=[x["drift"] for x in ex], y=[x["rel_error"] for x in ex], mode="markers",
                        marker=dict(size=6, color=PALETTE[i + 1], opacity=0.7), name=name,
                        text=[f"layer {x['layer']} expert {x['expert']}, {100 * x['reverted']:.3g} % of moved "
                              "weights round back" for x in ex],
                        hovertemplate="%{text}<br>drift %{x:.3g}<br>rounding error %{y:.3g}<extra></extra>",
                        row=1, col=2)
    xs = [x["drift"] for arm in ("ptq", "qat") for x in d["experts"][arm]]
    fig.add_scatter(x=[min(xs), max(xs)], y=[min(xs), max(xs)], mode="lines", line=dict(dash="dot", color="#757575"),
                    name="error = drift: rounding lands back on the released weights", row=1, col=2)
    fig.update_xaxes(title_text="drift ‖w − w₀‖ / ‖w₀‖ from the released expert", row=1, col=2)
    fig.update_yaxes(title_text="‖FP4(w) − w‖ / ‖w‖", row=1, col=2)
    s = res["settings"]
    fig = _layout(fig, f"lab-v4 fine-tuned {s['steps']} steps at lr {s['lr']:g} ({s.get('trainable', 'all')} "
                       f"trainable): PTQ − QAT = {res['effect']:+.3g} nats", height=500)
    fig.update_layout(legend=dict(orientation="h", y=-0.4), margin=dict(t=80, b=150))
    return fig


def qat_lines(res: dict) -> str:
    """The qat result as text: the four held-out losses, PTQ's cost, QAT's recovery, and per arm the mean
    per-expert drift, rounding error and share of moved weights that rounding puts back."""
    d, b, t = res["details"], res["baseline"], res["treatment"]
    lines = [f"released lab-v4 (FP4 experts)          {d['released']:.4f}",
             f"fine-tuned, full-precision masters     {d['ptq_masters']:.4f}",
             f"  ... rounded to MXFP4 after (PTQ)     {b['heldout_loss']:.4f}   PTQ costs {d['gap_ptq']:+.4f}",
             f"fine-tuned with FP4 QAT (FP4 experts)  {t['heldout_loss']:.4f}   PTQ − QAT = {res['effect']:+.4f}",
             f"  ... QAT masters, unrounded           {d['qat_masters']:.4f}"]
    for arm, label in (("ptq", "full-precision"), ("qat", "QAT")):
        ex = d["experts"][arm]
        n = len(ex)
        lines.append(f"{label} masters, mean over {n} experts: drift {sum(x['drift'] for x in ex) / n:.3f}, "
                     f"rounding error {sum(x['rel_error'] for x in ex) / n:.3f}, "
                     f"moved weights rounded back {100 * sum(x['reverted'] for x in ex) / n:.1f} %")
    return "\n".join(lines)


def build_mhc(res: dict) -> go.Figure:
    """Composite Amax gain by depth after training (log y) and the training loss, residual / HC / mHC."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("composite gain by depth (log scale)", "training loss (MSE)"))
    sides = {"residual": res["details"]["residual"], "HC": res["baseline"], "mHC": res["treatment"]}
    depth = res["details"]["depth"]
    for i, (label, s) in enumerate(sides.items()):
        fig.add_scatter(x=depth, y=s["gain_by_depth"], name=label, line=dict(color=PALETTE[i]), legendgroup=label,
                        row=1, col=1)
        fig.add_scatter(x=list(range(len(s["loss"]))), y=s["loss"], name=label, line=dict(color=PALETTE[i]),
                        legendgroup=label, showlegend=False, row=1, col=2)
    fig.update_yaxes(type="log", row=1, col=1)
    fig.update_xaxes(title_text="sublayer", row=1, col=1)
    fig.update_xaxes(title_text="optimiser step", row=1, col=2)
    return _layout(fig, f"Residual vs HC vs mHC, {len(depth)} sublayers trained {len(res['baseline']['loss'])} steps")
