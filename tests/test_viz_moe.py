"""Notebook 01's figures: every callback swept, the figure checked against v4lab.accounting, v4lab.gate
and the model's own routing."""
import pytest
import torch

from v4lab import accounting, get_config
from v4lab.gate import gate_scores
from v4lab.model import V4Model
from v4lab.moe import expert_load
from v4lab.viz import moe as M
from v4lab.viz import trained
from v4lab.viz.common import sweep


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    model = V4Model(get_config("tiny")).eval()
    with torch.no_grad():                          # a trained-looking spread of affinities and biases
        for b in model.layers:
            b.ffn.gate.weight.normal_(0, 0.05)
            if b.ffn.gate.bias is not None:
                b.ffn.gate.bias.normal_(0, 0.05)
    return model, trained.byte_tokenizer(), {"synthetic": True, "description": "test"}


@pytest.fixture
def notebook_model(monkeypatch, small_model):
    monkeypatch.setattr(trained, "trained_model", lambda data_dir=None: small_model)
    return small_model


def test_expansion_table_is_the_accounting():
    e = accounting.moe_expansion()
    text = M.expansion_table()
    assert f"{e['total_from'] / 1e9:7.1f}B" in text and f"{e['total_to'] / 1e9:7.1f}B" in text
    assert e["factor_ratio"]["experts"] == 1.5 and e["factor_ratio"]["expert_width"] == 1.5


@pytest.mark.parametrize("static", [True, False])
def test_expansion_sweeps_match_accounting(static):
    w = M.ExpansionWidget(static=static)
    v3 = accounting.params("v3")
    assert w.fig.data[0].y[1] == pytest.approx(v3["total"] / 1e9)   # defaults are V3's own MoE
    for control in ("experts", "width", "topk"):
        seen = []
        for _ in sweep(w, control):
            s = w.state
            cfg = get_config("v3").replace(n_routed_experts=s["experts"], moe_intermediate_size=s["width"],
                                           num_experts_per_tok=s["topk"], n_group=1, topk_group=1)
            p = accounting.params(cfg)
            assert w.fig.data[0].y[1] == pytest.approx(p["total"] / 1e9)
            assert w.fig.data[1].y[1] == pytest.approx(p["active"] / 1e9)
            assert w.fig.data[0].y[2] == pytest.approx(accounting.params("v4-pro")["total"] / 1e9)
            seen.append((w.fig.data[0].y[1], w.fig.data[1].y[1]))
        totals, actives = zip(*seen)
        if control == "topk":                       # top-k changes what runs, not what is stored
            assert len(set(totals)) == 1 and list(actives) == sorted(actives) and actives[0] < actives[-1]
        else:
            assert list(totals) == sorted(totals) and totals[0] < totals[-1]
        getattr(w, f"on_{control}")(M.ExpansionWidget.defaults[control])


@pytest.mark.parametrize("static", [True, False])
def test_affinity_sweeps(static):
    w = M.AffinityWidget(static=static)
    curves = [list(t.y) for t in w.fig.data[:2]]
    softmax_by_spread = {}
    for spread, _ in sweep(w, "spread"):
        for shift, _ in sweep(w, "shift"):
            z = M.base_logits() * spread + shift
            for tr, f in zip(w.fig.data[2:4], ("sqrtsoftplus", "sigmoid")):
                assert list(tr.y) == pytest.approx(gate_scores(z, f).tolist())
            for tr in w.fig.data[4:7]:              # renormalised top-4 weights: sum 1, descending
                assert sum(tr.y) == pytest.approx(1.0, abs=1e-6)
                assert list(tr.y) == sorted(tr.y, reverse=True)
            softmax_by_spread.setdefault(spread, []).append(list(w.fig.data[6].y))
            if shift == max(M.SHIFT_STOPS) and spread <= 1:  # sigmoid saturates: nearly uniform weights
                assert max(w.fig.data[5].y) - min(w.fig.data[5].y) < 0.02
            # sqrt-softplus keeps the order sharper than a saturated sigmoid at large logits
            if shift == max(M.SHIFT_STOPS):
                assert w.fig.data[4].y[0] >= w.fig.data[5].y[0]
    for ws in softmax_by_spread.values():   # softmax ignores a shift of all logits
        for x in ws[1:]:
            assert x == pytest.approx(ws[0], abs=1e-6)
    assert [list(t.y) for t in w.fig.data[:2]] == curves


@pytest.mark.parametrize("static", [True, False])
def test_bias_sweeps_move_tokens_the_right_way(notebook_model, static):
    model, _, _ = notebook_model
    w = M.BiasWidget(static=static)
    routes = w.routes
    T = len(routes["tokens"])
    learned = [i for i in range(model.cfg.num_hidden_layers) if not model.cfg.is_hash_layer(i)]
    assert M.learned_layers(routes) == learned
    for layer, _ in sweep(w, "layer"):
        # "load now" is the model's own routing of the text
        want = expert_load(routes["layers"][layer]["idx"], model.cfg.n_routed_experts)
        assert list(w.fig.data[2].y) == want.tolist()
        moved = 0
        for expert in (0, model.cfg.n_routed_experts - 1):
            w.on_expert(expert)
            loads = []
            for d, _ in sweep(w, "delta"):
                f = w.fig.data
                after = [0] * model.cfg.n_routed_experts               # the other experts' bars + the chosen one's
                for tr in f[:2]:
                    for x, y in zip(tr.x, tr.y):
                        after[x] = y
                assert list(f[1].x) == [expert] and expert not in f[0].x
                assert sum(after) == T * model.cfg.num_experts_per_tok
                joined, left = _n(f[4]), _n(f[5])
                if d == 0:
                    assert joined == left == 0 and after == list(f[2].y)
                elif d > 0:
                    assert left == 0
                else:
                    assert joined == 0
                assert after[expert] - f[2].y[expert] == joined - left
                loads.append(after[expert])
            assert loads == sorted(loads)                                # monotone in delta
            moved += loads[0] < loads[-1]
        assert moved                                                     # and within the range, it matters
    with pytest.raises(ValueError, match="layer = 0"):
        w.on_layer(0)                                                  # a hash layer: no bias to move
    with pytest.raises(ValueError, match="expert = 99"):
        w.on_expert(99)


def _n(tr):
    return 0 if tr.x is None else len(tr.x)


def test_hash_layers_route_by_token_id_only(notebook_model):
    model, _, _ = notebook_model
    r = M.route_text(M.DEFAULT_TEXT)
    for row in M.hash_consistency(r):
        assert row["repeats"] > 50
        if row["hash"]:
            assert row["same_experts"] == 1.0
    assert min(row["same_experts"] for row in M.hash_consistency(r) if not row["hash"]) < 1.0
    fig = M.build_routing()
    assert len(fig.data[0].z) == model.cfg.num_hidden_layers
    for row in fig.data[0].z:
        assert sum(row) == pytest.approx(1.0)


def test_static_builders(notebook_model):
    w = M.BiasWidget(static=True, layer=3, expert=2, delta=0.05)
    assert M.build_bias(M.DEFAULT_TEXT, 3, 2, 0.05).to_plotly_json()["data"] == w.fig.to_plotly_json()["data"]
    fig = M.build_expansion()
    assert sum(fig.data[0].y) == pytest.approx(accounting.moe_expansion()["routed_growth"] / 1e9)
