"""Grouped expert MLP over the sorted layout — Triton twin of ``v4lab.moe.grouped_expert_mlp``.

Rows of ``x_sorted`` are grouped by expert (rows offsets[e]:offsets[e+1] belong to expert e). For every
row r of expert e:

    h_r = w_r * SiLU(min(W1_e x_r, L)) * clip(W3_e x_r, -L, L)       (L <= 0: no clamp)
    y_r = W2_e h_r

Two kernels. The host cuts each expert's rows into tiles of BLOCK_M rows (a tile never straddles two
experts) and passes a small tile table (expert, first row, end row). Kernel 1 computes the gate and up
projections of a tile for a block of the intermediate width and fuses the clamp, SiLU, product and the
routing weight into the epilogue, writing h [N, I] fp32. Kernel 2 is the down projection of a tile for a
block of the hidden width. Between them h is rounded to W2's dtype on the host (torch rounding), as the
reference does before W2; with fp32 weights that is a no-op.

Dots are fp32 ("ieee") so the result matches the fp32 reference; inputs of other dtypes are converted to
fp32 when loaded. Forward only. Autotuning (BLOCK_N, BLOCK_K, warps) only when compiling for a GPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import interpreted


@triton.jit
def _gate_up_kernel(x_ptr, w1_ptr, w3_ptr, rw_ptr, h_ptr, t_exp_ptr, t_start_ptr, t_end_ptr,
                    D, I, limit,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, CLAMP: tl.constexpr):
    tile = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(t_exp_ptr + tile).to(tl.int64)
    start = tl.load(t_start_ptr + tile).to(tl.int64)          # int64: rows * D may pass 2**31
    end = tl.load(t_end_ptr + tile)
    rows = start + tl.arange(0, BLOCK_M)                               # [BLOCK_M] rows of the sorted layout
    r_ok = rows < end
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                     # [BLOCK_N] intermediate channels
    c_ok = cols < I
    w_base = e * I * D
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < D
        x = tl.load(x_ptr + rows[:, None] * D + ks[None, :], mask=r_ok[:, None] & k_ok[None, :],
                    other=0.0).to(tl.float32)                          # x: [BLOCK_M, BLOCK_K]
        wmask = k_ok[:, None] & c_ok[None, :]
        woff = w_base + cols[None, :] * D + ks[:, None]                # W[e]^T block: [BLOCK_K, BLOCK_N]
        w1 = tl.load(w1_ptr + woff, mask=wmask, other=0.0).to(tl.float32)
        w3 = tl.load(w3_ptr + woff, mask=wmask, other=0.0).to(tl.float32)
        acc_g += tl.dot(x, w1, input_precision="ieee")
        acc_u += tl.dot(x, w3, input_precision="ieee")
    if CLAMP:
        acc_g = tl.minimum(acc_g, limit)
        acc_u = tl.minimum(tl.maximum(acc_u, -limit), limit)
    rw = tl.load(rw_ptr + rows, mask=r_ok, other=0.0).to(tl.float32)   # routing weight per row
    h = acc_g * tl.sigmoid(acc_g) * acc_u * rw[:, None]
    tl.store(h_ptr + rows[:, None] * I + cols[None, :], h, mask=r_ok[:, None] & c_ok[None, :])


@triton.jit
def _down_kernel(h_ptr, w2_ptr, y_ptr, t_exp_ptr, t_start_ptr, t_end_ptr, D, I,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    tile = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(t_exp_ptr + tile).to(tl.int64)
    start = tl.load(t_start_ptr + tile).to(tl.int64)          # int64: rows * D may pass 2**31
    end = tl.load(t_end_ptr + tile)
    rows = start + tl.arange(0, BLOCK_M)
    r_ok = rows < end
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                     # [BLOCK_N] hidden channels
    c_ok = cols < D
    w_base = e * D * I
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < I
        h = tl.load(h_ptr + rows[:, None] * I + ks[None, :], mask=r_ok[:, None] & k_ok[None, :],
                    other=0.0).to(tl.float32)                          # h: [BLOCK_M, BLOCK_K]
        w2 = tl.load(w2_ptr + w_base + cols[None, :] * I + ks[:, None], mask=k_ok[:, None] & c_ok[None, :],
                     other=0.0).to(tl.float32)                         # W2[e]^T block: [BLOCK_K, BLOCK_N]
        acc += tl.dot(h, w2, input_precision="ieee")
    tl.store(y_ptr + rows[:, None] * D + cols[None, :], acc, mask=r_ok[:, None] & c_ok[None, :])


def _configs():
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st)
            for bn in (64, 128) for bk in (32, 64) for w in (4, 8) for st in (2, 3)]


_gate_up_tuned = _gate_up_kernel if interpreted() else triton.autotune(_configs(), key=["D", "I"])(_gate_up_kernel)
_down_tuned = _down_kernel if interpreted() else triton.autotune(_configs(), key=["D", "I"])(_down_kernel)


def tile_table(offsets: torch.Tensor, block_m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(expert, start, end) int32 per tile of ``block_m`` rows; tiles never straddle two experts."""
    counts = (offsets[1:] - offsets[:-1]).long()
    n_tiles = (counts + block_m - 1) // block_m                          # [E]
    E = counts.numel()
    t_exp = torch.repeat_interleave(torch.arange(E, device=offsets.device), n_tiles)
    first_tile = torch.cumsum(n_tiles, 0) - n_tiles
    j = torch.arange(t_exp.numel(), device=offsets.device) - first_tile[t_exp]
    t_start = offsets[:-1].long()[t_exp] + j * block_m
    t_end = offsets[1:].long()[t_exp]
    return t_exp.int().contiguous(), t_start.int().contiguous(), t_end.int().contiguous()


