"""Training fast paths (issue 21, `v4lab bench train`): each against its slow reference, forward and gradients."""
import pytest
import torch

from v4lab.attention import Attention
from v4lab.config import get_config
from v4lab.indexer import index_scores


def _tiny_attn(layer_id: int, seed: int = 0) -> Attention:
    torch.manual_seed(seed)
    a = Attention(get_config("tiny"), layer_id)
    with torch.no_grad():
        for p in a.parameters():
            p.normal_(0.0, 0.2)
    return a


def test_index_scores_in_place_relu_equals_the_graph_version():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 7, 3, 5, generator=g), torch.randn(2, 11, 5, generator=g)
    w = torch.randn(2, 7, 3, generator=g)
    with torch.no_grad():
        fast = index_scores(q, k, w)
    ref = index_scores(q.requires_grad_(), k, w)
    assert ref.requires_grad and torch.equal(fast, ref.detach())


@pytest.mark.parametrize("distill", [False, True])
def test_indexer_builds_a_graph_only_for_its_warm_up(distill):
    a = _tiny_attn(1).train()                                        # layer 1 of tiny: CSA
    assert a.kind == "csa"
    a.distill = distill
    x = torch.randn(1, 40, a.cfg.hidden_size, requires_grad=True)
    cache = a.new_cache(1)
    y = a(x, 0, cache)
    assert cache.index_keys.get().requires_grad == distill           # the indexer's keys: graph only for the warm-up
    loss = y.square().sum() + (a.last_distill[0] if distill else 0.0)
    loss.backward()
    got = a.indexer.wq_b.weight.grad
    assert (got is not None and float(got.abs().sum()) > 0) if distill else got is None
    assert x.grad is not None and float(x.grad.abs().sum()) > 0


def test_indexer_without_graph_keeps_the_attention_gradients():
    """The main attention's gradients do not depend on whether the indexer built a graph (warm-up on/off)."""
    a = _tiny_attn(1).double().train()
    x = torch.randn(1, 40, a.cfg.hidden_size, dtype=torch.float64, requires_grad=True)
    grads = []
    for distill in (False, True):
        a.distill = distill
        a.zero_grad(set_to_none=True)
        y = a(x, 0, None)
        gx, = torch.autograd.grad(y.sin().sum(), x, retain_graph=True)
        y.sin().sum().backward()
        grads.append((y.detach(), gx, {n: p.grad for n, p in a.named_parameters() if not n.startswith("indexer.")}))
    (y0, g0, p0), (y1, g1, p1) = grads
    assert torch.equal(y0, y1) and torch.allclose(g0, g1, rtol=1e-12, atol=1e-14) and float(g0.abs().sum()) > 0
    assert p0.keys() == p1.keys() and all(torch.allclose(p0[k], p1[k], rtol=1e-12, atol=1e-14) for k in p0)


# ------------------------------------------------------------------ the gather path's fused core
def _attn_case(B, S, H, D, N, K, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, S, H, D, generator=g, dtype=dtype, requires_grad=True)
    kv = torch.randn(B, N, D, generator=g, dtype=dtype, requires_grad=True)
    sink = torch.randn(H, generator=g, dtype=dtype, requires_grad=True)
    idx = torch.randint(-1, N, (B, S, K), generator=g)
    idx[0, 0] = -1                                   # a sink-only query
    if S > 1:
        idx[-1, 1, :2] = 0                           # a row listed twice counts twice
    return q, kv, sink, idx


def test_gathered_core_gradcheck_float64():
    """The Function itself (`sparse_attn_fused` computes in fp32, as its reference) in fp64: q, the gathered
    rows and the sink, with a sink-only query and a listed-twice row."""
    from v4lab.attention import _GatheredCore
    q, kv, sink, idx = _attn_case(2, 5, 3, 4, 7, 4)
    valid = (idx >= 0).reshape(10, 4)
    g = kv.detach()[0][idx.clamp(min=0).reshape(-1)].view(10, 4, 4).requires_grad_()
    assert torch.autograd.gradcheck(lambda q, g, s: _GatheredCore.apply(q, g, valid, s, 0.7),
                                    (q.detach().reshape(10, 3, 4).requires_grad_(), g, sink))


@pytest.mark.parametrize("S,H,N,K,empty_row", [(512, 4, 640, 24, True), (300, 4, 316, 32, True), (64, 2, 80, 16, True),
                                               (512, 4, 640, 24, False)])
