"""Notebook 10: one token's decode, step by step — what each layer kind's KV cache holds and what the token reads.

:class:`DecodeWidget` plays a text through the notebook model (:mod:`v4lab.viz.trained`) with
:func:`v4lab.trace.decode_trace` once per text (a progress bar while it runs), then a token slider (with ▶
play) only re-slices that trace. One row group per layer kind (the first layer of each kind):

* ring — the raw window slots, drawn at the token positions they hold (every one is read);
* open block — the compressor's tokens waiting for their block to close (not readable yet);
* entries — compressed entries on the tokens they summarise; red = read by this token (CSA: the indexer's
  top-k, HCA: every visible entry), grey = stored but not read; a green outline = closed at this very token,
  which makes it visible at once (entries visible = ⌊(t+1)/m⌋); the bracket under the row is the span the
  newest entry pools (2m tokens for CSA, m for HCA);
* indexer keys (CSA) — one FP4 key per entry, all scored by the indexer.

Below: the cache bytes so far (released storage format) against the same number of layers with V3.2's MLA
cache and with a BF16 GQA-8 cache (:func:`v4lab.trace.cache_baselines`), on a log axis.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import plotly.graph_objects as go

from v4lab import trace as T
from v4lab.viz import trained
from v4lab.viz.common import COLORS, TextCache, Widget, figure_from, register

MAX_TOKENS = 1024
DEFAULT_TEXT = trained.SAMPLE_TEXTS["for-loop"]
DEFAULT_TOKEN = 129                  # past HCA's first block (m' = 128)
CHUNK = 256                          # tokens per cached forward while tracing (decode_trace's chunked mode)
# qualitative palette (plotly D3), one meaning per colour; every one is in the legend
PART_COLORS = {"ring": "#1f77b4", "open": "#ff7f0e", "stored": "#c7c7c7", "read": "#d62728",
               "span": "#8c564b", "keys": "#9467bd", "new": "#2ca02c", "query": "#000000"}
BASELINE_COLORS = {"v4": "#1f77b4", "v3.2_mla": COLORS["v3.2"], "gqa8": COLORS["gqa8"]}
KIND_NAMES = {"window": "window", "csa": "CSA", "hca": "HCA"}
ROWS = {"window": ("ring",), "csa": ("ring", "open block", "entries", "indexer keys"),
        "hca": ("ring", "open block", "entries")}


@dataclass
class Run:
    """One text traced through the notebook model."""
    text: str
    tokens: list[str]
    records: list[dict]
    layers: list[int]                 # the layer shown for each kind present (first of that kind)
    n_layers: int
    cfg: object

    @property
    def n_tokens(self) -> int:
        return len(self.records)


_RUNS = TextCache(maxsize=4)


def run_text(text: str, model: Any = None, tok: Any = None, progress: bool = False) -> Run:
    """Trace ``text`` (first ``MAX_TOKENS`` tokens) through the notebook model; cached per text."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"text = {text!r}: must be a non-empty string")
    if model is None:
        model, tok, _ = trained.trained_model()
    return _RUNS.get(model, text, lambda: _run(text, model, tok, progress))


def _run(text, model, tok, progress) -> Run:
    ids = trained.encode(tok, text, MAX_TOKENS)
    recs = T.decode_trace(model, ids, chunk=CHUNK, progress=progress)
    cfg = model.cfg
    kinds = cfg.layer_kinds
    layers = [kinds.index(k) for k in ("window", "csa", "hca") if k in kinds]
    toks = [t.replace("$", "﹩") for t in trained.token_strings(tok, ids)]   # no "$" pairs in plotly text
    return Run(text, toks, recs, layers, cfg.num_hidden_layers, cfg)


def _human(n: float) -> str:
    for unit, f in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= f:
            return f"{n / f:.3g} {unit}"
    return f"{n:.0f} B"


def row_layout(run: Run) -> list[tuple[int, str]]:
    """(layer, row name) from top to bottom."""
    return [(i, r) for i in run.layers for r in ROWS[run.cfg.layer_kind(i)]]


def _bars(xs0, widths, ys, name, color, hover, **kw) -> dict:
    return dict(type="bar", orientation="h", base=xs0, x=widths, y=ys, name=name, width=0.7,
                marker=dict(color=color, **kw.pop("marker", {})), hovertext=hover, hoverinfo="text",
                xaxis="x", yaxis="y", **kw)


