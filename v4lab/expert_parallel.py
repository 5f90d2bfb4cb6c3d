"""Expert parallelism (EP): the routed experts of one MoE layer spread over ``ep_size`` ranks.

Rank r holds experts ``r*E_r .. (r+1)*E_r - 1`` (E_r = n_routed_experts / ep_size) and its own tokens.
One MoE forward on rank r, with T local tokens routed top-K (the pattern DeepEP implements):

    1. route locally                      idx [T, K], w [T, K]   (the gate is replicated)
    2. plan: the T*K (token, slot) pairs sorted by expert, hence by owner rank      -> send_counts [ep]
    3. exchange the per-expert counts    all_to_all_single  [ep, E_r] -> recv_counts [ep(src), E_r]
    4. dispatch the token rows           all_to_all_single  x[token] (FP8 optional) -> rows (src, expert)
    5. run the local experts grouped     one matmul per local expert (unweighted)
    6. send the outputs back             all_to_all_single with the splits swapped
    7. combine                           y[t] = sum_k w[t,k] * out[t,k]   (+ the shared expert, local)

The routing weights never cross the wire: they multiply the returned rows in the combine, so the gate's
gradient stays on its rank. ``v4lab.moe`` multiplies the weight into the intermediate before W2 instead
(the official code); both are the same sum in exact arithmetic (fp32 difference measured by the tests).

Everything but the transport is a pure function of tensors (:func:`dispatch_plan`, :func:`receive_layout`,
:func:`run_local_experts`, :func:`combine`, :func:`wire_bytes`). Two drivers use them:
:func:`ep_forward` runs one rank inside a ``torch.distributed`` group (gloo on CPU, NCCL on CUDA) with the
autograd-aware :class:`AllToAll`; :func:`simulate` runs every rank of a simulated world in one process, the
all-to-all being a transpose of per-rank lists (the notebook's figure, the tests' reference).

FP8 dispatch (DeepSeek-V3 report §3.3.3: activations are quantised to FP8 before dispatch, the combine stays
BF16): each row is sent as E4M3 bytes with one UE8M0 scale byte per 128 values (``v4lab.quant``'s
activation format), i.e. D + D/128 bytes per row. The backward sends gradients in full precision
(straight-through).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

from v4lab.quant import FP8_AMAX_FLOOR, FP8_BLOCK, FP8_MAX, e8m0_to_float, pow2_scale, scale_to_e8m0


def _bad(name, value, rule):
    raise ValueError(f"{name} = {value!r}: {rule}")


def check_ep(n_experts: int, ep_size: int) -> int:
    """Experts per rank; ``ep_size`` must be a positive divisor of ``n_experts``."""
    if isinstance(ep_size, bool) or not isinstance(ep_size, int) or ep_size < 1 or n_experts % ep_size:
        _bad("ep_size", ep_size, f"must be a positive integer dividing n_routed_experts = {n_experts}")
    return n_experts // ep_size


# --------------------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class DispatchPlan:
    """Which rows rank r sends where. ``order [P]``: flat (token, slot) ids t*K+k grouped by expert
    (stable), so grouped by owner rank too; ``token [P]``: the token of each sorted pair;
    ``expert_counts [E]``: pairs per global expert; ``ep_size``."""
    order: torch.Tensor
    token: torch.Tensor
    expert_counts: torch.Tensor
    ep_size: int

    @property
    def counts_by_rank(self) -> torch.Tensor:
        """[ep, E_r]: pairs for each local expert of each destination rank (what step 3 sends)."""
        return self.expert_counts.view(self.ep_size, -1)

    @property
    def send_counts(self) -> torch.Tensor:
        """[ep]: rows sent to each rank (self included)."""
        return self.counts_by_rank.sum(1)


def dispatch_plan(idx: torch.Tensor, n_experts: int, ep_size: int) -> DispatchPlan:
    """The plan of one rank's routing idx [T, K] (expert ids in [0, n_experts))."""
    check_ep(n_experts, ep_size)
    flat = idx.reshape(-1)
    order = torch.sort(flat, stable=True).indices
    counts = torch.bincount(flat, minlength=n_experts)
    return DispatchPlan(order, order // max(1, idx.shape[1]), counts, ep_size)


def receive_layout(recv_counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows arrive grouped by source rank, then by local expert. Returns (perm [N], offsets [E_r+1]):
    ``rows[perm]`` groups them by local expert (then source), expert e owning offsets[e]:offsets[e+1]."""
    ep, n_local = recv_counts.shape
    src_major = recv_counts.reshape(-1)                                  # (src, e) blocks in arrival order
    starts = torch.cumsum(src_major, 0) - src_major
    blocks = torch.arange(ep * n_local).view(ep, n_local).T.reshape(-1)  # the same blocks, expert-major
    perm = [torch.arange(int(starts[b]), int(starts[b] + src_major[b])) for b in blocks.tolist()]
    perm = torch.cat(perm) if perm else torch.zeros(0, dtype=torch.int64)
    offsets = torch.zeros(n_local + 1, dtype=torch.int64)
    offsets[1:] = recv_counts.sum(0).cumsum(0)
    return perm, offsets


def run_local_experts(rows: torch.Tensor, recv_counts: torch.Tensor, w1s: Sequence[torch.Tensor],
                      w2s: Sequence[torch.Tensor], w3s: Sequence[torch.Tensor], limit: float, *,
                      ffn: Callable) -> torch.Tensor:
    """The local experts on the received rows [N, D] (arrival order) -> [N, D] fp32 in arrival order,
    unweighted (the combine applies the routing weights). ``ffn`` is ``v4lab.moe.expert_ffn`` (passed in,
    so this module sits beside moe without importing it)."""
    perm, offsets = receive_layout(recv_counts.cpu())
    perm = perm.to(rows.device)
    grouped = rows[perm]
    outs = []
    off = offsets.tolist()
    for e in range(len(w1s)):
        a, b = off[e], off[e + 1]
        if a < b:
            outs.append(ffn(grouped[a:b], w1s[e], w2s[e], w3s[e], None, limit))
    y = torch.cat(outs) if outs else rows.new_zeros(0, rows.shape[1], dtype=torch.float32)
    return torch.zeros_like(y).index_copy(0, perm, y)                   # back to arrival order


def combine(back: torch.Tensor, plan: DispatchPlan, weights: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """y [T, D] = sum over pairs of w[t, k] * back row (back [P, D] in plan order); fp32 (float64 stays)."""
    dt = torch.promote_types(back.dtype, torch.float32)
    w = weights.reshape(-1)[plan.order].to(dt)
    out = torch.zeros(n_tokens, back.shape[1], dtype=dt, device=back.device)
    return out.index_add(0, plan.token, back.to(dt) * w[:, None])


def row_bytes(hidden: int, fp8: bool, elem_bytes: int = 4) -> int:
    """Bytes of one dispatched row: FP8 = hidden E4M3 bytes + hidden/128 UE8M0 scales; else hidden * elem."""
    return hidden + hidden // FP8_BLOCK if fp8 else hidden * elem_bytes


def wire_bytes(splits: Sequence[int], rank: int, nbytes_per_row: int) -> int:
    """Bytes a rank puts on the wire for one all-to-all: every row not addressed to itself."""
    return int(sum(int(n) for j, n in enumerate(splits) if j != rank)) * nbytes_per_row


# --------------------------------------------------------------------------------------- FP8 rows
def fp8_pack(x: torch.Tensor) -> torch.Tensor:
    """Rows x [N, D] -> uint8 [N, D + D/128]: E4M3 codes, then one UE8M0 scale byte per 128 values
    (scale 2^ceil(log2(amax/448)), as ``v4lab.quant.act_quant_fp8``)."""
    N, D = x.shape
    if D % FP8_BLOCK:
        _bad("hidden_size", D, f"FP8 dispatch needs a multiple of {FP8_BLOCK}")
    xb = x.detach().float().reshape(N, D // FP8_BLOCK, FP8_BLOCK)
    s = pow2_scale(xb.abs().amax(-1, keepdim=True), FP8_MAX, FP8_AMAX_FLOOR)
    q = (xb / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).view(torch.uint8).reshape(N, D)
    return torch.cat([q, scale_to_e8m0(s).reshape(N, -1)], 1)


def fp8_unpack(packed: torch.Tensor, hidden: int) -> torch.Tensor:
    """uint8 [N, D + D/128] -> fp32 [N, D]."""
    N = packed.shape[0]
    q = packed[:, :hidden].contiguous().view(torch.float8_e4m3fn).float().reshape(N, -1, FP8_BLOCK)
    s = e8m0_to_float(packed[:, hidden:])
    return (q * s[..., None]).reshape(N, hidden)


# --------------------------------------------------------------------------------------- transport
def _a2a(x: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
    out = x.new_empty((sum(recv),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
    return out


class AllToAll(torch.autograd.Function):
    """Rows [N, D]: rank r sends ``send[j]`` rows to rank j and receives ``recv[j]`` from it. The backward
    is the same exchange with the splits swapped. ``fp8``: the forward sends FP8 rows (``fp8_pack``),
    the backward full-precision gradients (straight-through)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, send: list[int], recv: list[int], group: dist.ProcessGroup | None,
                fp8: bool) -> torch.Tensor:
        ctx.send, ctx.recv, ctx.group = send, recv, group
        if fp8:
            return fp8_unpack(_a2a(fp8_pack(x), send, recv, group), x.shape[1]).to(x.dtype)
        return _a2a(x, send, recv, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None, None]:
        return _a2a(grad, ctx.recv, ctx.send, ctx.group), None, None, None, None


def exchange_counts(counts_by_rank: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """[ep, E_r] pairs for each destination's experts -> [ep(src), E_r] pairs each source sends here.
    Counts travel as int64 (gloo and NCCL both take it)."""
    out = torch.empty_like(counts_by_rank)
    dist.all_to_all_single(out, counts_by_rank.contiguous(), group=group)
    return out


def ep_forward(x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, w1s: Sequence[torch.Tensor],
               w2s: Sequence[torch.Tensor], w3s: Sequence[torch.Tensor], limit: float, n_experts: int,
               group: dist.ProcessGroup | None = None, fp8: bool = False, *,
               ffn: Callable) -> tuple[torch.Tensor, dict]:
    """One rank's routed-expert output y [T, D] fp32 (no shared expert) and its traffic record.

    x [T, D] local tokens, idx/weights [T, K] local routing, w1s/w2s/w3s this rank's E_r experts."""
    ep, rank = dist.get_world_size(group), dist.get_rank(group)
    plan = dispatch_plan(idx, n_experts, ep)
    if len(w1s) != n_experts // ep:
        _bad("local experts", len(w1s), f"must be n_routed_experts / ep_size = {n_experts // ep}")
    dev = x.device
    recv_counts = exchange_counts(plan.counts_by_rank.to(dev), group).cpu()
    send, recv = plan.send_counts.tolist(), recv_counts.sum(1).tolist()
    rows = AllToAll.apply(x[plan.token.to(dev)], send, recv, group, fp8)
    y = run_local_experts(rows, recv_counts, w1s, w2s, w3s, limit, ffn=ffn)
    back = AllToAll.apply(y, recv, send, group, False)
    out = combine(back, _on(plan, dev), weights, x.shape[0])
    return out, traffic(plan, recv_counts, rank, x.shape[1], fp8, x.element_size(), y.element_size())


def _on(plan: DispatchPlan, dev) -> DispatchPlan:
    return DispatchPlan(plan.order.to(dev), plan.token.to(dev), plan.expert_counts, plan.ep_size)


def traffic(plan: DispatchPlan, recv_counts: torch.Tensor, rank: int, hidden: int, fp8: bool,
            x_bytes: int, y_bytes: int) -> dict:
    """What one rank sends: rows per destination, dispatch/combine bytes off-rank, count bytes."""
    send, recv = plan.send_counts.tolist(), recv_counts.sum(1).tolist()
    ep = plan.ep_size
    return {"rank": rank, "send_rows": send, "recv_rows": recv,
            "pairs": int(sum(send)), "remote_pairs": int(sum(send) - send[rank]),
            "dispatch_bytes": wire_bytes(send, rank, row_bytes(hidden, fp8, x_bytes)),
            "combine_bytes": wire_bytes(recv, rank, hidden * y_bytes),
            "count_bytes": (ep - 1) * plan.counts_by_rank.shape[1] * 8}


# --------------------------------------------------------------------------------------- simulated world
def simulate(xs: Sequence[torch.Tensor], idxs: Sequence[torch.Tensor], weights: Sequence[torch.Tensor],
             w1s: Sequence[torch.Tensor], w2s: Sequence[torch.Tensor], w3s: Sequence[torch.Tensor], limit: float,
             ep_size: int, fp8: bool = False, *, ffn: Callable) -> tuple[list[torch.Tensor], list[dict]]:
    """Every rank of an EP world in one process (ranks as a loop; the all-to-all is a list transpose).

    xs/idxs/weights: per-rank lists of x [T_r, D], idx [T_r, K], w [T_r, K]; w1s/w2s/w3s: ALL experts
    (rank j uses its slice). Returns (outs: per-rank y [T_r, D] fp32, records: per-rank :func:`traffic`)."""
    E = len(w1s)
    n_local = check_ep(E, ep_size)
    if not len(xs) == len(idxs) == len(weights) == ep_size:
        _bad("ranks", len(xs), f"xs, idxs and weights need one entry per rank (ep_size = {ep_size})")
    plans, recv_counts = world_plans(idxs, E, ep_size)
    sent = [x[p.token] for x, p in zip(xs, plans)]
    if fp8:                                            # what the wire carries, decoded on arrival
        sent = [fp8_unpack(fp8_pack(s), s.shape[1]).to(s.dtype) for s in sent]
    chunks = [list(s.split(p.send_counts.tolist())) for s, p in zip(sent, plans)]
    ys = []
    for j in range(ep_size):
        rows = torch.cat([chunks[i][j] for i in range(ep_size)])
        sl = slice(j * n_local, (j + 1) * n_local)
        ys.append(run_local_experts(rows, recv_counts[j], w1s[sl], w2s[sl], w3s[sl], limit, ffn=ffn))
    back = [list(y.split(rc.sum(1).tolist())) for y, rc in zip(ys, recv_counts)]
    outs = [combine(torch.cat([back[j][i] for j in range(ep_size)]), plans[i], weights[i], xs[i].shape[0])
            for i in range(ep_size)]
    recs = [traffic(plans[i], recv_counts[i], i, xs[i].shape[1], fp8, xs[i].element_size(), 4)
            for i in range(ep_size)]
    return outs, recs


def world_plans(idxs: Sequence[torch.Tensor], n_experts: int,
                ep_size: int) -> tuple[list[DispatchPlan], list[torch.Tensor]]:
    """Every rank's plan and what it receives (step 3 of a simulated world): (plans, recv_counts [src, E_r])."""
    plans = [dispatch_plan(i, n_experts, ep_size) for i in idxs]
    return plans, [torch.stack([p.counts_by_rank[j] for p in plans]) for j in range(ep_size)]


def world_traffic(idxs: Sequence[torch.Tensor], n_experts: int, ep_size: int, hidden: int, fp8: bool = False,
                  x_bytes: int = 2, y_bytes: int = 2) -> list[dict]:
    """The per-rank :func:`traffic` records of a simulated world from its routing alone (no expert runs):
    the bookkeeping of a full-size model (V4-Pro's 7168-wide rows) without its weights."""
    if len(idxs) != ep_size:
        _bad("ranks", len(idxs), f"idxs needs one entry per rank (ep_size = {ep_size})")
    plans, recv_counts = world_plans(idxs, n_experts, ep_size)
    return [traffic(p, rc, i, hidden, fp8, x_bytes, y_bytes) for i, (p, rc) in enumerate(zip(plans, recv_counts))]


def rank_load(idx: torch.Tensor, n_experts: int, ep_size: int) -> torch.Tensor:
    """(token, slot) pairs each rank's experts receive from a routing idx [T, K]: [ep] int64."""
    return dispatch_plan(idx, n_experts, ep_size).send_counts


__all__ = ["DispatchPlan", "dispatch_plan", "receive_layout", "run_local_experts", "combine", "row_bytes",
           "wire_bytes", "fp8_pack", "fp8_unpack", "AllToAll", "exchange_counts", "ep_forward", "traffic",
           "simulate", "world_plans", "world_traffic", "rank_load", "check_ep"]
