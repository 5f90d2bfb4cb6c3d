"""Notebook 02: V4's compressed attention, looked at from inside one query.

Two widgets on the pattern of :mod:`v4lab.viz.common`:

* :class:`InspectWidget` — text, query position, layer and head → what that query attends to, read from
  ``Attention.last_inspect`` (``inspect=True``) of the notebook model (:mod:`v4lab.viz.trained`): the raw
  window, the compressed entries with their pooling weights, the indexer scores and top-k picks (CSA), and
  the final softmax probabilities with the sink. The model runs once per text (every layer's inspection
  record is kept, :func:`run_text`); the position / layer / head sliders only re-slice those tensors.
* :class:`CostWidget` — a KV-cache and decode-FLOPs calculator up to 1M tokens for V3.2, V4-Flash, V4-Pro
  and the BF16 GQA-8 baseline, broken down by what is stored (window, compressed entries, indexer keys,
  latents) and by where the FLOPs go, from :mod:`v4lab.accounting`. The curves over context are
  :class:`v4lab.viz.tour.ContextWidget` (reused, not repeated here).

Positions in the figures are token positions of the text. Compressed entry s of a layer with ratio m
belongs to tokens m·s .. m·s+m−1 ("its own window"); a CSA entry also pools the m tokens before that
(the overlap), which the pooling-weight heatmap shows.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from v4lab import accounting
from v4lab.viz import trained
from v4lab.viz.common import COLORS, TextCache, Widget, check_choice, figure_from, register, si
from v4lab.viz.tour import CONTEXT_STOPS, LABELS, context_label

MAX_TOKENS = 256                 # tokens of a text the inspector runs (HCA's m = 128 needs > 128 to show)
DEFAULT_TEXT = trained.SAMPLE_TEXTS["for-loop"]
KIND_COLORS = {"window": "#1f77b4", "compressed": "#ff7f0e", "sink": "#7f7f7f", "selected": "#d62728"}
SINK_X = -4                      # where the sink's bar sits on the position axis


# ------------------------------------------------------------------------------------ one run per text
@dataclass
class Run:
    """One text through the notebook model with every attention layer inspected (batch row 0 only)."""
    text: str
    ids: list[int]
    tokens: list[str]
    kinds: list[str]                 # per layer: window | csa | hca
    ratios: list[int]
    layers: list[dict]               # per layer: the last_inspect tensors (batch 0) + pooled means
    n_heads: int
    window: int

    @property
    def n_tokens(self) -> int:
        return len(self.ids)


_RUNS = TextCache(maxsize=8)


@torch.no_grad()
def run_text(text: str, model=None, tok=None) -> Run:
    """Run ``text`` (first ``MAX_TOKENS`` tokens) through the model once with ``inspect`` on every attention
    layer; cached per text (the last 8). ``model``/``tok`` default to :func:`trained.trained_model`."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"text = {text!r}: must be a non-empty string")
    if model is None:
        model, tok, _ = trained.trained_model()
    return _RUNS.get(model, text, lambda: _run(text, model, tok))


def _run(text: str, model, tok) -> Run:
    ids = trained.encode(tok, text, MAX_TOKENS)
    attns = [b.attn for b in model.layers]
    old = [a.inspect for a in attns]
    try:
        for a in attns:
            a.inspect = True
        model(ids)
        layers = [_take(a.last_inspect, a.ratio, a.kind) for a in attns]
    finally:
        for a, o in zip(attns, old):
            a.inspect = o
    cfg = model.cfg
    return Run(text=text, ids=ids[0].tolist(), tokens=trained.token_strings(tok, ids), layers=layers,
               kinds=[a.kind for a in attns], ratios=[a.ratio for a in attns],
               n_heads=cfg.num_attention_heads, window=cfg.sliding_window)


def _take(insp: dict, ratio: int, kind: str) -> dict:
    """Batch row 0 of an inspection record, plus the channel-mean pooling weight of every slot."""
    # to the CPU: the figures index and combine these with CPU tensors whatever device the model is on
    out = {k: v[0].detach().cpu().clone() for k, v in insp.items()
           if isinstance(v, torch.Tensor) and k not in ("positions", "entries")}
    out["n_entries"] = int(insp["entries"].shape[1]) if insp.get("entries") is not None else 0
    pw = insp.get("pool_weights")
    # pool_weights: [B, n_entries, slots, c] channel-wise softmax → mean over channels: [n_entries, slots]
    out["pool_mean"] = pw[0].mean(-1).cpu() if pw is not None else torch.zeros(0, 2 * ratio if kind == "csa" else ratio)
    return out


