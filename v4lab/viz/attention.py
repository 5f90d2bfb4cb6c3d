"""Notebook 02: V4's compressed attention, looked at from inside one query.

Four widgets on the pattern of :mod:`v4lab.viz.common`:

* :class:`InspectWidget` — text, query position, layer and head → what that query attends to, read from
  ``Attention.last_inspect`` (``inspect=True``) of the notebook model (:mod:`v4lab.viz.trained`): the raw
  window, the compressed entries with their pooling weights, the indexer scores and top-k picks (CSA), and
  the final softmax probabilities with the sink. The model runs once per text (every layer's inspection
  record is kept, :func:`run_text`); the position / layer / head sliders only re-slice those tensors.
* :class:`CompressionWidget` — the compression picture of one compressed layer: every entry on the token
  axis (complete or not yet, picked by the indexer for the query or not, the query's raw window and the
  sink), and one entry opened up: the m (HCA) or 2m overlapping (CSA) tokens it pools, with the learned
  channel-wise pooling weights.
* :class:`CompareWidget` — one query's visible set in the first window, CSA and HCA layer side by side on
  the token axis; a toggle switches between what the query can read and the attention it gives.
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
from v4lab.viz.common import COLORS, TextCache, Widget, check_choice, figure_from, fmt3, register, si
from v4lab.viz.tour import CONTEXT_STOPS, LABELS, context_label

MAX_TOKENS = 2048                # tokens of a text the figures run: the lab model's training length, 16 HCA entries
DEFAULT_TEXT = trained.SAMPLE_TEXTS["for-loop"]   # the text when the model ships no held-out text
DEFAULT_CHARS = 12000            # characters of the held-out text the default takes (over 2048 lab-v4 tokens)
KIND_COLORS = {"window": "#1f77b4", "compressed": "#ff7f0e", "sink": "#7f7f7f", "selected": "#d62728"}


# ------------------------------------------------------------------------------------ one run per text
def default_text() -> str:
    """The figures' default text: the start of the notebook model's held-out text (``heldout.txt``, text it
    was not trained on; cut to ``MAX_TOKENS`` tokens by the run), else :data:`DEFAULT_TEXT`."""
    _, _, info = trained.trained_model()
    held = trained.heldout_text(info.get("path")) if not info.get("synthetic") else None
    return held[:DEFAULT_CHARS] if held and held.strip() else DEFAULT_TEXT


class running:
    """``with running(widget, what):`` shows "running … " under the widget's controls while a model runs
    (ipywidgets sends the change at once, so the reader sees it during the computation)."""

    def __init__(self, widget, what: str):
        self.status, self.what = getattr(widget, "status", None), what

    def __enter__(self):
        if self.status is not None:
            self.status.value = f"<i>running… {self.what}</i>"
        return self

    def __exit__(self, *exc):
        if self.status is not None and self.status.value.startswith("<i>running…"):
            self.status.value = ""
        return False

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
        model.streams(ids)                # the records, not the logits: no head
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
           if isinstance(v, torch.Tensor) and k not in ("positions", "entries", "pool_weights")}
    out["n_entries"] = int(insp["entries"].shape[1]) if insp.get("entries") is not None else 0
    pw = insp.get("pool_weights")
    # pool_weights: [B, n_entries, slots, c] channel-wise softmax → mean over channels: [n_entries, slots]
    slots = 2 * ratio if kind == "csa" else ratio
    out["pool"] = pw[0].detach().cpu().clone() if pw is not None else torch.zeros(0, slots, 1)   # [n, slots, c]
    out["pool_mean"] = out["pool"].mean(-1)
    return out


def entry_tokens(kind: str, ratio: int, s: int) -> list[int]:
    """Token positions pooled by compressed entry s, slot by slot (CSA: the previous window, then its own)."""
    first = ratio * (s - 1) if kind == "csa" else ratio * s
    return list(range(first, first + (2 * ratio if kind == "csa" else ratio)))


def sink_place(n_tokens: int) -> tuple[float, float]:
    """(x, width) of the sink's bar left of token 0, in token units: visible at any text length."""
    width = max(2.0, n_tokens / 60)
    return -1.5 * width, width


class _TextWidget(Widget):
    """A widget over :func:`run_text` of ``state["text"]`` (None = :func:`default_text`); a new text shows
    "running…" while the model runs once."""

    def _resolve_text(self, state) -> Run:
        if state.get("text") is None:
            state["text"] = default_text()
        if not isinstance(state["text"], str) or not state["text"].strip():
            raise ValueError(f"text = {state['text']!r}: must be a non-empty string")
        return run_text(state["text"])

    @property
    def run(self) -> Run:
        return run_text(self.state["text"])

    def _text_box(self):
        import ipywidgets as W
        return W.Textarea(value=self.state["text"], description="text", continuous_update=False,
                          layout=W.Layout(width="98%", height="60px"))

    def _new_text(self, value) -> tuple[str, Run]:
        """(text, its run): None is the default text; a text not run before shows "running…" meanwhile."""
        value = default_text() if value is None else value
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"text = {value!r}: must be a non-empty string")
        with running(self, "one forward of the model over the new text"):
            return value, run_text(value)

    def _set_text(self, value) -> None:
        """Show a new text (`_new_text`): the query position clamped to its length, and the position slider's
        range following it."""
        value, run = self._new_text(value)
        S = run.n_tokens
        self.set(text=value, position=min(self.state["position"], S - 1))
        if "position" in self.controls:
            self.controls["position"].max = S - 1


