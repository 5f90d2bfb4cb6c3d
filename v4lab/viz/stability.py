"""Notebook 06: training stability — Anticipatory Routing around a loss spike, and the aux-loss-free bias.

Three figures on the pattern of :mod:`v4lab.viz.common`:

* :class:`ARWidget` — :func:`v4lab.experiments.anticipatory.run`: the micro V4 trained three ways (AR off,
  AR always on, AR switched on by the spike detector) through an induced spike; loss, routing churn or max
  MoE output by iteration, with a cursor (the ``iteration`` slider) that reads all three at one point.
  The run takes a minute or more on 2 cores, so its result is stored in ``v4lab/viz/data/anticipatory.json``
  (:func:`ar_result`; ``recompute=True`` reruns it; the stored ``config`` says what ran).
  :func:`build_overhead`: seconds per step of each variant, against the report's ~20 %.
* :class:`BiasWidget` — the aux-loss-free bias update (``v4lab.moe.bias_update``) on its own: a router
  whose affinities favour some experts (``v4lab.gate.gate_scores`` of skewed logits, fresh tokens every
  step), top-k by ``v4lab.gate.select_topk`` with the bias, the bias nudged by γ·sign(mean − load) after
  every step. Sliders: γ and the skew; the load's max/mean and every expert's bias by step.
* :func:`build_training_loads` — the same max/mean on the real training run of the notebook model (its
  ``train_log.jsonl``): learned-router layers, which the bias balances, next to the hash layers.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch

from v4lab.experiments import anticipatory
from v4lab.gate import gate_scores, select_topk
from v4lab.moe import bias_update, expert_load, load_imbalance
from v4lab.viz import trained
from v4lab.viz.common import Widget, check_choice, figure_from, fmt3, register, stored_result

DATA_DIR = Path(__file__).resolve().parent / "data"
AR_CACHE = DATA_DIR / "anticipatory.json"
VARIANTS = {"off": "AR off", "always": "AR always on", "spike": "AR on spike (detector)"}
VCOLORS = {"off": "#7f7f7f", "always": "#1f77b4", "spike": "#d62728"}
AR_METRICS = {"loss": "next-token loss", "churn": "routing churn (share of tokens re-routed)",
              "max_moe": "max |MoE output|"}
REPORT_AR_OVERHEAD = 0.20                  # the report: ~20 % wall-clock overhead (with overlap)
V4_GAMMA = 0.001
GAMMA_STOPS = [0.0, 0.0001, 0.0003, 0.001, 0.003, 0.01, 0.03]
SKEW_STOPS = [0.5, 1.0, 2.0]
SIM_STEPS, SIM_TOKENS, SIM_EXPERTS, SIM_K = 300, 256, 8, 2


# ------------------------------------------------------------------------------------ anticipatory routing
def ar_result(recompute: bool = False, **kwargs) -> dict:
    """:func:`v4lab.experiments.anticipatory.run` with its defaults, stored in ``anticipatory.json``.
    ``recompute=True`` (or any keyword for ``run``) runs it again; with the defaults it refreshes the file."""
    return stored_result(AR_CACHE, anticipatory.run, recompute, **kwargs)


def ar_variants(result: dict) -> list[str]:
    return [v for v in VARIANTS if v in result]


def n_iters(result: dict) -> int:
    return max(len(result[v]["iter"]) for v in ar_variants(result))


def _at(xs: list, i: int):
    return xs[min(i, len(xs) - 1)]


def ar_table(result: dict) -> str:
    """Plain text: per variant, loss at the spike, peak and mean loss after it, AR steps, events, s/step."""
    c = result["config"]
    lines = [f"spike: lr × {c['spike_lr_mult']:g} at step {c['spike_at']}; Δt = {c['ar_lag']}, "
             f"detector: loss > {c['spike_ratio']:g} × EMA, AR for {c['ar_duration']} steps",
             f"{'variant':<24} {'peak loss':>9} {'mean after':>10} {'AR steps':>8} {'s/step':>7} {'overhead':>8}  events"]
    for v in ar_variants(result):
        r = result[v]
        ev = "; ".join(f"it {i}: {e}" for i, e in r["events"]) or "-"
        lines.append(f"{VARIANTS[v]:<24} {r['peak_loss']:>9.3f} {r['post_spike_loss']:>10.3f} "
                     f"{sum(bool(a) for a in r['ar_on']):>8d} {r['seconds_per_step']:>7.3f} "
                     f"{100 * result['overhead'][v]:>7.0f}%  {ev}")
    return "\n".join(lines)


def ar_data(result: dict, metric: str = "loss", iteration: int = 0) -> dict:
    """Traces (fixed count 6): per variant the metric by iteration (3), the spike variant's detector
    events, the iterations where AR was on (spike variant), and the cursor's points (one per variant)."""
    check_choice("metric", metric, AR_METRICS)
    vs = ar_variants(result)
    n = n_iters(result)
    if isinstance(iteration, bool) or not isinstance(iteration, int) or not 0 <= iteration < n:
        raise ValueError(f"iteration = {iteration!r}: must be an integer in [0, {n - 1}]")
    traces = []
    for v in VARIANTS:
        r = result.get(v)
        # the runs share every step before the spike: "AR off" is a wide pale band under the other two
        line = (dict(color=VCOLORS[v], width=7) if v == "off" else
                dict(color=VCOLORS[v], width=2 if v != "always" else 3, dash="dot" if v == "always" else "solid"))
        traces.append(dict(type="scatter", mode="lines", x=r["iter"] if r else [], y=r[metric] if r else [],
                           name=VARIANTS[v], line=line, opacity=0.45 if v == "off" else 1.0))
    sp = result.get("spike")
    ev_x = [i for i, _ in sp["events"]] if sp else []
    traces.append(dict(type="scatter", mode="markers+text", x=ev_x, y=[_at(sp[metric], i) for i in ev_x],
                       text=[e.split(":")[0] if ":" in e else e for _, e in sp["events"]] if sp else [],
                       textposition="top center", name="detector events",
                       marker=dict(color=VCOLORS["spike"], size=12, symbol="x")))
    on_x = [i for i, a in zip(sp["iter"], sp["ar_on"]) if a] if sp else []
    traces.append(dict(type="scatter", mode="markers", x=on_x, y=[_at(sp[metric], i) for i in on_x],
                       name="AR on (detector variant)", marker=dict(color=VCOLORS["spike"], size=7, symbol="square-open")))
    # a run that stopped before the cursor has no point there (None: plotly draws nothing)
    ran = {v: iteration < len(result[v][metric]) for v in vs}
    traces.append(dict(type="scatter", mode="markers", x=[iteration] * len(vs),
                       y=[result[v][metric][iteration] if ran[v] else None for v in vs], name="cursor",
                       showlegend=False, marker=dict(size=12, symbol="circle-open", line=dict(width=3),
                                                     color=[VCOLORS[v] for v in vs])))
    vals = ", ".join(f"{VARIANTS[v]} {fmt3(result[v][metric][iteration])}"
                     + (" (AR on)" if result[v]["ar_on"][iteration] else "") if ran[v] else
                     f"{VARIANTS[v]} stopped at {len(result[v][metric]) - 1}" for v in vs)
    title = f"{AR_METRICS[metric]} at iteration {iteration}: {vals}"
    return {"traces": traces, "layout": {"title": {"text": title, "font": {"size": 12}},
                                         "yaxis": {"title": AR_METRICS[metric]}}}


