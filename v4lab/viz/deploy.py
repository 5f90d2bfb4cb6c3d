"""Notebook 11: deploying V4 — the routing calculator and the "wrong choice" checklist.

Numbers come from :mod:`v4lab.deploy` (facts.json, prices.json); this module only draws them. Plotly
reads two ``$`` in one string as LaTeX and hides it, so every text here carries at most one ``$``
(amounts in US$ are written once per string, the unit said in the axis title).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from v4lab import deploy, pricing
from v4lab.viz.common import Widget, check_choice, check_range, figure_from, register

if TYPE_CHECKING:
    from datetime import date, datetime

    import ipywidgets
    import plotly.graph_objects as go

TURN_STOPS = [100, 300, 1000, 3000, 10000, 30000, 100000, 300000, 1000000]
# prompt tokens per turn, decimal K like API price pages (32K = 32,000: the report's 32M-token month)
CONTEXT_STOPS = [1000, 2000, 4000, 8000, 16000, 32000, 64000, 128000, 200000, 256000, 512000, 1000000]
OUTPUT_STOPS = [250, 500, 1000, 2000, 4000, 8000, 16000]
SHARE_STOPS = [i / 20 for i in range(21)]
# one colour per strategy (qualitative); V4 colours as in every other notebook
STRATEGY_COLORS = {"flash": "#1f77b4", "routed": "#17becf", "pro": "#d62728", "opus-4.7": "#ff7f0e",
                   "gemini-3.1-pro": "#9467bd", "gpt-5.5": "#2ca02c"}
SLIDER_STYLE = {"description_width": "160px"}


def kilo(n: int) -> str:
    """1000 → '1K', 32000 → '32K', 1000000 → '1M' (decimal, as price pages count)."""
    for unit, size in (("M", 10 ** 6), ("K", 10 ** 3)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return f"{n:,}"


def money(x: float) -> str:
    """Three significant figures (whole dollars from 100 up), no $ sign: the axis or title says US$."""
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}" if x >= 1 else f"{x:.3g}"


# --------------------------------------------------------------------------------------- routing
def routing_data(turns: int = 1000, context: int = 32000, output: int = 1000, pro_share: float = 0.2,
                 hard_share: float = 0.2, thinking: bool = False) -> dict:
    """Monthly bill per strategy (horizontal bars, log scale).

    Traces: [0] the priced bills, [1] GPT-5.5's output-only part, hatched (its input price is
    unknown, so its bill is unknown: the bar is a lower bound, never a total)."""
    r = deploy.route(turns, context, output, pro_share, hard_share, thinking)
    known = [k for k in deploy.STRATEGIES if r["bills"][k] is not None]
    unknown = [k for k in deploy.STRATEGIES if r["bills"][k] is None]
    labels = deploy.STRATEGY_LABELS
    traces = [
        dict(type="bar", orientation="h", y=[labels[k] for k in known], x=[r["bills"][k] for k in known],
             name="monthly bill", marker=dict(color=[STRATEGY_COLORS[k] for k in known]),
             text=[money(r["bills"][k]) for k in known], textposition="outside", cliponaxis=False,
             hovertext=[_hover(k, r) for k in known], showlegend=False),
        dict(type="bar", orientation="h", y=[labels[k] for k in unknown], x=[r["known_part"][k] for k in unknown],
             name="input price unknown: output part only (a lower bound)",
             marker=dict(color=[STRATEGY_COLORS[k] for k in unknown], pattern=dict(shape="/"),
                         opacity=0.45),
             text=[f"≥ {money(r['known_part'][k])} (input price unknown)" for k in unknown],
             textposition="outside", cliponaxis=False, showlegend=True),
    ]
    b = r["bills"]
    notes = [f"Pro everywhere pays {r['overpay']:.1f}x on the {100 * r['easy_share']:.0f} % of turns Flash could serve"]
    if r["at_risk_share"] > 0:
        notes.append(f"{100 * r['at_risk_share']:.0f} % of turns are hard but stay on Flash (the Flash-everywhere trap)")
    elif r["overpaid_share"] > 0:
        notes.append(f"{100 * r['overpaid_share']:.0f} % of turns go to Pro without needing it")
    else:
        notes.append("every hard turn reaches Pro, no easy one does")
    if r["gemini_surcharged"]:
        notes.append("prompt above 200K: Gemini's input rate doubled, V4-Pro flat")
    title = (f"{r['input_tokens'] / 1e6:,.3g}M in + {r['output_tokens'] / 1e6:,.3g}M out a month (US$): "
             f"Flash {money(b['flash'])} · routed {money(b['routed'])}<br>Pro {money(b['pro'])} · "
             f"Opus {money(b['opus-4.7'])}<br><sup>{'<br>'.join(notes)}</sup>")
    return {"traces": traces, "layout": {"title": {"text": title, "font": {"size": 13}}}}


def _hover(k: str, r: dict) -> str:
    if k == "routed":
        return f"{100 * r['pro_share']:.0f} % of turns on V4-Pro, the rest on V4-Flash"
    model = {"flash": "v4-flash", "pro": "v4-pro"}.get(k, k)
    p = pricing.price(model)
    return f"{p.label}<br>input: {p.mark('input')}<br>output: {p.mark('output')}"


ROUTING_LAYOUT = dict(height=500, margin=dict(l=160, r=170, t=160, b=90),
                      xaxis=dict(type="log", title="US$ per month (log scale)", dtick="D2"),
                      yaxis=dict(autorange="reversed", categoryorder="array",
                                 categoryarray=[deploy.STRATEGY_LABELS[k] for k in deploy.STRATEGIES]),
                      legend=dict(orientation="h", yanchor="top", y=-0.2, xanchor="left", x=0), barmode="overlay")


def build_routing(**kw: Any) -> go.Figure:
    return figure_from(routing_data(**kw), ROUTING_LAYOUT)


@register
class RoutingWidget(Widget):
    """The routing calculator: a month of traffic on Flash, Pro, Flash + escalation and the closed models."""

    name = "deploy.routing"
    defaults = {"turns": 1000, "context": 32000, "output": 1000, "pro_share": 0.2, "hard_share": 0.2,
                "thinking": False}

    def validate(self, s: dict) -> None:
        check_choice("turns", s["turns"], TURN_STOPS)
        check_choice("context", s["context"], CONTEXT_STOPS)
        check_choice("output", s["output"], OUTPUT_STOPS)
        check_range("pro_share", s["pro_share"], 0.0, 1.0)
        check_range("hard_share", s["hard_share"], 0.0, 1.0)
        check_choice("thinking", s["thinking"], (True, False))

    def data(self) -> dict:
        return routing_data(**self.state)

    def layout(self) -> dict:
        return ROUTING_LAYOUT

    def make_controls(self) -> dict[str, ipywidgets.Widget]:
        import ipywidgets as W
        lay = W.Layout(width="420px")

        def sel(stops: list[int], fmt: Callable[[int], str], v: int, d: str) -> W.SelectionSlider:
            return W.SelectionSlider(options=[(fmt(x), x) for x in stops], value=v,
                                     description=d, style=SLIDER_STYLE, layout=lay)

        def share(v: float, d: str) -> W.FloatSlider:
            return W.FloatSlider(value=v, min=0, max=1, step=0.05, readout_format=".0%",
                                 description=d, style=SLIDER_STYLE, layout=lay)

        s = self.state
        return {
            "turns": sel(TURN_STOPS, lambda x: f"{x:,}", s["turns"], "turns per month"),
            "context": sel(CONTEXT_STOPS, kilo, s["context"], "prompt tokens/turn"),
            "output": sel(OUTPUT_STOPS, kilo, s["output"], "output tokens/turn"),
            "pro_share": share(s["pro_share"], "share sent to Pro"),
            "hard_share": share(s["hard_share"], "share of hard turns"),
            "thinking": W.Checkbox(value=s["thinking"], style={"description_width": "initial"}, indent=False,
                                   layout=W.Layout(width="auto"),
                                   description=f"Thinking on (+{kilo(deploy.fact('thinking_output_tokens'))} output "
                                               "tokens per turn, v4lab's assumption)"),
        }

    def sweep_values(self, control: str) -> list:
        return {"turns": TURN_STOPS, "context": CONTEXT_STOPS, "output": OUTPUT_STOPS, "pro_share": SHARE_STOPS,
                "hard_share": SHARE_STOPS, "thinking": [True, False]}[control]

    def on_turns(self, v: int) -> None:
        self.set(turns=int(v))

    def on_context(self, v: int) -> None:
        self.set(context=int(v))

    def on_output(self, v: int) -> None:
        self.set(output=int(v))

    def on_pro_share(self, v: float) -> None:
        self.set(pro_share=round(float(v), 4))

    def on_hard_share(self, v: float) -> None:
        self.set(hard_share=round(float(v), 4))

    def on_thinking(self, v: bool) -> None:
        self.set(thinking=bool(v))


# --------------------------------------------------------------------------------------- checklist
def checklist_data(checked: tuple = ()) -> dict:
    """The seven conditions as a table; the rows that apply turn red; the title is the verdict.

    Traces: [0] a table (condition, the figure behind it, what the report suggests instead)."""
    conds = deploy.conditions()
    v = deploy.verdict(checked)
    on = [c["key"] in checked for c in conds]
    fill = ["#f8d7da" if x else "#ffffff" for x in on]
    mark = ["✗ applies" if x else "–" for x in on]
    traces = [dict(type="table", columnwidth=[70, 330, 300, 260],
                   header=dict(values=["<b>applies?</b>", "<b>condition</b>", "<b>the figure behind it</b>",
                                       "<b>instead (the report)</b>"],
                               fill=dict(color="#eeeeee"), align="left", font=dict(size=12)),
                   cells=dict(values=[mark, [c["condition"] for c in conds], [c["figure"] for c in conds],
                                      [c["alternative"] for c in conds]],
                              fill=dict(color=[fill] * 4), align="left", font=dict(size=11), height=30))]
    if v["fits"]:
        title = "Verdict: none of the seven applies, so V4 fits (the report's default for most workloads)"
    else:
        first = v["hits"][0]
        more = f" and {len(v['hits']) - 1} more" if len(v["hits"]) > 1 else ""
        title = (f"Verdict: V4 is the wrong choice ({len(v['hits'])} of 7 apply)<br><sup>"
                 f"{first['condition']}<br>→ {first['alternative']}{more}</sup>")
    return {"traces": traces, "layout": {"title": {"text": title, "font": {"size": 13}}}}


CHECK_LAYOUT = dict(height=450, margin=dict(l=10, r=10, t=90, b=10))


def build_checklist(**kw: Any) -> go.Figure:
    return figure_from(checklist_data(**kw), CHECK_LAYOUT)


def _condition_keys() -> list[str]:
    return [c["key"] for c in deploy.conditions()]


class _ChecklistBase(Widget):
    name = ""
    defaults = {k: False for k in ("multimodal", "geopolitical", "strict_format", "knowledge_breadth",
                                   "procurement", "long_horizon", "latency")}

    def validate(self, s):
        if set(s) != set(_condition_keys()):           # facts.json and the widget name the same seven
            raise ValueError(f"checklist: conditions {sorted(s)} differ from facts.json's {sorted(_condition_keys())}")
        for k, v in s.items():
            check_choice(k, v, (True, False))

    def data(self):
        return checklist_data(tuple(k for k in _condition_keys() if self.state[k]))

    def layout(self):
        return CHECK_LAYOUT

    def make_controls(self):
        import ipywidgets as W
        conds = {c["key"]: c for c in deploy.conditions()}
        return {k: W.Checkbox(value=self.state[k], description=conds[k]["condition"], indent=False,
                              layout=W.Layout(width="100%")) for k in _condition_keys()}

    def box(self):
        import ipywidgets as W
        return W.VBox([W.VBox(list(self.controls.values())), self.fig])

    def sweep_values(self, control):
        return [True, False]


def _toggle(key):
    def on(self, v):
        self.set(**{key: v})          # a Checkbox sends a bool; anything else is refused by validate
    on.__name__ = f"on_{key}"
    return on


@register
class ChecklistWidget(_ChecklistBase):
    """The seven "V4 is the wrong choice" conditions as toggles; the verdict names the alternative."""

    name = "deploy.checklist"
    on_multimodal = _toggle("multimodal")
    on_geopolitical = _toggle("geopolitical")
    on_strict_format = _toggle("strict_format")
    on_knowledge_breadth = _toggle("knowledge_breadth")
    on_procurement = _toggle("procurement")
    on_long_horizon = _toggle("long_horizon")
    on_latency = _toggle("latency")


# --------------------------------------------------------------------------------------- text blocks
def unknown_cards_html() -> str:
    """"What we don't know yet" as cards (HTML for the notebook)."""
    out = ['<div style="display:flex;flex-wrap:wrap;gap:10px">']
    for c in deploy.unknown_cards():
        extra = f'<p style="margin:4px 0;color:#1f4e79"><i>{c["v4lab"]}</i></p>' if c.get("v4lab") else ""
        out.append('<div style="flex:1 1 260px;border:1px solid #ccc;border-radius:6px;padding:8px 10px">'
                   f'<b>{c["title"]}</b><p style="margin:4px 0">{c["text"]}</p>{extra}'
                   f'<p style="margin:4px 0;color:#777;font-size:90%">source: {c["source"]}</p></div>')
    out.append("</div>")
    return "".join(out)


def ics_download_html(now: datetime | date | None = None) -> str:
    """A download link holding the reminder (.ics) as a data URI (no file is written)."""
    import base64
    b64 = base64.b64encode(deploy.reminder_ics(now).encode("utf-8")).decode("ascii")
    return (f'<a download="v4-migration-reminder.ics" href="data:text/calendar;charset=utf-8;base64,{b64}">'
            f"⬇ v4-migration-reminder.ics</a> (all-day event on {deploy.reminder_day().isoformat()}; "
            "or run <code>v4lab remind --ics FILE</code>)")
