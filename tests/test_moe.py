"""V4 MoE: gate rules, hash routing, clamped SwiGLU experts, dispatch, training rules, helpers.

The main checks compare the module with an independent per-token float64 formula written here (docs/design/
v4-moe-mhc-fp4.md §1–§3); each rule is also shown to catch a deliberately wrong variant.
"""
import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F

import v4lab.gate as gate_mod
import v4lab.moe as moe_mod
from v4lab import quant
from v4lab.config import get_config
from v4lab.gate import Gate, balanced_hash_table, hash_table, select_topk
from v4lab.moe import (
    MoE,
    bias_sensitivity,
    bias_update,
    expert_load,
    load_imbalance,
    routing_entropy,
    sequence_balance_loss,
    topk_sets,
)

LIMIT = 2.0          # small clamp so random pre-activations cross it on both sides


def small_cfg(**kw):
    base = dict(hidden_size=32, moe_intermediate_size=16, vocab_size=64, swiglu_limit=LIMIT,
                routed_scaling_factor=1.5)
    base.update(kw)
    return get_config("tiny").replace(**base)


def make(cfg, layer_id, seed=0, **kw):
    torch.manual_seed(seed)
    m = MoE(cfg, layer_id, **kw)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
        if m.gate.bias is not None:
            m.gate.bias.copy_(torch.randn(cfg.n_routed_experts) * 0.5)
    return m


def inputs(cfg, B=2, S=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, S, cfg.hidden_size, generator=g) * 3, torch.randint(0, cfg.vocab_size, (B, S), generator=g)


# ------------------------------------------------------------------ the independent formula (float64)
def f_expert(x, w1, w2, w3, L):
    g, u = w1.double() @ x, w3.double() @ x
    if L > 0:
        g = torch.minimum(g, torch.tensor(L, dtype=torch.float64))
        u = u.clamp(-L, L)
    return w2.double() @ (g * torch.sigmoid(g) * u)


@torch.no_grad()
def formula(m, x, ids, forced=None, scoring="sqrtsoftplus", renorm=True):
    """Returns y [T, D] and per token (idx list, weights list)."""
    xs, idl = x.reshape(-1, x.shape[-1]).double(), ids.reshape(-1)
    K, rs, L = m.gate.topk, m.gate.route_scale, m.limit
    Ls = m.shared_experts.limit
    ys, routes = [], []
    for t in range(xs.shape[0]):
        xt = xs[t]
        z = m.gate.weight.double() @ xt
        s = {"sqrtsoftplus": lambda z: torch.sqrt(torch.log1p(torch.exp(z))), "sigmoid": torch.sigmoid,
             "softmax": lambda z: torch.exp(z) / torch.exp(z).sum()}[scoring](z)
        if forced is not None:
            idx = [int(i) for i in forced[t]]
        elif m.gate.is_hash:
            idx = [int(i) for i in m.gate.tid2eid[idl[t]]]
        else:
            biased = (s + m.gate.bias.double()).tolist()
            idx = sorted(range(len(biased)), key=lambda e: -biased[e])[:K]
        tot = sum(float(s[e]) for e in idx) if renorm else 1.0
        w = [float(s[e]) / tot * rs for e in idx]
        y = sum(wk * f_expert(xt, m.experts[e].w1.weight, m.experts[e].w2.weight, m.experts[e].w3.weight, L)
                for wk, e in zip(w, idx))
        se = m.shared_experts
        y = y + f_expert(xt, se.w1.weight, se.w2.weight, se.w3.weight, Ls)
        ys.append(y)
        routes.append((idx, w))
    return torch.stack(ys), routes


