"""FP4 weight dequantisation fused into a GEMM: ``y [M, N] = x [M, K] . deq(W)^T`` (fp32).

Reference: ``v4lab.quant.fp4_gemm_ref`` (same signature). W is MXFP4: ``packed`` uint8 ``[N, K/2]``
(element 2j in the low nibble of byte j) and E8M0 ``scales`` uint8 ``[N, K/32]``.

The official kernel turns each FP4 sub-tile into FP8 and feeds FP8 tensor cores
(docs/design/v4-moe-mhc-fp4.md §6.5); this one keeps the idea that matters for memory traffic (W is
read as 4-bit codes + one byte per 32, and is expanded only in registers) but multiplies in fp32, so it
runs on any GPU and under the interpreter (which has no ``tl.dot_scaled``). Instead of interleaving
the two nibbles back into K order, x is read as its even and odd columns:
``x . W^T = x[:, 0::2] . lo^T + x[:, 1::2] . hi^T``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from v4lab.quant import fp4_gemm_ref  # noqa: F401  (the reference this kernel equals)


@triton.jit
def _e2m1(c):
    """4-bit code (int32) -> fp32 value, by building the float's bits: exact, no table."""
    s = (c >> 3) & 1
    e = (c >> 1) & 3
    m = c & 1
    normal = (((e + 126) << 23) | (m << 22)).to(tl.float32, bitcast=True)      # (1 + m/2) * 2^(e-1)
    mag = tl.where(e == 0, m.to(tl.float32) * 0.5, normal)
    return mag * tl.where(s == 1, -1.0, 1.0)        # not -mag: Triton's 0 - x loses -0


@triton.jit
def _e8m0(e):
    """E8M0 byte (int32) -> fp32 2^(e-127); 0 -> 2^-127 (a denormal), 255 -> NaN."""
    v = (e << 23).to(tl.float32, bitcast=True)
    v = tl.where(e == 0, tl.full(e.shape, 0x400000, tl.int32).to(tl.float32, bitcast=True), v)
    return tl.where(e == 255, float("nan"), v)


@triton.jit
def _fp4_gemm_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K,
                     sxm, sxk, swn, swk, ssn, ssk, sym, syn,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rj = tl.arange(0, BK // 2)                       # byte index inside the K chunk
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + 2 * rj                             # logical K of the low nibbles; +1 for the high ones
        kmask = kk < K
        xe = tl.load(x_ptr + rm[:, None] * sxm + kk[None, :] * sxk,
                     mask=(rm[:, None] < M) & kmask[None, :], other=0.0)
        xo = tl.load(x_ptr + rm[:, None] * sxm + (kk[None, :] + 1) * sxk,
                     mask=(rm[:, None] < M) & kmask[None, :], other=0.0)
        wmask = (rn[:, None] < N) & kmask[None, :]
        b = tl.load(w_ptr + rn[:, None] * swn + (kk[None, :] // 2) * swk, mask=wmask, other=0).to(tl.int32)
        e = tl.load(s_ptr + rn[:, None] * ssn + (kk[None, :] // 32) * ssk, mask=wmask, other=127).to(tl.int32)
        sc = _e8m0(e)
        lo = _e2m1(b & 0xF) * sc                     # [BN, BK/2] values of columns kk
        hi = _e2m1((b >> 4) & 0xF) * sc              # columns kk + 1
        acc += tl.dot(xe.to(tl.float32), tl.trans(lo), input_precision="ieee")
        acc += tl.dot(xo.to(tl.float32), tl.trans(hi), input_precision="ieee")
    tl.store(y_ptr + rm[:, None] * sym + rn[None, :] * syn, acc, mask=(rm[:, None] < M) & (rn[None, :] < N))


def fp4_gemm(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
             block_m: int = 64, block_n: int = 64, block_k: int = 128) -> torch.Tensor:
    """``y [M, N] = x [M, K] . deq(W)^T`` in fp32; ``packed`` uint8/int8 [N, K/2], ``scales`` uint8 or
    float8_e8m0fnu [N, K/32]. Same result as ``v4lab.quant.fp4_gemm_ref`` up to fp32 summation order."""
    if x.dim() != 2 or packed.dim() != 2:
        raise ValueError(f"x {tuple(x.shape)}, packed {tuple(packed.shape)}: need x [M, K] and packed [N, K/2]")
    M, K = x.shape
    N = packed.shape[0]
    if K % 32 or packed.shape[1] * 2 != K:
        raise ValueError(f"x.shape[1] = {K}, packed.shape[1] = {packed.shape[1]}: K must be a multiple of 32 "
                         "and packed must hold K/2 bytes per row")
    if tuple(scales.shape) != (N, K // 32):
        raise ValueError(f"scales.shape = {tuple(scales.shape)}: must be {(N, K // 32)}")
    if block_k % 64 or block_m < 16 or block_n < 16:
        raise ValueError(f"block_k = {block_k}: must be a multiple of 64 (block_m, block_n >= 16)")
    w = packed if packed.dtype == torch.uint8 else packed.view(torch.uint8)
    s = scales if scales.dtype == torch.uint8 else scales.view(torch.uint8)
    xf = x.float()
    y = torch.empty(M, N, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    _fp4_gemm_kernel[grid](xf, w, s, y, M, N, K, xf.stride(0), xf.stride(1), w.stride(0), w.stride(1),
                           s.stride(0), s.stride(1), y.stride(0), y.stride(1),
                           BM=block_m, BN=block_n, BK=block_k)
    return y
