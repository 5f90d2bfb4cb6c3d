"""Exercises of notebook 05 (FP4): rounding ties, E8M0 scale bytes, an outlier's block, SQNR with outliers."""
from __future__ import annotations

import torch

from v4lab import quant as Q
from v4lab.exercises import Answer, exercise

TIE = 5.0
AMAX = 0.05
OUTLIER = 100.0
SMALL = tuple(0.5 + i for i in range(31))               # 0.5, 1.5, ..., 30.5: no value on a rounding tie
SQNR_DIST, SQNR_BLOCK = "outliers", 32


@exercise("05.e2m1_tie")
def _e2m1_tie() -> Answer:
    v = float(Q.e2m1_round(torch.tensor(TIE)))
    return Answer(v, f"{TIE:g} lies exactly between the E2M1 values 4 and 6. Ties go to the even code: 4 is code 6 "
                     f"(mantissa 0), 6 is code 7 (mantissa 1), so {TIE:g} becomes {v:g}. Within ±0.01 counts.",
                  abs_tol=0.01)


def block_with_amax(amax: float = AMAX) -> torch.Tensor:
    """One block of 32 weights whose largest magnitude is ``amax``: [1, 32]."""
    w = torch.linspace(-amax / 2, amax / 2, 32).view(1, 32)
    w[0, 7] = -amax
    return w


@exercise("05.scale_byte")
def _scale_byte() -> Answer:
    _, scales = Q.mxfp4_quantize(block_with_amax())
    b = int(scales[0, 0])
    return Answer(b, f"amax / 6 = {AMAX / 6:.5f}, rounded up to a power of two: 2^{b - 127} = {2.0 ** (b - 127):.6g}, "
                     f"stored as the byte 127 + ({b - 127}) = {b}. Rounding up means amax / scale <= 6: nothing clips.")


def outlier_block() -> torch.Tensor:
    return torch.tensor([OUTLIER, *SMALL]).view(1, 32)


@exercise("05.outlier_zeros")
def _outlier_zeros() -> Answer:
    w = outlier_block()
    n = int((Q.fp4_fake_quant(w)[0, 1:] == 0).sum())
    scale = float(Q.e8m0_to_float(Q.mxfp4_quantize(w)[1])[0, 0])
    return Answer(n, f"The outlier sets the scale to {scale:g} (the smallest power of two >= {OUTLIER:g} / 6). A "
                     f"weight becomes 0 when w / {scale:g} < 0.25 (half of E2M1's smallest step, 0.5), i.e. w < "
                     f"{scale / 4:g}: {n} of the 31 others. One large weight wipes out its block's small ones.")


@exercise("05.outliers_sqnr")
def _outliers_sqnr() -> Answer:
    from v4lab.viz import fp4
    r = fp4.quantised(SQNR_DIST, SQNR_BLOCK)
    g = fp4.quantised("gaussian", SQNR_BLOCK)["sqnr_fp4"]
    return Answer(r["sqnr_fp4"], f"{r['sqnr_fp4']:.1f} dB, against {g:.1f} dB without the outliers: only the few "
                                 "blocks that hold an outlier get a coarse scale, the other blocks of 32 keep theirs. "
                                 "Within ±2 dB counts.", abs_tol=2.0)
