"""Exercises of notebook 03 (mHC): composite gain, Sinkhorn on simple logits, iterations, averaging."""
from __future__ import annotations

import torch

from v4lab import mhc
from v4lab.exercises import Answer, exercise

HC_OFF, HC_DEPTH = 0.1, 10
DIAG = 5.0
SHARP, ROW_TOL, EPS = 2.0, 1e-3, 1e-6
STREAMS, MIX_DEPTH = (1.0, 2.0, 3.0, 10.0), 60


def hc_stack(off: float = HC_OFF, depth: int = HC_DEPTH, n: int = 4) -> torch.Tensor:
    """``depth`` copies of the unconstrained H = I + off (every entry): [depth, n, n] float64."""
    h = torch.eye(n, dtype=torch.float64) + off
    return h.expand(depth, n, n).clone()


@exercise("03.hc_gain")
def _hc_gain() -> Answer:
    g = mhc.composite_gains(hc_stack())["fwd_max"][-1]
    return Answer(g, f"Each H = I + {HC_OFF} has row sums 1 + 4 x {HC_OFF} = {1 + 4 * HC_OFF:g}, and products of "
                     f"matrices with constant row sums multiply them: {1 + 4 * HC_OFF:g}^{HC_DEPTH} = {g:.1f}. "
                     "A tiny excess per layer compounds with depth. Within 10% counts.", rel_tol=0.1)


def diag_comb(diag: float = DIAG, n: int = 4) -> torch.Tensor:
    return mhc.sinkhorn((diag * torch.eye(n, dtype=torch.float64))[None], 20, EPS)[0]


@exercise("03.diag_entry")
def _diag_entry() -> Answer:
    v = float(diag_comb()[0, 0])
    return Answer(v, f"{v:.3f}. The row softmax gives e^{DIAG:g} / (e^{DIAG:g} + 3) on the diagonal, and that matrix "
                     "is symmetric, so its columns already sum to 1: Sinkhorn has nothing left to fix. "
                     "Within ±0.01 counts.", abs_tol=0.01)


def sharp_logits() -> torch.Tensor:
    from v4lab.viz import mhc as mhc_viz
    return mhc_viz.base_logits() * SHARP


def iterations_needed(logits: torch.Tensor, tol: float = ROW_TOL, max_iters: int = 500) -> int:
    """The first iteration count whose worst |row sum − 1| is below ``tol`` (`mhc.sinkhorn_errors`)."""
    err = mhc.sinkhorn_errors(logits, max_iters, EPS)["row_err"]
    for t, e in enumerate(err, start=1):
        if e < tol:
            return t
    raise ValueError(f"logits: row error still {err[-1]:.2e} after {max_iters} iterations (tol {tol})")


@exercise("03.sharp_iterations")
def _sharp_iterations() -> Answer:
    from v4lab.viz import mhc as mhc_viz
    t = iterations_needed(sharp_logits())
    t1 = iterations_needed(mhc_viz.base_logits())
    return Answer(t, f"{t} iterations (the default logits need {t1}). Sharper logits give a peaked row softmax, "
                     "and each row/column round only removes part of the imbalance, so the error shrinks more slowly: "
                     "that is why V4 spends 20 iterations rather than a handful. Within a factor 2 counts.",
                  rel_tol=0.5)


def mixed_streams(streams: tuple[float, ...] = STREAMS, depth: int = MIX_DEPTH, seed: int = 0) -> torch.Tensor:
    """Streams [n] after ``depth`` mHC mixings (random logits, 20 Sinkhorn iterations) and no sublayer output."""
    n = len(streams)
    g = torch.Generator().manual_seed(seed)
    combs = mhc.sinkhorn(torch.randn(depth, n, n, generator=g, dtype=torch.float64), 20, EPS)
    x = torch.tensor(streams, dtype=torch.float64).view(1, 1, n, 1)
    zero_o, zero_post = torch.zeros(1, 1, 1, dtype=torch.float64), torch.zeros(1, 1, n, dtype=torch.float64)
    for comb in combs:
        x = mhc.hc_post(zero_o, x, zero_post, comb.view(1, 1, n, n))
    return x.flatten()


@exercise("03.streams_average")
def _streams_average() -> Answer:
    x = mixed_streams()
    mean = sum(STREAMS) / len(STREAMS)
    return Answer(float(x.max()), f"The largest stream ends at {float(x.max()):.3f}: each doubly-stochastic mix is an "
                                  f"average, so the streams are pulled towards their mean {mean:g} and none can leave "
                                  f"[{min(STREAMS):g}, {max(STREAMS):g}]; their sum stays {float(x.sum()):.2f}. "
                                  "Within ±0.25 counts.", abs_tol=0.25)
