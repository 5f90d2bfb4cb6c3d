"""Notebook 04's figures: the pre-activation histograms and the limit sweep checked against the model's own
experts (the output change recomputed with the naive reference dispatch), the clamp on/off context, and the
stored stability experiment against the experiment's defaults."""
import inspect

import pytest
import torch
import torch.nn.functional as F

from v4lab import moe
from v4lab.experiments import swiglu_clamp
from v4lab.model import V4Model
from v4lab.train import micro_config
from v4lab.viz import clamp as C
from v4lab.viz import trained
from v4lab.viz.common import sweep

TEXTS = ("def f(x):\n    return x * 2\n", "The quick brown fox jumps over the lazy dog. " * 3)


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    model = V4Model(micro_config()).eval()
    with torch.no_grad():                         # larger expert weights: values on both sides of small limits
        for b in model.layers:
            for e in b.ffn.experts:
                e.w1.weight.mul_(60)
                e.w3.weight.mul_(60)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, trained.byte_tokenizer(), {"source": "synthetic", "synthetic": True, "description": "test"}


@pytest.fixture(scope="module")
def pre(small_model):
    model, tok, _ = small_model
    return C.Preacts(C.collect(TEXTS, model, tok), model)


def test_collect_sees_every_routed_expert_input(small_model, pre):
    model, tok, _ = small_model
    acts = pre.acts
    K, I = model.cfg.num_experts_per_tok, model.cfg.moe_intermediate_size
    assert acts["tokens"] == sum(len(tok.encode(t).ids) for t in TEXTS)
    for l in acts["layers"]:
        x, idx = acts["x"][l], acts["idx"][l]
        assert x.shape[0] == acts["tokens"] and idx.shape == (acts["tokens"], K)
        assert acts["gate"][l].numel() == acts["up"][l].numel() == acts["tokens"] * K * I
        # the largest gate value equals the max of W1_e x over the tokens routed to e, computed directly
        m = model.layers[l].ffn
        want = max(float(F.linear(x[(idx == e).any(-1)], m.experts[e].w1.weight).max())
                   for e in range(len(m.experts)) if (idx == e).any())
        assert float(acts["gate"][l].max()) == pytest.approx(want, rel=1e-6)
    assert C.peak(acts) > 1.0                                   # small limits below do cut values


@pytest.mark.parametrize("static", [True, False])
def test_limit_sweep_matches_the_reference_dispatch(small_model, pre, static):
    model, _, _ = small_model
    layer = pre.layers[-1]
    w = C.PreactWidget(static=static, pre=pre, layer=layer)
    m = model.layers[layer].ffn
    ws = ([e.w1.weight for e in m.experts], [e.w2.weight for e in m.experts], [e.w3.weight for e in m.experts])
    x, idx, wt = pre.acts["x"][layer], pre.acts["idx"][layer], pre.acts["weights"][layer]
    y_off = moe.moe_naive(x, idx, wt, *ws, 0.0)
    g, u = pre.acts["gate"][layer], pre.acts["up"][layer]
    changes = []
    for L, _ in sweep(w, "limit"):
        want_change = float((moe.moe_naive(x, idx, wt, *ws, L) - y_off).norm() / y_off.norm())
        marks = list(w.fig.data[5].y)
        assert marks[0] == pytest.approx(100 * float((g > L).float().mean()))          # gate: above only
        assert marks[1] == pytest.approx(100 * float((u.abs() > L).float().mean()))    # up: both sides
        assert marks[2] == pytest.approx(100 * want_change, rel=1e-4, abs=1e-6)
        assert list(w.fig.data[5].x) == [L] * 3
        # histogram bars are red exactly beyond the limit (gate: right of L; up: outside ±L)
        cg = [c == C.CLIP_COLOR for c in w.fig.data[0].marker.color]
        cu = [c == C.CLIP_COLOR for c in w.fig.data[1].marker.color]
        assert cg == [x_ > L for x_ in w.fig.data[0].x] and cu == [abs(x_) > L for x_ in w.fig.data[1].x]
        assert [s.x0 for s in w.fig.layout.shapes] == [L, L, -L]
        changes.append(want_change)
    assert changes[0] > 0.1 and changes == sorted(changes, reverse=True)    # tighter limits change more
    assert changes[-1] == 0.0 or C.LIMIT_STOPS[-1] < C.peak(pre.acts)


def test_layer_sweep_histograms_hold_every_value(pre):
    w = C.PreactWidget(static=True, pre=pre)
    titles = set()
    for layer, _ in sweep(w, "layer"):
        assert sum(w.fig.data[0].y) == pre.acts["gate"][layer].numel()
        assert sum(w.fig.data[1].y) == pre.acts["up"][layer].numel()
        assert list(w.fig.data[4].y) == pytest.approx([100 * v for v in pre.effects[layer]["output_change"]])
        titles.add(w.fig.layout.title.text)
    assert len(titles) == len(pre.layers)
    with pytest.raises(ValueError, match="limit = 4"):
        w.on_limit(4.0)
    with pytest.raises(ValueError, match="layer = 9"):
        w.on_layer(9)


