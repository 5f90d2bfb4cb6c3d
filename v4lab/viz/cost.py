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
SHORT = {"v4-flash": "V4-Flash", "v4-pro": "V4-Pro", "opus-4.7": "Opus 4.7", "gpt-5.5": "GPT-5.5",
         "gemini-3.1-pro": "Gemini 3.1 Pro", "v5-flash": "V5-Flash<br>(speculation)", "v5-pro": "V5-Pro<br>(speculation)"}
MONTH_INPUT_STOPS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]       # millions of tokens a month
MONTH_OUTPUT_STOPS = [0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128]
PROMPT_STOPS = [2 ** e for e in range(12, 21)]                            # 4K .. 1M tokens per request
BATCH_STOPS = [2 ** e for e in range(0, 15)]                             # 1 .. 16384 sequences
ROOF_MODELS = ("v4-flash", "v4-pro", "v3.2")
GPUS = ("H200", "B200")
# ipywidgets cut long descriptions at ~80 px ("nput/month"): give them room
STYLE = {"description_width": "initial"}           # checkboxes, dropdowns: as wide as their text
SLIDER_STYLE = {"description_width": "150px"}      # sliders: a fixed column that fits the longest label
SLIDER_LAYOUT = {"width": "440px"}


# --------------------------------------------------------------------------------------- price table
def price_table() -> str:
    """Plain-text price table, each price with its mark (published / derived from ... / assumed)."""
    m = pricing.meta()
    lines = [f"US$ per 1M tokens; {m.get('as_of')}; copied into v4lab on {m.get('recorded_on')} "
             "(not a vendor price date)",
             f"{'model':<24} {'input':>7} {'output':>7}  where each number comes from"]
    for p in pricing.load_prices().values():
        inp = "unknown" if p.input is None else f"{p.input:>7.2f}"
        note = [f"input {p.mark('input')}", f"output {p.mark('output')}"]
        if p.speculative:
            note.insert(0, "SPECULATION (the report's guess)")
        if p.long_context_threshold:
            note.append(f"input x{p.long_context_input_multiplier:g} above {p.long_context_threshold // 1000}K (published)")
        lines.append(f"{p.label:<24} {inp:>7} {p.output:>7.2f}  {'; '.join(note)}")
    return "\n".join(lines)


def claims_table() -> str:
    """Every price figure of the report, recomputed (deterministic; a checked notebook cell)."""
    out = []
    for r in pricing.report_claims():
        out.append(f"{'OK ' if r['ok'] else 'BAD'} {r['claim']:<52} computed {r['computed']:>9.3f} "
                   f"-> {r['shown']:>7g}  report {r['published']:>7g}   [{r['derivation']}]")
    return "\n".join(out)


def usd(x: float) -> str:
    """Three significant figures (whole dollars from 100 up), without a $ sign: plotly reads two $ in one
    string as LaTeX and hides it, so figures say 'US$' once in the title or axis instead."""
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}" if x >= 1 else f"{x:.3g}"


