"""MXFP4 activation fake-quant as a Triton kernel; bit-exact against ``v4lab.quant.fp4_act_quant``.

Per 1x``block`` group of the last dim: amax = max|x| floored at 6*2^-126, scale = 2^ceil(log2(amax/6))
read off the fp32 bits of amax/6 (exponent, +1 unless the mantissa is zero), q = x/scale rounded
half-to-even onto the E2M1 grid {0, .5, 1, 1.5, 2, 3, 4, 6} (saturating at 6, sign kept, so -0 stays
-0), output q*scale. A group holding NaN/inf becomes all NaN. Rounding is done in fp32 arithmetic
(floor + explicit tie rule), never by a float cast; the only non-power-of-two division uses
``tl.div_rn`` (a GPU's default fp32 division may be approximate), so the interpreter and a GPU agree bit
for bit.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from v4lab.quant import FP4_AMAX_FLOOR


@triton.jit
def _fp4_act_quant_kernel(x_ptr, y_ptr, R, BR: tl.constexpr, BLOCK: tl.constexpr, FLOOR: tl.constexpr):
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.arange(0, BLOCK)
    mask = rows[:, None] < R
    offs = rows[:, None] * BLOCK + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    ax = tl.abs(x)
    finite = ax < float("inf")                                       # False for inf and NaN
    bad = tl.max(tl.where(finite, 0, 1), axis=1) > 0                 # [BR]
    amax = tl.maximum(tl.max(tl.where(finite, ax, 0.0), axis=1), FLOOR)
    y = tl.div_rn(amax, tl.full(amax.shape, 6.0, tl.float32))        # IEEE division, as torch does (not approx)
    bits = y.to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).to(tl.int32)  # biased exponent of 2^ceil(log2 y)
    scale = (e << 23).to(tl.float32, bitcast=True)
    inv = ((254 - e) << 23).to(tl.float32, bitcast=True)            # 1/scale, exact (e <= 253 for finite amax)
    v = tl.where(finite, x, 0.0) * inv[:, None]                     # == x / scale; bad rows -> NaN at the end
    a = tl.minimum(tl.abs(v), 6.0)
    inv_step = tl.where(a < 2.0, 2.0, tl.where(a < 4.0, 1.0, 0.5))
    step = tl.where(a < 2.0, 0.5, tl.where(a < 4.0, 1.0, 2.0))
    t = a * inv_step
    fl = tl.floor(t)
    frac = t - fl
    odd = (fl.to(tl.int32) & 1) == 1
    r = tl.where(frac > 0.5, fl + 1.0, tl.where(frac < 0.5, fl, tl.where(odd, fl + 1.0, fl))) * step
    neg = v.to(tl.int32, bitcast=True) < 0                            # sign bit, so -0.0 and -0.1 give -0
    # r * -1.0, not -r: Triton negates as 0 - r, which turns -0 into +0
    out = r * tl.where(neg, -1.0, 1.0) * scale[:, None]
    out = tl.where(bad[:, None], float("nan"), out)
    tl.store(y_ptr + offs, out, mask=mask)


def fp4_act_quant(x: torch.Tensor, block: int = 32, rows_per_program: int = 64) -> torch.Tensor:
    """Same signature and result (bit for bit) as ``v4lab.quant.fp4_act_quant``."""
    if x.shape[-1] % block:
        raise ValueError(f"x.shape[-1] = {x.shape[-1]}: must be a multiple of the block size {block}")
    if block & (block - 1):
        raise ValueError(f"block = {block}: must be a power of two for the kernel")
    xf = x.float().contiguous()
    R = xf.numel() // block
    y = torch.empty_like(xf)
    if R:
        _fp4_act_quant_kernel[(triton.cdiv(R, rows_per_program),)](
            xf, y, R, BR=rows_per_program, BLOCK=block, FLOOR=FP4_AMAX_FLOOR)
    return y.to(x.dtype)
