"""Notebook 01: V4's MoE — 671B → 1.6T, the sqrt-softplus gate, hash layers and the bias knob.

Three widgets and two static figures on the pattern of :mod:`v4lab.viz.common`:

* :class:`ExpansionWidget` — V3 with your own routed-expert count, expert width and top-k → total and
  active parameters (``v4lab.accounting.params``), beside V3 and V4-Pro; :func:`build_expansion` splits
  the real 671B → 1.6T growth into its factors (``accounting.moe_expansion``).
* :class:`AffinityWidget` — the affinity functions (``v4lab.gate.gate_scores``: sqrt-softplus, sigmoid,
  softmax) on one token's logits, shifted and spread by the sliders, and the top-k weights after
  renormalisation (``select_topk`` + ``route_weights``).
* :class:`BiasWidget` — on the notebook model (:mod:`v4lab.viz.trained`): layer, expert and bias change δ
  → expert load before/after and which tokens join or leave that expert (``v4lab.moe.bias_sensitivity``).
  The model runs once per text; the sliders only redo a top-k over the cached affinities.
* :func:`build_routing` — per-layer expert load on a text, hash layers marked (``layer_routing_stats``).
"""
from __future__ import annotations

from functools import lru_cache

import torch

from v4lab import accounting, get_config
from v4lab.gate import gate_scores, route_weights, select_topk
from v4lab.moe import bias_sensitivity, expert_load, layer_routing_stats, load_imbalance
from v4lab.viz import trained
from v4lab.viz.common import (
    COLORS,
    TextCache,
    Widget,
    categorical_colorscale,
    check_choice,
    figure_from,
    fmt3,
    register,
)

# ------------------------------------------------------------------------------------ 671B -> 1.6T
EXPERT_STOPS = [64, 128, 160, 256, 384, 512]
WIDTH_STOPS = [1024, 1536, 2048, 2560, 3072, 4096]
TOPK_STOPS = [1, 2, 4, 6, 8, 12, 16]
FACTOR_LABELS = {"experts": "more experts (256 → 384)", "expert_width": "wider experts (2048 → 3072)",
                 "hidden_size": "wider model", "moe_layers": "more MoE layers (58 → 61)"}


def expansion_table() -> str:
    """Plain text: V3 → V4-Pro, the factors and their shares (what notebook 01's checked cell prints)."""
    e = accounting.moe_expansion("v3", "v4-pro")
    lines = [f"total params  {e['total_from'] / 1e9:7.1f}B → {e['total_to'] / 1e9:7.1f}B  "
             f"(+{e['total_growth'] / 1e9:.1f}B, {100 * e['routed_share_of_growth']:.1f}% of it routed experts)",
             f"routed experts {e['routed_from'] / 1e9:6.1f}B → {e['routed_to'] / 1e9:7.1f}B",
             f"{'factor':<14} {'V3':>6} {'V4-Pro':>7} {'ratio':>6} {'log share':>9} {'params (Shapley)':>17}"]
    for k in e["factor_ratio"]:
        lines.append(f"{k:<14} {e['factors_from'][k]:>6} {e['factors_to'][k]:>7} {e['factor_ratio'][k]:>6.3f} "
                     f"{100 * e['log_share'][k]:>8.1f}% {e['shapley_params'][k] / 1e9:>16.1f}B")
    return "\n".join(lines)


def build_expansion():
    """Static: where the routed-expert growth of V3 → V4-Pro comes from (Shapley split, B params)."""
    e = accounting.moe_expansion("v3", "v4-pro")
    ks = [k for k in e["shapley_params"] if e["shapley_params"][k] > 0]
    traces = [dict(type="bar", x=[FACTOR_LABELS[k] for k in ks], y=[e["shapley_params"][k] / 1e9 for k in ks],
                   text=[f"{e['shapley_params'][k] / 1e9:.0f}B" for k in ks], textposition="outside",
                   marker=dict(color=COLORS["v4-pro"]), name="routed-expert growth"),
              dict(type="bar", x=["everything else"], y=[e["rest_growth"] / 1e9], name="rest",
                   text=[f"{e['rest_growth'] / 1e9:.1f}B"], textposition="outside", marker=dict(color="#9e9e9e"))]
    return figure_from({"traces": traces, "layout": {"title": {"text": (
        f"V3 {e['total_from'] / 1e9:.0f}B → V4-Pro {e['total_to'] / 1e12:.2f}T: where the "
        f"{e['total_growth'] / 1e9:.0f}B come from"), "font": {"size": 13}}}},
        dict(yaxis=dict(title="added parameters (B)"), showlegend=False, height=380))


@lru_cache(maxsize=512)
def designed_params(experts: int, width: int, topk: int) -> tuple[float, float]:
    """(total, active) parameters of V3 with these routed experts (no group limit, as V4)."""
    cfg = get_config("v3").replace(n_routed_experts=experts, moe_intermediate_size=width,
                                   num_experts_per_tok=topk, n_group=1, topk_group=1, name="yours")
    p = accounting.params(cfg)
    return float(p["total"]), float(p["active"])


@lru_cache(maxsize=4)
def _ref_params(name: str) -> tuple[float, float]:
    p = accounting.params(name)
    return float(p["total"]), float(p["active"])