def check_rules(m, x, ids, monkeypatch):
    """The module equals the formula, and W2's input is w_k * SwiGLU (weight inside, before W2)."""
    seen = []
    real_down = moe_mod.down_proj

    def spy(h, w2):
        seen.append(h.detach().double())
        return real_down(h, w2)

    monkeypatch.setattr(moe_mod, "down_proj", spy)
    with torch.no_grad():
        y = m(x, ids).reshape(-1, x.shape[-1]).double()
        want, routes = formula(m, x, ids)
    monkeypatch.setattr(moe_mod, "down_proj", real_down)
    assert torch.allclose(y, want, rtol=1e-4, atol=1e-4), (y - want).abs().max()
    rows = torch.cat([s for s in seen if s.shape[1] == m.experts[0].w1.weight.shape[0]])
    xs = x.reshape(-1, x.shape[-1]).double()
    for t, (idx, w) in enumerate(routes):
        for e, wk in zip(idx, w):
            ex = m.experts[e]
            g, u = ex.w1.weight.double() @ xs[t], ex.w3.weight.double() @ xs[t]
            h = torch.minimum(g, torch.tensor(LIMIT, dtype=torch.float64))
            h = F.silu(h) * u.clamp(-LIMIT, LIMIT) * wk
            assert (rows - h).abs().amax(-1).min() < 1e-4, "no W2 input equals w_k * SwiGLU(x)"


# ------------------------------------------------------------------ wrong variants
ORIG_FORWARD = Gate.forward
ORIG_ROUTE = gate_mod.route_weights
ORIG_EXPERT = moe_mod.expert_ffn


def _bias_in_weights(self, x, input_ids=None, forced_idx=None):
    w, idx, s = ORIG_FORWARD(self, x, input_ids, forced_idx)
    b = self.bias if self.bias is not None else 0.0
    return ORIG_ROUTE(s + b, idx, self.route_scale, self.renormalize), idx, s


def _weight_after_w2(x, w1, w2, w3, weight=None, limit=0.0, h_fp8_scale=0.0):
    y = ORIG_EXPERT(x, w1, w2, w3, None, limit)
    return y if weight is None else y * weight.float()[:, None]


WRONG = {
    "bias_in_weights": lambda mp: mp.setattr(Gate, "forward", _bias_in_weights),
    "gate_clamped_below": lambda mp: mp.setattr(
        moe_mod, "swiglu", lambda g, u, L: F.silu(g.float().clamp(-L, L)) * u.float().clamp(-L, L)),
    "no_renormalisation": lambda mp: mp.setattr(
        gate_mod, "route_weights", lambda s, idx, rs, renorm=True: s.gather(-1, idx) * rs),
    "missing_route_scale": lambda mp: mp.setattr(
        gate_mod, "route_weights", lambda s, idx, rs, renorm=True: ORIG_ROUTE(s, idx, 1.0, renorm)),
    "weight_after_w2": lambda mp: mp.setattr(moe_mod, "expert_ffn", _weight_after_w2),
}


@pytest.mark.parametrize("layer_id", [0, 3], ids=["hash", "learned"])
@pytest.mark.parametrize("variant", ["right"] + list(WRONG))
def test_gate_and_expert_rules(variant, layer_id, monkeypatch):
    cfg = small_cfg()
    m = make(cfg, layer_id)
    x, ids = inputs(cfg)
    if not m.gate.is_hash:   # guard: the bias really changes some choices here
        s = m.gate.scores(x.reshape(-1, cfg.hidden_size))
        assert (select_topk(s, None, 2).sort(-1).values != select_topk(s, m.gate.bias, 2).sort(-1).values).any()
    if variant == "right":
        check_rules(m, x, ids, monkeypatch)
        return
    if variant == "bias_in_weights" and m.gate.is_hash:
        pytest.skip("hash layers have no bias")
    WRONG[variant](monkeypatch)
    with pytest.raises(AssertionError):
        check_rules(m, x, ids, monkeypatch)


@pytest.mark.parametrize("scoring,renorm", [("sigmoid", True), ("softmax", False)])
def test_other_scoring_functions(scoring, renorm):
    cfg = small_cfg()
    m = make(cfg, 3, scoring_func=scoring)
    with torch.no_grad():
        m.gate.bias.zero_()
    x, ids = inputs(cfg)
    with torch.no_grad():
        y = m(x, ids).reshape(-1, cfg.hidden_size).double()
    want, routes = formula(m, x, ids, scoring=scoring, renorm=renorm)
    assert torch.allclose(y, want, rtol=1e-4, atol=1e-4)
    sums = m.last_routing["weights"].sum(-1)
    if renorm:      # renormalised: the top-k weights sum to the route scale
        assert torch.allclose(sums, torch.full_like(sums, 1.5))
    else:           # official softmax path: no renormalisation, sums < route scale
        assert (sums <= 1.5 + 1e-6).all() and (sums < 1.5 - 1e-2).any()


