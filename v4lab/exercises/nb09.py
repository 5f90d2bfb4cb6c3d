"""Exercises of notebook 09 (hardware and cost): the decode roofline of ``v4lab.hardware`` and the price
arithmetic of ``v4lab.pricing``."""
from __future__ import annotations

from v4lab import hardware, pricing
from v4lab.exercises import Answer, exercise
from v4lab.viz import cost

OLD_GPU_CASE = ("v4-flash", 8192, 1)          # model, context, batch
BOUND_CASE = ("v4-pro", "H200", 4096)         # model, GPU, context
MONTH = (100e6, 10e6)                         # input, output tokens a month


@exercise("09.a100_share")
def a100_share() -> Answer:
    model, ctx, batch = OLD_GPU_CASE
    a, h = (hardware.roofline(model, g, ctx, batch) for g in ("A100", "H200"))
    share = a["tokens_per_s"] / h["tokens_per_s"]
    return Answer(share, f"{model} at {ctx:,} tokens, batch {batch}: an A100 decodes {share:.3f}× an H200's "
                         f"tokens/s. Both steps are {a['bound']}-bound, so only the bandwidth counts "
                         f"({hardware.bandwidth('A100') / 1e12:.3g} vs {hardware.bandwidth('H200') / 1e12:.3g} TB/s); "
                         "the A100's missing FP8/FP4 tensor cores only hurt once a step is compute-bound. "
                         "Within 5 %.", rel_tol=0.05)


def first_compute_bound_batch(model: str, gpu: str, context: int) -> int | None:
    """The smallest batch of ``cost.BATCH_STOPS`` at which the decode step is compute-bound."""
    return next((b for b in cost.BATCH_STOPS if hardware.roofline(model, gpu, context, b)["bound"] == "compute"),
                None)


@exercise("09.compute_bound_batch")
def compute_bound_batch() -> Answer:
    model, gpu, ctx = BOUND_CASE
    b = first_compute_bound_batch(model, gpu, ctx)
    r = hardware.roofline(model, gpu, ctx, b)
    prev = hardware.roofline(model, gpu, ctx, b // 2)
    return Answer(b, f"{model} at {ctx:,} tokens on an {gpu} first becomes compute-bound at a batch of {b:,} "
                     f"(of the stops 1, 2, 4, ... {cost.BATCH_STOPS[-1]:,}): the intensity goes from "
                     f"{prev['intensity']:.3g} to {r['intensity']:.3g} FLOP/B. Once a batch touches nearly every "
                     f"expert ({r['experts_touched_fraction']:.0%} of them here) the weights are read once for the "
                     "whole batch and extra sequences add FLOPs and only their own KV reads, until the FLOPs win.")


@exercise("09.flash_month")
def flash_month() -> Answer:
    inp, out = MONTH
    bill = pricing.cost("v4-flash", inp, out)
    return Answer(bill, f"{inp / 1e6:.0f}M input + {out / 1e6:.0f}M output tokens on V4-Flash: ${bill:.2f} a month "
                        "(input and output are priced separately per million tokens). Within 2 %.", rel_tol=0.02)


def half_of_pro_share(input_tokens: float = 32e6, output_tokens: float = 1e6) -> float:
    """The escalated share f at which Flash-first routing costs half of all-Pro (the bill is linear in f)."""
    lo = pricing.blended_cost(0.0, input_tokens, output_tokens)
    hi = pricing.blended_cost(1.0, input_tokens, output_tokens)
    return (0.5 * hi - lo) / (hi - lo)


@exercise("09.half_of_pro")
def half_of_pro() -> Answer:
    f = half_of_pro_share()
    return Answer(f, f"escalating {f:.1%} of the requests to V4-Pro already costs half of sending them all: Pro "
                     f"costs {pricing.overpay():.3g}× Flash, so each escalated request weighs as much as "
                     f"{pricing.overpay():.3g} Flash ones. Within ±0.03.", abs_tol=0.03)