def expansion_data(experts: int = 256, width: int = 2048, topk: int = 8) -> dict:
    """Traces: total params (3 bars: V3, yours, V4-Pro) and active params (3 bars)."""
    check_choice("experts", experts, EXPERT_STOPS)
    check_choice("width", width, WIDTH_STOPS)
    check_choice("topk", topk, TOPK_STOPS)
    if topk > experts:
        raise ValueError(f"topk = {topk}: must be <= experts = {experts}")
    v3, yours, pro = _ref_params("v3"), designed_params(experts, width, topk), _ref_params("v4-pro")
    xs = ["V3", f"yours: {experts}×{width}, top-{topk}", "V4-Pro"]
    cols = [COLORS["v3"], "#ff7f0e", COLORS["v4-pro"]]
    traces = []
    for i, (label, ax) in enumerate((("total", ("x", "y")), ("active per token", ("x2", "y2")))):
        ys = [v3[i] / 1e9, yours[i] / 1e9, pro[i] / 1e9]
        traces.append(dict(type="bar", x=xs, y=ys, text=[f"{y:.1f}B" for y in ys], textposition="outside",
                           marker=dict(color=cols), name=label, xaxis=ax[0], yaxis=ax[1]))
    title = (f"Yours: {yours[0] / 1e9:.0f}B total ({yours[0] / v3[0]:.2f}× V3), {yours[1] / 1e9:.1f}B active "
             f"({yours[1] / v3[1]:.2f}× V3) · active share {100 * yours[1] / yours[0]:.1f}%")
    return {"traces": traces, "layout": {"title": {"text": title, "font": {"size": 13}}}}


EXPANSION_LAYOUT = dict(height=420, showlegend=False,
                        xaxis=dict(domain=[0, 0.46]), yaxis=dict(title="total parameters (B)"),
                        xaxis2=dict(domain=[0.56, 1], anchor="y2"),
                        yaxis2=dict(title="active parameters per token (B)", anchor="x2"))


@register
class ExpansionWidget(Widget):
    """Routed experts, expert width and top-k on V3's backbone → total and active parameters."""

    name = "moe.expansion"
    defaults = {"experts": 256, "width": 2048, "topk": 8}

    def validate(self, state):
        check_choice("experts", state["experts"], EXPERT_STOPS)
        check_choice("width", state["width"], WIDTH_STOPS)
        check_choice("topk", state["topk"], TOPK_STOPS)

    def data(self):
        return expansion_data(**self.state)

    def layout(self):
        return EXPANSION_LAYOUT

    def make_controls(self):
        import ipywidgets as W
        return {"experts": W.SelectionSlider(options=EXPERT_STOPS, value=self.state["experts"], description="experts"),
                "width": W.SelectionSlider(options=WIDTH_STOPS, value=self.state["width"], description="width"),
                "topk": W.SelectionSlider(options=TOPK_STOPS, value=self.state["topk"], description="top-k")}

    def sweep_values(self, control):
        return {"experts": EXPERT_STOPS, "width": WIDTH_STOPS, "topk": TOPK_STOPS}[control]

    def on_experts(self, value):
        self.set(experts=value)

    def on_width(self, value):
        self.set(width=value)

    def on_topk(self, value):
        self.set(topk=value)


# ------------------------------------------------------------------------------------ affinity functions
FUNCS = {"sqrtsoftplus": ("sqrt(softplus(z))  V4", COLORS["v4-pro"]), "sigmoid": ("sigmoid(z)  V3", COLORS["v3.2"]),
         "softmax": ("softmax(z)  V2", "#bcbd22")}
SHIFT_STOPS = [-6.0, -4.0, -2.0, -1.0, 0.0, 1.0, 2.0, 4.0, 6.0]
SPREAD_STOPS = [0.25, 0.5, 1.0, 2.0, 4.0]
AFF_E, AFF_K = 16, 4                                 # one token over 16 experts, top-4
Z_GRID = [i / 10 for i in range(-160, 161)]      # covers shift ± 6 with spread × 4


@lru_cache(maxsize=1)
def base_logits() -> torch.Tensor:
    """One token's gate logits over 16 experts (seeded, unit variance)."""
    return torch.randn(AFF_E, generator=torch.Generator().manual_seed(1))


@lru_cache(maxsize=1)
def _curves() -> dict:
    z = torch.tensor(Z_GRID)
    return {f: gate_scores(z, f).tolist() for f in ("sqrtsoftplus", "sigmoid")}


def affinity_data(shift: float = 0.0, spread: float = 1.0) -> dict:
    """Traces: the two elementwise curves s(z) (static), the token's 16 logits on each (moving), and the
    renormalised top-4 weights under each of the three scoring functions (route scale 1)."""
    check_choice("shift", shift, SHIFT_STOPS)
    check_choice("spread", spread, SPREAD_STOPS)
    z = base_logits() * spread + shift
    c = _curves()
    traces = []
    for f in ("sqrtsoftplus", "sigmoid"):
        traces.append(dict(type="scatter", mode="lines", x=Z_GRID, y=c[f], name=FUNCS[f][0], legendgroup=f,
                           line=dict(color=FUNCS[f][1]), xaxis="x", yaxis="y"))
    for f in ("sqrtsoftplus", "sigmoid"):
        s = gate_scores(z[None], f)[0]
        traces.append(dict(type="scatter", mode="markers", x=z.tolist(), y=s.tolist(), name=f"token logits ({f})",
                           legendgroup=f, showlegend=False, marker=dict(color=FUNCS[f][1], size=7),
                           xaxis="x", yaxis="y"))
    tops = {}
    for f in FUNCS:
        s = gate_scores(z[None], f)                                        # [1, E]
        idx = select_topk(s, None, AFF_K)                                  # no bias: the learned choice
        w = route_weights(s, idx, 1.0, renormalize=True)[0]
        tops[f] = w.tolist()
        traces.append(dict(type="bar", x=[f"#{i + 1}" for i in range(AFF_K)], y=w.tolist(), name=FUNCS[f][0],
                           legendgroup=f, showlegend=f == "softmax", marker=dict(color=FUNCS[f][1]),
                           text=[f"{v:.2f}" for v in w.tolist()], textposition="outside", textfont=dict(size=9),
                           xaxis="x2", yaxis="y2"))
    short = {"sqrtsoftplus": "√softplus", "sigmoid": "sigmoid", "softmax": "softmax"}
    title = (f"logits × {spread:g} {'+' if shift >= 0 else '−'} {abs(shift):g}: top-1 / top-4 weight "
             + ", ".join(f"{short[f]} {fmt3(tops[f][0] / tops[f][-1])}" for f in FUNCS) + " (1.00 = uniform)")
    return {"traces": traces, "layout": {"title": {"text": title, "font": {"size": 13}}}}


