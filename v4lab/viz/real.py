"""Figures for the optional "real weights" sections of the notebooks (MoE, attention, mHC, FP4, tiny model).

Each section starts with :func:`real_weights_status` and runs only when a download is configured
(``$V4LAB_REAL_WEIGHTS``, see ``v4lab.real``); otherwise it prints how to enable it. Paste-in cell:

    from v4lab.viz import real as vr
    print(vr.real_weights_status())
    if vr.configured():
        vr.build_mhc(layer=10).show()

Builders follow the ``x_data(...) -> {"traces", "layout"}`` / ``build_x(...) -> go.Figure`` pattern of
``v4lab.viz.common``. ``path`` defaults to ``$V4LAB_REAL_WEIGHTS``; each call reads only the tensors it
plots (a few KB to a few MB), except the streaming forward figures, which take a ``StreamResult``.
"""
from __future__ import annotations

import plotly.graph_objects as go

from v4lab import real
from v4lab.real import real_weights_status  # noqa: F401  (re-exported for notebooks)
from v4lab.viz.common import BASE_LAYOUT, figure_from


def configured(path=None) -> bool:
    """True when a usable download is configured (argument or $V4LAB_REAL_WEIGHTS)."""
    p = real.real_weights_path(path)
    if p is None:
        return False
    try:
        real.open_real(p)
    except ValueError:
        return False
    return True


def _name(path) -> str:
    return real.open_real(path).config.name


# ------------------------------------------------------------------------------------------ mHC
def mhc_data(path=None, layer: int = 0, site: str = "attn") -> dict:
    """H^res (Sinkhorn of the static bias) as a heatmap, and pre / post as bars."""
    v = real.mhc_static(path, layer, site)
    n = v["h_res"].shape[0]
    lab = [f"stream {i}" for i in range(n)]
    h = v["h_res"].tolist()
    return {"traces": [
        dict(type="heatmap", z=h, x=lab, y=lab, colorscale="Blues", zmin=0, zmax=1, xaxis="x", yaxis="y",
             text=[[f"{c:.3f}" for c in row] for row in h], texttemplate="%{text}", showscale=False,
             name="H^res"),
        dict(type="bar", x=lab, y=v["pre"].tolist(), name="pre (sigmoid + eps)", xaxis="x2", yaxis="y2"),
        dict(type="bar", x=lab, y=v["post"].tolist(), name="post (2 sigmoid)", xaxis="x2", yaxis="y2")],
        "layout": dict(title=f"{_name(path)} layer {layer} {site}: static mHC (input term = 0)",
                       xaxis=dict(domain=[0, 0.45], title="from stream i"),
                       yaxis=dict(title="to stream j", autorange="reversed"),
                       xaxis2=dict(domain=[0.55, 1]), yaxis2=dict(anchor="x2", title="coefficient"))}


def build_mhc(path=None, layer: int = 0, site: str = "attn") -> go.Figure:
    return figure_from(mhc_data(path, layer, site), BASE_LAYOUT)


def mhc_layers_data(path=None, site: str = "attn") -> dict:
    """Per layer: the mean diagonal of H^res (1 = streams kept apart, 1/n = fully mixed)."""
    cfg = real.open_real(path).config
    L = cfg.num_hidden_layers
    diag = [float(real.mhc_static(path, i, site)["h_res"].diagonal().mean()) for i in range(L)]
    return {"traces": [dict(type="scatter", mode="lines+markers", x=list(range(L)), y=diag, name="mean diag H^res")],
            "layout": dict(title=f"{cfg.name}: how much each layer's static {site} mHC keeps streams apart",
                           xaxis=dict(title="layer"), yaxis=dict(title="mean diagonal", range=[0, 1]),
                           shapes=[dict(type="line", x0=0, x1=L - 1, y0=1 / cfg.hc_mult, y1=1 / cfg.hc_mult,
                                        line=dict(dash="dot", color="#999"))])}


def build_mhc_layers(path=None, site: str = "attn") -> go.Figure:
    return figure_from(mhc_layers_data(path, site), BASE_LAYOUT)


# ------------------------------------------------------------------------------------------ attention
def sinks_data(path=None) -> dict:
    s = real.attn_sinks(path)
    return {"traces": [dict(type="heatmap", z=s.tolist(), colorscale="RdBu", zmid=0, name="attn_sink",
                            colorbar=dict(title="sink logit"))],
            "layout": dict(title=f"{_name(path)}: attention-sink logit per layer and head",
                           xaxis=dict(title="head"), yaxis=dict(title="layer"))}


def build_sinks(path=None) -> go.Figure:
    return figure_from(sinks_data(path), BASE_LAYOUT)


def ape_data(path=None, layer: int = 2, indexer: bool = False) -> dict:
    """softmax over the ratio axis of ``ape``: the pooling weights of equal scores, per channel."""
    a = real.compressor_ape(path, layer, indexer)
    w = a.softmax(0)
    return {"traces": [dict(type="heatmap", z=w.tolist(), colorscale="Viridis", name="softmax(ape)",
                            colorbar=dict(title="weight"))],
            "layout": dict(title=f"{_name(path)} layer {layer}{' indexer' if indexer else ''}: compressor "
                                 f"pooling bias (softmax of ape over the {a.shape[0]} pooled positions)",
                           xaxis=dict(title="channel"), yaxis=dict(title="position in the block"))}


def build_ape(path=None, layer: int = 2, indexer: bool = False) -> go.Figure:
    return figure_from(ape_data(path, layer, indexer), BASE_LAYOUT)


