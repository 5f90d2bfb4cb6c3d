"""V4's MoE layer (``ffn``): routed SwiGLU experts with the V4 clamp, one shared expert, two dispatches.

    y = sum_k  W2_e( w_k * SiLU(min(W1_e x, L)) * clip(W3_e x, -L, L) )  +  shared(x),   e = idx_k

* The gate (``ffn.gate``, v4lab/gate.py) gives idx and w. The routing weight w_k multiplies the SwiGLU
  intermediate *before* the down projection W2, as the official ``Expert.forward`` does (the same sum
  in exact arithmetic, not in the FP8/BF16 arithmetic that follows W2's input quantisation).
* Clamp (spec §3): gate branch from above only, up branch on both sides; L = swiglu_limit <= 0 disables.
  Everything up to W2's input is fp32; the intermediate is cast to W2's dtype first (BF16 in the
  release) as the official code does; the routed sum is fp32, the output is cast back to x's dtype.
* Shared expert: clamped like the routed ones (current official code, HF); ``shared_clamp=False`` gives
  the first release, which built it without the limit. Width = n_shared_experts x moe_intermediate_size.
* Dispatch: ``moe_naive`` (token by token, the obvious reference) and ``moe_grouped`` (tokens sorted by
  expert, one matmul per expert, scattered back with index_add); ``"triton"`` runs the sorted layout
  through kernels/moe.py (inference only). All give the same result.
* Expert parallelism: ``ep_size > 1`` (inside a torch.distributed group) keeps only this rank's
  n_routed_experts / ep_size experts, under their global names ``experts.{e}``, and runs the routed part
  through the all-to-all dispatch/combine of v4lab/expert_parallel.py; gate and shared expert stay local.

Training rules (spec §1.3) live here as functions: :func:`bias_update` (aux-loss-free, sign rule,
gamma = 0.001) and :func:`sequence_balance_loss` (V3's, alpha = 0.0001). Notebook helpers at the end.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from v4lab.config import V4Config
from v4lab.gate import Gate, gate_scores, select_topk
from v4lab.switches import Switches

DISPATCHES = ("grouped", "naive", "triton")


def _bad(name, value, rule):
    raise ValueError(f"{name} = {value!r}: {rule}")


# --------------------------------------------------------------------------------------- expert maths
def swiglu(g: torch.Tensor, u: torch.Tensor, limit: float) -> torch.Tensor:
    """SiLU(min(g, L)) * clip(u, -L, L) in fp32; L <= 0 disables the clamp."""
    g, u = g.float(), u.float()
    if limit > 0:
        g = g.clamp(max=limit)
        u = u.clamp(min=-limit, max=limit)
    return F.silu(g) * u


def down_proj(h: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """W2 h: the fp32 intermediate is rounded to W2's dtype first (official), the product is fp32."""
    return F.linear(h.to(w2.dtype).float(), w2.float())


def expert_ffn(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor,
               weight: torch.Tensor | None = None, limit: float = 0.0, h_fp8_scale: float = 0.0) -> torch.Tensor:
    """One expert on rows x [N, D] -> [N, D] fp32; ``weight [N]`` scales the intermediate before W2.
    ``h_fp8_scale`` > 0: the intermediate h goes through a static-scale FP8 E4M3 cast before W2
    (``v4lab.quant.fp8_static_cast``, straight-through gradient): a value beyond 448·scale becomes NaN.
    Not V4's recipe (its activation scales follow the data): the clamp experiment's provoked regime."""
    xf = x.float()
    h = swiglu(F.linear(xf, w1.float()), F.linear(xf, w3.float()), limit)      # [N, I]
    if weight is not None:
        h = h * weight.float()[:, None]
    if h_fp8_scale > 0:
        from v4lab.quant import fp8_static_cast  # loaded on first use, as for QAT below
        h = h + (fp8_static_cast(h.detach(), h_fp8_scale) - h).detach()
    return down_proj(h, w2)


class Expert(nn.Module):
    """``w1`` (gate_proj) [I, D], ``w3`` (up_proj) [I, D], ``w2`` (down_proj) [D, I], no biases."""

    def __init__(self, dim: int, inter: int, limit: float = 0.0, std: float = 0.02):
        super().__init__()
        self.limit = limit
        self.w1 = nn.Linear(dim, inter, bias=False)
        self.w2 = nn.Linear(inter, dim, bias=False)
        self.w3 = nn.Linear(dim, inter, bias=False)
        for lin in (self.w1, self.w2, self.w3):
            nn.init.normal_(lin.weight, std=std)

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        return expert_ffn(x, self.w1.weight, self.w2.weight, self.w3.weight, weight, self.limit)