def ar_layout(result: dict) -> dict:
    """The fixed layout, with the spiked step marked (the cursor is a trace: callbacks touch no shapes)."""
    c = result["config"]
    return dict(AR_LAYOUT, shapes=[dict(type="line", xref="x", yref="paper", x0=c["spike_at"], x1=c["spike_at"],
                                        y0=0, y1=1, line=dict(color="#ff7f0e", dash="dash"))])


AR_LAYOUT = dict(height=430, xaxis=dict(title="iteration (orange dash: the step whose learning rate is multiplied)"),
                 yaxis=dict(title="loss"), legend=dict(orientation="h", yanchor="top", y=-0.18, xanchor="left", x=0),
                 margin=dict(l=60, r=20, t=60, b=110))


def build_ar(result: dict | None = None, metric: str = "loss", iteration: int | None = None):
    r = ar_result() if result is None else result
    it = r["config"]["spike_at"] if iteration is None else iteration
    return figure_from(ar_data(r, metric, min(it, n_iters(r) - 1)), ar_layout(r))


@register
class ARWidget(Widget):
    """Which quantity to plot, and an iteration cursor that reads every variant at one point."""

    name = "stability.ar"
    defaults = {"metric": "loss", "iteration": -1}

    def __init__(self, static=None, result: dict | None = None, **state):
        self.result = ar_result() if result is None else result
        super().__init__(static, **state)

    def validate(self, state):
        check_choice("metric", state["metric"], AR_METRICS)
        if state["iteration"] == -1:                      # default: the spike step
            state["iteration"] = min(self.result["config"]["spike_at"], n_iters(self.result) - 1)
        n = n_iters(self.result)
        it = state["iteration"]
        if isinstance(it, bool) or not isinstance(it, int) or not 0 <= it < n:
            raise ValueError(f"iteration = {it!r}: must be an integer in [0, {n - 1}]")

    def data(self):
        return ar_data(self.result, **self.state)

    def layout(self):
        return ar_layout(self.result)

    def make_controls(self):
        import ipywidgets as W
        return {"metric": W.ToggleButtons(options=[(v.split(" (")[0], k) for k, v in AR_METRICS.items()],
                                          value=self.state["metric"], description="plot"),
                "iteration": W.IntSlider(min=0, max=n_iters(self.result) - 1, value=self.state["iteration"],
                                         description="iteration")}

    def sweep_values(self, control):
        return {"metric": list(AR_METRICS), "iteration": list(range(n_iters(self.result)))}[control]

    def on_metric(self, value):
        self.set(metric=value)

    def on_iteration(self, value):
        self.set(iteration=int(value))


