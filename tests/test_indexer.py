"""Lightning indexer: weighted-ReLU scores, causal visibility ⌊(t+1)/m⌋, top-k with −1 for invisible picks."""
import pytest
import torch

from v4lab.config import get_config
from v4lab.indexer import Indexer, index_scores, topk_visible, topk_visible_sorted, visible_entries
from v4lab.rope import layer_inv_freq


def test_index_scores_matches_loop():
    torch.manual_seed(0)
    q, k, w = torch.randn(2, 3, 4, 5), torch.randn(2, 6, 5), torch.randn(2, 3, 4)
    got = index_scores(q, k, w)
    want = torch.zeros(2, 3, 6)
    for b in range(2):
        for t in range(3):
            for s in range(6):
                want[b, t, s] = sum(w[b, t, h] * torch.relu(q[b, t, h] @ k[b, s]) for h in range(4))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # ReLU before the head weights matters (a sign flip of one head's q changes the score)
    q2 = q.clone()
    q2[:, :, 0] *= -1
    assert not torch.allclose(index_scores(q2, k, w), got)


def test_index_scores_bad_shapes():
    with pytest.raises(ValueError, match="index_scores"):
        index_scores(torch.randn(1, 2, 3, 4), torch.randn(1, 5, 3), torch.randn(1, 2, 3))


@pytest.mark.parametrize("m", [4, 128])
def test_visibility_rule(m):
    """Entry s (pooling tokens up to m(s+1)−1) is visible to query t iff every pooled token is ≤ t."""
    t = torch.arange(0, 3 * m + 2)
    n_vis = visible_entries(t, m)
    for s in range(4):
        assert torch.equal(s < n_vis, m * (s + 1) - 1 <= t)
    # the paper text's ⌊t/m⌋ differs exactly at the last token of a window, and is rejected here
    paper = torch.div(t, m, rounding_mode="floor")
    differ = t[paper != n_vis]
    assert not torch.equal(paper, n_vis) and torch.equal(differ % m, torch.full_like(differ, m - 1))


def test_topk_fewer_entries_and_all_masked_rows():
    torch.manual_seed(1)
    N, k = 5, 3
    t = torch.arange(0, 24)
    n_vis = visible_entries(t, 4)                     # 0,0,0,1,1,1,1,2,...,5 (capped by N)
    scores = torch.randn(2, 24, N)
    idx = topk_visible(scores, n_vis, k)
    assert idx.shape == (2, 24, 3)
    for ti in range(24):
        nv = min(int(n_vis[ti]), N)
        row = idx[:, ti]
        if nv == 0:                                   # t < m−1: all masked → all −1
            assert (row == -1).all()
        valid = row[row >= 0].view(2, -1)
        assert valid.shape[1] == min(k, nv)           # fewer ready entries than k → the rest are −1
        assert (valid < nv).all()
        want = scores[:, ti, :nv].topk(min(k, nv), dim=-1).indices.sort(-1).values
        assert torch.equal(valid.sort(-1).values, want)
    # k > N: k becomes N; N = 0: nothing to pick
    assert topk_visible(scores, n_vis, 100).shape[-1] == N
    assert topk_visible(scores[..., :0], n_vis, 8).shape == (2, 24, 0)


def test_topk_ties_and_nan_are_deterministic():
    scores = torch.zeros(1, 2, 6)                     # exact ties (ReLU zeroed every head)
    idx = topk_visible(scores, torch.tensor([6, 4]), 3)
    assert idx.tolist() == [[[0, 1, 2], [0, 1, 2]]]   # lower entry index wins a tie
    s = torch.tensor([[[0.5, float("nan"), 0.1, 0.9]]])
    idx = topk_visible(s, torch.tensor([4]), 3)
    assert idx.tolist() == [[[3, 0, 2]]]             # a NaN score does not win the top-k


def test_indexer_module_shapes_scaling_and_mask():
    cfg = get_config("tiny")
    ix = Indexer(cfg, layer_inv_freq(cfg, 1), 4)
    names = {n for n, _ in ix.named_parameters()}
    assert names == {"wq_b.weight", "weights_proj.weight", "compressor.wkv.weight", "compressor.wgate.weight",
                     "compressor.ape", "compressor.norm.weight"}
    assert ix.compressor.wkv.weight.shape == (2 * cfg.index_head_dim, cfg.hidden_size)
    torch.manual_seed(2)
    x, qr = torch.randn(1, 21, cfg.hidden_size), torch.randn(1, 21, cfg.q_lora_rank)
    pos = torch.arange(21)
    keys = ix.keys(x, None)
    assert keys.shape == (1, 5, cfg.index_head_dim)
    q, w = ix.queries(x, qr, pos)
    assert q.shape == (1, 21, cfg.index_n_heads, cfg.index_head_dim)
    scale = cfg.index_head_dim ** -0.5 * cfg.index_n_heads ** -0.5
    torch.testing.assert_close(w, (x @ ix.weights_proj.weight.T) * scale)
    idx, scores = ix.select(q, w, keys, pos)
    assert idx.shape == (1, 21, min(cfg.index_topk, 5))
    n_vis = visible_entries(pos, 4)
    assert ((idx < n_vis[None, :, None]) | (idx == -1)).all()
    assert (idx[0, :3] == -1).all() and (idx[0, 3] >= 0).sum() == 1


@pytest.mark.parametrize("case", ["random", "ties", "few_visible", "nan"])
def test_topk_visible_equals_the_sorted_reference(case):
    """The top-k fast path picks exactly the stable sort's entries in the same order, ties included."""
    g = torch.Generator().manual_seed(3)
    B, S, N, k = 2, 40, 64, 8
    scores = torch.randn(B, S, N, generator=g)
    if case == "ties":                      # ReLU-style zeros and repeated values around the k-th score
        scores = scores.relu().round(decimals=1)
    if case == "nan":
        scores[0, 5, 3] = float("nan")
        scores[1, :, 10] = float("nan")
    n_vis = torch.arange(S) * 2 if case != "few_visible" else torch.arange(S) // 4
    for kk in (k, 1, N - 1, N, N + 3):
        got, ref = topk_visible(scores, n_vis, kk), topk_visible_sorted(scores, n_vis, kk)
        assert torch.equal(got, ref), (case, kk)
