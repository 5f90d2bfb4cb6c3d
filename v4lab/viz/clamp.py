"""Notebook 04: V4's SwiGLU clamp, on the trained model's activations and in a stability experiment.

V4's experts compute ``SiLU(min(W1 x, L)) * clip(W3 x, -L, L)`` with L = ``swiglu_limit`` = 10
(``v4lab.moe.swiglu``): the gate branch is clipped from above only, the up branch on both sides.

Two widgets on the pattern of :mod:`v4lab.viz.common`:

* :class:`PreactWidget` — the gate (W1 x) and up (W3 x) pre-activations each routed expert of a layer
  really saw on the sample texts (:func:`collect`: one forward per text through the notebook model,
  :func:`v4lab.viz.trained.trained_model`), as histograms with the limit drawn on them, and what a limit
  does: the share of values clipped and the relative change of the layer's routed-expert output
  (``v4lab.moe.moe_grouped`` with that limit vs without one). Everything per (layer, limit) is computed
  once at construction; the sliders only pick.
* :class:`ExperimentWidget` — :func:`v4lab.experiments.swiglu_clamp.run` (the micro V4 trained at a high
  learning rate with and without the clamp): loss, max pre-activation, max MoE output, gradient norm by
  step. The run takes minutes on 2 cores, so its result is stored in ``v4lab/viz/data/clamp_experiment.json``
  (:func:`experiment_result`, ``recompute=True`` reruns it; the stored ``config`` says what ran).
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from v4lab.experiments import swiglu_clamp
from v4lab.moe import moe_grouped
from v4lab.viz import trained
from v4lab.viz.common import Widget, check_choice, figure_from, register, stored_result

V4_LIMIT = 10.0                                  # swiglu_limit of V4-Flash / V4-Pro (and of tiny / lab)
LIMIT_STOPS = [0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0]
N_BINS = 81
MAX_TOKENS = 256
TEXTS = tuple(trained.SAMPLE_TEXTS.values())
DATA_DIR = Path(__file__).resolve().parent / "data"
EXPERIMENT_CACHE = DATA_DIR / "clamp_experiment.json"
METRICS = {"lm_loss": ("next-token loss", False), "preact_max": ("max |W1 x|, |W3 x| (before the clamp)", True),
           "moe_max": ("max |MoE output|", True), "grad_norm": ("gradient norm (before clipping)", True)}
VCOLORS = {"clamp": "#1f77b4", "no_clamp": "#d62728"}
CLIP_COLOR, KEEP_COLOR = "#d62728", "#1f77b4"


# ------------------------------------------------------------------------------------ activations
@contextlib.contextmanager
def swiglu_limit(model, limit: float):
    """Temporarily run every MoE layer (routed and shared experts) of ``model`` with clamp ``limit``
    (<= 0: no clamp); restores the model's own limits afterwards."""
    saved = []
    try:
        for b in model.blocks():
            saved.append((b.ffn, b.ffn.limit))
            b.ffn.limit = float(limit)
            for e in list(b.ffn.experts) + ([b.ffn.shared_experts] if b.ffn.shared_experts is not None else []):
                saved.append((e, e.limit))
                e.limit = float(limit)
        yield model
    finally:
        for obj, lim in saved:
            obj.limit = lim


