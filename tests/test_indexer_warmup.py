"""The indexer warm-up: its loss against slow references, its wiring in the attention, what it trains."""
import math

import pytest
import torch

from v4lab import train as T
from v4lab.attention import Attention
from v4lab.config import get_config
from v4lab.indexer import distill_kl, topk_recall, visible_entries
from v4lab.model import V4Model


def _slow_kl(mass, scores, n_visible):
    tot, n = 0.0, 0
    B, S, N = mass.shape
    for b in range(B):
        for t in range(S):
            v = int(n_visible[t])
            m = [float(mass[b, t, j]) for j in range(v)]
            if v == 0 or sum(m) == 0:
                continue
            p = [x / sum(m) for x in m]
            z = [float(scores[b, t, j]) for j in range(v)]
            lse = max(z) + math.log(sum(math.exp(x - max(z)) for x in z))
            tot += sum(pi * (math.log(pi) - (zi - lse)) for pi, zi in zip(p, z) if pi > 0)
            n += 1
    return tot, n


def _case(seed=0, B=2, S=9, N=6):
    g = torch.Generator().manual_seed(seed)
    mass = torch.rand(B, S, N, generator=g) * (torch.rand(B, S, N, generator=g) > 0.3)
    mass[0, 4] = 0.0                                          # a query whose target has no mass: skipped
    scores = torch.randn(B, S, N, generator=g) * 3
    nv = visible_entries(torch.arange(S), 2).clamp(max=N)    # 0, 1, 1, 2, 2, ...: the first query sees none
    return mass, scores, nv


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_distill_kl_equals_the_slow_reference(seed):
    mass, scores, nv = _case(seed)
    got, n = distill_kl(mass, scores, nv)
    want, wn = _slow_kl(mass, scores, nv)
    assert n == wn and abs(float(got) - want) < 1e-4 * max(1.0, want)


def test_distill_kl_is_zero_exactly_when_the_indexer_matches():
    mass, _, nv = _case()
    match = mass.clamp_min(1e-30).log()                       # softmax(log p) = p
    kl, n = distill_kl(mass, match, nv)
    assert n > 0 and abs(float(kl)) < 1e-5
    kl2, _ = distill_kl(mass, match + 0.5 * torch.randn(mass.shape, generator=torch.Generator().manual_seed(3)), nv)
    assert float(kl2) > 1e-3


def test_invisible_entries_carry_neither_target_nor_score():
    mass, scores, nv = _case()
    N = mass.shape[-1]
    late = torch.arange(N)[None, None] >= nv[None, :, None]
    a, _ = distill_kl(mass, scores, nv)
    b, _ = distill_kl(mass + 100 * late, scores.masked_fill(late, 1e4), nv)     # future entries changed
    assert float(a) == float(b)


def test_topk_recall_equals_the_slow_reference():
    mass, scores, nv = _case()
    k = 2
    picks = torch.where(torch.arange(k)[None, None] < nv.clamp(max=k)[None, :, None],
                        scores.masked_fill(torch.arange(6)[None, None] >= nv[None, :, None], -1e9).topk(k, -1).indices,
                        -1)
    hits, possible = topk_recall(mass, picks, nv, k)
    h2 = p2 = 0
    for b in range(mass.shape[0]):
        for t in range(mass.shape[1]):
            v = int(nv[t])
            order = sorted(range(v), key=lambda j: -float(mass[b, t, j]))[:k]
            h2 += sum(1 for j in order if j in picks[b, t].tolist())
            p2 += len(order)
    assert (hits, possible) == (h2, p2)


