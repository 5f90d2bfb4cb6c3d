"""Notebook 09: V4 as a hardware bet (a decode roofline, H200 vs B200) and the deployment economics
(API prices, the Flash-first pattern). Numbers come from :mod:`v4lab.hardware` and
:mod:`v4lab.pricing`; this module only draws them.
"""
from __future__ import annotations

from functools import lru_cache

from v4lab import hardware, pricing
from v4lab.viz.common import COLORS, Widget, check_choice, check_range, figure_from, register
from v4lab.viz.tour import CONTEXT_STOPS, LABELS, context_label

PRICE_COLORS = {"v4-flash": COLORS["v4-flash"], "v4-pro": COLORS["v4-pro"], "opus-4.7": "#ff7f0e",
                "gpt-5.5": "#2ca02c", "gemini-3.1-pro": "#9467bd", "v5-flash": "#aec7e8", "v5-pro": "#ff9896"}
MONTH_INPUT_STOPS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]       # millions of tokens a month
MONTH_OUTPUT_STOPS = [0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128]
PROMPT_STOPS = [2 ** e for e in range(12, 21)]                            # 4K .. 1M tokens per request
BATCH_STOPS = [2 ** e for e in range(0, 15)]                             # 1 .. 16384 sequences
ROOF_MODELS = ("v4-flash", "v4-pro", "v3.2")
GPUS = ("H200", "B200")


# --------------------------------------------------------------------------------------- price table
def price_table() -> str:
    """Plain-text price table with sources (what notebook 09 prints)."""
    m = pricing.meta()
    lines = [f"US$ per 1M tokens; as of {m.get('as_of')}; recorded {m.get('recorded_on')}",
             f"{'model':<24} {'input':>7} {'output':>7}  note"]
    for p in pricing.load_prices().values():
        inp = "  n/a" if p.input is None else f"{p.input:>7.2f}"
        note = []
        if p.speculative:
            note.append("SPECULATION (report)")
        if p.input_assumed:
            note.append("input price assumed by v4lab")
        if p.long_context_threshold:
            note.append(f"input x{p.long_context_input_multiplier:g} above {p.long_context_threshold // 1000}K")
        lines.append(f"{p.label:<24} {inp:>7} {p.output:>7.2f}  {'; '.join(note)}")
    return "\n".join(lines)


def claims_table() -> str:
    """Every price figure of the report, recomputed (deterministic; a checked notebook cell)."""
    out = []
    for r in pricing.report_claims():
        out.append(f"{'OK ' if r['ok'] else 'BAD'} {r['claim']:<52} computed {r['computed']:>9.3f} "
                   f"-> {r['shown']:>7g}  report {r['published']:>7g}   [{r['derivation']}]")
    return "\n".join(out)


# --------------------------------------------------------------------------------------- monthly bill
def bill_data(input_m: float = 32, output_m: float = 1, prompt: int = 8192, speculative: bool = True) -> dict:
    """Monthly bill per model for ``input_m``/``output_m`` million tokens, prompts of ``prompt`` tokens.

    Traces: [0] list prices (bars), [1] speculative V5 prices (bars, hidden unless ``speculative``).
    GPT-5.5 has no input price in the report: its bar counts output only (said in the hover text).
    """
    prices = pricing.load_prices()
    real = [k for k, p in prices.items() if not p.speculative]
    spec = [k for k, p in prices.items() if p.speculative]

    def bill(k):
        p = prices[k]
        inp = 0.0 if p.input is None else input_m * 1e6
        return pricing.cost(k, inp, output_m * 1e6, context=prompt)

    def hover(k):
        p = prices[k]
        bits = [p.label]
        if p.input is None:
            bits.append("output only: the report gives no input price")
        elif p.input_assumed:
            bits.append("input price assumed")
        if p.long_context_threshold and prompt > p.long_context_threshold:
            bits.append(f"input doubled: prompt > {p.long_context_threshold // 1000}K")
        return "<br>".join(bits)

    ry = [bill(k) for k in real]
    sy = [bill(k) for k in spec]
    traces = [
        dict(type="bar", x=[prices[k].label for k in real], y=ry, name="list price",
             marker=dict(color=[PRICE_COLORS.get(k, "#777") for k in real]),
             text=[f"${v:,.2f}" for v in ry], textposition="outside", hovertext=[hover(k) for k in real]),
        dict(type="bar", x=[prices[k].label for k in spec], y=sy, name="V5 (speculation)", visible=speculative,
             marker=dict(color=[PRICE_COLORS.get(k, "#bbb") for k in spec], pattern=dict(shape="/")),
             text=[f"${v:,.2f}" for v in sy], textposition="outside", hovertext=[hover(k) for k in spec]),
    ]
    fl, op = bill("v4-flash"), bill("opus-4.7")
    title = (f"{input_m:g}M in + {output_m:g}M out a month, {context_label(prompt)}-token prompts: "
             f"V4-Flash ${fl:,.2f} vs Opus 4.7 ${op:,.2f} ({op / fl:.0f}x)")
    return {"traces": traces, "layout": {"title": {"text": title, "font": {"size": 13}}}}


