"""Notebook 07: the whole trained tiny V4 — text generation, routing, attention maps, MTP.

Everything runs the notebook model (:func:`v4lab.viz.trained.trained_model`: the trained checkpoint in
``data/``, else a synthetic stand-in that says so). Three widgets on the pattern of :mod:`v4lab.viz.common`:

* :class:`RoutingWidget` — the reader's text → the first-choice expert of every token in every MoE layer
  (heatmap layer × token; hash layers marked), and for the token under the ``position`` slider the routing
  weight of each expert per layer. The routes come from :func:`v4lab.viz.moe.route_text` (one forward per
  text, cached); the slider only re-slices them.
* :class:`AttentionMapWidget` — one attention map per layer kind (the first window, CSA and HCA layer):
  query × key position, from ``Attention.last_inspect`` via :func:`v4lab.viz.attention.run_text`. A
  compressed entry's probability is spread evenly over the m tokens of its own block (so a row sums to
  1 − sink); the sink is not drawn. ``head`` picks a head (or their mean), ``query`` reads one row of all
  three maps.
* :class:`MTPWidget` — at a position t: the main head's top-5 for token t+1 and the MTP module's top-5 for
  token t+2 (``model(ids, return_mtp=True)``; ``mtp_logits[:, t]`` predicts token t+2).
"""
from __future__ import annotations

import math

import torch

from v4lab.gate import route_weights
from v4lab.viz import attention as attn_viz
from v4lab.viz import moe as moe_viz
from v4lab.viz import trained
from v4lab.viz.attention import check_range_int
from v4lab.viz.common import TextCache, Widget, categorical_colorscale, check_choice, figure_from, register

DEFAULT_TEXT = trained.SAMPLE_TEXTS["for-loop"]
MAP_TOKENS = 160             # attention maps: the first 160 tokens (HCA's first entry, tokens 0..127, shows)
TOP = 5
KINDS = ("window", "csa", "hca")
KIND_LABELS = {"window": "sliding window", "csa": "CSA (m = 4, top-k)", "hca": "HCA (m = 128, all)"}


# ------------------------------------------------------------------------------------ generation
@torch.no_grad()
def generate_text(prompt: str, max_new_tokens: int = 40, temperature: float = 0.0, top_k: int | None = None,
                  seed: int = 0, model=None, tok=None) -> str:
    """``model.generate`` on the tokenized prompt; returns the prompt plus the continuation as text."""
    if model is None:
        model, tok, _ = trained.trained_model()
    ids = trained.encode(tok, prompt)
    out = model.generate(ids, max_new_tokens, temperature=temperature, top_k=top_k, seed=seed)
    return tok.decode(out[0].tolist(), skip_special_tokens=False)


