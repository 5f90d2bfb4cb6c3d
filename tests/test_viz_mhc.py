"""Notebook 03's figures: every callback swept, the figure checked against v4lab.mhc and the experiment."""
import pytest
import torch

from v4lab import mhc
from v4lab.experiments import mhc_stability
from v4lab.viz import mhc as V
from v4lab.viz.common import sweep


@pytest.fixture(scope="module")
def tiny_result():
    """A very small training run (the cached default one is checked separately)."""
    return V.training_result(n_sublayers=6, d=8, hidden=8, steps=2, batch=8)   # keywords: runs, not stored


@pytest.mark.parametrize("static", [True, False])
def test_iters_sweep_shows_the_official_sinkhorn(static):
    w = V.SinkhornWidget(static=static)
    hc_before = [list(r) for r in w.fig.data[0].z]
    curves_before = (list(w.fig.data[2].y), list(w.fig.data[3].y))
    logits = V.base_logits()
    titles = set()
    for t, _ in sweep(w, "iters"):
        want = mhc.sinkhorn(logits, t, V.HC_EPS)
        got = torch.tensor([list(r) for r in w.fig.data[1].z], dtype=torch.float64)
        assert torch.allclose(got, want, atol=1e-12), t
        err = mhc.sinkhorn_errors(logits, t, V.HC_EPS)
        assert list(w.fig.data[4].x) == [t, t]
        assert w.fig.data[4].y[0] == pytest.approx(max(err["row_err"][-1], V.ERR_FLOOR))
        assert w.fig.data[4].y[1] == pytest.approx(max(err["col_err"][-1], V.ERR_FLOOR))
        titles.add(w.fig.layout.title.text)
    assert len(titles) == len(V.ITER_STOPS)
    # the HC matrix and the error curves do not depend on the iteration count
    assert [list(r) for r in w.fig.data[0].z] == hc_before
    assert (list(w.fig.data[2].y), list(w.fig.data[3].y)) == curves_before
    # at 20 iterations the columns of comb (rows of H^res) sum to 1 within ~eps, rows within 1e-5
    c = torch.tensor([list(r) for r in w.fig.data[1].z])
    assert (c.sum(0) - 1).abs().max() < 1e-5 and (c.sum(1) - 1).abs().max() < 1e-5 and (c >= 0).all()


def test_logit_scale_sweep_changes_both_matrices():
    w = V.SinkhornWidget(static=True, iters=3)
    seen_hc, seen_err = [], []
    for s, _ in sweep(w, "logit_scale"):
        hc = torch.tensor([list(r) for r in w.fig.data[0].z], dtype=torch.float64)
        assert torch.allclose(hc, torch.eye(4, dtype=torch.float64) + s * V.base_logits())
        seen_hc.append(hc)
        seen_err.append(list(w.fig.data[2].y))
    assert len({tuple(e) for e in seen_err}) == len(V.SCALE_STOPS)
    # sharper logits converge more slowly: the row error after 20 iterations grows with the scale
    final = [e[-1] for e in seen_err]
    assert final == sorted(final) and final[-1] > 100 * final[0]


def test_surrogate_gains_follow_the_experiment():
    w = V.GainsWidget(static=True, result={"config": {}})  # the surrogate needs no training result
    peaks = []
    for noise, _ in sweep(w, "noise"):
        s = mhc_stability.random_surrogate(60, 0, noise=noise)
        hc_fwd, mhc_fwd = w.fig.data[3], w.fig.data[6]
        assert list(hc_fwd.y) == s["hc"]["fwd_max"] and list(mhc_fwd.y) == s["mhc"]["fwd_max"]
        assert set(w.fig.data[0].y) == {1.0}                                    # residual: exactly 1
        peaks.append(max(s["hc"]["amax"]))
        assert 0.9 <= min(min(mhc_fwd.y), min(w.fig.data[8].y)) and max(w.fig.data[7].y) <= 1.1
    assert peaks[-1] > peaks[0] and peaks[-1] > 2                                # HC drifts with the noise


def test_source_sweep_uses_the_training_run(tiny_result):
    w = V.GainsWidget(static=True, result=tiny_result)
    for src, _ in sweep(w, "source"):
        for i, v in enumerate(V.VARIANTS):
            if src != "surrogate":
                want = tiny_result[v]["gains"][src]["fwd_max"]
            elif v == "residual":
                want = [1.0] * 60
            else:
                want = mhc_stability.random_surrogate(60, 0, noise=0.15)[v]["fwd_max"]
            assert list(w.fig.data[3 * i].y) == pytest.approx(want)
        assert V.SOURCES[src] in w.fig.layout.title.text


def test_cached_training_run_is_a_rerunnable_experiment_result():
    r = V.training_result()
    import inspect
    sig = inspect.signature(mhc_stability.run)
    assert set(r["config"]) <= set(sig.parameters)        # training_result(**config) reruns exactly this
    # the stored run shows the claim the notebook makes: HC's gain leaves 1, mHC's does not
    assert max(r["hc"]["gains"]["final"]["amax"]) > 2
    assert max(r["mhc"]["gains"]["final"]["amax"]) < 1.1
    assert "mHC" in V.training_table(r) and len(V.build_training(r).data) == 6


def test_bad_values_name_the_control():
    with pytest.raises(ValueError, match="iters = 0"):
        V.SinkhornWidget(static=True, iters=0)
    w = V.SinkhornWidget(static=True)
    with pytest.raises(ValueError, match="logit_scale = 3"):
        w.on_logit_scale(3)
    g = V.GainsWidget(static=True, result={"config": {}})
    with pytest.raises(ValueError, match="source = 'x'"):
        g.on_source("x")


