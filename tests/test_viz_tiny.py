"""Notebook 07's figures, swept over their controls and checked against the model itself: routing against
each MoE layer's own last_routing, attention maps against the inspection record (rows sum to 1 − sink,
the window band, HCA visibility), MTP bars against an independent forward, generation against generate."""
import pytest
import torch

from v4lab.model import V4Model
from v4lab.train import micro_config
from v4lab.viz import moe as moe_viz
from v4lab.viz import tiny as T
from v4lab.viz import trained
from v4lab.viz.common import sweep

SHORT = "for x in range(3): print(x)  # a short text"


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    # window + hash layer, CSA, HCA (m = 128): every attention kind and both routers, small enough for CPU
    cfg = micro_config(num_hidden_layers=3, compress_ratios=[0, 4, 128, 0])
    model = V4Model(cfg).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, trained.byte_tokenizer(), {"source": "synthetic", "synthetic": True, "description": "test"}


@pytest.fixture
def nb_model(monkeypatch, small_model):
    monkeypatch.setattr(trained, "trained_model", lambda data_dir=None: small_model)
    return small_model


@pytest.mark.parametrize("static", [True, False])
def test_routing_position_sweep_matches_the_layers_routes(nb_model, static):
    model, tok, _ = nb_model
    w = T.RoutingWidget(static=static)
    ids = trained.encode(tok, T.DEFAULT_TEXT, moe_viz.MAX_TOKENS)
    with torch.no_grad():
        model(ids)
    moes = [b.ffn for b in model.layers]
    K = model.cfg.num_experts_per_tok
    heat = [list(r) for r in w.fig.data[0].z]
    for l, m in enumerate(moes):                                         # first choice of every token
        assert heat[l] == m.last_routing["idx"][:, 0].tolist()
    titles = set()
    positions = list(range(0, ids.shape[1], 7)) if not static else None
    for pos, _ in sweep(w, "position", positions):
        assert list(w.fig.data[1].x) == [pos] * len(moes)
        z = torch.tensor([list(r) for r in w.fig.data[2].z], dtype=torch.float32)   # [layers, E] weights of this token
        for l, m in enumerate(moes):
            chosen = set(m.last_routing["idx"][pos].tolist())
            assert {e for e in range(z.shape[1]) if z[l, e] > 0} == chosen and len(chosen) == K
            want = m.last_routing["weights"][pos] / m.gate.route_scale   # the gate's own weights
            got = z[l, m.last_routing["idx"][pos]]
            assert torch.allclose(got, want.float(), atol=1e-4), (l, pos)
        titles.add(w.fig.layout.title.text)
        assert repr(w.routes["tokens"][pos]) in w.fig.layout.title.text
    assert len(titles) > 1
    assert [list(r) for r in w.fig.data[0].z] == heat                    # the position never changes the map


def test_routing_text_changes_the_heatmap_and_hash_layer_is_token_pure(nb_model):
    model, tok, _ = nb_model
    w = T.RoutingWidget(static=True)
    w.on_text(SHORT)
    routes = moe_viz.route_text(SHORT)
    assert len(w.fig.data[0].x) == len(routes["tokens"]) == len(tok.encode(SHORT).ids)
    # layer 0 is hash-routed: equal token ids get equal first choices
    ids, first = routes["ids"], list(w.fig.data[0].z[0])
    seen = {}
    for i, e in zip(ids, first):
        assert seen.setdefault(i, e) == e
    with pytest.raises(ValueError, match="position = 999"):
        w.on_position(999)
    with pytest.raises(ValueError, match="text = ''"):
        w.on_text("")


