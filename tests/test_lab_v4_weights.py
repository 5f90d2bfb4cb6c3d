"""The lab model shipped in data/lab-v4: its shape is the issue's, and its targets hold when re-measured
from the shipped files (weights, tokenizer, held-out text, bigram counts), not read from the summary.
Skips only while data/lab-v4 does not exist (it is written by `python -m v4lab.labrun`, see data/README.md)."""
import json
from pathlib import Path

import pytest
import torch

import v4lab
from v4lab import labeval

DIR = Path(__file__).resolve().parents[1] / "data" / "lab-v4"
pytestmark = pytest.mark.skipif(not DIR.is_dir(), reason="data/lab-v4 has not been trained yet "
                                "(python -m v4lab.labrun, see data/README.md)")
FILES = ("config.json", "model.safetensors.index.json", "tokenizer.json", "heldout.txt", "training_summary.json",
         "train_log.jsonl", labeval.COUNTS_FILE)


@pytest.fixture(scope="module")
def summary():
    return json.loads((DIR / "training_summary.json").read_text())


def test_files_shape_and_size(summary):
    for f in FILES:
        assert (DIR / f).is_file(), f
    assert sum(p.stat().st_size for p in DIR.glob("*.safetensors") if p.name != labeval.COUNTS_FILE) <= 25e6
    model = v4lab.load(DIR)
    cfg = model.cfg
    n = sum(p.numel() for p in model.parameters())
    assert 5e6 <= n <= 20e6
    assert cfg.hidden_size >= 256 and cfg.num_hidden_layers >= 6
    kinds = cfg.layer_kinds[:cfg.num_hidden_layers]
    assert {"window", "csa", "hca"} <= set(kinds)
    assert {cfg.compress_ratio(i) for i, k in enumerate(kinds) if k != "window"} == {4, 128}
    assert 1 <= cfg.num_hash_layers < cfg.num_hidden_layers
    assert cfg.n_routed_experts >= 16 and cfg.num_experts_per_tok >= 2 and cfg.n_shared_experts >= 1
    assert cfg.hc_mult == 4 and cfg.swiglu_limit > 0 and cfg.num_nextn_predict_layers == 1
    assert 2048 <= cfg.vocab_size <= 8192 and cfg.expert_dtype == "fp4"
    assert summary["recipe"]["seq_len"] >= 2048
    assert summary["cpu_seconds_total"] <= 3 * 3600


@pytest.fixture(scope="module")
def remeasured():
    torch.set_num_threads(1)
    return labeval.evaluate_release(DIR, timing=False, write_missing_counts=False)   # the whole held-out text


@pytest.mark.slow
def test_shipped_numbers_are_what_the_files_give(summary, remeasured):
    got, shipped = remeasured, summary["targets"]
    assert got["heldout"]["tokens"] == shipped["heldout"]["tokens"]
    assert got["heldout"]["loss"] == pytest.approx(shipped["heldout"]["loss"], abs=1e-4)
    assert got["bigram"]["loss"] == pytest.approx(shipped["bigram"]["loss"], abs=1e-9)
    assert got["indexer"]["recall"] == pytest.approx(shipped["indexer"]["recall"], abs=1e-4)
    assert got["bits_per_char"] == pytest.approx(shipped["bits_per_char"], abs=1e-5)
    assert got["samples"] == shipped["samples"]
    assert {k: v for k, v in labeval.check(got).items() if k != "forward_cpu_seconds"} == \
        {k: v for k, v in shipped["passed"].items() if k != "forward_cpu_seconds"}


@pytest.mark.slow
def test_targets_that_hold(remeasured):
    got = remeasured
    assert got["bits_per_char"] <= labeval.TARGETS["bits_per_char"]                  # issue 15: <= 1.6
    assert got["below_bigram_nats"] > 0.7                 # a language model, not a bigram: 0.773 nats better
    assert got["indexer"]["recall"] >= 3 * got["indexer"]["random_recall"]   # picks mean something (0.759 vs 0.211)
    spec = got["specialisation"]
    assert spec["trained"]["mean_learned_mi_bits"] >= 3 * spec["random"]["mean_learned_mi_bits"]
    assert spec["trained"]["mean_learned_mi_bits"] > labeval.TINY_V4_MI_BITS


# strict: when a new model meets a target, its test must be un-marked
@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="issue 15 is open: this model measures 0.773 nats below the bigram "
                   "(target 1.0); see data/README.md")
def test_issue_target_below_bigram(remeasured):
    assert remeasured["below_bigram_nats"] >= labeval.TARGETS["below_bigram_nats"]


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="issue 15 is open: this model's indexer recall is 0.759 (target 0.8); "
                   "see data/README.md")
def test_issue_target_indexer_recall(remeasured):
    assert remeasured["indexer"]["recall"] >= labeval.TARGETS["indexer_recall"]