def test_sparse_attn_fused_equals_the_reference_fp32(S, H, N, K, empty_row):
    from v4lab.attention import sparse_attn, sparse_attn_fused
    q, kv, sink, idx = (t.float().detach().requires_grad_() if t.is_floating_point() else t
                        for t in _attn_case(1, S, H, 64, N, K, seed=S))
    if not empty_row:                                # every query lists a row (as in training): no masking pass
        idx[0, 0, 0] = 5
    go = torch.randn(1, S, H, 64, generator=torch.Generator().manual_seed(9))
    outs = []
    for f in (sparse_attn, sparse_attn_fused):
        o = f(q, kv, sink, idx, 0.125)
        outs.append((o, *torch.autograd.grad(o, (q, kv, sink), go)))
    assert torch.equal(outs[0][0], outs[1][0])                  # the same forward ops: the same values
    assert (float(outs[0][0][0, 0].detach().abs().max()) == 0.0) == empty_row   # a sink-only query attends nothing
    for a, b in zip(outs[0][1:], outs[1][1:]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), float((a - b).abs().max())


def test_sparse_attn_fused_edge_sinks():
    """A −inf sink (the softmax is over the listed slots only) and a +large sink (all mass on the sink)."""
    from v4lab.attention import sparse_attn, sparse_attn_fused
    q, kv, _, idx = _attn_case(1, 6, 2, 4, 9, 3, seed=3)
    for value in (float("-inf"), 30.0):
        sink = torch.full((2,), value, dtype=torch.float64, requires_grad=True)
        got, want = (f(q, kv, sink, idx, 0.5) for f in (sparse_attn_fused, sparse_attn))
        assert torch.equal(got, want) and torch.isfinite(got).all()
        ga = torch.autograd.grad(got.sum(), (q, kv, sink))
        gb = torch.autograd.grad(want.sum(), (q, kv, sink))
        assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(ga, gb))


# ------------------------------------------------------------------ mHC: the RMS-scaled mixing logits
def test_mixes_gradcheck_float64():
    from v4lab.mhc import _mixes
    g = torch.Generator().manual_seed(0)
    v = torch.randn(6, 12, generator=g, dtype=torch.float64)
    v[2] = 0.0                                         # an all-zero token: 1/RMS = eps^−½, still differentiable
    fn = torch.randn(8, 12, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda v, fn: _mixes(v, fn, 1e-3), (v.requires_grad_(), fn.requires_grad_()))


@pytest.mark.parametrize("T", [1, 512, 2048])
def test_mixes_equals_the_reference_fp32(T):
    from v4lab.mhc import _mixes, _mixes_reference
    g = torch.Generator().manual_seed(T)
    v = (torch.randn(T, 512, generator=g) * 3).requires_grad_()
    fn = (torch.randn(24, 512, generator=g) * 0.02).requires_grad_()
    gm = torch.randn(T, 24, generator=g)
    got, want = _mixes(v, fn, 1e-6), _mixes_reference(v, fn, 1e-6)
    assert torch.equal(got, want)                                     # the same forward ops
    for a, b in zip(torch.autograd.grad(got, (v, fn), gm), torch.autograd.grad(want, (v, fn), gm)):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), float((a - b).abs().max())


def test_mixes_gradient_to_one_input_only():
    from v4lab.mhc import _mixes, _mixes_reference
    v, fn = torch.randn(5, 8), torch.randn(3, 8, requires_grad=True)
    a, = torch.autograd.grad(_mixes(v, fn, 1e-6).sum(), fn)
    b, = torch.autograd.grad(_mixes_reference(v, fn, 1e-6).sum(), fn)
    assert torch.allclose(a, b, atol=1e-6)


# ------------------------------------------------------------------ mHC: the Sinkhorn as one Function
@pytest.mark.parametrize("iters", [1, 2, 5])
def test_sinkhorn_function_gradcheck_float64(iters):
    from v4lab.mhc import _sinkhorn
    lg = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(iters)) * 2
    assert torch.autograd.gradcheck(lambda z: _sinkhorn(z, iters, 1e-6), (lg.requires_grad_(),))


@pytest.mark.parametrize("T,iters", [(1, 20), (512, 20), (2048, 20), (7, 1)])
def test_sinkhorn_function_equals_the_references_fp32(T, iters):
    """Forward: bit-equal to the explicit loop (`sinkhorn_errors`' traced path: the same ops) and close to the
    row-major reference; gradients: those of autograd through the row-major reference `sinkhorn_rowmajor`."""
    from v4lab.mhc import _sinkhorn, sinkhorn_rowmajor
    g = torch.Generator().manual_seed(T)
    lg = (torch.randn(1, T, 4, 4, generator=g) * 3).requires_grad_()
    gc = torch.randn(1, T, 4, 4, generator=g)
    got = _sinkhorn(lg, iters, 1e-6)
    assert torch.equal(got, _sinkhorn(lg.detach(), iters, 1e-6, trace=[]))
    want = sinkhorn_rowmajor(lg, iters, 1e-6)
    assert torch.allclose(got, want, atol=1e-6)
    a, = torch.autograd.grad(got, lg, gc)
    b, = torch.autograd.grad(want, lg, gc)
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), float((a - b).abs().max())


