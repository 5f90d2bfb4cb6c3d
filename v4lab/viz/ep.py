"""Notebook 01, last section: expert parallelism in a simulated world (ranks as a loop, no processes).

:class:`EPWidget` runs ``v4lab.expert_parallel.simulate`` — the same plan, grouped experts and combine as
the multi-process ``ep_forward`` — on one batch of a toy MoE layer (32 experts, top-4, 48 tokens per rank,
hidden 128) whose affinities prefer low expert ids (``skew``), so the first ranks get crowded:

* left: the batch's (token, expert) rows flowing from the rank that holds the token to the rank that holds
  the expert, after ``bias_steps`` aux-loss-free bias updates (``v4lab.moe.bias_update``, gamma 0.001,
  applied to this batch's global load each time, as every rank would after the all-reduce);
* top right: rows each rank's experts receive, without any bias update and after ``bias_steps`` of them;
* bottom right: bytes on the wire per token per MoE layer for V4-Pro at EP 32, FP8 vs BF16 dispatch
  (BF16 combine), counted by ``v4lab.expert_parallel.world_traffic`` on 32 simulated ranks with uniform
  random routing and 7168-wide rows, beside the analytic ``v4lab.accounting.ep_all_to_all``.
"""
from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

import plotly.colors
import torch

from v4lab import accounting
from v4lab import expert_parallel as EP
from v4lab.config import get_config
from v4lab.gate import gate_scores, route_weights, select_topk
from v4lab.moe import bias_update, expert_ffn, expert_load, load_imbalance
from v4lab.viz.common import Widget, check_choice, register

if TYPE_CHECKING:
    import plotly.graph_objects as go

SIM_E, SIM_K, SIM_T, SIM_D, SIM_I = 32, 4, 48, 128, 32
GAMMA = 0.001                      # V4's bias update speed
RANK_STOPS = [2, 4, 8]
STEP_STOPS = [0, 25, 50, 100, 200, 400]
SKEW_STOPS = [0.0, 0.25, 0.5, 0.75, 1.0]
PALETTE = plotly.colors.qualitative.D3
WIRE_MODEL, WIRE_EP, WIRE_TOKENS = "v4-pro", 32, 16          # 16 decode tokens on each of 32 ranks


@lru_cache(maxsize=16)
def toy_world(ranks: int, skew: float) -> tuple[torch.Tensor, torch.Tensor, tuple[list[torch.Tensor], ...]]:
    """(scores [R*T, E], x [R*T, D], (w1s, w2s, w3s)) of the toy layer; fixed seed."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(ranks * SIM_T, SIM_E, generator=g) * 0.5 + skew * torch.linspace(1, -1, SIM_E)
    x = torch.randn(ranks * SIM_T, SIM_D, generator=g)
    ws = tuple([torch.randn(*shape, generator=g) * 0.05 for _ in range(SIM_E)]
               for shape in ((SIM_I, SIM_D), (SIM_D, SIM_I), (SIM_I, SIM_D)))
    return gate_scores(z), x, ws


@lru_cache(maxsize=64)
def bias_after(ranks: int, skew: float, steps: int) -> torch.Tensor:
    """The router bias after ``steps`` sign-rule updates on the batch's global load."""
    s = toy_world(ranks, skew)[0]
    bias = torch.zeros(SIM_E)
    for _ in range(steps):
        bias_update(bias, expert_load(select_topk(s, bias, SIM_K), SIM_E), GAMMA)
    return bias


def ep_world(ranks: int = 4, bias_steps: int = 100, skew: float = 0.5) -> dict:
    """The simulated world with and without the bias: {"none"|"bias": {"idx", "weights", "outs", "records"}}."""
    s, x, ws = toy_world(ranks, skew)
    out = {}
    for key, steps in (("none", 0), ("bias", bias_steps)):
        idx = select_topk(s, bias_after(ranks, skew, steps), SIM_K)
        w = route_weights(s, idx, 1.0)
        with torch.no_grad():
            outs, recs = EP.simulate(list(x.split(SIM_T)), list(idx.split(SIM_T)), list(w.split(SIM_T)),
                                     *ws, 0.0, ranks, ffn=expert_ffn)
        out[key] = {"idx": idx, "weights": w, "outs": outs, "records": recs}
    return out