@torch.no_grad()
def collect(texts=TEXTS, model=None, tok=None) -> dict:
    """Run each text (first ``MAX_TOKENS`` tokens) through the model; per MoE layer keep the expert inputs
    x [T, D] (after ``ffn_norm``), the routes (idx, weights [T, K]) and the pre-activations every routed
    expert saw: gate = W1_e x, up = W3_e x over the tokens routed to e (flattened over tokens and width).

    Returns {"layers": [ids], "hash": [bool], "limit": the model's limit, "tokens": T, "x": {l: [T, D]},
    "idx": {l: ...}, "weights": {l: ...}, "gate": {l: 1-D tensor}, "up": {l: 1-D tensor}}."""
    if model is None:
        model, tok, _ = trained.trained_model()
    moes = [b.ffn for b in model.layers]
    xs = {m.layer_id: [] for m in moes}
    # everything captured goes to the CPU (the figures and limit_effects work there, whatever the model's device)
    hooks = [m.register_forward_hook(lambda mod, args, out: xs[mod.layer_id].append(args[0].detach().cpu()))
             for m in moes]
    idx, wts = {m.layer_id: [] for m in moes}, {m.layer_id: [] for m in moes}
    n_tok = 0
    try:
        for text in texts:
            ids = trained.encode(tok, text, MAX_TOKENS)
            model.streams(ids)            # what the experts saw, not the logits
            n_tok += ids.shape[1]
            for m in moes:
                idx[m.layer_id].append(m.last_routing["idx"].cpu())
                wts[m.layer_id].append(m.last_routing["weights"].cpu())
    finally:
        for h in hooks:
            h.remove()
    out = {"layers": [m.layer_id for m in moes], "hash": [m.gate.is_hash for m in moes],
           "limit": float(moes[0].limit), "tokens": n_tok, "x": {}, "idx": {}, "weights": {}, "gate": {}, "up": {},
           "shared_peak": {}}
    for m in moes:
        l = m.layer_id
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in xs[l]]).float()          # [T, D]
        ix, w = torch.cat(idx[l]), torch.cat(wts[l])                                  # [T, K]
        g, u = [], []
        for e, ex in enumerate(m.experts):
            rows = (ix == e).any(-1)
            if rows.any():
                g.append(F.linear(x[rows], ex.w1.weight.float().cpu()).flatten())
                u.append(F.linear(x[rows], ex.w3.weight.float().cpu()).flatten())
        out["x"][l], out["idx"][l], out["weights"][l] = x, ix, w
        out["gate"][l], out["up"][l] = torch.cat(g), torch.cat(u)
        sh = m.shared_experts                      # every token goes through it; clamped the same way
        out["shared_peak"][l] = (0.0 if sh is None else
                                 max(float(F.linear(x, sh.w1.weight.float().cpu()).max()),
                                     float(F.linear(x, sh.w3.weight.float().cpu()).abs().max())))
    return out


def peak(acts: dict) -> float:
    """The largest value the clamp could act on: max over layers of max W1 x and max |W3 x|, routed and
    shared experts. Below the limit, the clamp changes nothing on these texts."""
    return max(max(float(acts["gate"][l].max()), float(acts["up"][l].abs().max()), acts["shared_peak"][l])
               for l in acts["layers"])


@torch.no_grad()
def limit_effects(acts: dict, layer: int, model=None, limits=LIMIT_STOPS) -> dict:
    """For each limit: the share of gate values above it, of up values outside [−L, L], and the relative
    change ‖y_L − y_off‖ / ‖y_off‖ of the layer's routed-expert output (``moe_grouped``, same routes)."""
    if model is None:
        model, _, _ = trained.trained_model()
    m = model.layers[layer].ffn
    w1s, w2s, w3s = ([e.w1.weight.cpu() for e in m.experts], [e.w2.weight.cpu() for e in m.experts],
                     [e.w3.weight.cpu() for e in m.experts])      # acts (from collect) live on the CPU
    x, ix, w = acts["x"][layer], acts["idx"][layer], acts["weights"][layer]
    y_off = moe_grouped(x, ix, w, w1s, w2s, w3s, 0.0)
    g, u = acts["gate"][layer], acts["up"][layer]
    out = {"limit": list(limits), "gate_clipped": [], "up_clipped": [], "output_change": []}
    for L in limits:
        y = moe_grouped(x, ix, w, w1s, w2s, w3s, float(L))
        out["gate_clipped"].append(float((g > L).float().mean()))
        out["up_clipped"].append(float((u.abs() > L).float().mean()))
        out["output_change"].append(float((y - y_off).norm() / y_off.norm().clamp_min(1e-30)))
    return out


def histogram(values: torch.Tensor, half_width: float, n_bins: int = N_BINS) -> dict:
    """Counts of ``values`` in ``n_bins`` equal bins over [−half_width, half_width] (values outside land
    in the end bins). Returns {"centers", "counts", "width"}."""
    edges = torch.linspace(-half_width, half_width, n_bins + 1)
    b = torch.bucketize(values.clamp(-half_width, half_width), edges[1:-1])
    counts = torch.bincount(b, minlength=n_bins)
    centers = ((edges[:-1] + edges[1:]) / 2).tolist()
    return {"centers": [round(c, 5) for c in centers], "counts": counts.tolist(), "width": float(edges[1] - edges[0])}