# --------------------------------------------------------------------------------------- monthly bill
def bill_data(input_m: float = 32, output_m: float = 1, prompt: int = 8192, speculative: bool = True) -> dict:
    """Monthly bill per model for ``input_m``/``output_m`` million tokens, prompts of ``prompt`` tokens.

    Traces: [0] list prices with every price known (bars), [1] models with an unknown price (GPT-5.5's
    input): a hatched, faded bar of the part v4lab can price, labelled "≥ … (input price unknown)" —
    a lower bound, never a total; [2] speculative V5 prices (hidden unless ``speculative``).
    """
    prices = pricing.load_prices()
    real = [k for k, p in prices.items() if not p.speculative]
    known = [k for k in real if prices[k].input is not None]
    unknown = [k for k in real if prices[k].input is None]
    spec = [k for k, p in prices.items() if p.speculative]

    def bill(k):
        p = prices[k]
        inp = 0.0 if p.input is None else input_m * 1e6
        return pricing.cost(k, inp, output_m * 1e6, context=prompt)

    def hover(k):
        p = prices[k]
        bits = [p.label, f"input: {p.mark('input')}", f"output: {p.mark('output')}"]
        if p.long_context_threshold and prompt > p.long_context_threshold:
            bits.append(f"input doubled: prompt > {p.long_context_threshold // 1000}K")
        return "<br>".join(bits)

    ky, uy, sy = [bill(k) for k in known], [bill(k) for k in unknown], [bill(k) for k in spec]

    def lab(k):
        return SHORT.get(k, prices[k].label) + ("<br>(input assumed)" if prices[k].input_assumed else "")
    traces = [
        dict(type="bar", x=[lab(k) for k in known], y=ky, name="list price",
             marker=dict(color=[PRICE_COLORS.get(k, "#777") for k in known]),
             text=[usd(v) for v in ky], textposition="outside", hovertext=[hover(k) for k in known]),
        dict(type="bar", x=[lab(k) for k in unknown], y=uy, name="input price unknown: output part only",
             marker=dict(color=[PRICE_COLORS.get(k, "#777") for k in unknown], pattern=dict(shape="/"), opacity=0.45),
             text=[f"≥ {usd(v)}<br>input price<br>unknown" for v in uy], textposition="outside",
             hovertext=[hover(k) for k in unknown]),
        dict(type="bar", x=[lab(k) for k in spec], y=sy, name="V5 (speculation)", visible=speculative,
             marker=dict(color=[PRICE_COLORS.get(k, "#bbb") for k in spec], pattern=dict(shape="x")),
             text=[usd(v) for v in sy], textposition="outside", hovertext=[hover(k) for k in spec]),
    ]
    fl, op = bill("v4-flash"), bill("opus-4.7")
    title = (f"{input_m:g}M in + {output_m:g}M out a month, {context_label(prompt)}-token prompts (US$): "
             f"V4-Flash {usd(fl)} vs Opus 4.7 {usd(op)} ({op / fl:.3g}x)")
    return {"traces": traces, "layout": {"title": {"text": title, "font": {"size": 13}}}}


BILL_LAYOUT = dict(yaxis=dict(type="log", title="US$ per month (log scale)", dtick="D2"), barmode="overlay",
                   xaxis=dict(tickangle=0), height=450, margin=dict(l=60, r=20, t=60, b=110),
                   legend=dict(orientation="h", yanchor="top", y=-0.2, xanchor="left", x=0))


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
                                         value=self.state["input_m"], description="input tokens/month",
                                         style=SLIDER_STYLE, layout=SLIDER_LAYOUT),
            "output_m": W.SelectionSlider(options=[(f"{v:g}M", v) for v in MONTH_OUTPUT_STOPS],
                                          value=self.state["output_m"], description="output tokens/month",
                                          style=SLIDER_STYLE, layout=SLIDER_LAYOUT),
            "prompt": W.SelectionSlider(options=[(context_label(v), v) for v in PROMPT_STOPS],
                                        value=self.state["prompt"], description="prompt length",
                                        style=SLIDER_STYLE, layout=SLIDER_LAYOUT),
            "speculative": W.Checkbox(value=self.state["speculative"], description="show V5 (speculation)",
                                      style=STYLE),
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
LONG_REQUESTS = 1000            # requests a month in the right-hand panel


def long_context_data(prompt: int = 262144) -> dict:
    """Left: $ per 1M input tokens vs prompt length, Gemini 3.1 Pro's step at 200K vs V4-Pro's flat
    rate, and both at ``prompt``. Right: what 1000 requests of that prompt cost a month on each.

    Traces: [0] Gemini line, [1] V4-Pro line, [2] the two rates at ``prompt``, [3] the month's bars."""
    g, v = pricing.price("gemini-3.1-pro"), pricing.price("v4-pro")
    xs = sorted(set([2 ** e for e in range(12, 21)] + [g.long_context_threshold, g.long_context_threshold + 1]))
    gy, vy = [g.input_rate(x) for x in xs], [v.input_rate(x) for x in xs]
    at = [g.input_rate(prompt), v.input_rate(prompt)]
    month = [pricing.cost(k, LONG_REQUESTS * prompt, 0, context=prompt) for k in ("gemini-3.1-pro", "v4-pro")]
    colors = [PRICE_COLORS["gemini-3.1-pro"], PRICE_COLORS["v4-pro"]]
    glabel = g.label + (" (base input assumed by v4lab)" if g.input_assumed else "")
    traces = [
        dict(type="scatter", mode="lines", x=xs, y=gy, name=glabel, line=dict(color=colors[0], shape="hv")),
        dict(type="scatter", mode="lines", x=xs, y=vy, name=v.label + " (published, flat)", line=dict(color=colors[1])),
        dict(type="scatter", mode="markers+text", x=[prompt, prompt], y=at, showlegend=False,
             marker=dict(size=10, color=colors), text=[usd(a) for a in at],
             textposition="top left" if prompt >= 2 ** 19 else "top right"),
        dict(type="bar", x=["Gemini 3.1 Pro", "V4-Pro"], y=month, marker=dict(color=colors), showlegend=False,
             text=[usd(m) for m in month], textposition="outside", cliponaxis=False, xaxis="x2", yaxis="y2"),
    ]
    title = (f"{context_label(prompt)}-token prompt, US$ per 1M input tokens: Gemini 3.1 Pro {usd(at[0])} vs "
             f"V4-Pro {usd(at[1])} ({at[0] / at[1]:.3g}x)"
             + (" · above 200K: Gemini doubled" if prompt > g.long_context_threshold else " · below 200K"))
    return {"traces": traces, "layout": {"title": {"text": title, "font": {"size": 13}}}}