# ------------------------------------------------------------------------------------ the inspector figure
def inspect_data(run: Run, position: int, layer: int, head: int) -> dict:
    """Traces (fixed count 6): window probs, compressed-entry probs, sink (panel 1: the final attention over
    positions); indexer scores of visible entries and the top-k picks (panel 2); pooling weights (panel 3)."""
    S, L = run.n_tokens, len(run.layers)
    check_range_int("position", position, 0, S - 1)
    check_range_int("layer", layer, 0, L - 1)
    check_range_int("head", head, 0, run.n_heads - 1)
    rec, kind, m = run.layers[layer], run.kinds[layer], run.ratios[layer]
    traces, win, comp, sink = _attention_panel(run, rec, kind, m, position, head)
    idx_traces, sc, vis = _indexer_panel(rec, kind, m, position)
    pool_trace, rows = _pooling_panel(rec, kind, m, comp)
    layout = _inspect_layout(run, layer, head, kind, m, position, win, comp, sink, sc, vis, rows)
    return {"traces": traces + idx_traces + [pool_trace], "layout": layout}


def _attention_panel(run: Run, rec: dict, kind: str, m: int, t: int, h: int) -> tuple[list, list, list, float]:
    """Panel 1: window slots (positions t−w+1..t, −1 = before the text), the attended compressed entries, the sink."""
    S, toks = run.n_tokens, run.tokens
    wpos = rec["window_positions"][t].tolist()
    wprob = rec["probs_window"][t, h].tolist()
    win = [(p, q) for p, q in zip(wpos, wprob) if p >= 0]
    cidx = rec["compressed_idx"][t].tolist() if kind != "window" else []
    cprob = rec["probs_compressed"][t, h].tolist() if kind != "window" else []
    comp = sorted((s, q) for s, q in zip(cidx, cprob) if s >= 0)
    sink = float(rec["sink"][t, h])
    traces = [
        dict(type="bar", x=[p for p, _ in win], y=[q for _, q in win], name="window (raw tokens)",
             marker=dict(color=KIND_COLORS["window"], line=dict(width=0)), width=1.0,
             hovertext=[f"pos {p} {toks[p]!r}" for p, _ in win], xaxis="x", yaxis="y"),
        dict(type="bar", x=[m * s + (m - 1) / 2 for s, _ in comp], y=[q for _, q in comp],
             width=[m * 0.95] * len(comp), name=f"compressed entries (m={m})" if m else "compressed entries",
             marker=dict(color=KIND_COLORS["compressed"], opacity=0.7, line=dict(width=0)),
             hovertext=[f"entry {s}: pools tokens {entry_tokens(kind, m, s)[0]}..{entry_tokens(kind, m, s)[-1]}"
                        for s, _ in comp], xaxis="x", yaxis="y"),
        dict(type="bar", x=[sink_place(S)[0]], y=[sink], width=[sink_place(S)[1]], name="sink",
             marker=dict(color=KIND_COLORS["sink"]),
             hovertext=[f"sink (head {h}): {sink:.3f}"], xaxis="x", yaxis="y"),
    ]
    return traces, win, comp, sink


def _indexer_panel(rec: dict, kind: str, m: int, t: int) -> tuple[list, list, int]:
    """Panel 2: indexer scores over the visible entries (CSA only) and the chosen top-k."""
    vis = (t + 1) // m if m else 0
    if kind == "csa":
        sc = rec["index_scores"][t, :vis].tolist()
        sel = sorted(s for s in rec["selected"][t].tolist() if s >= 0)
    else:
        sc, sel = [], []
    traces = [
        dict(type="bar", x=list(range(len(sc))), y=sc, name="indexer score (visible entries)", width=0.8,
             marker=dict(color="#bbbbbb"), xaxis="x2", yaxis="y2"),
        dict(type="scatter", mode="markers", x=sel, y=[sc[s] for s in sel], name="top-k selected",
             marker=dict(color=KIND_COLORS["selected"], size=8, symbol="diamond"), xaxis="x2", yaxis="y2"),
    ]
    return traces, sc, vis


def _pooling_panel(rec: dict, kind: str, m: int, comp: list) -> tuple[dict, list]:
    """Panel 3: pooling weights of the entries the query attends to (rows = entries, columns = tokens)."""
    rows = [s for s, _ in comp]
    if rows:
        pooled = {p for s in rows for p in entry_tokens(kind, m, s) if p >= 0}
        # an empty column on each side of a run of pooled tokens: a heatmap cell spans half-way to its
        # neighbours, so without them a run's end tokens would stretch over the unpooled tokens between runs
        cols = sorted(pooled | {p + d for p in pooled for d in (-1, 1) if p + d not in pooled and p + d >= 0})
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
    trace = dict(type="heatmap", x=cols, y=ylab, z=z, colorscale="Viridis", zmin=0,
                 colorbar=dict(title="weight", len=0.38, y=0, yanchor="bottom", thickness=12),
                 name="pooling weight", hovertemplate="%{y}, token %{x}: weight %{z:.3f}<extra></extra>",
                 xaxis="x3", yaxis="y3")
    return trace, rows