def test_group_limited_routing_v3():
    cfg = small_cfg(n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=2)
    g = Gate(cfg, 3)
    torch.manual_seed(3)
    s = torch.rand(50, 8)
    b = torch.randn(8) * 0.1
    idx = select_topk(s, b, 2, 4, 2)
    for t in range(50):
        biased = (s[t] + b).tolist()
        gs = [sum(sorted(biased[2 * j:2 * j + 2], reverse=True)[:2]) for j in range(4)]
        groups = sorted(range(4), key=lambda j: -gs[j])[:2]
        allowed = [e for e in range(8) if e // 2 in groups]
        want = sorted(allowed, key=lambda e: -biased[e])[:2]
        assert sorted(idx[t].tolist()) == sorted(want)
    # some token's global top-2 lies outside its chosen groups, so the limit mattered
    assert (select_topk(s, b, 2).sort(-1).values != idx.sort(-1).values).any()
    assert g.n_group == 4 and g.topk_group == 2


# ------------------------------------------------------------------ hash routing
def test_hash_table_deterministic_distinct():
    a, b, c = hash_table(100, 16, 6, seed=5), hash_table(100, 16, 6, seed=5), hash_table(100, 16, 6, seed=6)
    assert a.dtype == torch.int64 and a.shape == (100, 6)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert all(len(set(r)) == 6 for r in a.tolist())
    assert a.min() >= 0 and a.max() < 16
    cfg = small_cfg()
    assert torch.equal(make(cfg, 0, seed=1).gate.tid2eid, make(cfg, 0, seed=2).gate.tid2eid)


def test_hash_routing_ignores_logits_and_bias():
    cfg = small_cfg()
    m = make(cfg, 0)
    x, ids = inputs(cfg)
    with torch.no_grad():
        y0 = m(x, ids)
        idx0, w0 = m.last_routing["idx"].clone(), m.last_routing["weights"].clone()
        assert torch.equal(idx0, m.gate.tid2eid[ids.reshape(-1)])
        m.gate.weight.normal_(0, 1.0)                     # new logits: same experts, new weights
        m(x, ids)
        assert torch.equal(m.last_routing["idx"], idx0)
        assert not torch.allclose(m.last_routing["weights"], w0)
        m.gate.weight.normal_(0, 1.0)
        m(x, ids)
        y1, idx1 = m(x, ids), m.last_routing["idx"].clone()
        m.gate.bias = torch.full((cfg.n_routed_experts,), 0.0).index_fill_(0, torch.tensor([0]), 100.0)
        y2 = m(x, ids)                                     # a bias (absent in hash layers) changes nothing
        assert torch.equal(m.last_routing["idx"], idx1) and torch.equal(y1, y2)
    assert not torch.equal(y0, y1)
    assert "gate.bias" not in make(cfg, 0).state_dict()


def test_balanced_hash_table():
    t = balanced_hash_table(torch.tensor([10, 1, 1, 1]), 4, 2)
    assert t.tolist() == [[0, 1], [2, 3], [2, 3], [2, 3]]    # greedy: most frequent first, least loaded
    counts = (1000.0 / torch.arange(10, 210)).round()          # Zipf-like token counts
    bal = balanced_hash_table(counts, 16, 2)
    rnd = hash_table(200, 16, 2, seed=0)

    def imbalance(tab):
        load = torch.zeros(16).index_add_(0, tab.reshape(-1), counts.repeat_interleave(2))
        return float(load.max() / load.mean())

    assert all(len(set(r)) == 2 for r in bal.tolist())
    assert torch.equal(bal, balanced_hash_table(counts, 16, 2))
    assert imbalance(bal) < 1.1 < imbalance(rnd)


# ------------------------------------------------------------------ SwiGLU clamp
def test_swiglu_clamp_edges():
    g = torch.tensor([-100.0, -5.0, 0.5, 5.0, 100.0])
    u = torch.tensor([-50.0, 3.0, 1.0, -3.0, 50.0])
    h = moe_mod.swiglu(g, u, 2.0)
    want = F.silu(torch.tensor([-100.0, -5.0, 0.5, 2.0, 2.0])) * torch.tensor([-2.0, 2.0, 1.0, -2.0, 2.0])
    assert torch.allclose(h, want)
    assert torch.equal(moe_mod.swiglu(g, u, 0.0), F.silu(g) * u)     # limit <= 0 disables
    assert torch.equal(moe_mod.swiglu(g, u, -1.0), F.silu(g) * u)


def test_shared_expert_clamp_flag():
    cfg = small_cfg()
    m1, m0 = make(cfg, 3), make(cfg, 3, shared_clamp=False)
    assert m1.shared_experts.limit == LIMIT and m0.shared_experts.limit == 0.0
    assert all(e.limit == LIMIT for e in m0.experts)
    x, ids = inputs(cfg)
    with torch.no_grad():
        assert not torch.allclose(m1(x, ids), m0(x, ids))
        want, _ = formula(m0, x, ids)
        assert torch.allclose(m0(x, ids).reshape(-1, 32).double(), want, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ dispatch
@pytest.mark.parametrize("layer_id", [0, 3])
def test_grouped_equals_naive_forward_and_grads(layer_id):
    cfg = small_cfg()
    outs = []
    for dispatch in ("naive", "grouped"):
        m = make(cfg, layer_id, dispatch=dispatch)
        x, ids = inputs(cfg, B=2, S=5)
        x.requires_grad_(True)
        y = m(x, ids)
        loss = (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum()
        loss = loss + 100 * sequence_balance_loss(m.last_routing["scores"].view(2, 5, -1),
                                                  m.last_routing["idx"].view(2, 5, -1))
        loss.backward()
        outs.append((y.detach(), x.grad, {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}))
    (y0, gx0, gp0), (y1, gx1, gp1) = outs
    assert torch.allclose(y0, y1, atol=1e-5)
    assert torch.allclose(gx0, gx1, atol=1e-5)
    assert gp0.keys() == gp1.keys() and "gate.weight" in gp0
    for n in gp0:
        assert torch.allclose(gp0[n], gp1[n], atol=1e-5), n


def test_dispatch_skewed_and_empty_experts():
    cfg = small_cfg()
    m = make(cfg, 3, dispatch="grouped")
    x, _ = inputs(cfg, B=1, S=6)
    forced = torch.tensor([[1, 2]] * 5 + [[2, 7]])            # most experts get no token
    with torch.no_grad():
        y = m(x, forced_idx=forced)
        m.dispatch = "naive"
        assert torch.allclose(y, m(x, forced_idx=forced), atol=1e-5)
    assert m.last_routing["load"].tolist() == [0, 5, 6, 0, 0, 0, 0, 1]


def test_forced_idx_keeps_current_gate_weights():
    cfg = small_cfg()
    m = make(cfg, 3)
    x, ids = inputs(cfg, B=1, S=4)
    forced = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7]])
    y = m(x, forced_idx=forced)
    want, routes = formula(m, x, ids, forced=forced)
    assert torch.allclose(y.reshape(-1, 32).double(), want, rtol=1e-4, atol=1e-4)
    assert torch.equal(m.last_routing["idx"], forced)
    y.sum().backward()
    assert m.gate.weight.grad is not None and m.gate.weight.grad.abs().sum() > 0   # router still learns