def test_static_builders_match_widgets(tiny_result):
    assert (V.build_sinkhorn(5, 2.0).to_plotly_json()["data"]
            == V.SinkhornWidget(static=True, iters=5, logit_scale=2.0).fig.to_plotly_json()["data"])
    assert (V.build_gains("final", 0.15, tiny_result).to_plotly_json()["data"]
            == V.GainsWidget(static=True, result=tiny_result, source="final").fig.to_plotly_json()["data"])


# ------------------------------------------------------------------ the trained model's mHC
from pathlib import Path  # noqa: E402

from v4lab.viz import check, trained  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / "data"
TINY, LAB = DATA / "tiny-v4", DATA / "lab-v4"


@pytest.fixture(scope="module")
def tiny_mhc():
    torch.set_num_threads(1)
    model, tok, _ = trained.load_dir(TINY)
    return model, tok, V.ModelMHC(V.model_combs(model, tok))


def test_model_combs_are_what_the_forward_used(tiny_mhc):
    """Each block's output is hc_post(ffn out, hc_post(attn out, X, post_a, comb_a), post_f, comb_f) with the
    captured matrices: a comb computed on the wrong streams (e.g. the MoE site on the block input) fails."""
    model, tok, mm = tiny_mhc
    ids = trained.encode(tok, trained.SAMPLE_TEXTS[V.MODEL_TEXT_KEY], V.MODEL_TOKENS)
    seen = {}
    hooks = []
    for b in model.layers:
        hooks.append(b.register_forward_pre_hook(lambda m, a: seen.__setitem__(("in", m.layer_id), a[0])))
        hooks.append(b.register_forward_hook(lambda m, a, o: seen.__setitem__(("out", m.layer_id), o)))
        hooks.append(b.attn.register_forward_hook(lambda m, a, o, i=b.layer_id: seen.__setitem__(("attn", i), o)))
        hooks.append(b.ffn.register_forward_hook(lambda m, a, o, i=b.layer_id: seen.__setitem__(("ffn", i), o)))
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    c = mm.c
    for b in model.layers:
        l = b.layer_id
        ka, kf = c["sites"].index((l, "attn")), c["sites"].index((l, "ffn"))
        f = lambda t: t[None].float()                                   # noqa: E731
        mid = mhc.hc_post(seen["attn", l], seen["in", l], f(c["post"][ka]), f(c["combs"][ka]))
        out = mhc.hc_post(seen["ffn", l], mid, f(c["post"][kf]), f(c["combs"][kf]))
        assert torch.allclose(out, seen["out", l], atol=1e-4, rtol=1e-4), l
        for k in (ka, kf):                                                # mHC: columns of comb sum to 1
            assert torch.allclose(c["combs"][k].sum(-2), torch.ones(1, dtype=torch.float64), atol=1e-5)
        base = b.hc_attn_base[2 * V.N:].double().view(V.N, V.N)
        assert torch.allclose(c["static"][ka], mhc.sinkhorn(base, model.cfg.hc_sinkhorn_iters, model.cfg.hc_eps))
    assert len(c["combs"][0]) == len(c["tokens"]) == mm.T


def _flat(z):
    return [v for row in z for v in row]


@pytest.mark.parametrize("static", [True, False])
def test_model_mhc_widget_sweeps(tiny_mhc, static):
    _, _, mm = tiny_mhc
    w = V.ModelMHCWidget(static=static, mm=mm)
    for site, _ in sweep(w, "site"):
        for layer, _ in sweep(w, "layer"):
            for pos, _ in sweep(w, "position", [0, 5, mm.T - 1]):
                k = mm.site_index(layer, site)
                st, tok, comp, smax, tmax, tmin, mmax, hc, res, mark = w.fig.data
                assert _flat(st.z) == pytest.approx(mm.c["static"][k].flatten().tolist(), abs=1e-4)
                assert _flat(tok.z) == pytest.approx(mm.c["combs"][k][pos].flatten().tolist(), abs=1e-4)
                P = torch.eye(V.N, dtype=torch.float64)
                for c in mm.c["combs"][:k + 1]:
                    P = c[pos].T @ P
                assert _flat(comp.z) == pytest.approx(P.T.flatten().tolist(), abs=1e-4)
                g = mhc.composite_gains(torch.stack([mhc.h_res(c[pos]) for c in mm.c["combs"]]))
                assert list(tmax.y) == pytest.approx([max(a, b) for a, b in zip(g["fwd_max"], g["bwd_max"])])
                assert list(mark.x) == [k + 1] and list(res.y) == [1.0] * len(mm.c["sites"])
                assert max(tmax.y) < 1.01 and min(tmin.y) > 0.5                 # mHC keeps the gain near 1
                assert check.check_figure(w.fig) == [], (site, layer, pos)
    for pos, _ in sweep(w, "position"):                                 # every position renders
        assert w.state["position"] == pos
    with pytest.raises(ValueError, match="position = -1"):
        w.on_position(-1)


@pytest.mark.slow
def test_lab_model_mhc_figure():
    if not (LAB / "config.json").is_file():
        pytest.skip("data/lab-v4 is not there (the lab model ships separately; see data/README.md)")
    torch.set_num_threads(1)
    model, tok, _ = trained.load_dir(LAB)
    mm = V.ModelMHC(V.model_combs(model, tok))
    assert len(mm.c["sites"]) == 2 * model.cfg.num_hidden_layers
    w = V.ModelMHCWidget(static=True, mm=mm)
    for c in w.control_names:
        for v in w.sweep_values(c)[:12]:
            getattr(w, f"on_{c}")(v)
            assert check.check_figure(w.fig) == [], (c, v)