def test_attention_maps_follow_the_inspection_record(nb_model):
    model, _, _ = nb_model
    mp = T.maps()
    run = T.attn_viz.run_text(T.DEFAULT_TEXT)
    S, wnd = mp.S, model.cfg.sliding_window
    assert S == T.MAP_TOKENS and mp.layer == {"window": 0, "csa": 1, "hca": 2}
    for kind, layer in mp.layer.items():
        M = T.dense_map(run, layer, S)                                   # [H, S, S]
        sink = run.layers[layer]["sink"][:S].float().T                    # [H, S]
        assert torch.allclose(M.sum(-1), 1 - sink, atol=1e-5), kind       # every row: 1 − sink
        assert torch.all(M.triu(1) == 0), kind                            # causal
        q = torch.arange(S)
        outside = (q[None, :] < (q[:, None] - wnd + 1))                   # keys before the window
        if kind == "window":
            assert torch.all(M[:, outside] == 0)
        if kind == "hca":                                                 # entry 0 visible from query 127 on
            assert torch.all(M[:, :127][:, outside[:127]] == 0)
            assert M[:, 127:][:, outside[127:]].sum() > 0
        if kind == "csa":
            assert M[:, outside].sum() > 0


@pytest.mark.parametrize("static", [True, False])
def test_attention_map_sweeps(nb_model, static):
    w = T.AttentionMapWidget(static=static)
    mp = w.maps
    H = len(T.head_options(mp))
    for head, _ in sweep(w, "head"):
        vis = [bool(w.fig.data[i].visible) for i in range(3 * H)]
        for k in range(3):                                               # one visible map per kind: this head's
            assert vis[k * H:(k + 1) * H] == [h == head for h in T.head_options(mp)]
    for q, _ in sweep(w, "query", list(range(0, mp.S, 9)) + [mp.S - 1]):
        for k, kind in enumerate(T.KINDS):
            row = [v for v in w.fig.data[3 * H + k].y if v is not None]
            want = mp.rows[kind, w.state["head"]][q, :q + 1]
            assert torch.allclose(torch.tensor(row), want, atol=1e-4)
            assert list(w.fig.data[3 * H + 3 + k].y) == [q, q]
        assert f"query {q} " in w.fig.layout.title.text
    with pytest.raises(ValueError, match="head = 7"):
        w.on_head(7)


@pytest.mark.parametrize("static", [True, False])
def test_mtp_sweep_matches_an_independent_forward(nb_model, static):
    model, tok, _ = nb_model
    w = T.MTPWidget(static=static)
    ids = trained.encode(tok, T.DEFAULT_TEXT, moe_viz.MAX_TOKENS)
    with torch.no_grad():
        logits, mtp = model(ids, return_mtp=True)
    S = ids.shape[1]
    assert w.run.n == S - 2
    for t, _ in sweep(w, "position", None if static else list(range(0, S - 2, 11))):
        for tr, lg, target in ((w.fig.data[0], logits[0, t], ids[0, t + 1]), (w.fig.data[1], mtp[0, t], ids[0, t + 2])):
            p, i = lg.float().softmax(-1).topk(T.TOP)
            assert list(tr.y) == pytest.approx(p.tolist(), abs=1e-4)
            greens = [c == "#2ca02c" for c in tr.marker.color]
            assert greens == [j == int(target) for j in i.tolist()]


def test_generate_text_is_model_generate(nb_model):
    model, tok, _ = nb_model
    text = T.generate_text("def f", max_new_tokens=6)
    ids = trained.encode(tok, "def f")
    want = model.generate(ids, 6)
    assert text == tok.decode(want[0].tolist(), skip_special_tokens=False) and text.startswith("def f")
    assert T.generate_text("def f", 6, temperature=1.0, seed=3) == T.generate_text("def f", 6, temperature=1.0, seed=3)
    assert "parameters:" in T.model_summary(model) and "hca" in T.model_summary(model)


def test_static_builders_match_widgets(nb_model):
    assert (T.build_mtp(position=3).to_plotly_json()["data"]
            == T.MTPWidget(static=True, position=3).fig.to_plotly_json()["data"])
    assert (T.build_routing(position=5).to_plotly_json()["data"]
            == T.RoutingWidget(static=True, position=5).fig.to_plotly_json()["data"])
    assert (T.build_attention_maps(query=40).to_plotly_json()["data"]
            == T.AttentionMapWidget(static=True, query=40).fig.to_plotly_json()["data"])
