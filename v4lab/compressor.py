"""KV compressor: channel-wise gated softmax pooling of m tokens into one entry (HCA m=128, CSA m=4).

Spec: docs/design/v4-attention.md §3.4 (paper eqs. 9–12 for CSA, 20–23 for HCA).
Everything runs in fp32, as the official code does (the projection weights are BF16 in the
checkpoint; OFF upcasts them).

CSA overlap, in the paper's letters: each token makes two series in one 2c-wide projection.
Columns [c:2c] (series a) feed the entry of the token's OWN window, columns [0:c] (series b) feed the
entry of the NEXT window. Entry i therefore pools 2m slots: window i−1 through [0:c] and window i
through [c:2c]. (HF calls [0:c] "Ca", the opposite letter; the math is the same.)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .norm import RMSNorm
from .rope import apply_rope, cos_sin
from .switches import Switches


def _slots(kv: torch.Tensor, score: torch.Tensor, ape: torch.Tensor, ratio: int, overlap: bool):
    """Lay out the pooled slots: → values, logits [B, n//ratio, slots, c] (slots = ratio or 2·ratio)."""
    if kv.dim() != 3 or score.shape != kv.shape:
        raise ValueError(f"compress_pool: kv {tuple(kv.shape)} and score {tuple(score.shape)} must both be "
                         "[B, n, coff*c] with the same shape")
    B, n, w = kv.shape
    if ratio <= 0 or n % ratio:
        raise ValueError(f"compress_pool: n = {n} must be a multiple of ratio = {ratio}")
    coff = 2 if overlap else 1
    if w % coff:
        raise ValueError(f"compress_pool: last dim {w} must be divisible by coff = {coff}")
    if tuple(ape.shape) != (ratio, w):
        raise ValueError(f"compress_pool: ape {tuple(ape.shape)} must be [ratio={ratio}, {w}]")
    c, nw = w // coff, n // ratio
    kv = kv.float().reshape(B, nw, ratio, w)
    logit = score.float().reshape(B, nw, ratio, w) + ape.float()
    if overlap:
        # slots 0..m−1: previous window through [0:c]; entry 0 has none (−inf logit, zero value).
        prev_kv = F.pad(kv[:, :-1, :, :c], (0, 0, 0, 0, 1, 0), value=0.0)
        prev_lg = F.pad(logit[:, :-1, :, :c], (0, 0, 0, 0, 1, 0), value=float("-inf"))
        kv = torch.cat([prev_kv, kv[..., c:]], dim=2)
        logit = torch.cat([prev_lg, logit[..., c:]], dim=2)
    return kv, logit


def pool_weights(kv: torch.Tensor, score: torch.Tensor, ape: torch.Tensor, ratio: int, overlap: bool) -> torch.Tensor:
    """The per-channel softmax weights of every slot: [B, n//ratio, slots, c] (for inspection)."""
    return _slots(kv, score, ape, ratio, overlap)[1].softmax(dim=2)


def compress_pool(kv: torch.Tensor, score: torch.Tensor, ape: torch.Tensor, ratio: int,
                  overlap: bool) -> torch.Tensor:
    """Pool every `ratio` tokens into one entry (before RMSNorm and RoPE).

    kv, score: [B, n, coff*c] (n a multiple of ratio), ape: [ratio, coff*c] → [B, n//ratio, c] fp32.
    overlap=False (HCA, coff=1): entry i = Σ_j softmax_j(score_j + ape_j) ⊙ kv_j over window i.
    overlap=True  (CSA, coff=2): one softmax per channel over 2·ratio slots (window i−1's [0:c] half and
    window i's [c:2c] half); entry 0's missing half has weight 0.
    """
    kv, logit = _slots(kv, score, ape, ratio, overlap)
    return (logit.softmax(dim=2) * kv).sum(dim=2)


def entry_span(i: int, ratio: int, overlap: bool) -> tuple[int, int]:
    """First and last token position compressed entry ``i`` pools: its own window ratio·i .. ratio·i+ratio−1,
    and with ``overlap`` (CSA) the window before it too (2·ratio tokens; entry 0 has none before it)."""
    lo = ratio * i
    return (max(0, lo - ratio) if overlap else lo), lo + ratio - 1


class CompressorState:
    """Streaming state of one compressor (one per layer and per batch).

    pending_kv/score: raw projections of tokens of the still-open window [B, <ratio, coff*c];
    prev_kv/score (CSA only): the last closed window's raw projections [B, ratio, 2c], whose [0:c] half
    the next entry pools; n_entries: entries emitted so far (entry i sits at position ratio·i).
    """

    def __init__(self):
        self.pending_kv = self.pending_score = None
        self.prev_kv = self.prev_score = None
        self.n_entries = 0

    def nbytes(self) -> int:
        ts = (self.pending_kv, self.pending_score, self.prev_kv, self.prev_score)
        return sum(t.numel() * t.element_size() for t in ts if t is not None)


class Compressor(nn.Module):
    """wkv, wgate: d → coff·c; ape [ratio, coff·c] fp32; norm RMSNorm(c); RoPE at position ratio·i."""

    def __init__(self, dim: int, head_dim: int, ratio: int, overlap: bool, rope_freqs: torch.Tensor,
                 eps: float = 1e-6):
        super().__init__()
        self.ratio, self.overlap, self.head_dim = ratio, overlap, head_dim
        coff = 2 if overlap else 1
        self.wkv = nn.Linear(dim, coff * head_dim, bias=False)
        self.wgate = nn.Linear(dim, coff * head_dim, bias=False)
        self.ape = nn.Parameter(torch.zeros(ratio, coff * head_dim, dtype=torch.float32))
        self.norm = RMSNorm(head_dim, eps)
        self.rope_freqs = rope_freqs.clone()      # fp32; a plain attribute so .to(bf16) cannot round it
        self.switches = Switches()            # `kernels`: pool with kernels.compressor.compress_pool
        self.last_weights = None              # [B, n_new, slots, c] after a forward with inspect=True

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, S, d] → raw kv, score [B, S, coff·c] in fp32."""
        xf = x.float()
        return F.linear(xf, self.wkv.weight.float()), F.linear(xf, self.wgate.weight.float())

    def pool_fn(self, kv: torch.Tensor, score: torch.Tensor, ape: torch.Tensor, ratio: int,
                overlap: bool) -> torch.Tensor:
        """`compress_pool`, or its Triton kernel when `switches.kernels` is on."""
        if self.switches.kernels:
            from .kernels.compressor import compress_pool as kernel
            return kernel(kv, score, ape, ratio, overlap)
        return compress_pool(kv, score, ape, ratio, overlap)

    def forward(self, x: torch.Tensor, state: CompressorState | None = None, inspect: bool = False) -> torch.Tensor:
        """Feed the next S tokens; return the entries they close: [B, n_new, c] (normed, rotated).

        Without a state, x is a whole sequence from position 0 and a trailing partial window is dropped.
        ``inspect``: also keep the pooling weights in ``last_weights``.
        """
        kv, score = self.project(x)
        state = state if state is not None else CompressorState()
        if state.pending_kv is not None:
            kv, score = torch.cat([state.pending_kv, kv], 1), torch.cat([state.pending_score, score], 1)
        usable = kv.shape[1] // self.ratio * self.ratio
        state.pending_kv, state.pending_score = kv[:, usable:], score[:, usable:]
        kv, score = kv[:, :usable], score[:, :usable]
        B, n_new = kv.shape[0], usable // self.ratio
        first = state.n_entries
        if n_new == 0:
            self.last_weights = None
            return kv.new_zeros(B, 0, self.head_dim)
        if self.overlap:
            # Prepend the previous closed window so the first new entry sees its [0:c] half; drop the
            # entry that window itself would produce (it was emitted earlier).
            if state.prev_kv is not None:
                kv_in, score_in = torch.cat([state.prev_kv, kv], 1), torch.cat([state.prev_score, score], 1)
            else:
                kv_in, score_in = kv, score
            skip = 1 if state.prev_kv is not None else 0
            pooled = self.pool_fn(kv_in, score_in, self.ape, self.ratio, True)[:, skip:]
            if inspect:
                self.last_weights = pool_weights(kv_in, score_in, self.ape, self.ratio, True)[:, skip:]
            state.prev_kv, state.prev_score = kv[:, -self.ratio:], score[:, -self.ratio:]
        else:
            pooled = self.pool_fn(kv, score, self.ape, self.ratio, False)
            if inspect:
                self.last_weights = pool_weights(kv, score, self.ape, self.ratio, False)
        state.n_entries += n_new
        entries = self.norm(pooled)                                               # fp32 (norm stats fp32)
        pos = torch.arange(first, first + n_new, device=x.device) * self.ratio
        cos, sin = cos_sin(self.rope_freqs, pos)
        return apply_rope(entries, cos, sin)