def decode_data(run: Run, token: int) -> dict:
    """Traces (fixed count 9) and layout for slider position ``token`` (the query t)."""
    S = run.n_tokens
    if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < S:
        raise ValueError(f"token = {token!r}: must be an integer in [0, {S - 1}] (the text has {S} tokens)")
    t, rec, toks = token, run.records[token], run.tokens
    rows = row_layout(run)
    y_of = {key: len(rows) - 1 - j for j, key in enumerate(rows)}
    parts = {k: ([], [], [], []) for k in ("ring", "open", "stored", "read", "keys", "new")}   # x0, width, y, hover
    span_x, span_y, notes, ticks = [], [], [], []

    def add(part, x0, w, y, hover):
        for lst, v in zip(parts[part], (x0, w, y, hover)):
            lst.append(v)

    for (i, row), y in y_of.items():
        L = rec["layers"][i]
        kind, m = L["kind"], L["ratio"]
        label = f"{KIND_NAMES[kind]} L{i} · {row}"
        if row == "ring":
            for s, p in enumerate(L["window_slots"]):
                if p >= 0:
                    add("ring", p - 0.45, 0.9, y, f"ring slot {s} holds token {p} {toks[p]!r} (read)")
            label += f" ({sum(p >= 0 for p in L['window_slots'])}/{len(L['window_slots'])} slots)"
        elif row == "open block":
            for p in L["pending"]:
                add("open", p - 0.45, 0.9, y, f"token {p} {toks[p]!r} waits in the open block ({len(L['pending'])}/{m})")
            label += f" ({len(L['pending'])}/{m})"
            if not L["pending"]:
                notes.append((t + 1.5, y, f"empty: a block of {m} closed at token {t}"))
        elif row == "entries":
            read = set(L["visible"]["compressed"])
            for s, (lo, hi) in enumerate(L["entries"]):
                part = "read" if s in read else "stored"
                add(part, m * s - 0.45, m - 0.1, y,
                    f"entry {s}: pools tokens {lo}–{hi} ({hi - lo + 1}); closed at token {m * (s + 1) - 1}, "
                    f"visible from then on; {'read by' if s in read else 'not read by'} token {t}")
            n, nv = len(L["entries"]), L["n_visible"]
            label += f" (⌊{t + 1}/{m}⌋ = {nv} visible, {len(read)} read)"
            if n:
                lo, hi = L["entries"][-1]
                span_x += [lo - 0.5, hi + 0.5, None]
                span_y += [y - 0.45, y - 0.45, None]
            if L["new_entry"]:
                s = n - 1
                add("new", m * s - 0.45, m - 0.1, y, f"entry {s} closed at token {t}: ⌊{t + 1}/{m}⌋ = {n}, visible now")
            if not n:
                notes.append((0, y, f"no entry yet: the first closes at token {m - 1} (⌊(t+1)/{m}⌋ = 0)"))
        else:                                          # indexer keys
            for s in range(L["index_keys"]):
                add("keys", m * s - 0.45, m - 0.1, y, f"indexer key {s} (FP4), scored against token {t}'s query")
            label += f" ({L['index_keys']}, all scored)"
            if not L["index_keys"]:
                notes.append((0, y, f"no key yet: one per closed block of {m}"))
        ticks.append((y, label))

    names = {"ring": "ring slot: raw KV (always read)", "open": "open block: pending, not readable yet",
             "stored": "entry stored, not read by this token", "read": "entry read (CSA top-k / HCA all)",
             "keys": "indexer key (FP4)", "new": "entry closed at this token (visible now)"}
    traces = []
    for part in ("ring", "open", "stored", "read", "keys"):
        x0, w, ys, hv = parts[part]
        traces.append(_bars(x0, w, ys, names[part], PART_COLORS[part], hv))
    x0, w, ys, hv = parts["new"]
    traces.append(_bars(x0, w, ys, names["new"], "rgba(0,0,0,0)", hv,
                        marker=dict(line=dict(color=PART_COLORS["new"], width=3))))
    traces.append(dict(type="scatter", mode="lines+markers", x=span_x, y=span_y, name="span the newest entry pools",
                       line=dict(color=PART_COLORS["span"], width=2), marker=dict(symbol="line-ns-open", size=8),
                       hoverinfo="skip", xaxis="x", yaxis="y"))
    traces.append(dict(type="scatter", mode="lines", x=[t, t], y=[-0.6, len(rows) - 0.4], name="the query (token t)",
                       line=dict(color=PART_COLORS["query"], dash="dot", width=1), hoverinfo="skip", xaxis="x", yaxis="y"))
    base = T.cache_baselines(run.cfg, t + 1)
    assert base["v4"] == rec["cache_bytes"]                   # the trace's own count (tests check it per step)
    labels = {"v4": "V4 cache (this model)", "v3.2_mla": f"V3.2 MLA cache, {run.n_layers} layers",
              "gqa8": f"BF16 GQA-8, {run.n_layers} layers"}
    keys = ["gqa8", "v3.2_mla", "v4"]
    traces.append(dict(type="bar", orientation="h", x=[base[k] for k in keys], y=[labels[k] for k in keys],
                       marker=dict(color=[BASELINE_COLORS[k] for k in keys]), showlegend=False,
                       text=[f"{_human(base[k])} ({100 * base[k] / base['v3.2_mla']:.3g}% of V3.2)" for k in keys],
                       textposition="outside", cliponaxis=False, hoverinfo="text", xaxis="x2", yaxis="y2"))
    xmax = max(40, t + 3)
    reads = " + ".join(f"{KIND_NAMES[rec['layers'][i]['kind']]} L{i}: {len(rec['layers'][i]['visible']['window'])} raw"
                       + (f" + {len(rec['layers'][i]['visible']['compressed'])} entries" if rec['layers'][i]['ratio'] else "")
                       for i in run.layers)
    title = (f"token t = {t} {toks[t]!r} · cache {_human(rec['cache_bytes'])} after {t + 1} tokens"
             f"<br><sup>reads (+ sink): {reads}</sup>")
    layout = {"title": {"text": title, "font": {"size": 13}},
              "xaxis": {**DECODE_LAYOUT["xaxis"], "range": [-1, xmax]},
              "yaxis": {**DECODE_LAYOUT["yaxis"], "tickvals": [y for y, _ in ticks],
                        "ticktext": [lab for _, lab in ticks], "range": [-0.7, len(rows) - 0.3]},
              "annotations": [dict(x=x, y=y, xref="x", yref="y", text=txt, showarrow=False, xanchor="left",
                                   font=dict(size=10, color="#555555")) for x, y, txt in notes]}
    return {"traces": traces, "layout": layout}