def test_qat_routes_expert_weights_through_fp4(monkeypatch):
    calls = []

    def fake(w):
        calls.append(tuple(w.shape))
        return torch.zeros_like(w)

    monkeypatch.setitem(sys.modules, "v4lab.quant", types.SimpleNamespace(fp4_fake_quant_ste=fake))
    cfg = small_cfg()
    m = make(cfg, 3)
    x, ids = inputs(cfg)
    with torch.no_grad():
        y_off = m(x, ids)
        m.qat = True
        y_on = m(x, ids)
        shared = m.shared_experts(x.reshape(-1, 32)).view_as(x)
    assert len(calls) == 3 * cfg.n_routed_experts             # every routed w1/w2/w3, not the shared one
    assert torch.allclose(y_on, shared, atol=1e-6) and not torch.allclose(y_off, shared)


def test_state_dict_names_and_dtypes():
    cfg = small_cfg()
    m = MoE(cfg, 3)
    sd = m.state_dict()
    E, I, D = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size
    want = {"gate.weight": (E, D), "gate.bias": (E,), "shared_experts.w1.weight": (I, D),
            "shared_experts.w2.weight": (D, I), "shared_experts.w3.weight": (I, D)}
    for e in range(E):
        want.update({f"experts.{e}.w1.weight": (I, D), f"experts.{e}.w2.weight": (D, I),
                     f"experts.{e}.w3.weight": (I, D)})
    assert {k: tuple(v.shape) for k, v in sd.items()} == want
    assert sd["gate.bias"].dtype == torch.float32
    assert "gate.bias" not in dict(m.named_parameters())        # moved by bias_update, not by the optimizer
    h = MoE(cfg, 0).state_dict()
    assert h["gate.tid2eid"].dtype == torch.int64 and tuple(h["gate.tid2eid"].shape) == (cfg.vocab_size, 2)


