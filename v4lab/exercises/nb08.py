"""Exercises of notebook 08 (kernels): the roofline of each kernel, the bytes an FP4 expert costs, and an
edge case every attention kernel must get right.

Roofline answers come from ``v4lab.viz.kernels.roofline_points`` (``v4lab.hardware`` peaks and the kernels'
first-order costs at V4-Flash shapes); the storage answer from ``v4lab.quant.mxfp4_quantize``; the edge case
runs the Triton kernel ``v4lab.kernels.sparse_attn`` itself (interpreted on a CPU, compiled with CUDA).
"""
from __future__ import annotations

import torch

from v4lab import quant
from v4lab.device import kernel_mode
from v4lab.exercises import Answer, exercise
from v4lab.viz import kernels

GPU = "H200"
MAX_TOKENS_EXP = 16          # token counts 1, 2, 4, ... 65536


def bound_at(kernel: str, tokens: int, gpu: str = GPU) -> dict:
    """The roofline point of ``kernel`` at ``tokens`` tokens per call."""
    return next(p for p in kernels.roofline_points(gpu, tokens) if p["kernel"] == kernel)


def first_compute_bound(kernel: str, gpu: str = GPU) -> int | None:
    """The smallest power-of-two token count at which ``kernel`` is compute-bound on ``gpu``."""
    return next((2 ** e for e in range(MAX_TOKENS_EXP + 1) if bound_at(kernel, 2 ** e, gpu)["bound"] == "compute"),
                None)


@exercise("08.fp4_gemm_compute_bound")
def fp4_gemm_compute_bound() -> Answer:
    m = first_compute_bound("fp4_gemm")
    p = bound_at("fp4_gemm", m)
    return Answer(m, f"fp4_gemm turns compute-bound on {GPU} at {m} tokens per call (intensity {p['intensity']:.3g} "
                     f"FLOP/B): one 4-bit weight read serves every token of the call, so intensity grows with the "
                     f"tokens until it passes the ridge point (peak {p['precision'].upper()} FLOP/s ÷ bandwidth). "
                     "Hopper runs FP4 operands at its FP8 rate.")


@exercise("08.sparse_attn_batching")
def sparse_attn_batching() -> Answer:
    one, many = bound_at("sparse_attn", 1), bound_at("sparse_attn", 4096)
    ratio = many["intensity"] / one["intensity"]
    return Answer(ratio, f"the intensity of sparse_attn is {one['intensity']:.3g} FLOP/B at 1 token and "
                         f"{many['intensity']:.3g} at 4096 (×{ratio:.3g}): every query gathers its own selected "
                         "entries, so more queries bring more bytes with their FLOPs. Only the 64 heads sharing "
                         "each entry give it intensity at all. Within 5 %.", rel_tol=0.05)


@exercise("08.mxfp4_bytes")
def mxfp4_bytes() -> Answer:
    # one row quantised for real, times the rows: every row of [I, D] stores the same (blocks run along D)
    row = torch.randn(1, kernels.D_MODEL, generator=torch.Generator().manual_seed(0))
    packed, scales = quant.mxfp4_quantize(row)
    rows = kernels.EXPERT_I
    code_b, scale_b = rows * packed.numel() * packed.element_size(), rows * scales.numel() * scales.element_size()
    n = code_b + scale_b
    return Answer(n, f"one [{rows}, {kernels.D_MODEL}] expert projection stores {code_b:,} bytes of packed E2M1 "
                     f"codes (two per byte) and {scale_b:,} one-byte E8M0 scales (one per {quant.FP4_BLOCK} weights): "
                     f"{n:,} bytes, {8 * n / (rows * kernels.D_MODEL):g} bits per weight. Within 2 %.", rel_tol=0.02)


def empty_row_inputs(seed: int = 0) -> tuple:
    """Small sparse-attention inputs whose query 0 has no valid index (every slot −1)."""
    g = torch.Generator().manual_seed(seed)
    B, S, H, D, N, K = 1, 4, 4, 32, 24, 8
    q, kv, sink = torch.randn(B, S, H, D, generator=g), torch.randn(B, N, D, generator=g), torch.randn(H, generator=g)
    idx = torch.randint(0, N, (B, S, K), generator=g)
    idx[:, 0] = -1
    return q, kv, sink, idx, D ** -0.5


@exercise("08.empty_row")
def empty_row() -> Answer:
    from v4lab.kernels.sparse_attn import sparse_attn
    args = empty_row_inputs()
    if kernel_mode() == "compiled":
        args = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)
    o = sparse_attn(*args)
    biggest = float(o[:, 0].abs().max())
    return Answer(biggest, f"the Triton kernel returns {biggest:g} for every element of query 0: with no key the "
                           "sink takes all the probability mass, and the sink contributes no value, so the output "
                           "is exactly zero: not NaN from a softmax over nothing, not an average of the values.",
                  abs_tol=1e-6)