# --------------------------------------------------------------------------------------- dispatch
def moe_naive(x, idx, weights, w1s, w2s, w3s, limit, h_fp8_scale=0.0):
    """Reference: y[t] = sum_k expert_{idx[t,k]}(x[t], weight[t,k]). x [T, D] -> [T, D] fp32."""
    rows = []
    for t in range(x.shape[0]):
        acc = torch.zeros(x.shape[1], dtype=torch.float32, device=x.device)
        for k in range(idx.shape[1]):
            e = int(idx[t, k])
            acc = acc + expert_ffn(x[t:t + 1], w1s[e], w2s[e], w3s[e], weights[t, k:k + 1], limit,
                                   h_fp8_scale)[0]
        rows.append(acc)
    return torch.stack(rows) if rows else x.new_zeros(0, x.shape[1], dtype=torch.float32)


def sort_by_expert(idx: torch.Tensor, n_experts: int):
    """The sorted layout: order [T*K] (flat (token, slot) ids grouped by expert, stable),
    token [T*K] (token of each sorted row), offsets [E+1] (rows of expert e: offsets[e]:offsets[e+1])."""
    flat = idx.reshape(-1)
    order = torch.sort(flat, stable=True).indices
    counts = torch.bincount(flat, minlength=n_experts)
    offsets = torch.zeros(n_experts + 1, dtype=torch.int64, device=idx.device)
    offsets[1:] = counts.cumsum(0)
    return order, order // idx.shape[1], offsets


def moe_grouped(x, idx, weights, w1s, w2s, w3s, limit, h_fp8_scale=0.0):
    """Tokens sorted by expert, one matmul per expert, scattered back. Same result as moe_naive."""
    return moe_grouped_from(x, idx, weights, lambda e: (w1s[e], w2s[e], w3s[e]), len(w1s), limit, h_fp8_scale)


def moe_grouped_from(x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor,
                     expert: Callable[[int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]], n_experts: int,
                     limit: float, h_fp8_scale: float = 0.0) -> torch.Tensor:
    """``moe_grouped`` with the weights of expert e from ``expert(e)`` -> (w1, w2, w3), asked only for the
    experts some token picked, in expert order, one at a time (an expert provider may read them from disk)."""
    order, token, offsets = sort_by_expert(idx, n_experts)
    w_sorted = weights.reshape(-1)[order]
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    off = offsets.tolist()
    for e in range(n_experts):
        a, b = off[e], off[e + 1]
        if a == b:
            continue
        w1, w2, w3 = expert(e)
        tok = token[a:b]
        out = out.index_add(0, tok, expert_ffn(x[tok], w1, w2, w3, w_sorted[a:b], limit, h_fp8_scale))
        del w1, w2, w3                                  # a provider's expert is dropped before the next read
    return out


def grouped_expert_mlp(x_sorted: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor,
                       offsets: torch.Tensor, row_weight: torch.Tensor, limit: float) -> torch.Tensor:
    """Reference for kernels/moe.py. x_sorted [N, D] (rows grouped by expert), w1/w3 [E, I, D],
    w2 [E, D, I], offsets [E+1], row_weight [N] -> [N, D] fp32 (each row through its expert)."""
    out = torch.zeros(x_sorted.shape, dtype=torch.float32, device=x_sorted.device)
    off = offsets.tolist()
    for e in range(w1.shape[0]):
        a, b = off[e], off[e + 1]
        if a < b:
            out[a:b] = expert_ffn(x_sorted[a:b], w1[e], w2[e], w3[e], row_weight[a:b], limit)
    return out


def moe_triton(x, idx, weights, w1s, w2s, w3s, limit):
    """The sorted layout through the Triton grouped expert MLP (forward only)."""
    from v4lab.kernels.moe import grouped_expert_mlp as kernel

    order, token, offsets = sort_by_expert(idx, len(w1s))
    # Stacking copies the expert weights on every call: fine for a lab, a serving stack keeps them stacked.
    y_sorted = kernel(x[token].float().contiguous(), torch.stack(list(w1s)), torch.stack(list(w3s)),
                      torch.stack(list(w2s)), offsets, weights.reshape(-1)[order].float().contiguous(), limit)
    return torch.zeros(x.shape, dtype=torch.float32, device=x.device).index_add_(0, token, y_sorted)