LONG_LAYOUT = dict(xaxis=dict(domain=[0, 0.62], type="log", title="prompt length (tokens)"),
                   yaxis=dict(title="US$ per 1M input tokens", rangemode="tozero"),
                   xaxis2=dict(domain=[0.75, 1], anchor="y2"),
                   yaxis2=dict(title=f"US$ for {LONG_REQUESTS:,} such prompts", anchor="x2", rangemode="tozero"),
                   height=400, margin=dict(l=60, r=20, t=60, b=90),
                   legend=dict(orientation="h", yanchor="top", y=-0.18, xanchor="left", x=0))


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
                                            value=self.state["prompt"], description="prompt length",
                                            style=SLIDER_STYLE, layout=SLIDER_LAYOUT)}

    def sweep_values(self, control):
        return {"prompt": PROMPT_STOPS}[control]

    def on_prompt(self, v):
        self.set(prompt=v)


# --------------------------------------------------------------------------------------- Flash first
ESCALATION_STOPS = [i / 20 for i in range(21)]


def escalation_data(escalated: float = 0.1, input_m: float = 32, output_m: float = 1) -> dict:
    """Flash first, Pro on escalation. Left: the monthly bill vs the escalated fraction (moves with the
    token volumes). Right: the bill at ``escalated`` split into its Flash and Pro parts, and what it
    saves against sending everything to Pro.

    Traces: [0] blended bill over the fraction, [1] all-Pro line, [2] all-Flash line, [3] the point,
    [4] Flash part, [5] Pro part, [6] saved vs all-Pro (stacked bar)."""
    inp, out = input_m * 1e6, output_m * 1e6
    fr = ESCALATION_STOPS
    blended = [pricing.blended_cost(f, inp, out) for f in fr]
    pro, flash = pricing.cost("v4-pro", inp, out), pricing.cost("v4-flash", inp, out)
    b = pricing.blended_cost(escalated, inp, out)
    parts = [(1 - escalated) * flash, escalated * pro, pro - b]
    traces = [
        dict(type="scatter", mode="lines", x=fr, y=blended, name="Flash first, escalate to Pro",
             line=dict(color="#444")),
        dict(type="scatter", mode="lines", x=[0, 1], y=[pro, pro], name="everything on V4-Pro",
             line=dict(color=PRICE_COLORS["v4-pro"], dash="dash")),
        dict(type="scatter", mode="lines", x=[0, 1], y=[flash, flash], name="everything on V4-Flash",
             line=dict(color=PRICE_COLORS["v4-flash"], dash="dash")),
        dict(type="scatter", mode="markers+text", x=[escalated], y=[b], showlegend=False,
             marker=dict(size=11, color="#444"), text=[usd(b)],
             textposition="top left" if escalated > 0.5 else "top right"),
    ]
    for name, y, color in (("Flash part", parts[0], PRICE_COLORS["v4-flash"]),
                           ("Pro part", parts[1], PRICE_COLORS["v4-pro"]),
                           ("saved vs all-Pro", parts[2], "#d9d9d9")):
        traces.append(dict(type="bar", x=["this month"], y=[y], name=name, marker=dict(color=color),
                           text=[usd(y)], textposition="inside", xaxis="x2", yaxis="y2"))
    title = (f"{100 * escalated:.0f} % escalated, {input_m:g}M in + {output_m:g}M out (US$): {usd(b)} a month vs "
             f"{usd(pro)} all-Pro, {100 * parts[2] / pro:.3g} % saved"
             f"<br><sup>on traffic Flash could serve, Pro costs {pricing.overpay(inp / (inp + out)):.3g}x</sup>")
    return {"traces": traces, "layout": {"title": {"text": title, "font": {"size": 13}},
                                         "yaxis": dict(title="US$ per month", range=[0, 1.08 * pro])}}


