"""KV compressor: channel-wise gated softmax pooling of m tokens into one entry (HCA m=128, CSA m=4).

Spec: ../shared/spec/v4-attention.md §3.4. Paper eqs. 9–12 (CSA) and 20–23 (HCA).
Computation runs in fp32 like the official code (the projections' weights are BF16 in the checkpoint
but OFF runs them in fp32).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Placeholder: the module part (Compressor) is appended below.


def compress_pool(kv: torch.Tensor, score: torch.Tensor, ape: torch.Tensor, ratio: int,
                  overlap: bool) -> torch.Tensor:
    """Pool every `ratio` tokens into one entry (before RMSNorm and RoPE).

    kv, score: [B, n, coff*c] (n a multiple of ratio), ape: [ratio, coff*c] → [B, n//ratio, c].
    overlap=False (HCA, coff=1): entry i = Σ_j softmax_j(score_j + ape_j) ⊙ kv_j over window i.
    overlap=True  (CSA, coff=2): entry i pools 2·ratio slots — window i−1 through the [0:c] half
      (paper series b) and window i through the [c:2c] half (series a); one softmax per channel over
      all 2·ratio slots. Entry 0 has no previous window: its b-slots get −inf logits and zero values.
    """
    if kv.dim() != 3 or score.shape != kv.shape:
        raise ValueError(f"compress_pool: kv {tuple(kv.shape)} and score {tuple(score.shape)} must both be [B, n, coff*c]")
    B, n, w = kv.shape
    if ratio <= 0 or n % ratio:
        raise ValueError(f"compress_pool: n = {n} must be a multiple of ratio = {ratio}")
    coff = 2 if overlap else 1
    if w % coff:
        raise ValueError(f"compress_pool: last dim {w} must be divisible by coff = {coff}")
    if tuple(ape.shape) != (ratio, w):
        raise ValueError(f"compress_pool: ape {tuple(ape.shape)} must be [ratio={ratio}, {w}]")
    c = w // coff
    nw = n // ratio
    kv = kv.float().view(B, nw, ratio, w)
    logit = score.float().view(B, nw, ratio, w) + ape.float()
    if overlap:
        # previous window's [0:c] half (series b), shifted by one window; entry 0 gets −inf / 0.
        prev_kv = F.pad(kv[:, :-1, :, :c], (0, 0, 0, 0, 1, 0), value=0.0)
        prev_lg = F.pad(logit[:, :-1, :, :c], (0, 0, 0, 0, 1, 0), value=float("-inf"))
        kv = torch.cat([prev_kv, kv[:, :, :, c:]], dim=2)         # [B, nw, 2m, c]
        logit = torch.cat([prev_lg, logit[:, :, :, c:]], dim=2)
    weight = logit.softmax(dim=2)                                 # per channel over the slots
    return (weight * kv).sum(dim=2)                               # [B, nw, c]