DECODE_LAYOUT = dict(
    height=720, barmode="overlay", margin=dict(l=300, r=30, t=80, b=120),
    legend=dict(orientation="h", yanchor="top", y=-0.1, xanchor="left", x=0),
    xaxis=dict(domain=[0, 1], title="token position", anchor="y", zeroline=False),
    yaxis=dict(domain=[0.3, 1], anchor="x", zeroline=False, showgrid=False),
    xaxis2=dict(domain=[0, 0.8], type="log", title="cache bytes so far (released formats; log scale)", anchor="y2",
                dtick=1, tickformat=".2s"),
    yaxis2=dict(domain=[0, 0.18], anchor="x2"),
)


def build_decode(text: str = DEFAULT_TEXT, token: int = DEFAULT_TOKEN) -> go.Figure:
    """Static figure of :func:`decode_data` (token clamped to the text's length)."""
    run = run_text(text)
    return figure_from(decode_data(run, min(token, run.n_tokens - 1)), DECODE_LAYOUT)


@register
class DecodeWidget(Widget):
    """Text and token (slider + ▶ play) → each layer kind's cache after that token and what it reads.

    A new text runs the trace once (seconds at most, with a progress bar); the token slider re-slices it."""

    name = "decode.steps"
    defaults = {"text": DEFAULT_TEXT, "token": DEFAULT_TOKEN}

    def __init__(self, static: bool | None = None, **state: Any):
        from v4lab.viz.common import static_mode
        live = not (static_mode() if static is None else static)
        run = run_text(state.get("text", DEFAULT_TEXT), progress=live)
        state.setdefault("token", min(DEFAULT_TOKEN, run.n_tokens - 1))     # a short text: its last token
        super().__init__(static, **state)

    @property
    def run(self) -> Run:
        return run_text(self.state["text"])

    def validate(self, state: dict) -> None:
        if not isinstance(state["text"], str) or not state["text"].strip():
            raise ValueError(f"text = {state['text']!r}: must be a non-empty string")
        S = run_text(state["text"]).n_tokens
        tok = state["token"]
        if isinstance(tok, bool) or not isinstance(tok, int) or not 0 <= tok < S:
            raise ValueError(f"token = {tok!r}: must be an integer in [0, {S - 1}] (the text has {S} tokens)")

    def data(self) -> dict:
        return decode_data(self.run, self.state["token"])

    def layout(self) -> dict:
        return DECODE_LAYOUT

    def make_controls(self) -> dict:
        import ipywidgets as W
        S = self.run.n_tokens
        return {"text": W.Dropdown(options=[(k, v) for k, v in trained.SAMPLE_TEXTS.items()], value=self.state["text"]
                                   if self.state["text"] in trained.SAMPLE_TEXTS.values() else None, description="text"),
                "token": W.IntSlider(min=0, max=S - 1, value=self.state["token"], description="token t",
                                     continuous_update=True)}

    def box(self) -> Any:
        """Controls with a ▶ play button driving the token slider (linked in the browser), then the figure."""
        import ipywidgets as W
        play = W.Play(min=0, max=self.controls["token"].max, value=self.state["token"], interval=250,
                      description="play")
        W.jslink((play, "value"), (self.controls["token"], "value"))
        W.jslink((self.controls["token"], "max"), (play, "max"))
        self.controls["play"] = play
        return W.VBox([W.HBox([self.controls["text"], play, self.controls["token"]],
                              layout=W.Layout(flex_flow="row wrap")), self.fig])

    def sweep_values(self, control: str) -> list:
        S = self.run.n_tokens
        m = [r["ratio"] for r in self.run.records[0]["layers"] if r["kind"] == "csa"] or [4]
        special = {0, 1, m[0] - 1, m[0], 2 * m[0], 127, 128, 129, S - 1}
        return {"text": list(trained.SAMPLE_TEXTS.values()),
                "token": sorted({t for t in special | set(range(0, S, max(1, S // 40))) if 0 <= t < S})}[control]

    def on_text(self, value: str) -> None:
        S = run_text(value).n_tokens
        self.set(text=value, token=min(self.state["token"], S - 1))
        if "token" in self.controls:
            self.controls["token"].max = S - 1

    def on_token(self, value: int) -> None:
        self.set(token=int(value))
