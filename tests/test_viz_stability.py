"""Notebook 06's figures: the bias-update simulation against the sign rule, the AR widget swept over metric
and iteration (on a hand-made result with detector events and on the stored run), the overhead bars,
the training-log loads, and the stored experiment against the experiment's defaults."""
import inspect
import json

import pytest
import torch

from v4lab.experiments import anticipatory
from v4lab.viz import stability as S
from v4lab.viz.common import sweep


def fake_result():
    """Three variants over 8 iterations; the detector variant rolls back once (iterations > steps)."""
    it = list(range(8))
    base = {"iter": it, "step": it, "loss": [5.0, 4.8, 4.6, 7.0, 4.5, 4.4, 4.3, 4.2],
            "churn": [0.1, 0.1, 0.05, 0.9, 0.2, 0.1, 0.05, 0.05], "max_moe": [1, 1, 1, 9, 2, 1, 1, 1],
            "ar_on": [False] * 8, "events": [], "seconds_per_step": 1.0, "post_spike_loss": 4.4, "peak_loss": 7.0}
    always = dict(base, loss=[5.0, 4.8, 4.6, 6.0, 4.5, 4.4, 4.3, 4.2], ar_on=[True] * 8, seconds_per_step=1.3)
    spike = dict(base, step=[0, 1, 2, 3, 1, 2, 3, 4], ar_on=[False, False, False, False, True, True, True, False],
                 events=[[3, "spike: rollback 3 -> 1, AR on"], [7, "AR off"]], seconds_per_step=1.1)
    return {"config": {"seed": 0, "steps": 5, "lr": 1e-3, "spike_at": 3, "spike_lr_mult": 30.0, "ar_lag": 2,
                       "ar_duration": 3, "spike_ratio": 1.3, "batch_size": 2, "seq_len": 8},
            "off": base, "always": always, "spike": spike, "overhead": {"off": 0.0, "always": 0.3, "spike": 0.1}}


def test_bias_simulation_follows_the_sign_rule():
    for gamma in (0.0, 0.001, 0.01):
        r = S.simulate_bias(gamma, 1.0)
        b = torch.tensor(r["bias"]).T                                  # [steps, E]
        steps = torch.cat([b[:1], b.diff(dim=0)])
        # every step moves every bias by exactly -γ, 0 or +γ, and the moves sum to ≤ 0 ... ≥ 0 per sign
        assert torch.all(torch.isclose(steps.abs(), torch.tensor(gamma), atol=1e-7) | (steps.abs() < 1e-9))
    none, v4 = S.simulate_bias(0.0, 1.0), S.simulate_bias(S.V4_GAMMA, 1.0)
    assert none["imbalance"][0] == v4["imbalance"][0]                 # same tokens, same start
    last = lambda r: sum(r["imbalance"][-50:]) / 50                   # noqa: E731
    assert last(none) > 1.8 and last(v4) < 1.35                        # the bias balances the load
    # the most preferred expert (last) ends with the lowest bias, the least preferred with the highest
    assert v4["bias"][-1][-1] < 0 < v4["bias"][0][-1]


@pytest.mark.parametrize("static", [True, False])
def test_bias_widget_sweeps(static):
    w = S.BiasWidget(static=static)
    titles = set()
    for g, _ in sweep(w, "gamma"):
        r = S.simulate_bias(g, w.state["skew"])
        assert list(w.fig.data[2].y) == r["imbalance"]
        for e in range(S.SIM_EXPERTS):
            assert list(w.fig.data[3 + e].y) == r["bias"][e]
        assert list(w.fig.data[0].y) == S.simulate_bias(0.0, w.state["skew"])["imbalance"]
        titles.add(w.fig.layout.title.text)
    assert len(titles) == len(S.GAMMA_STOPS)
    starts = []
    for s, _ in sweep(w, "skew"):
        starts.append(w.fig.data[0].y[0])
        assert list(w.fig.data[1].y) == S.simulate_bias(S.V4_GAMMA, s)["imbalance"]
    assert starts == sorted(starts) and starts[0] < starts[-1]        # more skew, more imbalance
    with pytest.raises(ValueError, match="gamma = 0.5"):
        w.on_gamma(0.5)