BILL_LAYOUT = dict(yaxis=dict(type="log", title="US$ per month"), barmode="group", height=430)


def build_bill(**kw):
    return figure_from(bill_data(**kw), BILL_LAYOUT)


@register
class BillWidget(Widget):
    name = "cost.bill"
    defaults = {"input_m": 32, "output_m": 1, "prompt": 8192, "speculative": True}

    def validate(self, s):
        check_choice("input_m", s["input_m"], MONTH_INPUT_STOPS)
        check_choice("output_m", s["output_m"], MONTH_OUTPUT_STOPS)
        check_choice("prompt", s["prompt"], PROMPT_STOPS)
        check_choice("speculative", s["speculative"], (True, False))

    def data(self):
        return bill_data(**self.state)

    def layout(self):
        return BILL_LAYOUT

    def make_controls(self):
        import ipywidgets as W
        return {
            "input_m": W.SelectionSlider(options=[(f"{v:g}M", v) for v in MONTH_INPUT_STOPS],
                                         value=self.state["input_m"], description="input/month"),
            "output_m": W.SelectionSlider(options=[(f"{v:g}M", v) for v in MONTH_OUTPUT_STOPS],
                                          value=self.state["output_m"], description="output/month"),
            "prompt": W.SelectionSlider(options=[(context_label(v), v) for v in PROMPT_STOPS],
                                        value=self.state["prompt"], description="prompt"),
            "speculative": W.Checkbox(value=self.state["speculative"], description="show V5 (speculation)"),
        }

    def sweep_values(self, control):
        return {"input_m": MONTH_INPUT_STOPS, "output_m": MONTH_OUTPUT_STOPS, "prompt": PROMPT_STOPS,
                "speculative": [False, True]}[control]

    def on_input_m(self, v):
        self.set(input_m=v)

    def on_output_m(self, v):
        self.set(output_m=v)

    def on_prompt(self, v):
        self.set(prompt=v)

    def on_speculative(self, v):
        self.set(speculative=bool(v))


# --------------------------------------------------------------------------------------- long context
def long_context_data(prompt: int = 262144) -> dict:
    """$ per 1M input tokens vs prompt length: Gemini 3.1 Pro's step at 200K vs V4-Pro's flat rate.

    Traces: [0] Gemini line, [1] V4-Pro line, [2] the two rates at ``prompt``.
    """
    g, v = pricing.price("gemini-3.1-pro"), pricing.price("v4-pro")
    xs = sorted(set([2 ** e for e in range(12, 21)] + [g.long_context_threshold, g.long_context_threshold + 1]))
    gy, vy = [g.input_rate(x) for x in xs], [v.input_rate(x) for x in xs]
    at = [g.input_rate(prompt), v.input_rate(prompt)]
    traces = [
        dict(type="scatter", mode="lines", x=xs, y=gy, name=g.label + (" (base input assumed)" if g.input_assumed else ""),
             line=dict(color=PRICE_COLORS["gemini-3.1-pro"], shape="hv")),
        dict(type="scatter", mode="lines", x=xs, y=vy, name=v.label, line=dict(color=PRICE_COLORS["v4-pro"])),
        dict(type="scatter", mode="markers+text", x=[prompt, prompt], y=at, showlegend=False,
             marker=dict(size=10, color=[PRICE_COLORS["gemini-3.1-pro"], PRICE_COLORS["v4-pro"]]),
             text=[f"${a:.2f}" for a in at], textposition="middle right"),
    ]
    title = (f"{context_label(prompt)}-token prompt: Gemini 3.1 Pro ${at[0]:.2f} vs V4-Pro ${at[1]:.2f} "
             f"per 1M input tokens ({at[0] / at[1]:.2f}x)")
    return {"traces": traces, "layout": {"title": {"text": title, "font": {"size": 13}}}}


