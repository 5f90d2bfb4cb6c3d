"""V4 hybrid attention: sliding window + CSA (indexer top-k) / HCA (all entries), one softmax with a sink.

Spec: ../shared/spec/v4-attention.md §3.
"""
from __future__ import annotations

import torch


def sparse_attn(q: torch.Tensor, kv: torch.Tensor, attn_sink: torch.Tensor, idx: torch.Tensor,
                scale: float) -> torch.Tensor:
    """Gather-based attention over explicit index lists, with a per-head sink in the denominator.

    q: [B, S, H, D], kv: [B, N, D] (K = V, one head), attn_sink: [H], idx: [B, S, K] int64 into N,
    −1 = ignored → o: [B, S, H, D] (dtype of q), computed in fp32.
    o = Σ_j p_j kv_j with p_j = exp(z_j) / (Σ_k exp(z_k) + exp(sink_h)), z = scale · q·kv.
    A row with no valid index returns zeros (all mass on the sink, whose value is zero).
    """
    if q.dim() != 4 or kv.dim() != 3 or idx.dim() != 3:
        raise ValueError(f"sparse_attn: q {tuple(q.shape)} must be [B,S,H,D], kv {tuple(kv.shape)} [B,N,D], "
                         f"idx {tuple(idx.shape)} [B,S,K]")
    B, S, H, D = q.shape
    if kv.shape[0] != B or kv.shape[2] != D or idx.shape[:2] != (B, S) or tuple(attn_sink.shape) != (H,):
        raise ValueError(f"sparse_attn: shapes disagree: q {tuple(q.shape)}, kv {tuple(kv.shape)}, "
                         f"idx {tuple(idx.shape)}, attn_sink {tuple(attn_sink.shape)}")
    if idx.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"sparse_attn: idx dtype {idx.dtype} must be int64 (or int32)")
    N = kv.shape[1]
    valid = idx >= 0                                               # [B, S, K]
    if bool((idx >= N).any()):
        raise ValueError(f"sparse_attn: idx has entries >= N = {N}")
    safe = idx.clamp(min=0).long()
    g = torch.gather(kv.float(), 1, safe.reshape(B, -1, 1).expand(-1, -1, D)).view(B, S, -1, D)  # [B,S,K,D]
    g = g.masked_fill(~valid[..., None], 0.0)                      # ignored slots cannot leak NaN/inf
    z = torch.einsum("bshd,bskd->bshk", q.float(), g) * scale      # [B, S, H, K]
    z = z.masked_fill(~valid[:, :, None, :], float("-inf"))
    sink = attn_sink.float().view(1, 1, H, 1).expand(B, S, H, 1)
    # softmax over [z, sink] with the sink's value being zero: drop its column after normalising.
    p = torch.cat([z, sink], dim=-1).softmax(dim=-1)[..., :-1]
    p = p.masked_fill(~valid[:, :, None, :], 0.0)                  # (a −inf sink with no entry would be NaN)
    o = torch.einsum("bshk,bskd->bshd", p, g)
    return o.to(q.dtype)