ESC_LAYOUT = dict(xaxis=dict(domain=[0, 0.66], title="fraction of requests escalated to V4-Pro", tickformat=".0%"),
                  yaxis=dict(title="US$ per month", rangemode="tozero"),
                  xaxis2=dict(domain=[0.76, 1], anchor="y2"), yaxis2=dict(title="US$ per month", anchor="x2", rangemode="tozero"),
                  barmode="stack", height=420, margin=dict(l=60, r=20, t=70, b=100),
                  legend=dict(orientation="h", yanchor="top", y=-0.2, xanchor="left", x=0))


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
                                           description="escalated to Pro", readout_format=".0%",
                                           style=SLIDER_STYLE, layout=SLIDER_LAYOUT),
                "input_m": W.SelectionSlider(options=[(f"{v:g}M", v) for v in MONTH_INPUT_STOPS],
                                             value=self.state["input_m"], description="input tokens/month",
                                             style=SLIDER_STYLE, layout=SLIDER_LAYOUT),
                "output_m": W.SelectionSlider(options=[(f"{v:g}M", v) for v in MONTH_OUTPUT_STOPS],
                                              value=self.state["output_m"], description="output tokens/month",
                                              style=SLIDER_STYLE, layout=SLIDER_LAYOUT)}

    def sweep_values(self, control):
        return {"escalated": ESCALATION_STOPS, "input_m": MONTH_INPUT_STOPS, "output_m": MONTH_OUTPUT_STOPS}[control]

    def on_escalated(self, v):
        self.set(escalated=round(float(v), 4))

    def on_input_m(self, v):
        self.set(input_m=v)

    def on_output_m(self, v):
        self.set(output_m=v)


# --------------------------------------------------------------------------------------- roofline
OTHER_GPUS = ("H100", "A100")            # the older generation: tokens/s only (thin lines)
GPU_COLORS = {"H200": COLORS["H200"], "B200": COLORS["B200"], "H100": "#8c564b", "A100": "#7f7f7f"}
PUBLISHED_B200_RATIO = 3.0               # the report's "~3x" (a published serving figure)
NEAR_PUBLISHED = 2.7                     # "~3x" within 10 %


def sig3(x: float) -> str:
    """Three significant figures with thousands separators: 5606 → '5,610', 262.4 → '262', 1.674 → '1.67'."""
    v = float(f"{x:.3g}")
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


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
            for g in GPUS + OTHER_GPUS}