_DISPATCH = {"naive": moe_naive, "grouped": moe_grouped, "triton": moe_triton}


# --------------------------------------------------------------------------------------- the layer
class MoE(nn.Module):
    """``ffn`` of one block: ``gate``, ``experts.{e}``, ``shared_experts``.

    ``forward(x [B,S,D], input_ids [B,S] | None = None, forced_idx [B*S,K] | None = None) -> [B,S,D]``.
    A forward reports its routing ``{"idx": [T,K], "weights": [T,K], "scores": [T,E], "load": [E]}`` (``scores``
    keeps its graph so :func:`sequence_balance_loss` can train the gate from it) to the caller's
    ``ForwardRecord`` when one is installed (``switches.record``, ``with model.recording() as rec``: what
    training reads), and keeps the latest one in ``self.last_routing`` for inspection (notebooks, tests).
    ``switches.kernels`` runs the routed experts through the Triton kernel (``dispatch`` "triton").
    ``qat = True`` sends routed expert weights through ``v4lab.quant.fp4_fake_quant_ste``.
    ``h_fp8_scale > 0`` casts the routed experts' intermediate h to FP8 with that fixed scale (``expert_ffn``).
    ``ep_size = n`` (inside a torch.distributed group of n ranks): ``experts`` holds only this rank's experts
    (a ModuleDict keyed by global id; load the matching subset of a full layer's state dict to reproduce
    it) and the routed part runs through ``v4lab.expert_parallel.ep_forward`` (``dispatch`` is not used;
    ``ep_fp8`` sends FP8 rows); ``self.last_ep`` then records the traffic.
    ``expert_provider``: a function e -> (w1, w2, w3) that supplies routed expert e's weights when a token
    picks it (``v4lab.real`` reads them from a download one at a time). The layer then holds no routed
    experts (``experts`` is empty) and runs the grouped dispatch through the provider."""

    def __init__(self, cfg: V4Config, layer_id: int, *, dispatch: str = "grouped", shared_clamp: bool = True,
                 swiglu_limit: float | None = None, ep_size: int = 1, ep_group=None, ep_fp8: bool = False,
                 expert_provider: Callable[[int], tuple] | None = None, **gate_options):
        super().__init__()
        if dispatch not in DISPATCHES:
            _bad("dispatch", dispatch, f"must be one of {DISPATCHES}")
        self.ep_size, self.ep_group, self.ep_fp8, self.ep_rank = ep_size, ep_group, bool(ep_fp8), 0
        self.dim = cfg.hidden_size
        self.layer_id = layer_id
        self.dispatch = dispatch
        self.switches = Switches()         # `kernels`: dispatch through kernels/moe.py; `record`: see forward
        self.qat = False
        self.h_fp8_scale = 0.0             # > 0: static FP8 cast of the routed experts' h (see expert_ffn)
        self.limit = float(cfg.swiglu_limit if swiglu_limit is None else swiglu_limit)
        self.gate = Gate(cfg, layer_id, **gate_options)
        std = cfg.initializer_range
        I = cfg.moe_intermediate_size
        self.expert_provider = expert_provider
        if expert_provider is not None:
            self.experts = nn.ModuleList()
        elif ep_size == 1 and not ep_fp8:
            self.experts = nn.ModuleList(Expert(self.dim, I, self.limit, std) for _ in range(cfg.n_routed_experts))
        else:
            self.ep_rank, local = _ep_local_experts(cfg.n_routed_experts, ep_size, ep_group)
            self.experts = nn.ModuleDict({str(e): Expert(self.dim, I, self.limit, std) for e in local})
        self.last_ep: dict | None = None
        self.shared_experts = (Expert(self.dim, I * cfg.n_shared_experts, self.limit if shared_clamp else 0.0, std)
                               if cfg.n_shared_experts > 0 else None)
        self.last_routing: dict | None = None

    def expert_weights(self):
        """Lists (w1s, w2s, w3s) of the routed experts, fake-quantised to FP4 when ``qat`` is on."""
        ex = list(self.experts.values()) if isinstance(self.experts, nn.ModuleDict) else list(self.experts)
        ws = [[e.w1.weight for e in ex], [e.w2.weight for e in ex], [e.w3.weight for e in ex]]
        if self.qat:
            from v4lab.quant import fp4_fake_quant_ste  # another module; imported when first needed
            ws = [[fp4_fake_quant_ste(w) for w in group] for group in ws]
        return ws

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor | None = None,
                forced_idx: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            _bad("x.shape", tuple(x.shape), f"must be [batch, seq, hidden_size = {self.dim}]")
        B, S, D = x.shape
        if input_ids is not None and tuple(input_ids.shape) != (B, S):
            _bad("input_ids.shape", tuple(input_ids.shape), f"must be [batch, seq] = {(B, S)}")
        flat = x.reshape(B * S, D)
        weights, idx, scores = self.gate(flat, input_ids, forced_idx)
        dispatch = "triton" if self.switches.kernels else self.dispatch
        if self.h_fp8_scale > 0 and (dispatch == "triton" or isinstance(self.experts, nn.ModuleDict)):
            _bad("h_fp8_scale", self.h_fp8_scale, "the static FP8 cast of h runs in the naive and grouped "
                                                  "dispatch only (not the Triton kernel or expert parallelism)")
        if dispatch == "triton" and torch.is_grad_enabled() and (
                x.requires_grad or any(p.requires_grad for p in self.parameters())):
            _bad("dispatch", "triton", "the Triton kernel is forward-only; use it under torch.no_grad() "
                                       "or pick 'grouped' for training")
        if self.expert_provider is not None:
            y = moe_grouped_from(flat, idx, weights, self.expert_provider, self.gate.n_experts, self.limit,
                                 self.h_fp8_scale)
        elif isinstance(self.experts, nn.ModuleDict):
            w1s, w2s, w3s = self.expert_weights()
            from v4lab.expert_parallel import ep_forward  # imports this module: loaded on first use
            y, self.last_ep = ep_forward(flat, idx, weights, w1s, w2s, w3s, self.limit, self.gate.n_experts,
                                         self.ep_group, self.ep_fp8, ffn=expert_ffn)
        else:
            y = _DISPATCH[dispatch](flat, idx, weights, *self.expert_weights(), self.limit,
                                    *([self.h_fp8_scale] if self.h_fp8_scale > 0 else []))
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)
        self.last_routing = {"idx": idx.detach(), "weights": weights.detach(), "scores": scores,
                             "load": expert_load(idx, self.gate.n_experts)}
        if self.switches.record is not None:             # the caller's record (v4lab.switches)
            self.switches.record.add_routing(self, self.last_routing)
        return y.to(x.dtype).view(B, S, D)


