"""Notebook 00: the V4 family on one page — V3, V3.2, V4-Flash, V4-Pro from ``v4lab.accounting``.

Every number comes from :func:`v4lab.accounting.summary` (configs only, no weights).
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from v4lab import accounting
from v4lab.viz.common import COLORS, Widget, check_choice, figure_from, label_positions, register, si

MODELS = ("v3", "v3.2", "v4-flash", "v4-pro")
LABELS = {"v3": "V3", "v3.2": "V3.2", "v4-flash": "V4-Flash", "v4-pro": "V4-Pro", "gqa8": "GQA-8 BF16 (V4-Pro depth)"}
# Context grid of the curves: 1K .. 1M in half-octaves (2^10 .. 2^20).
CONTEXTS = [int(round(2 ** (e / 2))) for e in range(20, 41)]
CONTEXT_STOPS = [2 ** e for e in range(10, 21)]          # the slider's stops: 1K, 2K, ..., 1M
WEIGHTINGS = {"B": "FP8-equivalent FLOPs, calibrated to the published ratios (v4lab's fit)", "A": "raw FLOPs"}

# The map of notebooks: number, file, title, the V4 idea, where it lives in the code.
NOTEBOOKS = [
    ("00", "00_tour.ipynb", "Tour", "the V4 family side by side; KV cache and FLOPs vs context",
     "v4lab.accounting"),
    ("01", "01_moe_expansion.ipynb", "MoE expansion", "671B → 1.6T: more and wider experts, "
     "sqrt-softplus routing, hash layers, the bias knob", "v4lab.moe, v4lab.gate"),
    ("02", "02_compressed_attention.ipynb", "Compressed attention", "window, CSA, HCA, the lightning "
     "indexer and the sink; KV cache up to 1M", "v4lab.attention, v4lab.compressor, v4lab.indexer"),
    ("03", "03_mhc.ipynb", "mHC", "hyper-connections kept stable by Sinkhorn", "v4lab.mhc"),
    ("04", "04_swiglu_clamp.ipynb", "SwiGLU clamp", "the clamp on trained activations", "v4lab.moe"),
    ("05", "05_fp4.ipynb", "FP4", "E2M1 grid, E8M0 scales, QAT", "v4lab.quant"),
    ("06", "06_training_stability.ipynb", "Training stability", "anticipatory routing, bias updates",
     "v4lab.gate"),
    ("07", "07_tiny_v4.ipynb", "Tiny V4", "the whole trained model: text, routing, attention, MTP",
     "v4lab.model"),
    ("08", "08_kernels.ipynb", "Kernels", "each Triton kernel beside its reference", "v4lab.kernels"),
    ("09", "09_hardware_and_cost.ipynb", "Hardware and cost", "a roofline on H200 vs B200; API prices",
     "v4lab.hardware, v4lab.pricing"),
    ("10", "10_decode_step_by_step.ipynb", "Decode step by step", "what each layer kind's cache holds as "
     "tokens arrive; one token through the model", "v4lab.trace"),
    ("11", "11_deploying_v4.ipynb", "Deploying V4", "the market, migrating by one line, routing Flash/Pro, "
     "when V4 is the wrong choice, what is unknown", "v4lab.deploy"),
]

NOTEBOOK_DIR = Path(__file__).resolve().parents[2] / "notebooks"



def context_label(n: int) -> str:
    for unit, size in (("M", 2 ** 20), ("K", 2 ** 10)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def family(context: int = accounting.ONE_M, weights: str = "B") -> list[dict]:
    """One row per model: parameters, KV cache and decode FLOPs at ``context``, and ratios to V3.2."""
    return [dict(r) for r in _family(context, weights)]


@lru_cache(maxsize=64)
def _family(context: int, weights: str) -> tuple:
    base = accounting.summary("v3.2", context, weights=weights)
    rows = []
    for m in MODELS:
        s = base if m == "v3.2" else accounting.summary(m, context, weights=weights)
        rows.append({"model": m, "total_params": s["total_params"], "active_params": s["active_params"],
                     "kv_cache_bytes": s["kv_cache_bytes"], "decode_flops": s["decode_flops"],
                     "kv_vs_v32": s["kv_cache_bytes"] / base["kv_cache_bytes"],
                     "flops_vs_v32": s["decode_flops"] / base["decode_flops"], "kv_vs_gqa8": s["kv_vs_gqa8"]})
    return tuple(rows)


def family_table(context: int = accounting.ONE_M, weights: str = "B") -> str:
    """Plain-text table of :func:`family` (deterministic: what the notebook's checked cell prints)."""
    other = "A" if weights != "A" else "B"
    head = (f"{'model':<9} {'total':>7} {'active':>7} {'KV cache':>9} {'decode':>10} {'KV/V3.2':>8} {'FLOPs/V3.2':>10}"
            f" {'(' + ('raw' if other == 'A' else 'calibrated') + ')':>12}")
    lines = [f"context {context_label(context)} tokens ({context:,}); FLOPs: {WEIGHTINGS[weights]}; "
             f"in brackets: {WEIGHTINGS[other]}", head]
    for r, o in zip(family(context, weights), family(context, other)):
        bracket = f"({100 * o['flops_vs_v32']:.1f}%)"
        lines.append(f"{LABELS[r['model']]:<9} {r['total_params'] / 1e9:>6.0f}B {r['active_params'] / 1e9:>6.1f}B "
                     f"{r['kv_cache_bytes'] / 1e9:>7.2f}GB {r['decode_flops'] / 1e9:>7.0f}GFL "
                     f"{100 * r['kv_vs_v32']:>7.1f}% {100 * r['flops_vs_v32']:>9.1f}% {bracket:>12}")
    return "\n".join(lines)


def notebook_map(root: Path | None = None) -> str:
    """Markdown table of the notebooks, marking those not written yet."""
    root = NOTEBOOK_DIR if root is None else Path(root)
    out = ["| # | notebook | the V4 idea | code |", "|---|---|---|---|"]
    for num, f, title, idea, code in NOTEBOOKS:
        name = f"[{title}]({f})" if (root / f).exists() else f"{title} *(coming)*"
        out.append(f"| {num} | {name} | {idea} | `{code}` |")
    return "\n".join(out)


# ------------------------------------------------------------------------- KV cache and FLOPs vs context
def _curves(weights: str) -> dict:
    kv = {m: [accounting.kv_cache(m, n)["total_bytes"] / 1e9 for n in CONTEXTS] for m in MODELS}
    kv["gqa8"] = [accounting.gqa8("v4-pro", n)["total_bytes"] / 1e9 for n in CONTEXTS]
    fl = {m: [accounting.decode_flops(m, n, weights=weights)["total"] / 1e9 for n in CONTEXTS] for m in MODELS}
    return {"kv": kv, "flops": fl}


_CURVE_CACHE: dict[str, dict] = {}


def curves(weights: str = "B") -> dict:
    """KV cache (GB) and decode GFLOPs over ``CONTEXTS``; computed once per weighting."""
    check_choice("weights", weights, WEIGHTINGS)
    if not _CURVE_CACHE:                      # both weightings at once: the toggle then costs no arithmetic
        for k in WEIGHTINGS:
            _CURVE_CACHE[k] = _curves(k)
    return _CURVE_CACHE[weights]


def _span(curves: dict) -> tuple[float, float]:
    vals = [v for ys in curves.values() for v in ys]
    return min(vals), max(vals)


def context_data(context: int = accounting.ONE_M, weights: str = "B") -> dict:
    """Traces: KV lines (5 incl. GQA-8), FLOPs lines (4), the points at ``context`` (KV, FLOPs)."""
    check_choice("context", context, CONTEXT_STOPS)
    c = curves(weights)
    rows = {r["model"]: r for r in family(context, weights)}
    gq = accounting.gqa8("v4-pro", context)["total_bytes"] / 1e9
    traces = []
    kv_models = MODELS + ("gqa8",)
    for m in kv_models:
        traces.append(dict(type="scatter", mode="lines", x=CONTEXTS, y=c["kv"][m], name=LABELS[m],
                           legendgroup=m, line=dict(color=COLORS[m], dash="dot" if m == "gqa8" else "solid"),
                           xaxis="x", yaxis="y"))
    for m in MODELS:
        traces.append(dict(type="scatter", mode="lines", x=CONTEXTS, y=c["flops"][m], name=LABELS[m],
                           legendgroup=m, showlegend=False, line=dict(color=COLORS[m]), xaxis="x2", yaxis="y2"))
    # the points at ``context``: one trace per panel (fewer traces = a faster in-place update)
    kv_y = [gq if m == "gqa8" else rows[m]["kv_cache_bytes"] / 1e9 for m in kv_models]
    fl_y = [rows[m]["decode_flops"] / 1e9 for m in MODELS]
    spans = {"y": _span(c["kv"]), "y2": _span(c["flops"])}
    for ys, ms, ax, unit in ((kv_y, kv_models, ("x", "y"), "B"), (fl_y, MODELS, ("x2", "y2"), "FLOP")):
        traces.append(dict(type="scatter", mode="markers+text", x=[context] * len(ys), y=ys, showlegend=False,
                           marker=dict(color=[COLORS[m] for m in ms], size=9),
                           text=[si(y * 1e9, unit) for y in ys],
                           textfont=dict(shadow="auto"),      # a halo: labels stay readable where lines cross
                           textposition=label_positions(ys, *spans[ax[1]], plot_px=CONTEXT_LAYOUT["height"] - 110,
                                                        side="left" if context >= 2 ** 15 else "right"),
                           hovertext=[LABELS[m] for m in ms], name="at context", xaxis=ax[0], yaxis=ax[1]))
    pro, fl = rows["v4-pro"], rows["v4-flash"]
    title = (f"At {context_label(context)} tokens: V4-Pro KV {100 * pro['kv_vs_v32']:.1f}% / FLOPs "
             f"{100 * pro['flops_vs_v32']:.1f}% of V3.2 · V4-Flash KV {100 * fl['kv_vs_v32']:.1f}% / "
             f"FLOPs {100 * fl['flops_vs_v32']:.1f}%<br><sup>FLOPs: {WEIGHTINGS[weights]}</sup>")
    shapes = [dict(type="line", xref=ax, yref=f"{yr} domain", x0=context, x1=context, y0=0, y1=1,
                   line=dict(color="#888", dash="dash", width=1)) for ax, yr in (("x", "y"), ("x2", "y2"))]
    return {"traces": traces, "layout": {"title": {"text": title, "font": {"size": 13}}, "shapes": shapes}}


CONTEXT_LAYOUT = dict(
    height=480, margin=dict(l=60, r=20, t=70, b=110),
    legend=dict(orientation="h", yanchor="top", y=-0.2, xanchor="left", x=0),
    xaxis=dict(domain=[0, 0.46], type="log", title="context (tokens)"),
    yaxis=dict(type="log", title="KV cache per sequence (GB)"),
    xaxis2=dict(domain=[0.56, 1], type="log", title="context (tokens)", anchor="y2"),
    yaxis2=dict(type="log", title="decode GFLOPs per token", anchor="x2"),
)


def build_context(context: int = accounting.ONE_M, weights: str = "B"):
    """KV cache and decode FLOPs vs context for the family (static figure)."""
    return figure_from(context_data(context, weights), CONTEXT_LAYOUT)


READOUT_CLASS = "v4lab-readout-left"
READOUT_CSS = (f"<style>.{READOUT_CLASS} .widget-readout {{text-align: left; min-width: 0; "
               "margin-left: 8px}</style>")


@register
class ContextWidget(Widget):
    """A context slider (1K..1M) and a FLOPs weighting toggle over :func:`build_context`."""

    name = "tour.context"
    defaults = {"context": accounting.ONE_M, "weights": "B"}

    def __init__(self, static=None, **state):
        for w in WEIGHTINGS:                 # all the arithmetic up front (~0.2 s): callbacks only look up
            for n in CONTEXT_STOPS:
                _family(n, w)
        super().__init__(static, **state)

    def validate(self, state):
        check_choice("context", state["context"], CONTEXT_STOPS)
        check_choice("weights", state["weights"], WEIGHTINGS)

    def data(self):
        return context_data(**self.state)

    def layout(self):
        return CONTEXT_LAYOUT

    def make_controls(self):
        import ipywidgets as W
        context = W.SelectionSlider(options=[(f"{context_label(n)} tokens", n) for n in CONTEXT_STOPS],
                                    value=self.state["context"], description="context", continuous_update=True,
                                    layout=W.Layout(width="420px", margin="0 32px 0 0"))
        context.add_class(READOUT_CLASS)
        return {
            "context": context,
            "weights": W.ToggleButtons(options=[("FP8-eq. (calibrated)", "B"), ("raw", "A")],
                                       tooltips=[WEIGHTINGS["B"], WEIGHTINGS["A"]],
                                       value=self.state["weights"], description="FLOPs",
                                       style={"button_width": "150px"}),
        }

    def box(self):
        """The default box, with a style that puts the slider's readout right beside the slider (ipywidgets
        centres it in a fixed-width box, which leaves a short value like "1M" far from the handle)."""
        import ipywidgets as W
        box = super().box()
        box.children = (W.HTML(READOUT_CSS),) + tuple(box.children)
        return box

    def sweep_values(self, control):
        return {"context": CONTEXT_STOPS, "weights": list(WEIGHTINGS)}[control]

    def on_context(self, value):
        self.set(context=value)

    def on_weights(self, value):
        self.set(weights=value)
