"""Notebook 03: hyper-connections (HC) vs manifold-constrained hyper-connections (mHC).

Two widgets on the pattern of :mod:`v4lab.viz.common`:

* :class:`SinkhornWidget` — one 4×4 residual-mixing matrix: HC uses the logits as they are (comb = I + R),
  mHC projects them with ``v4lab.mhc.sinkhorn`` (official order). Sliders: the number of Sinkhorn
  iterations and a scale on the logits; the panel on the right shows ``v4lab.mhc.sinkhorn_errors``.
* :class:`GainsWidget` — the composite gain of H_L ⋯ H_1 by depth (``v4lab.mhc.composite_gains``) from
  ``v4lab.experiments.mhc_stability``: the random surrogate (live, any noise level) or the small training
  run (at init and after training).

Every number is computed by v4lab; this module only arranges it. All matrices are shown in the official
``comb`` convention: comb[i, j] is the weight from stream i into stream j (X'_j = Σ_i comb[i, j] X_i),
so the paper's H^res is combᵀ, the *columns* of comb are H^res's rows (forward gain).
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

from v4lab import mhc
from v4lab.experiments import mhc_stability
from v4lab.viz.common import Widget, check_choice, figure_from, fmt3, register, stored_result

N = 4                                             # V4's hc_mult
HC_EPS = 1e-6                                     # V4's hc_eps
MAX_ITERS = 20                                    # V4's hc_sinkhorn_iters
ITER_STOPS = list(range(1, MAX_ITERS + 1))
SCALE_STOPS = [0.25, 0.5, 1.0, 2.0, 4.0, 8.0]     # multiplier on the logits: larger = sharper softmax
NOISE_STOPS = [0.05, 0.1, 0.15, 0.2, 0.3]         # std of R in the surrogate's H = I + R
SOURCES = {"surrogate": "random surrogate (60 sublayers)", "init": "trained run: at init",
           "final": "trained run: after training"}
VARIANTS = ("residual", "hc", "mhc")
VCOLORS = {"residual": "#7f7f7f", "hc": "#d62728", "mhc": "#1f77b4"}
VLABELS = {"residual": "residual", "hc": "HC", "mhc": "mHC"}
ERR_FLOOR = 1e-16                                 # log-axis floor for an error of exactly 0
DATA_DIR = Path(__file__).resolve().parent / "data"
TRAINING_CACHE = DATA_DIR / "mhc_training.json"


# ------------------------------------------------------------------------------------ the 4×4 matrix
@lru_cache(maxsize=1)
def base_logits(seed: int = 0) -> torch.Tensor:
    """A fixed random 4×4 logit matrix (float64); the widget multiplies it by ``logit_scale``."""
    return torch.randn(N, N, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@lru_cache(maxsize=len(SCALE_STOPS) + 4)
def sinkhorn_trace(logit_scale: float) -> dict:
    """HC's comb, mHC's comb after t = 1..20 iterations and the per-iteration errors for one logit scale."""
    logits = logit_scale * base_logits()
    combs = [mhc.sinkhorn(logits, t, HC_EPS) for t in ITER_STOPS]
    err = mhc.sinkhorn_errors(logits, MAX_ITERS, HC_EPS)
    return {"hc": torch.eye(N, dtype=torch.float64) + logits,        # mode "hc": comb = I + R
            "mhc": combs, "row_err": err["row_err"], "col_err": err["col_err"]}


def _sums(c: torch.Tensor) -> str:
    r, k = c.sum(-1), c.sum(-2)
    return f"row sums {float(r.min()):.3f}…{float(r.max()):.3f}<br>column sums {float(k.min()):.3f}…{float(k.max()):.3f}"


def _heat(c: torch.Tensor, xaxis: str, yaxis: str, name: str, zmin: float, zmax: float, bar_x: float) -> dict:
    z = c.tolist()
    return dict(type="heatmap", z=z, x=list(range(N)), y=list(range(N)), zmin=zmin, zmax=zmax,
                colorscale="RdBu", reversescale=True, name=name,
                colorbar=dict(x=bar_x, len=0.75, thickness=10, y=0.5, tickfont=dict(size=10)),
                text=[[f"{v:.2f}" for v in row] for row in z], texttemplate="%{text}",
                hovertemplate="from stream %{y} into stream %{x}: %{z:.4f}<extra>" + name + "</extra>",
                xaxis=xaxis, yaxis=yaxis)


def sinkhorn_data(iters: int = MAX_ITERS, logit_scale: float = 1.0) -> dict:
    """Traces: HC heatmap, mHC heatmap after ``iters`` iterations, row/col error curves, the current point."""
    check_choice("iters", iters, ITER_STOPS)
    check_choice("logit_scale", logit_scale, SCALE_STOPS)
    tr = sinkhorn_trace(logit_scale)
    c = tr["mhc"][iters - 1]
    hc = tr["hc"]
    lim = max(1.0, float(hc.abs().max()))
    rows = [max(e, ERR_FLOOR) for e in tr["row_err"]]
    cols = [max(e, ERR_FLOOR) for e in tr["col_err"]]
    traces = [
        _heat(hc, "x", "y", "HC", -lim, lim, 0.255),
        _heat(c, "x2", "y2", "mHC", -1.0, 1.0, 0.615),
        dict(type="scatter", mode="lines+markers", x=ITER_STOPS, y=rows, name="max |row sum − 1|",
             line=dict(color="#d62728"), xaxis="x3", yaxis="y3"),
        dict(type="scatter", mode="lines+markers", x=ITER_STOPS, y=cols, name="max |column sum − 1|",
             line=dict(color="#1f77b4"), xaxis="x3", yaxis="y3"),
        dict(type="scatter", mode="markers", x=[iters, iters], y=[rows[iters - 1], cols[iters - 1]],
             marker=dict(size=13, color=["#d62728", "#1f77b4"], symbol="circle-open", line=dict(width=3)),
             showlegend=False, name="now", xaxis="x3", yaxis="y3"),
    ]
    # one subtitle per matrix, centred over it, one fact per line (side by side they ran into each other)
    ann = [dict(text=f"HC: comb = I + R<br>{_sums(hc)}", x=0.5, xref="x domain", y=1.0, yref="y domain",
                showarrow=False, yanchor="bottom", font=dict(size=11)),
           dict(text=f"mHC after {iters} iteration{'s' if iters > 1 else ''}<br>{_sums(c)}", x=0.5,
                xref="x2 domain", y=1.0, yref="y2 domain", showarrow=False, yanchor="bottom", font=dict(size=11))]
    title = (f"logits × {logit_scale:g}: after {iters} Sinkhorn iteration{'s' if iters > 1 else ''} the rows of "
             f"comb are off by {tr['row_err'][iters - 1]:.1e}, the columns by {tr['col_err'][iters - 1]:.1e}")
    return {"traces": traces, "layout": {"title": {"text": title, "font": {"size": 13}}, "annotations": ann}}


SINKHORN_LAYOUT = dict(
    height=460, margin=dict(l=60, r=20, t=130, b=50),
    legend=dict(orientation="h", yanchor="top", y=-0.15, xanchor="right", x=1),
    xaxis=dict(domain=[0, 0.23], title="into stream j", dtick=1),
    yaxis=dict(title="from stream i", autorange="reversed", dtick=1, scaleanchor="x"),
    xaxis2=dict(domain=[0.36, 0.59], title="into stream j", dtick=1, anchor="y2"),
    yaxis2=dict(autorange="reversed", dtick=1, anchor="x2", scaleanchor="x2"),
    xaxis3=dict(domain=[0.74, 1], title="Sinkhorn iterations", anchor="y3"),
    yaxis3=dict(type="log", title="error", anchor="x3", exponentformat="power"),
)


def build_sinkhorn(iters: int = MAX_ITERS, logit_scale: float = 1.0):
    """HC's matrix, mHC's matrix after ``iters`` Sinkhorn iterations, and the errors (static figure)."""
    return figure_from(sinkhorn_data(iters, logit_scale), SINKHORN_LAYOUT)


@register
class SinkhornWidget(Widget):
    """Sliders: Sinkhorn iterations (1..20) and the logit scale, over :func:`build_sinkhorn`."""

    name = "mhc.sinkhorn"
    defaults = {"iters": MAX_ITERS, "logit_scale": 1.0}

    def __init__(self, static=None, **state):
        for s in SCALE_STOPS:                    # every projection up front: a callback only looks up
            sinkhorn_trace(s)
        super().__init__(static, **state)

    def validate(self, state):
        check_choice("iters", state["iters"], ITER_STOPS)
        check_choice("logit_scale", state["logit_scale"], SCALE_STOPS)

    def data(self):
        return sinkhorn_data(**self.state)

    def layout(self):
        return SINKHORN_LAYOUT

    def make_controls(self):
        import ipywidgets as W
        return {"iters": W.IntSlider(min=1, max=MAX_ITERS, value=self.state["iters"], description="iterations",
                                     continuous_update=True),
                "logit_scale": W.SelectionSlider(options=[(f"×{s:g}", s) for s in SCALE_STOPS],
                                                 value=self.state["logit_scale"], description="logits")}

    def sweep_values(self, control):
        return {"iters": ITER_STOPS, "logit_scale": SCALE_STOPS}[control]

    def on_iters(self, value):
        self.set(iters=int(value))

    def on_logit_scale(self, value):
        self.set(logit_scale=value)


# ------------------------------------------------------------------------------------ gains by depth
@lru_cache(maxsize=len(NOISE_STOPS) + 4)
def surrogate(noise: float = 0.15) -> dict:
    """``mhc_stability.random_surrogate`` (60 sublayers, seed 0) at one noise level, with the identity
    residual's gains added (all exactly 1) so the three variants sit side by side."""
    out = dict(mhc_stability.random_surrogate(60, 0, noise=noise))
    res = mhc.composite_gains(torch.eye(N, dtype=torch.float64).expand(60, N, N))
    res["amax"] = [max(a, b) for a, b in zip(res["fwd_max"], res["bwd_max"])]
    out["residual"] = res
    return out


