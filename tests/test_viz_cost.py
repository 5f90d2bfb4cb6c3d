"""Notebook 09: prices reproduce the report; the roofline follows v4lab.hardware; every callback swept."""
import json

import pytest

from v4lab import hardware, pricing
from v4lab.viz import cost
from v4lab.viz.common import sweep

# (claim prefix, published) — the report's figures, asserted one by one
PUBLISHED = [("V4-Pro output cheaper than Opus 4.7", 7.2), ("V4-Pro output cheaper than GPT-5.5", 8.6),
             ("V4-Pro output cheaper than Gemini 3.1 Pro", 3.4), ("V4-Flash output cheaper than Opus 4.7", 89),
             ("32M in + 1M out a month on V4-Flash", 4.76), ("32M in + 1M out a month on Opus 4.7", 185),
             ("Gemini 3.1 Pro input multiplier above 200K", 2), ("V4-Pro input multiplier above 200K", 1),
             ("Pro overpay on traffic Flash could serve", 12)]


@pytest.mark.parametrize("claim,published", PUBLISHED)
def test_report_figure_reproduces(claim, published):
    rec = [r for r in pricing.report_claims() if r["claim"].startswith(claim)]
    assert len(rec) == 1
    r = rec[0]
    assert r["published"] == published and r["ok"]
    decimals = len(str(published).split(".")[1]) if "." in str(published) else 0
    assert abs(r["computed"] - published) <= 0.5 * 10 ** -decimals + 1e-9   # the report's rounding


def test_direct_arithmetic():
    assert pricing.output_ratio("opus-4.7", "v4-pro") == pytest.approx(25 / 3.48)
    assert pricing.cost("v4-flash", 32e6, 1e6) == pytest.approx(4.76)
    assert pricing.cost("opus-4.7", 32e6, 1e6) == pytest.approx(185)
    assert pricing.cost("gemini-3.1-pro", 1e6, 0, context=200_000) == pytest.approx(2.0)
    assert pricing.cost("gemini-3.1-pro", 1e6, 0, context=200_001) == pytest.approx(4.0)
    assert pricing.cost("v4-pro", 1e6, 0, context=10 ** 6) == pytest.approx(1.74)
    for share in (0, 0.3, 32 / 33, 1):                       # 12.4x for any input/output mix
        assert pricing.overpay(share) == pytest.approx(12.43, abs=0.005)
    assert pricing.blended_cost(0, 32e6, 1e6) == pytest.approx(4.76)
    assert pricing.blended_cost(1, 32e6, 1e6) == pytest.approx(59.16)
    assert pricing.blended_cost(0.25, 32e6, 1e6) == pytest.approx(0.75 * 4.76 + 0.25 * 59.16)
    v5f, v5p = pricing.price("v5-flash"), pricing.price("v5-pro")
    assert v5f.speculative and v5p.speculative
    assert (v5f.input, v5f.output, v5p.input, v5p.output) == (0.07, 0.14, 0.87, 1.74)
    assert not pricing.price("v4-pro").speculative
    assert "v5-pro" not in pricing.load_prices(speculative=False)


def test_prices_file_is_dated_and_sourced():
    m = pricing.meta()
    assert m["as_of"] and m["recorded_on"] and m["source"] and m["_recorded_on"]
    for p in pricing.load_prices().values():
        assert p.source and p.mark("input") and p.mark("output")
    assert pricing.price("gemini-3.1-pro").input_assumed


def test_a_wrong_price_is_caught(tmp_path, monkeypatch):
    raw = json.loads(pricing.PRICES_PATH.read_text())
    raw["models"]["opus-4.7"]["output"] = 24.0
    bad = tmp_path / "prices.json"
    bad.write_text(json.dumps(raw))
    monkeypatch.setattr(pricing, "PRICES_PATH", bad)
    failed = [r["claim"] for r in pricing.report_claims() if not r["ok"]]
    assert any("Opus 4.7" in c for c in failed)


def test_bad_input_names_the_argument(tmp_path):
    with pytest.raises(ValueError, match="model = 'gpt-9'"):
        pricing.price("gpt-9")
    with pytest.raises(ValueError, match="escalated = 1.5"):
        pricing.blended_cost(1.5, 1, 1)
    with pytest.raises(ValueError, match="input_tokens = -1"):
        pricing.cost("v4-pro", -1, 0)
    with pytest.raises(ValueError, match="no input price"):
        pricing.cost("gpt-5.5", 1e6, 0)
    (tmp_path / "p.json").write_text('{"models": {"x": {"label": "x", "output": -1, "source": "s"}}}')
    with pytest.raises(ValueError, match="x.output = -1"):
        pricing.load_prices(tmp_path / "p.json")


