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
# two samples, so that every shipped tokenizer gives > 150 tokens (the notebook walks token 150 and shows 129):
# tiny-v4's BPE makes 446 tokens of them, lab-v4's larger one 252 (the for-loop sample alone: 243 and 125)
DEFAULT_TEXT = trained.SAMPLE_TEXTS["for-loop"] + "\n\n" + trained.SAMPLE_TEXTS["code"]
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
    t, rec = token, run.records[token]
    rows = row_layout(run)
    cache = _CacheRows(run, t)
    for j, (i, row) in enumerate(rows):
        cache.row(i, row, len(rows) - 1 - j)
    traces = cache.traces(len(rows))
    base = T.cache_baselines(run.cfg, t + 1)
    assert base["v4"] == rec["cache_bytes"]                   # the trace's own count (tests check it per step)
    traces.append(_baseline_bars(run, base))
    return {"traces": traces, "layout": _decode_layout(run, t, cache, len(rows))}


class _CacheRows:
    """The cache panel of token t, one row at a time: bars per part (x0, width, y, hover), the span the
    newest entry pools, notes for empty rows and the row labels."""

    NAMES = {"ring": "ring slot: raw KV (always read)", "open": "open block: pending, not readable yet",
             "stored": "entry stored, not read by this token", "read": "entry read (CSA top-k / HCA all)",
             "keys": "indexer key (FP4)", "new": "entry closed at this token (visible now)"}

    def __init__(self, run: Run, t: int):
        self.t, self.rec, self.toks = t, run.records[t], run.tokens
        self.parts = {k: ([], [], [], []) for k in self.NAMES}
        self.span_x, self.span_y, self.notes, self.ticks = [], [], [], []

    def add(self, part: str, x0: float, w: float, y: float, hover: str) -> None:
        for lst, v in zip(self.parts[part], (x0, w, y, hover)):
            lst.append(v)

    def row(self, i: int, row: str, y: int) -> None:
        L = self.rec["layers"][i]
        label = f"{KIND_NAMES[L['kind']]} L{i} · {row}"
        draw = {"ring": self._ring, "open block": self._open, "entries": self._entries}.get(row, self._keys)
        self.ticks.append((y, label + draw(L, y)))

    def _ring(self, L: dict, y: int) -> str:
        for s, p in enumerate(L["window_slots"]):
            if p >= 0:
                self.add("ring", p - 0.45, 0.9, y, f"ring slot {s} holds token {p} {self.toks[p]!r} (read)")
        return f" ({sum(p >= 0 for p in L['window_slots'])}/{len(L['window_slots'])} slots)"

    def _open(self, L: dict, y: int) -> str:
        m, pending = L["ratio"], L["pending"]
        for p in pending:
            self.add("open", p - 0.45, 0.9, y,
                     f"token {p} {self.toks[p]!r} waits in the open block ({len(pending)}/{m})")
        if not pending:
            self.notes.append((self.t + 1.5, y, f"empty: a block of {m} closed at token {self.t}"))
        return f" ({len(pending)}/{m})"

    def _entries(self, L: dict, y: int) -> str:
        t, m = self.t, L["ratio"]
        read = set(L["visible"]["compressed"])
        for s, (lo, hi) in enumerate(L["entries"]):
            self.add("read" if s in read else "stored", m * s - 0.45, m - 0.1, y,
                     f"entry {s}: pools tokens {lo}–{hi} ({hi - lo + 1}); closed at token {m * (s + 1) - 1}, "
                     f"visible from then on; {'read by' if s in read else 'not read by'} token {t}")
        n = len(L["entries"])
        if n:
            lo, hi = L["entries"][-1]
            self.span_x += [lo - 0.5, hi + 0.5, None]
            self.span_y += [y - 0.45, y - 0.45, None]
        if L["new_entry"]:
            self.add("new", m * (n - 1) - 0.45, m - 0.1, y,
                     f"entry {n - 1} closed at token {t}: ⌊{t + 1}/{m}⌋ = {n}, visible now")
        if not n:
            self.notes.append((0, y, f"no entry yet: the first closes at token {m - 1} (⌊(t+1)/{m}⌋ = 0)"))
        return f" (⌊{t + 1}/{m}⌋ = {L['n_visible']} visible, {len(read)} read)"

    def _keys(self, L: dict, y: int) -> str:
        m = L["ratio"]
        for s in range(L["index_keys"]):
            self.add("keys", m * s - 0.45, m - 0.1, y, f"indexer key {s} (FP4), scored against token {self.t}'s query")
        if not L["index_keys"]:
            self.notes.append((0, y, f"no key yet: one per closed block of {m}"))
        return f" ({L['index_keys']}, all scored)"

    def traces(self, n_rows: int) -> list[dict]:
        """The 8 traces of the cache panel: 5 parts, the new entry's outline, the span, the query line."""
        out = []
        for part in ("ring", "open", "stored", "read", "keys"):
            x0, w, ys, hv = self.parts[part]
            out.append(_bars(x0, w, ys, self.NAMES[part], PART_COLORS[part], hv))
        x0, w, ys, hv = self.parts["new"]
        out.append(_bars(x0, w, ys, self.NAMES["new"], "rgba(0,0,0,0)", hv,
                         marker=dict(line=dict(color=PART_COLORS["new"], width=3))))
        out.append(dict(type="scatter", mode="lines+markers", x=self.span_x, y=self.span_y,
                        name="span the newest entry pools", line=dict(color=PART_COLORS["span"], width=2),
                        marker=dict(symbol="line-ns-open", size=8), hoverinfo="skip", xaxis="x", yaxis="y"))
        out.append(dict(type="scatter", mode="lines", x=[self.t, self.t], y=[-0.6, n_rows - 0.4],
                        name="the query (token t)", line=dict(color=PART_COLORS["query"], dash="dot", width=1),
                        hoverinfo="skip", xaxis="x", yaxis="y"))
        return out