@lru_cache(maxsize=1)
def wire_per_token() -> dict:
    """V4-Pro at EP 32: dispatch/combine bytes per token per layer, simulated (uniform routing) and analytic."""
    cfg = get_config(WIRE_MODEL)
    E, K, D = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.hidden_size
    g = torch.Generator().manual_seed(0)
    idxs = [torch.rand(WIRE_TOKENS, E, generator=g).argsort(-1)[:, :K] for _ in range(WIRE_EP)]
    n = WIRE_EP * WIRE_TOKENS
    res = {"layers": accounting.ep_all_to_all(cfg, WIRE_EP)["moe_layers"]}
    for name, fp8 in (("fp8", True), ("bf16", False)):
        recs = EP.world_traffic(idxs, E, WIRE_EP, D, fp8=fp8, x_bytes=2, y_bytes=2)
        an = accounting.ep_all_to_all(cfg, WIRE_EP, dispatch=name, combine="bf16")["remote_per_layer"]
        res[name] = {"dispatch": sum(r["dispatch_bytes"] for r in recs) / n,
                     "combine": sum(r["combine_bytes"] for r in recs) / n,
                     "analytic_dispatch": an["dispatch"], "analytic_combine": an["combine"]}
    return res


def _flow_trace(recs: list[dict], ranks: int) -> dict:
    n = SIM_E // ranks
    labels = [f"rank {i} tokens" for i in range(ranks)] + [f"rank {j}: experts {j * n}-{(j + 1) * n - 1}"
                                                           for j in range(ranks)]
    src, dst, val, col = [], [], [], []
    for i, r in enumerate(recs):
        for j, rows in enumerate(r["send_rows"]):
            if rows:
                src.append(i)
                dst.append(ranks + j)
                val.append(rows)
                col.append("rgba(180,180,180,0.6)" if i == j else _rgba(PALETTE[i], 0.55))
    return dict(type="sankey", domain=dict(x=[0, 0.44], y=[0, 1]), arrangement="fixed",
                node=dict(label=labels, color=[PALETTE[i] for i in range(ranks)] * 2, pad=8, thickness=14,
                          x=[0.001] * ranks + [0.999] * ranks, y=[(i + 0.5) / ranks for i in range(ranks)] * 2),
                link=dict(source=src, target=dst, value=val, color=col,
                          hovertemplate="%{source.label} → %{target.label}: %{value} rows<extra></extra>"))


def _rgba(hex_color: str, alpha: float) -> str:
    r, g, b = plotly.colors.hex_to_rgb(hex_color)
    return f"rgba({r},{g},{b},{alpha})"