AFFINITY_LAYOUT = dict(height=420, barmode="group",
                       xaxis=dict(domain=[0, 0.48], title="gate logit z", range=[-16.5, 16.5]),
                       yaxis=dict(title="affinity s(z)", range=[0, 4.2]),
                       xaxis2=dict(domain=[0.58, 1], title="the token's top-4 experts (by affinity)", anchor="y2"),
                       yaxis2=dict(title="routing weight after renormalisation", range=[0, 1.05], anchor="x2"))


@register
class AffinityWidget(Widget):
    """Shift and spread one token's logits → affinities on each curve, renormalised top-k weights."""

    name = "moe.affinity"
    defaults = {"shift": 4.0, "spread": 2.0}        # where sigmoid is saturated and √softplus is not

    def validate(self, state):
        check_choice("shift", state["shift"], SHIFT_STOPS)
        check_choice("spread", state["spread"], SPREAD_STOPS)

    def data(self):
        return affinity_data(**self.state)

    def layout(self):
        return AFFINITY_LAYOUT

    def make_controls(self):
        import ipywidgets as W
        return {"shift": W.SelectionSlider(options=[(f"{v:+g}", v) for v in SHIFT_STOPS], value=self.state["shift"],
                                           description="shift"),
                "spread": W.SelectionSlider(options=[(f"×{v:g}", v) for v in SPREAD_STOPS],
                                            value=self.state["spread"], description="spread")}

    def sweep_values(self, control):
        return {"shift": SHIFT_STOPS, "spread": SPREAD_STOPS}[control]

    def on_shift(self, value):
        self.set(shift=value)

    def on_spread(self, value):
        self.set(spread=value)


# ------------------------------------------------------------------------------------ routing on the model
DEFAULT_TEXT = trained.SAMPLE_TEXTS["for-loop"]
MAX_TOKENS = 256
DELTA_STOPS = [-0.5, -0.2, -0.1, -0.05, -0.02, -0.01, 0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5]

_ROUTES = TextCache(maxsize=8)