def layer_summary(acts: dict) -> str:
    """Plain text: per MoE layer, the largest gate / up pre-activation of the routed experts, their 99.9th
    percentiles, and the shared expert's largest value; then the share clipped at the model's limit."""
    lines = [f"{'layer':<16} {'max W1 x':>9} {'min W1 x':>9} {'max |W3 x|':>10} {'p99.9 |W1 x|':>12} "
             f"{'p99.9 |W3 x|':>12} {'shared max':>10}"]
    for l, h in zip(acts["layers"], acts["hash"]):
        g, u = acts["gate"][l], acts["up"][l]
        lines.append(f"{l} ({'hash' if h else 'learned'}){'':<{6 if h else 3}} {float(g.max()):>9.2f} "
                     f"{float(g.min()):>9.2f} {float(u.abs().max()):>10.2f} "
                     f"{float(torch.quantile(g.abs(), 0.999)):>12.2f} {float(torch.quantile(u.abs(), 0.999)):>12.2f} "
                     f"{acts['shared_peak'][l]:>10.2f}")
    L = acts["limit"]
    n = sum(int((acts["gate"][l] > L).sum() + (acts["up"][l].abs() > L).sum()) for l in acts["layers"])
    tot = sum(2 * acts["gate"][l].numel() for l in acts["layers"])
    lines.append(f"{acts['tokens']} tokens; at the model's limit L = {L:g}: {n} of {tot:,} routed pre-activations "
                 f"clipped; largest value anywhere {peak(acts):.2f}")
    return "\n".join(lines)


class Preacts:
    """Everything :class:`PreactWidget` shows, computed once: per layer the two histograms and the effect
    of every limit stop."""

    def __init__(self, acts: dict, model=None):
        self.acts = acts
        self.layers = list(acts["layers"])
        self.hist, self.effects = {}, {}
        vmax = max(float(max(acts["gate"][l].abs().max(), acts["up"][l].abs().max())) for l in self.layers)
        self.half = max(1.0, math.ceil(vmax * 1.1))        # one x range for every layer: it covers the values
        for l in self.layers:
            self.hist[l] = {"gate": histogram(acts["gate"][l], self.half), "up": histogram(acts["up"][l], self.half)}
            self.effects[l] = limit_effects(acts, l, model)


_PREACTS: dict = {}


def preacts(model=None, tok=None) -> Preacts:
    """:class:`Preacts` of the sample texts on the notebook model (cached per model)."""
    if model is None:
        model, tok, _ = trained.trained_model()
    key = id(model)
    if key not in _PREACTS:
        _PREACTS[key] = Preacts(collect(TEXTS, model, tok), model)
    return _PREACTS[key]