def roofline_data(model: str = "v4-pro", context: int = 2 ** 20, batch: int = 64, fp4_experts: bool = False) -> dict:
    """Left: the H200/B200 rooflines and this decode step on each. Middle: tokens/s per GPU vs batch
    (H200, B200; H100 and A100 thin). Right: B200/H200 vs batch, against the bandwidth ratio and the
    report's published ~3x.

    Traces: the roofs (fixed), then [H200 point, B200 point, 4 tokens/s curves, the batch points,
    ratio curve, bandwidth-ratio line, published-3x line, the ratio at this batch]."""
    check_choice("model", model, ROOF_MODELS)
    check_choice("context", context, CONTEXT_STOPS)
    check_choice("batch", batch, BATCH_STOPS)
    if not _ROOFS:
        _ROOFS.extend(_roof_traces())
    traces = [dict(t) for t in _ROOFS]
    r = {g: hardware.roofline(model, g, context, batch, fp4_experts) for g in GPUS}
    for g in GPUS:
        right = r[g]["intensity"] < 200                     # keep the label inside the panel
        traces.append(dict(type="scatter", mode="markers+text", x=[r[g]["intensity"]],
                           y=[r[g]["achieved_flops"] / 1e12], name=f"{LABELS[model]} on {g}", legendgroup=g,
                           marker=dict(size=12, color=COLORS[g], symbol="diamond"),
                           text=[f"{sig3(r[g]['achieved_flops'] / 1e12)} TFLOP/s"],
                           textposition="bottom right" if right else "bottom left",
                           xaxis="x", yaxis="y", showlegend=False))
    curves = _tokens_curves(model, context, fp4_experts)
    for g in GPUS + OTHER_GPUS:
        thin = g in OTHER_GPUS
        traces.append(dict(type="scatter", mode="lines", x=BATCH_STOPS, y=curves[g], name=f"{g} tokens/s",
                           legendgroup=g, showlegend=thin,
                           line=dict(color=GPU_COLORS[g], width=1 if thin else 2, dash="dot" if thin else "solid"),
                           xaxis="x2", yaxis="y2"))
    traces.append(dict(type="scatter", mode="markers", x=[batch, batch],
                       y=[r[g]["tokens_per_s"] for g in GPUS], showlegend=False,
                       marker=dict(size=10, color=[COLORS[g] for g in GPUS]), xaxis="x2", yaxis="y2"))
    ratio = [b / h for h, b in zip(curves["H200"], curves["B200"])]
    bw = hardware.bandwidth("B200") / hardware.bandwidth("H200")
    here = r["B200"]["tokens_per_s"] / r["H200"]["tokens_per_s"]
    traces += [
        dict(type="scatter", mode="lines", x=BATCH_STOPS, y=ratio, name="B200 / H200 (roofline)",
             line=dict(color=COLORS["B200"], width=2), xaxis="x3", yaxis="y3", showlegend=False),
        dict(type="scatter", mode="lines", x=[BATCH_STOPS[0], BATCH_STOPS[-1]], y=[bw, bw],
             name=f"bandwidth ratio {bw:.3g}x", line=dict(color="#555", dash="dot", width=1), xaxis="x3", yaxis="y3"),
        dict(type="scatter", mode="lines", x=[BATCH_STOPS[0], BATCH_STOPS[-1]],
             y=[PUBLISHED_B200_RATIO] * 2, name="~3x published (serving)",
             line=dict(color="#d62728", dash="dash", width=1), xaxis="x3", yaxis="y3"),
        dict(type="scatter", mode="markers+text", x=[batch], y=[here], showlegend=False,
             marker=dict(size=10, color=COLORS["B200"]), text=[f"{here:.3g}x"],
             textposition="top left" if batch > 64 else "top right", xaxis="x3", yaxis="y3"),
    ]
    h, b = r["H200"], r["B200"]
    # = hardware.first_batch_reaching(NEAR_PUBLISHED, ...) over BATCH_STOPS, from the cached curves
    near = next((bb for bb, q in zip(BATCH_STOPS, ratio) if q >= NEAR_PUBLISHED), None)
    where = (f"~3x (≥{NEAR_PUBLISHED:g}x) from batch {near:,}" if near else
             f"never ~3x here (max {max(ratio):.3g}x{'' if fp4_experts else '; try FP4 x FP4 experts'})")
    title = (f"{LABELS[model]}, {context_label(context)} context, batch {batch:,}: {h['bound']}-bound on H200 · "
             f"H200 {sig3(h['tokens_per_s'])}, B200 {sig3(b['tokens_per_s'])} tokens/s per GPU ({here:.3g}x)"
             f"<br><sup>{sig3(h['intensity'])} FLOP/B · KV held {sig3(h['kv_cache_bytes'] / 1e9)} GB · weights read "
             f"{sig3(h['weight_bytes'] / 1e9)} GB/step ({100 * h['experts_touched_fraction']:.3g} % of experts) · "
             f"{where}</sup>")
    return {"traces": traces, "layout": {"title": {"text": title, "font": {"size": 12}}}}