def test_dtypes_fp32_gate_and_output_dtype():
    cfg = small_cfg()
    m = make(cfg, 3).to(torch.bfloat16)
    x, ids = inputs(cfg)
    y = m(x.bfloat16(), ids)
    assert y.dtype == torch.bfloat16
    assert m.last_routing["scores"].dtype == torch.float32 and m.last_routing["weights"].dtype == torch.float32


# ------------------------------------------------------------------ training rules
def test_bias_update_sign_rule():
    b = torch.zeros(4)
    bias_update(b, torch.tensor([10.0, 2.0, 4.0, 0.0]), gamma=0.001)        # mean 4
    assert torch.allclose(b, torch.tensor([-0.001, 0.001, 0.0, 0.001]))
    bias_update(b, torch.tensor([10.0, 2.0, 4.0, 0.0]))                      # default gamma = 0.001
    assert torch.allclose(b, torch.tensor([-0.002, 0.002, 0.0, 0.002]))


BALANCE_STEPS = 150   # stated bound; measured: max/mean first < 1.2 at step 103, and it stays there


def _skewed_run(update, steps):
    """One fixed batch of 2048 tokens whose affinities prefer low expert ids (E = 16, top-2); each step
    routes it with the current bias and applies ``update(bias, load)``. Returns max/mean per step."""
    torch.manual_seed(0)
    E, K, T = 16, 2, 2048
    s = F.softplus(torch.randn(T, E) * 0.5 + torch.linspace(0.4, -0.4, E)).sqrt()
    bias, history = torch.zeros(E), []
    for _ in range(steps):
        load = expert_load(select_topk(s, bias, K), E)
        history.append(load_imbalance(load))
        update(bias, load)
    return history


def test_bias_update_balances_skewed_routing():
    hist = _skewed_run(bias_update, BALANCE_STEPS + 50)
    assert hist[0] > 2.0                                      # it starts badly skewed
    first = next(i for i, r in enumerate(hist) if r < 1.2)
    assert first < BALANCE_STEPS, first
    assert max(hist[first:]) < 1.2                            # and stays balanced
    wrong = _skewed_run(lambda b, load: b.add_(0.001 * torch.sign(load - load.mean())), 100)  # sign flipped
    assert min(wrong) > 2.0


def test_sequence_balance_loss_formula():
    torch.manual_seed(0)
    B, S, E, K = 3, 5, 8, 2
    s = F.softplus(torch.randn(B, S, E)).sqrt()
    idx = torch.stack([torch.stack([torch.randperm(E)[:K] for _ in range(S)]) for _ in range(B)])
    want = 0.0
    for b in range(B):
        for i in range(E):
            f = E / (K * S) * sum(int(i in idx[b, t].tolist()) for t in range(S))
            p = sum(float(s[b, t, i] / s[b, t].sum()) for t in range(S)) / S
            want += 1e-4 * f * p / B
    assert math.isclose(float(sequence_balance_loss(s, idx)), want, rel_tol=1e-5)
    # uniform routing and scores: sum_i f_i P_i = 1, so L = alpha
    u_idx = torch.arange(E).view(1, 4, 2)
    assert math.isclose(float(sequence_balance_loss(torch.ones(1, 4, E), u_idx, alpha=0.5)), 0.5, rel_tol=1e-6)
    # per sequence, not over the batch: two sequences skewed in opposite ways are each penalised
    s2 = torch.ones(2, 4, 4)
    s2[0, :, 0] = s2[1, :, 1] = 5.0
    i2 = torch.tensor([[[0]] * 4, [[1]] * 4])
    per_seq = float(sequence_balance_loss(s2, i2, alpha=1.0))
    whole = float(sequence_balance_loss(s2.reshape(1, 8, 4), i2.reshape(1, 8, 1), alpha=1.0))
    assert per_seq > whole * 1.5