def _baseline_bars(run: Run, base: dict) -> dict:
    """The cache of this model after t+1 tokens beside V3.2's MLA and a BF16 GQA-8 of the same depth."""
    labels = {"v4": "V4 cache (this model)", "v3.2_mla": f"V3.2 MLA cache, {run.n_layers} layers",
              "gqa8": f"BF16 GQA-8, {run.n_layers} layers"}
    keys = ["gqa8", "v3.2_mla", "v4"]
    return dict(type="bar", orientation="h", x=[base[k] for k in keys], y=[labels[k] for k in keys],
                marker=dict(color=[BASELINE_COLORS[k] for k in keys]), showlegend=False,
                text=[f"{_human(base[k])} ({100 * base[k] / base['v3.2_mla']:.3g}% of V3.2)" for k in keys],
                textposition="outside", cliponaxis=False, hoverinfo="text", xaxis="x2", yaxis="y2")


def _decode_layout(run: Run, t: int, cache: _CacheRows, n_rows: int) -> dict:
    rec, toks = run.records[t], run.tokens

    def reads(i: int) -> str:
        L = rec["layers"][i]
        return (f"{KIND_NAMES[L['kind']]} L{i}: {len(L['visible']['window'])} raw"
                + (f" + {len(L['visible']['compressed'])} entries" if L["ratio"] else ""))
    title = (f"token t = {t} {toks[t]!r} · cache {_human(rec['cache_bytes'])} after {t + 1} tokens"
             f"<br><sup>reads (+ sink): {' + '.join(reads(i) for i in run.layers)}</sup>")
    return {"title": {"text": title, "font": {"size": 13}},
            "xaxis": {**DECODE_LAYOUT["xaxis"], "range": [-1, max(40, t + 3)]},
            "yaxis": {**DECODE_LAYOUT["yaxis"], "tickvals": [y for y, _ in cache.ticks],
                      "ticktext": [lab for _, lab in cache.ticks], "range": [-0.7, n_rows - 0.3]},
            "annotations": [dict(x=x, y=y, xref="x", yref="y", text=txt, showarrow=False, xanchor="left",
                                 font=dict(size=10, color="#555555")) for x, y, txt in cache.notes]}


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