def test_attention_target_is_the_dense_attention_mass():
    """With top-k ≥ every visible entry the sparse attention is dense: the target the warm-up uses must equal
    the inspected attention probabilities on the compressed entries, and recall must be 1."""
    cfg = get_config("tiny").replace(index_topk=64)
    torch.manual_seed(0)
    a = Attention(cfg, 1).eval()
    assert a.kind == "csa"
    x = torch.randn(2, 40, cfg.hidden_size)
    a.inspect = a.distill = True
    with torch.no_grad():
        a(x)
    rec = a.last_inspect
    Nc = rec["index_scores"].shape[-1]
    mass = torch.zeros(2, 40, Nc + 1)
    cidx = rec["compressed_idx"]
    mass.scatter_add_(2, cidx.clamp(min=0).long(), (rec["probs_compressed"].sum(2)) * (cidx >= 0))
    nv = visible_entries(torch.arange(40), a.ratio)
    want, n = distill_kl(mass[..., :Nc], rec["index_scores"].nan_to_num(neginf=-1e30), nv)
    assert a.last_distill[1] == n and abs(float(a.last_distill[0]) - float(want)) < 1e-4
    assert a.last_recall[0] == a.last_recall[1] > 0


def test_warmup_loss_trains_the_indexer_only():
    cfg = T.micro_config()
    torch.manual_seed(0)
    model = V4Model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 48))
    kl, _, _ = T._distill_forward(model, ids)
    kl.backward()
    mine = {id(p) for p in T.indexer_params(model)}
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in T.indexer_params(model) if p.dim() > 1)
    assert all(p.grad is None for p in model.parameters() if id(p) not in mine)


@pytest.fixture(scope="module")
def data():
    from v4lab.data import load_data
    return load_data(512)


def test_warmup_moves_only_indexer_weights_and_lowers_the_kl(data):
    cfg = T.micro_config(index_topk=2)
    torch.manual_seed(0)
    model = V4Model(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    r = T.indexer_warmup(model, data, steps=25, batch_size=4, seq_len=64, lr=1e-2, warmup=2, eval_windows=4,
                         progress=False)
    after = model.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(".attn.indexer." in k for k in moved)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert r["after"]["kl"] < r["before"]["kl"]
    assert 0 < r["before"]["random_recall"] < 1


def test_bad_arguments(data):
    model = V4Model(T.micro_config())
    with pytest.raises(ValueError, match="steps = 0: must be a positive integer"):
        T.indexer_warmup(model, data, steps=0)
    no_csa = V4Model(T.micro_config(compress_ratios=[0, 0, 0]))
    with pytest.raises(ValueError, match="no CSA layer"):
        T.indexer_warmup(no_csa, data, steps=1)


def test_cli_warms_up_a_saved_model(tmp_path, capsys):
    import json

    from v4lab.data import default_tokenizer
    from v4lab.model import load, save
    cfg = T.micro_config()
    torch.manual_seed(0)
    src = save(V4Model(cfg), tmp_path / "src")
    default_tokenizer(cfg.vocab_size).save(str(src / "tokenizer.json"))
    (src / "heldout.txt").write_text("kept")
    (src / "training_summary.json").write_text(json.dumps({"heldout": {"loss": 9.9}, "corpus": "c"}))
    out = tmp_path / "out"
    rc = T.main(["--init", str(src), "--indexer-warmup", "2", "--out", str(out), "--batch-size", "2",
                 "--seq-len", "64", "--eval-windows", "2", "--no-progress", "--device", "cpu"])
    assert rc == 0
    rep = json.loads((out / "indexer_warmup.json").read_text())
    assert len(rep["log"]) == 2 and set(rep["after"]) == {"kl", "recall", "random_recall", "heldout_loss"}
    assert (out / "heldout.txt").read_text() == "kept" and (out / "tokenizer.json").is_file()
    summary = json.loads((out / "training_summary.json").read_text())     # now describes the new weights
    assert summary["before_indexer_warmup"]["heldout"] == {"loss": 9.9} and summary["corpus"] == "c"
    assert summary["heldout"]["loss"] < 9 and summary["indexer_warmup"]["after"] == rep["after"]
    a, b = load(src, device="cpu").state_dict(), load(out, device="cpu").state_dict()
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert changed and all(".attn.indexer." in k for k in changed)


def test_cli_warmup_needs_init(capsys):
    from v4lab import cli
    assert cli.main(["train", "--indexer-warmup", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs --init" in err[0]