# ------------------------------------------------------------------ notebook helpers
def test_notebook_helpers():
    idx = torch.tensor([[0, 3], [3, 1], [3, 0]])
    assert expert_load(idx, 4).tolist() == [2, 1, 0, 3]
    assert topk_sets(idx) == [(0, 3), (1, 3), (0, 3)]
    assert torch.allclose(routing_entropy(torch.ones(2, 8)), torch.full((2,), math.log(8)))
    assert float(routing_entropy(torch.tensor([[1.0, 0, 0, 0]]))) == pytest.approx(0.0, abs=1e-6)
    assert load_imbalance(torch.tensor([1.0, 1, 1, 5])) == 2.5
    assert moe_mod.load_entropy(torch.ones(8)) == pytest.approx(math.log(8))
    cfg = small_cfg()
    layers = [make(cfg, 0), make(cfg, 3)]
    x, ids = inputs(cfg)
    with torch.no_grad():
        for m in layers:
            m(x, ids)
    stats = moe_mod.layer_routing_stats(layers)
    assert [r["layer"] for r in stats] == [0, 3] and [r["hash"] for r in stats] == [True, False]
    assert sum(stats[1]["load"]) == 14 * 2 and stats[1]["max_over_mean"] >= 1.0
    assert 0 < stats[1]["token_entropy"] <= stats[1]["max_entropy"] + 1e-6


def test_bias_sensitivity_matches_recompute():
    torch.manual_seed(1)
    s = F.softplus(torch.randn(40, 8)).sqrt()
    b = torch.randn(8) * 0.1
    r = bias_sensitivity(s, b, e=3, delta=0.2, k=2)
    b2 = b.clone()
    b2[3] += 0.2
    after = select_topk(s, b2, 2).sort(-1).values
    before = select_topk(s, b, 2).sort(-1).values
    assert torch.equal(r["changed"], (after != before).any(-1)) and r["changed"].any()
    assert torch.equal(r["joined"], r["changed"])           # raising b_3 can only pull tokens towards 3
    assert not r["left"].any()
    assert not bias_sensitivity(s, b, 3, 0.0, 2)["changed"].any()
    assert (bias_sensitivity(s, b, 3, 100.0, 2)["after"] == 3).any(-1).all()
    assert not (bias_sensitivity(s, b, 3, -100.0, 2)["after"] == 3).any()


