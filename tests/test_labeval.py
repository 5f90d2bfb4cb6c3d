"""v4lab.labeval's pieces against the existing references, on tiny-v4 (the lab model's own numbers are
re-measured in tests/test_lab_v4_weights.py)."""
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import v4lab
from v4lab import labeval
from v4lab.data import bigram_loss, load_data, load_tokenizer, token_classes
from v4lab.train import evaluate, expert_specialisation, indexer_quality

TINY = Path(__file__).resolve().parents[1] / "data" / "tiny-v4"


def test_stream_windows_predict_every_token_once():
    ids = torch.arange(23)
    ws = labeval.stream_windows(ids, 5)
    assert [w.shape[1] for w in ws] == [6, 6, 6, 6, 3]                   # 4 full windows + a tail of 2 targets
    targets = torch.cat([w[0, 1:] for w in ws])
    assert torch.equal(targets, ids[1:])
    assert all(torch.equal(w[0], ids[5 * i:5 * i + w.shape[1]]) for i, w in enumerate(ws))
    assert len(labeval.stream_windows(torch.arange(11), 5)) == 2           # exact fit: no empty tail
    with pytest.raises(ValueError, match="ids"):
        labeval.stream_windows(torch.arange(1), 5)


def test_sparse_bigram_equals_the_dense_reference():
    g = torch.Generator().manual_seed(0)
    V = 37
    train = torch.randint(0, V, (3000,), generator=g) // torch.randint(1, 4, (3000,), generator=g)
    windows = torch.randint(0, V, (5, 17), generator=g)
    ref = bigram_loss(train, windows, V)
    c = labeval.bigram_counts(train, V)
    assert int(c["count"].sum()) == train.numel() - 1
    got = labeval.bigram_nll(c, windows[:, :-1].reshape(-1), windows[:, 1:].reshape(-1), V)
    assert got["alpha"] == ref["alpha"]
    for a in ref["losses"]:
        assert got["losses"][a] == pytest.approx(ref["losses"][a], rel=1e-12)
    perm = torch.randperm(c["prev"].numel(), generator=g)                 # order of the stored pairs is free
    shuffled = {k: v[perm] for k, v in c.items()}
    assert labeval.bigram_nll(shuffled, windows[:, :-1].reshape(-1), windows[:, 1:].reshape(-1), V)["loss"] \
        == pytest.approx(got["loss"], rel=1e-12)


@pytest.fixture(scope="module")
def tiny_release(tmp_path_factory):
    if not (TINY / "training_summary.json").is_file():
        pytest.skip("data/tiny-v4 is not there")
    d = tmp_path_factory.mktemp("tiny") / "tiny-v4"
    shutil.copytree(TINY, d)
    tok = load_tokenizer(d)
    data = load_data(512, tokenizer=tok, heldout_text=(d / "heldout.txt").read_text())
    save_file(labeval.bigram_counts(data.train, 512), str(d / labeval.COUNTS_FILE))
    return d, data


def test_release_measures_equal_the_references(tiny_release):
    d, data = tiny_release
    res = labeval.evaluate_release(d, seq_len=512, max_windows=2, spec_windows=1, timing=False,
                                   write_missing_counts=False)
    model = v4lab.load(d)
    w = data.heldout_windows(512, 2)
    assert res["heldout"]["loss"] == pytest.approx(evaluate(model, w)["loss"], abs=1e-5)
    assert res["heldout"]["mtp_loss"] == pytest.approx(evaluate(model, w)["mtp_loss"], abs=1e-5)
    assert res["heldout"]["tokens"] == 2 * 512
    assert res["bigram"]["loss"] == pytest.approx(bigram_loss(data.train, w, 512)["loss"], rel=1e-12)
    assert res["below_bigram_nats"] == pytest.approx(res["bigram"]["loss"] - res["heldout"]["loss"])
    q = indexer_quality(model, w)
    assert res["indexer"]["recall"] == pytest.approx(q["recall"], abs=1e-12)
    assert res["indexer"]["random_recall"] == pytest.approx(q["random_recall"])
    spec = expert_specialisation(model, w[:1], token_classes(load_tokenizer(d)))
    assert res["specialisation"]["trained"]["mi_bits"] == pytest.approx(spec["mi_bits"], abs=1e-12)
    r = res["specialisation"]
    assert r["ratio_vs_random"] == pytest.approx(r["trained"]["mean_learned_mi_bits"]
                                                 / r["random"]["mean_learned_mi_bits"])
    assert res["bits_per_char"] is None                                  # only for the whole text
    assert len(res["samples"]) == len(labeval.PROMPTS) and all(s["continuation"] for s in res["samples"])
    assert res["passed"]["bits_per_char"] is None and res["passed"]["forward_cpu_seconds"] is None