def preact_data(pre: Preacts, layer: int, limit: float) -> dict:
    """Traces (fixed count 6): gate histogram, up histogram (bins beyond the limit in red); the clipped
    shares of gate and up and the output change over all limits; the current limit's three points."""
    check_choice("layer", layer, pre.layers)
    check_choice("limit", limit, LIMIT_STOPS)
    h, eff, half = pre.hist[layer], pre.effects[layer], pre.half
    i = LIMIT_STOPS.index(limit)
    gcol = [CLIP_COLOR if c > limit else KEEP_COLOR for c in h["gate"]["centers"]]
    ucol = [CLIP_COLOR if abs(c) > limit else KEEP_COLOR for c in h["up"]["centers"]]
    pct = lambda xs: [100 * v for v in xs]                                  # noqa: E731
    traces = [
        dict(type="bar", x=h["gate"]["centers"], y=h["gate"]["counts"], width=h["gate"]["width"],
             marker=dict(color=gcol), name="gate W1·x", showlegend=False, xaxis="x", yaxis="y"),
        dict(type="bar", x=h["up"]["centers"], y=h["up"]["counts"], width=h["up"]["width"],
             marker=dict(color=ucol), name="up W3·x", showlegend=False, xaxis="x2", yaxis="y2"),
        dict(type="scatter", mode="lines", x=LIMIT_STOPS, y=pct(eff["gate_clipped"]), name="gate values clipped (%)",
             line=dict(color="#ff7f0e"), xaxis="x3", yaxis="y3"),
        dict(type="scatter", mode="lines", x=LIMIT_STOPS, y=pct(eff["up_clipped"]), name="up values clipped (%)",
             line=dict(color="#9467bd"), xaxis="x3", yaxis="y3"),
        dict(type="scatter", mode="lines", x=LIMIT_STOPS, y=pct(eff["output_change"]),
             name="routed output change (%)", line=dict(color="#2ca02c", width=3), xaxis="x3", yaxis="y3"),
        dict(type="scatter", mode="markers", x=[limit] * 3,
             y=[100 * eff["gate_clipped"][i], 100 * eff["up_clipped"][i], 100 * eff["output_change"][i]],
             marker=dict(size=12, symbol="circle-open", line=dict(width=3), color=["#ff7f0e", "#9467bd", "#2ca02c"]),
             name="limit now", showlegend=False, xaxis="x3", yaxis="y3"),
    ]
    line = dict(color=CLIP_COLOR, width=2, dash="dash")
    shapes = [dict(type="line", xref="x", yref="y domain", x0=limit, x1=limit, y0=0, y1=1, line=line),
              dict(type="line", xref="x2", yref="y2 domain", x0=limit, x1=limit, y0=0, y1=1, line=line),
              dict(type="line", xref="x2", yref="y2 domain", x0=-limit, x1=-limit, y0=0, y1=1, line=line)]
    kind = "hash" if pre.acts["hash"][pre.layers.index(layer)] else "learned"
    title = (f"layer {layer} ({kind} router), L = {limit:g}{' (V4)' if limit == V4_LIMIT else ''}: "
             f"{100 * eff['gate_clipped'][i]:.3g}% of gate and {100 * eff['up_clipped'][i]:.3g}% of up values clipped; "
             f"routed output changes by {100 * eff['output_change'][i]:.3g}%")
    ann = [dict(text=f"L = {limit:g} lies beyond every value: nothing is clipped" if limit >= half else "",
                # above the two histograms, under the title: inside the plot it covered the histogram's peak
                x=0.33, xref="paper", y=1.0, yref="paper", yanchor="bottom", showarrow=False,
                font=dict(size=11, color=CLIP_COLOR))]
    return {"traces": traces, "layout": {"title": {"text": title, "font": {"size": 13}}, "shapes": shapes,
                                         "annotations": ann}}


def preact_layout(pre: Preacts) -> dict:
    """The fixed layout: both histograms over [−half, half] of the values (the same for every layer)."""
    rng = [-pre.half, pre.half]
    lay = dict(PREACT_LAYOUT)
    lay["xaxis"] = dict(PREACT_LAYOUT["xaxis"], range=rng)
    lay["xaxis2"] = dict(PREACT_LAYOUT["xaxis2"], range=rng)
    return lay


PREACT_LAYOUT = dict(
    height=450, bargap=0, margin=dict(l=60, r=20, t=80, b=110),
    legend=dict(orientation="h", yanchor="top", y=-0.2, xanchor="right", x=1),
    xaxis=dict(domain=[0, 0.3], title="W1·x (gate)"), yaxis=dict(type="log", title="count (log)"),
    xaxis2=dict(domain=[0.36, 0.66], title="W3·x (up)", anchor="y2"), yaxis2=dict(type="log", anchor="x2"),
    xaxis3=dict(domain=[0.74, 1], type="log", title="limit L", anchor="y3"),
    yaxis3=dict(title="%", anchor="x3", rangemode="tozero"),
)


def build_preacts(layer: int | None = None, limit: float = V4_LIMIT):
    """Static figure of :func:`preact_data` on the notebook model (layer: the first MoE layer)."""
    pre = preacts()
    return figure_from(preact_data(pre, pre.layers[0] if layer is None else layer, limit), preact_layout(pre))


