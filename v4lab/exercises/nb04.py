"""Exercises of notebook 04 (the SwiGLU clamp): the bound, what a tight limit clips, when it changes the model."""
from __future__ import annotations

import torch

from v4lab import moe
from v4lab.exercises import Answer, exercise

BOUND_LIMIT = 5.0
CLIP_LAYER, CLIP_LIMIT = 1, 2.0
LOGIT_TEXT, LOGIT_LIMIT = "for-loop", 7.5


def largest_h(limit: float = BOUND_LIMIT, reach: float = 50.0, n: int = 1001) -> float:
    """max |SiLU(min(g, L)) · clip(u, −L, L)| over a grid of g and u in [−reach, reach] (`moe.swiglu`)."""
    v = torch.linspace(-reach, reach, n)
    g, u = torch.meshgrid(v, v, indexing="ij")
    return float(moe.swiglu(g, u, limit).abs().max())


@exercise("04.max_h")
def _max_h() -> Answer:
    h = largest_h()
    return Answer(h, f"{h:.2f} = SiLU({BOUND_LIMIT:g}) x {BOUND_LIMIT:g}: the gate is capped at L from above and "
                     f"SiLU is at most SiLU(L) there; below it SiLU never goes under -0.28, so the up branch's "
                     "+-L sets the other factor. The bound grows roughly like L^2. Within 5% counts.", rel_tol=0.05)


def clip_effect(layer: int = CLIP_LAYER, limit: float = CLIP_LIMIT) -> dict:
    """`clamp_viz.limit_effects` of one layer of the trained model at one limit: shares clipped, output change."""
    from v4lab.viz import clamp as clamp_viz
    pre = clamp_viz.preacts()
    eff = clamp_viz.limit_effects(pre.acts, layer, limits=[limit])
    return {k: eff[k][0] for k in ("gate_clipped", "up_clipped", "output_change")}


@exercise("04.up_clipped")
def _up_clipped() -> Answer:
    e = clip_effect()
    return Answer(e["up_clipped"], f"{100 * e['up_clipped']:.1f}% of the up values of layer {CLIP_LAYER} lie outside "
                                   f"[-{CLIP_LIMIT:g}, {CLIP_LIMIT:g}] on the sample texts, and the routed output "
                                   f"changes by {100 * e['output_change']:.0f}%: a limit inside the normal range costs "
                                   "accuracy on every text. Within ±0.03 counts.", abs_tol=0.03)


@exercise("04.gate_or_up")
def _gate_or_up() -> Answer:
    e = clip_effect()
    more = "up" if e["up_clipped"] > e["gate_clipped"] else "gate"
    return Answer(more, f"gate {100 * e['gate_clipped']:.1f}%, up {100 * e['up_clipped']:.1f}%: the up branch is "
                        "clipped on both sides, the gate only from above (a very negative gate is already silenced by "
                        f"SiLU), so at the same limit the {more} branch loses more values here.")


def logits_change(text: str = LOGIT_TEXT, limit: float = LOGIT_LIMIT) -> float:
    """max |logits with the clamp at ``limit`` − logits without a clamp| of the trained model on a sample text."""
    from v4lab.viz import clamp as clamp_viz
    from v4lab.viz import trained
    model, tok, _ = trained.trained_model()
    ids = trained.encode(tok, trained.SAMPLE_TEXTS[text], clamp_viz.MAX_TOKENS)
    with torch.no_grad():
        with clamp_viz.swiglu_limit(model, limit):
            clamped = model(ids)
        with clamp_viz.swiglu_limit(model, 0.0):
            off = model(ids)
    return float((clamped - off).abs().max())


@exercise("04.changes_logits")
def _changes_logits() -> Answer:
    d = logits_change()
    changed = d > 0
    return Answer(changed, f"{'Yes' if changed else 'No'}: the logits move by up to {d:.3g}. The clamp acts only if a "
                           f"pre-activation passes {LOGIT_LIMIT:g}; the table of largest values above (over the three "
                           "sample texts, this one included) is the place to look. Answer True or False.")