@torch.no_grad()
def route_text(text: str = DEFAULT_TEXT, model=None, tok=None) -> dict:
    """Run ``text`` once; per MoE layer keep the affinities [T, E], the bias, the chosen idx and the stats.
    Cached per text (the last 8). Returns {"tokens", "ids", "layers": [{layer, hash, scores, bias, idx, k}],
    "stats": layer_routing_stats(...)}."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"text = {text!r}: must be a non-empty string")
    if model is None:
        model, tok, _ = trained.trained_model()
    return _ROUTES.get(model, text, lambda: _route(text, model, tok))


def _route(text: str, model, tok) -> dict:
    ids = trained.encode(tok, text, MAX_TOKENS)
    model.streams(ids)                    # the routing records, not the logits
    moes = [b.ffn for b in model.layers]
    # captured on the CPU, whatever device the model is on: the figures combine them with CPU tensors
    layers = [{"layer": m.layer_id, "hash": m.gate.is_hash, "scores": m.last_routing["scores"].detach().float().cpu(),
               "bias": None if m.gate.bias is None else m.gate.bias.detach().float().cpu().clone(),
               "idx": m.last_routing["idx"].cpu().clone(), "k": m.gate.topk, "n_group": m.gate.n_group,
               "topk_group": m.gate.topk_group} for m in moes]
    return {"ids": ids[0].tolist(), "tokens": trained.token_strings(tok, ids), "layers": layers,
            "stats": layer_routing_stats(moes)}


def learned_layers(routes: dict) -> list[int]:
    return [r["layer"] for r in routes["layers"] if not r["hash"]]


MAX_LABELLED = 30


def _shown(tok: str) -> str:
    """A token as a label: whitespace made visible, long ones cut."""
    t = tok.replace("\n", "↵").replace(" ", "·")
    return t if len(t) <= 8 else t[:7] + "…"


def bias_data(routes: dict, layer: int, expert: int, delta: float) -> dict:
    """Traces: load before (all experts), load after moving b_expert by delta, all tokens (grey strip),
    tokens that join the expert, tokens that leave it."""
    learned = learned_layers(routes)
    check_choice("layer", layer, learned)
    r = routes["layers"][layer]
    E = r["scores"].shape[-1]
    if isinstance(expert, bool) or not isinstance(expert, int) or not 0 <= expert < E:
        raise ValueError(f"expert = {expert!r}: must be an integer in [0, {E - 1}]")
    check_choice("delta", delta, DELTA_STOPS)
    sens = bias_sensitivity(r["scores"], r["bias"], expert, delta, r["k"], r["n_group"], r["topk_group"])
    before, after = expert_load(sens["before"], E), expert_load(sens["after"], E)
    toks = routes["tokens"]
    T = len(toks)
    joined = sens["joined"].nonzero().flatten().tolist()
    left = sens["left"].nonzero().flatten().tolist()
    others = [e for e in range(E) if e != expert]
    # movers' labels on three rows, so neighbouring tokens' labels do not sit on one another; beyond
    # MAX_LABELLED movers no labels (they could not be read), the hover still names each token
    def rows(n, sign):
        return [sign * (0.6 + 0.55 * (k % 3)) for k in range(n)]

    def labels(pos):
        return [_shown(toks[i]) for i in pos] if len(pos) <= MAX_LABELLED else [""] * len(pos)
    traces = [
        dict(type="bar", x=others, y=[int(after[e]) for e in others], name=f"load with b[{expert}] {delta:+g}",
             marker=dict(color="#1f77b4"), xaxis="x", yaxis="y"),
        dict(type="bar", x=[expert], y=[int(after[expert])], name=f"expert {expert}, with b[{expert}] {delta:+g}",
             marker=dict(color="#ff7f0e"), xaxis="x", yaxis="y"),
        # drawn over the bars, so it stays visible whether the load grew or shrank
        dict(type="scatter", mode="markers", x=list(range(E)), y=before.tolist(), name="load now",
             marker=dict(color="#444444", symbol="line-ew-open", size=14, line=dict(width=2.5, color="#444444")),
             xaxis="x", yaxis="y"),
        dict(type="scatter", mode="markers", x=list(range(T)), y=[0] * T, name="tokens",
             marker=dict(color="#dddddd", size=5), hovertext=toks, xaxis="x2", yaxis="y2"),
        dict(type="scatter", mode="markers+text", x=joined, y=rows(len(joined), 1), name=f"join expert {expert}",
             marker=dict(color="#2ca02c", size=9, symbol="triangle-up"), text=labels(joined),
             textposition="top center", textfont=dict(size=10), hovertext=[toks[i] for i in joined],
             xaxis="x2", yaxis="y2"),
        dict(type="scatter", mode="markers+text", x=left, y=rows(len(left), -1), name=f"leave expert {expert}",
             marker=dict(color="#d62728", size=9, symbol="triangle-down"), text=labels(left),
             textposition="bottom center", textfont=dict(size=10), hovertext=[toks[i] for i in left],
             xaxis="x2", yaxis="y2"),
    ]
    b = 0.0 if r["bias"] is None else float(r["bias"][expert])
    title = (f"layer {layer}, expert {expert}: bias {b:+.3f} → {b + delta:+.3f} · {len(joined)} tokens join, "
             f"{len(left)} leave · load {int(before[expert])} → {int(after[expert])} · max/mean "
             f"{load_imbalance(before):.2f} → {load_imbalance(after):.2f}")
    crowded = [f"{len(p)} tokens {w}" for p, w in ((joined, "join"), (left, "leave")) if len(p) > MAX_LABELLED]
    notes = [dict(text=" and ".join(crowded) + ": too many to label; hover a triangle for its token",
                  xref="x2 domain", yref="y2 domain", x=1, y=1.12, xanchor="right", showarrow=False,
                  font=dict(size=11, color="#555"))] if crowded else []
    return {"traces": traces, "layout": {"title": {"text": title, "font": {"size": 13}}, "annotations": notes}}


BIAS_LAYOUT = dict(height=540, barmode="overlay", margin=dict(l=60, r=20, t=100, b=50),
                   xaxis=dict(domain=[0, 1], title="expert", anchor="y", dtick=1),
                   yaxis=dict(domain=[0.45, 1], title="tokens routed (top-k slots)", anchor="x"),
                   xaxis2=dict(domain=[0, 1], title="token position in the text", anchor="y2"),
                   yaxis2=dict(domain=[0, 0.3], range=[-2.6, 2.6], showticklabels=False, anchor="x2"))


def build_bias(text: str = DEFAULT_TEXT, layer: int | None = None, expert: int = 0, delta: float = 0.05):
    routes = route_text(text)
    layer = learned_layers(routes)[0] if layer is None else layer
    return figure_from(bias_data(routes, layer, expert, delta), BIAS_LAYOUT)


@register
class BiasWidget(Widget):
    """Layer (learned-gate layers), expert and δ → expert load before/after and the tokens that move."""

    name = "moe.bias"
    defaults = {"layer": -1, "expert": 0, "delta": 0.05}

    def __init__(self, static=None, text: str = DEFAULT_TEXT, **state):
        self.text = text
        self.routes = route_text(text)
        super().__init__(static, **state)

    def validate(self, state):
        learned = learned_layers(self.routes)
        if not learned:
            raise ValueError("layer: this model has no learned-gate MoE layer (all are hash-routed)")
        if state["layer"] == -1:                                    # default: the first learned layer
            state["layer"] = learned[0]
        check_choice("layer", state["layer"], learned)
        E = self.routes["layers"][state["layer"]]["scores"].shape[-1]
        if isinstance(state["expert"], bool) or not isinstance(state["expert"], int) or not 0 <= state["expert"] < E:
            raise ValueError(f"expert = {state['expert']!r}: must be an integer in [0, {E - 1}]")
        check_choice("delta", state["delta"], DELTA_STOPS)

    def data(self):
        return bias_data(self.routes, **self.state)

    def layout(self):
        return BIAS_LAYOUT

    def make_controls(self):
        import ipywidgets as W
        E = self.routes["layers"][self.state["layer"]]["scores"].shape[-1]
        return {"layer": W.Dropdown(options=learned_layers(self.routes), value=self.state["layer"], description="layer"),
                "expert": W.IntSlider(min=0, max=E - 1, value=self.state["expert"], description="expert"),
                "delta": W.SelectionSlider(options=[(f"{d:+g}", d) for d in DELTA_STOPS], value=self.state["delta"],
                                           description="bias δ")}

    def sweep_values(self, control):
        E = self.routes["layers"][self.state["layer"]]["scores"].shape[-1]
        return {"layer": learned_layers(self.routes), "expert": list(range(E)), "delta": DELTA_STOPS}[control]

    def on_layer(self, value):
        self.set(layer=int(value))

    def on_expert(self, value):
        self.set(expert=int(value))

    def on_delta(self, value):
        self.set(delta=value)


def build_routing(text: str = DEFAULT_TEXT):
    """Static: expert load per MoE layer on ``text`` (share of top-k slots), hash layers marked."""
    routes = route_text(text)
    stats = routes["stats"]
    z = [[v / sum(s["load"]) for v in s["load"]] for s in stats]
    ylab = [f"layer {s['layer']} ({'hash' if s['hash'] else 'learned'}) max/mean {s['max_over_mean']:.2f}"
            for s in stats]
    tr = dict(type="heatmap", z=z, x=list(range(len(z[0]))), y=ylab, colorscale="Blues", zmin=0,
              hovertemplate="%{y}<br>expert %{x}: %{z:.3f} of slots<extra></extra>")
    return figure_from({"traces": [tr], "layout": {"title": {"text": "expert load per layer (share of top-k slots)",
                                                             "font": {"size": 13}}}},
                       dict(height=120 + 40 * len(z), xaxis=dict(title="expert", dtick=1),
                            yaxis=dict(autorange="reversed"), margin=dict(l=300, r=20, t=50, b=50)))


def hash_consistency(routes: dict) -> list[dict]:
    """Per MoE layer: among tokens whose id occurs more than once, the share of repeats routed to exactly the
    experts of the id's first occurrence (1.0 = routing depends only on the token id, as hash layers do)."""
    ids = routes["ids"]
    first: dict[int, int] = {}
    pairs = []
    for t, i in enumerate(ids):
        if i in first:
            pairs.append((first[i], t))
        else:
            first[i] = t
    out = []
    for r in routes["layers"]:
        sets = [tuple(sorted(x)) for x in r["idx"].tolist()]
        same = sum(sets[a] == sets[b] for a, b in pairs)
        out.append({"layer": r["layer"], "hash": r["hash"], "repeats": len(pairs),
                    "same_experts": same / max(1, len(pairs))})
    return out