@register
class PreactWidget(Widget):
    """Layer and limit → the pre-activation histograms with the limit, the clipped shares, the output change."""

    name = "clamp.preacts"
    defaults = {"layer": 0, "limit": V4_LIMIT}

    def __init__(self, static=None, pre: Preacts | None = None, **state):
        self.pre = preacts() if pre is None else pre
        super().__init__(static, **state)

    def validate(self, state):
        check_choice("layer", state["layer"], self.pre.layers)
        check_choice("limit", state["limit"], LIMIT_STOPS)

    def data(self):
        return preact_data(self.pre, **self.state)

    def layout(self):
        return preact_layout(self.pre)

    def make_controls(self):
        import ipywidgets as W
        kinds = dict(zip(self.pre.layers, self.pre.acts["hash"]))
        return {"layer": W.Dropdown(options=[(f"{l} ({'hash' if kinds[l] else 'learned'})", l) for l in self.pre.layers],
                                    value=self.state["layer"], description="MoE layer"),
                "limit": W.SelectionSlider(options=[(f"{v:g}", v) for v in LIMIT_STOPS], value=self.state["limit"],
                                           description="limit L")}

    def sweep_values(self, control):
        return {"layer": self.pre.layers, "limit": LIMIT_STOPS}[control]

    def on_layer(self, value):
        self.set(layer=int(value))

    def on_limit(self, value):
        self.set(limit=float(value))


# ------------------------------------------------------------------------------------ every layer at once
BRANCHES = {"gate": "gate W1·x (clamped above at L)", "up": "up W3·x (clipped to [−L, L])"}


def overview_hist(pre: Preacts) -> dict:
    """Per layer and branch, a histogram over [−H, H] with H ≥ 1.2 × the model's limit, so the limit is
    always inside the picture (cached on ``pre`` per limit)."""
    L = pre.acts["limit"] or V4_LIMIT
    cache = pre.__dict__.setdefault("_overview", {})
    if L not in cache:
        half = float(max(pre.half, math.ceil(1.2 * L)))
        cache[L] = {"half": half, "hist": {b: {l: histogram(pre.acts[b][l], half) for l in pre.layers}
                                           for b in BRANCHES}}
    return cache[L]


def touched(pre: Preacts, branch: str, layer: int) -> tuple[int, int]:
    """(values the model's clamp changes, values) for one layer and branch: gate > L, or |up| > L."""
    L, v = pre.acts["limit"], pre.acts[branch][layer]
    n = int((v > L).sum()) if branch == "gate" else int((v.abs() > L).sum())
    return n, int(v.numel())