def build_overhead(result: dict | None = None):
    """Seconds per training step of each variant, with the overhead over AR off, vs the report's ~20 %."""
    r = ar_result() if result is None else result
    vs = ar_variants(r)
    base = r["off"]["seconds_per_step"] if "off" in r else None
    traces = [dict(type="bar", x=[VARIANTS[v] for v in vs], y=[r[v]["seconds_per_step"] for v in vs],
                   marker=dict(color=[VCOLORS[v] for v in vs]), name="seconds per step",
                   text=[f"{100 * r['overhead'][v]:+.0f}%" for v in vs], textposition="outside")]
    traces.append(dict(type="scatter", mode="lines", x=[VARIANTS[vs[0]], VARIANTS[vs[-1]]],
                       y=[base * (1 + REPORT_AR_OVERHEAD)] * 2 if base else [], name="AR off + 20 % (the report)",
                       line=dict(color="#ff7f0e", dash="dash")))
    return figure_from({"traces": traces, "layout": {"title": {"text": "wall-clock seconds per training step "
                                                              "(measured on this machine)", "font": {"size": 13}}}},
                       dict(height=360, yaxis=dict(title="s / step", rangemode="tozero")))


# ------------------------------------------------------------------------------------ the bias update
@lru_cache(maxsize=len(GAMMA_STOPS) * len(SKEW_STOPS) + 2)
def simulate_bias(gamma: float, skew: float, steps: int = SIM_STEPS, seed: int = 0) -> dict:
    """A router with fixed preferences and no learning except the bias: every step draws fresh tokens'
    logits z = N(0, 1) + skew · c_e (c_e spread evenly over [−1, 1] across experts), affinities
    s = ``gate_scores(z)`` (sqrt-softplus), routes = ``select_topk(s, b, K)``, then ``bias_update(b, load, γ)``.

    Returns {"imbalance": [max/mean load per step], "bias": [[b_e per step] per expert], "load": final load}."""
    g = torch.Generator().manual_seed(seed)
    pref = skew * torch.linspace(-1.0, 1.0, SIM_EXPERTS)
    bias = torch.zeros(SIM_EXPERTS)
    imb, hist, load = [], [], None
    for _ in range(steps):
        s = gate_scores(torch.randn(SIM_TOKENS, SIM_EXPERTS, generator=g) + pref)
        load = expert_load(select_topk(s, bias, SIM_K), SIM_EXPERTS)
        imb.append(load_imbalance(load))
        bias_update(bias, load, gamma)
        hist.append(bias.tolist())
    return {"imbalance": imb, "bias": [list(col) for col in zip(*hist)], "load": load.tolist()}