def training_result(recompute: bool = False, **kwargs) -> dict:
    """The small training run of ``mhc_stability.run`` with its defaults (seed 0, 60 sublayers).

    It takes one to two minutes on 2 CPU cores, too long for a notebook cell, so its result is stored in
    ``v4lab/viz/data/mhc_training.json`` (written by ``recompute=True`` or ``python -m v4lab.viz.mhc``).
    With ``recompute=True`` (or any keyword for ``run``) it runs again and, with the defaults, refreshes the
    file. The stored ``config`` says exactly what ran; ``training_result(**result["config"])`` reruns it.
    """
    return stored_result(TRAINING_CACHE, mhc_stability.run, recompute, **kwargs)


def gains(source: str = "surrogate", noise: float = 0.15, result: dict | None = None) -> dict:
    """{variant: composite_gains dict} for the chosen source (``surrogate`` uses ``noise``)."""
    check_choice("source", source, SOURCES)
    if source == "surrogate":
        s = surrogate(noise)
        return {v: s[v] for v in VARIANTS}
    result = training_result() if result is None else result
    return {v: result[v]["gains"][source] for v in VARIANTS if v in result}


def gains_data(source: str = "surrogate", noise: float = 0.15, result: dict | None = None) -> dict:
    """Traces: per variant, forward max, backward max and min(forward min, backward min) by depth (9)."""
    check_choice("noise", noise, NOISE_STOPS)
    g = gains(source, noise, result)
    traces = []
    for v in VARIANTS:
        gv = g.get(v)
        depth = gv["depth"] if gv else []
        for key, dash, label in (("fwd_max", "solid", "forward max"), ("bwd_max", "dash", "backward max"),
                                 ("min", "dot", "min")):
            y = ([min(a, b) for a, b in zip(gv["fwd_min"], gv["bwd_min"])] if key == "min" else gv[key]) if gv else []
            # the residual's gains are exactly 1: a wide pale band, visible under mHC's lines near 1
            line = dict(color=VCOLORS[v], dash=dash, width=7) if v == "residual" else dict(color=VCOLORS[v], dash=dash)
            traces.append(dict(type="scatter", mode="lines", x=depth, y=y, name=f"{VLABELS[v]} {label}",
                               legendgroup=v, line=line, opacity=0.4 if v == "residual" else 1.0))
    peak = {v: max(max(g[v]["fwd_max"]), max(g[v]["bwd_max"])) for v in g}
    low = {v: min(min(g[v]["fwd_min"]), min(g[v]["bwd_min"])) for v in g}
    what = f"{SOURCES[source]}" + (f", H = I + {noise:g}·N(0,1)" if source == "surrogate" else "")
    title = (f"{what}: peak composite gain HC {fmt3(peak['hc'])}, mHC {fmt3(peak['mhc'])} "
             f"(mHC min {fmt3(low['mhc'])})")
    return {"traces": traces, "layout": {"title": {"text": title, "font": {"size": 13}}}}