def model_summary(model=None) -> str:
    """Plain text: the config's shape (layer kinds, routers, experts, mHC, MTP) and parameter count."""
    if model is None:
        model, _, _ = trained.trained_model()
    c = model.cfg
    lines = [f"config {c.name!r}: d = {c.hidden_size}, vocab {c.vocab_size}, {c.num_hidden_layers} layers + "
             f"{c.num_nextn_predict_layers} MTP block, {c.n_routed_experts} routed experts (top-{c.num_experts_per_tok}) "
             f"+ {c.n_shared_experts} shared, mHC with {c.hc_mult} streams, window {c.sliding_window}",
             f"parameters: {sum(p.numel() for p in model.parameters()):,}"]
    for i in range(c.num_hidden_layers + c.num_nextn_predict_layers):
        kind = c.layer_kind(i)
        m = c.compress_ratio(i)
        router = "hash" if i < c.num_hidden_layers and c.is_hash_layer(i) else "learned"
        lines.append(f"  {'MTP  ' if i == c.num_hidden_layers else f'layer {i}'}: {kind:<6}"
                     f"{f' (m = {m})' if m else '':<10} router: {router}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ routing
def _layer_label(r: dict) -> str:
    return f"layer {r['layer']} ({'hash' if r['hash'] else 'learned'})"


@torch.no_grad()
def routing_weights(r: dict) -> torch.Tensor:
    """[T, E] the routing weight of each expert for each token of one layer (0 = not chosen):
    ``v4lab.gate.route_weights`` at the chosen ids, renormalised over the top-k, without route_scale."""
    w = route_weights(r["scores"], r["idx"], 1.0)
    return torch.zeros_like(r["scores"]).scatter_(-1, r["idx"], w)


def routing_data(routes: dict, position: int) -> dict:
    """Traces (fixed count 3): first-choice expert per layer × token (heatmap), the cursor column, and the
    routing weights of the token at ``position`` per layer × expert (heatmap)."""
    toks = routes["tokens"]
    T, layers = len(toks), routes["layers"]
    check_range_int("position", position, 0, T - 1)
    E = layers[0]["scores"].shape[-1]
    ylab = [_layer_label(r) for r in layers]
    first = [r["idx"][:, 0].tolist() for r in layers]
    w = _weights(id(routes), routes)
    traces = [
        # expert ids are categories: one qualitative colour each, not a rainbow where 6 and 7 look alike
        dict(type="heatmap", z=first, x=list(range(T)), y=ylab, zmin=-0.5, zmax=E - 0.5,
             colorscale=categorical_colorscale(E), meta={"categorical": True},
             colorbar=dict(title="expert", x=0.64, len=0.9, tickvals=list(range(E))), customdata=[toks] * len(layers),
             hovertemplate="%{y}, token %{x} %{customdata}: expert %{z}<extra></extra>", xaxis="x", yaxis="y"),
        dict(type="scatter", mode="markers", x=[position] * len(layers), y=ylab, name="token",
             marker=dict(symbol="square-open", size=14, color="black", line=dict(width=2)), showlegend=False,
             hoverinfo="skip", xaxis="x", yaxis="y"),
        dict(type="heatmap", z=[row[position] for row in w], x=list(range(E)), y=ylab, zmin=0, zmax=1,
             colorscale="Blues", showscale=False, texttemplate="%{z:.2f}",
             hovertemplate="%{y}: expert %{x} weight %{z:.3f}<extra></extra>", xaxis="x2", yaxis="y2"),
    ]
    chosen = "; ".join(f"L{r['layer']}→{sorted(r['idx'][position].tolist())}" for r in layers)
    title = f"token {position} {toks[position]!r}: experts {chosen}"
    # a readable window of the text around the cursor, every token written under its column (pan for more)
    lo = max(0, min(position - ROUTE_WINDOW // 2, T - ROUTE_WINDOW))
    xaxis = {"range": [lo - 0.5, min(T, lo + ROUTE_WINDOW) - 0.5]}
    return {"traces": traces, "layout": {"title": {"text": title, "font": {"size": 13}}, "xaxis": xaxis}}


ROUTE_WINDOW = 48          # tokens shown at once in the routing map (its x axis pans)


def _tick(tok: str) -> str:
    t = tok.replace("\n", "↵").replace(" ", "·")
    return t if len(t) <= 6 else t[:5] + "…"


_W: dict = {}


def _weights(key, routes) -> list:
    """Per layer, [T][E] routing weights as nested lists (cached per routes object)."""
    if key not in _W or _W[key][0] is not routes:
        _W[key] = (routes, [[[round(v, 4) for v in row] for row in routing_weights(r).tolist()]
                            for r in routes["layers"]])
    return _W[key][1]


def routing_layout(routes: dict) -> dict:
    toks = routes["tokens"]
    return dict(height=230 + 45 * len(routes["layers"]), margin=dict(l=130, r=20, t=60, b=110),
                xaxis=dict(domain=[0, 0.6], title="token (a window of the text: drag to pan)",
                           tickvals=list(range(len(toks))), ticktext=[_tick(t) for t in toks], tickangle=-90,
                           tickfont=dict(size=10)),
                yaxis=dict(autorange="reversed"),
                xaxis2=dict(domain=[0.72, 1], title="expert (weight for this token)", anchor="y2", dtick=1),
                yaxis2=dict(autorange="reversed", anchor="x2", showticklabels=False))


def build_routing(text: str = DEFAULT_TEXT, position: int = 0):
    routes = moe_viz.route_text(text)
    return figure_from(routing_data(routes, position), routing_layout(routes))


@register
class RoutingWidget(Widget):
    """Text box and token position → routing heatmap of every layer and the experts of that token.

    A new text runs the model once (not a slider-speed callback; the sample texts are routed at
    construction); the position only re-slices."""

    name = "tiny.routing"
    defaults = {"text": DEFAULT_TEXT, "position": 8}

    def __init__(self, static=None, **state):
        # the sample texts (the sweep values) are routed now; a new text typed by the reader costs one
        # forward of the model (~0.1 s for the trained tiny V4 on 256 tokens), once per text
        for t in [state.get("text", DEFAULT_TEXT)] + list(trained.SAMPLE_TEXTS.values()):
            moe_viz.route_text(t)
        super().__init__(static, **state)

    @property
    def routes(self) -> dict:
        return moe_viz.route_text(self.state["text"])

    def validate(self, state):
        if not isinstance(state["text"], str) or not state["text"].strip():
            raise ValueError(f"text = {state['text']!r}: must be a non-empty string")
        T = len(moe_viz.route_text(state["text"])["tokens"])
        check_range_int("position", state["position"], 0, T - 1)

    def data(self):
        return routing_data(self.routes, self.state["position"])

    def layout(self):
        return routing_layout(self.routes)

    def make_controls(self):
        import ipywidgets as W
        return {"text": W.Textarea(value=self.state["text"], description="your text", continuous_update=False,
                                   layout=W.Layout(width="98%", height="60px")),
                "position": W.IntSlider(min=0, max=len(self.routes["tokens"]) - 1, value=self.state["position"],
                                        description="token")}

    def sweep_values(self, control):
        T = len(self.routes["tokens"])
        return {"text": list(trained.SAMPLE_TEXTS.values()), "position": list(range(T))}[control]

    def on_text(self, value):
        T = len(moe_viz.route_text(value)["tokens"])
        self.set(text=value, position=min(self.state["position"], T - 1))
        if "position" in self.controls:
            self.controls["position"].max = T - 1

    def on_position(self, value):
        self.set(position=int(value))


# ------------------------------------------------------------------------------------ attention maps
@torch.no_grad()
def dense_map(run, layer: int, n_tokens: int | None = None) -> torch.Tensor:
    """[H, S, S] attention probability of query t (row) on key token p (column) in one layer, from the
    inspection record: window probabilities at their positions, each compressed entry's probability spread
    evenly over the m tokens of its own block. Rows sum to 1 − sink (up to entries past ``n_tokens``)."""
    rec, kind, m = run.layers[layer], run.kinds[layer], run.ratios[layer]
    S = run.n_tokens if n_tokens is None else min(n_tokens, run.n_tokens)
    H = rec["probs_window"].shape[1]
    M = torch.zeros(H, S, S + max(m, 1))                      # spare columns take a block's spill-over
    wpos = rec["window_positions"][:S]                        # [S, w]
    pw = rec["probs_window"][:S].float().permute(1, 0, 2)     # [H, S, w]
    M.scatter_add_(2, wpos.clamp(min=0).long()[None].expand(H, -1, -1), pw * (wpos >= 0)[None])
    if kind != "window":
        cidx = rec["compressed_idx"][:S]                      # [S, Kc] entry ids, −1 = none
        pc = rec["probs_compressed"][:S].float().permute(1, 0, 2) / m
        for j in range(m):                                     # token m·s + j of entry s's own block
            cols = (cidx.clamp(min=0) * m + j).long()
            M.scatter_add_(2, cols[None].expand(H, -1, -1), pc * (cidx >= 0)[None])
    return M[:, :, :S]


class Maps:
    """The three attention maps (first layer of each kind) of one text, per head and head-averaged."""

    def __init__(self, text: str = DEFAULT_TEXT, n_tokens: int = MAP_TOKENS):
        run = attn_viz.run_text(text)
        self.text, self.tokens = text, run.tokens[:n_tokens]
        self.S = min(n_tokens, run.n_tokens)
        self.key_x = list(range(self.S))
        self.n_heads = run.n_heads
        self.layer = {k: next((i for i, kk in enumerate(run.kinds) if kk == k), None) for k in KINDS}
        self.hca_ratio = run.ratios[self.layer["hca"]] if self.layer["hca"] is not None else 128
        self.z, self.rows, self.sink = {}, {}, {}
        for k, l in self.layer.items():
            if l is None:
                continue
            M = dense_map(run, l, self.S)                                        # [H, S, S]
            sink = run.layers[l]["sink"][:self.S].float()                      # [S, H]
            for h in list(range(self.n_heads)) + ["mean"]:
                mh = M.mean(0) if h == "mean" else M[h]
                self.rows[k, h] = mh
                # log10 p: the faint mass spread over compressed blocks (HCA's 128 tokens) stays visible;
                # keys the query cannot see (p = 0) stay blank
                self.z[k, h] = [[round(math.log10(v), 3) if v > 0 else None for v in row] for row in mh.tolist()]
                self.sink[k, h] = (sink.mean(-1) if h == "mean" else sink[:, h]).tolist()


_MAPS = TextCache()


def maps(text: str = DEFAULT_TEXT) -> Maps:
    return _MAPS.get(trained.trained_model()[0], text, lambda: Maps(text))


def head_options(mp: Maps) -> list:
    return ["mean"] + list(range(mp.n_heads))


def attention_map_data(mp: Maps, head="mean", query: int = 0) -> dict:
    """Traces (fixed count 3·(heads+1) + 6): per kind one map per head option (only the chosen head's is
    visible, so switching heads sends no matrix), the chosen query's row of each kind (line plot), and
    the query's marker line on each map."""
    check_choice("head", head, head_options(mp))
    check_range_int("query", query, 0, mp.S - 1)
    traces, rows = [], []
    for i, k in enumerate(KINDS):
        ax = "" if i == 0 else str(i + 1)
        have = mp.layer[k] is not None
        for h in head_options(mp):
            # every head's map of the last panel carries the same bar: switching heads keeps it and the sizes
            traces.append(dict(type="heatmap", z=mp.z[k, h] if have else [], colorscale="Viridis", zmin=-4,
                               zmax=0, showscale=i == 2, colorbar=MAP_COLORBAR, visible=h == head,
                               name=f"{k} head {h}",
                               hovertemplate="query %{y} → key %{x}: log10 p = %{z:.2f}<extra>" + k + "</extra>",
                               xaxis=f"x{ax}", yaxis=f"y{ax}"))
    for i, k in enumerate(KINDS):
        have = mp.layer[k] is not None
        # x stays the same for every query (keys after the query padded with None): only y is sent
        row = [round(v, 4) for v in mp.rows[k, head][query, :query + 1].tolist()] if have else []
        rows.append(row)
        traces.append(dict(type="scatter", mode="lines", x=mp.key_x if have else [],
                           y=row + [None] * (mp.S - len(row)) if have else [],
                           name=f"{KIND_LABELS[k]} (layer {mp.layer[k]})" if have else f"{k}: no such layer",
                           line=dict(width=1.5), xaxis="x4", yaxis="y4"))
    for i, k in enumerate(KINDS):           # the query's row on each map (traces: a layout shape costs ~10×)
        ax = "" if i == 0 else str(i + 1)
        traces.append(dict(type="scatter", mode="lines", x=[-0.5, mp.S - 0.5], y=[query, query], showlegend=False,
                           hoverinfo="skip", line=dict(color="white", width=1, dash="dot"), xaxis=f"x{ax}", yaxis=f"y{ax}"))
    sinks = ", ".join(f"{k} {mp.sink[k, head][query]:.2f}" for k in KINDS if mp.layer[k] is not None)
    m = mp.hca_ratio                                    # the HCA layer's ratio (128 as released)
    n_hca = (query + 1) // m
    hca = (f"HCA: {n_hca} compressed entr{'y' if n_hca == 1 else 'ies'} complete" if n_hca else
           f"HCA: no compressed entry until query {m - 1} ({m - 1 - query} to go)")
    title = (f"query {query} {mp.tokens[query]!r}, head {head}: attention over key tokens "
             f"(sink mass: {sinks})<br>{hca}")
    return {"traces": traces, "layout": {"title": {"text": title, "font": {"size": 13}}}}


MAP_COLORBAR = dict(title="p", len=0.5, y=0.75, tickvals=[-4, -3, -2, -1, 0],
                    ticktext=["0.0001", "0.001", "0.01", "0.1", "1"])


def attention_map_layout(mp: Maps) -> dict:
    lay = dict(height=740, margin=dict(l=60, r=20, t=90, b=50),
               legend=dict(orientation="h", yanchor="top", y=0.36, xanchor="left", x=0))
    for i, k in enumerate(KINDS):
        ax = "" if i == 0 else str(i + 1)
        lay[f"xaxis{ax}"] = dict(domain=[i * 0.34, i * 0.34 + 0.3], anchor=f"y{ax}",
                                 title=f"{KIND_LABELS[k]}: layer {mp.layer[k]}" if mp.layer[k] is not None else k)
        lay[f"yaxis{ax}"] = dict(domain=[0.5, 1], anchor=f"x{ax}", autorange="reversed",
                                 title="query" if i == 0 else None)
    lay["xaxis4"] = dict(domain=[0, 1], anchor="y4", title="key token position", range=[-0.5, mp.S - 0.5])
    lay["yaxis4"] = dict(domain=[0, 0.3], anchor="x4", title="p (this query)")
    return lay


def build_attention_maps(text: str = DEFAULT_TEXT, head="mean", query: int | None = None):
    mp = maps(text)
    return figure_from(attention_map_data(mp, head, mp.S - 1 if query is None else query), attention_map_layout(mp))


@register
class AttentionMapWidget(Widget):
    """Head (or the mean over heads) and a query position → the three maps and that query's rows."""

    name = "tiny.attention_maps"
    defaults = {"head": "mean", "query": -1}

    def __init__(self, static=None, text: str = DEFAULT_TEXT, **state):
        self.maps = maps(text)
        super().__init__(static, **state)

    def validate(self, state):
        if state["query"] == -1:
            state["query"] = self.maps.S - 1
        check_choice("head", state["head"], head_options(self.maps))
        check_range_int("query", state["query"], 0, self.maps.S - 1)

    def data(self):
        return attention_map_data(self.maps, **self.state)

    def layout(self):
        return attention_map_layout(self.maps)

    def make_controls(self):
        import ipywidgets as W
        return {"head": W.ToggleButtons(options=[(str(h), h) for h in head_options(self.maps)],
                                        value=self.state["head"], description="head"),
                "query": W.IntSlider(min=0, max=self.maps.S - 1, value=self.state["query"], description="query")}

    def sweep_values(self, control):
        return {"head": head_options(self.maps), "query": list(range(self.maps.S))}[control]

    def on_head(self, value):
        self.set(head=value)

    def on_query(self, value):
        self.set(query=int(value))


# ------------------------------------------------------------------------------------ MTP
class MTPRun:
    """One text through the model with ``return_mtp=True``: the main head's and the MTP module's top-5 per
    position, and the accuracy of each against the text."""

    @torch.no_grad()
    def __init__(self, text: str = DEFAULT_TEXT, model=None, tok=None):
        if model is None:
            model, tok, _ = trained.trained_model()
        ids = trained.encode(tok, text, moe_viz.MAX_TOKENS)
        logits, mtp = (t.cpu() for t in model(ids, return_mtp=True))    # [1, S, V], [1, S-1, V]
        self.ids = ids[0].tolist()
        self.tokens = trained.token_strings(tok, ids)
        S = len(self.ids)
        pm, pt = logits[0, :S - 2].float().softmax(-1), mtp[0, :S - 2].float().softmax(-1)   # positions 0..S-3
        self.main_p, self.main_i = [x.tolist() for x in pm.topk(TOP, -1)]
        self.mtp_p, self.mtp_i = [x.tolist() for x in pt.topk(TOP, -1)]
        self.tok_str = {i: trained.token_strings(tok, [i])[0] for i in set(sum(self.main_i + self.mtp_i, []))}
        nxt, nxt2 = torch.tensor(self.ids[1:S - 1]), torch.tensor(self.ids[2:S])
        self.main_acc = float((pm.argmax(-1) == nxt).float().mean())
        self.mtp_acc = float((pt.argmax(-1) == nxt2).float().mean())
        self.n = S - 2                                              # positions with both targets

    def summary(self) -> str:
        return (f"{self.n} positions: main head top-1 accuracy for token t+1 = {self.main_acc:.1%}, "
                f"MTP top-1 accuracy for token t+2 = {self.mtp_acc:.1%}")


_MTP = TextCache()


def mtp_run(text: str = DEFAULT_TEXT) -> MTPRun:
    return _MTP.get(trained.trained_model()[0], text, lambda: MTPRun(text))


def mtp_data(run: MTPRun, position: int) -> dict:
    """Traces (fixed count 2): the main head's top-5 for token t+1 and the MTP's top-5 for token t+2
    (the true token in green when it is among them)."""
    check_range_int("position", position, 0, run.n - 1)
    t = position
    out = []
    for i, (probs, ids, target, xa, name) in enumerate((
            (run.main_p[t], run.main_i[t], run.ids[t + 1], "x", "main head → token t+1"),
            (run.mtp_p[t], run.mtp_i[t], run.ids[t + 2], "x2", "MTP → token t+2"))):
        labels = [f"{k + 1}. {run.tok_str[j]!r}" for k, j in enumerate(ids)]
        out.append(dict(type="bar", x=labels, y=[round(p, 4) for p in probs], name=name,
                        marker=dict(color=["#2ca02c" if j == target else ("#1f77b4" if i == 0 else "#ff7f0e")
                                           for j in ids]),
                        text=[f"{p:.2f}" for p in probs], textposition="outside", xaxis=xa, yaxis="y" if i == 0 else "y2"))
    ctx = "".join(run.tokens[max(0, t - 12):t + 1])
    title = (f"…{ctx} | next: {run.tokens[t + 1]!r}, then {run.tokens[t + 2]!r} "
             f"(green = the true token)")
    return {"traces": out, "layout": {"title": {"text": title, "font": {"size": 13}}}}


MTP_LAYOUT = dict(height=380, showlegend=False,
                  xaxis=dict(domain=[0, 0.46], title="main head: top-5 for token t+1"),
                  yaxis=dict(range=[0, 1.1], title="probability"),
                  xaxis2=dict(domain=[0.54, 1], title="MTP module: top-5 for token t+2", anchor="y2"),
                  yaxis2=dict(range=[0, 1.1], anchor="x2"))


def build_mtp(text: str = DEFAULT_TEXT, position: int = 8):
    return figure_from(mtp_data(mtp_run(text), position), MTP_LAYOUT)


@register
class MTPWidget(Widget):
    """A position slider → what the main head and the MTP module predict there."""

    name = "tiny.mtp"
    defaults = {"position": 8}

    def __init__(self, static=None, text: str = DEFAULT_TEXT, **state):
        self.run = mtp_run(text)
        super().__init__(static, **state)

    def validate(self, state):
        check_range_int("position", state["position"], 0, self.run.n - 1)

    def data(self):
        return mtp_data(self.run, **self.state)

    def layout(self):
        return MTP_LAYOUT

    def make_controls(self):
        import ipywidgets as W
        return {"position": W.IntSlider(min=0, max=self.run.n - 1, value=self.state["position"],
                                        description="position t")}

    def sweep_values(self, control):
        return {"position": list(range(self.run.n))}[control]

    def on_position(self, value):
        self.set(position=int(value))