def bias_data(gamma: float = V4_GAMMA, skew: float = 1.0) -> dict:
    """Traces (fixed count 3 + experts): max/mean load by step with γ and without an update, V4's γ for
    reference; every expert's bias by step."""
    check_choice("gamma", gamma, GAMMA_STOPS)
    check_choice("skew", skew, SKEW_STOPS)
    cur, none, v4 = simulate_bias(gamma, skew), simulate_bias(0.0, skew), simulate_bias(V4_GAMMA, skew)
    steps = list(range(1, SIM_STEPS + 1))
    traces = [
        dict(type="scatter", mode="lines", x=steps, y=none["imbalance"], name="no bias update (γ = 0)",
             line=dict(color="#bbbbbb"), xaxis="x", yaxis="y"),
        dict(type="scatter", mode="lines", x=steps, y=v4["imbalance"], name="V4's γ = 0.001",
             line=dict(color="#1f77b4", dash="dot"), xaxis="x", yaxis="y"),
        dict(type="scatter", mode="lines", x=steps, y=cur["imbalance"], name=f"γ = {gamma:g}",
             line=dict(color="#d62728", width=2), xaxis="x", yaxis="y"),
    ]
    for e, b in enumerate(cur["bias"]):
        traces.append(dict(type="scatter", mode="lines", x=steps, y=b, name=f"b[{e}]", showlegend=False,
                           line=dict(color=f"hsl({int(240 * e / (SIM_EXPERTS - 1))},70%,45%)", width=1),
                           hovertemplate=f"expert {e}: bias %{{y:.4f}} at step %{{x}}<extra></extra>",
                           xaxis="x2", yaxis="y2"))
    last = sum(cur["imbalance"][-50:]) / 50
    title = (f"skew {skew:g}, γ = {gamma:g}: load max/mean {cur['imbalance'][0]:.2f} at step 1 → "
             f"{last:.2f} (mean of the last 50 steps); without the update {sum(none['imbalance'][-50:]) / 50:.2f}")
    return {"traces": traces, "layout": {"title": {"text": title, "font": {"size": 12}}}}


BIAS_LAYOUT = dict(height=420, legend=dict(orientation="h", yanchor="top", y=-0.18, xanchor="left", x=0),
                   margin=dict(l=60, r=20, t=60, b=100),
                   xaxis=dict(domain=[0, 0.55], title="step"), yaxis=dict(title="load max / mean", rangemode="tozero"),
                   xaxis2=dict(domain=[0.65, 1], title="step", anchor="y2"),
                   yaxis2=dict(title="bias b_e (blue: least preferred → red: most)", anchor="x2"))


def build_bias(gamma: float = V4_GAMMA, skew: float = 1.0):
    return figure_from(bias_data(gamma, skew), BIAS_LAYOUT)


@register
class BiasWidget(Widget):
    """γ (the bias step) and the skew of the router's preferences → load balance and the biases by step."""

    name = "stability.bias"
    defaults = {"gamma": V4_GAMMA, "skew": 1.0}

    def __init__(self, static=None, **state):
        for g in GAMMA_STOPS:
            for s in SKEW_STOPS:
                simulate_bias(g, s)
        super().__init__(static, **state)

    def validate(self, state):
        check_choice("gamma", state["gamma"], GAMMA_STOPS)
        check_choice("skew", state["skew"], SKEW_STOPS)

    def data(self):
        return bias_data(**self.state)

    def layout(self):
        return BIAS_LAYOUT

    def make_controls(self):
        import ipywidgets as W
        return {"gamma": W.SelectionSlider(options=[(f"{g:g}", g) for g in GAMMA_STOPS], value=self.state["gamma"],
                                           description="γ"),
                "skew": W.SelectionSlider(options=[(f"{s:g}", s) for s in SKEW_STOPS], value=self.state["skew"],
                                          description="skew")}

    def sweep_values(self, control):
        return {"gamma": GAMMA_STOPS, "skew": SKEW_STOPS}[control]

    def on_gamma(self, value):
        self.set(gamma=value)

    def on_skew(self, value):
        self.set(skew=value)