# ------------------------------------------------------------------------------------ what the experts learned
SPEC_TOKENS = 1024          # held-out tokens routed once for the specialisation and load figures
TOP_TOKENS = 5              # tokens listed per expert
MIN_COUNT = 3               # ranking by share: only tokens seen at least this often
RANK_BY = {"count": "most often sent", "share": "most exclusively sent"}


def expert_colors(n: int) -> list[str]:
    """One qualitative colour per expert id, the same as :func:`categorical_colorscale` (and so the same
    colours as notebook 07's routing map)."""
    return [categorical_colorscale(n)[2 * e][1] for e in range(n)]


def heldout_ids(path, tok, n_tokens: int = SPEC_TOKENS) -> tuple[torch.Tensor, str]:
    """The first ``n_tokens`` of the checkpoint's ``heldout.txt`` (documents the model never trained on,
    ``<|bos|> doc <|eos|>`` as in training) as ids [1, n], and a line saying where they come from. Without a
    heldout.txt the sample texts stand in (said so)."""
    from pathlib import Path

    from v4lab.data import encode_docs
    from v4lab.labeval import heldout_docs
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 2:
        raise ValueError(f"n_tokens = {n_tokens!r}: must be an integer >= 2")
    f = Path(path) / "heldout.txt" if path else None
    if f is not None and f.is_file():
        docs, where = heldout_docs(f.read_text(encoding="utf-8")), "held-out text (heldout.txt)"
    else:
        docs, where = list(trained.SAMPLE_TEXTS.values()), "sample texts (no heldout.txt beside the weights)"
    ids = encode_docs(tok, docs)[:n_tokens]
    return ids[None], f"the first {ids.numel()} tokens of the {where}"


@torch.no_grad()
def route_heldout(model, tok, path, n_tokens: int = SPEC_TOKENS) -> dict:
    """One forward (with the MTP block) over :func:`heldout_ids`; per MoE block (layers, then MTP) the tokens
    it routed (the MTP block routes token i+1, as ``v4lab.train.expert_specialisation`` counts it), the chosen
    experts idx [T, K], the affinities [T, E] and the bias."""
    ids, where = heldout_ids(path, tok, n_tokens)
    model(ids, return_mtp=len(model.mtp) > 0)
    L = model.cfg.num_hidden_layers
    layers = []
    for j, b in enumerate(model.blocks()):
        r, g = b.ffn.last_routing, b.ffn.gate
        layers.append({"layer": j, "mtp": j >= L, "hash": g.is_hash, "tokens": (ids[0] if j < L else ids[0, 1:]).cpu(),
                       "idx": r["idx"].cpu(), "scores": r["scores"].detach().float().cpu(), "k": g.topk,
                       "bias": None if g.bias is None else g.bias.detach().float().cpu().clone(),
                       "n_group": g.n_group, "topk_group": g.topk_group})
    return {"ids": ids[0].cpu(), "where": where, "layers": layers, "n_experts": model.cfg.n_routed_experts}