# ----------------------------------------------------------------------------- hardware model
def test_hardware_model():
    assert hardware.experts_touched(384, 6, 1) == pytest.approx(6)
    assert hardware.experts_touched(384, 6, 100000) == pytest.approx(384)
    assert hardware.peak_flops("H200", "fp4") == hardware.peak_flops("H200", "fp8")   # no FP4 cores
    assert hardware.peak_flops("B200", "fp4") == 2 * hardware.peak_flops("B200", "fp8")
    a, b = hardware.decode_step("v4-pro", 2 ** 20, 1), hardware.decode_step("v4-pro", 2 ** 20, 8)
    assert b["flops"] == pytest.approx(8 * a["flops"]) and b["kv_read_bytes"] == pytest.approx(8 * a["kv_read_bytes"])
    assert a["weight_bytes"] < b["weight_bytes"] < 8 * a["weight_bytes"]           # weights are shared
    # CSA reads only top-k compressed entries: far less than the stored cache at 1M
    assert a["kv_read_bytes"] < 0.2 * a["kv_cache_bytes"]
    r = hardware.roofline("v4-pro", "H200", 2 ** 20, 64)
    assert r["t_step"] == max(r["t_compute"], r["t_memory"]) and r["bound"] == "memory"
    assert r["tokens_per_s"] == pytest.approx(64 / r["t_step"])
    rb = hardware.roofline("v4-pro", "B200", 2 ** 20, 64)
    assert rb["tokens_per_s"] / r["tokens_per_s"] == pytest.approx(8.0 / 4.8)      # memory-bound: bandwidth ratio
    big = hardware.roofline("v4-pro", "B200", 4096, 16384)
    assert big["bound"] == "compute"
    assert hardware.roofline("v4-pro", "B200", 4096, 16384, fp4_experts=True)["t_compute"] < big["t_compute"]
    assert hardware.roofline("v4-pro", "H200", 4096, 16384, fp4_experts=True)["t_compute"] == pytest.approx(
        hardware.roofline("v4-pro", "H200", 4096, 16384)["t_compute"])            # Hopper: nothing to gain
    with pytest.raises(ValueError, match="batch = 0"):
        hardware.decode_step("v4-pro", 1024, 0)
    with pytest.raises(ValueError, match="gpu = 'Z100'"):
        hardware.gpu("Z100")


def test_a100_and_the_fallback_rates():
    a = hardware.gpu("A100")
    assert a["hbm_tb_s"] == pytest.approx(2.039) and a["tflops"]["bf16"] == 312 and "datasheet" in a["source"]
    # no FP8 or FP4 tensor cores: both run at the BF16 rate
    assert hardware.peak_flops("A100", "fp8") == hardware.peak_flops("A100", "fp4") == 312e12
    r = hardware.roofline("v4-pro", "A100", 4096, 1)
    b200 = hardware.roofline("v4-pro", "B200", 4096, 1)
    assert r["tokens_per_s"] / b200["tokens_per_s"] == pytest.approx(2.039 / 8.0)
    # compute-bound, A100 falls further behind than its bandwidth alone says
    big = {g: hardware.roofline("v4-pro", g, 4096, 16384)["tokens_per_s"] for g in ("A100", "H100", "B200")}
    assert big["A100"] / big["B200"] < 2.039 / 8.0 / 2                   # BF16 rate for FP8 work
    assert big["H100"] / big["B200"] == pytest.approx(1979 / 4500, rel=0.01)      # the FP8 compute ratio


