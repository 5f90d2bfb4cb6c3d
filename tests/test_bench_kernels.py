"""`v4lab bench kernels`: well-formed records with kernel == reference checked in the run (not timings)."""
import json
from dataclasses import replace

import pytest
import torch

from v4lab import hardware
from v4lab.bench import kernels as bk

FIELDS = {"kernel", "reference", "device", "mode", "shapes", "flops", "bytes", "ms", "ms_reference",
          "max_abs_diff", "tol", "ok", "flops_per_s", "bytes_per_s", "intensity", "timing_meaningful"}


@pytest.fixture(scope="module")
def records():
    return bk.run(quick=True)


def test_every_kernel_has_a_record(records):
    assert [r["kernel"] for r in records] == list(bk.CASES)
    import pathlib
    ops = {p.stem for p in pathlib.Path(bk.__file__).parents[2].joinpath("kernels").glob("*.py")} - {"__init__"}
    assert ops == set(bk.CASES)                     # a new kernel file must get a bench case


def test_records_well_formed(records):
    for r in records:
        assert FIELDS <= set(r), FIELDS - set(r)
        assert r["device"] == "cpu" and r["mode"] == "interpreter"
        assert r["flops"] > 0 and r["bytes"] > 0 and r["ms"] > 0
        assert r["intensity"] == pytest.approx(r["flops"] / r["bytes"])
        assert r["ok"] and r["max_abs_diff"] <= r["tol"], (r["kernel"], r["max_abs_diff"], r["tol"])
        assert r["timing_meaningful"] is False and "NOT performance" in r["note"]
        assert "roofline_frac" not in r                     # no roofline claims from the interpreter
    assert next(r for r in records if r["kernel"] == "quant")["tol"] == 0.0       # bit-exact kernel
    json.dumps(records)                                                         # --json must serialise


def test_table_says_interpreter(records):
    t = bk.table(records)
    assert "NOT performance" in t and "roofline" not in t.split("\n")[1]


@pytest.mark.parametrize("wrong", [False, True])
def test_wrong_kernel_is_caught(monkeypatch, wrong):
    case = bk.CASES["quant"]
    if wrong:
        def bad_ref(x, block=32):           # a reference that differs by one ulp-ish step: the kernel must fail it
            from v4lab.quant import fp4_act_quant
            y = fp4_act_quant(x, block)
            return y + 1e-6 * y.abs().max()
        monkeypatch.setitem(bk.CASES, "quant", replace(case, reference=bad_ref))
    rec = bk.run(quick=True, kernels=["quant"])[0]
    assert rec["ok"] is (not wrong)
    assert (bk.main(["--quick", "--kernel", "quant"]) == 0) is (not wrong)


def test_roofline_fields_h200():
    bw, bf16 = hardware.bandwidth("H200"), hardware.peak_flops("H200", "bf16")
    assert bw == pytest.approx(4.8e12) and bf16 == pytest.approx(989e12)
    # memory-bound: 4.8 GB moved with few FLOPs in 2 ms = half of the 1 ms roofline time
    f = bk.roofline_fields(1e9, 4.8e9, 2e-3, "H200", "bf16")
    assert f["bound"] == "memory" and f["roofline_frac"] == pytest.approx(0.5)
    assert f["frac_hbm"] == pytest.approx(0.5) and f["bytes_per_s"] == pytest.approx(2.4e12)
    # compute-bound on fp32 CUDA cores: 67e9 FLOPs take 1 ms at 67 TFLOP/s; measured 4 ms -> 25 %
    f = bk.roofline_fields(67e9, 1e6, 4e-3, "H200", "fp32")
    assert f["bound"] == "compute" and f["roofline_frac"] == pytest.approx(0.25)
    assert f["frac_bf16_peak"] == pytest.approx(67e9 / 4e-3 / 989e12)
    assert "roofline_frac" not in bk.roofline_fields(1, 1, 1, None, "fp32")


def test_table_gpu_columns(records):
    fake = [dict(r, device="cuda:0", gpu="NVIDIA H200", gpu_key="H200", mode="compiled", timing_meaningful=True,
                 **bk.roofline_fields(r["flops"], r["bytes"], r["ms"] / 1e3, "H200", "fp32")) for r in records]
    t = bk.table(fake)
    assert "roofline" in t and "HBM" in t and "4.8 TB/s" in t and "NOT performance" not in t


def test_gpu_record_path(monkeypatch):
    """The compiled-GPU branch of a record (roofline fields, repeats, table), driven on CPU: the kernel
    still runs in the interpreter, only the reported mode and GPU name are faked."""
    monkeypatch.setattr(bk, "kernel_mode", lambda: "compiled")
    calls = []
    orig = bk._time
    monkeypatch.setattr(bk, "_time", lambda fn, dev, reps: calls.append(reps) or orig(fn, dev, reps))
    r = bk.bench_case(bk.CASES["fp4_gemm"], torch.device("cpu"), "quick", 2, gpu="NVIDIA H200")
    assert calls == [2, 2] and r["timing_meaningful"] and r["gpu_key"] == "H200" and "note" not in r
    assert r["peak_precision"] == "fp32" and r["peak_flops"] == pytest.approx(67e12)
    t_roof = max(r["flops"] / 67e12, r["bytes"] / 4.8e12)
    assert r["roofline_frac"] == pytest.approx(t_roof / (r["ms"] / 1e3))
    assert "roofline" in bk.table([r])
    u = bk.bench_case(bk.CASES["quant"], torch.device("cpu"), "quick", 1, gpu="Mystery GPU 9000")
    assert "roofline_frac" not in u and "not in hardware.json" in u["note"]


def test_failing_kernel_keeps_the_other_rows(monkeypatch, capsys):
    def boom(*a):
        raise RuntimeError("PTX compile failed\nlong log")
    monkeypatch.setitem(bk.CASES, "quant", replace(bk.CASES["quant"], make=boom))
    recs = bk.run(quick=True, kernels=["quant", "fp4_gemm"])
    assert recs[0] == {**recs[0], "kernel": "quant", "ok": False, "error": "RuntimeError: PTX compile failed"}
    assert recs[1]["ok"]
    assert "quant        ERROR RuntimeError" in bk.table(recs)
    assert bk.main(["--quick", "--kernel", "quant"]) == 1


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown"):
        bk.run(quick=True, kernels=["nope"])
    with pytest.raises(ValueError, match="device"):
        bk.run(quick=True, device="tpu")
    assert bk.main(["--quick", "--device", "tpu"]) == 2


def test_json_cli(capsys):
    assert bk.main(["--quick", "--json", "--kernel", "fp4_gemm"]) == 0
    recs = json.loads(capsys.readouterr().out)
    assert len(recs) == 1 and recs[0]["kernel"] == "fp4_gemm" and recs[0]["ok"]
