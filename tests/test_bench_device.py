"""``v4lab bench device``: the end-to-end device check a GPU box runs, exercised here on the CPU."""
import json

import pytest
import torch

from v4lab.bench import device as D


def test_every_check_passes_on_the_cpu(capsys):
    assert D.main(["--quick", "--json", "--device", "cpu"]) == 0
    recs = json.loads(capsys.readouterr().out)
    assert [r["check"] for r in recs] == list(D.CHECKS)
    assert all(r["ok"] and r["device"] == "cpu" for r in recs), recs
    model = recs[0]["detail"]
    assert model["kernels"] == "interpreter" and model["kernels_vs_reference"] <= 2e-5
    assert model["decode_vs_full"] <= 2e-5 and model["kernel_generation_same"]
    assert recs[1]["detail"]["parameters_on"] == ["cpu"] and recs[1]["max_abs_diff"] == 0.0   # same seed, same run
    assert recs[2]["max_abs_diff"] <= 2e-5


def test_a_failing_check_is_reported_and_the_rest_still_run(monkeypatch):
    def broken(dev, quick):
        raise RuntimeError("no such tensor")
    monkeypatch.setattr(D, "check_stream", broken)
    recs = D.run(quick=True, device="cpu", checks=("stream", "widgets"))
    assert [r["ok"] for r in recs] == [False, True] and "no such tensor" in recs[0]["error"]
    assert D.main(["--quick", "--device", "cpu", "--check", "stream"]) == 1


def test_the_device_setting_is_restored(monkeypatch):
    monkeypatch.setenv("V4LAB_DEVICE", "auto")
    D.run(quick=True, device="cpu", checks=("widgets",))
    import os
    assert os.environ["V4LAB_DEVICE"] == "auto"


def test_bad_check_name():
    with pytest.raises(ValueError, match="check = 'gpu': must be one of"):
        D.run(quick=True, device="cpu", checks=("gpu",))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_request_without_cuda_exits_2(capsys):
    from v4lab import cli
    assert cli.main(["bench", "device", "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
