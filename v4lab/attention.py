"""V4 hybrid attention: sliding window + CSA (indexer top-k) / HCA (all entries), one softmax with a sink.

Spec: docs/design/v4-attention.md §3 (data flow), §3.5 (visibility), §4 (precision), §7 (vs HF).

Per query t the candidate set is the raw window (positions max(0, t−w+1)..t) plus, in CSA layers, the
indexer's top-k visible compressed entries, or, in HCA layers, every visible compressed entry
(s < ⌊(t+1)/m⌋). One softmax over the union with a per-head sink logit in the denominator; window and
compressed entries are not de-duplicated. Like the official code, the layer builds explicit index lists
(−1 = empty slot) and hands them to one of two references with the same signature and result:

- `sparse_attn` (gather path): copy each query's K listed rows, then H-row products per query.
- `dense_attn` (dense-block path): a block of queries scores every row it can see (its window rows and
  the compressed entries visible to its last query) in two large GEMMs; rows not in a query's list get
  −inf (a row listed n times gets + log n, so both paths agree exactly).

Which one runs is `attn_path` ("auto" | "dense" | "gather"), an argument of `forward` or the module's
attribute (default "auto"). "auto" picks per block of queries with `choose_attn_path`, a cost model on
heads H, queries s, rows seen N' = s + w − 1 + visible entries, and listed rows K = w + top-k (CSA) or
w + visible entries (HCA), in GEMM-FLOP equivalents (calibrated on this project's 2-core CPU):
    dense  = 4 · s · H · N' · D
    gather = s · K · D · (190 + 4 · max(H, 16))     (190: one gathered float ≈ 190 GEMM FLOPs; products of
                                                     fewer than 16 rows run at ≤ H/16 of GEMM speed)
Crossover (attention blocks of 64 queries, head dim 512, window 128, top-512):
- the released V4-Flash shape (64 heads): CSA dense up to ~3.5K tokens of context, gather beyond (measured
  on one block: gather/dense time 1.17 at 1K, 0.91 at 4K, 0.18 at 16K context; the model says 1.5,
  0.92, 0.26); HCA dense at every length (its N' grows by 1 per 128 tokens). One-token decode: CSA dense
  below 4K, HCA always dense.
- two heads (the narrowed bench layer): dense up to ~90K tokens for CSA, always for HCA.
Long inputs run as consecutive chunks of `prefill_chunk` tokens through the cache, and queries are
projected and attended in blocks (`q_chunk`), so peak memory is linear in the context.

Choices where the sources leave room (documented, tested):
- Batches advance in lock-step (one start_pos for all rows). Rows of different lengths are not
  supported; `seq_lens` with unequal lengths raises a ValueError.
- Indexer top-k ties (e.g. several entries scoring exactly 0 after ReLU) go to the lower entry index,
  so prefill and decode pick the same set (torch.topk's tie order depends on the tensor shape).
- Low-precision simulation (`low_precision = True`): FP8 E4M3 block-64 fake-quant of the KV non-rope
  dims (window and compressed entries; a width that is not a multiple of 64, as in tiny configs, gets
  a zero-padded last block), Hadamard + MXFP4 on indexer q/k, BF16 index scores.
- The references run by default; with `switches.kernels` (`v4lab.switches`, set for a whole model by
  `V4Model.use_kernels`) the sparse core, the compressor pooling and the index scores run through the
  Triton kernels (same signatures), and "auto" takes the gather path, the kernel's twin.
- The indexer is not trained by the attention loss (top-k selection has no gradient), as in V4. With
  `distill = True` (CSA) a forward also records the indexer's warm-up loss (`indexer.distill_kl`): the
  main attention's probability on every visible compressed entry (dense, over window + all visible
  entries + sink, summed over heads) is the target of the indexer's softmax. The indexer then reads
  x and the query latent detached, so that loss trains the indexer only. `last_distill` = (Σ KL, queries),
  `last_recall` = (oracle top-k entries picked, possible).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .compressor import Compressor, CompressorState
from .indexer import Indexer, distill_kl, topk_recall, visible_entries
from .norm import RMSNorm, rms_norm
from .rope import apply_rope, cos_sin, layer_inv_freq
from .switches import Switches, share_switches


def _check_attn_args(name, q, kv, attn_sink, idx):
    if q.dim() != 4 or kv.dim() != 3 or idx.dim() != 3:
        raise ValueError(f"{name}: q {tuple(q.shape)} must be [B,S,H,D], kv {tuple(kv.shape)} [B,N,D], "
                         f"idx {tuple(idx.shape)} [B,S,K]")
    B, S, H, D = q.shape
    if kv.shape[0] != B or kv.shape[2] != D or idx.shape[:2] != (B, S) or tuple(attn_sink.shape) != (H,):
        raise ValueError(f"{name}: shapes disagree: q {tuple(q.shape)}, kv {tuple(kv.shape)}, "
                         f"idx {tuple(idx.shape)}, attn_sink {tuple(attn_sink.shape)}")
    if idx.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name}: idx dtype {idx.dtype} must be int64 (or int32)")
    if bool((idx >= kv.shape[1]).any()):
        raise ValueError(f"{name}: idx has entries >= N = {kv.shape[1]}")


def _sink_softmax(z: torch.Tensor, attn_sink: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """z [..., H, K] (−inf = not attended) → (p [..., H, K], the sink's mass [..., H, 1]): one softmax over
    [z, sink] with the sink's column returned apart (its value is zero). Rows with nothing but −inf get p = 0
    (a −inf sink would otherwise give NaN). In z's dtype (fp32 in the model, fp64 in gradcheck)."""
    sink = attn_sink.to(z.dtype).view(-1, 1)
    m = torch.maximum(z.detach().amax(-1, keepdim=True), sink.detach())     # a shift, not a function of z
    m = m.masked_fill(m == float("-inf"), 0.0)                      # nothing attended and a −inf sink
    e, e_sink = (z - m).exp(), (sink - m).exp()
    # (no [z, sink] concatenation: one copy fewer of the [B, S, H, K] scores)
    den = (e.sum(-1, keepdim=True) + e_sink).clamp_min(torch.finfo(z.dtype).tiny)
    return e / den, e_sink / den


def sparse_attn(q: torch.Tensor, kv: torch.Tensor, attn_sink: torch.Tensor, idx: torch.Tensor,
                scale: float) -> torch.Tensor:
    """Gather-based attention over explicit index lists, with a per-head sink in the denominator.

    q: [B, S, H, D], kv: [B, N, D] (K = V, one head), attn_sink: [H], idx: [B, S, K] int64 into N,
    −1 = ignored → o: [B, S, H, D] (dtype of q), computed in fp32.
    o = Σ_j p_j kv_j with p_j = exp(z_j) / (Σ_k exp(z_k) + exp(sink_h)), z = scale · q·kv.
    A row with no valid index returns zeros (all mass on the sink, whose value is zero).
    """
    _check_attn_args("sparse_attn", q, kv, attn_sink, idx)
    return _sparse_core(q, kv, attn_sink, idx, scale)[0]


def _sparse_core(q, kv, attn_sink, idx, scale) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`sparse_attn`'s computation → (o [B, S, H, D], the slots' probabilities p [B, S, H, K], the sink's
    mass [B, S, H])."""
    B, S, H, D = q.shape
    N = kv.shape[1]
    valid = idx >= 0                                               # [B, S, K]
    # −1 slots read a valid entry of the same row (its largest index) instead of a masked copy of the
    # gather: they get zero probability, and pointing them at an entry the row attends anyway means a
    # NaN/inf in some unrelated kv row cannot leak through 0·NaN. Rows with no valid slot are zeroed.
    row_max = idx.amax(-1, keepdim=True).clamp(min=0)
    safe = torch.where(valid, idx, row_max).long()
    rows = safe + (torch.arange(B, device=idx.device) * N).view(B, 1, 1)   # into kv flattened to [B·N, D]
    g = kv.float().reshape(B * N, D).index_select(0, rows.reshape(-1)).view(B, S, -1, D)  # [B, S, K, D]
    z = torch.einsum("bshd,bskd->bshk", q.float(), g) * scale      # [B, S, H, K]
    z = z.masked_fill(~valid[:, :, None, :], float("-inf"))
    p, p_sink = _sink_softmax(z, attn_sink)
    o = torch.einsum("bshk,bskd->bshd", p, g)
    o = o.masked_fill(~valid.any(-1)[:, :, None, None], 0.0)       # sink-only rows
    return o.to(q.dtype), p, p_sink.squeeze(-1)


class _GatheredCore(torch.autograd.Function):
    """The gather path's core on the already gathered rows, with a hand-written backward.

    q [B·S, H, D], g [B·S, K, D] (fp32), valid [B·S, K] (bool), sink [H] → o [B·S, H, D]. The forward runs the
    same ops as `sparse_attn` (so the same values). The backward, with p the slot probabilities and
    gp = go·gᵀ: gz = p·(gp − Σ_k p·gp), g_sink = −Σ p_sink·Σ_k p·gp, gq = scale·gz·g, and the gathered rows'
    gradient as ONE product [scale·gz, p]ᵀ·[q, go] (autograd's two products with H = 4 rows, their sum and
    the softmax's ~10 nodes cost ~2x as much on a narrow model)."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, g: torch.Tensor, valid: torch.Tensor, sink: torch.Tensor,
                scale: float) -> torch.Tensor:
        z = torch.bmm(q, g.transpose(1, 2)) * scale                                # [B·S, H, K]
        z = z.masked_fill(~valid[:, None, :], float("-inf"))
        p, p_sink = _sink_softmax(z, sink)                                        # [B·S, H, K], [B·S, H, 1]
        o = torch.bmm(p, g)
        empty = ~valid.any(-1)                                                     # sink-only rows
        ctx.any_empty = bool(empty.any())           # training rows always list themselves: skip two passes
        if ctx.any_empty:
            o = o.masked_fill(empty[:, None, None], 0.0)
        ctx.save_for_backward(q, g, valid, p, p_sink)
        ctx.scale, ctx.sink_dtype = scale, sink.dtype
        return o

    @staticmethod
    def backward(ctx, go: torch.Tensor):
        q, g, valid, p, p_sink = ctx.saved_tensors
        sink_dtype = ctx.sink_dtype
        if ctx.any_empty:
            go = go.masked_fill(~valid.any(-1)[:, None, None], 0.0)
        gp = torch.bmm(go, g.transpose(1, 2))                                      # [B·S, H, K]
        pg = (p * gp).sum(-1, keepdim=True)                                        # [B·S, H, 1]
        gz = p * (gp - pg) * ctx.scale                                             # d/dz, times the scale
        g_sink = -(p_sink * pg).sum((0, 2))
        gq = torch.bmm(gz, g)
        gg = torch.bmm(torch.cat([gz.transpose(1, 2), p.transpose(1, 2)], 2), torch.cat([q, go], 1))  # [B·S, K, D]
        return gq, gg, None, g_sink.to(sink_dtype), None