LONG_LAYOUT = dict(xaxis=dict(type="log", title="prompt length (tokens)"),
                   yaxis=dict(title="US$ per 1M input tokens", rangemode="tozero"), height=380)


def build_long_context(**kw):
    return figure_from(long_context_data(**kw), LONG_LAYOUT)


@register
class LongContextWidget(Widget):
    name = "cost.long_context"
    defaults = {"prompt": 262144}

    def validate(self, s):
        check_choice("prompt", s["prompt"], PROMPT_STOPS)

    def data(self):
        return long_context_data(**self.state)

    def layout(self):
        return LONG_LAYOUT

    def make_controls(self):
        import ipywidgets as W
        return {"prompt": W.SelectionSlider(options=[(context_label(v), v) for v in PROMPT_STOPS],
                                            value=self.state["prompt"], description="prompt")}

    def sweep_values(self, control):
        return {"prompt": PROMPT_STOPS}[control]

    def on_prompt(self, v):
        self.set(prompt=v)


# --------------------------------------------------------------------------------------- Flash first
ESCALATION_STOPS = [i / 20 for i in range(21)]


def escalation_data(escalated: float = 0.1, input_m: float = 32, output_m: float = 1) -> dict:
    """Flash first, Pro on escalation: the monthly bill vs the escalated fraction.

    Traces: [0] blended bill over the fraction, [1] all-Pro line, [2] all-Flash line, [3] the point.
    """
    inp, out = input_m * 1e6, output_m * 1e6
    fr = ESCALATION_STOPS
    blended = [pricing.blended_cost(f, inp, out) for f in fr]
    pro, flash = pricing.cost("v4-pro", inp, out), pricing.cost("v4-flash", inp, out)
    b = pricing.blended_cost(escalated, inp, out)
    traces = [
        dict(type="scatter", mode="lines", x=fr, y=blended, name="Flash first, escalate to Pro",
             line=dict(color="#444")),
        dict(type="scatter", mode="lines", x=[0, 1], y=[pro, pro], name="everything on V4-Pro",
             line=dict(color=PRICE_COLORS["v4-pro"], dash="dash")),
        dict(type="scatter", mode="lines", x=[0, 1], y=[flash, flash], name="everything on V4-Flash",
             line=dict(color=PRICE_COLORS["v4-flash"], dash="dash")),
        dict(type="scatter", mode="markers+text", x=[escalated], y=[b], showlegend=False,
             marker=dict(size=11, color="#444"), text=[f"${b:,.2f}"], textposition="top left"),
    ]
    title = (f"{100 * escalated:.0f}% escalated: ${b:,.2f}/month vs ${pro:,.2f} all-Pro "
             f"(all-Pro pays {pro / b:.1f}x; on traffic Flash could serve, {pricing.overpay(inp / (inp + out)):.1f}x)")
    return {"traces": traces, "layout": {"title": {"text": title, "font": {"size": 13}}}}


ESC_LAYOUT = dict(xaxis=dict(title="fraction of requests escalated to V4-Pro", tickformat=".0%"),
                  yaxis=dict(title="US$ per month", rangemode="tozero"), height=380)


def build_escalation(**kw):
    return figure_from(escalation_data(**kw), ESC_LAYOUT)


@register
class EscalationWidget(Widget):
    name = "cost.escalation"
    defaults = {"escalated": 0.1, "input_m": 32, "output_m": 1}

    def validate(self, s):
        check_range("escalated", s["escalated"], 0.0, 1.0)
        check_choice("input_m", s["input_m"], MONTH_INPUT_STOPS)
        check_choice("output_m", s["output_m"], MONTH_OUTPUT_STOPS)

    def data(self):
        return escalation_data(**self.state)

    def layout(self):
        return ESC_LAYOUT

    def make_controls(self):
        import ipywidgets as W
        return {"escalated": W.FloatSlider(value=self.state["escalated"], min=0, max=1, step=0.05,
                                           description="escalated", readout_format=".0%")}

    def sweep_values(self, control):
        return {"escalated": ESCALATION_STOPS}[control]

    def on_escalated(self, v):
        self.set(escalated=round(float(v), 4))