ROOF_LAYOUT = dict(
    height=520, margin=dict(l=60, r=20, t=80, b=130),
    legend=dict(orientation="h", yanchor="top", y=-0.2, xanchor="left", x=0, font=dict(size=11)),
    xaxis=dict(domain=[0, 0.36], type="log", title="FLOP per byte read"),
    yaxis=dict(type="log", title="TFLOP/s per GPU", range=[0, 4.1]),
    xaxis2=dict(domain=[0.44, 0.70], type="log", title="batch (sequences)", anchor="y2"),
    yaxis2=dict(type="log", title="tokens/s per GPU", anchor="x2"),
    xaxis3=dict(domain=[0.78, 1], type="log", title="batch (sequences)", anchor="y3"),
    yaxis3=dict(title="B200 / H200 tokens/s", anchor="x3", range=[1, 3.5]),
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
                                description="model", style=STYLE),
            "batch": W.SelectionSlider(options=[(f"{b:,}", b) for b in BATCH_STOPS], value=self.state["batch"],
                                       description="batch", style=SLIDER_STYLE, layout=SLIDER_LAYOUT),
            "context": W.SelectionSlider(options=[(context_label(v), v) for v in CONTEXT_STOPS],
                                         value=self.state["context"], description="context",
                                         style=SLIDER_STYLE, layout=SLIDER_LAYOUT),
            "fp4_experts": W.Checkbox(value=self.state["fp4_experts"], description="FP4 x FP4 expert GEMMs",
                                      style=STYLE),
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
    """The GPU peak figures from hardware.json (dense, approximate; 'none' = no such tensor cores)."""
    lines = [f"{'GPU':<6} {'HBM TB/s':>8} {'BF16':>6} {'FP8':>6} {'FP4':>6}  TFLOP/s dense (approximate)"]
    for name, g in hardware.gpus().items():
        t = g["tflops"]

        def cell(p: str, t: dict = t) -> str:            # t bound now: the loop rebinds it
            return "  none" if t.get(p) is None else f"{t[p]:>6g}"

        lines.append(f"{name:<6} {g['hbm_tb_s']:>8g} {cell('bf16')} {cell('fp8')} {cell('fp4')}")
    return "\n".join(lines)


def decode_table(context: int = 2 ** 20, batches=(1, 64, 1024, 16384), fp4_experts: bool = False) -> str:
    """tokens/s per GPU and the bound, for the roofline's models on every GPU (plain numbers)."""
    names = list(hardware.gpus())
    lines = [f"decode at {context_label(context)} context: tokens/s per GPU (roofline, no overheads"
             f"{'; FP4 x FP4 expert GEMMs' if fp4_experts else ''})",
             f"{'model':<9} {'batch':>5} {'FLOP/B':>7} " + " ".join(f"{n:>8}" for n in names) + f" {'B200/H200':>9}  bound H200/B200"]
    for m in ROOF_MODELS:
        for b in batches:
            r = {n: hardware.roofline(m, n, context, b, fp4_experts) for n in names}
            lines.append(f"{LABELS[m]:<9} {b:>5} {r['H200']['intensity']:>7.1f} "
                         + " ".join(f"{r[n]['tokens_per_s']:>8,.0f}" for n in names)
                         + f" {r['B200']['tokens_per_s'] / r['H200']['tokens_per_s']:>9.2f}  "
                         f"{r['H200']['bound']}/{r['B200']['bound']}")
    return "\n".join(lines)


def b200_ratio_table(context: int = 4096, model: str = "v4-pro") -> str:
    """B200/H200 tokens/s over the batch, with FP8 and FP4 expert GEMMs: where the roofline meets ~3x."""
    bw = hardware.bandwidth("B200") / hardware.bandwidth("H200")
    lines = [f"{LABELS[model]} at {context_label(context)} context: B200/H200 tokens/s per GPU (roofline); "
             f"bandwidth ratio {bw:.3g}x, the report's published serving figure ~{PUBLISHED_B200_RATIO:g}x",
             f"{'batch':>6} {'FP8 experts':>12} {'FP4 experts':>12}  bound (H200)"]
    for b in (1, 64, 512, 1024, 2048, 4096, 8192, 16384):
        a = hardware.speedup(model, context, b)
        f = hardware.speedup(model, context, b, fp4_experts=True)
        lines.append(f"{b:>6,} {a:>12.3g} {f:>12.3g}  {hardware.roofline(model, 'H200', context, b)['bound']}")
    for fp4 in (False, True):
        near = hardware.first_batch_reaching(NEAR_PUBLISHED, model, context, BATCH_STOPS, fp4_experts=fp4)
        lines.append(f"{'FP4' if fp4 else 'FP8'} expert GEMMs: "
                     + (f"first batch at >= {NEAR_PUBLISHED:g}x: {near:,}" if near else
                        f"never >= {NEAR_PUBLISHED:g}x (max {max(hardware.speedup(model, context, b, fast='B200', fp4_experts=fp4) for b in BATCH_STOPS):.3g}x)"))
    return "\n".join(lines)