def block_label(r: dict) -> str:
    return f"{'MTP' if r['mtp'] else 'layer'} {r['layer']} ({'hash' if r['hash'] else 'learned'})"


class Specialisation:
    """What :class:`SpecialisationWidget` and :class:`LoadWidget` show, computed once per model: the routes of
    the held-out tokens under the trained weights and under a random twin (``v4lab.labeval.random_twin``: same
    shapes and hash table, random router), class × expert and token × expert counts per block
    (``v4lab.train.class_expert_counts``) and the mutual information (``v4lab.train.mutual_information_bits``,
    the measure of ``expert_specialisation``)."""

    def __init__(self, model, tok, path, n_tokens: int = SPEC_TOKENS, random: bool = True):
        from v4lab.data import TOKEN_CLASSES, token_classes
        from v4lab.labeval import random_twin
        from v4lab.train import class_expert_counts, mutual_information_bits
        self.routes = route_heldout(model, tok, path, n_tokens)
        self.E = self.routes["n_experts"]
        self.labels = [block_label(r) for r in self.routes["layers"]]
        classes = token_classes(tok)
        V = max(int(classes.numel()), model.cfg.vocab_size)
        self.classes = list(TOKEN_CLASSES)
        self.strings = trained.token_strings(tok, list(range(tok.get_vocab_size())))
        self.by_class, self.by_token, self.mi = [], [], []
        for r in self.routes["layers"]:
            jc = class_expert_counts(r["tokens"], r["idx"], classes, self.E, len(self.classes))
            self.by_class.append(jc)
            self.by_token.append(class_expert_counts(r["tokens"], r["idx"], torch.arange(V), self.E, V))
            self.mi.append(mutual_information_bits(jc))
        self.random_mi = None
        if random:
            twin = random_twin(model)
            rr = route_heldout(twin, tok, path, n_tokens)
            self.random_mi = [mutual_information_bits(class_expert_counts(r["tokens"], r["idx"], classes, self.E,
                                                                          len(self.classes))) for r in rr["layers"]]
            del twin

    @property
    def layers(self) -> list[int]:
        return [r["layer"] for r in self.routes["layers"]]


_SPECS: dict = {}


def specialisation(model=None, tok=None, path=None, n_tokens: int = SPEC_TOKENS) -> Specialisation:
    """:class:`Specialisation` of the notebook model (cached per model and token count)."""
    if model is None:
        model, tok, info = trained.trained_model()
        path = info["path"]
    key = (id(model), n_tokens)
    if key not in _SPECS:
        _SPECS[key] = Specialisation(model, tok, path, n_tokens)
    return _SPECS[key]


def top_tokens(sp: Specialisation, layer: int, expert: int, rank_by: str = "count", n: int = TOP_TOKENS) -> list:
    """[(token string, slots sent to ``expert``, share of the token's slots)] for one block, best first:
    by the count of slots, or (``share``) by the share among tokens seen at least MIN_COUNT times."""
    check_choice("rank_by", rank_by, RANK_BY)
    j = sp.by_token[layer]                                      # [V, E]
    tot = j.sum(1)
    share = j[:, expert] / tot.clamp_min(1)
    key = j[:, expert] if rank_by == "count" else torch.where(tot >= MIN_COUNT, share, torch.zeros_like(share))
    order = torch.argsort(key, descending=True, stable=True)[:n]
    return [(sp.strings[int(t)] if int(t) < len(sp.strings) else f"<{int(t)}>", int(j[t, expert]), float(share[t]))
            for t in order if key[t] > 0]


def specialisation_data(sp: Specialisation, layer: int, rank_by: str = "count") -> dict:
    """Traces (fixed count 6): p(class | expert) heatmap (rows: experts, then all experts together), the
    expert colour swatches, each expert's top tokens, the mutual information per block (hash-routed and
    learned bars) with a random router's beside it. Kept per state on ``sp`` (a callback only looks up)."""
    check_choice("layer", layer, sp.layers)
    check_choice("rank_by", rank_by, RANK_BY)
    memo = sp.__dict__.setdefault("_data", {})
    if (layer, rank_by) not in memo:
        memo[layer, rank_by] = _specialisation_data(sp, layer, rank_by)
    return memo[layer, rank_by]


