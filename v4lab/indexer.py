"""Lightning indexer (CSA layers): score compressed entries per query, keep the top-k.

Spec: ../shared/spec/v4-attention.md §3.5–§3.6. Paper eqs. 13–17.
"""
from __future__ import annotations

import torch


def index_scores(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """I[b, t, s] = Σ_h w[b, t, h] · ReLU(q[b, t, h] · k[b, s])  (no mask).

    q: [B, S, Hi, Di], k: [B, N, Di], w: [B, S, Hi] → [B, S, N] in fp32.
    """
    if q.dim() != 4 or k.dim() != 3 or w.dim() != 3:
        raise ValueError(f"index_scores: q {tuple(q.shape)} must be [B,S,Hi,Di], k {tuple(k.shape)} [B,N,Di], "
                         f"w {tuple(w.shape)} [B,S,Hi]")
    B, S, H, D = q.shape
    if k.shape[0] != B or k.shape[2] != D or tuple(w.shape) != (B, S, H):
        raise ValueError(f"index_scores: shapes disagree: q {tuple(q.shape)}, k {tuple(k.shape)}, w {tuple(w.shape)}")
    logits = torch.einsum("bshd,bnd->bshn", q.float(), k.float()).relu()   # [B, S, Hi, N]
    return torch.einsum("bshn,bsh->bsn", logits, w.float())