def _inspect_layout(run: Run, layer: int, head: int, kind: str, m: int, t: int, win: list, comp: list,
                    sink: float, sc: list, vis: int, rows: list) -> dict:
    """Title (what the query reads and where its mass goes), the window band and the empty-panel notes."""
    S, toks = run.n_tokens, run.tokens
    n_sel = len(comp)
    what = {"window": "window only", "csa": f"CSA m={m}: top-{n_sel} of {vis} visible entries",
            "hca": f"HCA m={m}: all {n_sel} visible entries"}[kind]
    lo = max(0, t - run.window + 1)
    title = (f"query {t} {toks[t]!r} · layer {layer} ({what}) · head {head} · window {lo}..{t}<br>"
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
    return {"title": {"text": title, "font": {"size": 12}}, "shapes": shapes, "annotations": notes,
            "xaxis": {"range": [sum(sink_place(S)) - 2 * sink_place(S)[1], S + 1]},
            "xaxis2": {"range": [-0.5, n_entries - 0.5]}}


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
    height=700, barmode="overlay", margin=dict(l=60, r=20, t=125, b=50),
    xaxis=dict(domain=[0, 1], title="token position (sink at the far left)", anchor="y"),
    yaxis=dict(domain=[0.56, 1], title="attention probability", anchor="x"),
    xaxis2=dict(domain=[0, 0.42], title="compressed entry (CSA indexer)", anchor="y2"),
    yaxis2=dict(domain=[0, 0.38], title="index score", anchor="x2"),
    xaxis3=dict(domain=[0.52, 0.94], title="token pooled (pooling weight, mean over channels)", anchor="y3"),
    yaxis3=dict(domain=[0, 0.38], anchor="x3", autorange="reversed"),
)


def build_inspect(text: str | None = None, position: int | None = None, layer: int = 1, head: int = 0):
    """Static figure of :func:`inspect_data` (text defaults to :func:`default_text`, position to the last token)."""
    run = run_text(default_text() if text is None else text)
    pos = run.n_tokens - 1 if position is None else position
    return figure_from(inspect_data(run, pos, layer, head), INSPECT_LAYOUT)