# ------------------------------------------------------------------ mHC: the post-mix as one Function
def _post_case(B, S, n, d, seed, dtype):
    from v4lab.mhc import _sinkhorn
    g = torch.Generator().manual_seed(seed)
    o, x = torch.randn(B, S, d, generator=g, dtype=dtype), torch.randn(B, S, n, d, generator=g, dtype=dtype)
    post = 2 * torch.rand(B, S, n, generator=g, dtype=dtype)
    comb = _sinkhorn(torch.randn(B, S, n, n, generator=g, dtype=dtype) * 2, 3, 1e-6)   # token-minor, as in the model
    return [t.detach().requires_grad_() for t in (o, x, post, comb)]


def test_hc_post_gradcheck_float64():
    from v4lab.mhc import hc_post
    assert torch.autograd.gradcheck(hc_post, tuple(_post_case(2, 3, 4, 5, 0, torch.float64)))


@pytest.mark.parametrize("S,n", [(1, 4), (512, 4), (2048, 4), (33, 1), (17, 3)])
def test_hc_post_equals_the_reference_fp32(S, n):
    from v4lab.mhc import hc_post, hc_post_reference
    args = _post_case(1, S, n, 128, S, torch.float32)
    gy = torch.randn(1, S, n, 128, generator=torch.Generator().manual_seed(1))
    got, want = hc_post(*args), hc_post_reference(*args)
    assert torch.equal(got, want)
    for a, b in zip(torch.autograd.grad(got, args, gy), torch.autograd.grad(want, args, gy)):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), float((a - b).abs().max())


def test_hc_post_bf16_streams_keep_their_dtype():
    from v4lab.mhc import hc_post, hc_post_reference
    o, x, post, comb = _post_case(1, 9, 4, 16, 2, torch.float32)
    args = (o.detach().bfloat16(), x.detach().bfloat16(), post.detach(), comb.detach())
    got = hc_post(*args)
    assert got.dtype == torch.bfloat16 and torch.equal(got, hc_post_reference(*args))


# ------------------------------------------------------------------ RMSNorm as one Function
@pytest.mark.parametrize("with_weight", [True, False])
def test_rms_norm_gradcheck_float64(with_weight):
    from v4lab.norm import _RMSNorm
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 6, generator=g, dtype=torch.float64)
    x[1, 2] = 0.0                                            # a zero row: 1/RMS = eps^−½
    w = torch.randn(6, generator=g, dtype=torch.float64).requires_grad_() if with_weight else None
    args = (x.requires_grad_(), w)
    assert torch.autograd.gradcheck(lambda x, w: _RMSNorm.apply(x, w, 1e-3), args)


@pytest.mark.parametrize("shape,with_weight", [((1, 2048, 128), True), ((1, 512, 4, 64), False), ((1, 1, 64), True)])
def test_rms_norm_equals_the_reference_fp32(shape, with_weight):
    from v4lab.norm import rms_norm, rms_norm_reference
    g = torch.Generator().manual_seed(len(shape))
    x = (torch.randn(*shape, generator=g) * 3).requires_grad_()
    w = (torch.randn(shape[-1], generator=g)).requires_grad_() if with_weight else None
    gy = torch.randn(*shape, generator=g)
    got, want = rms_norm(x, w, 1e-6), rms_norm_reference(x, w, 1e-6)
    assert torch.equal(got, want)
    inputs = (x, w) if with_weight else (x,)
    for a, b in zip(torch.autograd.grad(got, inputs, gy), torch.autograd.grad(want, inputs, gy)):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), float((a - b).abs().max())


def test_rms_norm_bf16_input_keeps_its_dtype_and_trains_the_fp32_weight():
    from v4lab.norm import rms_norm, rms_norm_reference
    x = torch.randn(5, 32).bfloat16().requires_grad_()
    w = torch.randn(32, requires_grad=True)
    got, want = rms_norm(x, w, 1e-6), rms_norm_reference(x, w, 1e-6)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    a, b = (torch.autograd.grad(y.float().sum(), (x, w)) for y in (got, want))
    assert a[0].dtype == torch.bfloat16 and torch.allclose(a[1], b[1], rtol=1e-3, atol=1e-3)