GAINS_LAYOUT = dict(height=440, xaxis=dict(title="depth (sublayers composed)"),
                    yaxis=dict(type="log", title="composite gain of H_l ⋯ H_1", exponentformat="power"),
                    legend=dict(orientation="h", yanchor="top", y=-0.18, xanchor="left", x=0),
                    margin=dict(l=70, r=20, t=60, b=120))


def build_gains(source: str = "surrogate", noise: float = 0.15, result: dict | None = None):
    """Composite gains by depth for residual / HC / mHC (static figure)."""
    return figure_from(gains_data(source, noise, result), GAINS_LAYOUT)


@register
class GainsWidget(Widget):
    """A source dropdown (surrogate, trained at init, trained at the end) and the surrogate's noise."""

    name = "mhc.gains"
    defaults = {"source": "surrogate", "noise": 0.15}

    def __init__(self, static=None, result: dict | None = None, **state):
        self.result = training_result() if result is None else result
        for s in NOISE_STOPS:
            surrogate(s)
        super().__init__(static, **state)

    def validate(self, state):
        check_choice("source", state["source"], SOURCES)
        check_choice("noise", state["noise"], NOISE_STOPS)

    def data(self):
        return gains_data(result=self.result, **self.state)

    def layout(self):
        return GAINS_LAYOUT

    def make_controls(self):
        import ipywidgets as W
        return {"source": W.Dropdown(options=[(v, k) for k, v in SOURCES.items()], value=self.state["source"],
                                     description="source", layout=W.Layout(width="340px")),
                "noise": W.SelectionSlider(options=NOISE_STOPS, value=self.state["noise"], description="noise σ",
                                           disabled=self.state["source"] != "surrogate",
                                           tooltip="std of R in the surrogate's H = I + R (surrogate only)")}

    def sweep_values(self, control):
        return {"source": list(SOURCES), "noise": NOISE_STOPS}[control]

    def on_source(self, value):
        self.set(source=value)
        if "noise" in self.controls:             # the noise only shapes the surrogate: greyed out otherwise
            self.controls["noise"].disabled = value != "surrogate"

    def on_noise(self, value):
        self.set(noise=value)


