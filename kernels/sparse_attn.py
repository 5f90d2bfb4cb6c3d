"""Sparse attention with a sink over an index list — Triton twin of ``v4lab.attention.sparse_attn``.

    o[b, s, h] = Σ_j p_j · kv[b, idx[b, s, j]],
    p_j = exp(z_j) / (Σ_k exp(z_k) + exp(attn_sink[h])),   z_j = scale · q[b, s, h] · kv[b, idx[b, s, j]]

Every query of V4 (window, CSA, HCA) attends one shared K=V head through such a list: window slots
then selected/visible compressed entries, −1 for an empty slot. One program takes one query token
and a block of heads (all heads share the gathered KV rows, so the gather is paid once per block),
walks the list in chunks of BLOCK_K with an online softmax, and adds the sink to the denominator at
the end. A row whose indices are all −1 returns zeros (only the sink is left, and it has no value).

Accumulation is fp32. Under the interpreter (and for fp32 inputs) the dots run in fp32 ("ieee");
on CUDA with bf16/fp16 inputs they run in the input dtype with fp32 accumulation, like the official
kernel. Autotuning is used only when compiling for a GPU (the interpreter cannot autotune).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import interpreted


def _configs():
    return [triton.Config({"BLOCK_H": bh, "BLOCK_K": bk}, num_warps=w, num_stages=st)
            for bh in (16, 32) for bk in (32, 64) for w in (4, 8) for st in (2, 3)]


@triton.jit
def _scores(qd, kvd, scale, LOWP: tl.constexpr):
    """z = scale · q kvᵀ [BLOCK_H, BLOCK_K]: fp32 products ("ieee") unless LOWP (the inputs' own dtype)."""
    if LOWP:
        z = tl.dot(qd, tl.trans(kvd)) * scale
    else:
        z = tl.dot(qd, tl.trans(kvd), input_precision="ieee") * scale
    return z


@triton.jit
def _with_sink(acc, m_i, l_i, sink):
    """Normalise the running sum with the sink: one more logit in the denominator, with a zero value."""
    m_fin = tl.maximum(m_i, sink)
    alpha = tl.exp(m_i - m_fin)
    l_fin = l_i * alpha + tl.exp(sink - m_fin)
    # l_fin = 0 only for an empty row with a −inf sink: return zeros there, not 0/0.
    return acc * tl.where(l_fin > 0, alpha / tl.where(l_fin > 0, l_fin, 1.0), 0.0)[:, None]


@triton.jit
def _sparse_attn_fwd(q_ptr, kv_ptr, sink_ptr, idx_ptr, o_ptr,
                     S, H, N, K, D, scale,
                     sq_b, sq_s, sq_h, skv_b, skv_n, si_b, si_s, so_b, so_s, so_h,
                     BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                     LOWP: tl.constexpr):
    pid_bs = tl.program_id(0)                      # one query token (b, s)
    pid_h = tl.program_id(1)                       # one block of heads
    b = pid_bs // S
    s = pid_bs % S
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    h_ok = offs_h < H
    d_ok = offs_d < D

    q = tl.load(q_ptr + b * sq_b + s * sq_s + offs_h[:, None] * sq_h + offs_d[None, :],
                mask=h_ok[:, None] & d_ok[None, :], other=0.0)        # q: [BLOCK_H, BLOCK_D]
    if LOWP:
        qd = q
    else:
        qd = q.to(tl.float32)

    # Finite start for the running max: an all-invalid chunk then gives exp(-inf - m) = 0, not NaN.
    m_i = tl.full([BLOCK_H], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)

    idx_row = idx_ptr + b * si_b + s * si_s
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        j = tl.load(idx_row + offs_k, mask=offs_k < K, other=-1)       # j: [BLOCK_K] int64
        ok = j >= 0
        jj = tl.where(ok, j, 0)
        kv = tl.load(kv_ptr + b * skv_b + jj[:, None] * skv_n + offs_d[None, :],
                     mask=ok[:, None] & d_ok[None, :], other=0.0)    # kv: [BLOCK_K, BLOCK_D]
        if LOWP:
            kvd = kv
        else:
            kvd = kv.to(tl.float32)
        z = tl.where(ok[None, :], _scores(qd, kvd, scale, LOWP), float("-inf"))    # z: [BLOCK_H, BLOCK_K]
        m_new = tl.maximum(m_i, tl.max(z, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(z - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None]
        if LOWP:
            acc = tl.dot(p.to(kv.dtype), kvd, acc)
        else:
            acc = tl.dot(p, kvd, acc, input_precision="ieee")
        m_i = m_new

    sink = tl.load(sink_ptr + offs_h, mask=h_ok, other=0.0).to(tl.float32)
    o = _with_sink(acc, m_i, l_i, sink)
    tl.store(o_ptr + b * so_b + s * so_s + offs_h[:, None] * so_h + offs_d[None, :],
             o.to(o_ptr.dtype.element_ty), mask=h_ok[:, None] & d_ok[None, :])


_sparse_attn_tuned = _sparse_attn_fwd if interpreted() else triton.autotune(
    configs=_configs(), key=["H", "D"])  # not K: it grows every decode step(_sparse_attn_fwd)


def _check(q, kv, attn_sink, idx):
    def bad(name, value, rule):
        raise ValueError(f"sparse_attn: argument {name!r} = {value}: {rule}")

    if q.dim() != 4:
        bad("q", tuple(q.shape), "must be [B, S, H, D]")
    B, S, H, D = q.shape
    if kv.dim() != 3 or kv.shape[0] != B or kv.shape[2] != D:
        bad("kv", tuple(kv.shape), f"must be [B={B}, N, D={D}]")
    if attn_sink.shape != (H,):
        bad("attn_sink", tuple(attn_sink.shape), f"must be [H={H}]")
    if idx.dim() != 3 or idx.shape[:2] != (B, S):
        bad("idx", tuple(idx.shape), f"must be [B={B}, S={S}, K]")
    if idx.dtype not in (torch.int64, torch.int32):
        bad("idx.dtype", idx.dtype, "must be an integer tensor (int64 or int32)")
    for name, t in (("q", q), ("kv", kv), ("attn_sink", attn_sink)):
        if not t.is_floating_point():
            bad(f"{name}.dtype", t.dtype, "must be floating point")
    if idx.numel() and (int(idx.min()) < -1 or int(idx.max()) >= kv.shape[1]):
        bad("idx", f"range [{int(idx.min())}, {int(idx.max())}]", f"entries must be -1 or in [0, N={kv.shape[1]})")


def sparse_attn(q: torch.Tensor, kv: torch.Tensor, attn_sink: torch.Tensor, idx: torch.Tensor,
                scale: float) -> torch.Tensor:
    """q: [B, S, H, D], kv: [B, N, D], attn_sink: [H], idx: [B, S, K] (−1 = empty) → o: [B, S, H, D]."""
    _check(q, kv, attn_sink, idx)
    B, S, H, D = q.shape
    K = idx.shape[2]
    q = q.contiguous()
    kv = kv.contiguous()
    idx = idx.to(torch.int64).contiguous()
    attn_sink = attn_sink.contiguous()
    o = torch.empty_like(q)
    if o.numel() == 0:
        return o
    lowp = (not interpreted()) and q.dtype in (torch.bfloat16, torch.float16) and kv.dtype == q.dtype
    BLOCK_D = max(16, triton.next_power_of_2(D))
    args = (q, kv, attn_sink, idx, o, S, H, kv.shape[1], K, D, float(scale),
            q.stride(0), q.stride(1), q.stride(2), kv.stride(0), kv.stride(1),
            idx.stride(0), idx.stride(1), o.stride(0), o.stride(1), o.stride(2))
    if interpreted():
        # Few, big programs: the interpreter pays per program and per op, not per element.
        bh = max(16, triton.next_power_of_2(H))
        bk = min(128, max(16, triton.next_power_of_2(max(K, 1))))
        _sparse_attn_fwd[(B * S, triton.cdiv(H, bh))](*args, BLOCK_H=bh, BLOCK_K=bk, BLOCK_D=BLOCK_D, LOWP=False)
    else:
        grid = lambda meta: (B * S, triton.cdiv(H, meta["BLOCK_H"]))  # noqa: E731
        _sparse_attn_tuned[grid](*args, BLOCK_D=BLOCK_D, LOWP=lowp)
    return o