def test_where_b200_reaches_the_published_3x():
    B = cost.BATCH_STOPS
    bw = 8.0 / 4.8
    # bandwidth-bound at small batch: the ratio is the bandwidth ratio, whatever the tensor cores
    for fp4 in (False, True):
        assert hardware.speedup("v4-pro", 4096, 1, fp4_experts=fp4) == pytest.approx(bw)
    # FP8 expert GEMMs: the compute ratio caps it near 4500 / 1979 = 2.27x, never ~3x
    assert max(hardware.speedup("v4-pro", 4096, b) for b in B) == pytest.approx(4500 / 1979, rel=0.01)
    assert hardware.first_batch_reaching(cost.NEAR_PUBLISHED, "v4-pro", 4096, B) is None
    # FP4 x FP4 expert GEMMs on Blackwell: ~3x appears once the step is compute-bound
    b = hardware.first_batch_reaching(cost.NEAR_PUBLISHED, "v4-pro", 4096, B, fp4_experts=True)
    assert b == 8192
    assert hardware.roofline("v4-pro", "H200", 4096, b, fp4_experts=True)["bound"] == "compute"
    assert hardware.speedup("v4-pro", 4096, b // 2, fp4_experts=True) < cost.NEAR_PUBLISHED
    text = cost.b200_ratio_table()
    assert "first batch at >= 2.7x: 8,192" in text and "never >= 2.7x (max 2.28x)" in text


# ----------------------------------------------------------------------------- widgets
def _bill_bars(w):
    """label -> height, over the known-price and unknown-price traces."""
    return {**dict(zip(w.fig.data[0].x, w.fig.data[0].y)), **dict(zip(w.fig.data[1].x, w.fig.data[1].y))}


def test_bill_sweeps():
    w = cost.BillWidget(static=True)
    keys = [k for k, p in pricing.load_prices().items() if not p.speculative]
    labels = {k: cost.SHORT[k] + ("<br>(input assumed)" if pricing.price(k).input_assumed else "") for k in keys}
    for control in ("input_m", "output_m", "prompt"):
        seen = []
        for _ in sweep(w, control):
            s = w.state
            bars = _bill_bars(w)
            for k in keys:
                inp = 0 if pricing.price(k).input is None else s["input_m"] * 1e6
                assert bars[labels[k]] == pytest.approx(pricing.cost(k, inp, s["output_m"] * 1e6, context=s["prompt"]))
            seen.append(tuple(bars.values()))
            assert "$" not in w.fig.layout.title.text.replace("US$", "")
        assert len(set(seen)) > 1 or control == "prompt"
    # GPT-5.5's input price is unknown: its bar is in the hatched "unknown" trace, labelled a lower bound
    assert list(w.fig.data[1].x) == ["GPT-5.5"] and "unknown" in w.fig.data[1].name
    assert w.fig.data[1].marker.pattern.shape == "/" and list(w.fig.data[1].text)[0].startswith("≥ ")
    assert "GPT-5.5" not in w.fig.data[0].x
    # prompt above 200K doubles only Gemini's input
    w.on_input_m(32), w.on_output_m(1), w.on_prompt(2 ** 17)
    short = _bill_bars(w)
    w.on_prompt(2 ** 18)
    long = _bill_bars(w)
    g = labels["gemini-3.1-pro"]
    assert long[g] - short[g] == pytest.approx(32 * 2.0)
    assert all(long[k] == short[k] for k in long if k != g)
    for v, _ in sweep(w, "speculative"):
        assert w.fig.data[2].visible is v
    assert "V4-Flash 4.76" in w.fig.layout.title.text and "Opus 4.7 185 " in w.fig.layout.title.text


def test_long_context_sweep():
    w = cost.LongContextWidget(static=True)
    months = []
    for v, _ in sweep(w, "prompt"):
        g, p = w.fig.data[2].y
        assert p == pytest.approx(1.74)
        assert g == pytest.approx(4.0 if v > 200_000 else 2.0)
        assert list(w.fig.data[2].x) == [v, v]
        gm, pm = w.fig.data[3].y                   # the month's bars follow the slider
        assert gm == pytest.approx(cost.LONG_REQUESTS * v * g / 1e6)
        assert pm == pytest.approx(cost.LONG_REQUESTS * v * 1.74 / 1e6)
        months.append(gm)
        assert ("Gemini doubled" in w.fig.layout.title.text) == (v > 200_000)
        assert w.fig.layout.title.text.count("$") <= 1
    assert months == sorted(months) and len(set(months)) == len(cost.PROMPT_STOPS)


def test_escalation_sweep():
    w = cost.EscalationWidget(static=True)
    ys = []
    for f, _ in sweep(w, "escalated"):
        assert w.fig.data[3].x[0] == f
        b = pricing.blended_cost(f, 32e6, 1e6)
        assert w.fig.data[3].y[0] == pytest.approx(b)
        flash, pro, saved = (w.fig.data[i].y[0] for i in (4, 5, 6))
        assert flash == pytest.approx((1 - f) * 4.76) and pro == pytest.approx(f * 59.16)
        assert flash + pro == pytest.approx(b) and saved == pytest.approx(59.16 - b)
        ys.append(w.fig.data[3].y[0])
        assert w.fig.layout.title.text.count("$") <= 1
    assert ys == sorted(ys) and ys[0] == pytest.approx(4.76) and ys[-1] == pytest.approx(59.16)
    assert "12.4x" in w.fig.layout.title.text
    for control in ("input_m", "output_m"):               # the volumes move the lines
        lines = set()
        for _value, _ in sweep(w, control):
            assert w.fig.data[1].y[0] == pytest.approx(pricing.cost("v4-pro", w.state["input_m"] * 1e6,
                                                                    w.state["output_m"] * 1e6))
            lines.add(w.fig.data[1].y[0])
        assert len(lines) == len(w.sweep_values(control))
    with pytest.raises(ValueError, match="escalated"):
        w.on_escalated(2)


N_AFTER_ROOFS = 2 + 4 + 1 + 4      # 2 step points, 4 tokens/s curves, the batch points, 4 ratio-panel traces


def _roof_points(w):
    n = len(w.fig.data) - N_AFTER_ROOFS
    return w.fig.data[n], w.fig.data[n + 1], w.fig.data[n + 6]


@pytest.mark.parametrize("static", [True, False])
def test_roofline_sweeps(static):
    w = cost.RooflineWidget(static=static)
    n_roofs = len(w.fig.data) - N_AFTER_ROOFS
    roofs = [list(t.y) for t in w.fig.data[:n_roofs]]
    prev = None
    for b, _ in sweep(w, "batch"):
        h, bb, pts = _roof_points(w)
        ref = hardware.roofline(w.state["model"], "H200", w.state["context"], b)
        assert h.x[0] == pytest.approx(ref["intensity"]) and h.y[0] == pytest.approx(ref["achieved_flops"] / 1e12)
        assert list(pts.x) == [b, b] and pts.y[0] == pytest.approx(ref["tokens_per_s"])
        ratio_here = w.fig.data[-1]
        assert ratio_here.x[0] == b and ratio_here.y[0] == pytest.approx(
            hardware.speedup(w.state["model"], w.state["context"], b))
        assert ("bottom right" if h.x[0] < 200 else "bottom left") == h.textposition   # labels stay inside
        if prev is not None:
            assert h.x[0] > prev                  # bigger batches amortise the weights
        prev = h.x[0]
    w.on_batch(64)
    tps = []
    for _ in sweep(w, "context"):
        tps.append(_roof_points(w)[2].y[0])
    assert tps == sorted(tps, reverse=True)       # longer context: more KV read, fewer tokens/s
    w.on_context(4096), w.on_batch(16384)
    b200 = {}
    for v, _ in sweep(w, "fp4_experts"):
        b200[v] = _roof_points(w)[2].y[1]
    assert b200[True] > b200[False]               # compute-bound on B200: FP4 cores help
    for m in cost.ROOF_MODELS:                    # the title's batch is hardware.first_batch_reaching's
        for ctx in (4096, 2 ** 20):
            for fp4 in (False, True):
                near = hardware.first_batch_reaching(cost.NEAR_PUBLISHED, m, ctx, cost.BATCH_STOPS, fp4_experts=fp4)
                t = cost.roofline_data(m, ctx, 64, fp4)["layout"]["title"]["text"]
                assert (f"from batch {near:,}" in t) if near else ("never ~3x here" in t)
    w.on_fp4_experts(True), w.on_batch(8192)
    assert "~3x (≥2.7x) from batch 8,192" in w.fig.layout.title.text
    w.on_fp4_experts(False)
    assert "never ~3x here (max 2.28x; try FP4 x FP4 experts)" in w.fig.layout.title.text
    curves = {}
    for m, _ in sweep(w, "model"):
        curves[m] = list(w.fig.data[n_roofs + 2].y)
        assert w.fig.layout.title.text.startswith(cost.LABELS[m] + ",")
    assert len({tuple(c) for c in curves.values()}) == len(cost.ROOF_MODELS)
    assert [list(t.y) for t in w.fig.data[:n_roofs]] == roofs   # the roofs never move


def test_tables():
    assert "H200" in cost.gpu_table() and "none" in cost.gpu_table() and "A100" in cost.gpu_table()
    assert "A100" in cost.decode_table(4096) and "not a vendor price date" in cost.price_table()
    assert "derived (from 7.2x vs Opus" in cost.price_table() and "input unknown" in cost.price_table()
    assert cost.claims_table().count("OK ") == len(pricing.report_claims())
    assert "SPECULATION" in cost.price_table() and "assumed" in cost.price_table()