# ------------------------------------------------------------------------------------ the training run
def build_training(result: dict | None = None):
    """Loss and total gradient norm per step for each variant of the training run (static figure)."""
    r = training_result() if result is None else result
    traces = []
    for v in VARIANTS:
        if v not in r:
            continue
        steps = list(range(1, len(r[v]["loss"]) + 1))
        traces.append(dict(type="scatter", mode="lines", x=steps, y=r[v]["loss"], name=VLABELS[v],
                           legendgroup=v, line=dict(color=VCOLORS[v])))
        traces.append(dict(type="scatter", mode="lines", x=steps, y=r[v]["grad_norm"], name=VLABELS[v],
                           legendgroup=v, showlegend=False, line=dict(color=VCOLORS[v]), xaxis="x2", yaxis="y2"))
    c = r["config"]
    layout = dict(height=380, title={"text": f"training run: {c['n_sublayers']} sublayers, d = {c['d']}, "
                                             f"{c['steps']} AdamW steps, lr {c['lr']:g}, seed {c['seed']}",
                                     "font": {"size": 13}},
                  xaxis=dict(domain=[0, 0.45], title="step"), yaxis=dict(title="loss (MSE)"),
                  xaxis2=dict(domain=[0.55, 1], title="step", anchor="y2"),
                  yaxis2=dict(type="log", title="gradient norm", anchor="x2"))
    return figure_from({"traces": traces}, layout)