def overview_data(pre: Preacts, branch: str = "gate") -> dict:
    """Traces (fixed count 3): layer × value heatmap of log10(count) of one branch's pre-activations, the
    largest |value| per layer, and the share of values the model's clamp touches per layer (bars)."""
    check_choice("branch", branch, BRANCHES)
    ov = overview_hist(pre)
    L, half = pre.acts["limit"], ov["half"]
    kinds = dict(zip(pre.layers, pre.acts["hash"]))
    ylab = [f"layer {l} ({'hash' if kinds[l] else 'learned'})" for l in pre.layers]
    centers = ov["hist"][branch][pre.layers[0]]["centers"]
    z = [[round(math.log10(c), 3) if c > 0 else None for c in ov["hist"][branch][l]["counts"]] for l in pre.layers]
    peaks = [float(pre.acts[branch][l].max()) if branch == "gate" else float(pre.acts[branch][l].abs().max())
             for l in pre.layers]
    counts = [touched(pre, branch, l) for l in pre.layers]
    pct = [100 * n / max(1, tot) for n, tot in counts]
    traces = [
        dict(type="heatmap", z=z, x=centers, y=ylab, colorscale="Viridis", zmin=0,
             colorbar=dict(title="log10<br>count", x=0.64, len=0.9, thickness=10),
             hovertemplate="%{y}, value %{x:.2f}: 10^%{z:.2f} values<extra></extra>", xaxis="x", yaxis="y"),
        dict(type="scatter", mode="markers", x=peaks, y=ylab, name="largest value" if branch == "gate" else
             "largest |value|", marker=dict(symbol="diamond", size=10, color="#ff7f0e", line=dict(width=1, color="#000")),
             xaxis="x", yaxis="y"),
        dict(type="bar", x=pct, y=ylab, orientation="h", marker=dict(color=CLIP_COLOR), name="touched by the clamp",
             text=[f"{p:.3g}%" for p in pct], textposition="outside", cliponaxis=False, textfont=dict(size=10),
             hovertext=[f"{n:,} of {tot:,} values" for n, tot in counts], showlegend=False, xaxis="x2", yaxis="y2"),
    ]
    line = dict(color=CLIP_COLOR, width=2, dash="dash")
    shapes = [dict(type="line", xref="x", yref="y domain", x0=L, x1=L, y0=0, y1=1, line=line)]
    if branch == "up":
        shapes.append(dict(type="line", xref="x", yref="y domain", x0=-L, x1=-L, y0=0, y1=1, line=line))
    shapes.append(dict(type="rect", xref="x", yref="y domain", x0=L, x1=half, y0=0, y1=1, line=dict(width=0),
                       fillcolor="rgba(214,39,40,0.08)"))
    if branch == "up":
        shapes.append(dict(type="rect", xref="x", yref="y domain", x0=-half, x1=-L, y0=0, y1=1, line=dict(width=0),
                           fillcolor="rgba(214,39,40,0.08)"))
    total = sum(n for n, _ in counts)
    title = (f"{BRANCHES[branch]}, L = {L:g}: the clamp touches {total:,} of {sum(t for _, t in counts):,} values "
             f"({100 * total / max(1, sum(t for _, t in counts)):.3g}%); largest {max(peaks):.3g}<br>"
             f"measured by v4lab on the {pre.acts['tokens']} tokens of the sample texts (routed experts)")
    ann = [] if total else [dict(text=f"no value beyond {'' if branch == 'gate' else '±'}{L:g}:<br>the clamp changes nothing",
                                 xref="x2 domain", yref="y2 domain", x=0.5, y=0.5, showarrow=False,
                                 font=dict(size=12, color="#555"))]
    xmax = max(1e-3, 1.6 * max(pct)) if total else 1
    return {"traces": traces, "layout": {"title": {"text": title, "font": {"size": 13}}, "shapes": shapes,
                                         "annotations": ann, "xaxis": {"range": [-half, half]},
                                         "xaxis2": {"range": [0, xmax]}}}


OVERVIEW_LAYOUT = dict(height=420, margin=dict(l=120, r=30, t=80, b=110),
                       legend=dict(orientation="h", yanchor="top", y=-0.2, xanchor="left", x=0),
                       xaxis=dict(domain=[0, 0.6], title="pre-activation value"),
                       yaxis=dict(autorange="reversed"),
                       xaxis2=dict(domain=[0.74, 1], title="% of values the clamp changes", anchor="y2"),
                       yaxis2=dict(autorange="reversed", anchor="x2", showticklabels=False, matches="y"))


def build_overview(branch: str = "gate"):
    return figure_from(overview_data(preacts(), branch), OVERVIEW_LAYOUT)


@register
class OverviewWidget(Widget):
    """Branch (gate or up) → every MoE layer's pre-activation distribution with the ±L band and the share
    of values the clamp touches."""

    name = "clamp.overview"
    defaults = {"branch": "gate"}

    def __init__(self, static=None, pre: Preacts | None = None, **state):
        self.pre = preacts() if pre is None else pre
        super().__init__(static, **state)

    def validate(self, state):
        check_choice("branch", state["branch"], BRANCHES)

    def data(self):
        return overview_data(self.pre, **self.state)

    def layout(self):
        return OVERVIEW_LAYOUT

    def make_controls(self):
        import ipywidgets as W
        return {"branch": W.ToggleButtons(options=[(v.split(" (")[0], k) for k, v in BRANCHES.items()],
                                          value=self.state["branch"], description="branch")}

    def sweep_values(self, control):
        return {"branch": list(BRANCHES)}[control]

    def on_branch(self, value):
        self.set(branch=value)