@pytest.mark.parametrize("static", [True, False])
def test_ar_widget_sweeps(static):
    r = fake_result()
    w = S.ARWidget(static=static, result=r)
    assert w.state["iteration"] == 3                                   # default cursor: the spike step
    for metric, _ in sweep(w, "metric"):
        for i, v in enumerate(S.VARIANTS):
            assert list(w.fig.data[i].y) == r[v][metric] and list(w.fig.data[i].x) == r[v]["iter"]
        assert list(w.fig.data[3].x) == [3, 7]                          # the detector's events
        assert list(w.fig.data[3].y) == [r["spike"][metric][3], r["spike"][metric][7]]
        assert list(w.fig.data[4].x) == [4, 5, 6]                       # AR on (detector variant)
    w.on_metric("loss")
    for it, _ in sweep(w, "iteration"):
        assert list(w.fig.data[5].x) == [it] * 3
        assert list(w.fig.data[5].y) == [r[v]["loss"][it] for v in S.VARIANTS]
        # "(AR on)": the always-on variant at every iteration, the detector variant where it switched AR on
        assert w.fig.layout.title.text.count("(AR on)") == 1 + (it in (4, 5, 6))
        assert f"iteration {it}:" in w.fig.layout.title.text
    with pytest.raises(ValueError, match="iteration = 8"):
        w.on_iteration(8)


def test_ar_table_and_overhead():
    r = fake_result()
    t = S.ar_table(r)
    assert "it 3: spike: rollback 3 -> 1, AR on" in t and "+30%" not in t and "30%" in t
    f = S.build_overhead(r)
    assert list(f.data[0].y) == [1.0, 1.3, 1.1] and list(f.data[0].text) == ["+0%", "+30%", "+10%"]
    assert list(f.data[1].y) == [1.2, 1.2]


def test_stored_ar_run_is_the_default_run():
    r = S.ar_result()
    sig = inspect.signature(anticipatory.run)
    for k, v in r["config"].items():
        assert sig.parameters[k].default == v, k
    for v in S.ar_variants(r):
        assert len(r[v]["loss"]) == len(r[v]["churn"]) == len(r[v]["ar_on"]) >= r["config"]["steps"]
    assert all(r["always"]["ar_on"]) and not any(r["off"]["ar_on"])
    w = S.ARWidget(static=True, result=r)
    for it, _ in sweep(w, "iteration", [0, S.n_iters(r) - 1]):
        assert list(w.fig.data[5].x) == [it] * 3


def test_training_loads_from_a_log(tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"num_hidden_layers": 2}))
    recs = [{"iter": 0, "load": [[4, 4, 4, 4], [10, 2, 2, 2], [6, 2, 4, 4]], "learned_layers": [1, 2]},
            {"iter": 1, "load": [[4, 4, 4, 4], [5, 3, 4, 4], [4, 4, 4, 4]], "learned_layers": [1, 2]}]
    (d / "train_log.jsonl").write_text("\n".join(json.dumps(x) for x in recs) + "\n")
    loads = S.training_loads(d / "train_log.jsonl")
    assert loads["step"] == [0, 1]
    assert [L["learned"] for L in loads["layers"]] == [False, True, True]
    assert [L["mtp"] for L in loads["layers"]] == [False, False, True]
    assert loads["layers"][1]["imbalance"] == pytest.approx([10 / 4, 5 / 4])
    f = S.build_training_loads(loads)
    assert [t.name for t in f.data] == ["layer 0 (hash)", "layer 1 (learned)", "MTP block"]
    assert len(S.build_training_loads({"step": [], "layers": []}).data) == 0
    assert S.training_loads(tmp_path / "missing.jsonl") is None