def entry_tokens(kind: str, ratio: int, s: int) -> list[int]:
    """Token positions pooled by compressed entry s, slot by slot (CSA: the previous window, then its own)."""
    first = ratio * (s - 1) if kind == "csa" else ratio * s
    return list(range(first, first + (2 * ratio if kind == "csa" else ratio)))


# ------------------------------------------------------------------------------------ the inspector figure
def inspect_data(run: Run, position: int, layer: int, head: int) -> dict:
    """Traces (fixed count 6): window probs, compressed-entry probs, sink (panel 1: the final attention over
    positions); indexer scores of visible entries and the top-k picks (panel 2); pooling weights (panel 3)."""
    S, L = run.n_tokens, len(run.layers)
    check_range_int("position", position, 0, S - 1)
    check_range_int("layer", layer, 0, L - 1)
    check_range_int("head", head, 0, run.n_heads - 1)
    rec, kind, m = run.layers[layer], run.kinds[layer], run.ratios[layer]
    t, h = position, head
    # panel 1: window slots (positions t−w+1..t, −1 = before the text) and the attended compressed entries
    wpos = rec["window_positions"][t].tolist()
    wprob = rec["probs_window"][t, h].tolist()
    win = [(p, q) for p, q in zip(wpos, wprob) if p >= 0]
    cidx = rec["compressed_idx"][t].tolist() if kind != "window" else []
    cprob = rec["probs_compressed"][t, h].tolist() if kind != "window" else []
    comp = sorted((s, q) for s, q in zip(cidx, cprob) if s >= 0)
    sink = float(rec["sink"][t, h])
    toks = run.tokens
    traces = [
        dict(type="bar", x=[p for p, _ in win], y=[q for _, q in win], name="window (raw tokens)",
             marker=dict(color=KIND_COLORS["window"]), width=0.9,
             hovertext=[f"pos {p} {toks[p]!r}" for p, _ in win], xaxis="x", yaxis="y"),
        dict(type="bar", x=[m * s + (m - 1) / 2 for s, _ in comp], y=[q for _, q in comp],
             width=[m * 0.95] * len(comp), name=f"compressed entries (m={m})" if m else "compressed entries",
             marker=dict(color=KIND_COLORS["compressed"], opacity=0.7),
             hovertext=[f"entry {s}: pools tokens {entry_tokens(kind, m, s)[0]}..{entry_tokens(kind, m, s)[-1]}"
                        for s, _ in comp], xaxis="x", yaxis="y"),
        dict(type="bar", x=[SINK_X], y=[sink], width=[3], name="sink", marker=dict(color=KIND_COLORS["sink"]),
             hovertext=[f"sink (head {h}): {sink:.3f}"], xaxis="x", yaxis="y"),
    ]
    # panel 2: indexer scores over visible entries (CSA only) and the chosen top-k
    vis = (t + 1) // m if m else 0
    if kind == "csa":
        sc = rec["index_scores"][t, :vis].tolist()
        sel = sorted(s for s in rec["selected"][t].tolist() if s >= 0)
    else:
        sc, sel = [], []
    traces += [
        dict(type="bar", x=list(range(len(sc))), y=sc, name="indexer score (visible entries)", width=0.8,
             marker=dict(color="#bbbbbb"), xaxis="x2", yaxis="y2"),
        dict(type="scatter", mode="markers", x=sel, y=[sc[s] for s in sel], name="top-k selected",
             marker=dict(color=KIND_COLORS["selected"], size=8, symbol="diamond"), xaxis="x2", yaxis="y2"),
    ]
    # panel 3: pooling weights of the entries this query attends to: rows = entries, columns = token positions
    rows = [s for s, _ in comp]
    if rows:
        cols = sorted({p for s in rows for p in entry_tokens(kind, m, s) if p >= 0})
        where = {p: j for j, p in enumerate(cols)}
        z = [[None] * len(cols) for _ in rows]
        pm = rec["pool_mean"]
        for i, s in enumerate(rows):
            w = pm[s].tolist()
            for slot, p in enumerate(entry_tokens(kind, m, s)):
                if p >= 0:
                    z[i][where[p]] = w[slot]
        ylab = [f"entry {s}" for s in rows]
    else:
        cols, z, ylab = [], [], []
    traces.append(dict(type="heatmap", x=cols, y=ylab, z=z, colorscale="Viridis", zmin=0,
                       colorbar=dict(title="weight", len=0.38, y=0, yanchor="bottom", thickness=12),
                       name="pooling weight", hovertemplate="%{y}, token %{x}: weight %{z:.3f}<extra></extra>",
                       xaxis="x3", yaxis="y3"))
    n_sel = len(comp)
    what = {"window": "window only", "csa": f"CSA m={m}: top-{n_sel} of {vis} visible entries",
            "hca": f"HCA m={m}: all {n_sel} visible entries"}[kind]
    lo = max(0, t - run.window + 1)
    title = (f"query {t} {toks[t]!r} · layer {layer} ({what}) · head {head} · window {lo}..{t} · "
             f"mass: window {sum(q for _, q in win):.2f}, compressed {sum(q for _, q in comp):.2f}, sink {sink:.2f}")
    shapes = [dict(type="rect", xref="x", yref="y domain", x0=lo - 0.5, x1=t + 0.5, y0=0, y1=1,
                   fillcolor=KIND_COLORS["window"], opacity=0.07, line=dict(width=0))]
    notes = []
    if kind != "csa":
        notes.append(_note("x2", f"layer {layer} is {'HCA' if kind == 'hca' else 'window-only'}: no indexer "
                           + ("(HCA attends every visible entry)" if kind == "hca" else "(no compressed entries)")))
    elif not sc:
        notes.append(_note("x2", f"query {t}: no compressed entry is complete yet (the first covers tokens 0..{m - 1})"))
    if not rows:
        notes.append(_note("x3", "window-only layer: nothing is pooled" if kind == "window" else
                           f"query {t}: no compressed entry is complete yet, nothing pooled"))
    n_entries = max(1, S // m) if kind == "csa" else 1
    return {"traces": traces, "layout": {"title": {"text": title, "font": {"size": 12}}, "shapes": shapes,
                                         "annotations": notes, "xaxis": {"range": [SINK_X - 3, S + 1]},
                                         "xaxis2": {"range": [-0.5, n_entries - 0.5]}}}


def _note(xa: str, text: str) -> dict:
    """A sentence in the middle of an empty panel saying why it is empty."""
    ya = xa.replace("x", "y")
    return dict(text=text, xref=f"{xa} domain", yref=f"{ya} domain", x=0.5, y=0.5, showarrow=False,
                font=dict(size=11, color="#666"))


def check_range_int(arg: str, value, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{arg} = {value!r}: must be an integer in [{lo}, {hi}]")
    return value


INSPECT_LAYOUT = dict(
    height=680, barmode="overlay", margin=dict(l=60, r=20, t=100, b=50),
    xaxis=dict(domain=[0, 1], title="token position (sink at the far left)", anchor="y"),
    yaxis=dict(domain=[0.56, 1], title="attention probability", anchor="x"),
    xaxis2=dict(domain=[0, 0.42], title="compressed entry (CSA indexer)", anchor="y2"),
    yaxis2=dict(domain=[0, 0.38], title="index score", anchor="x2"),
    xaxis3=dict(domain=[0.52, 0.94], title="token pooled (pooling weight, mean over channels)", anchor="y3"),
    yaxis3=dict(domain=[0, 0.38], anchor="x3", autorange="reversed"),
)


def build_inspect(text: str = DEFAULT_TEXT, position: int | None = None, layer: int = 1, head: int = 0):
    """Static figure of :func:`inspect_data` (position defaults to the last token)."""
    run = run_text(text)
    pos = run.n_tokens - 1 if position is None else position
    return figure_from(inspect_data(run, pos, layer, head), INSPECT_LAYOUT)


@register
class InspectWidget(Widget):
    """Text, query position, layer and head → the window, compressed entries, indexer picks and the sink.

    A new text runs the model once (a forward of ≤ 256 tokens; not a slider-speed callback); position,
    layer and head only re-slice the cached inspection record."""

    name = "attention.inspect"
    defaults = {"text": DEFAULT_TEXT, "position": -1, "layer": 1, "head": 0}

    def __init__(self, static=None, **state):
        run_text(state.get("text", DEFAULT_TEXT))
        super().__init__(static, **state)

    @property
    def run(self) -> Run:
        return run_text(self.state["text"])

    def validate(self, state):
        if not isinstance(state["text"], str) or not state["text"].strip():
            raise ValueError(f"text = {state['text']!r}: must be a non-empty string")
        if state["position"] == -1:                       # "the last token" (the default)
            state["position"] = run_text(state["text"]).n_tokens - 1
        run = run_text(state["text"])
        check_range_int("position", state["position"], 0, run.n_tokens - 1)
        check_range_int("layer", state["layer"], 0, len(run.layers) - 1)
        check_range_int("head", state["head"], 0, run.n_heads - 1)

    def data(self):
        s = self.state
        return inspect_data(self.run, s["position"], s["layer"], s["head"])

    def layout(self):
        return INSPECT_LAYOUT

    def make_controls(self):
        import ipywidgets as W
        run = self.run
        return {"text": W.Textarea(value=self.state["text"], description="text", continuous_update=False,
                                   layout=W.Layout(width="98%", height="60px")),
                "position": W.IntSlider(min=0, max=run.n_tokens - 1, value=self.state["position"],
                                        description="query pos"),
                "layer": W.IntSlider(min=0, max=len(run.layers) - 1, value=self.state["layer"], description="layer"),
                "head": W.IntSlider(min=0, max=run.n_heads - 1, value=self.state["head"], description="head")}

    def sweep_values(self, control):
        run = self.run
        S = run.n_tokens
        return {"text": list(trained.SAMPLE_TEXTS.values()),
                "position": sorted(set(range(0, S, max(1, S // 48))) | {S - 1}),
                "layer": list(range(len(run.layers))), "head": list(range(run.n_heads))}[control]

    def on_text(self, value):
        S = run_text(value).n_tokens
        self.set(text=value, position=min(self.state["position"], S - 1))
        if "position" in self.controls:
            self.controls["position"].max = S - 1

    def on_position(self, value):
        self.set(position=int(value))

    def on_layer(self, value):
        self.set(layer=int(value))

    def on_head(self, value):
        self.set(head=int(value))


# ------------------------------------------------------------------------------------ cost calculator
COST_MODELS = ("v3.2", "v4-flash", "v4-pro", "gqa8")
KV_PARTS = {"window_kv": ("sliding window", "#1f77b4"), "compressed_kv": ("compressed entries", "#ff7f0e"),
            "indexer_keys": ("indexer keys", "#2ca02c"), "latent_kv": ("MLA latents (every token)", "#616161"),
            "gqa_kv": ("K and V (every token)", COLORS["gqa8"])}
FLOP_GROUPS = {"gemm": ("weight GEMMs", "#9e9e9e"), "core_attention": ("core attention", "#d62728"),
               "indexer_scores": ("indexer", "#2ca02c")}


def cost_numbers(context: int, weights: str = "B") -> dict:
    """{model: {"kv": {part: GB}, "flops": {group: GFLOPs}}} at ``context`` (GQA-8 at V4-Pro's depth; it
    has no FLOP model here). FLOP groups carry the ``weights`` precision weighting (B = calibrated to the published ratios, A = raw)."""
    check_choice("context", context, CONTEXT_STOPS)
    check_choice("weights", weights, accounting.WEIGHTINGS)
    return _cost_numbers(context, weights)


_COST: dict = {}


def _cost_numbers(context, weights):
    key = (context, weights)
    if key not in _COST:
        out = {}
        for m in COST_MODELS:
            if m == "gqa8":
                out[m] = {"kv": {"gqa_kv": accounting.gqa8("v4-pro", context)["total_bytes"] / 1e9}, "flops": {}}
                continue
            kv = accounting.kv_cache(m, context)["by_part"]
            fl = accounting.decode_flops(m, context, weights=weights)
            groups = {"gemm": sum(v for k, v in fl["weighted"].items() if k.startswith("gemm_")),
                      "core_attention": fl["weighted"]["core_attention"],
                      "indexer_scores": fl["weighted"]["indexer_scores"]}
            out[m] = {"kv": {k: v / 1e9 for k, v in kv.items()}, "flops": {k: v / 1e9 for k, v in groups.items()}}
        _COST[key] = out
    return _COST[key]


def cost_data(context: int = accounting.ONE_M, weights: str = "B") -> dict:
    """Traces: one stacked bar per KV part (5, panel 1) and per FLOP group (3, panel 2)."""
    nums = cost_numbers(context, weights)
    xs = [LABELS[m] if m != "gqa8" else "GQA-8 BF16" for m in COST_MODELS]
    fx = [LABELS[m] for m in COST_MODELS if m != "gqa8"]
    traces = []
    for part, (label, color) in KV_PARTS.items():
        y = [nums[m]["kv"].get(part, 0.0) for m in COST_MODELS]
        traces.append(dict(type="bar", x=xs, y=y, name=label, marker=dict(color=color), xaxis="x", yaxis="y",
                           hovertemplate="%{x}: %{y:.3g} GB<extra>" + label + "</extra>"))
    for g, (label, color) in FLOP_GROUPS.items():
        y = [nums[m]["flops"][g] for m in COST_MODELS if m != "gqa8"]
        traces.append(dict(type="bar", x=fx, y=y, name=label, marker=dict(color=color, pattern=dict(shape="/")),
                           xaxis="x2", yaxis="y2", hovertemplate="%{x}: %{y:.4g} GFLOPs<extra>" + label + "</extra>"))
    kv = {m: sum(nums[m]["kv"].values()) for m in COST_MODELS}
    fl = {m: sum(nums[m]["flops"].values()) for m in COST_MODELS if m != "gqa8"}
    title = (f"{context_label(context)} tokens · KV vs V3.2: Flash {100 * kv['v4-flash'] / kv['v3.2']:.1f}%, "
             f"Pro {100 * kv['v4-pro'] / kv['v3.2']:.1f}% · vs GQA-8: Pro {100 * kv['v4-pro'] / kv['gqa8']:.1f}% · "
             f"FLOPs vs V3.2: Flash {100 * fl['v4-flash'] / fl['v3.2']:.1f}%, Pro {100 * fl['v4-pro'] / fl['v3.2']:.1f}%")
    # GQA-8 would stretch a linear KV axis until V4's bars are slivers: the axis stops above V3.2 and the
    # GQA-8 bar runs off the top, its total written at the top
    cap = 1.2 * max(v for m, v in kv.items() if m != "gqa8")
    notes = [dict(x=x, y=min(kv[m], cap), xref="x", yref="y", yanchor="bottom", showarrow=False,
                  text=si(kv[m] * 1e9, "B") + (" ↑ off scale" if kv[m] > cap else ""), font=dict(size=11))
             for x, m in zip(xs, COST_MODELS)]
    notes += [dict(x=x, y=fl[m], xref="x2", yref="y2", yanchor="bottom", showarrow=False,
                   text=si(fl[m] * 1e9, "FLOP"), font=dict(size=11)) for x, m in zip(fx, fl)]
    return {"traces": traces, "layout": {"title": {"text": title, "font": {"size": 12}}, "annotations": notes,
                                         "yaxis": {"range": [0, cap * 1.08]}}}


COST_LAYOUT = dict(
    height=500, barmode="stack", margin=dict(l=60, r=20, t=50, b=50),
    legend=dict(orientation="h", yanchor="top", y=-0.1, xanchor="left", x=0),
    xaxis=dict(domain=[0, 0.5]), yaxis=dict(title="KV cache per sequence (GB; GQA-8 off scale)"),
    xaxis2=dict(domain=[0.6, 1], anchor="y2"), yaxis2=dict(title="decode GFLOPs per token", anchor="x2"),
)


def build_cost(context: int = accounting.ONE_M, weights: str = "B"):
    return figure_from(cost_data(context, weights), COST_LAYOUT)


@register
class CostWidget(Widget):
    """Context slider (1K..1M) and FLOP weighting → KV cache by stored part, decode FLOPs by group."""

    name = "attention.cost"
    defaults = {"context": accounting.ONE_M, "weights": "B"}

    def __init__(self, static=None, **state):
        for w in ("A", "B"):                      # all stops up front: callbacks only look numbers up
            for n in CONTEXT_STOPS:
                _cost_numbers(n, w)
        super().__init__(static, **state)

    def validate(self, state):
        check_choice("context", state["context"], CONTEXT_STOPS)
        check_choice("weights", state["weights"], ("A", "B"))

    def data(self):
        return cost_data(**self.state)

    def layout(self):
        return COST_LAYOUT

    def make_controls(self):
        import ipywidgets as W
        return {"context": W.SelectionSlider(options=[(context_label(n), n) for n in CONTEXT_STOPS],
                                             value=self.state["context"], description="context"),
                "weights": W.ToggleButtons(options=[("FP8-eq. (calibrated)", "B"), ("raw", "A")],
                                           value=self.state["weights"], description="FLOPs")}

    def sweep_values(self, control):
        return {"context": list(CONTEXT_STOPS), "weights": ["A", "B"]}[control]

    def on_context(self, value):
        self.set(context=value)

    def on_weights(self, value):
        self.set(weights=value)