# ------------------------------------------------------------------------------------ the real training run
def training_log_path(data_dir=None) -> Path | None:
    """``train_log.jsonl`` of the trained checkpoint (its directory, or ``data/<name>.train_log.jsonl``)."""
    found = trained.find_trained(data_dir)
    if found is None:
        return None
    for p in (found / "train_log.jsonl", found.parent / f"{found.name}.train_log.jsonl"):
        if p.is_file():
            return p
    return None


def training_loads(path=None) -> dict | None:
    """Per MoE layer of the training run, load max/mean by step (``v4lab.moe.load_imbalance`` of the logged
    loads). Returns {"step", "layers": [{"layer", "learned", "imbalance"}]} or None without a log."""
    path = training_log_path() if path is None else Path(path)
    if path is None or not path.is_file():
        return None
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    recs = [r for r in recs if "load" in r]
    if not recs:
        return None
    learned = set(recs[0].get("learned_layers", []))
    n = len(recs[0]["load"])
    cfg_path = path.parent / "config.json" if (path.parent / "config.json").is_file() else None
    n_main = json.loads(cfg_path.read_text()).get("num_hidden_layers", n) if cfg_path else n
    layers = [{"layer": j, "learned": j in learned, "mtp": j >= n_main,
               "imbalance": [load_imbalance(torch.tensor(r["load"][j])) for r in recs]} for j in range(n)]
    return {"step": [r.get("iter", i) for i, r in enumerate(recs)], "layers": layers, "path": str(path)}


def build_training_loads(loads: dict | None = None):
    """Load max/mean by training step for every MoE layer of the notebook model's training run."""
    loads = training_loads() if loads is None else loads
    traces = []
    if loads is not None:
        for L in loads["layers"]:
            label = "MTP block" if L.get("mtp") else f"layer {L['layer']} ({'learned' if L['learned'] else 'hash'})"
            traces.append(dict(type="scatter", mode="lines", x=loads["step"], y=_rolling(L["imbalance"], SMOOTH),
                               name=label, line=dict(dash="solid" if L["learned"] else "dot", width=2)))
    title = (f"load max/mean per MoE layer while the notebook model trained ({SMOOTH}-step moving average)"
             if loads else "no training log found next to the model (synthetic weights)")
    notes = [] if loads else [dict(text="no train_log.jsonl next to the model: nothing to plot", xref="x domain",
                                   yref="y domain", x=0.5, y=0.5, showarrow=False)]
    return figure_from({"traces": traces, "layout": {"title": {"text": title, "font": {"size": 13}},
                                                     "annotations": notes}},
                       dict(height=420, xaxis=dict(title="training step"),
                            yaxis=dict(title="load max / mean (1 = balanced)"),
                            # one legend entry per MoE layer (7 on lab-v4): below the plot, clear of the title
                            legend=dict(orientation="h", yanchor="top", y=-0.2, xanchor="left", x=0),
                            margin=dict(b=110)))


SMOOTH = 10


def _rolling(xs: list, k: int) -> list:
    """Mean of the last ``k`` values at each step (fewer at the start)."""
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x - (xs[i - k] if i >= k else 0.0)
        out.append(acc / min(i + 1, k))
    return out


if __name__ == "__main__":
    torch.set_num_threads(1)             # tiny ops: one thread is several times faster on a busy 2-core machine
    ar_result(recompute=True)
    print(f"wrote {AR_CACHE}")
