"""Fused mHC pre-mix coefficients: the (2+n)·n-wide projection, 1/RMS, sigmoids and Sinkhorn in one kernel.

Equals `v4lab.mhc.hc_pre_coeffs` (same signature). One program owns BLOCK_T tokens: it streams x and fn over
the n·d axis once, accumulating m = fn·v and Σv² together, then does everything else in registers. The
Sinkhorn runs in the flat layout of m (column c = 2n + n·j + k holds logits[j, k]): a row (or column) sum is a
masked sum over the columns c' in the same row (column), so any n works without reshapes. Forward only;
training uses the reference (autograd). The matmul runs in IEEE fp32 (not TF32) so it matches the reference.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from v4lab import mhc as _ref
from v4lab.kernels import interpreted


@triton.jit
def _hc_pre_coeffs_kernel(x_ptr, fn_ptr, scale_ptr, base_ptr, out_ptr, T, K, rms_eps, hc_eps,
                          N: tl.constexpr, ITERS: tl.constexpr, HC: tl.constexpr,
                          BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, OUTP: tl.constexpr):
    R: tl.constexpr = (2 + N) * N
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.arange(0, OUTP)
    acc = tl.zeros((BLOCK_T, OUTP), dtype=tl.float32)           # m before the 1/RMS factor
    ss = tl.zeros((BLOCK_T,), dtype=tl.float32)                  # Σ v²
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        xv = tl.load(x_ptr + t[:, None] * K + kk[None, :], mask=(t[:, None] < T) & (kk[None, :] < K),
                     other=0.0).to(tl.float32)
        w = tl.load(fn_ptr + c[None, :] * K + kk[:, None], mask=(c[None, :] < R) & (kk[:, None] < K),
                    other=0.0).to(tl.float32)                    # fnᵀ tile [BLOCK_K, OUTP]
        acc += tl.dot(xv, w, input_precision="ieee")
        ss += tl.sum(xv * xv, axis=1)
    m = acc * (1.0 / tl.sqrt(ss / K + rms_eps))[:, None]

    is_pre = c < N
    is_post = (c >= N) & (c < 2 * N)
    is_res = (c >= 2 * N) & (c < R)
    sc = tl.load(scale_ptr + tl.where(is_pre, 0, tl.where(is_post, 1, 2)))
    z = sc[None, :] * m + tl.load(base_ptr + c, mask=c < R, other=0.0)[None, :]

    # same_row[c, c'] / same_col[c, c']: both are logits of the n×n matrix and share its row / column.
    j = tl.where(is_res, (c - 2 * N) // N, -1)
    k = tl.where(is_res, (c - 2 * N) % N, -1)
    same_row = (is_res[:, None] & is_res[None, :] & (j[:, None] == j[None, :]))[None, :, :]
    same_col = (is_res[:, None] & is_res[None, :] & (k[:, None] == k[None, :]))[None, :, :]
    res2 = is_res[None, :]

    if HC:                                                       # plain HC: comb = I + logits
        cm = z + tl.where(j == k, 1.0, 0.0)[None, :]
    else:
        zr = tl.where(res2, z, float("-inf"))
        rmax = tl.max(tl.where(same_row, zr[:, None, :], float("-inf")), axis=2)
        e = tl.where(res2, tl.exp(z - tl.where(res2, rmax, 0.0)), 0.0)
        cm = e / tl.where(res2, tl.sum(tl.where(same_row, e[:, None, :], 0.0), axis=2), 1.0)
        cm = tl.where(res2, cm + hc_eps, 0.0)                    # row softmax + eps
        cm = cm / (tl.sum(tl.where(same_col, cm[:, None, :], 0.0), axis=2) + hc_eps)
        for _ in range(ITERS - 1):
            cm = cm / (tl.sum(tl.where(same_row, cm[:, None, :], 0.0), axis=2) + hc_eps)
            cm = cm / (tl.sum(tl.where(same_col, cm[:, None, :], 0.0), axis=2) + hc_eps)

    sig = tl.sigmoid(tl.where(is_res[None, :], 0.0, z))        # σ only where used (no exp overflow)
    out = tl.where(is_pre[None, :], sig + hc_eps, tl.where(is_post[None, :], 2.0 * sig, cm))
    # A token with a non-finite logit gets NaN everywhere (σ(±inf) alone would hide it); the host raises.
    finite = (z == z) & (tl.abs(z) < float("inf"))
    n_bad = tl.sum(tl.where(finite | (c[None, :] >= R), 0, 1), axis=1)
    out = tl.where(n_bad[:, None] > 0, float("nan"), out)
    tl.store(out_ptr + t[:, None] * R + c[None, :], out, mask=(t[:, None] < T) & (c[None, :] < R))


def hc_pre_coeffs(x_flat: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor,
                  rms_eps: float, hc_eps: float, iters: int, mode: str = "mhc",
                  check_finite: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """pre [T, n], post [T, n], comb [T, n, n] (fp32) for x_flat [T, n·d]; see v4lab.mhc.hc_pre_coeffs.

    mode "residual" has nothing to compute and returns the reference's constants.
    """
    # Validation (shapes, n from fn's rows, eps, iters, mode) is the reference's, on a zero-token view.
    _ref.hc_pre_coeffs(x_flat[:0], fn, scale, base, rms_eps, hc_eps, iters, mode)
    if mode == "residual":
        return _ref.hc_pre_coeffs(x_flat, fn, scale, base, rms_eps, hc_eps, iters, mode)
    T, K = x_flat.shape
    n = _ref._hc_mult_from_rows(fn.shape[0], False)
    R = (2 + n) * n
    out = torch.empty(T, R, dtype=torch.float32, device=x_flat.device)
    if T:
        x = x_flat.contiguous()
        f = fn.detach().float().contiguous()
        outp = max(16, triton.next_power_of_2(R))
        # Interpreter: cost is per program and per op, so few fat programs. GPU: register-sized tiles.
        block_t = min(64, max(16, triton.next_power_of_2(T))) if interpreted() else 16
        block_k = min(1024, max(16, triton.next_power_of_2(K))) if interpreted() else 64
        _hc_pre_coeffs_kernel[(triton.cdiv(T, block_t),)](
            x, f, scale.detach().float().contiguous(), base.detach().float().contiguous(), out, T, K,
            float(rms_eps), float(hc_eps), N=n, ITERS=int(iters), HC=(mode == "hc"),
            BLOCK_T=block_t, BLOCK_K=block_k, OUTP=outp)
        _ref._check_finite(out, "hc_pre_coeffs (kernel): logits scale·(fn·v)/RMS(v) + base", check_finite)
    return out[:, :n], out[:, n:2 * n], out[:, 2 * n:].view(T, n, n)


def hc_pre(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, *, rms_eps: float,
           hc_eps: float, iters: int, mode: str = "mhc", hc_mult: int | None = None,
           check_finite: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """v4lab.mhc.hc_pre with the coefficients from the kernel (u = Σ pre_i X_i in torch, fp32)."""
    n, d = _ref._check_args(x, fn, scale, base, rms_eps=rms_eps, hc_eps=hc_eps, iters=iters, mode=mode,
                            hc_mult=hc_mult)
    if mode == "residual":
        return _ref.hc_pre(x, fn, scale, base, rms_eps=rms_eps, hc_eps=hc_eps, iters=iters, mode=mode,
                           check_finite=check_finite)
    B, S = x.shape[:2]
    v = x.reshape(B * S, n * d)
    pre, post, comb = hc_pre_coeffs(v, fn, scale, base, rms_eps, hc_eps, iters, mode, check_finite)
    u = torch.einsum("ti,tid->td", pre, v.float().view(B * S, n, d)).to(x.dtype)
    return u.view(B, S, d), post.reshape(B, S, n), comb.reshape(B, S, n, n)