def ep_data(ranks: int = 4, bias_steps: int = 100, skew: float = 0.5) -> dict:
    world = ep_world(ranks, bias_steps, skew)
    loads = {k: torch.tensor([sum(r["recv_rows"]) for r in v["records"]], dtype=torch.float32)
             for k, v in world.items()}
    imb = {k: load_imbalance(v) for k, v in loads.items()}
    remote = sum(r["remote_pairs"] for r in world["bias"]["records"]) / (ranks * SIM_T * SIM_K)
    xr = [f"rank {j}" for j in range(ranks)]
    wire = wire_per_token()
    kib = 1024.0
    parts = ["dispatch", "combine"]
    traces = [_flow_trace(world["bias"]["records"], ranks),
              dict(type="bar", x=xr, y=loads["none"].tolist(), name="no bias update", marker_color="#9e9e9e",
                   xaxis="x", yaxis="y", legendgroup="load"),
              dict(type="bar", x=xr, y=loads["bias"].tolist(), name=f"after {bias_steps} bias updates",
                   marker_color="#2ca02c", xaxis="x", yaxis="y", legendgroup="load"),
              dict(type="bar", x=parts, y=[wire["fp8"][p] / kib for p in parts], name="FP8 dispatch (V4)",
                   marker_color="#1f77b4", xaxis="x2", yaxis="y2", legendgroup="wire",
                   text=[f"{wire['fp8'][p] / kib:.3g}" for p in parts], textposition="outside"),
              dict(type="bar", x=parts, y=[wire["bf16"][p] / kib for p in parts], name="BF16 dispatch",
                   marker_color="#ff7f0e", xaxis="x2", yaxis="y2", legendgroup="wire",
                   text=[f"{wire['bf16'][p] / kib:.3g}" for p in parts], textposition="outside"),
              dict(type="scatter", mode="markers", x=parts * 2,
                   y=[wire[d][f"analytic_{p}"] / kib for d in ("fp8", "bf16") for p in parts],
                   name="analytic (accounting)", marker=dict(symbol="line-ew-open", size=22, color="#000000"),
                   xaxis="x2", yaxis="y2", legendgroup="wire")]
    tot = {d: wire["layers"] * (wire[d]["dispatch"] + wire[d]["combine"]) / 2 ** 20 for d in ("fp8", "bf16")}
    return {"traces": traces, "layout": {
        "title": dict(text=f"{ranks} ranks, {SIM_T} tokens each, top-{SIM_K} of {SIM_E} experts: "
                           f"{100 * remote:.3g}% of rows leave their rank", x=0.01),
        "annotations": [
            dict(text=f"rows per rank: max/mean {imb['none']:.3g} without, {imb['bias']:.3g} with the bias",
                 x=0.56, y=1.06, xref="paper", yref="paper", showarrow=False, xanchor="left"),
            dict(text=f"V4-Pro EP {WIRE_EP}, all {wire['layers']} layers: {tot['fp8']:.3g} MiB FP8, "
                      f"{tot['bf16']:.3g} MiB BF16 per token",
                 x=0.56, y=0.43, xref="paper", yref="paper", showarrow=False, xanchor="left"),
            dict(text="token rank → expert rank; grey rows stay on their rank (no wire)", x=0.0, y=-0.06,
                 xref="paper", yref="paper", showarrow=False, xanchor="left")]}}


EP_LAYOUT = dict(height=560, barmode="group", margin=dict(l=20, r=20, t=80, b=50),
                 legend=dict(orientation="h", y=-0.1, x=0.56, xanchor="left"),
                 xaxis=dict(domain=[0.56, 1], anchor="y"), yaxis=dict(domain=[0.58, 1], title="rows received"),
                 xaxis2=dict(domain=[0.56, 1], anchor="y2"),
                 yaxis2=dict(domain=[0, 0.36], anchor="x2", title="KiB per token per layer"))


def build_ep(ranks: int = 4, bias_steps: int = 100, skew: float = 0.5) -> go.Figure:
    from v4lab.viz.common import figure_from
    return figure_from(ep_data(ranks, bias_steps, skew), EP_LAYOUT)


@register
class EPWidget(Widget):
    """Ranks, bias updates and routing skew → the token flow, per-rank load and bytes on the wire."""

    name = "ep.flow"
    defaults = {"ranks": 4, "bias_steps": 100, "skew": 0.5}

    def validate(self, state: dict) -> None:
        check_choice("ranks", state["ranks"], RANK_STOPS)
        check_choice("bias_steps", state["bias_steps"], STEP_STOPS)
        check_choice("skew", state["skew"], SKEW_STOPS)

    def data(self) -> dict:
        return ep_data(**self.state)

    def layout(self) -> dict:
        return EP_LAYOUT

    def make_controls(self) -> dict:
        import ipywidgets as W
        return {"ranks": W.SelectionSlider(options=RANK_STOPS, value=self.state["ranks"], description="ranks",
                                      style={"description_width": "100px"}),
                "bias_steps": W.SelectionSlider(options=STEP_STOPS, value=self.state["bias_steps"],
                                                description="bias updates",
                                                style={"description_width": "100px"}),
                "skew": W.SelectionSlider(options=SKEW_STOPS, value=self.state["skew"], description="skew",
                                     style={"description_width": "100px"})}

    def sweep_values(self, control: str) -> list:
        return {"ranks": RANK_STOPS, "bias_steps": STEP_STOPS, "skew": SKEW_STOPS}[control]

    def on_ranks(self, value: int) -> None:
        self.set(ranks=value)

    def on_bias_steps(self, value: int) -> None:
        self.set(bias_steps=value)

    def on_skew(self, value: float) -> None:
        self.set(skew=value)
