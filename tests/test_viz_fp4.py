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


# ------------------------------------------------------------------ the trained model's own FP4 experts
import json  # noqa: E402
import math  # noqa: E402
from pathlib import Path  # noqa: E402

from safetensors.torch import save_file  # noqa: E402

from v4lab import get_config  # noqa: E402
from v4lab import model as model_mod  # noqa: E402
from v4lab.model import V4Model  # noqa: E402
from v4lab.train import evaluate  # noqa: E402
from v4lab.viz import check, trained  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / "data"
TINY, LAB = DATA / "tiny-v4", DATA / "lab-v4"


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    model, tok, _ = trained.load_dir(TINY)
    return model, tok, V.ExpertFP4(TINY)


def test_expert_codes_are_the_files_and_the_models_weights(tiny):
    """Codes and scales read from the shards decode to exactly the weights the loaded model computes with."""
    model, _, ef = tiny
    cfg = model.cfg
    for layer in (0, ef.layers[-1]):
        for e in (0, ef.E - 1):
            ex = model.blocks()[layer].ffn.experts[e]
            num, den = [], []
            for m in V.MATRICES:
                w = getattr(ex, m).weight.detach()
                c = ef.codes[layer, e, m]
                assert int(c.sum()) == w.numel()
                # decoding the counted codes with their scales gives the model's weight: rebuild it
                from v4lab.checkpoint import CheckpointReader
                r = CheckpointReader(TINY)
                name = V._expert_name(cfg, layer, e, m)
                packed, scale = r.get(name + ".weight").view(torch.uint8), r.get(name + ".scale").view(torch.uint8)
                assert torch.equal(Q.mxfp4_dequantize(packed, scale), w)
                assert torch.equal(torch.bincount(Q.unpack_fp4(packed).flatten().long(), minlength=16), c)
                assert torch.equal(ef.exps[layer, e, m], scale.flatten().long() - 127)
                num.append(w.flatten())
                den.append(V.coarse_round(w).flatten())
            assert ef.coarse_db[layer][e] == pytest.approx(Q.sqnr_db(torch.cat(num), torch.cat(den)), rel=1e-6)


@pytest.mark.parametrize("static", [True, False])
def test_expert_codes_widget_sweeps(tiny, static):
    _, _, ef = tiny
    w = V.ExpertCodesWidget(static=static, ef=ef)
    for matrix, _ in sweep(w, "matrix"):
        for layer, _ in sweep(w, "layer"):
            for e, _ in sweep(w, "expert", [0, ef.E - 1]):
                codes, scales, sq, masters, mark = w.fig.data
                c = ef.codes[layer, e, matrix]
                assert list(codes.y) == [int(c[k]) for k in V.CODE_ORDER]
                assert list(codes.x)[0] == "-6" and list(codes.x)[-1] == "+6"
                assert sum(scales.y) == ef.exps[layer, e, matrix].numel()
                assert list(sq.y) == pytest.approx(ef.coarse_db[layer]) and list(mark.x) == [e]
                assert not masters.x                          # tiny-v4 ships no master comparison
                assert check.check_figure(w.fig) == [], (matrix, layer, e)
    with pytest.raises(ValueError, match="expert = 99"):
        w.on_expert(99)


def test_coarser_experts_round_and_restore(tiny):
    model, tok, _ = tiny
    w0 = model.layers[1].ffn.experts[0].w1.weight.clone()
    with V.coarser_experts(model):
        w1 = model.layers[1].ffn.experts[0].w1.weight.clone()
    assert not torch.equal(w0, w1) and torch.equal(w1, V.coarse_round(w0))
    assert torch.equal(model.layers[1].ffn.experts[0].w1.weight, w0)
    res = V.fp4_losses(model, tok, TINY, n_tokens=128)
    ids, _ = __import__("v4lab.viz.moe", fromlist=["x"]).heldout_ids(TINY, tok, 129)
    with torch.no_grad():
        assert res["file"] == pytest.approx(evaluate(model, ids)["loss"])
    assert res["coarse"] != res["file"] and res["masters"] is None
    assert "not in the file" in V.fp4_loss_table(res)
    assert check.check_figure(V.build_fp4_losses(res)) == []


def test_masters_comparison_is_tied_to_its_shards(tmp_path):
    """measure_masters on a release written from known masters: the SQNR is the masters' rounding error, the
    stored result is shown only for those shards."""
    torch.manual_seed(0)
    cfg = get_config("tiny")
    masters = V4Model(cfg).eval()
    rel, ck = tmp_path / "rel", tmp_path / "ck"
    model_mod.save(masters, rel)
    trained.byte_tokenizer().save(str(rel / "tokenizer.json"))
    (rel / "heldout.txt").write_text("The for statement iterates over a sequence. " * 8)
    ck.mkdir()
    save_file({k: v.contiguous() for k, v in masters.state_dict().items()}, str(ck / "model.safetensors"))
    res = V.measure_masters(rel, ck, windows=1, seq_len=64)
    w = masters.layers[1].ffn.experts[2]
    ref = torch.cat([getattr(w, m).weight.detach().flatten() for m in V.MATRICES])
    q = torch.cat([Q.fp4_fake_quant(getattr(w, m).weight.detach()).flatten() for m in V.MATRICES])
    assert res["sqnr_db"]["1"][2] == pytest.approx(Q.sqnr_db(ref, q), rel=1e-6)
    assert set(res["losses"]) == {"file", "masters_fp32_experts", "masters_fp4_qat_experts"}
    # the file differs from the QAT masters only by FP8 attention weights: close, not equal
    assert res["losses"]["file"] == pytest.approx(res["losses"]["masters_fp4_qat_experts"], abs=2e-2)
    stored = tmp_path / "m.json"
    stored.write_text(json.dumps(res))
    assert V.masters_result(rel, stored)["fingerprint"] == res["fingerprint"]
    assert V.masters_result(TINY, stored) is None                         # other shards: not shown
    ef = V.ExpertFP4(rel)
    d = V.expert_codes_data(ef, 1, 2, "w1", V.masters_result(rel, stored))
    assert d["traces"][3]["y"][2] == pytest.approx(res["sqnr_db"]["1"][2]) and math.isfinite(d["traces"][3]["y"][2])
    assert V.main([str(rel), "--masters", str(tmp_path / "nowhere")]) == 2


@pytest.mark.slow
def test_lab_model_fp4_figures():
    if not (LAB / "config.json").is_file():
        pytest.skip("data/lab-v4 is not there (the lab model ships separately; see data/README.md)")
    torch.set_num_threads(1)
    ef = V.ExpertFP4(LAB)
    assert ef.E >= 16 and all(math.isfinite(v) for l in ef.layers for v in ef.coarse_db[l])
    w = V.ExpertCodesWidget(static=True, ef=ef)
    for c in w.control_names:
        for v in w.sweep_values(c):
            getattr(w, f"on_{c}")(v)
            assert check.check_figure(w.fig) == [], (c, v)


def test_coarse_round_pads_rows_with_zeros():
    w = torch.randn(3, 96, generator=torch.Generator().manual_seed(0))
    wp = torch.cat([w, torch.zeros(3, 32)], 1)
    assert torch.equal(V.coarse_round(w, 128), Q.fp4_fake_quant(wp, 128)[:, :96])
    assert torch.equal(V.coarse_round(w, 32), Q.fp4_fake_quant(w, 32))
