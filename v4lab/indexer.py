"""Lightning indexer (CSA layers): score compressed entries per query, keep the top-k.

Spec: docs/design/v4-attention.md §3.5–§3.6. Paper eqs. 13–17.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .compressor import Compressor, CompressorState
from .rope import apply_rope, cos_sin
from .switches import Switches, share_switches


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
    logits = torch.einsum("bshd,bnd->bshn", q.float(), k.float())        # [B, S, Hi, N]
    # in place when no backward needs the pre-ReLU logits: one [B, S, Hi, N] temporary fewer (same values)
    logits = logits.relu() if logits.requires_grad else logits.relu_()
    return torch.einsum("bshn,bsh->bsn", logits, w.float())


def visible_entries(positions: torch.Tensor, ratio: int) -> torch.Tensor:
    """Number of compressed entries query position t may use: ⌊(t+1)/m⌋ (entry s visible iff s < that).

    The official code's rule (spec §3.5); the paper's text says ⌊t/m⌋, which differs at window ends.
    """
    return torch.div(positions + 1, ratio, rounding_mode="floor")


def _mask_invisible(scores: torch.Tensor, n_visible: torch.Tensor) -> torch.Tensor:
    N = scores.shape[-1]
    invisible = torch.arange(N, device=scores.device)[None, :] >= n_visible[:, None]    # [S, N]
    masked = scores.masked_fill(invisible[None], float("-inf"))
    # NaN scores (NaN inputs) must not win top-k silently over real entries: rank them lowest,
    # the NaN then still reaches the output through the attention of the same token's NaN q/kv.
    return torch.nan_to_num(masked, nan=float("-inf"))


def topk_visible_sorted(scores: torch.Tensor, n_visible: torch.Tensor, k: int) -> torch.Tensor:
    """The reference of `topk_visible` (same signature and result): one stable descending sort of every row."""
    N = scores.shape[-1]
    k = min(k, N)
    if k == 0:
        return scores.new_zeros(*scores.shape[:2], 0, dtype=torch.long)
    masked = _mask_invisible(scores, n_visible)
    # Exact ties are common (ReLU can zero every head → score 0.0 for several entries). torch.topk breaks
    # them differently for different shapes, which would make decode differ from prefill; a stable
    # descending sort breaks them the same way everywhere: the lower (older) entry index wins.
    idx = masked.sort(dim=-1, descending=True, stable=True).indices[..., :k]
    return torch.where(idx >= n_visible[None, :, None], torch.full_like(idx, -1), idx)


def topk_visible(scores: torch.Tensor, n_visible: torch.Tensor, k: int) -> torch.Tensor:
    """scores [B, S, N], n_visible [S] → idx [B, S, min(k, N)] of the best visible entries, −1 for picks that
    are invisible (a query with fewer than k visible entries, or none at all). Best first; equal scores go
    to the lower entry index (so prefill and decode pick the same set whatever the shapes).

    Same result as `topk_visible_sorted` without sorting whole rows (16K entries per query at 64K tokens):
    torch.topk finds the k best, which are then put in stable order; rows where the k-th score is tied
    with a score outside the k (membership would depend on topk's tie order, e.g. rows with < k visible
    entries, all −inf past them) go through the reference.
    """
    N = scores.shape[-1]
    k = min(k, N)
    if k == 0 or k == N:
        return topk_visible_sorted(scores, n_visible, k)
    masked = _mask_invisible(scores, n_visible)
    vals, cand = masked.topk(k, dim=-1)                                    # [B, S, k]
    tied = (masked >= vals[..., -1:]).sum(-1) > k                          # [B, S]
    cand = cand.sort(dim=-1).values                                        # by entry index, then
    order = masked.gather(-1, cand).sort(dim=-1, descending=True, stable=True).indices   # best first, stable
    idx = cand.gather(-1, order)
    if bool(tied.any()):
        sel = tied.nonzero(as_tuple=True)
        ref = masked[sel].sort(dim=-1, descending=True, stable=True).indices[..., :k]    # [n_tied, k]
        idx = idx.index_put(sel, ref)
    return torch.where(idx >= n_visible[None, :, None], torch.full_like(idx, -1), idx)


def distill_kl(target_mass: torch.Tensor, scores: torch.Tensor, n_visible: torch.Tensor):
    """The indexer's warm-up loss (V3.2's DSA recipe, which V4 inherits for CSA:
    docs/design/v4-moe-mhc-fp4.md §9.4, "sparse attention from the 64K stage, after an indexer warm-up"),
    summed over queries.

    target_mass [B, S, N]: the main attention's probability on each compressed entry, summed over heads
    (treated as a constant); scores [B, S, N]: index scores; n_visible [S]: entries each query may see.
    Per query with any visible entry and any mass on them: p = target_mass / Σ target_mass over the visible
    entries, q = softmax(scores) over the visible entries, KL(p ‖ q) = Σ p (log p − log q).
    Returns (sum of KL over those queries, number of queries) so that chunks can be added up.
    """
    N = scores.shape[-1]
    vis = torch.arange(N, device=scores.device)[None, None, :] < n_visible.to(scores.device)[None, :, None]
    mass = target_mass.detach().float().masked_fill(~vis, 0.0)
    tot = mass.sum(-1, keepdim=True)                                     # [B, S, 1]
    use = tot[..., 0] > 0                                   # queries with a target (mass on a visible entry)
    p = mass / tot.clamp_min(torch.finfo(torch.float32).tiny)
    logq = scores.float().masked_fill(~vis, float("-inf")).log_softmax(-1)
    logq = logq.masked_fill(~vis, 0.0)                                   # 0·(−inf) would be NaN
    plogp = torch.where(p > 0, p * p.clamp_min(torch.finfo(torch.float32).tiny).log(), torch.zeros_like(p))
    kl = (plogp - p * logq).sum(-1)                                       # [B, S]
    return kl[use].sum(), int(use.sum())


def topk_recall(target_mass: torch.Tensor, picks: torch.Tensor, n_visible: torch.Tensor, k: int) -> tuple:
    """How many of the k entries with the most target mass the indexer picked: (hits, possible), summed
    over queries. picks [B, S, k'] (−1 = none)."""
    N = target_mass.shape[-1]
    vis = torch.arange(N, device=target_mass.device)[None, None, :] < n_visible[None, :, None]
    kk = min(k, N)
    best = target_mass.float().masked_fill(~vis, float("-inf")).topk(kk, -1).indices      # [B, S, kk]
    n_best = torch.minimum(n_visible, torch.tensor(kk, device=n_visible.device))[None, :].expand(best.shape[:2])
    slot_ok = torch.arange(kk, device=best.device)[None, None] < n_best[..., None]       # real oracle slots
    hit = (best[..., :, None] == picks[..., None, :]).any(-1) & slot_ok
    return int(hit.sum()), int(slot_ok.sum())


class Indexer(nn.Module):
    """Lightning indexer of one CSA layer.

    Params (official names): `wq_b` q_lora_rank → Hi·Di, `weights_proj` d → Hi, and a private CSA compressor
    at c = Di (`compressor.{wkv,wgate,ape,norm}`). Queries come from the attention's shared latent `qr`.
    """

    def __init__(self, cfg, rope_freqs: torch.Tensor, ratio: int = 4):
        super().__init__()
        self.n_heads, self.head_dim, self.topk = cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk
        self.ratio = ratio                     # CSA's m (4 in every released config)
        self.wq_b = nn.Linear(cfg.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.weights_proj = nn.Linear(cfg.hidden_size, self.n_heads, bias=False)
        self.compressor = Compressor(cfg.hidden_size, self.head_dim, self.ratio, True, rope_freqs, cfg.rms_norm_eps)
        self.rope_freqs = rope_freqs.clone()      # fp32; a plain attribute so .to(bf16) cannot round it
        self.low_precision = False
        self.switches = Switches()             # `kernels`: scores from kernels.indexer.index_scores
        share_switches(self, self.switches)

    def score_fn(self, q: torch.Tensor, keys: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """`index_scores`, or its Triton kernel when `switches.kernels` is on."""
        if self.switches.kernels:
            from .kernels.indexer import index_scores as kernel
            return kernel(q, keys, w)
        return index_scores(q, keys, w)

    def _fp4(self, x: torch.Tensor) -> torch.Tensor:
        # OFF: a normalised Walsh–Hadamard rotation, then MXFP4 fake-quant (block 32) of indexer q and k.
        from .quant import fp4_act_quant, hadamard_rotate
        return fp4_act_quant(hadamard_rotate(x), 32)

    def keys(self, x: torch.Tensor, state: CompressorState | None) -> torch.Tensor:
        """Indexer keys closed by these tokens: [B, n_new, Di]."""
        k = self.compressor(x, state)
        return self._fp4(k) if self.low_precision else k

    def queries(self, x: torch.Tensor, qr: torch.Tensor, positions: torch.Tensor):
        """→ q [B, S, Hi, Di] (rotated at the token positions), w [B, S, Hi] (scaled by Di^−½·Hi^−½)."""
        B, S, _ = x.shape
        q = F.linear(qr, self.wq_b.weight).view(B, S, self.n_heads, self.head_dim)
        cos, sin = cos_sin(self.rope_freqs, positions)
        q = apply_rope(q, cos[:, None, :], sin[:, None, :])
        if self.low_precision:
            q = self._fp4(q)
        w = F.linear(x, self.weights_proj.weight).float() * (self.head_dim ** -0.5 * self.n_heads ** -0.5)
        return q, w

    def select(self, q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor):
        """Top-k visible entries per query → (idx [B, S, k] with −1 for invisible picks, scores [B, S, N])."""
        scores = self.score_fn(q, keys, w)
        if self.low_precision:
            scores = scores.to(torch.bfloat16).float()       # OFF narrows index scores to BF16
        return topk_visible(scores, visible_entries(positions, self.ratio), self.topk), scores