# ------------------------------------------------------------------ bad inputs
def test_bad_inputs():
    cfg = small_cfg()
    h, m = make(cfg, 0), make(cfg, 3)
    x, ids = inputs(cfg)
    with pytest.raises(ValueError, match="input_ids.*vocab_size"):
        h(x, ids.clone().fill_(cfg.vocab_size))
    with pytest.raises(ValueError, match="input_ids.*-1"):
        h(x, ids.clone().fill_(-1))
    with pytest.raises(ValueError, match="input_ids.dtype"):
        h(x, ids.float())
    with pytest.raises(ValueError, match="input_ids.*hash"):
        h(x)
    with pytest.raises(ValueError, match="x.shape.*hidden_size"):
        m(torch.randn(2, 3, cfg.hidden_size + 1))
    with pytest.raises(ValueError, match="x.shape"):
        m(torch.randn(6, cfg.hidden_size))
    with pytest.raises(ValueError, match="topk.*n_routed_experts"):
        MoE(cfg, 3, topk=cfg.n_routed_experts + 1)
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        cfg.replace(num_experts_per_tok=cfg.n_routed_experts + 1)
    with pytest.raises(ValueError, match="k .*distinct"):
        hash_table(10, 4, 5)
    with pytest.raises(ValueError, match="forced_idx"):
        m(x, forced_idx=torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="forced_idx"):
        m(x, forced_idx=torch.full((14, 2), cfg.n_routed_experts))
    with pytest.raises(ValueError, match="forced_idx.*hash"):
        h(x, ids, forced_idx=torch.zeros(14, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids.shape"):
        m(x, ids[:, :3])
    with pytest.raises(ValueError, match="dispatch"):
        MoE(cfg, 3, dispatch="fast")
    with pytest.raises(ValueError, match="scoring_func"):
        MoE(cfg, 3, scoring_func="relu")
    with pytest.raises(ValueError, match="n_group"):
        MoE(cfg, 3, n_group=3)
    with pytest.raises(ValueError, match="e = 9"):
        bias_sensitivity(torch.rand(4, 8), None, 9, 0.1, 2)
    with pytest.raises(ValueError, match="dispatch.*triton"):
        MoE(cfg, 3, dispatch="triton")(x, ids)


def test_qat_with_real_fp4_quantiser():
    cfg = small_cfg(hidden_size=64, moe_intermediate_size=32)
    m = make(cfg, 3)
    x, ids = inputs(cfg, B=1, S=5)
    m.qat = True
    y = m(x, ids)
    ref = make(cfg, 3)
    with torch.no_grad():
        for e in ref.experts:
            for lin in (e.w1, e.w2, e.w3):
                lin.weight.copy_(quant.fp4_fake_quant_ste(lin.weight))
        want = ref(x, ids)
    assert torch.allclose(y, want, atol=1e-5) and not torch.allclose(y, make(cfg, 3)(x, ids), atol=1e-4)
    y.square().sum().backward()                               # straight-through: master weights get grads
    assert m.experts[int(m.last_routing["idx"][0, 0])].w1.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("layer_id", [0, 3], ids=["hash", "learned"])
def test_matches_transformers_deepseek_v4_moe(layer_id):
    """Oracle: HF transformers' DeepseekV4SparseMoeBlock with the same weights (fp32 semantics)."""
    pytest.importorskip("transformers")
    from transformers.models.deepseek_v4.configuration_deepseek_v4 import DeepseekV4Config
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4SparseMoeBlock

    cfg = small_cfg()
    hc = DeepseekV4Config(hidden_size=32, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2,
                          vocab_size=64, num_hidden_layers=6, num_hash_layers=2, routed_scaling_factor=1.5,
                          swiglu_limit=LIMIT, compress_ratios=[0, 4, 128, 4, 128, 4], n_shared_experts=1)
    m = make(cfg, layer_id)
    h = DeepseekV4SparseMoeBlock(hc, layer_id).float()
    sd = {"gate.weight": m.gate.weight,
          "experts.gate_up_proj": torch.stack([torch.cat([e.w1.weight, e.w3.weight]) for e in m.experts]),
          "experts.down_proj": torch.stack([e.w2.weight for e in m.experts])}
    if m.gate.is_hash:
        sd["gate.tid2eid"] = m.gate.tid2eid
    else:
        sd["gate.e_score_correction_bias"] = m.gate.bias
    for a, b in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")):
        sd[f"shared_experts.{a}.weight"] = getattr(m.shared_experts, b).weight
    h.load_state_dict({k: v.detach() for k, v in sd.items()}, strict=True)
    x, ids = inputs(cfg)
    with torch.no_grad():
        assert torch.allclose(m(x, ids), h(x, ids), atol=1e-5)


def test_expert_provider_equals_held_experts_and_reads_only_picked_ones():
    """MoE(expert_provider=...) holds no routed experts, asks for each picked expert once, in expert order,
    and gives the same output and routing as the layer that holds those experts."""
    cfg = get_config("tiny")
    torch.manual_seed(0)
    held = MoE(cfg, 3)
    asked = []

    def provider(e):
        asked.append(e)
        ex = held.experts[e]
        return ex.w1.weight.detach().clone(), ex.w2.weight.detach().clone(), ex.w3.weight.detach().clone()

    lazy = MoE(cfg, 3, expert_provider=provider)
    assert len(lazy.experts) == 0
    lazy.load_state_dict({k: v for k, v in held.state_dict().items() if not k.startswith("experts.")})
    x = torch.randn(2, 5, cfg.hidden_size)
    with torch.no_grad():
        want, got = held(x), lazy(x)
    assert torch.equal(got, want)
    assert torch.equal(lazy.last_routing["idx"], held.last_routing["idx"])
    assert asked == sorted(set(held.last_routing["idx"].reshape(-1).tolist()))
