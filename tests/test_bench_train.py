"""`v4lab bench train` and the prefill side-by-side driver: set-up, records and flags (not their timings)."""
import io
import json

import pytest
import torch

from v4lab import progress
from v4lab.bench import attention as BA
from v4lab.bench import train as BT

KEYS = {"impl", "seq", "seconds", "tokens_per_s", "peak_bytes", "gflops", "peak_fraction"}


def test_step_flops_is_three_forwards_of_accounting():
    from v4lab import accounting as acc
    cfg = BT.bench_config(64)
    fwd = sum(acc.decode_flops(cfg, t)["total_raw"] for t in range(1, 65))
    assert BT.step_flops(cfg, 64) == 3 * fwd
    assert BT.step_flops(cfg, 128) > 2 * BT.step_flops(cfg, 64)        # attention grows with context


def test_run_records_peer_skip_and_ratios(monkeypatch):
    calls = []

    def fake_spawn(impl, seq, steps):
        calls.append((impl, seq))
        s = {"v4lab": 1.0, "hf-transformers": 3.0}[impl] * seq / 512
        return {"impl": impl, "seq": seq, "seconds": s, "step_seconds": [s], "peak_bytes": 10 * seq, "loss": 6.0}

    monkeypatch.setattr(BT, "_spawn", fake_spawn)
    monkeypatch.setattr(BT, "matmul_peak", lambda: 50e9)
    monkeypatch.setattr(BT, "FULL_SEQS", (512, 4096))
    monkeypatch.setattr(BT, "HF_BUDGET", BT.hf_analytic_peak(BT.bench_config(512), 512))   # the peer fits 512 only
    recs = BT.run(quick=False)
    assert calls[:2] == [("v4lab", 512), ("hf-transformers", 512)] and calls[2:4] == [("hf-transformers", 512),
                                                                                        ("v4lab", 512)]
    assert ("hf-transformers", 4096) not in calls
    by = {(r["impl"], r["seq"]): r for r in recs}
    assert all(KEYS <= set(r) for r in recs)
    assert by[("hf-transformers", 4096)]["skipped"] and "GiB" in by[("hf-transformers", 4096)]["reason"]
    v = by[("v4lab", 512)]
    assert v["speed_vs_peer"] == pytest.approx(3.0) and v["tokens_per_s"] == pytest.approx(512.0)
    assert v["gflops"] == pytest.approx(BT.step_flops(BT.bench_config(512), 512) / 1e9)
    assert v["peak_fraction"] == pytest.approx(v["gflops"] / 50)


def test_worker_runs_both_on_the_same_weights():
    pytest.importorskip("transformers")
    a = BT._worker("v4lab", 48, 1)
    b = BT._worker("hf-transformers", 48, 1)
    assert a["seq"] == b["seq"] == 48 and a["seconds"] > 0 and b["seconds"] > 0
    assert abs(a["loss"] - b["loss"]) < 1e-3              # same model, same tokens → same loss


def test_prefill_side_by_side_interleaves_and_takes_medians(monkeypatch):
    seen = []

    def fake_spawn(args, timeout):
        _, name, impl, S, dev, shape = args
        seen.append((name, impl))
        k = sum(1 for n, i in seen if (n, i) == (name, impl))
        sec = {"v4lab": [3.0, 1.0, 2.0], "hf-transformers": [9.0, 4.0, 5.0]}[impl][k - 1]
        return [{"layer": name, "impl": impl, "mode": "prefill", "context": int(S), "shape": shape, "skipped": False,
                 "seconds": sec, "wall_seconds": sec, "peak_bytes": 100 if impl == "v4lab" else 1000}]

    monkeypatch.setattr(BA, "_spawn", fake_spawn)
    recs = BA.prefill_side_by_side([("narrow", 1024)], torch.device("cpu"), 2 ** 40, lambda s: None)
    assert [i for n, i in seen if n == "v4-flash-csa"] == ["v4lab", "hf-transformers", "hf-transformers", "v4lab",
                                                          "v4lab", "hf-transformers"]
    v = next(r for r in recs if r["layer"] == "v4-flash-csa" and r["impl"] == "v4lab")
    assert v["seconds"] == 2.0 and v["runs_seconds"] == [3.0, 1.0, 2.0]
    assert v["speed_vs_hf"] == pytest.approx(5.0 / 2.0) and v["memory_vs_hf"] == pytest.approx(10.0)
    seen.clear()
    recs = BA.prefill_side_by_side([("real", 1024)], torch.device("cpu"), 1, lambda s: None)   # no budget: skipped
    assert {(r["impl"], r["skipped"]) for r in recs} == {("v4lab", False), ("hf-transformers", True)}
    with pytest.raises(ValueError, match="shape = 'wide'"):
        BA.prefill_config("wide")


def test_progress_only_on_a_tty_and_not_when_refused():
    class Tty(io.StringIO):
        def isatty(self):
            return True
    assert progress.enabled(True, Tty()) and not progress.enabled(False, Tty())
    assert not progress.enabled(True, io.StringIO())
    assert progress.bar(3, "x", wanted=True).disable          # pytest's stderr is not a TTY


def test_train_bench_cli_flags(capsys, monkeypatch):
    monkeypatch.setattr(BT, "run", lambda quick, progress, log: [
        {"impl": "v4lab", "seq": 512, "seconds": 1.0, "tokens_per_s": 512.0, "peak_bytes": 1, "gflops": 2.0,
         "peak_fraction": 0.1, "matmul_peak_gflops": 20.0, "skipped": False, "quick": quick, "progress": progress}])
    assert BT.main(["--quick", "--json", "--no-progress"]) == 0
    rec = json.loads(capsys.readouterr().out)[0]
    assert rec["quick"] and rec["progress"] is False and KEYS <= set(rec)
    assert BT.main(["--device", "cuda"]) == 2
    assert "cpu" in capsys.readouterr().err
