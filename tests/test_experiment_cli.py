"""`v4lab experiment NAME`: the result object's shape, determinism, bad input, and the effect's sign on
settings small enough for the suite (subfp4 here; the others in their own tests below)."""
import io
import json
import re

import pytest

from v4lab import cli
from v4lab.data import load_data
from v4lab.experiments import runner, subfp4

SMALL_AR = dict(steps=8, spike_at=4, ar_lag=4, ar_duration=3, batch_size=2, seq_len=32)
TINY_SUBFP4 = dict(formats=("e2m1", "e1m1", "e2m0", "ternary"), blocks=(32,), scopes=("experts",),
                   qat_steps=0, qat_formats=(), eval_windows=8, seq_len=128)


@pytest.fixture(scope="module")
def data():
    return load_data(512)


@pytest.mark.parametrize("argv,needle", [
    (["experiment", "nope"], "invalid choice: 'nope'"),
    (["experiment", "clamp", "--fast"], "unrecognized arguments: --fast"),
    (["experiment"], "required: name"),
    (["experiment", "subfp4", "--device", "tpu"], "device"),
])
def test_bad_name_or_flag_is_one_line_and_exit_2(argv, needle, capsys):
    assert cli.main(argv) == 2 if argv[-2:] == ["--device", "tpu"] else _exits_2(argv)
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1


def _exits_2(argv):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    return e.value.code == 2


def test_run_experiment_rejects_unknown_name():
    with pytest.raises(ValueError, match="NAME = 'x'"):
        runner.run_experiment("x")


def test_subfp4_three_bits_cost_loss_and_ternary_costs_more(data):
    r = subfp4.experiment(quick=True, data=data, **TINY_SUBFP4)
    assert r["metric"] == "heldout_loss" and r["effect"] > 0
    assert r["effect"] == pytest.approx(r["treatment"]["heldout_loss"] - r["baseline"]["heldout_loss"])
    rows = {x["fmt"]: x for x in r["details"]["ptq"]}
    assert rows["ternary"]["loss"] > max(rows["e1m1"]["loss"], rows["e2m0"]["loss"]) > rows["e2m1"]["loss"]
    # the released experts are already MXFP4: rounding them to E2M1 again changes nothing
    assert rows["e2m1"]["loss"] == pytest.approx(r["details"]["bf16"], abs=1e-6)
    assert rows["e2m1"]["bytes_per_param"] == 4.25 / 8 and rows["ternary"]["bits"] == 2.25


def test_subfp4_short_qat_recovers_ternary_and_the_control_is_separate(data):
    r = subfp4.run(formats=("ternary",), blocks=(32,), scopes=(), qat_steps=3, qat_formats=("none", "ternary"),
                   eval_windows=2, seq_len=64, batch_size=2, data=data)
    q = {x["fmt"]: x for x in r["qat"]}
    assert q["ternary"]["loss_after"] < q["ternary"]["loss_before"] - 0.1         # QAT at 2 bits pays off
    assert abs(q["none"]["loss_after"] - q["none"]["loss_before"]) < 0.1         # the fine-tune alone does not