@register
class InspectWidget(_TextWidget):
    """Text, query position, layer and head → the window, compressed entries, indexer picks and the sink.

    A new text runs the model once (a forward of ≤ ``MAX_TOKENS`` tokens, shown as "running…"); position,
    layer and head only re-slice the cached inspection record."""

    name = "attention.inspect"
    defaults = {"text": None, "position": -1, "layer": 1, "head": 0}

    def validate(self, state):
        run = self._resolve_text(state)
        if state["position"] == -1:                       # "the last token" (the default)
            state["position"] = run.n_tokens - 1
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
        return {"text": self._text_box(),
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
        self._set_text(value)

    def on_position(self, value):
        self.set(position=int(value))

    def on_layer(self, value):
        self.set(layer=int(value))

    def on_head(self, value):
        self.set(head=int(value))


# ------------------------------------------------------------------------------------ shared by the new figures
KIND_NAMES = {"window": "window only", "csa": "CSA", "hca": "HCA"}
ENTRY_COLORS = {"picked": "#d62728", "visible": "#9ecae1", "future": "#d9d9d9"}
SLOT_COLORS = {"previous": "#9467bd", "own": "#ff7f0e"}
POOL_FLOOR = 1e-4                # the pooling-weight axis is logarithmic down to here (smaller values drawn at it)


def compressed_layers(run: Run) -> list[int]:
    """The layers with compressed entries (CSA and HCA)."""
    return [i for i, k in enumerate(run.kinds) if k != "window"]


def attended_entries(run: Run, layer: int, position: int, head="mean") -> dict[int, float]:
    """{entry s: the attention probability query ``position`` gives it} in one layer (head or the mean over
    heads): CSA the indexer's picks, HCA every complete entry."""
    rec = run.layers[layer]
    if run.kinds[layer] == "window":
        return {}
    pc = rec["probs_compressed"][position]                                 # [H, Kc]
    p = pc.mean(0) if head == "mean" else pc[head]
    return {int(s): float(q) for s, q in zip(rec["compressed_idx"][position].tolist(), p.tolist()) if s >= 0}


def top_entry(run: Run, layer: int, position: int) -> int:
    """The entry query ``position`` attends most in ``layer`` (mean over heads); with none visible yet, the
    last entry of the text (0 when the text completes none)."""
    att = attended_entries(run, layer, position)
    if att:
        return max(att, key=lambda s: (att[s], -s))
    return max(0, run.layers[layer]["n_entries"] - 1)


def _block_bars(entries, m: int, base: float, height: float, name: str, color: str, hover: list[str], ax: str,
                legend: bool = True, group: str | None = None) -> dict:
    """Bars spanning the own block of each compressed entry (tokens m·s .. m·s+m−1) on a token axis."""
    return dict(type="bar", x=[m * s + (m - 1) / 2 for s in entries], y=[height] * len(entries),
                base=[base] * len(entries), width=[m * 0.9] * len(entries), name=name,
                marker=dict(color=color, line=dict(width=0)),
                hovertext=hover, hoverinfo="text", showlegend=legend, legendgroup=group or name,
                xaxis=f"x{ax}", yaxis=f"y{ax}")


def _toks(run: Run, a: int, b: int) -> str:
    """Tokens a..b as text, for hovers (at most 12 shown)."""
    t = "".join(run.tokens[max(a, 0):b + 1])
    return t if len(t) <= 40 else t[:37] + "…"


# ------------------------------------------------------------------------------------ the compression picture
def compression_data(run: Run, layer: int, position: int, entry: int) -> dict:
    """Traces (fixed count 11). Panel 1, the token axis: the compressed entries of ``layer`` over the tokens
    they stand for (not yet complete for the query / complete but not picked / picked by the indexer, or
    all attended in HCA), the query's raw window and the sink, the query, and the outline of ``entry``'s
    pooled tokens. Panel 2: ``entry`` opened up: the learned pooling weight of each token it pools (mean
    over channels, bars from the smallest to the largest channel), CSA's previous-block overlap apart."""
    S = run.n_tokens
    check_range_int("layer", layer, 0, len(run.layers) - 1)
    if run.kinds[layer] == "window":
        raise ValueError(f"layer = {layer}: a window-only layer has no compressed entries; choose one of "
                         f"{compressed_layers(run)}")
    check_range_int("position", position, 0, S - 1)
    rec, kind, m, t = run.layers[layer], run.kinds[layer], run.ratios[layer], position
    n = rec["n_entries"]
    check_range_int("entry", entry, 0, max(n - 1, 0))
    vis = min((t + 1) // m, n)
    att = attended_entries(run, layer, t)
    lo = max(0, t - run.window + 1)
    sink = float(rec["sink"][t].mean())
    traces = _token_axis_traces(run, kind, m, t, n, vis, att, lo, sink)
    slots = entry_tokens(kind, m, entry) if n else []
    a, b = (max(slots[0], 0), slots[-1]) if slots else (0, 0)
    traces.append(dict(type="scatter", mode="lines", x=[a - 0.5, b + 0.5, b + 0.5, a - 0.5, a - 0.5] if slots else [],
                       y=[-0.55, -0.55, 0.55, 0.55, -0.55] if slots else [], name=f"entry {entry}: pooled tokens",
                       line=dict(color="black", width=1.5), hoverinfo="skip", showlegend=False, xaxis="x", yaxis="y"))
    pool_traces, groups = _entry_pool_traces(run, rec, kind, m, entry, n, slots)
    traces += pool_traces
    layout = _compression_layout(run, layer, kind, m, t, entry, n, vis, att, lo, sink, slots, groups)
    return {"traces": traces, "layout": layout}


def _token_axis_traces(run: Run, kind: str, m: int, t: int, n: int, vis: int, att: dict, lo: int,
                       sink: float) -> list:
    """Panel 1 of the compression picture: entries (complete / not yet / picked), raw window, sink, query."""
    S, picked = run.n_tokens, sorted(att)
    sx, sw = sink_place(S)

    def hov(s, what):
        return f"entry {s}: tokens {m * s}..{m * s + m - 1} {_toks(run, m * s, m * s + m - 1)!r}<br>{what}"
    picked_name = "picked by the indexer" if kind == "csa" else "attended (HCA: every complete entry)"
    # complete and not-yet-complete entries are contiguous runs: one bar each (a slider sends 2 numbers, not
    # 500 bars); the entry boundaries are one fixed line trace; the picked entries are bars on top
    spans = [(0, vis, "complete" + (", not picked" if kind == "csa" else ""), ENTRY_COLORS["visible"]),
             (vis, n, f"not complete at query {t}", ENTRY_COLORS["future"])]
    traces = [dict(type="bar", x=[m * (a + b) / 2 - 0.5] if b > a else [], y=[0.6] if b > a else [],
                   base=[-0.3] if b > a else [], width=[m * (b - a)] if b > a else [], name=name,
                   marker=dict(color=color, line=dict(width=0)), hoverinfo="text", xaxis="x", yaxis="y",
                   hovertext=[f"entries {a}..{b - 1} (tokens {m * a}..{m * b - 1}): {name}"] if b > a else [])
              for a, b, name, color in spans]
    edges = [e for s in range(1, n) for e in (m * s - 0.5, m * s - 0.5, None)]
    traces += [
        dict(type="scatter", mode="lines", x=edges, y=[-0.3, 0.3, None] * (n - 1), name="entry boundaries",
             line=dict(color="white", width=1), hoverinfo="skip", showlegend=False, xaxis="x", yaxis="y"),
        _block_bars(picked, m, -0.45, 0.9, picked_name, ENTRY_COLORS["picked"],
                    [hov(s, f"attention p = {fmt3(att[s])} (mean over heads)") for s in picked], ""),
        dict(type="bar", x=[(lo + t) / 2], y=[0.6], base=[0.7], width=[t - lo + 1], name="raw window",
             marker=dict(color=KIND_COLORS["window"], line=dict(width=0)), hoverinfo="text", xaxis="x", yaxis="y",
             hovertext=[f"window: tokens {lo}..{t} read as they are"]),
        dict(type="bar", x=[sx], y=[0.6], base=[0.7], width=[sw], name="sink", hoverinfo="text",
             marker=dict(color=KIND_COLORS["sink"], line=dict(width=0)), xaxis="x", yaxis="y",
             hovertext=[f"sink: p = {sink:.3g} (mean over heads) goes to no token"]),
        dict(type="scatter", mode="markers", x=[t], y=[1.5], name=f"query {t}", hoverinfo="text",
             hovertext=[f"query {t} {run.tokens[t]!r}"],
             marker=dict(symbol="triangle-down", size=12, color="black"), xaxis="x", yaxis="y"),
    ]
    return traces


def _entry_pool_traces(run: Run, rec: dict, kind: str, m: int, entry: int, n: int, slots: list) -> tuple[list, dict]:
    """Panel 2: ``entry``'s pooling weights, slot by slot ([slots, c]: a channel-wise softmax over the slots)."""
    traces = []
    w = rec["pool"][entry] if n else torch.zeros(0, 1)
    groups = {"previous": [], "own": []}
    for j, p in enumerate(slots):
        if p >= 0:
            groups["previous" if kind == "csa" and j < m else "own"].append((p, w[j]))
    for g, label in (("previous", f"previous block (CSA overlap: tokens {m * (entry - 1)}..{m * entry - 1})"),
                     ("own", f"own block (tokens {m * entry}..{m * entry + m - 1})")):
        pts = groups[g]
        mean = [max(float(c.mean()), POOL_FLOOR) for _, c in pts]
        traces.append(dict(type="bar", x=[p for p, _ in pts], y=mean, name=label,
                           marker=dict(color=SLOT_COLORS[g], line=dict(width=0)),
                           customdata=[run.tokens[p] for p, _ in pts], xaxis="x2", yaxis="y2",
                           hovertemplate="token %{x} %{customdata}: weight %{y:.3g} (mean over channels)<extra></extra>"))
    # the spread over channels (each channel has its own softmax over the slots): one line per token, min..max
    pts = groups["previous"] + groups["own"]
    traces.append(dict(type="scatter", mode="lines", x=[v for p, _ in pts for v in (p, p, None)],
                       y=[v for _, c in pts for v in (max(float(c.min()), POOL_FLOOR), float(c.max()), None)],
                       name="min..max over channels", line=dict(color="#555", width=1), hoverinfo="skip",
                       xaxis="x2", yaxis="y2"))
    return traces, groups


def _compression_layout(run: Run, layer: int, kind: str, m: int, t: int, entry: int, n: int, vis: int, att: dict,
                        lo: int, sink: float, slots: list, groups: dict) -> dict:
    """Two title lines (what the query sees; what the chosen entry pools), notes for empty panels, axes."""
    S, picked = run.n_tokens, sorted(att)
    sx, sw = sink_place(S)
    a, b = (max(slots[0], 0), slots[-1]) if slots else (0, 0)
    KIND = KIND_NAMES[kind]
    head = (f"layer {layer}, {KIND} (m = {m}): query {t} {run.tokens[t]!r} sees {vis} of {n} entries"
            + (f", the indexer picked {len(picked)}" if kind == "csa" else ", all attended") +
            f" · raw window {lo}..{t} · sink p = {fmt3(sink)}")
    if n:
        where = ("not complete for this query" if entry >= vis else
                 f"p = {fmt3(att[entry])} from the query" if entry in att else "visible, not picked")
        pools = f"{len(groups['previous']) + len(groups['own'])} tokens {a}..{b}"
        line2 = f"entry {entry} pools {pools} into one key/value (RoPE position {m * entry}); {where}"
    else:
        line2 = f"no entry: the text has {S} tokens, an entry needs {m}"
    notes = [] if n else [_note("x2", f"no compressed entry: {S} tokens, an entry pools {m}")]
    if n and not groups["own"]:
        notes = [_note("x2", f"entry {entry}: nothing pooled")]
    if slots and len(slots) <= 16:
        ticks = dict(tickvals=[p for p in slots if p >= 0],
                     ticktext=[f"{p}<br>{run.tokens[p][:8]}" for p in slots if p >= 0], tickangle=0)
    else:
        ticks = dict(tickvals=None, ticktext=None, tickangle=None)
    x2 = dict(range=[a - 0.7, b + 0.7] if slots else [0, 1], **ticks)
    return {"title": {"text": f"{head}<br>{line2}", "font": {"size": 12}}, "annotations": notes,
            "xaxis": {"range": [sx - sw, S + 0.5]}, "xaxis2": x2}


COMPRESSION_LAYOUT = dict(
    height=560, barmode="overlay", margin=dict(l=70, r=20, t=80, b=60), bargap=0.15,
    legend=dict(orientation="h", yanchor="top", y=0.52, xanchor="left", x=0),
    xaxis=dict(domain=[0, 1], anchor="y", title=None),
    yaxis=dict(domain=[0.66, 1], anchor="x", range=[-0.6, 1.75], tickvals=[0, 1],
               ticktext=["entries", "window · sink"], fixedrange=True, showgrid=False),
    xaxis2=dict(domain=[0, 1], anchor="y2", title="token position (and token) pooled by the entry"),
    yaxis2=dict(domain=[0, 0.33], anchor="x2", title="pooling weight", type="log", range=[-4, 0.05],
                tickvals=[1e-4, 1e-3, 1e-2, 0.1, 1], ticktext=["0.0001", "0.001", "0.01", "0.1", "1"]),
)


def build_compression(text: str | None = None, layer: int | None = None, position: int | None = None,
                      entry: int | None = None):
    """Static figure of :func:`compression_data` (defaults: the first CSA layer, the last token, the entry it
    attends most)."""
    run = run_text(default_text() if text is None else text)
    lay = compressed_layers(run)[0] if layer is None else layer
    pos = run.n_tokens - 1 if position is None else position
    ent = top_entry(run, lay, pos) if entry is None else entry
    return figure_from(compression_data(run, lay, pos, ent), COMPRESSION_LAYOUT)


@register
class CompressionWidget(_TextWidget):
    """Text, compressed layer, query position and entry → the compression picture (:func:`compression_data`).

    A new text runs the model once (shown as "running…"); the layer, position and entry only re-slice."""

    name = "attention.compression"
    defaults = {"text": None, "layer": None, "position": -1, "entry": -1}

    def validate(self, state):
        run = self._resolve_text(state)
        if state["layer"] is None:
            state["layer"] = compressed_layers(run)[0]
        if state["layer"] not in compressed_layers(run):
            raise ValueError(f"layer = {state['layer']!r}: must be one of the compressed layers "
                             f"{compressed_layers(run)}")
        if state["position"] == -1:
            state["position"] = run.n_tokens - 1
        check_range_int("position", state["position"], 0, run.n_tokens - 1)
        if state["entry"] == -1:                         # the entry this query attends most
            state["entry"] = top_entry(run, state["layer"], state["position"])
        check_range_int("entry", state["entry"], 0, max(run.layers[state["layer"]]["n_entries"] - 1, 0))

    def data(self):
        s = self.state
        return compression_data(self.run, s["layer"], s["position"], s["entry"])

    def layout(self):
        return COMPRESSION_LAYOUT

    def _n_entries(self) -> int:
        return max(self.run.layers[self.state["layer"]]["n_entries"] - 1, 0)

    def make_controls(self):
        import ipywidgets as W
        run = self.run
        return {"text": self._text_box(),
                "layer": W.ToggleButtons(options=[(f"{i}: {KIND_NAMES[run.kinds[i]]}", i) for i in compressed_layers(run)],
                                         value=self.state["layer"], description="layer",
                                         style=dict(button_width="70px")),
                "position": W.IntSlider(min=0, max=run.n_tokens - 1, value=self.state["position"],
                                        description="query pos", continuous_update=True),
                "entry": W.IntSlider(min=0, max=self._n_entries(), value=self.state["entry"], description="entry")}

    def sweep_values(self, control):
        run = self.run
        S, n = run.n_tokens, run.layers[self.state["layer"]]["n_entries"]
        return {"text": list(trained.SAMPLE_TEXTS.values()), "layer": compressed_layers(run),
                "position": sorted(set(range(0, S, max(1, S // 40))) | {S - 1}),
                "entry": sorted(set(range(0, max(n, 1), max(1, n // 24))) | {max(n - 1, 0)})}[control]

    def _sync(self):
        if "position" in self.controls:
            self.controls["position"].max = self.run.n_tokens - 1
            self.controls["position"].value = self.state["position"]
            self.controls["entry"].max = self._n_entries()
            self.controls["entry"].value = self.state["entry"]

    def on_text(self, value):
        value, run = self._new_text(value)
        S = run.n_tokens
        self.set(text=value, position=min(self.state["position"], S - 1), entry=-1)
        self._sync()

    def on_layer(self, value):
        self.set(layer=None if value is None else int(value), entry=-1)      # None: the first CSA layer
        self._sync()

    def on_position(self, value):
        self.set(position=int(value))

    def on_entry(self, value):
        self.set(entry=int(value))


# ------------------------------------------------------------------------------------ window vs CSA vs HCA
MEASURES = {"visible": "what it can read", "attention": "attention p"}


KINDS3 = ("window", "csa", "hca")


def first_layers(run: Run) -> dict:
    """{kind: the first layer of that kind, or None} for window, CSA and HCA."""
    return {k: next((i for i, kk in enumerate(run.kinds) if kk == k), None) for k in ("window", "csa", "hca")}


def compare_data(run: Run, position: int, head="mean", measure: str = "visible") -> dict:
    """Traces (fixed count 15): for the first window, CSA and HCA layer (one row each, one token axis): the
    raw window tokens, the compressed entries the query reads (CSA: the indexer's picks; HCA: all complete),
    CSA's complete entries it does not read, the sink, and the query. ``measure`` "visible": bars of
    height 1 where the query can read (entries over the tokens they summarise); "attention": the
    probability it gives each window token, entry and the sink (``head`` or the mean over heads)."""
    S = run.n_tokens
    check_range_int("position", position, 0, S - 1)
    check_choice("head", head, ["mean"] + list(range(run.n_heads)))
    check_choice("measure", measure, list(MEASURES))
    t, att_mode = position, measure == "attention"
    traces, notes, lines, ymax = [], [], [], {}
    for r, (kind, layer) in enumerate(first_layers(run).items()):
        ax = "" if r == 0 else str(r + 1)
        if layer is None:
            traces += [dict(type="bar", x=[], y=[], name=n, xaxis=f"x{ax}", yaxis=f"y{ax}", showlegend=False)
                       for n in ("raw window", "entries read", "not read", "sink")]
            traces.append(dict(type="scatter", x=[], y=[], xaxis=f"x{ax}", yaxis=f"y{ax}", showlegend=False))
            notes.append(_note(f"x{ax}", f"this model has no {KIND_NAMES[kind]} layer"))
            ymax[r] = 1.0
            continue
        row, ymax[r], line = _compare_row(run, r, kind, layer, t, head, att_mode)
        traces += row
        lines.append(line)
    return {"traces": traces, "layout": _compare_axes(run, t, head, lines, notes, ymax, att_mode)}


def _compare_row(run: Run, r: int, kind: str, layer: int, t: int, head, att_mode: bool) -> tuple[list, float, str]:
    """One layer's row of the comparison: window tokens, entries read, CSA's unread span, sink, the query."""
    ax, first = ("" if r == 0 else str(r + 1)), r == 0
    sx, sw = sink_place(run.n_tokens)
    rec, m = run.layers[layer], run.ratios[layer]
    lo = max(0, t - run.window + 1)
    wpos = list(range(lo, t + 1))
    pw = rec["probs_window"][t]                                       # [H, w] slots oldest first
    pw = (pw.mean(0) if head == "mean" else pw[head]).tolist()
    wprob = dict(zip(rec["window_positions"][t].tolist(), pw))
    att = attended_entries(run, layer, t, head)
    read = sorted(att)
    vis = min((t + 1) // m, rec["n_entries"]) if m else 0
    unread = [s for s in range(vis) if s not in att]
    sink = float(rec["sink"][t].mean() if head == "mean" else rec["sink"][t, head])
    wy = [wprob.get(p, 0.0) if att_mode else 1.0 for p in wpos]
    ey = [att[s] if att_mode else 1.0 for s in read]
    traces = []
    traces.append(dict(type="bar", x=wpos, y=wy, width=1.0, name="raw window tokens", legendgroup="w",
                       showlegend=first, marker=dict(color=KIND_COLORS["window"], line=dict(width=0)),
                       xaxis=f"x{ax}", yaxis=f"y{ax}",
                       customdata=[run.tokens[p] for p in wpos],
                       hovertemplate="token %{x} %{customdata}: %{y:.3g}<extra>window</extra>"))
    traces.append(dict(type="bar", x=[m * s + (m - 1) / 2 for s in read], y=ey, width=[m * 0.9] * len(read),
                       name="compressed entries read", legendgroup="e", showlegend=kind == "csa",
                       marker=dict(color=ENTRY_COLORS["picked"], line=dict(width=0)), xaxis=f"x{ax}", yaxis=f"y{ax}",
                       hovertext=[f"entry {s} (tokens {m * s}..{m * s + m - 1}): p = {att[s]:.3g}" for s in read],
                       hoverinfo="text"))
    # the complete entries form one run 0..vis−1: one bar under the picked ones (not 500 bars per slider move)
    span = vis > 0 and kind == "csa" and not att_mode
    traces.append(dict(type="bar", x=[m * vis / 2 - 0.5] if span else [], y=[0.3] if span else [],
                       width=[m * vis] if span else [], name="complete entries not picked (CSA)",
                       legendgroup="u", showlegend=kind == "csa",
                       marker=dict(color=ENTRY_COLORS["visible"], line=dict(width=0)),
                       xaxis=f"x{ax}", yaxis=f"y{ax}", hoverinfo="text",
                       hovertext=[f"entries 0..{vis - 1} are complete; {len(unread)} not picked"] if span else []))
    traces.append(dict(type="bar", x=[sx], y=[sink if att_mode else 0.0], width=[sw], name="sink",
                       legendgroup="s", showlegend=first, marker=dict(color=KIND_COLORS["sink"], line=dict(width=0)),
                       xaxis=f"x{ax}", yaxis=f"y{ax}", hovertext=[f"sink: p = {sink:.3g}"], hoverinfo="text"))
    traces.append(dict(type="scatter", mode="lines", x=[t, t], y=[0, 1.1 if not att_mode else 1.0],
                       name="query", legendgroup="q", showlegend=first, hoverinfo="skip",
                       line=dict(color="black", width=1, dash="dot"), xaxis=f"x{ax}", yaxis=f"y{ax}"))
    ymax = max(wy + ey + [sink if att_mode else 0.0, 1e-3])
    covered = len(read) * m
    what = {"window": f"{len(wpos)} raw tokens",
            "csa": f"{len(wpos)} raw tokens + {len(read)} of {vis} entries ({covered} tokens summarised)",
            "hca": f"{len(wpos)} raw tokens + all {len(read)} entries ({covered} tokens summarised)"}[kind]
    mass = sum(wy) if att_mode else None
    line = (f"{KIND_NAMES[kind]} (layer {layer}): {what}"
            + (f"; p window {mass:.2f}, entries {sum(ey):.2f}, sink {sink:.2f}" if att_mode else ""))
    return traces, ymax, line


def _compare_axes(run: Run, t: int, head, lines: list, notes: list, ymax: dict, att_mode: bool) -> dict:
    """The title (what each layer reads) and one x/y axis pair per row."""
    S = run.n_tokens
    sx, sw = sink_place(S)
    layout = {"title": {"text": f"query {t} {run.tokens[t]!r}, head {head}<br>" + "<br>".join(lines),
                        "font": {"size": 12}}, "annotations": notes}
    for r in range(3):
        ax = "" if r == 0 else str(r + 1)
        layout[f"xaxis{ax}"] = {"range": [sx - sw, S + 0.5]}
        layer = first_layers(run)[KINDS3[r]]
        label = f"{KIND_NAMES[KINDS3[r]]}<br>layer {layer}" if layer is not None else KIND_NAMES[KINDS3[r]]
        layout[f"yaxis{ax}"] = {"range": [0, 1.15 * ymax[r]] if att_mode else [0, 1.15],
                                "title": {"text": f"{label}<br>{'p' if att_mode else 'read (1 = yes)'}"}}
    return layout


def compare_layout(run: Run) -> dict:
    lay = dict(height=620, barmode="overlay", bargap=0, margin=dict(l=120, r=20, t=110, b=80),
               legend=dict(orientation="h", yanchor="top", y=-0.1, xanchor="left", x=0))
    for r, (kind, layer) in enumerate(first_layers(run).items()):
        ax = "" if r == 0 else str(r + 1)
        top = 1 - r * 0.345
        lay[f"xaxis{ax}"] = dict(domain=[0, 1], anchor=f"y{ax}")
        if r == 2:
            lay[f"xaxis{ax}"]["title"] = "token position (sink at the far left)"
        lay[f"yaxis{ax}"] = dict(domain=[top - 0.29, top], anchor=f"x{ax}")
    return lay


def build_compare(text: str | None = None, position: int | None = None, head="mean", measure: str = "visible"):
    run = run_text(default_text() if text is None else text)
    pos = run.n_tokens - 1 if position is None else position
    return figure_from(compare_data(run, pos, head, measure), compare_layout(run))


@register
class CompareWidget(_TextWidget):
    """Query position, head and a toggle (what it can read / attention p) → one query's visible set in the
    first window, CSA and HCA layer, side by side on one token axis."""

    name = "attention.compare"
    defaults = {"text": None, "position": -1, "head": "mean", "measure": "visible"}

    def validate(self, state):
        run = self._resolve_text(state)
        if state["position"] == -1:
            state["position"] = run.n_tokens - 1
        check_range_int("position", state["position"], 0, run.n_tokens - 1)
        check_choice("head", state["head"], ["mean"] + list(range(run.n_heads)))
        check_choice("measure", state["measure"], list(MEASURES))

    def data(self):
        return compare_data(self.run, self.state["position"], self.state["head"], self.state["measure"])

    def layout(self):
        return compare_layout(self.run)

    def make_controls(self):
        import ipywidgets as W
        run = self.run
        return {"text": self._text_box(),
                "position": W.IntSlider(min=0, max=run.n_tokens - 1, value=self.state["position"],
                                        description="query pos"),
                "head": W.ToggleButtons(options=[(str(h), h) for h in ["mean"] + list(range(run.n_heads))],
                                        value=self.state["head"], description="head", style=dict(button_width="50px")),
                "measure": W.ToggleButtons(options=[(v, k) for k, v in MEASURES.items()],
                                           value=self.state["measure"], description="show")}

    def sweep_values(self, control):
        run = self.run
        S = run.n_tokens
        return {"text": list(trained.SAMPLE_TEXTS.values()),
                "position": sorted(set(range(0, S, max(1, S // 40))) | {S - 1}),
                "head": ["mean"] + list(range(run.n_heads)), "measure": list(MEASURES)}[control]

    def on_text(self, value):
        self._set_text(value)
        if "position" in self.controls:
            self.controls["position"].value = self.state["position"]

    def on_position(self, value):
        self.set(position=int(value))

    def on_head(self, value):
        self.set(head=value)

    def on_measure(self, value):
        self.set(measure=value)


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
