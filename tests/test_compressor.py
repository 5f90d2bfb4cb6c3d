"""KV compressor: pooling semantics (HCA plain, CSA overlapped two series), streaming state, RoPE at m·i."""
import pytest
import torch

from v4lab.compressor import Compressor, CompressorState, compress_pool, pool_weights
from v4lab.rope import apply_rope, cos_sin, inv_freq


def naive_pool(kv, score, ape, m, overlap):
    """Loop-per-entry-and-channel statement of paper eqs. 9–12 / 20–23 (spec §3.4)."""
    B, n, w = kv.shape
    c = w // 2 if overlap else w
    out = torch.zeros(B, n // m, c, dtype=torch.float64)
    for b in range(B):
        for i in range(n // m):
            for ch in range(c):
                logits, vals = [], []
                if overlap:
                    for j in range(m * i, m * i + m):                 # series a: own window, [c:2c]
                        logits.append(score[b, j, c + ch] + ape[j - m * i, c + ch])
                        vals.append(kv[b, j, c + ch])
                    if i > 0:
                        for j in range(m * (i - 1), m * i):           # series b: previous window, [0:c]
                            logits.append(score[b, j, ch] + ape[j - m * (i - 1), ch])
                            vals.append(kv[b, j, ch])
                else:
                    for j in range(m * i, m * i + m):
                        logits.append(score[b, j, ch] + ape[j - m * i, ch])
                        vals.append(kv[b, j, ch])
                p = torch.stack(logits).double().softmax(0)
                out[b, i, ch] = (p * torch.stack(vals).double()).sum()
    return out


def wrong_swapped_halves(kv, score, ape, ratio, overlap):
    # the classic mistake: own window through [0:c], previous window through [c:2c]
    c = kv.shape[-1] // 2
    sw = lambda t: torch.cat([t[..., c:], t[..., :c]], -1)  # noqa: E731
    return compress_pool(sw(kv), sw(score), sw(ape), ratio, overlap)


def wrong_no_ape(kv, score, ape, ratio, overlap):
    return compress_pool(kv, score, torch.zeros_like(ape), ratio, overlap)


CASES = [(impl, right, ov, m) for impl, right in [(compress_pool, True), (wrong_swapped_halves, False),
                                                   (wrong_no_ape, False)]
         for ov, m in [(False, 4), (True, 4), (True, 2)] if ov or impl is not wrong_swapped_halves]


@pytest.mark.parametrize("impl,right,overlap,m", CASES)
def test_pool_matches_naive(impl, right, overlap, m):
    torch.manual_seed(0)
    c = 3
    w = (2 if overlap else 1) * c
    kv, score, ape = torch.randn(2, 4 * m, w), torch.randn(2, 4 * m, w), torch.randn(m, w)
    ok = torch.allclose(impl(kv, score, ape, m, overlap).double(), naive_pool(kv, score, ape, m, overlap), atol=1e-6)
    assert ok == right, "the reference must match; each deliberately wrong variant must be caught"


def test_csa_first_entry_ignores_missing_window_and_weights_sum_to_one():
    torch.manual_seed(1)
    kv, score, ape = torch.randn(1, 12, 8), torch.randn(1, 12, 8), torch.randn(4, 8)
    wts = pool_weights(kv, score, ape, 4, True)                 # [1, 3, 8, 4]
    assert wts.shape == (1, 3, 8, 4)
    assert torch.equal(wts[:, 0, :4], torch.zeros_like(wts[:, 0, :4]))   # i = 0: b-half weight 0
    assert (wts[:, 1:, :4] > 0).all()
    torch.testing.assert_close(wts.sum(2), torch.ones(1, 3, 4))
    # entry 1 depends on window 0 only through its [0:c] half
    kv2 = kv.clone()
    kv2[:, 0:4, 4:] += 100.0
    a, b = compress_pool(kv, score, ape, 4, True), compress_pool(kv2, score, ape, 4, True)
    assert torch.equal(a[:, 1:], b[:, 1:]) and not torch.equal(a[:, 0], b[:, 0])


def test_pool_bad_inputs():
    kv = torch.randn(1, 8, 6)
    with pytest.raises(ValueError, match="multiple of ratio"):
        compress_pool(kv[:, :7], kv[:, :7], torch.randn(4, 6), 4, False)
    with pytest.raises(ValueError, match="ape"):
        compress_pool(kv, kv, torch.randn(3, 6), 4, False)
    with pytest.raises(ValueError, match="same shape"):
        compress_pool(kv, kv[..., :4], torch.randn(4, 6), 4, False)
    with pytest.raises(ValueError, match="coff"):
        compress_pool(torch.randn(1, 8, 5), torch.randn(1, 8, 5), torch.randn(4, 5), 4, True)


def make(overlap, m=4, c=8, r=4):
    torch.manual_seed(3)
    comp = Compressor(16, c, m, overlap, inv_freq(r, 10000.0))
    with torch.no_grad():
        for p in comp.parameters():
            p.normal_()
    return comp


@pytest.mark.parametrize("overlap", [False, True])
def test_module_is_pool_norm_rope(overlap):
    comp = make(overlap)
    x = torch.randn(2, 14, 16)                                  # 3 full windows + 2 tokens dropped
    got = comp(x)
    kv, score = comp.project(x[:, :12])
    pooled = naive_pool(kv, score, comp.ape.detach(), 4, overlap).float()
    normed = comp.norm(pooled)
    cos, sin = cos_sin(comp.rope_freqs, torch.tensor([0, 4, 8]))    # entry i at position m·i
    torch.testing.assert_close(got, apply_rope(normed, cos, sin), atol=1e-5, rtol=1e-5)
    wrong_cos, wrong_sin = cos_sin(comp.rope_freqs, torch.tensor([0, 1, 2]))
    assert not torch.allclose(got, apply_rope(normed, wrong_cos, wrong_sin), atol=1e-3)


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("chunks", [[1] * 23, [6, 1, 1, 9, 6], [3, 5, 15], [23]])
def test_streaming_equals_full(overlap, chunks):
    comp = make(overlap)
    x = torch.randn(2, 23, 16)
    full = comp(x)
    st, outs, s0 = CompressorState(), [], 0
    for n in chunks:
        outs.append(comp(x[:, s0:s0 + n], st))
        s0 += n
    got = torch.cat(outs, 1)
    assert got.shape == full.shape == (2, 5, 8)
    torch.testing.assert_close(got, full, atol=1e-5, rtol=1e-5)
    assert st.n_entries == 5 and st.pending_kv.shape[1] == 3     # 23 = 5·4 + 3 tokens still open
    assert (st.prev_kv is not None) == overlap