@pytest.mark.slow
def test_whole_heldout_and_bits_per_char(tiny_release):
    d, data = tiny_release
    res = labeval.evaluate_release(d, seq_len=512, spec_windows=1, timing=False, write_missing_counts=False)
    docs = labeval.heldout_docs((d / "heldout.txt").read_text())
    assert res["heldout"]["tokens"] == data.heldout.numel() - 1          # every held-out token but the first
    assert res["heldout_chars"] == sum(map(len, docs))
    assert res["bits_per_char"] == pytest.approx(res["heldout"]["nll_sum"] / math.log(2) / res["heldout_chars"])
    assert 1.5 < res["bits_per_char"] < 3.0                              # tiny-v4 is ~2.2 bits per character


def test_missing_counts_and_bad_cli_input(tmp_path, tiny_release):
    d, _ = tiny_release
    bare = tmp_path / "bare"
    shutil.copytree(d, bare)
    (bare / labeval.COUNTS_FILE).unlink()
    with pytest.raises(ValueError, match="bigram counts.*missing"):
        labeval.evaluate_release(bare, seq_len=512, max_windows=1, timing=False, write_missing_counts=False)
    assert labeval.main([str(tmp_path / "nope")]) == 2
    assert labeval.main([str(d), "--max-windows", "0"]) == 2


def test_forward_seconds_is_measured_on_one_thread(tiny_release):
    d, _ = tiny_release
    before = torch.get_num_threads()
    r = labeval.forward_cpu_seconds(v4lab.load(d), seq_len=64, repeats=2)
    assert r["threads"] == 1 and 0 < r["min"] <= r["median"] and torch.get_num_threads() == before


def test_cli_entries(tmp_path, capsys):
    from v4lab import cli
    assert cli.main(["labeval", str(tmp_path / "nope")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert cli.main(["labrun", "--ckpt-seconds", "0"]) == 2
    assert "--ckpt-seconds" in capsys.readouterr().err
    # --init belongs to a continuation; the from-scratch recipe refuses it before touching --run-dir
    assert cli.main(["labrun", "--init", "x", "--run-dir", str(tmp_path / "run")]) == 2
    assert "--init = 'x'" in capsys.readouterr().err and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_masters_vs_file(tmp_path):
    from test_labrun import _recipe, _site

    from v4lab import labrun
    root = _site(tmp_path / "html")
    labrun.run(tmp_path / "run", tmp_path / "out", root, recipe=_recipe(), progress=False)
    r = labeval.masters_vs_file(tmp_path / "out", tmp_path / "run" / "ckpt", seq_len=256, max_windows=2)
    assert r["windows"] == 2
    # the file holds the QAT weights rounded once more (FP8 attention): close to the QAT masters, and not
    # the same numbers as the full-precision experts
    assert r["file"] == pytest.approx(r["masters_fp4_qat_experts"], abs=0.05)
    assert r["masters_fp32_experts"] != r["masters_fp4_qat_experts"]
    with pytest.raises(ValueError, match="ckpt"):
        labeval.masters_vs_file(tmp_path / "out", tmp_path)