# ------------------------------------------------------------------------------------ the experiment
def experiment_result(recompute: bool = False, **kwargs) -> dict:
    """:func:`v4lab.experiments.swiglu_clamp.run` with its defaults, stored in ``clamp_experiment.json``.

    The run (two trainings of the micro V4, plus building the corpus) takes minutes on 2 busy cores, too long
    for a notebook cell. ``recompute=True`` (or any keyword for ``run``) runs it again; with the defaults it
    also refreshes the file."""
    return stored_result(EXPERIMENT_CACHE, swiglu_clamp.run, recompute, **kwargs)


def experiment_table(result: dict) -> str:
    """Plain text: per variant, final loss, spikes, peak pre-activation, peak MoE output, peak grad norm."""
    c = result["config"]
    lines = [f"lr {c['lr']:g}, {c['steps']} steps, seed {c['seed']}, spike = loss > running min + {c['spike_margin']:g}",
             f"{'variant':<18} {'final loss':>10} {'spikes':>6} {'max preact':>10} {'max |MoE out|':>13} {'max grad':>9}"]
    for v, label in (("clamp", f"clamp L = {c['limit']:g}"), ("no_clamp", "no clamp")):
        r = result[v]
        lines.append(f"{label:<18} {r['final_loss']:>10.3f} {r['spikes']:>6d} {max(r['preact_max']):>10.2f} "
                     f"{max(r['moe_max']):>13.2f} {max(r['grad_norm']):>9.2f}")
    return "\n".join(lines)


def experiment_data(result: dict, metric: str = "preact_max") -> dict:
    """Traces (fixed count 3): the metric by step with and without the clamp, and the limit line
    (only for the pre-activation metric)."""
    check_choice("metric", metric, METRICS)
    label, _ = METRICS[metric]
    steps = result["step"]
    L = result["config"]["limit"]
    traces = [dict(type="scatter", mode="lines+markers", x=steps, y=result[v][metric], name=name,
                   line=dict(color=VCOLORS[v]), marker=dict(size=4))
              for v, name in (("clamp", f"clamp L = {L:g} ({result['clamp']['spikes']} spikes)"),
                              ("no_clamp", f"no clamp ({result['no_clamp']['spikes']} spikes)"))]
    lim = metric == "preact_max"
    traces.append(dict(type="scatter", mode="lines", x=[steps[0], steps[-1]] if lim else [],
                       y=[L, L] if lim else [], name=f"limit {L:g}", line=dict(color="#7f7f7f", dash="dash")))
    peak = {v: max(result[v][metric]) for v in ("clamp", "no_clamp")}
    title = (f"{label}: peak {peak['clamp']:.3g} with the clamp, {peak['no_clamp']:.3g} without "
             f"(lr {result['config']['lr']:g})")
    return {"traces": traces, "layout": {"title": {"text": title, "font": {"size": 13}},
                                         "yaxis": {"type": "log" if METRICS[metric][1] else "linear", "title": label}}}


EXPERIMENT_LAYOUT = dict(height=400, xaxis=dict(title="step"), yaxis=dict(title="preact"))


def build_experiment(result: dict | None = None, metric: str = "preact_max"):
    return figure_from(experiment_data(experiment_result() if result is None else result, metric), EXPERIMENT_LAYOUT)


@register
class ExperimentWidget(Widget):
    """Which quantity of the clamp on/off training run to plot by step."""

    name = "clamp.experiment"
    defaults = {"metric": "preact_max"}

    def __init__(self, static=None, result: dict | None = None, **state):
        self.result = experiment_result() if result is None else result
        super().__init__(static, **state)

    def validate(self, state):
        check_choice("metric", state["metric"], METRICS)

    def data(self):
        return experiment_data(self.result, **self.state)

    def layout(self):
        return EXPERIMENT_LAYOUT

    def make_controls(self):
        import ipywidgets as W
        return {"metric": W.ToggleButtons(options=[(v[0].split(" (")[0], k) for k, v in METRICS.items()],
                                          value=self.state["metric"], description="plot")}

    def sweep_values(self, control):
        return {"metric": list(METRICS)}[control]

    def on_metric(self, value):
        self.set(metric=value)


if __name__ == "__main__":
    torch.set_num_threads(1)             # tiny ops: one thread is several times faster on a busy 2-core machine
    experiment_result(recompute=True)
    print(f"wrote {EXPERIMENT_CACHE}")