# ------------------------------------------------------------------------------------------ FP4
def fp4_data(path=None, layer: int = 3, experts=(0, 1, 2, 3)) -> dict:
    h = real.expert_fp4_histograms(path, layer, experts)
    vals = h["values"].tolist()
    codes = h["codes"].float()
    nz = (h["e8m0"] > 0).nonzero().flatten().tolist()
    lo, hi = (min(nz), max(nz)) if nz else (120, 127)
    exps = list(range(lo, hi + 1))
    return {"traces": [
        dict(type="bar", x=[f"{v:g}" + ("(-0)" if i == 8 else "") for i, v in enumerate(vals)],
             y=(codes / codes.sum()).tolist(), name="E2M1 codes", xaxis="x", yaxis="y"),
        dict(type="bar", x=[f"2^{e - 127}" for e in exps], y=[int(h["e8m0"][e]) for e in exps],
             name="E8M0 scales", xaxis="x2", yaxis="y2")],
        "layout": dict(title=f"{_name(path)} layer {layer}, experts {list(experts)}: stored FP4 codes and scales",
                       xaxis=dict(domain=[0, 0.5], title="code value"), yaxis=dict(title="fraction"),
                       xaxis2=dict(domain=[0.58, 1], title="block scale"), yaxis2=dict(anchor="x2", title="blocks"))}


def build_fp4(path=None, layer: int = 3, experts=(0, 1, 2, 3)) -> go.Figure:
    return figure_from(fp4_data(path, layer, experts), BASE_LAYOUT)


# ------------------------------------------------------------------------------------------ MoE
def hash_load_data(path=None, text: str = "The quick brown fox jumps over the lazy dog.") -> dict:
    out = real.hash_load(path, text)
    return {"traces": [dict(type="bar", x=list(range(len(ld))), y=ld.tolist(), name=f"hash layer {i}")
                       for i, ld in out["load"].items()],
            "layout": dict(title=f"{_name(path)}: expert load of the hash layers on a {len(out['ids'])}-token text",
                           xaxis=dict(title="expert"), yaxis=dict(title="tokens x slots"), barmode="group")}


def build_hash_load(path=None, text: str = "The quick brown fox jumps over the lazy dog.") -> go.Figure:
    return figure_from(hash_load_data(path, text), BASE_LAYOUT)


def routing_data(result: real.StreamResult) -> dict:
    """Expert load per layer of a streaming forward (layers x experts)."""
    z = [r["load"].tolist() for r in result.routing]
    return {"traces": [dict(type="heatmap", z=z, colorscale="Greys", name="load", colorbar=dict(title="picks"))],
            "layout": dict(title=f"streaming forward: experts picked per layer ({len(result.ids)} tokens)",
                           xaxis=dict(title="expert"), yaxis=dict(title="layer"))}


def build_routing(result: real.StreamResult) -> go.Figure:
    return figure_from(routing_data(result), BASE_LAYOUT)


def indexer_data(result: real.StreamResult, layer: int) -> dict:
    """Which compressed entries the CSA indexer picked for each query (1 = picked)."""
    if layer not in result.index_selections:
        raise ValueError(f"layer = {layer!r}: not a CSA layer of this forward; "
                         f"CSA layers: {sorted(result.index_selections)}")
    sel = result.index_selections[layer]                      # [S, k], -1 = none
    n = max(1, int(sel.max()) + 1)
    grid = [[0] * n for _ in range(sel.shape[0])]
    for t, row in enumerate(sel.tolist()):
        for j in row:
            if j >= 0:
                grid[t][j] = 1
    return {"traces": [dict(type="heatmap", z=grid, colorscale="Blues", showscale=False, name="picked")],
            "layout": dict(title=f"layer {layer}: compressed entries picked by the lightning indexer",
                           xaxis=dict(title="compressed entry"), yaxis=dict(title="query position"))}


def build_indexer(result: real.StreamResult, layer: int) -> go.Figure:
    return figure_from(indexer_data(result, layer), BASE_LAYOUT)


def top_tokens_text(result: real.StreamResult, tokenizer=None, k: int = 5) -> str:
    """Plain text: per position, the prompt token and the model's top-k next tokens."""
    lines = []
    for pos, cands in enumerate(result.top_tokens(k, tokenizer)):
        cur = result.tokens[pos] if result.tokens else str(result.ids[pos])
        c = ", ".join(f"{x[2] if len(x) > 2 else x[0]!s} {x[1]:.2f}" for x in cands)
        lines.append(f"{pos:>3} {cur!s:>16} -> {c}")
    return "\n".join(lines)


NOTEBOOK_SNIPPETS = {
    "mhc": "print(vr.real_weights_status())\nif vr.configured():\n    vr.build_mhc(layer=10).show()\n"
           "    vr.build_mhc_layers().show()",
    "attention": "print(vr.real_weights_status())\nif vr.configured():\n    vr.build_sinks().show()\n"
                 "    vr.build_ape(layer=2).show()",
    "fp4": "print(vr.real_weights_status())\nif vr.configured():\n    vr.build_fp4(layer=3).show()",
    "moe": "print(vr.real_weights_status())\nif vr.configured():\n    vr.build_hash_load().show()",
    "tiny": "print(vr.real_weights_status())\nif vr.configured():\n    from v4lab import real\n"
            "    res = real.stream_forward('The capital of France is')\n    vr.build_routing(res).show()\n"
            "    print(vr.top_tokens_text(res, real.load_tokenizer()))",
}