def _specialisation_data(sp: Specialisation, layer: int, rank_by: str) -> dict:
    E, jc = sp.E, sp.by_class[layer]                           # [C, E]
    used = [c for c in range(len(sp.classes)) if jc[c].sum() > 0]
    pce = (jc[used] / jc[used].sum(0, keepdim=True).clamp_min(1)).T       # [E, C'] p(class | expert)
    overall = jc[used].sum(1) / jc.sum()
    z = [[round(v, 4) for v in row] for row in pce.tolist()] + [[round(v, 4) for v in overall.tolist()]]
    ylab = [f"expert {e}" for e in range(E)] + ["all experts"]
    xlab = [sp.classes[c] for c in used]
    rows = []
    for e in range(E):
        tops = top_tokens(sp, layer, e, rank_by)
        part = (f"{s} ({n})" if rank_by == "count" else f"{s} ({100 * f:.0f}%)" for s, n, f in tops)
        rows.append("  ".join(part) or "(no tokens)")
    rows.append(f"slots: {int(jc.sum())} ({sp.routes['layers'][layer]['k']} per token)")
    mi, labels = sp.mi, [lab.split(" (")[0].replace("layer ", "L") for lab in sp.labels]
    hashed = [r["hash"] for r in sp.routes["layers"]]
    traces = [
        dict(type="heatmap", z=z, x=xlab, y=ylab, zmin=0, zmax=1, colorscale="Blues", texttemplate="%{z:.2f}",
             textfont=dict(size=9), colorbar=dict(title="share", x=0.43, len=0.62,
                                                  y=0.0, yanchor="bottom", thickness=10),
             hovertemplate="%{y}: %{z:.3f} of its slots are %{x} tokens<extra></extra>", xaxis="x", yaxis="y"),
        dict(type="heatmap", z=[[e] for e in range(E)] + [[None]], x=["id"], y=ylab, zmin=-0.5, zmax=E - 0.5,
             colorscale=categorical_colorscale(E), meta={"categorical": True}, showscale=False,
             texttemplate="%{z}", textfont=dict(size=9, color="white"), hoverinfo="skip", xaxis="x2", yaxis="y"),
        dict(type="scatter", mode="text", x=[0] * (E + 1), y=ylab, text=rows, textposition="middle right",
             textfont=dict(size=10, family="monospace"), cliponaxis=False, showlegend=False, hoverinfo="skip",
             name="top tokens", xaxis="x3", yaxis="y"),
        dict(type="bar", x=[lab for lab, h in zip(labels, hashed) if h], y=[m for m, h in zip(mi, hashed) if h],
             name="hash-routed (table by token id)", marker=dict(color="#8c8c8c"), xaxis="x4", yaxis="y4"),
        dict(type="bar", x=[lab for lab, h in zip(labels, hashed) if not h], y=[m for m, h in zip(mi, hashed) if not h],
             name="learned router", marker=dict(color="#1f77b4"), xaxis="x4", yaxis="y4"),
        dict(type="scatter", mode="markers", x=labels if sp.random_mi else [], y=sp.random_mi or [],
             name="same layers, random weights", marker=dict(symbol="line-ew-open", size=18, color="#d62728",
                                                             line=dict(width=3, color="#d62728")),
             xaxis="x4", yaxis="y4"),
    ]
    ratio = ""
    if sp.random_mi and not hashed[layer] and sp.random_mi[layer] > 0:
        ratio = f", {mi[layer] / sp.random_mi[layer]:.1f}× a random router's"
    title = (f"{sp.labels[layer]}: I(token class; expert) = {mi[layer]:.3f} bits{ratio}<br>"
             f"measured by v4lab on {sp.routes['where']}")
    shapes = [dict(type="rect", xref="x4", yref="y4 domain", x0=layer - 0.45, x1=layer + 0.45, y0=0, y1=1,
                   line=dict(color="#333", width=2), fillcolor="rgba(0,0,0,0)")]
    return {"traces": traces, "layout": {"title": {"text": title, "font": {"size": 13}}, "shapes": shapes}}


def specialisation_layout(sp: Specialisation) -> dict:
    return dict(height=380 + 24 * (sp.E + 1), margin=dict(l=90, r=20, t=80, b=30), barmode="relative",
                legend=dict(orientation="v", yanchor="top", y=1.0, xanchor="left", x=0.74, font=dict(size=11)),
                xaxis=dict(domain=[0, 0.42], side="top", tickfont=dict(size=10), anchor="y"),
                yaxis=dict(domain=[0, 0.68], autorange="reversed", tickfont=dict(size=10)),
                xaxis2=dict(domain=[0.51, 0.54], anchor="y", showticklabels=False),
                xaxis3=dict(domain=[0.55, 1], range=[0, 1], visible=False, anchor="y"),
                xaxis4=dict(domain=[0, 0.7], anchor="y4", type="category", categoryorder="array",
                            categoryarray=[lab.split(" (")[0].replace("layer ", "L") for lab in sp.labels]),
                yaxis4=dict(domain=[0.78, 1], title="MI (bits)", anchor="x4"))


def build_specialisation(layer: int | None = None, rank_by: str = "count"):
    """Static figure of :func:`specialisation_data` on the notebook model (layer: the first learned one)."""
    sp = specialisation()
    if layer is None:
        layer = next((r["layer"] for r in sp.routes["layers"] if not r["hash"]), 0)
    return figure_from(specialisation_data(sp, layer, rank_by), specialisation_layout(sp))


def _first_learned(sp: Specialisation) -> int:
    return next((r["layer"] for r in sp.routes["layers"] if not r["hash"]), sp.layers[0])