def test_cli_json_object_is_complete_and_deterministic(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(subfp4, "QUICK", dict(TINY_SUBFP4, formats=("e2m1", "e2m0")))
    out = tmp_path / "r.json"
    assert cli.main(["experiment", "subfp4", "--quick", "--json", "--out", str(out)]) == 0
    res = json.loads(capsys.readouterr().out)
    for k in ("name", "metric", "baseline", "treatment", "effect", "settings", "quick", "command"):
        assert k in res
    assert res["metric"] in res["baseline"] and res["metric"] in res["treatment"]
    assert res["command"] == f"v4lab experiment subfp4 --quick --json --out {out}" and res["quick"] is True
    assert json.loads(out.read_text()) == res
    assert cli.main(["experiment", "subfp4", "--quick"]) == 0            # summary line; same numbers again
    line = capsys.readouterr().out
    assert line.startswith("subfp4 (quick): heldout_loss") and f"{res['effect']:+.4g}" in line


# the quick run's schedule (100 steps), stopped after 20 (stop_step): no clamp dies near step 15
CLAMP_SMALL = dict(stop_step=20, seeds=(0,), eval_windows=4, fp32_check=False)


def test_clamp_keeps_the_provoked_run_alive_where_no_clamp_diverges(data):
    """The quick regime stopped after 20 steps (no clamp dies near step 15): the clamp-off run's h outgrows the
    FP8 range and turns NaN, the clamped runs finish; the effect is the held-out loss the clamp saves."""
    from v4lab.experiments import swiglu_clamp
    r = swiglu_clamp.experiment(quick=True, data=data, **CLAMP_SMALL)
    base, treat, tight = r["baseline"], r["treatment"], r["details"]["runs"]["clamp 1"]
    assert base["label"] == "no clamp" and treat["label"] == "clamp 10"
    assert base["diverged_at"] is not None and treat["diverged_at"] is None and tight["diverged_at"] is None
    assert base["scored_loss"] == r["settings"]["loss_cap"] > treat["scored_loss"] == treat["heldout_loss"]
    assert r["effect"] == pytest.approx(base["scored_loss"] - treat["scored_loss"]) and r["effect"] > 0.5
    assert max(base["preact_max"]) > 21.2          # SiLU(g)·u passes 464 only once g, u pass ~21.2
    assert max(tight["moe_max"]) < max(treat["moe_max"])
    # same seed and data: identical until the first forward whose pre-activations pass 10, different from it on
    first = next(i for i, p in enumerate(treat["preact_max"]) if p > 10)
    assert first >= 2 and base["loss"][:first] == treat["loss"][:first] and base["loss"][first] != treat["loss"][first]


def test_clamp_experiment_without_the_fp8_cast_does_not_diverge(data):
    """Control: the same fast experts in fp32 (expert_h_fp8 = 0) reach the same pre-activations but no run
    diverges: the NaN of the baseline comes from h leaving the FP8 range, not from another route."""
    from v4lab.experiments import swiglu_clamp
    r = swiglu_clamp.experiment(quick=True, data=data, limits=(0.0, 10.0), expert_h_fp8=0.0, **CLAMP_SMALL)
    assert max(r["baseline"]["preact_max"]) > 21.2
    assert r["baseline"]["diverged_at"] is None and r["treatment"]["diverged_at"] is None
    assert abs(r["effect"]) < 0.05


def test_clamp_experiment_shows_nothing_without_the_provocation(data):
    """Control: with the experts at the model's own learning rate the pre-activations stay below 10, the
    clamp never binds and both runs are the same run: effect exactly 0."""
    from v4lab.experiments import swiglu_clamp
    r = swiglu_clamp.experiment(quick=True, data=data, limits=(0.0, 10.0), **{**CLAMP_SMALL, "stop_step": 8},
                                expert_lr_mult=1.0)
    assert max(r["treatment"]["preact_max"]) < 10 and r["baseline"]["diverged_at"] is None
    assert r["baseline"]["loss"] == r["treatment"]["loss"] and r["effect"] == 0.0


def test_mhc_keeps_the_composite_gain_at_one_where_hc_drifts():
    from v4lab.experiments import mhc_stability
    r = mhc_stability.experiment(quick=True, steps=4, n_sublayers=20)
    assert r["effect"] > 0 and r["baseline"]["peak_gain"] > 1.05
    assert r["treatment"]["peak_gain"] == pytest.approx(1.0, abs=1e-3)
    assert len(r["baseline"]["gain_by_depth"]) == 20 and len(r["treatment"]["loss"]) == 4


def test_ar_grid_switches_rollback_and_ar_separately_and_ar_alone_helps(data):
    # the regime of the stored run (a router spike on the trained tiny-v4), smaller: AR alone lowers the loss
    from v4lab.experiments import anticipatory
    r = anticipatory.experiment(quick=True, data=data, **SMALL_AR)
    c, s = r["details"]["cells"], r["settings"]
    assert not any(c["neither"]["ar_on"]) and not c["neither"]["events"]
    assert not any(c["rollback only"]["ar_on"]) and "rollback" in c["rollback only"]["events"][0][1]
    it, ev = c["AR only"]["events"][0]
    assert it > s["spike_at"] and ev == f"spike at {it}, no rollback, AR on"   # detected after the kick
    assert len(c["AR only"]["loss"]) == s["steps"]                         # no rollback: no step repeated
    assert len(c["AR + rollback"]["loss"]) > s["steps"]                    # a rollback replays steps
    assert c["neither"]["loss"][:s["spike_at"] + 1] == c["AR only"]["loss"][:s["spike_at"] + 1]
    assert c["neither"]["loss"] != c["no spike"]["loss"]                  # the kick changes the run
    assert r["effect"] == pytest.approx(c["neither"]["post_spike_loss"] - c["AR only"]["post_spike_loss"])
    assert r["effect"] > 0                                                  # AR alone helps here
    # while AR is on (routes from before the kick) the AR-only run is below the no-AR run at every step
    on = [i for i, f in enumerate(c["AR only"]["ar_on"]) if f]
    assert on and all(c["AR only"]["loss"][i] < c["neither"]["loss"][i] for i in on)
    assert 0.3 < c["neither"]["churn"][s["spike_at"]] <= 1                # the kick re-routes the tokens


def test_routes_with_an_older_snapshot_use_its_parameters_and_restore_the_model(data):
    import torch

    from v4lab.model import V4Model
    from v4lab.train import _routes_with, _snapshot, micro_config
    torch.manual_seed(0)
    model = V4Model(micro_config())
    ids = data.batch(0, 2, 16, 0)
    old = model.route_only(ids[:, :-1])
    snap = _snapshot(model, [], 0)
    with torch.no_grad():
        for b in model.blocks():
            if not b.ffn.gate.is_hash:
                b.ffn.gate.weight.copy_(torch.randn_like(b.ffn.gate.weight))     # a very different router
    now = model.route_only(ids[:, :-1])
    learned = [i for i, r in enumerate(old) if r is not None]
    assert any(not torch.equal(old[i], now[i]) for i in learned)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lagged = _routes_with(model, snap, ids, use_mtp=False)
    assert all(torch.equal(old[i], lagged[i]) for i in learned)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class _Tty(io.StringIO):
    def isatty(self):
        return True


SMALL_RUNS = {
    "mhc": dict(steps=2, n_sublayers=4),
    "subfp4": dict(TINY_SUBFP4, formats=("e2m1", "e2m0"), qat_steps=1, qat_formats=("none",), eval_windows=1,
                   seq_len=32),
    "ar": dict(SMALL_AR, steps=6, cells=("neither", "AR only")),
    "clamp": dict(steps=20, seeds=(0,), eval_windows=1, fp32_check=False),  # no clamp diverges ~step 15
    "qat": dict(steps=1, batch_size=1, seq_len=32, eval_windows=1),        # on data/lab-v4, its own data
}


@pytest.mark.parametrize("name", sorted(SMALL_RUNS))
def test_experiment_progress_bar_counts_its_work_on_a_terminal_only(name, monkeypatch, data):
    """``progress=True`` draws one bar with an ETA that ends full (its total is the work the experiment did);
    on a non-terminal stderr nothing is written."""
    import importlib
    mod = importlib.import_module(f"v4lab.experiments.{runner.EXPERIMENTS[name]}")
    kw = dict(SMALL_RUNS[name])
    if name not in ("mhc", "qat"):
        kw["data"] = data
    for stream, drawn in ((_Tty(), True), (io.StringIO(), False)):
        monkeypatch.setattr("sys.stderr", stream)
        mod.experiment(quick=True, progress=True, **kw)
        text = stream.getvalue()
        if not drawn:
            assert text == ""
            continue
        done = re.findall(r"(\d+)/(\d+) \[", text)
        assert f"experiment {name}" in text and done and "<" in text, text[-300:]
        n, total = map(int, done[-1])
        assert n >= total > 0, text[-300:]           # a rollback's replayed steps may add to the count


def test_experiment_cli_has_the_no_progress_flag(capsys):
    with pytest.raises(SystemExit) as e:
        runner.main(["--help"])
    assert e.value.code == 0 and "--no-progress" in capsys.readouterr().out
