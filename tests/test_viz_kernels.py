"""Notebook 08's figures: every callback swept; the comparison really runs kernel and reference."""
import pytest
import torch

from v4lab import hardware
from v4lab.viz import kernels as V
from v4lab.viz.common import sweep


def test_every_kernel_equals_its_reference():
    rows = V.compare_all()
    assert [r["kernel"] for r in rows] == list(V.KERNELS)
    for r in rows:
        assert r["ok"], r["kernel"]
        assert r["out"].shape == r["ref"].shape
        assert r["function"].startswith("v4lab.kernels.") and r["mode"] == "interpreter"
    assert V.compare("quant")["max_abs_diff"] == 0.0                     # the quantiser is bit-exact
    text = V.compare_table(rows, times=False)
    assert text.splitlines()[0] == "Triton mode: interpreter" and text.count("yes") == len(V.KERNELS)


def test_compare_catches_a_wrong_kernel(monkeypatch):
    """A kernel that drifts from its reference must show up as not ok."""
    case = V.KERNELS["indexer"]
    real = V.kernel_fn(case)
    monkeypatch.setattr(V, "kernel_fn", lambda c: (lambda *a, **k: real(*a, **k) * 1.01))
    V.compare.cache_clear()
    try:
        assert not V.compare("indexer")["ok"]
    finally:
        V.compare.cache_clear()


@pytest.mark.parametrize("static", [True, False])
def test_kernel_sweep_shows_each_pair(static):
    w = V.CompareWidget(static=static)
    seen = set()
    for k, _ in sweep(w, "kernel"):
        r = V.compare(k)
        ref = torch.tensor([list(row) for row in w.fig.data[0].z], dtype=torch.float32)
        out = torch.tensor([list(row) for row in w.fig.data[1].z], dtype=torch.float32)
        assert torch.allclose(ref, V._as2d(r["ref"])) and torch.allclose(out, V._as2d(r["out"]))
        assert k in w.fig.layout.title.text and r["reference"] in w.fig.layout.annotations[0].text
        seen.add(w.fig.layout.title.text)
    assert len(seen) == len(V.KERNELS)


@pytest.mark.parametrize("static", [True, False])
def test_roofline_sweeps(static):
    w = V.RooflineWidget(static=static)
    for m, _ in sweep(w, "tokens"):
        for p, tr in zip(V.roofline_points("H200", m), w.fig.data[3:]):
            assert tr.x[0] == pytest.approx(p["flops"] / p["bytes"])
            roof = min(hardware.peak_flops("H200", p["precision"]), p["intensity"] * hardware.bandwidth("H200"))
            assert tr.y[0] == pytest.approx(roof / 1e12)
    # more tokens per call raise the intensity of the GEMMs (weights amortised) but not of sparse attention
    lo, hi = V.roofline_points("H200", 1), V.roofline_points("H200", 4096)
    by = {p["kernel"]: (p, q) for p, q in zip(lo, hi)}
    assert by["fp4_gemm"][1]["intensity"] > 100 * by["fp4_gemm"][0]["intensity"]
    assert by["sparse_attn"][1]["intensity"] == pytest.approx(by["sparse_attn"][0]["intensity"])
    assert by["fp4_gemm"][0]["bound"] == "memory" and by["fp4_gemm"][1]["bound"] == "compute"
    roofs = {}
    for g, _ in sweep(w, "gpu"):
        roofs[g] = max(w.fig.data[2].y)
        assert g in w.fig.layout.title.text
    assert roofs["B200"] == pytest.approx(hardware.peak_flops("B200", "fp4") / 1e12)
    assert roofs["H200"] == pytest.approx(hardware.peak_flops("H200", "fp8") / 1e12)   # no FP4 cores: FP8 rate


def test_bench_table_formats_records():
    text = V.bench_table("x", [{"path": "fused_torch", "device": "cpu", "M": 1, "ms": 80.33716499994625,
                                "ratio_vs_dequant": 2.0},
                               {"path": "triton", "ms": None, "note": "interpreter only"},
                               {"kernel": "moe", "ms": 512.25, "timing_meaningful": False, "ok": True,
                                "max_abs_diff": 3e-7}])
    assert "path=fused_torch device=cpu M=1" in text and "80.3 ms, 2.00× vs dequantise-all" in text
    assert "triton: interpreter only" in text
    assert "80.337" not in text and "512" not in text                      # no interpreter time, no 16 digits
    assert "kernel=moe" in text and "agrees with its reference (max |Δ| 3.0e-07); not timed" in text


def test_bad_values_name_the_control():
    with pytest.raises(ValueError, match="kernel = 'nope'"):
        V.CompareWidget(static=True, kernel="nope")
    w = V.RooflineWidget(static=True)
    with pytest.raises(ValueError, match="tokens = 3"):
        w.on_tokens(3)


def test_static_builders_match_widgets():
    assert (V.build_compare("mhc").to_plotly_json()["data"]
            == V.CompareWidget(static=True, kernel="mhc").fig.to_plotly_json()["data"])
    assert (V.build_roofline("B200", 64).to_plotly_json()["data"]
            == V.RooflineWidget(static=True, gpu="B200", tokens=64).fig.to_plotly_json()["data"])


def test_whole_model_through_the_kernels():
    from v4lab.viz import kernels as kv
    res = kv.whole_model(max_tokens=12)
    assert res["tokens"] == 12 and res["mode"] == "interpreter"
    assert res["max_abs_diff"] < 1e-4 and res["same_next_tokens"]
    from v4lab.viz import trained
    assert not trained.trained_model()[0].kernels              # the shared notebook model is restored
