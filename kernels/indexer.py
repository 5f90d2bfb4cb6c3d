"""Lightning-indexer scores — Triton twin of ``v4lab.indexer.index_scores``.

    scores[b, s, n] = Σ_h w[b, s, h] · ReLU(q[b, s, h] · k[b, n])

The ReLU sits between the per-head dot and the head sum, so this is not one matmul: a program takes
a tile of queries × keys, loops over the indexer heads, and accumulates the weighted, rectified
per-head tiles in fp32. No causal mask and no top-k here: the caller masks and picks (torch.topk).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import interpreted


def _configs():
    return [triton.Config({"BLOCK_S": bs, "BLOCK_N": bn}, num_warps=w, num_stages=st)
            for bs in (16, 32, 64) for bn in (64, 128) for w in (4, 8) for st in (2, 3)]


@triton.jit
def _index_scores_fwd(q_ptr, k_ptr, w_ptr, o_ptr, S, N, HI, DI,
                      sq_b, sq_s, sq_h, sk_b, sk_n, sw_b, sw_s, so_b, so_s,
                      BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0)
    offs_s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < S
    n_ok = offs_n < N
    d_ok = offs_d < DI
    k = tl.load(k_ptr + b * sk_b + offs_n[:, None] * sk_n + offs_d[None, :],
                mask=n_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)        # [BLOCK_N, BLOCK_D]
    acc = tl.zeros([BLOCK_S, BLOCK_N], dtype=tl.float32)
    for h in range(0, HI):
        q = tl.load(q_ptr + b * sq_b + offs_s[:, None] * sq_s + h * sq_h + offs_d[None, :],
                    mask=s_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)    # [BLOCK_S, BLOCK_D]
        w = tl.load(w_ptr + b * sw_b + offs_s * sw_s + h, mask=s_ok, other=0.0).to(tl.float32)
        dots = tl.dot(q, tl.trans(k), input_precision="ieee")                        # [BLOCK_S, BLOCK_N]
        acc += w[:, None] * tl.maximum(dots, 0.0)
    tl.store(o_ptr + b * so_b + offs_s[:, None] * so_s + offs_n[None, :], acc,
             mask=s_ok[:, None] & n_ok[None, :])


_index_scores_tuned = _index_scores_fwd if interpreted() else triton.autotune(
    configs=_configs(), key=["HI", "DI"])(_index_scores_fwd)


def index_scores(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """q: [B, S, Hi, Di], k: [B, N, Di], w: [B, S, Hi] → scores: [B, S, N] (fp32, no mask)."""
    def bad(name, value, rule):
        raise ValueError(f"index_scores: argument {name!r} = {value}: {rule}")

    if q.dim() != 4:
        bad("q", tuple(q.shape), "must be [B, S, Hi, Di]")
    B, S, HI, DI = q.shape
    if k.dim() != 3 or k.shape[0] != B or k.shape[2] != DI:
        bad("k", tuple(k.shape), f"must be [B={B}, N, Di={DI}]")
    if tuple(w.shape) != (B, S, HI):
        bad("w", tuple(w.shape), f"must be [B={B}, S={S}, Hi={HI}]")
    for name, t in (("q", q), ("k", k), ("w", w)):
        if not t.is_floating_point():
            bad(f"{name}.dtype", t.dtype, "must be floating point")
    N = k.shape[1]
    q, k, w = q.contiguous(), k.contiguous(), w.contiguous()
    out = torch.empty(B, S, N, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out
    BLOCK_D = max(16, triton.next_power_of_2(DI))
    args = (q, k, w, out, S, N, HI, DI, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1),
            w.stride(0), w.stride(1), out.stride(0), out.stride(1))
    if interpreted():
        bs = min(64, max(16, triton.next_power_of_2(S)))
        bn = min(128, max(16, triton.next_power_of_2(N)))
        _index_scores_fwd[(B, triton.cdiv(S, bs), triton.cdiv(N, bn))](*args, BLOCK_S=bs, BLOCK_N=bn, BLOCK_D=BLOCK_D)
    else:
        grid = lambda meta: (B, triton.cdiv(S, meta["BLOCK_S"]), triton.cdiv(N, meta["BLOCK_N"]))  # noqa: E731
        _index_scores_tuned[grid](*args, BLOCK_D=BLOCK_D)
    return out
