"""V4's router (``ffn.gate``): sqrt-softplus affinities, a bias that only *selects*, and hash layers.

For one token x (docs/design/v4-moe-mhc-fp4.md §1.2, §2):

    z = W_g x                          fp32 logits (x and W_g cast to fp32, as the official code does)
    s = sqrt(softplus(z))              affinities   ("sigmoid" / "softmax" for older generations)
    idx = TopK_K(s + b)                b = ffn.gate.bias, used for the choice only
    w = s[idx] / sum(s[idx]) * route_scale   weights from the UNBIASED s, renormalised over the top-k

Hash layers (layer_id < num_hash_layers) replace the choice by a frozen table, idx = tid2eid[token_id],
and have no bias; the learned W_g still decides how much each of the fixed experts counts.

Choices where the sources are silent (documented, flags where a user may want the other reading):
* renormalisation: the official code divides with no epsilon and skips it for softmax scoring;
  ``renormalize=None`` follows that, True/False forces it.
* ``bias`` is a persistent fp32 buffer, not an nn.Parameter: it is in ``state_dict`` under the official
  name but never seen by an optimizer (it moves only by :func:`v4lab.moe.bias_update`).
* V3 group-limited routing: a group's score is the sum of its top-2 biased scores; experts outside the
  ``topk_group`` best groups are masked to -inf before the top-k (as V3's inference code does).
* the hash table builders (the report does not say how the real one was built): a seeded draw of K
  distinct experts per token, or a greedy frequency-balanced assignment (Roller et al. 2021).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from v4lab.config import SCORING_FUNCS, V4Config


def _bad(name, value, rule):
    raise ValueError(f"{name} = {value!r}: {rule}")


# --------------------------------------------------------------------------------------- pure maths
def gate_scores(logits: torch.Tensor, scoring_func: str = "sqrtsoftplus") -> torch.Tensor:
    """Affinities s [T, E] (fp32) from logits z [T, E]."""
    z = logits.float()
    if scoring_func == "sqrtsoftplus":
        return F.softplus(z).sqrt()
    if scoring_func == "sigmoid":
        return z.sigmoid()
    if scoring_func == "softmax":
        return z.softmax(dim=-1)
    _bad("scoring_func", scoring_func, f"must be one of {SCORING_FUNCS}")


def select_topk(scores: torch.Tensor, bias: torch.Tensor | None, k: int, n_group: int = 1,
                topk_group: int = 1) -> torch.Tensor:
    """idx [T, k] int64 = TopK(scores + bias), optionally limited to the best ``topk_group`` of ``n_group``
    expert groups (V3). No gradient flows through the choice."""
    with torch.no_grad():
        biased = scores.float() if bias is None else scores.float() + bias.float()
        E = biased.shape[-1]
        if n_group > 1:
            g = biased.view(-1, n_group, E // n_group)                    # [T, G, E/G]
            group_score = g.topk(min(2, g.shape[-1]), dim=-1).values.sum(-1)  # [T, G]
            keep = group_score.topk(topk_group, dim=-1).indices          # [T, topk_group]
            mask = torch.ones_like(group_score, dtype=torch.bool).scatter_(1, keep, False)
            biased = g.masked_fill(mask[..., None], float("-inf")).view(-1, E)
        return biased.topk(k, dim=-1).indices


def route_weights(scores: torch.Tensor, idx: torch.Tensor, route_scale: float,
                  renormalize: bool = True) -> torch.Tensor:
    """w [T, K] = s[idx] (unbiased), renormalised over the top-k (no eps, as official), x route_scale."""
    w = scores.gather(-1, idx)
    if renormalize:
        w = w / w.sum(-1, keepdim=True)
    return w * route_scale


# --------------------------------------------------------------------------------------- hash tables
def hash_table(vocab_size: int, n_experts: int, k: int, seed: int = 0) -> torch.Tensor:
    """tid2eid [V, k] int64: each row a seeded draw of k distinct experts (deterministic in ``seed``)."""
    if k > n_experts:
        _bad("k", k, f"a token needs k distinct experts, so k must be <= n_experts ({n_experts})")
    g = torch.Generator().manual_seed(int(seed))
    return torch.rand(vocab_size, n_experts, generator=g).argsort(dim=-1)[:, :k].contiguous()


def balanced_hash_table(token_counts: torch.Tensor, n_experts: int, k: int) -> torch.Tensor:
    """tid2eid [V, k] int64 balancing expected load: tokens in order of decreasing frequency, each sent to
    the k experts with the least load so far (load += the token's count; ties -> lowest expert id)."""
    counts = torch.as_tensor(token_counts).double().flatten()
    if k > n_experts:
        _bad("k", k, f"a token needs k distinct experts, so k must be <= n_experts ({n_experts})")
    if (counts < 0).any():
        _bad("token_counts", "negative entries", "counts must be >= 0")
    order = torch.sort(counts, descending=True, stable=True).indices.tolist()
    load = [0.0] * n_experts
    table = torch.empty(counts.numel(), k, dtype=torch.int64)
    cnt = counts.tolist()
    for t in order:
        chosen = sorted(range(n_experts), key=lambda e: (load[e], e))[:k]
        for e in chosen:
            load[e] += cnt[t]
        table[t] = torch.tensor(sorted(chosen))
    return table


# --------------------------------------------------------------------------------------- module
class Gate(nn.Module):
    """``ffn.gate``: params ``weight [E, D]``, buffer ``bias [E]`` (learned layers) or ``tid2eid [V, K]``.

    ``forward(x [T, D], input_ids [T] | None, forced_idx [T, K] | None) -> (weights [T,K], idx [T,K],
    scores [T,E])``. ``forced_idx`` (Anticipatory Routing) fixes the choice; weights still come from the
    current gate. Constructor options default to the config."""

    def __init__(self, cfg: V4Config, layer_id: int, *, scoring_func: str | None = None,
                 topk: int | None = None, n_group: int | None = None, topk_group: int | None = None,
                 route_scale: float | None = None, renormalize: bool | None = None, hash_seed: int = 0):
        super().__init__()
        self.dim = cfg.hidden_size
        self.n_experts = cfg.n_routed_experts
        self.topk = cfg.num_experts_per_tok if topk is None else topk
        self.scoring_func = cfg.scoring_func if scoring_func is None else scoring_func
        self.n_group = cfg.n_group if n_group is None else n_group
        self.topk_group = cfg.topk_group if topk_group is None else topk_group
        self.route_scale = cfg.routed_scaling_factor if route_scale is None else route_scale
        self.renormalize = (self.scoring_func != "softmax") if renormalize is None else renormalize
        self.is_hash = cfg.is_hash_layer(layer_id)
        self.vocab_size = cfg.vocab_size
        E = self.n_experts
        if not isinstance(self.topk, int) or not 0 < self.topk <= E:
            _bad("topk", self.topk, f"must be an integer in [1, n_routed_experts = {E}]")
        if self.scoring_func not in SCORING_FUNCS:
            _bad("scoring_func", self.scoring_func, f"must be one of {SCORING_FUNCS}")
        if self.n_group < 1 or E % self.n_group:
            _bad("n_group", self.n_group, f"must be >= 1 and divide n_routed_experts ({E})")
        if not 1 <= self.topk_group <= self.n_group:
            _bad("topk_group", self.topk_group, f"must be in [1, n_group = {self.n_group}]")
        if self.n_group > 1 and self.topk > self.topk_group * (E // self.n_group):
            _bad("topk", self.topk, "must fit in the experts of the topk_group chosen groups")
        self.weight = nn.Parameter(torch.randn(E, self.dim) * cfg.initializer_range)
        if self.is_hash:
            self.register_buffer("tid2eid", hash_table(cfg.vocab_size, E, self.topk, hash_seed))
            self.bias = None
        else:
            self.register_buffer("bias", torch.zeros(E, dtype=torch.float32))

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        return gate_scores(F.linear(x.float(), self.weight.float()), self.scoring_func)

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor | None = None,
                forced_idx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        T = x.shape[0]
        s = self.scores(x)                                                      # [T, E] fp32
        if self.is_hash:
            if input_ids is None:
                _bad("input_ids", None, "a hash-routed MoE layer picks experts from tid2eid[token_id], "
                                        "so it needs the token ids")
            if forced_idx is not None:
                _bad("forced_idx", "a tensor", "hash layers take their experts from tid2eid; "
                                               "forced routing applies to learned-gate layers only")
            if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
                _bad("input_ids.dtype", input_ids.dtype, "token ids must be an integer tensor")
            ids = input_ids.reshape(-1)
            if ids.numel() != T:
                _bad("input_ids", tuple(input_ids.shape), f"must hold one id per token ({T} tokens)")
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
                bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
                _bad("input_ids", f"contains {bad}", f"token ids must be in [0, vocab_size = {self.vocab_size})")
            idx = self.tid2eid[ids].long()
        elif forced_idx is not None:
            if tuple(forced_idx.shape) != (T, self.topk):
                _bad("forced_idx", tuple(forced_idx.shape), f"must be [tokens, topk] = {(T, self.topk)}")
            if forced_idx.numel() and (int(forced_idx.min()) < 0 or int(forced_idx.max()) >= self.n_experts):
                _bad("forced_idx", "out-of-range entries", f"expert ids must be in [0, {self.n_experts})")
            idx = forced_idx.long()
        else:
            idx = select_topk(s, self.bias, self.topk, self.n_group, self.topk_group)
        return route_weights(s, idx, self.route_scale, self.renormalize), idx, s

    def extra_repr(self) -> str:
        kind = "hash" if self.is_hash else "learned"
        return (f"{kind}, experts={self.n_experts}, topk={self.topk}, scoring={self.scoring_func}, "
                f"groups={self.n_group}/{self.topk_group}, route_scale={self.route_scale}")


# --------------------------------------------------------------------------------------- forced routes
def check_route_values(name: str, r: torch.Tensor, E: int) -> None:
    """Expert ids r [T, K]: integers in [0, E), K distinct ones per token (what a router can choose)."""
    if r.is_floating_point() or r.is_complex() or r.dtype == torch.bool:
        _bad(name, r.dtype, "must hold integer expert ids")
    if r.numel() == 0:
        return
    lo, hi = int(r.min()), int(r.max())
    if lo < 0 or hi >= E:
        _bad(name, f"an expert id {lo if lo < 0 else hi}", f"expert ids must be in [0, {E})")
    srt = r.sort(-1).values
    dup = (srt[:, 1:] == srt[:, :-1]).any(-1)
    if bool(dup.any()):
        row = int(dup.nonzero()[0])
        _bad(name, f"row {row} {r[row].tolist()}", "names the same expert twice; top-k experts are distinct")


def check_forced_routes(cfg: V4Config, forced_routes: list | tuple | None, T: int, n_mtp: int) -> list:
    """``forced_routes`` of a model forward over T tokens, checked: one entry per MoE layer
    (num_hidden_layers, optionally + 1 for MTP), each None or expert ids [T, K] (the MTP entry [T_mtp, K]);
    hash layers must be None. Returns the list (None-filled when ``forced_routes`` is None)."""
    L = cfg.num_hidden_layers
    if forced_routes is None:
        return [None] * L
    if not isinstance(forced_routes, (list, tuple)) or len(forced_routes) not in (L, L + n_mtp):
        n = len(forced_routes) if isinstance(forced_routes, (list, tuple)) else type(forced_routes).__name__
        _bad("forced_routes", f"<{n} entries>", f"must be a list of num_hidden_layers = {L} entries "
                                                f"(+1 for the MTP block), one per MoE layer")
    K = cfg.num_experts_per_tok
    for i, r in enumerate(forced_routes):
        if r is None:
            continue
        if i < L and cfg.is_hash_layer(i):
            _bad(f"forced_routes[{i}]", "a tensor", "layer is hash-routed (tid2eid); its entry must be None")
        if not isinstance(r, torch.Tensor) or r.dim() != 2 or r.shape[1] != K or (i < L and r.shape[0] != T):
            shape = tuple(r.shape) if isinstance(r, torch.Tensor) else type(r).__name__
            _bad(f"forced_routes[{i}]", shape, f"must be an integer tensor [tokens = {T}, K = {K}]")
        check_route_values(f"forced_routes[{i}]", r, cfg.n_routed_experts)
    return list(forced_routes)
