"""Exercises of notebook 01 (MoE expansion): the gate, the bias knob and the parameter count."""
from __future__ import annotations

import torch

from v4lab import accounting, gate, get_config, moe
from v4lab.config import V4Config
from v4lab.exercises import Answer, exercise

BIAS_LAYER, BIAS_EXPERT, BIAS_DELTA = 1, 5, 0.5
LOGITS = (0.0, 0.0, 4.0, 8.0)
BIG_V3 = {"n_routed_experts": 512}
LOADS = (10.0, 2.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5)     # tokens per step, frozen; mean 1.9375: experts 0 and 1 above it


def bias_move(text: str | None = None) -> dict:
    """`moe.bias_sensitivity` of expert BIAS_EXPERT in layer BIAS_LAYER of the trained model, on the sample text."""
    from v4lab.viz import moe as moe_viz
    routes = moe_viz.route_text(moe_viz.DEFAULT_TEXT if text is None else text)
    r = routes["layers"][BIAS_LAYER]
    s = moe.bias_sensitivity(r["scores"], r["bias"], BIAS_EXPERT, BIAS_DELTA, r["k"], r["n_group"], r["topk_group"])
    return {"route": r, "sens": s, "tokens": len(routes["tokens"])}


@exercise("01.bias_share")
def _bias_share() -> Answer:
    m = bias_move()
    r, joined = m["route"], int(m["sens"]["joined"].sum())
    share = joined / m["tokens"]
    biased = r["scores"] + (0 if r["bias"] is None else r["bias"])
    top = biased.sort(-1, descending=True).values                       # [T, E]
    gap = float((top[:, r["k"] - 1] - top[:, r["k"]]).median())
    return Answer(share, f"{joined} of {m['tokens']} tokens join expert {BIAS_EXPERT} ({100 * share:.0f}%). A token "
                         f"joins when expert {BIAS_EXPERT}'s biased affinity + {BIAS_DELTA} beats the last of its "
                         f"top-{r['k']}; on this layer the median gap between a token's last chosen and first "
                         f"rejected expert is only {gap:.3f}, so +{BIAS_DELTA} is a large push (V4's gamma = 0.001 "
                         f"per step would take {BIAS_DELTA / 0.001:.0f} steps to move a bias that far). "
                         "Within ±0.1 counts.", abs_tol=0.1)


def custom_v3(**change: object) -> V4Config:
    """V3's config with ``change`` applied (validated by ``V4Config.replace``)."""
    return get_config("v3").replace(name="v3-custom", **change)


@exercise("01.big_v3_total")
def _big_v3_total() -> Answer:
    big, v3 = accounting.params(custom_v3(**BIG_V3)), accounting.params("v3")
    total = big["total"] / 1e9
    return Answer(total, f"{total:.0f}B (V3: {v3['total'] / 1e9:.0f}B). Routed parameters are L x E x 3dI, so doubling "
                         f"E doubles the routed part, {v3['by_component']['routed_experts'] / 1e9:.0f}B of V3's "
                         f"{v3['total'] / 1e9:.0f}B; the active count stays at {big['active'] / 1e9:.1f}B because "
                         "top-8 experts still run per token. Within 10% counts.", rel_tol=0.1)


@exercise("01.top_weight")
def _top_weight() -> Answer:
    z = torch.tensor([LOGITS])
    s = gate.gate_scores(z, "sqrtsoftplus")
    idx = gate.select_topk(s, None, 2)
    w = gate.route_weights(s, idx, route_scale=1.0)
    sig = gate.gate_scores(z, "sigmoid")
    w_sig = gate.route_weights(sig, gate.select_topk(sig, None, 2), route_scale=1.0)
    return Answer(float(w[0, 0]), f"sqrt-softplus gives the top expert {float(w[0, 0]):.3f} of the weight: sqrt(8) vs "
                                  f"sqrt(4) still differ by a factor 1.41. The sigmoid has saturated at both logits "
                                  f"and gives {float(w_sig[0, 0]):.3f}, nearly an even split. Within ±0.03 counts.",
                  abs_tol=0.03)


def sign_rule(loads: tuple[float, ...] = LOADS, steps: int = 400, gamma: float = 0.001) -> torch.Tensor:
    """The bias after ``steps`` calls of `moe.bias_update` with the same (frozen) loads."""
    bias = torch.zeros(len(loads))
    load = torch.tensor(loads)
    for _ in range(steps):
        moe.bias_update(bias, load, gamma)
    return bias


@exercise("01.sign_rule")
def _sign_rule() -> Answer:
    b = sign_rule()
    return Answer(float(b[0] - b[1]), f"Both biases end at {float(b[0]):+.3f}: the update is gamma x sign(mean - "
                                      f"load), so how much an expert is overloaded does not matter, only that it is. "
                                      "Within ±0.01 counts.", abs_tol=0.01)