def grouped_expert_mlp(x_sorted: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor,
                       offsets: torch.Tensor, row_weight: torch.Tensor, limit: float) -> torch.Tensor:
    """Same signature and result as ``v4lab.moe.grouped_expert_mlp``: x_sorted [N, D], w1/w3 [E, I, D],
    w2 [E, D, I], offsets [E+1] int, row_weight [N] -> [N, D] fp32."""
    N, D = x_sorted.shape
    E, I, D1 = w1.shape

    def bad(name, value, rule):
        raise ValueError(f"{name} = {value!r}: {rule}")

    if D1 != D or tuple(w3.shape) != (E, I, D) or tuple(w2.shape) != (E, D, I):
        bad("weight shapes", (tuple(w1.shape), tuple(w3.shape), tuple(w2.shape)),
            f"need w1, w3 [E, I, D] and w2 [E, D, I] with D = {D} (x_sorted's width)")
    if offsets.numel() != E + 1 or int(offsets[0]) != 0 or int(offsets[-1]) != N:
        bad("offsets", offsets.tolist(), f"need E + 1 = {E + 1} non-decreasing entries from 0 to N = {N}")
    if row_weight.numel() != N:
        bad("row_weight", tuple(row_weight.shape), f"need one weight per row ({N})")
    y = torch.zeros(N, D, dtype=torch.float32, device=x_sorted.device)
    if N == 0:
        return y
    interp = interpreted()
    # Under the interpreter cost is per program: one tile covers a whole (small) expert group.
    bm = max(16, min(64, triton.next_power_of_2(int((offsets[1:] - offsets[:-1]).max())))) if interp else 64
    t_exp, t_start, t_end = tile_table(offsets.to(x_sorted.device), bm)
    x = x_sorted.contiguous()
    rw = row_weight.contiguous()
    h = torch.empty(N, I, dtype=torch.float32, device=x.device)
    clamp = limit > 0
    lim = float(limit) if clamp else 0.0
    if interp:
        bn1, bk1 = max(16, triton.next_power_of_2(I)), max(16, triton.next_power_of_2(D))
        _gate_up_kernel[(t_exp.numel(), triton.cdiv(I, bn1))](
            x, w1.contiguous(), w3.contiguous(), rw, h, t_exp, t_start, t_end, D, I, lim,
            BLOCK_M=bm, BLOCK_N=bn1, BLOCK_K=bk1, CLAMP=clamp)
    else:
        grid = lambda meta: (t_exp.numel(), triton.cdiv(I, meta["BLOCK_N"]))  # noqa: E731
        _gate_up_tuned[grid](x, w1.contiguous(), w3.contiguous(), rw, h, t_exp, t_start, t_end, D, I, lim,
                             BLOCK_M=bm, CLAMP=clamp)
    if w2.dtype != torch.float32:
        h = h.to(w2.dtype)            # the reference rounds W2's input to W2's dtype (official numerics)
    if interp:
        bn2, bk2 = max(16, triton.next_power_of_2(D)), max(16, triton.next_power_of_2(I))
        _down_kernel[(t_exp.numel(), triton.cdiv(D, bn2))](
            h, w2.contiguous(), y, t_exp, t_start, t_end, D, I, BLOCK_M=bm, BLOCK_N=bn2, BLOCK_K=bk2)
    else:
        grid = lambda meta: (t_exp.numel(), triton.cdiv(D, meta["BLOCK_N"]))  # noqa: E731
        _down_tuned[grid](h, w2.contiguous(), y, t_exp, t_start, t_end, D, I, BLOCK_M=bm)
    return y