def sparse_attn_fused(q: torch.Tensor, kv: torch.Tensor, attn_sink: torch.Tensor, idx: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """`sparse_attn` (same signature and result, its reference) with the core after the gather as one autograd
    Function (`_GatheredCore`): the training step's gather path."""
    _check_attn_args("sparse_attn_fused", q, kv, attn_sink, idx)
    B, S, H, D = q.shape
    N, K = kv.shape[1], idx.shape[-1]
    valid = idx >= 0
    safe = torch.where(valid, idx, idx.amax(-1, keepdim=True).clamp(min=0)).long()    # as `sparse_attn`
    rows = safe + (torch.arange(B, device=idx.device) * N).view(B, 1, 1)
    g = kv.float().reshape(B * N, D).index_select(0, rows.reshape(-1)).view(B * S, K, D)
    o = _GatheredCore.apply(q.float().reshape(B * S, H, D), g, valid.reshape(B * S, K), attn_sink, scale)
    return o.view(B, S, H, D).to(q.dtype)


def dense_attn(q: torch.Tensor, kv: torch.Tensor, attn_sink: torch.Tensor, idx: torch.Tensor,
               scale: float) -> torch.Tensor:
    """The dense-block twin of `sparse_attn` (same signature, same result): every query scores every row of
    kv in two GEMMs, and rows that are not in its index list are masked out.

    An index listed n times counts n times, as in the gather (its logit gets + log n). Cost ∝ S·H·N·D in
    large matrix products (no copy of the picked rows), so it wins when kv holds few rows besides the
    picks: the caller passes only the rows a block of queries can see (see `choose_attn_path`). A kv with
    a non-finite value goes through `sparse_attn`: a NaN in a row some query did not pick must not reach
    it through 0·NaN in p @ kv.
    """
    _check_attn_args("dense_attn", q, kv, attn_sink, idx)
    if not bool(torch.isfinite(kv).all()):
        return sparse_attn(q, kv, attn_sink, idx, scale)
    return _dense_core(q, kv, attn_sink, idx, scale)[0]


def _dense_core(q, kv, attn_sink, idx, scale) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`dense_attn`'s computation (finite kv) → (o [B, S, H, D], the rows' probabilities p [B, S, H, N], the
    sink's mass [B, S, H], how many times each query lists each row: count [B, S, N])."""
    B, S, H, D = q.shape
    N = kv.shape[1]
    valid = idx >= 0
    count = torch.zeros(B, S, N, device=q.device).scatter_add_(2, idx.clamp(min=0).long(), valid.float())
    kvf = kv.float()
    z = torch.bmm(q.float().reshape(B, S * H, D), kvf.transpose(1, 2)).view(B, S, H, N) * scale
    if bool((count > 1).any()):                                       # a row listed n times: + log n
        z = z + count.log()[:, :, None, :]                            # log 0 = −inf: not attended
    else:                                                             # (the same values, without the log)
        z = z.masked_fill((count == 0)[:, :, None, :], float("-inf"))
    p, p_sink = _sink_softmax(z, attn_sink)
    o = torch.bmm(p.view(B, S * H, N), kvf).view(B, S, H, D)
    return o.to(q.dtype), p, p_sink.squeeze(-1), count


def sparse_attn_inspect(q: torch.Tensor, kv: torch.Tensor, attn_sink: torch.Tensor, idx: torch.Tensor,
                        scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`sparse_attn` that also returns what it attended: (o [B, S, H, D] exactly as `sparse_attn`, the
    slots' probabilities p [B, S, H, K] (0 on −1 slots), the sink's mass [B, S, H]) — one pass instead of
    `sparse_attn` then `sparse_attn_probs`. For the inspected forward."""
    _check_attn_args("sparse_attn_inspect", q, kv, attn_sink, idx)
    o, p, p_sink = _sparse_core(q, kv, attn_sink, idx, scale)
    return o, p.masked_fill(~(idx >= 0)[:, :, None, :], 0.0), p_sink


def dense_attn_inspect(q: torch.Tensor, kv: torch.Tensor, attn_sink: torch.Tensor, idx: torch.Tensor,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The dense-block twin of `sparse_attn_inspect` (same signature and results, o exactly as `dense_attn`):
    a slot's probability is its row's, shared among the slots that list that row."""
    _check_attn_args("dense_attn_inspect", q, kv, attn_sink, idx)
    if not bool(torch.isfinite(kv).all()):
        return sparse_attn_inspect(q, kv, attn_sink, idx, scale)
    o, pr, p_sink, count = _dense_core(q, kv, attn_sink, idx, scale)
    B, S, H, _ = q.shape
    at = idx.clamp(min=0).long()
    p = pr.gather(-1, at[:, :, None, :].expand(B, S, H, -1)) / count.gather(2, at).clamp_min(1.0)[:, :, None, :]
    return o, p.masked_fill(~(idx >= 0)[:, :, None, :], 0.0), p_sink


# Cost model of one query block, calibrated on a 2-core AMD EPYC with torch's fp32 CPU GEMMs (1 thread):
# a large GEMM runs at ~70 GFLOP/s, a gather of kv rows (index_select) copies ~1.5 GB/s, i.e. one gathered
# float costs as much as ~190 GEMM FLOPs, and the gather path's batched products have only H rows per query
# (7.5 GFLOP/s at H = 2, 63 at H = 64, modelled as full speed from 16 rows on).
GATHER_COPY_FLOPS = 190.0
SMALL_GEMM_ROWS = 16


def attn_path_costs(heads: int, queries: int, n_cols: int, k: int, head_dim: int) -> dict:
    """Modelled cost (in GEMM-FLOP equivalents) of one query block on each path.
    dense: 4·s·H·N'·D (scores + values against the N' rows the block can see);
    gather: s·K·D·(copy + 4·max(H, 16)) (copy the K picked rows per query, then small H-row products)."""
    dense = 4.0 * queries * heads * n_cols * head_dim
    gather = queries * k * head_dim * (GATHER_COPY_FLOPS + 4.0 * max(heads, SMALL_GEMM_ROWS))
    return {"dense": dense, "gather": gather}


def choose_attn_path(heads: int, queries: int, n_cols: int, k: int, head_dim: int) -> str:
    """"dense" or "gather", whichever `attn_path_costs` says is cheaper (ties go to dense)."""
    c = attn_path_costs(heads, queries, n_cols, k, head_dim)
    return "dense" if c["dense"] <= c["gather"] else "gather"


ATTN_PATHS = ("auto", "dense", "gather")
ATTN_BLOCK_QUERIES = 64         # queries per dense block (a dense block also sees its own rows: keep it short)
ATTN_BLOCK_FLOATS = 1 << 23     # an attention sub-block's big temporary ([s, K, D] gathered rows or [s, H, N'] scores)
# The fixed cost of one attention block in training (GEMM-FLOP equivalents): its ~30 small ops forward and
# their backward nodes. First measured on the tiny config's window layer at 2048 tokens (32 dense blocks
# 69 ms fwd + bwd, one gather block 39 ms: ~0.7 ms a block); re-measured on the lab-v4 shape (H 4, D 64,
# window 64, top-32), where all-dense (224 blocks of 64 queries over 7 layers) took 2.15-2.6 s per 2048-token
# forward + backward and all-gather (14 blocks) 1.74-2.0 s: ~2 ms a block, 1.5e8 FLOPs at this CPU's
# ~75 GFLOP/s. Nothing at the released shape (a 64-query dense block there is GFLOPs), but a narrow model's
# blocks are that overhead and little else. Without a backward (inference, no_grad) the overhead is left
# out, which keeps the calibrated inference choices (and so the pinned logits of
# tests/test_refactor_reference.py) as they were.
BLOCK_OVERHEAD_FLOPS = 1.5e8


def plan_attn_blocks(heads: int, queries: int, n_cols: int, k: int, head_dim: int, path: str = "auto",
                     training: bool = False) -> tuple[str, int]:
    """(path, queries per attention block) for a projection block of `queries` queries.

    dense blocks hold ATTN_BLOCK_QUERIES queries (`n_cols`: rows the widest of them sees); a gather block has
    no rows of its own to score, so it takes as many queries as ATTN_BLOCK_FLOATS of gathered rows allow.
    "auto" compares the whole projection block's cost: `attn_path_costs` per block, plus, when `training`
    (a backward follows), BLOCK_OVERHEAD_FLOPS per block, so that a narrow model's many tiny dense blocks
    lose to a few wide gathers. Both paths give the same result (to fp32 rounding)."""
    sub = {"dense": max(1, min(queries, ATTN_BLOCK_QUERIES, ATTN_BLOCK_FLOATS // max(1, heads * n_cols))),
           "gather": max(1, min(queries, ATTN_BLOCK_FLOATS // max(1, k * head_dim)))}
    if path != "auto":
        return path, sub[path]
    if not training:              # inference: both paths costed and cut on blocks of ATTN_BLOCK_QUERIES
        best = choose_attn_path(heads, min(queries, ATTN_BLOCK_QUERIES), n_cols, k, head_dim)
        return best, sub[best] if best == "dense" else min(sub["gather"], ATTN_BLOCK_QUERIES)
    cost = {p: -(-queries // sub[p]) * (attn_path_costs(heads, sub[p], n_cols, k, head_dim)[p] + BLOCK_OVERHEAD_FLOPS)
            for p in ("dense", "gather")}
    best = "dense" if cost["dense"] <= cost["gather"] else "gather"
    return best, sub[best]


def _slot_probs(z, valid, attn_sink):
    """Scores z [B, S, H, K] of the listed slots (valid [B, S, K]) → (p [B, S, H, K], 0 on −1 slots; the
    sink's mass [B, S, H]): one softmax over the valid slots and the sink."""
    B, S, H, _ = z.shape
    z = z.masked_fill(~valid[:, :, None, :], float("-inf"))
    p = torch.cat([z, attn_sink.float().view(1, 1, H, 1).expand(B, S, H, 1)], -1).softmax(-1)
    return p[..., :-1].masked_fill(~valid[:, :, None, :], 0.0), p[..., -1]


def sparse_attn_probs(q, kv, attn_sink, idx, scale):
    """Same math as `sparse_attn`, returning the probabilities instead: p [B, S, H, K] (0 on −1 slots) and
    the sink's mass [B, S, H] (1 − Σ p). For inspection; memory as large as the gather."""
    B, S, H, D = q.shape
    valid = idx >= 0
    g = torch.gather(kv.float(), 1, idx.clamp(min=0).long().reshape(B, -1, 1).expand(-1, -1, D)).view(B, S, -1, D)
    z = torch.einsum("bshd,bskd->bshk", q.float(), g.masked_fill(~valid[..., None], 0.0)) * scale
    return _slot_probs(z, valid, attn_sink)


def dense_attn_probs(q, kv, attn_sink, idx, scale):
    """The dense-block twin of `sparse_attn_probs` (same signature, same result): the block's queries score
    the distinct rows any of them lists in one GEMM ([S·H, D] x [D, R]), and each slot then takes its
    row's score, instead of copying K rows of kv per query. Rows nobody lists are never read."""
    return _probs_on_rows(q, kv, attn_sink, idx, scale, torch.unique(idx[idx >= 0]).long())


def _probs_on_rows(q, kv, attn_sink, idx, scale, rows):
    """`dense_attn_probs` given rows = the distinct listed rows, sorted ([R])."""
    B, S, H, D = q.shape
    K = idx.shape[-1]
    valid = idx >= 0
    if rows.numel() == 0:
        rows = torch.zeros(1, dtype=torch.long, device=idx.device)
    at = torch.searchsorted(rows, idx.clamp(min=0).long().contiguous()).clamp(max=rows.numel() - 1)
    zr = torch.einsum("bshd,brd->bshr", q.float(), kv[:, rows].float()) * scale          # [B, S, H, R]
    z = zr.gather(-1, at[:, :, None, :].expand(B, S, H, K))
    return _slot_probs(z, valid, attn_sink)


def attn_probs(q, kv, attn_sink, idx, scale):
    """`dense_attn_probs` or `sparse_attn_probs`, whichever `choose_attn_path` models as cheaper for these
    queries (the distinct rows they list against K copied rows per query); same result either way."""
    rows = torch.unique(idx[idx >= 0]).long()
    if choose_attn_path(q.shape[2], q.shape[1], int(rows.numel()), idx.shape[-1], q.shape[-1]) == "dense":
        return _probs_on_rows(q, kv, attn_sink, idx, scale, rows)
    return sparse_attn_probs(q, kv, attn_sink, idx, scale)


# ------------------------------------------------------------------------------------------ cache
class _Growing:
    """An append-only [B, n, D] tensor with doubling capacity (decode appends one entry at a time).

    `head` rows are reserved in front of the entries: the cache keeps its window ring there, so that
    during decode the window and the compressed entries form one tensor without a per-step copy.
    """

    def __init__(self, head: int = 0):
        self.head, self.data, self.n = head, None, 0

    def _ensure(self, like: torch.Tensor, extra: int) -> None:
        need = self.head + self.n + extra
        if self.data is None:
            self.data = like.new_zeros(like.shape[0], max(need, self.head + 16), like.shape[-1])
        elif need > self.data.shape[1]:
            grown = self.data.new_zeros(self.data.shape[0], max(2 * self.data.shape[1], need), self.data.shape[2])
            grown[:, :self.head + self.n] = self.data[:, :self.head + self.n]
            self.data = grown

    def append(self, x: torch.Tensor) -> None:
        self._ensure(x, x.shape[1])
        self.data[:, self.head + self.n:self.head + self.n + x.shape[1]] = x
        self.n += x.shape[1]

    def get(self) -> torch.Tensor | None:
        """The entries [B, n, D] (a view)."""
        return None if self.data is None else self.data[:, self.head:self.head + self.n]

    def full(self) -> torch.Tensor:
        """Head rows then entries [B, head + n, D] (a view)."""
        return self.data[:, :self.head + self.n]

    def nbytes(self) -> int:
        return 0 if self.data is None else self.n * self.data.shape[0] * self.data.shape[2] * self.data.element_size()


def ring_positions(length: int, window: int) -> list[int]:
    """The position each slot of a window ring holds after `length` tokens: slot s holds the latest
    p < length with p % window == s (what `AttentionCache.write_window` writes); −1 = never written."""
    return [p if (p := length - 1 - (length - 1 - s) % window) >= 0 else -1 for s in range(window)]


class AttentionCache:
    """Decode state of one attention layer for a batch that advances in lock-step.

    window: ring buffer [B, sliding_window, D] (position p lives in slot p % w); compressor / indexer
    compressor streaming states (open window, CSA previous window); entries: compressed KV [B, Nc, D]
    (stored right after the ring in one buffer); index_keys: indexer keys [B, Nc, Di] (CSA).
    `length` = tokens seen = the next start_pos.
    `reads` (only when built with ``record=True``, e.g. by ``v4lab.trace``): one dict per forward call of
    what its queries read, ``{"positions": [S], "window": [B, S, w] positions (−1 empty), "compressed":
    [B, S, K] entry ids (−1 none)}``; the sink is read by every query. The caller empties it.
    """

    def __init__(self, batch_size: int, kind: str, window: int, record: bool = False):
        self.batch_size, self.kind, self.window_size, self.length = batch_size, kind, window, 0
        self.reads: list | None = [] if record else None
        self._window = None
        self.comp_state = CompressorState() if kind in ("csa", "hca") else None
        self.index_state = CompressorState() if kind == "csa" else None
        self.entries, self.index_keys = _Growing(head=window), _Growing()

    @property
    def window(self) -> torch.Tensor | None:
        if self.kind == "window":
            return self._window
        d = self.entries.data
        return None if d is None else d[:, :self.window_size]

    @window.setter
    def window(self, ring: torch.Tensor) -> None:
        if self.kind == "window":
            self._window = ring
            return
        self.entries._ensure(ring, 0)
        self.entries.data[:, :self.window_size] = ring

    def window_entries(self, lo: int, hi: int) -> torch.Tensor | None:
        if hi <= lo:
            return None
        slots = torch.arange(lo, hi, device=self.window.device) % self.window_size
        return self.window[:, slots]

    def write_window(self, kv: torch.Tensor, start_pos: int) -> None:
        if self.window is None:
            self.window = kv.new_zeros(kv.shape[0], self.window_size, kv.shape[2])
        ring = self.window
        keep = min(kv.shape[1], self.window_size)
        pos = torch.arange(start_pos + kv.shape[1] - keep, start_pos + kv.shape[1], device=kv.device)
        ring[:, pos % self.window_size] = kv[:, -keep:].to(ring.dtype)

    def window_positions(self) -> list[int]:
        """The position each ring slot holds now (see `ring_positions`)."""
        return ring_positions(self.length, self.window_size)

    def ring_and_entries(self) -> torch.Tensor:
        """[B, w + Nc, D]: ring slots then compressed entries, without copying."""
        return self.window if self.kind == "window" else self.entries.full()

    def nbytes(self) -> int:
        """Bytes held (dtype as stored; the low-precision simulation keeps values FP8-rounded, not packed)."""
        ring = self.window
        n = 0 if ring is None else ring.numel() * ring.element_size()
        n += self.entries.nbytes() + self.index_keys.nbytes()
        for st in (self.comp_state, self.index_state):
            n += st.nbytes() if st is not None else 0
        return n


# ------------------------------------------------------------------------------------------ layer
_NEEDS = {"window": ["sliding_window", "qk_rope_head_dim", "rope_theta"],
          "hca": ["sliding_window", "qk_rope_head_dim", "compress_rope_theta"],
          "csa": ["sliding_window", "qk_rope_head_dim", "compress_rope_theta", "index_n_heads",
                  "index_head_dim", "index_topk"]}


class Attention(nn.Module):
    """One V4 attention layer: window-only, CSA or HCA, chosen by `cfg.layer_kind(layer_id)`.

    Prefill and decode share one path: the S new tokens are appended to a cache (a temporary one when
    `cache` is None), and queries are processed in chunks of `q_chunk` with explicit index lists
    (window slots, then compressed entries), so no [S, S] mask or score matrix is ever built.
    Batches advance in lock-step: every row has the same length and positions (ragged batches raise).
    """

    def __init__(self, cfg, layer_id: int):
        super().__init__()
        n_layers = cfg.num_hidden_layers
        if not isinstance(layer_id, int) or not 0 <= layer_id <= n_layers:
            raise ValueError(f"layer_id = {layer_id!r}: must be an int in [0, num_hidden_layers={n_layers}] "
                             "(the last one is the MTP block)")
        kind = cfg.layer_kind(layer_id)
        if kind not in _NEEDS:
            raise ValueError(f"config model_type {cfg.model_type!r}: layer {layer_id} is {kind!r}, "
                             "V4 Attention needs a window, csa or hca layer")
        for key in _NEEDS[kind] + ["num_attention_heads", "head_dim", "q_lora_rank", "o_groups", "o_lora_rank"]:
            v = getattr(cfg, key, None)
            if v is None or isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
                raise ValueError(f"config key {key!r} = {v!r}: a {kind} layer needs it as a positive number")
        if kind != "window" and cfg.rope_scaling is not None and not isinstance(cfg.rope_scaling, dict):
            raise ValueError(f"config key 'rope_scaling' = {cfg.rope_scaling!r}: must be a dict or None")
        self.cfg, self.layer_id, self.kind = cfg, layer_id, kind
        self.switches = Switches()                # the model's, once it is part of one (v4lab.switches)
        self.ratio = cfg.compress_ratio(layer_id)
        d, H, D, r = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, cfg.qk_rope_head_dim
        self.n_heads, self.head_dim, self.rope_dim = H, D, r
        self.window, self.eps, self.scale = cfg.sliding_window, cfg.rms_norm_eps, D ** -0.5
        self.wq_a = nn.Linear(d, cfg.q_lora_rank, bias=False)
        self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
        self.wq_b = nn.Linear(cfg.q_lora_rank, H * D, bias=False)
        self.wkv = nn.Linear(d, D, bias=False)
        self.kv_norm = RMSNorm(D, cfg.rms_norm_eps)
        self.o_groups = cfg.o_groups
        self.wo_a = nn.Linear(H * D // cfg.o_groups, cfg.o_groups * cfg.o_lora_rank, bias=False)  # block-diagonal
        self.wo_b = nn.Linear(cfg.o_groups * cfg.o_lora_rank, d, bias=False)
        self.attn_sink = nn.Parameter(torch.zeros(H, dtype=torch.float32))
        freqs = layer_inv_freq(cfg, layer_id)
        self.rope_freqs = freqs                    # fp32; a plain attribute so .to(bf16) cannot round it
        if kind != "window":
            self.compressor = Compressor(d, D, self.ratio, kind == "csa", freqs, cfg.rms_norm_eps)
        if kind == "csa":
            self.indexer = Indexer(cfg, freqs, self.ratio)
        share_switches(self, self.switches)
        self._low_precision = False
        self.last_inspect: dict | None = None     # filled when `inspect` is on
        self.last_distill: tuple | None = None
        self.last_recall: tuple | None = None
        # queries per projection block: its [s, H·D] q and output stay within ATTN_BLOCK_FLOATS (256 queries at
        # the released 64 × 512 heads; a narrow model gets one block per chunk: fewer, larger ops, as on a CPU
        # a tiny model's step is bound by the count of ops, not their FLOPs). Attention sub-blocks are cut
        # to ATTN_BLOCK_FLOATS of temporaries too.
        self.q_chunk = max(1, ATTN_BLOCK_FLOATS // (H * D))
        self.prefill_chunk = 2048                 # longer inputs run as consecutive chunks through the cache
        self.attn_path = "auto"                   # "auto" (cost model) | "dense" | "gather": see the docstring

    # -------------------------------------------------------------- switches
    # `inspect` and `distill` are this layer's entries in the switch object (`switches.inspect` /
    # `switches.distill` hold layer ids), so a model's are all in one place.
    @property
    def inspect(self) -> bool:
        """Record what each query read (`last_inspect`); one call per forward then (no chunking)."""
        return self.layer_id in self.switches.inspect

    @inspect.setter
    def inspect(self, on: bool) -> None:
        (self.switches.inspect.add if on else self.switches.inspect.discard)(self.layer_id)

    @property
    def distill(self) -> bool:
        """CSA: also compute the indexer warm-up loss (`last_distill`, `last_recall`; see the docstring)."""
        return self.layer_id in self.switches.distill

    @distill.setter
    def distill(self, on: bool) -> None:
        (self.switches.distill.add if on else self.switches.distill.discard)(self.layer_id)

    @property
    def low_precision(self) -> bool:
        return self._low_precision

    @low_precision.setter
    def low_precision(self, on: bool) -> None:
        self._low_precision = bool(on)
        if self.kind == "csa":
            self.indexer.low_precision = bool(on)

    def new_cache(self, batch_size: int, record: bool = False) -> AttentionCache:
        """An empty decode cache; ``record=True`` also keeps what every query read (``AttentionCache.reads``)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size = {batch_size!r}: must be a positive int")
        return AttentionCache(batch_size, self.kind, self.window, record)

    def _fp8_nope(self, kv: torch.Tensor) -> torch.Tensor:
        # OFF stores window and compressed KV with the non-rope dims rounded to FP8 E4M3 (block 64,
        # power-of-two scales) and the rope dims in BF16-range full precision.
        if not self._low_precision:
            return kv
        from .quant import act_quant_fp8
        n = self.head_dim - self.rope_dim
        pad = -n % 64          # released models: 448 = 7 blocks; smaller widths get a zero-padded last block
        nope = torch.nn.functional.pad(kv[..., :n].float(), (0, pad))
        return torch.cat([act_quant_fp8(nope, 64)[..., :n].to(kv.dtype), kv[..., n:]], -1)

    # -------------------------------------------------------------- checks
    def _check(self, x, start_pos, cache, seq_lens):
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.cfg.hidden_size:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x {shape}: must be a [B, S, hidden_size={self.cfg.hidden_size}] tensor")
        if not x.is_floating_point():
            raise ValueError(f"x dtype {x.dtype}: must be floating point (hidden states, not token ids)")
        if x.shape[0] < 1 or x.shape[1] < 1:
            raise ValueError(f"x {tuple(x.shape)}: batch and sequence length must be >= 1")
        if isinstance(start_pos, bool) or not isinstance(start_pos, int) or start_pos < 0:
            raise ValueError(f"start_pos = {start_pos!r}: must be an int >= 0")
        have = 0 if cache is None else cache.length
        if start_pos != have:
            raise ValueError(f"start_pos = {start_pos}: must equal the cache length ({have}"
                             f"{'; no cache given' if cache is None else ''}); positions cannot skip or rewind")
        if cache is not None:
            if not isinstance(cache, AttentionCache):
                raise ValueError(f"cache {type(cache).__name__}: must come from Attention.new_cache")
            if cache.kind != self.kind or cache.batch_size != x.shape[0]:
                raise ValueError(f"cache (kind {cache.kind!r}, batch {cache.batch_size}) does not fit this layer "
                                 f"(kind {self.kind!r}) and x batch {x.shape[0]}")
        end = start_pos + x.shape[1]
        if end > self.cfg.max_position_embeddings:
            raise ValueError(f"positions {start_pos}..{end - 1}: the last position must be < "
                             f"max_position_embeddings = {self.cfg.max_position_embeddings}")
        if seq_lens is not None and any(int(n) != x.shape[1] for n in seq_lens):
            raise ValueError(f"seq_lens = {list(map(int, seq_lens))}: rows of different lengths are not supported "
                             f"(all must be {x.shape[1]}); run them as separate batches")

    def _all_visible(self, t: torch.Tensor, Nc: int, L: int) -> torch.Tensor:
        """Rows of the kv tensor (compressed entries start at row L) of every entry query t may see, −1 for
        the others: [s, Nc]. HCA attends all of them; CSA's warm-up target is the attention over all of them."""
        s = torch.arange(Nc, device=t.device)
        return torch.where(s[None] < visible_entries(t, self.ratio)[:, None], s[None] + L, -1)

    # -------------------------------------------------------------- forward
    # Queries and the output projection run per block of queries, inside the attention loop: their
    # [s, H·D] temporaries then stay small (a full-width [S, H·D] is 8.6 GB at 64K tokens) and in cache.
    def _queries(self, qr, cos, sin):
        """qr [B, s, q_lora] → q [B, s, H, D]: up-projection, weightless per-head RMSNorm, RoPE."""
        B, s, _ = qr.shape
        q = rms_norm(self.wq_b(qr).view(B, s, self.n_heads, self.head_dim), None, self.eps)
        return apply_rope(q, cos[:, None], sin[:, None])

    def _output(self, o, cos, sin):
        """o [B, s, H, D] → [B, s, d]: inverse RoPE (back to relative positions), grouped wo_a, wo_b."""
        B, s = o.shape[:2]
        o = apply_rope(o, cos[:, None], sin[:, None], inverse=True)
        og = o.reshape(B, s, self.o_groups, -1)                                # [B, s, g, H·D/g]
        wa = self.wo_a.weight.view(self.o_groups, -1, og.shape[-1])             # [g, o_lora_rank, H·D/g]
        return self.wo_b(torch.einsum("bsgi,goi->bsgo", og, wa).flatten(2))

    def _select(self, iq, iw, keys, t, keep_scores: bool):
        """The indexer's picks for a block of queries, scored in sub-blocks whose [s, Hi, Nc] logits stay under
        ATTN_BLOCK_FLOATS / 2 → cidx [B, s, k], and the scores [B, s, Nc] when `keep_scores` (else None)."""
        per_query = self.indexer.n_heads * max(1, keys.shape[1])
        sub = max(1, min(len(t), (ATTN_BLOCK_FLOATS // 2) // per_query))
        picks, scores = [], []
        for a in range(0, len(t), sub):
            c, sc = self.indexer.select(iq[:, a:a + sub], iw[:, a:a + sub], keys, t[a:a + sub])
            picks.append(c)
            if keep_scores:
                scores.append(sc)
        return torch.cat(picks, 1), (torch.cat(scores, 1) if keep_scores else None)

    def _rows(self, span, n_all, lo, L, ring_path):
        """Row ranges of kv_all that queries at positions span = (t0, t1) can see: their window rows, then the
        compressed entries visible to the last of them (the whole ring + entries in one-token decode)."""
        if ring_path:
            return [(0, n_all)]
        rows = [(max(0, span[0] - self.window + 1) - lo, span[1] - lo)]
        if n_all > L and self.kind != "window":
            rows.append((L, L + min(n_all - L, span[1] // self.ratio)))
        return rows

    def _attend(self, q, kv_all, idx, span, lo, L, ring_path, path, probs: bool = False) -> tuple:
        """One block of queries at positions span: o [B, s, H, D] by the gather path over kv_all ("gather") or
        by the dense-block path over only the rows the block can see ("dense"). Same result either way.
        → (o, p, sink): with `probs` (the inspected forward) also the slots' probabilities [B, s, H, K] and the
        sink's mass [B, s, H] from the same pass (`*_attn_inspect`), else (o, None, None)."""
        if path == "gather":
            if self.switches.kernels:                   # the kernel returns o only: probabilities on the side
                from .kernels.sparse_attn import sparse_attn as kernel
                o = kernel(q, kv_all, self.attn_sink, idx, self.scale)
                return (o, *attn_probs(q, kv_all, self.attn_sink, idx, self.scale)) if probs else (o, None, None)
            if probs:
                return sparse_attn_inspect(q, kv_all, self.attn_sink, idx, self.scale)
            return sparse_attn_fused(q, kv_all, self.attn_sink, idx, self.scale), None, None
        n_all = kv_all.shape[1]
        rows = self._rows(span, n_all, lo, L, ring_path)
        remap = torch.full((n_all,), -1, dtype=torch.long, device=idx.device)   # kv_all row → block row
        off = 0
        for a, b in rows:
            remap[a:b] = torch.arange(off, off + b - a, device=idx.device)
            off += b - a
        blk = kv_all if ring_path else torch.cat([kv_all[:, a:b] for a, b in rows], 1)
        bidx = torch.where(idx >= 0, remap[idx.clamp(min=0)], -1)
        if probs:
            return dense_attn_inspect(q, blk, self.attn_sink, bidx, self.scale)
        return dense_attn(q, blk, self.attn_sink, bidx, self.scale), None, None

    def forward(self, x: torch.Tensor, start_pos: int = 0, cache: AttentionCache | None = None,
                seq_lens=None, attn_path: str | None = None) -> torch.Tensor:
        """x [B, S, d] at positions start_pos..start_pos+S−1 → [B, S, d]. `cache` is advanced in place.

        attn_path: "auto" | "dense" | "gather" for this call (default: the module's `attn_path`).
        Inputs longer than `prefill_chunk` run as consecutive chunks through the cache (same result as one
        call, as prefill == decode; memory then stays linear: q and the output are [chunk, H·D], not [S, H·D]).
        """
        self._check(x, start_pos, cache, seq_lens)
        path = ("gather" if self.switches.kernels and self.attn_path == "auto" else self.attn_path
                ) if attn_path is None else attn_path
        if path not in ATTN_PATHS:
            raise ValueError(f"attn_path = {path!r}: must be one of {ATTN_PATHS}")
        for key in ("prefill_chunk", "q_chunk"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{key} = {v!r}: must be a positive int")
        P = self.prefill_chunk
        if x.shape[1] > P and not (self.inspect or self.distill):   # those record per-call tensors: one call
            cache = cache if cache is not None else self.new_cache(x.shape[0])
            return torch.cat([self._forward(x[:, a:a + P], start_pos + a, cache, path)
                              for a in range(0, x.shape[1], P)], 1)
        return self._forward(x, start_pos, cache, path)

    # The forward in named steps: the rows queries read (window ring / recent rows, then compressed entries),
    # the indexer's inputs (CSA), and per block of queries the candidate indices of the layer's kind, the
    # sparse core, and the optional distill and inspect outputs.
    def _forward(self, x, start_pos, cache, path) -> torch.Tensor:
        B, S, _ = x.shape
        cache = self.new_cache(B) if cache is None else cache
        pos = torch.arange(start_pos, start_pos + S, device=x.device)
        cos, sin = cos_sin(self.rope_freqs, pos)                              # [S, r/2]
        qr = self.q_norm(self.wq_a(x))                                        # shared with the indexer
        call = self._rows_to_read(x, cos, sin, pos, start_pos, cache, path)
        if self.kind == "csa":
            self._index_inputs(call, x, qr)
        outs = []
        for b0 in range(0, S, self.q_chunk):   # projection blocks: q and the output projection, [blk, H·D]
            b1 = min(S, b0 + self.q_chunk)
            outs.append(self._project_block(call, qr, cos, sin, b0, b1))
        y = torch.cat(outs, 1)                                                  # [B, S, d]
        cache.length = start_pos + S
        if call.distill:
            self.last_distill, self.last_recall = tuple(call.distill_sums[:2]), tuple(call.distill_sums[2:])
        if call.insp is not None:
            for key in call.records[0]:
                call.insp[key] = torch.cat([r[key] for r in call.records], 1)
            call.insp["positions"] = pos
            self.last_inspect = call.insp
        return y

    def _rows_to_read(self, x, cos, sin, pos, start_pos, cache, path) -> _Call:
        """The new tokens' kv [B, S, D] into the window ring and (CSA/HCA) the entries they close into the
        cache; → the rows every query of this call reads from (kv_all: window rows, then compressed entries)."""
        S, w = x.shape[1], self.window
        kv = apply_rope(self.kv_norm(self.wkv(x)), cos, sin)                  # one K=V head [B, S, D]
        kv = self._fp8_nope(kv)
        # Raw entries. One-token decode: write the token into the ring first (its slot held position t−w,
        # which t no longer sees) and read ring + compressed entries in place. Longer chunks: the last w−1
        # cached positions then the new ones, local[0] at position lo (the ring could not hold them all).
        ring_path = S == 1
        lo = max(0, start_pos - w + 1)
        if not ring_path:
            prev = cache.window_entries(lo, start_pos)
            local = kv if prev is None else torch.cat([prev.to(kv.dtype), kv], 1)
        cache.write_window(kv, start_pos)
        comp, insp = None, ({} if self.inspect else None)
        if self.kind != "window":
            new = self._fp8_nope(self.compressor(x, cache.comp_state, inspect=insp is not None))
            cache.entries.append(new.to(kv.dtype))
            comp = cache.entries.get()
            if insp is not None:
                insp["pool_weights"] = self.compressor.last_weights
                insp["entries"] = comp
        if ring_path:
            kv_all = cache.ring_and_entries()                                   # [B, w + Nc, D]
        else:
            kv_all = local if comp is None else torch.cat([local, comp], 1)     # [B, L + Nc, D]
        Nc = 0 if comp is None else comp.shape[1]
        k_cols = w + (min(self.cfg.index_topk, Nc) if self.kind == "csa" else Nc)
        return _Call(x.shape[0], start_pos, pos, cache, kv_all, w if ring_path else local.shape[1], lo, ring_path,
                     Nc, k_cols, path, self.distill and self.kind == "csa", insp,
                     torch.arange(w - 1, -1, -1, device=x.device))             # window slots, oldest first

    def _index_inputs(self, call: _Call, x, qr) -> None:
        """CSA: the indexer keys of the new entries (into the cache) and the queries' indexer q and weights."""
        ix, iqr = (x.detach(), qr.detach()) if call.distill else (x, qr)    # the warm-up trains the indexer only
        with call.indexer_grad():
            call.cache.index_keys.append(self.indexer.keys(ix, call.cache.index_state))
            call.keys = call.cache.index_keys.get()
            call.iq, call.iw = self.indexer.queries(ix, iqr, call.pos)

    def _project_block(self, call: _Call, qr, cos, sin, b0: int, b1: int) -> torch.Tensor:
        """Queries b0..b1−1: q projection, the path and attention-block size (`plan_attn_blocks`, costed with the
        rows of the last, widest dense block), the indexer's picks, the attention blocks, and the output
        projection → [B, b1−b0, d]."""
        H, D = self.n_heads, self.head_dim
        qb = self._queries(qr[:, b0:b1], cos[b0:b1], sin[b0:b1])
        sub = min(b1 - b0, ATTN_BLOCK_QUERIES)
        rows = self._rows((call.start_pos + b1 - sub, call.start_pos + b1), call.kv_all.shape[1], call.lo, call.L,
                          call.ring_path)
        n_cols = sum(r1 - r0 for r0, r1 in rows)
        bpath, sub = plan_attn_blocks(H, b1 - b0, n_cols, call.k_cols, D, call.path,
                                      training=torch.is_grad_enabled() and qr.requires_grad)
        picks = None
        if self.kind == "csa":
            keep = call.distill or call.insp is not None
            with call.indexer_grad():
                picks = self._select(call.iq[:, b0:b1], call.iw[:, b0:b1], call.keys, call.pos[b0:b1], keep)
        ob = [self._attend_block(call, qb[:, c0 - b0:min(b1, c0 + sub) - b0], c0, min(b1, c0 + sub),
                                 picks, c0 - b0, bpath) for c0 in range(b0, b1, sub)]
        return self._output(torch.cat(ob, 1), cos[b0:b1], sin[b0:b1])

    def _attend_block(self, call: _Call, qc, c0: int, c1: int, picks, off: int, path: str) -> torch.Tensor:
        """One attention block, queries c0..c1−1 (qc [B, s, H, D]; ``off`` = c0 within the projection block):
        candidates, then the optional distill target, the sparse core, the optional inspection record."""
        t = call.pos[c0:c1]                                                  # [s]
        wp = t[:, None] - call.offs[None]                                    # positions t−w+1..t
        idx, cidx, scores = self._candidates(call, t, wp, picks, off, off + c1 - c0)
        if call.distill:
            self._distill_target(call, qc, idx, t, cidx, scores)
        o, p, sink = self._attend(qc, call.kv_all, idx, (call.start_pos + c0, call.start_pos + c1), call.lo,
                                  call.L, call.ring_path, path, probs=call.insp is not None)
        w, L = self.window, call.L
        if call.insp is not None:
            call.records.append(self._inspect_record(call, idx, t, wp, cidx, scores, p, sink))
        if call.cache.reads is not None:   # decode_trace: what these queries read (record=True caches)
            call.cache.reads.append({"positions": t, "window": wp.where(wp >= 0, -1)[None].expand(call.B, -1, -1),
                                     "compressed": torch.where(idx[..., w:] >= 0, idx[..., w:] - L, -1)})
        return o

    def _candidates(self, call: _Call, t, wp, picks, a: int, b: int) -> tuple:
        """Candidate rows of kv_all per query, by layer kind → idx [B, s, K] (−1 = empty): the window slots,
        then HCA every visible entry / CSA the indexer's picks (cidx [B, s, k] and scores, else None)."""
        w = self.window
        idx = torch.where(wp >= 0, wp % w if call.ring_path else wp - call.lo, -1)           # window
        if self.kind == "hca":
            idx = torch.cat([idx, self._all_visible(t, call.Nc, call.L)], 1)                 # HCA: all visible
        idx = idx[None].expand(call.B, -1, -1)
        cidx = scores = None
        if self.kind == "csa":                                                               # CSA: top-k picks
            cidx = picks[0][:, a:b]
            scores = picks[1][:, a:b] if picks[1] is not None else None
            idx = torch.cat([idx, torch.where(cidx >= 0, cidx + call.L, -1)], 2)
        return idx.contiguous(), cidx, scores

    def _distill_target(self, call: _Call, qc, idx, t, cidx, scores) -> None:
        """The indexer's warm-up loss on these queries: KL to the dense attention's mass on every visible
        entry (window + all visible entries + sink, no gradient), and the oracle top-k recall."""
        w = self.window
        dense = torch.cat([idx[..., :w], self._all_visible(t, call.Nc, call.L)[None].expand(call.B, -1, -1)], 2)
        with torch.no_grad():
            p, _ = attn_probs(qc, call.kv_all, self.attn_sink, dense, self.scale)
        mass = p[..., w:].sum(2)                                            # [B, s, Nc]
        nv = visible_entries(t, self.ratio)
        a, n = distill_kl(mass, scores, nv)
        h, m = topk_recall(mass, cidx, nv, self.cfg.index_topk)
        s = call.distill_sums
        call.distill_sums = [s[0] + a, s[1] + n, s[2] + h, s[3] + m]

    def _inspect_record(self, call: _Call, idx, t, wp, cidx, scores, p, sink) -> dict:
        """What these queries read, with the probabilities p [B, s, H, K] and the sink's mass [B, s, H] the
        attention computed (``last_inspect``, concatenated over blocks)."""
        w, L = self.window, call.L
        rec = {}
        if self.kind == "csa":
            nv = visible_entries(t, self.ratio)
            hidden = torch.arange(call.Nc, device=idx.device)[None, None] >= nv[None, :, None]
            rec["index_scores"] = scores.masked_fill(hidden, float("-inf"))
            rec["selected"] = cidx
        rec["window_positions"] = wp.where(wp >= 0, -1)[None].expand(call.B, -1, -1)
        rec["compressed_idx"] = torch.where(idx[..., w:] >= 0, idx[..., w:] - L, -1)
        rec["probs_window"], rec["probs_compressed"], rec["sink"] = p[..., :w], p[..., w:], sink
        return rec


@dataclass
class _Call:
    """What one forward call shares across its query blocks."""
    B: int
    start_pos: int
    pos: torch.Tensor              # [S] positions of the new tokens
    cache: AttentionCache
    kv_all: torch.Tensor           # [B, L + Nc, D]: window rows (the ring in one-token decode), then entries
    L: int                         # row of the first compressed entry
    lo: int                        # position of window row 0 (longer chunks)
    ring_path: bool                # one-token decode: window rows are the ring slots
    Nc: int                        # compressed entries visible to the last query
    k_cols: int                    # candidates per query: w + top-k (CSA) or w + Nc (HCA)
    path: str                      # "auto" | "dense" | "gather"
    distill: bool                  # CSA warm-up loss on this call
    insp: dict | None              # inspection output (None: off)
    offs: torch.Tensor             # [w] window offsets, oldest first
    keys: torch.Tensor | None = None   # CSA: indexer keys [B, Nc, Di]
    iq: torch.Tensor | None = None     # CSA: indexer queries [B, S, Hi, Di]
    iw: torch.Tensor | None = None     # CSA: indexer head weights [B, S, Hi]
    records: list = field(default_factory=list)
    distill_sums: list = field(default_factory=lambda: [0.0, 0, 0, 0])     # Σ KL, queries, hits, possible

    def indexer_grad(self):
        """The grad mode of the indexer's computations: on only in a distill call (warm-up or indexer loss)
        under autograd. Otherwise nothing differentiable leaves the indexer (top-k picks have no gradient),
        so no graph is built for its [S, Hi, Nc] score logits."""
        return torch.set_grad_enabled(self.distill and torch.is_grad_enabled())
