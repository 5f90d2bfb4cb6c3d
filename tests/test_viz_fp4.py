"""Notebook 05's figures: every callback swept, the figure checked against v4lab.quant."""
import pytest
import torch

from v4lab import quant as Q
from v4lab.viz import fp4 as V
from v4lab.viz.common import sweep


def test_text_tables_show_the_formats():
    t = V.e2m1_table().splitlines()
    assert len(t) == 17 and t[1].split()[-1] == "0" and t[8].split()[-1] == "6" and t[9].split()[-1] == "-0"
    demo = V.nibble_demo()
    assert "bytes  0x21, 0xC3" in demo and demo.splitlines()[-1] == "decode 0.5, 1, 1.5, -2"
    e8 = V.e8m0_table()
    assert "byte 127 (0x7F) -> 2^0    = 1" in e8 and e8.splitlines()[-1].endswith("NaN")


@pytest.mark.parametrize("static", [True, False])
def test_block_sweep_matches_quant(static):
    w = V.BlockErrorWidget(static=static)
    W = V.weights("gaussian")
    sqnr_lines = (list(w.fig.data[0].y), list(w.fig.data[1].y))
    for b, _ in sweep(w, "block"):
        want4 = Q.sqnr_db(W, Q.fp4_fake_quant(W, b))
        want8 = Q.sqnr_db(W, Q.act_quant_fp8(W, b))
        assert list(w.fig.data[2].x) == [b, b]
        assert w.fig.data[2].y[0] == pytest.approx(want4) and w.fig.data[2].y[1] == pytest.approx(want8)
        # the shown block: its length is the block size, and its rounded values lie on scale × E2M1 grid
        assert len(w.fig.data[3].y) == b
        q = torch.tensor(w.fig.data[4].y)
        amax = torch.tensor(w.fig.data[3].y).abs().max()
        scale = Q.pow2_scale(amax, 6.0, Q.FP4_AMAX_FLOOR)
        assert torch.isin(q / scale, Q.E2M1_GRID).all()
        assert torch.equal(q, Q.fp4_fake_quant(torch.tensor(w.fig.data[3].y), b))
    assert (list(w.fig.data[0].y), list(w.fig.data[1].y)) == sqnr_lines      # lines fixed per distribution


def test_dist_sweep_heavy_tails_hurt_large_blocks():
    w = V.BlockErrorWidget(static=True, block=1024)
    got = {}
    for d, _ in sweep(w, "dist"):
        got[d] = list(w.fig.data[0].y)
        assert V.DISTS[d] in w.fig.layout.title.text
    assert len({tuple(v) for v in got.values()}) == len(V.DISTS)
    # FP4's SQNR falls with the block size, much more for heavy tails; the stated floor holds at 32
    for d in V.DISTS:
        assert got[d][0] > got[d][-1]
    assert got["student3"][0] - got["student3"][-1] > 2 * (got["gaussian"][0] - got["gaussian"][-1])
    assert got["gaussian"][V.BLOCKS.index(32)] >= 13


def test_spread_sweep_lossless_up_to_2_14():
    w = V.LosslessWidget(static=True)
    line = list(w.fig.data[0].y)
    for s, _ in sweep(w, "spread"):
        c = V.conversion(s)
        assert c["measured_spread"] == s
        assert w.fig.data[1].y[0] == c["changed"] and list(w.fig.data[2].x) == list(range(s + 1))
        if s <= 14:
            assert c["changed"] == 0 and not c["refused_by_check"] and set(w.fig.data[2].y) == {1.0}
            assert "lossless" in w.fig.layout.title.text
        else:
            assert c["changed"] > 0 and c["refused_by_check"] and min(w.fig.data[2].y) < 1.0
            assert min(w.fig.data[2].y[:15]) == 1.0                          # only offsets > 14 lose values
    assert list(w.fig.data[0].y) == line


def test_conversion_really_goes_through_fp8():
    """A wrong converter (identity) would make every spread look lossless; the table must show 2^15 lossy."""
    assert V.conversion(15)["changed"] > 0 and V.conversion(15)["max_rel_err"] == 1.0   # small values -> 0


def test_bad_values_name_the_control():
    with pytest.raises(ValueError, match="block = 48"):
        V.BlockErrorWidget(static=True, block=48)
    w = V.LosslessWidget(static=True)
    with pytest.raises(ValueError, match="spread = 21"):
        w.on_spread(21)


def test_static_builders_match_widgets():
    assert (V.build_block_error("student3", 64).to_plotly_json()["data"]
            == V.BlockErrorWidget(static=True, dist="student3", block=64).fig.to_plotly_json()["data"])
    assert (V.build_lossless(16).to_plotly_json()["data"]
            == V.LosslessWidget(static=True, spread=16).fig.to_plotly_json()["data"])


def test_qat_cache_is_a_rerunnable_experiment_result():
    import inspect

    from v4lab.experiments import qat
    r = V.qat_result()
    sig = inspect.signature(qat.run)
    assert set(r["config"]) <= set(sig.parameters)        # qat_result(**config) reruns exactly what is stored
    h = r["heldout"]
    assert r["gap_ptq"] == pytest.approx(h["bf16_rounded_after"] - h["bf16"])
    assert r["gap_qat"] == pytest.approx(h["qat_fp4"] - h["bf16"])
    fig = V.build_qat(r)
    assert len(fig.data) == 3 and list(fig.data[2].y) == [h[k] - h["bf16"] for k in V.HELDOUT_LABELS]
    assert f"{h['qat_fp4']:.4f}" in V.qat_table(r)