def training_table(result: dict | None = None) -> str:
    """Plain text: final loss, max gradient norm and peak/min composite gains per variant."""
    r = training_result() if result is None else result
    lines = [f"{'variant':<9} {'final loss':>10} {'max |grad|':>10} {'peak gain (init)':>16} "
             f"{'peak gain (final)':>17} {'min gain (final)':>16}"]
    for v in VARIANTS:
        if v not in r:
            continue
        gi, gf = r[v]["gains"]["init"], r[v]["gains"]["final"]
        lines.append(f"{VLABELS[v]:<9} {r[v]['loss'][-1]:>10.4f} {max(r[v]['grad_norm']):>10.3g} "
                     f"{max(gi['amax']):>16.3f} {max(gf['amax']):>17.3f} "
                     f"{min(gf['fwd_min'] + gf['bwd_min']):>16.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    training_result(recompute=True)
    print(f"wrote {TRAINING_CACHE}")


# ------------------------------------------------------------------------------------ the trained model's mHC
SITES = ("attn", "ffn")
MODEL_TOKENS = 256
MODEL_TEXT_KEY = "for-loop"                      # v4lab.viz.trained.SAMPLE_TEXTS
GAIN_SERIES = {"static": ("static part: Sinkhorn(b_res)", "#2ca02c", "dash"),
               "token": ("this token's matrices", "#1f77b4", "solid"),
               "mean": ("mean over the text's tokens", "#9467bd", "dot")}


@torch.no_grad()
def model_combs(model=None, tok=None, text: str | None = None) -> dict:
    """The mHC matrices the model used on ``text`` (first MODEL_TOKENS tokens), per main layer and site, in
    the ``comb`` convention, plus each site's static part Sinkhorn(b_res): what the site mixes with when the
    input-dependent term α·(fn·v)/RMS(v) is zero.

    One forward; hooks capture every block's input streams X and its attention output o, and
    ``v4lab.mhc.hc_pre`` / ``hc_post`` recompute the sites from them exactly as ``Block.forward`` does
    (attention site on X, MoE site on X' = post·o + combᵀX). Returns {"tokens", "sites": [(layer, site)],
    "static": [n, n] per site, "combs": [T, n, n] per site, "post": [T, n] per site}."""
    from v4lab.viz import trained
    if model is None:
        model, tok, _ = trained.trained_model()
    text = trained.SAMPLE_TEXTS[MODEL_TEXT_KEY] if text is None else text
    ids = trained.encode(tok, text, MODEL_TOKENS)
    xin, attn_out = {}, {}
    hooks = []
    for b in model.layers:
        hooks.append(b.register_forward_pre_hook(lambda m, a: xin.__setitem__(m.layer_id, a[0].detach())))
        hooks.append(b.attn.register_forward_hook(lambda m, a, o, i=b.layer_id: attn_out.__setitem__(i, o.detach())))
    try:
        model.streams(ids)                # the hooks record; no head needed
    finally:
        for h in hooks:
            h.remove()
    c, n = model.cfg, model.cfg.hc_mult
    kw = dict(rms_eps=c.rms_norm_eps, hc_eps=c.hc_eps, iters=c.hc_sinkhorn_iters, mode="mhc")
    out = {"tokens": trained.token_strings(tok, ids), "sites": [], "static": [], "combs": [], "post": []}
    for b in model.layers:
        x = xin[b.layer_id]
        for site in SITES:
            fn, scale, base = (getattr(b, f"hc_{site}_{k}") for k in ("fn", "scale", "base"))
            _, post, comb = mhc.hc_pre(x, fn, scale, base, **kw)
            out["sites"].append((b.layer_id, site))
            out["static"].append(mhc.sinkhorn(base[2 * n:].double().view(n, n).cpu(), c.hc_sinkhorn_iters, c.hc_eps))
            out["combs"].append(comb[0].double().cpu())
            out["post"].append(post[0].double().cpu())
            if site == "attn":                   # the streams the MoE site reads
                x = mhc.hc_post(attn_out[b.layer_id], x, post, comb)
    out["streams_after"] = x                     # the last block's X' before its MoE sublayer (tests)
    return out


class ModelMHC:
    """What :class:`ModelMHCWidget` shows, computed once per model: the combs of the sample text and the
    composite gains of the static parts and of the token mean (``v4lab.mhc.composite_gains``)."""

    def __init__(self, combs: dict):
        self.c = combs
        self.T = len(combs["tokens"])
        self.layers = sorted({l for l, _ in combs["sites"]})
        self.static_gains = mhc.composite_gains(mhc.h_res(torch.stack(combs["static"])))
        self.mean_gains = mhc.composite_gains(torch.stack([mhc.token_mean_h_res(c) for c in combs["combs"]]))
        self.residual = [1.0] * len(combs["sites"])
        sur = mhc_stability.random_surrogate(len(combs["sites"]), 0, noise=0.15)
        self.surrogate = {v: [max(a, b) for a, b in zip(sur[v]["fwd_max"], sur[v]["bwd_max"])] for v in ("hc", "mhc")}
        self.cache: dict = {}

    def token_gains(self, position: int) -> dict:
        if position not in self.cache:
            self.cache[position] = mhc.composite_gains(mhc.h_res(torch.stack([c[position] for c in self.c["combs"]])))
        return self.cache[position]

    def site_index(self, layer: int, site: str) -> int:
        return self.c["sites"].index((layer, site))


_MODEL_MHC: dict = {}


def model_mhc(model=None, tok=None) -> ModelMHC:
    """:class:`ModelMHC` of the notebook model on the sample text (cached per model)."""
    from v4lab.viz import trained
    if model is None:
        model, tok, _ = trained.trained_model()
    if id(model) not in _MODEL_MHC:
        _MODEL_MHC[id(model)] = ModelMHC(model_combs(model, tok))
    return _MODEL_MHC[id(model)]


def _comb_heat(c: torch.Tensor, xaxis: str, yaxis: str, name: str, bar: bool) -> dict:
    z = [[round(v, 4) for v in row] for row in c.tolist()]
    return dict(type="heatmap", z=z, x=list(range(N)), y=list(range(N)), zmin=0, zmax=1, colorscale="Blues",
                showscale=bar, colorbar=dict(title="weight", x=0.78, len=0.38, y=0.95, yanchor="top", thickness=10),
                texttemplate="%{z:.2f}", textfont=dict(size=10), name=name,
                hovertemplate="from stream %{y} into stream %{x}: %{z:.4f}<extra>" + name + "</extra>",
                xaxis=xaxis, yaxis=yaxis)


def _amax(g: dict) -> list:
    return [max(a, b) for a, b in zip(g["fwd_max"], g["bwd_max"])]


def _amin(g: dict) -> list:
    return [min(a, b) for a, b in zip(g["fwd_min"], g["bwd_min"])]


def model_mhc_data(mm: ModelMHC, layer: int, site: str = "attn", position: int = 0) -> dict:
    """Traces (fixed count 10): the static comb, this token's comb at (layer, site) and the product of this
    token's combs up to that site (comb convention: from stream i at the embedding into stream j); composite gain by
    depth (max and min over streams) of the static parts, of this token's matrices and of the token mean,
    the HC and mHC random surrogates, and a marker at the chosen site."""
    check_choice("layer", layer, mm.layers)
    check_choice("site", site, SITES)
    if isinstance(position, bool) or not isinstance(position, int) or not 0 <= position < mm.T:
        raise ValueError(f"position = {position!r}: must be an integer in [0, {mm.T - 1}]")
    k = mm.site_index(layer, site)
    st, tc = mm.c["static"][k], mm.c["combs"][k][position]
    depth = list(range(1, len(mm.c["sites"]) + 1))
    tg = mm.token_gains(position)
    P = torch.eye(N, dtype=torch.float64)
    for c in mm.c["combs"][:k + 1]:
        P = mhc.h_res(c[position]) @ P                           # H^res_k ⋯ H^res_1 (paper convention)
    traces = [_comb_heat(st, "x", "y", "static", True), _comb_heat(tc, "x2", "y2", "this token", False),
              _comb_heat(P.T, "x4", "y4", "composite", False)]
    for key, g in (("static", mm.static_gains), ("token", tg), ("mean", mm.mean_gains)):
        lab, col, dash = GAIN_SERIES[key]
        traces.append(dict(type="scatter", mode="lines+markers", x=depth, y=_amax(g), name=f"{lab}: max",
                           legendgroup=key, line=dict(color=col, dash=dash), marker=dict(size=5),
                           xaxis="x3", yaxis="y3"))
        if key == "token":
            traces.append(dict(type="scatter", mode="lines", x=depth, y=_amin(g), name=f"{lab}: min",
                               legendgroup=key, line=dict(color=col, dash="dot", width=1), xaxis="x3", yaxis="y3"))
    traces.append(dict(type="scatter", mode="lines", x=depth, y=mm.surrogate["hc"], name="HC surrogate (I + 0.15·N)",
                       line=dict(color=VCOLORS["hc"], width=1.5), xaxis="x3", yaxis="y3"))
    traces.append(dict(type="scatter", mode="lines", x=depth, y=mm.residual, name="plain residual",
                       line=dict(color=VCOLORS["residual"], width=6), opacity=0.35, xaxis="x3", yaxis="y3"))
    d = k + 1
    traces.append(dict(type="scatter", mode="markers", x=[d], y=[_amax(tg)[k]], name="this site",
                       showlegend=False, marker=dict(size=14, symbol="circle-open", color="#000", line=dict(width=2)),
                       xaxis="x3", yaxis="y3"))
    tok = mm.c["tokens"][position]
    diag_s, diag_t = float(st.diagonal().mean()), float(tc.diagonal().mean())
    title = (f"layer {layer}, {site} site: the static comb keeps {diag_s:.2f} of each stream on average, token "
             f"{position} {tok!r} keeps {diag_t:.2f}<br>composite gain after all {len(depth)} sites: this token "
             f"{fmt3(_amax(tg)[-1])} (min {fmt3(_amin(tg)[-1])}), HC surrogate {fmt3(mm.surrogate['hc'][-1])}")
    ann = [dict(text="static: Sinkhorn(b_res)", x=0.5, xref="x domain", y=1.0, yref="y domain", yanchor="bottom",
                showarrow=False, font=dict(size=11)),
           dict(text=f"token {position}: input-dependent", x=0.5, xref="x2 domain", y=1.0, yref="y2 domain",
                yanchor="bottom", showarrow=False, font=dict(size=11)),
           dict(text=f"token {position}: product of {k + 1} site{'s' if k else ''}", x=0.5, xref="x4 domain", y=1.0,
                yref="y4 domain", yanchor="bottom", showarrow=False, font=dict(size=11))]
    return {"traces": traces, "layout": {"title": {"text": title, "font": {"size": 13}}, "annotations": ann}}


MODEL_MHC_LAYOUT = dict(
    height=560, margin=dict(l=60, r=30, t=80, b=50),
    legend=dict(orientation="v", yanchor="top", y=0.42, xanchor="left", x=0.66, font=dict(size=11)),
    xaxis=dict(domain=[0, 0.2], title="into stream j", dtick=1),
    yaxis=dict(domain=[0.58, 0.95], title="from stream i", autorange="reversed", dtick=1),
    xaxis2=dict(domain=[0.27, 0.47], title="into stream j", dtick=1, anchor="y2"),
    yaxis2=dict(domain=[0.58, 0.95], autorange="reversed", dtick=1, anchor="x2"),
    xaxis4=dict(domain=[0.54, 0.74], title="into stream j", dtick=1, anchor="y4"),
    yaxis4=dict(domain=[0.58, 0.95], autorange="reversed", dtick=1, anchor="x4"),
    xaxis3=dict(domain=[0, 0.62], title="depth (mHC sites composed: attn, MoE per layer)", anchor="y3", dtick=1),
    yaxis3=dict(domain=[0, 0.42], type="log", title="composite gain", anchor="x3"),
)


def build_model_mhc(layer: int = 0, site: str = "attn", position: int = 8):
    mm = model_mhc()
    return figure_from(model_mhc_data(mm, layer, site, min(position, mm.T - 1)), MODEL_MHC_LAYOUT)


@register
class ModelMHCWidget(Widget):
    """Layer, site and token → the trained model's static and input-dependent comb, and the composite gain."""

    name = "mhc.model"
    defaults = {"layer": 0, "site": "attn", "position": 8}

    def __init__(self, static=None, mm: ModelMHC | None = None, **state):
        self.mm = model_mhc() if mm is None else mm
        super().__init__(static, **state)

    def validate(self, state):
        check_choice("layer", state["layer"], self.mm.layers)
        check_choice("site", state["site"], SITES)
        state["position"] = min(state["position"], self.mm.T - 1)
        p = state["position"]
        if isinstance(p, bool) or not isinstance(p, int) or not 0 <= p < self.mm.T:
            raise ValueError(f"position = {p!r}: must be an integer in [0, {self.mm.T - 1}]")

    def data(self):
        return model_mhc_data(self.mm, **self.state)

    def layout(self):
        return MODEL_MHC_LAYOUT

    def make_controls(self):
        import ipywidgets as W
        return {"layer": W.Dropdown(options=self.mm.layers, value=self.state["layer"], description="layer"),
                "site": W.ToggleButtons(options=[("attention", "attn"), ("MoE", "ffn")], value=self.state["site"],
                                        description="site"),
                "position": W.IntSlider(min=0, max=self.mm.T - 1, value=self.state["position"], description="token")}

    def sweep_values(self, control):
        return {"layer": self.mm.layers, "site": list(SITES), "position": list(range(self.mm.T))}[control]

    def on_layer(self, value):
        self.set(layer=int(value))

    def on_site(self, value):
        self.set(site=value)

    def on_position(self, value):
        self.set(position=int(value))


def model_mhc_table(mm: ModelMHC) -> str:
    """Plain text per site: the share of each stream the static comb keeps (diagonal mean), the same for the
    token-mean comb, and the composite gain (max, min over streams, this text's token mean) after the site."""
    lines = [f"{'site':<14} {'static keeps':>12} {'tokens keep':>11} {'gain max':>9} {'gain min':>9}"]
    mean = torch.stack([c.mean(0) for c in mm.c["combs"]])
    for k, (layer, site) in enumerate(mm.c["sites"]):
        lines.append(f"layer {layer} {site:<6} {float(mm.c['static'][k].diagonal().mean()):>12.3f} "
                     f"{float(mean[k].diagonal().mean()):>11.3f} {_amax(mm.mean_gains)[k]:>9.4f} "
                     f"{_amin(mm.mean_gains)[k]:>9.4f}")
    lines.append(f"{mm.T} tokens; uniform mixing keeps 1/{N} = {1 / N:.3f} of each stream, the identity keeps 1")
    return "\n".join(lines)