def test_swiglu_limit_context_switches_the_clamp_and_restores(small_model):
    model, tok, _ = small_model
    ids = trained.encode(tok, TEXTS[1])
    before = [(b.ffn.limit, [e.limit for e in b.ffn.experts], b.ffn.shared_experts.limit) for b in model.layers]
    with torch.no_grad():
        ref = model(ids)
        with C.swiglu_limit(model, 1e6):                      # a limit nothing reaches == no clamp
            far = model(ids)
        with C.swiglu_limit(model, 0.0):
            off = model(ids)
        with C.swiglu_limit(model, 0.5):
            tight = model(ids)
    assert torch.equal(far, off) and not torch.equal(tight, off) and not torch.equal(ref, off)
    assert before == [(b.ffn.limit, [e.limit for e in b.ffn.experts], b.ffn.shared_experts.limit) for b in model.layers]


def test_stored_experiment_is_the_default_run():
    r = C.experiment_result()
    sig = inspect.signature(swiglu_clamp.run)
    for k, v in r["config"].items():
        assert sig.parameters[k].default == v, k
    assert len(r["step"]) == r["config"]["steps"] == len(r["clamp"]["lm_loss"]) == len(r["no_clamp"]["lm_loss"])
    assert r["clamp"]["limit"] == 10.0 and r["no_clamp"]["limit"] == 0.0
    assert "no clamp" in C.experiment_table(r)


@pytest.mark.parametrize("static", [True, False])
def test_experiment_metric_sweep(static):
    r = C.experiment_result()
    w = C.ExperimentWidget(static=static, result=r)
    for metric, _ in sweep(w, "metric"):
        assert list(w.fig.data[0].y) == r["clamp"][metric] and list(w.fig.data[1].y) == r["no_clamp"][metric]
        lim = list(w.fig.data[2].y) if w.fig.data[2].y is not None else []
        assert lim == ([10.0, 10.0] if metric == "preact_max" else [])
        assert w.fig.layout.yaxis.type == ("linear" if metric == "lm_loss" else "log")
    with pytest.raises(ValueError, match="metric = 'x'"):
        w.on_metric("x")


def test_static_builders_match_widgets(pre):
    assert (C.figure_from(C.preact_data(pre, pre.layers[0], 2.0), C.preact_layout(pre)).to_plotly_json()["data"]
            == C.PreactWidget(static=True, pre=pre, layer=pre.layers[0], limit=2.0).fig.to_plotly_json()["data"])
    assert (C.build_experiment(metric="moe_max").to_plotly_json()["data"]
            == C.ExperimentWidget(static=True, metric="moe_max").fig.to_plotly_json()["data"])


# ------------------------------------------------------------------ every layer at once
import copy  # noqa: E402
import math  # noqa: E402
from pathlib import Path  # noqa: E402

from v4lab.viz import check  # noqa: E402

LAB = Path(__file__).resolve().parents[1] / "data" / "lab-v4"


@pytest.mark.parametrize("static", [True, False])
def test_overview_counts_what_the_clamp_touches(pre, static):
    w = C.OverviewWidget(static=static, pre=pre)
    L = pre.acts["limit"]
    assert L > 0
    for branch, _ in sweep(w, "branch"):
        heat, peaks, bars = w.fig.data
        for row, l in enumerate(pre.layers):
            v = pre.acts[branch][l]
            hit = (v > L) if branch == "gate" else (v.abs() > L)         # gate: clamped above only; up: both sides
            assert bars.x[row] == pytest.approx(100 * float(hit.float().mean()))
            assert peaks.x[row] == pytest.approx(float(v.max() if branch == "gate" else v.abs().max()))
            # the heatmap holds every value: 10^z summed back over the bins
            assert sum(10 ** z for z in heat.z[row] if z is not None and z == z) == pytest.approx(v.numel(), rel=1e-2)
        xs = sorted(s.x0 for s in w.fig.layout.shapes if s.type == "line")
        assert xs == ([L] if branch == "gate" else [-L, L])
        assert w.fig.layout.xaxis.range[1] >= 1.2 * L                 # the limit is always in the picture
        assert sum(bars.x) > 0 and not w.fig.layout.annotations
        assert check.check_figure(w.fig) == [], branch


def test_overview_says_when_nothing_is_clipped(pre):
    calm = copy.copy(pre)
    calm._overview = {}
    calm.acts = dict(pre.acts, limit=10 * C.peak(pre.acts))
    d = C.overview_data(calm, "up")
    assert sum(d["traces"][2]["x"]) == 0
    assert "changes nothing" in d["layout"]["annotations"][0]["text"]
    assert d["layout"]["xaxis"]["range"][1] >= 1.2 * calm.acts["limit"]
    assert check.check_figure(C.figure_from(d, C.OVERVIEW_LAYOUT)) == []
    with pytest.raises(ValueError, match="branch = 'down'"):
        C.overview_data(pre, "down")


@pytest.mark.slow
def test_lab_model_clamp_figures():
    if not (LAB / "config.json").is_file():
        pytest.skip("data/lab-v4 is not there (the lab model ships separately; see data/README.md)")
    torch.set_num_threads(1)
    model, tok, _ = trained.load_dir(LAB)
    p = C.Preacts(C.collect(C.TEXTS[:1], model, tok), model)
    assert p.acts["limit"] == C.V4_LIMIT and math.isfinite(C.peak(p.acts))
    for W in (C.OverviewWidget, C.PreactWidget):
        w = W(static=True, pre=p)
        for c in w.control_names:
            for v in w.sweep_values(c):
                getattr(w, f"on_{c}")(v)
                assert check.check_figure(w.fig) == [], (W.name, c, v)
