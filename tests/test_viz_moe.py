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


# ------------------------------------------------------------------ what the trained experts learned
from pathlib import Path  # noqa: E402

from v4lab.data import TOKEN_CLASSES, token_classes  # noqa: E402
from v4lab.gate import select_topk  # noqa: E402
from v4lab.labeval import random_twin  # noqa: E402
from v4lab.train import expert_specialisation  # noqa: E402
from v4lab.viz import check  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / "data"
TINY, LAB = DATA / "tiny-v4", DATA / "lab-v4"


@pytest.fixture(scope="module")
def tiny_spec():
    torch.set_num_threads(1)
    model, tok, info = trained.load_dir(TINY)
    return model, tok, M.Specialisation(model, tok, TINY, n_tokens=300)


def test_specialisation_is_expert_specialisation(tiny_spec):
    """The panel's MI per block is v4lab.train.expert_specialisation's on the same tokens, for the trained
    router and for the random twin."""
    model, tok, sp = tiny_spec
    ids = sp.routes["ids"]
    assert ids.numel() == 300 and ids[0] == 0                      # the held-out stream starts at <|bos|>
    windows = torch.cat([ids, ids[:1]])[None]                         # expert_specialisation reads [:, :-1]
    classes = token_classes(tok)
    want = expert_specialisation(model, windows, classes, batch_size=1)
    assert sp.mi == pytest.approx(want["mi_bits"], abs=1e-12)
    assert [r["hash"] for r in sp.routes["layers"]] == want["hash"]
    rand = expert_specialisation(random_twin(model), windows, classes, batch_size=1)
    assert sp.random_mi == pytest.approx(rand["mi_bits"], abs=1e-12)
    learned = [i for i, h in enumerate(want["hash"]) if not h]
    assert all(sp.mi[i] > 2 * sp.random_mi[i] for i in learned)      # trained routers do specialise
    hashed = [i for i, h in enumerate(want["hash"]) if h]
    assert all(sp.mi[i] == pytest.approx(sp.random_mi[i]) for i in hashed)   # same table, same routes


def test_top_tokens_rank_by_count_and_by_share(tiny_spec):
    _, _, sp = tiny_spec
    layer = 1
    j = sp.by_token[layer]
    for e in range(sp.E):
        by_count = M.top_tokens(sp, layer, e, "count")
        counts = [n for _, n, _ in by_count]
        assert counts == sorted(counts, reverse=True) and counts[0] == int(j[:, e].max())
        for s, n, f in M.top_tokens(sp, layer, e, "share"):
            t = sp.strings.index(s)
            assert j[t].sum() >= M.MIN_COUNT and f == pytest.approx(n / float(j[t].sum()))
    with pytest.raises(ValueError, match="rank_by = 'x'"):
        M.top_tokens(sp, layer, 0, "x")


@pytest.mark.parametrize("static", [True, False])
def test_specialisation_widget_sweeps(tiny_spec, static):
    _, _, sp = tiny_spec
    w = M.SpecialisationWidget(static=static, sp=sp)
    assert w.state["layer"] == 1                                      # the first learned layer
    for rank_by, _ in sweep(w, "rank_by"):
        for layer, _ in sweep(w, "layer"):
            heat, swatch, tops, hash_bars, learned_bars, rand = w.fig.data
            jc = sp.by_class[layer]
            used = [c for c in range(len(TOKEN_CLASSES)) if jc[c].sum() > 0]
            assert list(heat.x) == [TOKEN_CLASSES[c] for c in used]
            for e in range(sp.E):                                       # p(class | expert): rows sum to 1
                assert sum(heat.z[e]) == pytest.approx(1.0, abs=1e-3)
                assert heat.z[e][0] == pytest.approx(float(jc[used[0], e] / jc[:, e].sum()), abs=1e-4)
            assert heat.z[-1] == pytest.approx((jc[used].sum(1) / jc.sum()).tolist(), abs=1e-4)
            first = M.top_tokens(sp, layer, 0, rank_by)[0][0]
            assert tops.text[0].startswith(first)
            assert list(hash_bars.y) + list(learned_bars.y) == pytest.approx(
                [m for m, r in zip(sp.mi, sp.routes["layers"]) if r["hash"]]
                + [m for m, r in zip(sp.mi, sp.routes["layers"]) if not r["hash"]])
            assert list(rand.y) == pytest.approx(sp.random_mi)
            assert swatch.meta == {"categorical": True}
            assert check.check_figure(w.fig) == [], (layer, rank_by)
    with pytest.raises(ValueError, match="layer = 99"):
        w.on_layer(99)


@pytest.mark.parametrize("static", [True, False])
def test_load_widget_sweeps(tiny_spec, static):
    model, _, sp = tiny_spec
    w = M.LoadWidget(static=static, sp=sp)
    E, K = model.cfg.n_routed_experts, model.cfg.num_experts_per_tok
    for layer, _ in sweep(w, "layer"):
        r = sp.routes["layers"][layer]
        load, no_bias, mean, bias = w.fig.data
        T = r["idx"].shape[0]
        assert list(load.y) == pytest.approx((expert_load(r["idx"], E) / (T * K)).tolist())
        assert list(load.marker.color) == M.expert_colors(E) and len(set(M.expert_colors(E))) == E
        assert list(mean.y) == [1 / E, 1 / E]
        if r["hash"]:
            assert not no_bias.x and not bias.x and "no bias" in w.fig.layout.annotations[0].text
        else:
            nb = expert_load(select_topk(r["scores"], None, K), E) / (T * K)
            assert list(no_bias.y) == pytest.approx(nb.tolist())
            assert list(bias.y) == pytest.approx(model.blocks()[layer].ffn.gate.bias.tolist())
        assert check.check_figure(w.fig) == [], layer


def test_heldout_ids_sources_and_errors(tmp_path, tiny_spec):
    _, tok, _ = tiny_spec
    ids, where = M.heldout_ids(TINY, tok, 50)
    assert ids.shape == (1, 50) and "heldout.txt" in where
    ids, where = M.heldout_ids(tmp_path, tok, 50)                      # no heldout.txt there: sample texts
    assert "sample texts" in where and ids.shape[1] == 50
    with pytest.raises(ValueError, match="n_tokens = 1"):
        M.heldout_ids(TINY, tok, 1)


@pytest.mark.slow
def test_lab_model_routing_figures():
    if not (LAB / "config.json").is_file():
        pytest.skip("data/lab-v4 is not there (the lab model ships separately; see data/README.md)")
    torch.set_num_threads(1)
    model, tok, _ = trained.load_dir(LAB)
    sp = M.Specialisation(model, tok, LAB, n_tokens=512)
    assert sp.E == model.cfg.n_routed_experts >= 16
    assert len(set(M.expert_colors(sp.E))) == sp.E                     # one distinct colour per expert
    for W in (M.SpecialisationWidget, M.LoadWidget):
        w = W(static=True, sp=sp)
        for c in w.control_names:
            for v in w.sweep_values(c):
                getattr(w, f"on_{c}")(v)
                assert check.check_figure(w.fig) == [], (W.name, c, v)