def _ep_local_experts(n_experts: int, ep_size: int, group) -> tuple[int, range]:
    """(this rank, its global expert ids) in an EP group of ``ep_size`` ranks (torch.distributed)."""
    import torch.distributed as dist
    if isinstance(ep_size, bool) or not isinstance(ep_size, int) or ep_size < 1 or n_experts % ep_size:
        _bad("ep_size", ep_size, f"must be a positive integer dividing n_routed_experts = {n_experts}")
    if not dist.is_initialized() or dist.get_world_size(group) != ep_size:
        world = dist.get_world_size(group) if dist.is_initialized() else "no process group"
        _bad("ep_size", ep_size, f"must equal the size of the torch.distributed group ({world}); "
                                 "start one first (v4lab.distributed), or use ep_size = 1")
    rank = dist.get_rank(group)
    n = n_experts // ep_size
    return rank, range(rank * n, (rank + 1) * n)


# --------------------------------------------------------------------------------------- training rules
def expert_load(idx: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Tokens routed to each expert, [E] fp32 (over all tokens and top-k slots)."""
    return torch.bincount(idx.detach().reshape(-1), minlength=n_experts).float()


@torch.no_grad()
def bias_update(bias: torch.Tensor, load: torch.Tensor, gamma: float = 0.001) -> torch.Tensor:
    """Aux-loss-free balancing (V3 mechanism, V4 gamma = 0.001), once per step, in place:
    b_i += gamma * sign(mean_load - load_i) -- overloaded experts lose gamma, underloaded gain it,
    exactly balanced ones stay. ``load`` is the step's whole-batch load [E]. Returns ``bias``."""
    load = load.float()
    bias.add_(gamma * torch.sign(load.mean() - load))
    return bias


def sequence_balance_loss(scores: torch.Tensor, idx: torch.Tensor, n_experts: int | None = None,
                          alpha: float = 0.0001) -> torch.Tensor:
    """V3's sequence-wise balance loss, the formula V4 inherits (V4 states only alpha = 0.0001):
    per sequence of T tokens, f_i = E/(K T) * #{t: i in TopK_t}, P_i = mean_t s_it / sum_j s_jt,
    L = alpha * sum_i f_i P_i, averaged over sequences. With V4's sqrt-softplus s in place of V3's
    sigmoid (inferred; spec §1.3 UNCERTAIN). scores [B, S, E] (or [S, E]), idx [B, S, K].
    Leave hash layers out: their choice cannot respond to it."""
    if scores.dim() == 2:
        scores, idx = scores[None], idx[None]
    B, S, E = scores.shape
    E = E if n_experts is None else n_experts
    K = idx.shape[-1]
    hits = torch.zeros(B, E, dtype=torch.float32, device=scores.device)
    hits.scatter_add_(1, idx.reshape(B, S * K), torch.ones(B, S * K, device=scores.device))
    f = hits * E / (K * S)                                                        # [B, E]
    p = (scores.float() / scores.float().sum(-1, keepdim=True)).mean(1)         # [B, E]
    return alpha * (f * p).sum(-1).mean()


# --------------------------------------------------------------------------------------- notebook helpers
def load_imbalance(load: torch.Tensor) -> float:
    """max / mean expert load (1.0 = perfectly balanced)."""
    load = load.float()
    return float(load.max() / load.mean())


def routing_entropy(scores: torch.Tensor) -> torch.Tensor:
    """Per-token entropy (nats) of the normalised affinities s/sum(s): [T]. log(E) = no preference."""
    p = scores.detach().float()
    p = p / p.sum(-1, keepdim=True)
    return -(p * p.clamp_min(1e-30).log()).sum(-1)


def load_entropy(load: torch.Tensor) -> float:
    """Entropy (nats) of the expert-load distribution; log(E) means perfectly even."""
    p = load.float() / load.float().sum()
    return float(-(p * p.clamp_min(1e-30).log()).sum())


def topk_sets(idx: torch.Tensor) -> list[tuple[int, ...]]:
    """The set of experts of each token, as sorted tuples (slot order carries no meaning)."""
    return [tuple(sorted(r)) for r in idx.tolist()]


def bias_sensitivity(scores: torch.Tensor, bias: torch.Tensor | None, e: int, delta: float, k: int,
                     n_group: int = 1, topk_group: int = 1) -> dict:
    """Which tokens change experts if b_e moved by delta (selection only: weights never see the bias).
    Returns {"changed": [T] bool, "joined": [T] bool (e enters the top-k), "left": [T] bool (e leaves),
    "before": [T, k], "after": [T, k]} (before/after sorted per token)."""
    E = scores.shape[-1]
    if not 0 <= e < E:
        _bad("e", e, f"expert id must be in [0, {E})")
    b = torch.zeros(E) if bias is None else bias.detach().float().clone()
    before = select_topk(scores.detach(), b, k, n_group, topk_group).sort(-1).values
    b[e] += delta
    after = select_topk(scores.detach(), b, k, n_group, topk_group).sort(-1).values
    had, has = (before == e).any(-1), (after == e).any(-1)
    return {"changed": (before != after).any(-1), "joined": has & ~had, "left": had & ~has,
            "before": before, "after": after}


def layer_routing_stats(moes) -> list[dict]:
    """Per MoE layer from its last forward: load, max/mean, load entropy, mean token entropy."""
    out = []
    for m in moes:
        r = m.last_routing
        if r is None:
            continue
        out.append({"layer": m.layer_id, "hash": m.gate.is_hash, "load": r["load"].tolist(),
                    "max_over_mean": load_imbalance(r["load"]), "load_entropy": load_entropy(r["load"]),
                    "max_entropy": math.log(len(r["load"])),
                    "token_entropy": float(routing_entropy(r["scores"]).mean())})
    return out


__all__ = ["MoE", "Expert", "Gate", "swiglu", "expert_ffn", "down_proj", "moe_naive", "moe_grouped",
           "moe_triton", "grouped_expert_mlp", "sort_by_expert", "expert_load", "bias_update",
           "sequence_balance_loss", "load_imbalance", "routing_entropy", "load_entropy", "topk_sets",
           "bias_sensitivity", "layer_routing_stats", "gate_scores"]