@register
class SpecialisationWidget(Widget):
    """MoE block and ranking → what each expert receives (token classes, top tokens) and the mutual
    information per block, hash-routed vs learned, beside a random router's."""

    name = "moe.specialisation"
    defaults = {"layer": -1, "rank_by": "count"}

    def __init__(self, static=None, sp: Specialisation | None = None, **state):
        self.sp = specialisation() if sp is None else sp
        for layer in self.sp.layers:                                  # every state up front (~0.1 s)
            for rank_by in RANK_BY:
                specialisation_data(self.sp, layer, rank_by)
        super().__init__(static, **state)

    def validate(self, state):
        if state["layer"] == -1:                                     # default: the first learned layer
            state["layer"] = _first_learned(self.sp)
        check_choice("layer", state["layer"], self.sp.layers)
        check_choice("rank_by", state["rank_by"], RANK_BY)

    def data(self):
        return specialisation_data(self.sp, **self.state)

    def layout(self):
        return specialisation_layout(self.sp)

    def make_controls(self):
        import ipywidgets as W
        return {"layer": W.Dropdown(options=[(lab, r["layer"]) for lab, r in zip(self.sp.labels, self.sp.routes["layers"])],
                                    value=self.state["layer"], description="MoE block"),
                "rank_by": W.ToggleButtons(options=[(v, k) for k, v in RANK_BY.items()], value=self.state["rank_by"],
                                           description="top tokens", style={"button_width": "150px"})}

    def sweep_values(self, control):
        return {"layer": self.sp.layers, "rank_by": list(RANK_BY)}[control]

    def on_layer(self, value):
        self.set(layer=int(value))

    def on_rank_by(self, value):
        self.set(rank_by=value)


def load_data(sp: Specialisation, layer: int) -> dict:
    """Traces (fixed count 4): each expert's load (share of the top-k slots) with the bias, the load the same
    affinities would give without it (learned routers only), the mean, and the bias b_e per expert."""
    check_choice("layer", layer, sp.layers)
    r, E = sp.routes["layers"][layer], sp.E
    cols, ex = expert_colors(E), list(range(E))
    load = expert_load(r["idx"], E)
    share = (load / load.sum()).tolist()
    learned = not r["hash"] and r["bias"] is not None
    if learned:
        no_bias = expert_load(select_topk(r["scores"], None, r["k"], r["n_group"], r["topk_group"]), E)
        nb_share = (no_bias / no_bias.sum()).tolist()
    traces = [
        dict(type="bar", x=ex, y=share, marker=dict(color=cols), name="load: the model's routing",
             hovertemplate="expert %{x}: %{y:.3f} of the slots<extra></extra>", xaxis="x", yaxis="y"),
        dict(type="scatter", mode="markers", x=ex if learned else [], y=nb_share if learned else [],
             name="load without the bias (same affinities)", marker=dict(symbol="line-ew-open", size=16, color="#222",
                                                                          line=dict(width=3, color="#222")),
             xaxis="x", yaxis="y"),
        dict(type="scatter", mode="lines", x=[-0.5, E - 0.5], y=[1 / E, 1 / E], name=f"balanced: 1/{E}",
             line=dict(color="#888", dash="dash"), xaxis="x", yaxis="y"),
        dict(type="bar", x=ex if learned else [], y=r["bias"].tolist() if learned else [],
             marker=dict(color=cols), name="bias b_e", showlegend=False,
             hovertemplate="expert %{x}: bias %{y:+.4f}<extra></extra>", xaxis="x2", yaxis="y2"),
    ]
    imb = load_imbalance(load)
    if learned:
        b = r["bias"]
        title = (f"{block_label(r)}: max/mean load {imb:.2f} with the bias, {load_imbalance(no_bias):.2f} without; "
                 f"bias {fmt3(float(b.min()))} … {fmt3(float(b.max()))}")
        ann = []
    else:
        title = f"{block_label(r)}: max/mean load {imb:.2f}; the hash table picks the experts, no bias"
        ann = [dict(text="hash-routed layer:<br>no bias (the token id<br>picks the experts)", xref="x2 domain",
                    yref="y2 domain", x=0.5, y=0.5, showarrow=False, font=dict(size=12, color="#555"))]
    title += f"<br>measured by v4lab on {sp.routes['where']}"
    return {"traces": traces, "layout": {"title": {"text": title, "font": {"size": 13}}, "annotations": ann,
                                         "xaxis": {"range": [-0.6, E - 0.4]}, "xaxis2": {"range": [-0.6, E - 0.4]}}}


LOAD_LAYOUT = dict(height=430, margin=dict(l=60, r=20, t=80, b=110),
                   legend=dict(orientation="h", yanchor="top", y=-0.16, xanchor="left", x=0),
                   xaxis=dict(domain=[0, 0.58], title="expert", dtick=1),
                   yaxis=dict(title="share of the top-k slots", rangemode="tozero"),
                   xaxis2=dict(domain=[0.68, 1], title="expert", dtick=1, anchor="y2", tickfont=dict(size=9)),
                   yaxis2=dict(title="aux-loss-free bias b_e", anchor="x2", zeroline=True))


def build_load(layer: int | None = None):
    sp = specialisation()
    return figure_from(load_data(sp, _first_learned(sp) if layer is None else layer), LOAD_LAYOUT)


@register
class LoadWidget(Widget):
    """MoE block → the load per expert with and without the aux-loss-free bias, and the bias itself."""

    name = "moe.load"
    defaults = {"layer": -1}

    def __init__(self, static=None, sp: Specialisation | None = None, **state):
        self.sp = specialisation() if sp is None else sp
        super().__init__(static, **state)

    def validate(self, state):
        if state["layer"] == -1:
            state["layer"] = _first_learned(self.sp)
        check_choice("layer", state["layer"], self.sp.layers)

    def data(self):
        return load_data(self.sp, **self.state)

    def layout(self):
        return LOAD_LAYOUT

    def make_controls(self):
        import ipywidgets as W
        return {"layer": W.Dropdown(options=[(lab, r["layer"]) for lab, r in zip(self.sp.labels, self.sp.routes["layers"])],
                                    value=self.state["layer"], description="MoE block")}

    def sweep_values(self, control):
        return {"layer": self.sp.layers}[control]

    def on_layer(self, value):
        self.set(layer=int(value))