# --------------------------------------------------------------------------------------- roofline
def _roof_traces() -> list[dict]:
    xs = [2 ** (e / 4) for e in range(0, 53)]                       # 1 .. 8192 FLOP/byte
    out = []
    for g in GPUS:
        bw = hardware.bandwidth(g)
        for prec, dash in (("bf16", "dot"), ("fp8", "dash"), ("fp4", "solid")):
            if hardware.gpu(g)["tflops"].get(prec) is None:
                continue
            pk = hardware.peak_flops(g, prec)
            out.append(dict(type="scatter", mode="lines", x=xs, y=[min(pk, x * bw) / 1e12 for x in xs],
                            name=f"{g} {prec.upper()} roof", legendgroup=g,
                            line=dict(color=COLORS[g], dash=dash, width=1.5), xaxis="x", yaxis="y"))
    return out


_ROOFS: list[dict] = []


@lru_cache(maxsize=128)
def _tokens_curves(model: str, context: int, fp4_experts: bool) -> dict:
    return {g: [hardware.roofline(model, g, context, b, fp4_experts)["tokens_per_s"] for b in BATCH_STOPS]
            for g in GPUS}


def roofline_data(model: str = "v4-pro", context: int = 2 ** 20, batch: int = 64, fp4_experts: bool = False) -> dict:
    """Left: the H200/B200 rooflines and this decode step on each. Right: tokens/s per GPU vs batch.

    Traces: the roofs (fixed), then [H200 point, B200 point, H200 curve, B200 curve, the batch points].
    """
    check_choice("model", model, ROOF_MODELS)
    check_choice("context", context, CONTEXT_STOPS)
    check_choice("batch", batch, BATCH_STOPS)
    if not _ROOFS:
        _ROOFS.extend(_roof_traces())
    traces = [dict(t) for t in _ROOFS]
    r = {g: hardware.roofline(model, g, context, batch, fp4_experts) for g in GPUS}
    for g in GPUS:
        traces.append(dict(type="scatter", mode="markers+text", x=[r[g]["intensity"]],
                           y=[r[g]["achieved_flops"] / 1e12], name=f"{LABELS[model]} on {g}", legendgroup=g,
                           marker=dict(size=12, color=COLORS[g], symbol="diamond"),
                           text=[f"{r[g]['achieved_flops'] / 1e12:.0f} TFLOP/s"], textposition="bottom right",
                           xaxis="x", yaxis="y", showlegend=False))
    curves = _tokens_curves(model, context, fp4_experts)
    for g in GPUS:
        traces.append(dict(type="scatter", mode="lines", x=BATCH_STOPS, y=curves[g], name=f"{g} tokens/s",
                           legendgroup=g, showlegend=False, line=dict(color=COLORS[g]), xaxis="x2", yaxis="y2"))
    traces.append(dict(type="scatter", mode="markers", x=[batch, batch],
                       y=[r[g]["tokens_per_s"] for g in GPUS], showlegend=False,
                       marker=dict(size=10, color=[COLORS[g] for g in GPUS]), xaxis="x2", yaxis="y2"))
    h, b = r["H200"], r["B200"]
    title = (f"{LABELS[model]}, {context_label(context)} context, batch {batch}: "
             f"{h['intensity']:.0f} FLOP/B, {h['bound']}-bound · H200 {h['tokens_per_s']:,.0f} tok/s, "
             f"B200 {b['tokens_per_s']:,.0f} tok/s per GPU ({b['tokens_per_s'] / h['tokens_per_s']:.2f}x)"
             f"<br>KV cache held for the batch: {h['kv_cache_bytes'] / 1e9:,.0f} GB; weights read per step: "
             f"{h['weight_bytes'] / 1e9:,.0f} GB ({100 * h['experts_touched_fraction']:.0f}% of experts)")
    return {"traces": traces, "layout": {"title": {"text": title, "font": {"size": 13}}}}


