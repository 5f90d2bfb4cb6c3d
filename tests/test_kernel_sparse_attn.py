"""kernels/sparse_attn.py == v4lab.attention.sparse_attn (Triton interpreter on CPU, small shapes).

Tolerance: fp32 inputs atol = rtol = 1e-5 (different summation order: online softmax in chunks vs one
softmax); bf16 inputs atol = rtol = 1e-2 (both compute in fp32, the outputs are rounded to bf16).
"""
import math

import pytest
import torch

from v4lab.attention import sparse_attn as ref
from v4lab.kernels.sparse_attn import sparse_attn as kern

TOL = dict(atol=1e-5, rtol=1e-5)


def _case(B=2, S=5, H=4, D=24, N=37, K=70, seed=0, invalid=0.3):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, S, H, D, generator=g)
    kv = torch.randn(B, N, D, generator=g)
    sink = torch.randn(H, generator=g)
    idx = torch.randint(0, N, (B, S, K), generator=g)
    idx[torch.rand(B, S, K, generator=g) < invalid] = -1
    return q, kv, sink, idx


@pytest.mark.parametrize("shape", [
    dict(),                                   # H, D not powers of two, K inside one chunk
    dict(B=1, S=3, H=5, D=16, N=300, K=150),  # K not a multiple of the 128-wide chunk: 2 chunks, last partial
    dict(B=1, S=2, H=20, D=40, N=9, K=1),     # H above 16: a 32-wide head block, 12 rows masked
    dict(B=1, S=2, H=4, D=8, N=5, K=40, invalid=0.0),  # duplicate picks, no −1
])
def test_matches_reference(shape):
    q, kv, sink, idx = _case(**shape)
    scale = 1 / math.sqrt(q.shape[-1])
    torch.testing.assert_close(kern(q, kv, sink, idx, scale), ref(q, kv, sink, idx, scale), **TOL)


def test_all_invalid_rows_give_zeros_and_sink_only_attention():
    q, kv, sink, idx = _case(S=4)
    idx[0, 1] = -1
    idx[1, 3] = -1
    o = kern(q, kv, sink, idx, 0.2)
    assert torch.equal(o[0, 1], torch.zeros_like(o[0, 1])) and torch.equal(o[1, 3], torch.zeros_like(o[1, 3]))
    torch.testing.assert_close(o, ref(q, kv, sink, idx, 0.2), **TOL)
    # K = 0: nothing to attend, only the sink
    empty = idx[..., :0]
    assert torch.equal(kern(q, kv, sink, empty, 0.2), torch.zeros_like(q))
    # −inf sink and an empty row: zeros, not NaN
    o = kern(q, kv, torch.full_like(sink, float("-inf")), idx, 0.2)
    assert not o.isnan().any() and torch.equal(o[0, 1], torch.zeros_like(o[0, 1]))


def test_sink_changes_the_result_and_is_matched():
    # A kernel that dropped the sink from the denominator would fail the comparison: check it would.
    q, kv, sink, idx = _case(seed=3, invalid=0.0)
    good = ref(q, kv, sink, idx, 0.3)
    no_sink = ref(q, kv, torch.full_like(sink, float("-inf")), idx, 0.3)
    assert not torch.allclose(good, no_sink, **TOL)
    torch.testing.assert_close(kern(q, kv, sink, idx, 0.3), good, **TOL)


def test_v4_window_plus_compressed_lists():
    # The lists V4 builds: window slots (−1 before the sequence start), then HCA-visible compressed
    # entries s < (t+1)//m offset by the raw length, −1 for not-yet-ready ones.
    B, S, H, D, W, m = 1, 12, 4, 32, 4, 3
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, S, H, D, generator=g)
    n_comp = S // m
    kv = torch.randn(B, S + n_comp, D, generator=g) * 3      # large logits: the online max matters
    sink = torch.randn(H, generator=g)
    t = torch.arange(S)[:, None]
    win = t - W + 1 + torch.arange(W)[None]
    win = torch.where(win >= 0, win, -1)
    s = torch.arange(n_comp)[None]
    comp = torch.where(s < (t + 1) // m, S + s, -1)
    idx = torch.cat([win, comp], 1)[None].expand(B, -1, -1).contiguous()
    torch.testing.assert_close(kern(q, kv, sink, idx, 1.0), ref(q, kv, sink, idx, 1.0), **TOL)


def test_bf16_inputs():
    q, kv, sink, idx = _case(seed=2)
    o = kern(q.bfloat16(), kv.bfloat16(), sink, idx, 0.2)
    assert o.dtype == torch.bfloat16
    torch.testing.assert_close(o.float(), ref(q.bfloat16(), kv.bfloat16(), sink, idx, 0.2).float(),
                               atol=1e-2, rtol=1e-2)


def test_int32_idx_and_bad_inputs():
    q, kv, sink, idx = _case()
    torch.testing.assert_close(kern(q, kv, sink, idx.int(), 0.2), ref(q, kv, sink, idx, 0.2), **TOL)
    with pytest.raises(ValueError, match="idx"):
        kern(q, kv, sink, idx.clamp(max=kv.shape[1]) + 1, 0.2)
    with pytest.raises(ValueError, match="idx"):
        kern(q, kv, sink, idx - 2, 0.2)
    with pytest.raises(ValueError, match="attn_sink"):
        kern(q, kv, sink[:-1], idx, 0.2)
    with pytest.raises(ValueError, match="kv"):
        kern(q, kv[..., :-1], sink, idx, 0.2)
    with pytest.raises(ValueError, match="idx.dtype"):
        kern(q, kv, sink, idx.float(), 0.2)


@pytest.mark.parametrize("layer_id", [0, 1, 2])   # tiny: window, CSA, HCA
def test_attention_layer_with_kernel_equals_reference(layer_id):
    # The kernel drops into v4lab.attention.Attention through `switches.kernels`: prefill then two
    # decode steps must match the reference path.
    from v4lab.attention import Attention
    from v4lab.config import get_config
    cfg = get_config("tiny")
    torch.manual_seed(0)
    attn = Attention(cfg, layer_id).eval()
    with torch.no_grad():
        attn.attn_sink.normal_()
    x = torch.randn(1, 22, cfg.hidden_size)
    outs = []
    for fn in (ref, kern):
        attn.switches.kernels = fn is kern
        cache = attn.new_cache(1)
        with torch.no_grad():
            y = [attn(x[:, :20], 0, cache), attn(x[:, 20:21], 20, cache), attn(x[:, 21:], 21, cache)]
        outs.append(torch.cat(y, 1))
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
