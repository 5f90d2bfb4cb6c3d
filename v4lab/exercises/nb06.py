"""Exercises of notebook 06 (training stability): the aux-loss-free bias and Anticipatory Routing.

Every answer is computed from v4lab: the bias simulation of ``v4lab.viz.stability.simulate_bias`` (which
runs ``v4lab.gate`` and ``v4lab.moe.bias_update``) and the stored Anticipatory Routing run
(``v4lab.viz.stability.ar_result``, produced by ``v4lab.experiments.anticipatory.run``).
"""
from __future__ import annotations

from v4lab.exercises import Answer, exercise
from v4lab.viz import stability

SKEW = 1.0               # the BiasWidget's default skew of the router's preferences
BALANCED = 1.2           # "balanced enough": load max/mean below this
TAIL = 50                # the steps averaged for "where it settles" (the notebook's printed cell uses 50 too)


def tail_imbalance(gamma: float, skew: float = SKEW) -> float:
    """Mean load max/mean over the last ``TAIL`` steps of the bias simulation at ``gamma``."""
    imb = stability.simulate_bias(gamma, skew)["imbalance"]
    return sum(imb[-TAIL:]) / TAIL


@exercise("06.best_gamma")
def best_gamma() -> Answer:
    tails = {g: tail_imbalance(g) for g in stability.GAMMA_STOPS}
    best = min(tails, key=tails.get)
    largest = max(stability.GAMMA_STOPS)
    return Answer(best, f"the last {TAIL} steps average a load max/mean of {tails[best]:.3f} at γ = {best:g}, "
                        f"{tails[largest]:.3f} at the largest γ = {largest:g} and {tails[0.0]:.3f} without the update: "
                        "the sign rule moves every bias by γ every step, so a large γ keeps overshooting the "
                        "balance it reaches fast, and a tiny one never gets there in 300 steps.")


def first_step_below(gamma: float, level: float = BALANCED, skew: float = SKEW) -> int | None:
    """The first step (counted from 1) at which the load max/mean is below ``level``; None if never."""
    imb = stability.simulate_bias(gamma, skew)["imbalance"]
    return next((i + 1 for i, x in enumerate(imb) if x < level), None)


@exercise("06.steps_to_balance")
def steps_to_balance() -> Answer:
    step = first_step_below(stability.V4_GAMMA)
    pref = 2 * SKEW / (stability.SIM_EXPERTS - 1)
    return Answer(step, f"at V4's γ = {stability.V4_GAMMA:g} the load max/mean first drops below {BALANCED} at step "
                        f"{step}: a bias moves by at most γ per step, so closing preference gaps of "
                        f"{pref:.2f}–{2 * SKEW:.0f} logits (before the sqrt-softplus) takes hundreds of steps. "
                        "Counted within 25 %.", rel_tol=0.25)


def spike_iteration(result: dict) -> int:
    """The iteration whose learning rate was multiplied (AR off runs one iteration per step)."""
    return result["off"]["step"].index(result["config"]["spike_at"])


@exercise("06.churn_at_spike")
def churn_at_spike() -> Answer:
    ar = stability.ar_result()
    i = spike_iteration(ar)
    churn = ar["off"]["churn"][i]
    before = max(ar["off"]["churn"][i - 3:i])
    return Answer(churn, f"with AR off, the update of the spiked step re-routes a share {churn:.2f} of the tokens "
                         f"(at most {before:.2f} in the three steps before): one {ar['config']['spike_lr_mult']:g}× "
                         "update moves every router at once — the feedback loop Anticipatory Routing is meant to "
                         "cut. Within ±0.1.", abs_tol=0.1)


@exercise("06.moe_jump")
def moe_jump() -> Answer:
    ar = stability.ar_result()
    i = spike_iteration(ar)
    mo = ar["off"]["max_moe"]
    ratio = mo[i + 1] / mo[i]
    return Answer(ratio, f"the largest |MoE output| goes from {mo[i]:.3g} at the spiked step to {mo[i + 1]:.3g} "
                         f"one step later, ×{ratio:.3g}: one oversized update leaves the experts with outlier outputs, "
                         "the kind of MoE outlier the report ties to loss spikes. Within 30 %.", rel_tol=0.3)
