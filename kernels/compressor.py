"""Channel-wise softmax pooling of the KV compressor — Triton twin of ``v4lab.compressor.compress_pool``.

HCA (overlap=False): entry i pools the m tokens of window i; per channel,
    out[i] = Σ_j softmax_j(score[j] + ape[j - m·i]) · kv[j].
CSA (overlap=True, coff=2): entry i pools 2m slots per channel in one softmax — the m tokens of
window i through the upper half [c:2c] (with ape[:, c:2c]) and the m tokens of window i−1 through the
lower half [0:c] (with ape[:, :c]); entry 0 has no previous window, so those slots weigh zero.

One program takes one output entry and a block of channels; the channels are independent, so this
is pure elementwise work plus a reduction over the (≤ 2m) slots. RMSNorm and RoPE come after, in torch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import interpreted


@triton.jit
def _compress_pool_fwd(kv_ptr, score_ptr, ape_ptr, o_ptr,
                       n_out, R, C, s_b, s_n, so_b, so_n,
                       OVERLAP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // n_out
    i = pid % n_out
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_r = tl.arange(0, BLOCK_R)
    c_ok = offs_c < C
    r_ok = offs_r < R
    # Own window: tokens m·i .. m·i+m−1, upper half when overlapped (coff·c columns in all).
    half = C if OVERLAP else 0
    rows = i * R + offs_r
    mask = r_ok[:, None] & c_ok[None, :]
    base = b * s_b + rows[:, None] * s_n + half + offs_c[None, :]
    kv = tl.load(kv_ptr + base, mask=mask, other=0.0).to(tl.float32)           # [BLOCK_R, BLOCK_C]
    ape_stride = 2 * C if OVERLAP else C
    z = tl.load(score_ptr + base, mask=mask, other=0.0).to(tl.float32) \
        + tl.load(ape_ptr + offs_r[:, None] * ape_stride + half + offs_c[None, :], mask=mask, other=0.0).to(tl.float32)
    z = tl.where(mask, z, -1.0e30)  # finite: padded channels then give no inf - inf
    m = tl.max(z, axis=0)                                                        # [BLOCK_C]
    if OVERLAP:
        # Previous window's tokens through the lower half; absent for entry 0 (-inf logits).
        prev_ok = mask & (i > 0)
        pbase = b * s_b + (rows - R)[:, None] * s_n + offs_c[None, :]
        kv_p = tl.load(kv_ptr + pbase, mask=prev_ok, other=0.0).to(tl.float32)
        z_p = tl.load(score_ptr + pbase, mask=prev_ok, other=0.0).to(tl.float32) \
            + tl.load(ape_ptr + offs_r[:, None] * ape_stride + offs_c[None, :], mask=mask, other=0.0).to(tl.float32)
        z_p = tl.where(prev_ok, z_p, -1.0e30)
        m = tl.maximum(m, tl.max(z_p, axis=0))
        e_p = tl.exp(z_p - m[None, :])
        num = tl.sum(e_p * kv_p, axis=0)
        den = tl.sum(e_p, axis=0)
    else:
        num = tl.zeros([BLOCK_C], dtype=tl.float32)
        den = tl.zeros([BLOCK_C], dtype=tl.float32)
    e = tl.exp(z - m[None, :])
    num += tl.sum(e * kv, axis=0)
    den += tl.sum(e, axis=0)
    tl.store(o_ptr + b * so_b + i * so_n + offs_c, (num / den).to(o_ptr.dtype.element_ty), mask=c_ok)


def compress_pool(kv: torch.Tensor, score: torch.Tensor, ape: torch.Tensor, ratio: int,
                  overlap: bool) -> torch.Tensor:
    """kv, score: [B, n, coff·c] (n a multiple of ratio), ape: [ratio, coff·c] → [B, n // ratio, c]."""
    def bad(name, value, rule):
        raise ValueError(f"compress_pool: argument {name!r} = {value}: {rule}")

    if isinstance(ratio, bool) or not isinstance(ratio, int) or ratio <= 0:
        bad("ratio", ratio, "must be a positive integer")
    coff = 2 if overlap else 1
    if kv.dim() != 3:
        bad("kv", tuple(kv.shape), "must be [B, n, coff*c]")
    if score.shape != kv.shape:
        bad("score", tuple(score.shape), f"must have the shape of kv {tuple(kv.shape)}")
    B, n, w = kv.shape
    if w % coff:
        bad("kv", tuple(kv.shape), f"last dim must be a multiple of coff={coff} (overlap={overlap})")
    if n % ratio:
        bad("kv", tuple(kv.shape), f"length n={n} must be a multiple of ratio={ratio}")
    if tuple(ape.shape) != (ratio, w):
        bad("ape", tuple(ape.shape), f"must be [ratio={ratio}, {w}]")
    c = w // coff
    n_out = n // ratio
    kv, score, ape = kv.contiguous(), score.contiguous(), ape.contiguous()
    out = torch.empty(B, n_out, c, dtype=torch.float32, device=kv.device)
    if out.numel() == 0:
        return out
    BLOCK_R = triton.next_power_of_2(ratio)
    # Under the interpreter one program covers all channels; on a GPU keep register tiles small.
    BLOCK_C = triton.next_power_of_2(c) if interpreted() else max(16, min(triton.next_power_of_2(c), 4096 // BLOCK_R))
    grid = (B * n_out, triton.cdiv(c, BLOCK_C))
    _compress_pool_fwd[grid](kv, score, ape, out, n_out, ratio, c, kv.stride(0), kv.stride(1),
                             out.stride(0), out.stride(1), OVERLAP=bool(overlap), BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C)
    return out
