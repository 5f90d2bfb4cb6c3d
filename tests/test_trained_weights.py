"""The trained tiny V4 shipped in data/tiny-v4: it loads in the official layout, its held-out loss is the
reported one (the bound), it beats the bigram baseline clearly, and its routers specialise."""
import json
from pathlib import Path

import pytest
import torch

import v4lab
from v4lab.data import bigram_loss, load_data, load_tokenizer, token_classes
from v4lab.train import HELDOUT_TEST_WINDOWS, evaluate, expert_specialisation

DIR = Path(__file__).resolve().parents[1] / "data" / "tiny-v4"
pytestmark = pytest.mark.skipif(not (DIR / "training_summary.json").is_file(),
                                reason="data/tiny-v4 has not been trained yet (v4lab train, see data/README.md)")


@pytest.fixture(scope="module")
def shipped():
    summary = json.loads((DIR / "training_summary.json").read_text())
    model = v4lab.load(DIR)
    tok = load_tokenizer(DIR)
    data = load_data(model.cfg.vocab_size, tokenizer=tok, heldout_text=(DIR / "heldout.txt").read_text())
    sub = summary["heldout_subset"]
    seq = summary.get("args", {}).get("seq_len") or sub["tokens"] // sub["windows"]   # each window: seq targets
    return summary, model, tok, data, data.heldout_windows(seq)


def test_layout_and_structure(shipped):
    summary, model, tok, data, windows = shipped
    cfg = model.cfg
    assert {"window", "csa", "hca"} <= set(cfg.layer_kinds)
    assert cfg.num_hash_layers >= 1 and cfg.num_hash_layers < cfg.num_hidden_layers   # hash and learned
    assert cfg.hc_mult > 1 and cfg.num_nextn_predict_layers == 1
    assert windows.shape[1] - 1 > 128                                  # HCA (ratio 128) has entries
    assert sum(p.stat().st_size for p in DIR.glob("*.safetensors")) <= 25 * 2 ** 20
    assert tok.get_vocab_size() == cfg.vocab_size
    assert data.fingerprint["heldout_tokens"] == summary["corpus"]["heldout_tokens"]


def test_heldout_loss_is_the_reported_one(shipped):
    summary, model, _, _, windows = shipped
    sub = windows[:HELDOUT_TEST_WINDOWS]
    torch.set_num_threads(1)
    got = evaluate(model, sub)["loss"]
    assert got <= summary["heldout_subset"]["loss"] + 1e-4
    assert got == pytest.approx(summary["heldout_subset"]["loss"], abs=1e-3)


def test_beats_bigram_clearly(shipped):
    summary, model, _, data, windows = shipped
    bigram = bigram_loss(data.train, windows, model.cfg.vocab_size)["loss"]
    assert bigram == pytest.approx(summary["bigram"]["loss"], abs=1e-6)
    assert summary["heldout"]["loss"] < bigram - 0.3          # reported: 3.211 vs 3.669


def test_experts_specialise_beyond_random(shipped):
    summary, model, tok, _, windows = shipped
    got = expert_specialisation(model, windows[:2], token_classes(tok))
    trained = summary["specialisation_trained"]["mean_learned_mi_bits"]
    rand = summary["specialisation_random"]["mean_learned_mi_bits"]
    assert trained > 3 * rand
    assert got["mean_learned_mi_bits"] > 3 * rand                    # re-measured on a subset


def test_indexer_was_warmed_up(shipped):
    """The CSA indexers pick the entries the main attention weighs most (data/README.md: 85 % of the top-16
    on held-out text after the warm-up, 36 % before, 34 % at random)."""
    from v4lab.train import indexer_quality
    summary, model, _, _, windows = shipped
    q = indexer_quality(model, windows[:2])
    assert q["recall"] > q["random_recall"] + 0.3
    w = summary["indexer_warmup"]
    assert w["after"]["recall"] > w["before"]["recall"] + 0.3 and w["after"]["kl"] < w["before"]["kl"] / 3
