"""Figures of the stored experiment results: each builds from its JSON, shows every run, says where a run
diverged, and a missing result is a clear error."""
import json

import pytest

from v4lab.viz import experiments as ev


@pytest.mark.parametrize("name", ev.NAMES)
def test_every_stored_result_builds_a_figure(name):
    res = ev.load(name)
    fig = getattr(ev, f"build_{name}")(res)
    assert fig.data and fig.layout.title.text and "$" not in fig.layout.title.text
    line = ev.effect_line(res)
    assert line.startswith(f"{name}: {res['metric']}") and f"{res['effect']:+.3g}" in line


def test_clamp_figure_marks_the_divergence():
    res = ev.load("clamp")
    fig = ev.build_clamp(res)
    runs = res["details"]["runs"]
    legend = [t.name for t in fig.data if t.showlegend is not False]
    assert legend == [*runs, "clamp limit L = 10"]       # one entry per run, plus the limit line
    diverged = [r for r in runs.values() if r["diverged_at"] is not None]
    marks = [t for t in fig.data if t.mode == "markers+text"]          # on the loss and on the MoE output
    assert len(marks) == 2 * len(diverged) and all(t.text[0].startswith("NaN at step") for t in marks)
    for r in diverged:                                                 # at the run's last logged step
        assert {(t.xaxis, t.y[0]) for t in marks} >= {("x", r["loss"][-1]), ("x3", r["moe_max"][-1])}


def test_clamp_seed_figure_and_table_show_every_run():
    res = ev.load("clamp")
    by_seed = res["details"]["by_seed"]
    fig = ev.build_clamp_seeds(res)
    points = [t for t in fig.data if t.mode == "markers"]
    assert len(points) == len(next(iter(by_seed.values())))
    for t in points:                        # hollow exactly where that seed's run diverged
        runs = [by_seed[x.split()[1]][t.name] for x in t.x]
        assert list(t.marker.symbol) == ["circle-open" if r["diverged_at"] is not None else "circle" for r in runs]
        assert list(t.y) == [r["scored_loss"] for r in runs]
    table = ev.clamp_table(res).splitlines()
    n_runs = sum(len(runs) for runs in by_seed.values())
    assert len(table) == 1 + n_runs + 1 + len(res["details"]["fp32"])
    res["details"]["fp32"] = {}
    assert any(a.text == "no fp32 check in this run" for a in ev.build_clamp_seeds(res).layout.annotations)


def test_subfp4_figure_has_one_point_per_ptq_row_and_the_release_formats():
    res = ev.load("subfp4")
    fig = ev.build_subfp4(res)
    ptq = [t for t in fig.data if t.name.startswith("PTQ")]
    assert sum(len(t.x) for t in ptq) == len(res["details"]["ptq"])
    assert len(fig.layout.shapes) == len(ev.RELEASE_BITS) + 1        # release lines + the as-released loss


def test_missing_or_unknown_result_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no stored result; run `v4lab experiment clamp"):
        ev.load("clamp", tmp_path)
    with pytest.raises(ValueError, match="name = 'x'"):
        ev.load("x")
    (tmp_path / "mhc.json").write_text(json.dumps({"a": 1}))
    assert ev.load("mhc", tmp_path) == {"a": 1}


def test_ar_figure_draws_every_cell_against_the_no_spike_run():
    res = ev.load("ar")
    fig = ev.build_ar(res)
    cells = res["details"]["cells"]
    lines = [t for t in fig.data if t.type == "scatter"]
    assert [t.name for t in lines] == [n for n in cells if n != "no spike"]
    bars = [t for t in fig.data if t.type == "bar"][0]
    assert list(bars.x) == [*(n for n in cells if n != "no spike"), "no spike"]
    assert list(bars.y) == [cells[n]["post_spike_loss"] for n in bars.x]
    on = [st for st, f in zip(cells["AR only"]["step"], cells["AR only"]["ar_on"]) if f]
    (shade,) = fig.layout.shapes                                # the AR-on steps of the AR-only run
    assert (shade.x0, shade.x1) == (min(on) - 0.5, max(on) + 0.5)


def test_qat_figure_shows_the_three_losses_and_every_expert_of_both_arms():
    res = ev.load("qat")
    fig = ev.build_qat(res)
    bars = [t for t in fig.data if t.type == "bar"][0]
    d = res["details"]
    assert list(bars.y) == [d["ptq_masters"], res["baseline"]["heldout_loss"], res["treatment"]["heldout_loss"]]
    pts = [t for t in fig.data if t.type == "scatter" and t.mode == "markers"]
    assert [len(t.x) for t in pts] == [len(d["experts"]["ptq"]), len(d["experts"]["qat"])]
    text = ev.qat_lines(res)
    assert f"{res['effect']:+.4f}" in text and f"{d['released']:.4f}" in text and f"{d['gap_ptq']:+.4f}" in text