ROOF_LAYOUT = dict(
    height=480, margin=dict(l=60, r=20, t=90, b=50),
    xaxis=dict(domain=[0, 0.55], type="log", title="arithmetic intensity (FLOP per byte read)"),
    yaxis=dict(type="log", title="TFLOP/s per GPU", range=[0, 4.1]),
    xaxis2=dict(domain=[0.65, 1], type="log", title="batch (sequences decoded together)", anchor="y2"),
    yaxis2=dict(type="log", title="tokens/s per GPU", anchor="x2"),
)


def build_roofline(**kw):
    return figure_from(roofline_data(**kw), ROOF_LAYOUT)


@register
class RooflineWidget(Widget):
    name = "cost.roofline"
    defaults = {"model": "v4-pro", "context": 2 ** 20, "batch": 64, "fp4_experts": False}

    def __init__(self, static=None, **state):
        for m in ROOF_MODELS:                # the accounting up front (~0.3 s): callbacks only do arithmetic
            for n in CONTEXT_STOPS:
                hardware.decode_step(m, n, 1)
        super().__init__(static, **state)

    def validate(self, s):
        check_choice("model", s["model"], ROOF_MODELS)
        check_choice("context", s["context"], CONTEXT_STOPS)
        check_choice("batch", s["batch"], BATCH_STOPS)
        check_choice("fp4_experts", s["fp4_experts"], (True, False))

    def data(self):
        return roofline_data(**self.state)

    def layout(self):
        return ROOF_LAYOUT

    def make_controls(self):
        import ipywidgets as W
        return {
            "model": W.Dropdown(options=[(LABELS[m], m) for m in ROOF_MODELS], value=self.state["model"],
                                description="model"),
            "batch": W.SelectionSlider(options=BATCH_STOPS, value=self.state["batch"], description="batch"),
            "context": W.SelectionSlider(options=[(context_label(v), v) for v in CONTEXT_STOPS],
                                         value=self.state["context"], description="context"),
            "fp4_experts": W.Checkbox(value=self.state["fp4_experts"], description="FP4 x FP4 expert GEMMs"),
        }

    def sweep_values(self, control):
        return {"model": list(ROOF_MODELS), "batch": BATCH_STOPS, "context": CONTEXT_STOPS,
                "fp4_experts": [True, False]}[control]

    def on_model(self, v):
        self.set(model=v)

    def on_batch(self, v):
        self.set(batch=int(v))

    def on_context(self, v):
        self.set(context=int(v))

    def on_fp4_experts(self, v):
        self.set(fp4_experts=bool(v))


def gpu_table() -> str:
    """The GPU peak figures from hardware.json (dense, approximate)."""
    lines = [f"{'GPU':<6} {'HBM TB/s':>8} {'BF16':>6} {'FP8':>6} {'FP4':>6}  TFLOP/s dense (approximate)"]
    for name, g in hardware.gpus().items():
        t = g["tflops"]
        fp4 = "  none" if t.get("fp4") is None else f"{t['fp4']:>6g}"
        lines.append(f"{name:<6} {g['hbm_tb_s']:>8g} {t['bf16']:>6g} {t['fp8']:>6g} {fp4}")
    return "\n".join(lines)


def decode_table(context: int = 2 ** 20, batches=(1, 64, 1024, 16384)) -> str:
    """tokens/s per GPU and the bound, for the roofline's models on each GPU (plain numbers)."""
    lines = [f"decode at {context_label(context)} context: tokens/s per GPU (roofline, no overheads)",
             f"{'model':<9} {'batch':>5} {'FLOP/B':>7} {'H200':>9} {'B200':>9} {'B/H':>5}  bound"]
    for m in ROOF_MODELS:
        for b in batches:
            h = hardware.roofline(m, "H200", context, b)
            bb = hardware.roofline(m, "B200", context, b)
            lines.append(f"{LABELS[m]:<9} {b:>5} {h['intensity']:>7.1f} {h['tokens_per_s']:>9,.0f} "
                         f"{bb['tokens_per_s']:>9,.0f} {bb['tokens_per_s'] / h['tokens_per_s']:>5.2f}  "
                         f"{h['bound']}/{bb['bound']}")
    return "\n".join(lines)
