"""mHC reference (v4lab.mhc): official Sinkhorn convention, transposed use, modes, gradients, diagnostics."""
import math
import types

import pytest
import torch

from v4lab import mhc

EPS = 1e-6


def _params(n, d, seed=0, logit_scale=3.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    R = (2 + n) * n
    fn = torch.randn(R, n * d, generator=g, dtype=dtype) * 0.5
    base = torch.randn(R, generator=g, dtype=dtype)
    scale = torch.tensor([1.0, 1.0, logit_scale], dtype=dtype)
    return fn, scale, base


def _x(B, S, n, d, seed=1, dtype=torch.float32):
    return torch.randn(B, S, n, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _oracle_token(X, fn, scale, base, rms_eps, hc_eps, iters):
    """Spec §5.3 steps 1-7 for one token X [n, d], written out with Python loops (float64)."""
    n = X.shape[0]
    v = X.reshape(-1).double()
    r = 1.0 / torch.sqrt((v * v).mean() + rms_eps)
    m = [float((fn[i].double() * v).sum()) * float(r) for i in range(fn.shape[0])]
    sig = lambda z: 1.0 / (1.0 + math.exp(-float(z)))  # noqa: E731
    pre = [sig(scale[0] * m[i] + base[i]) + hc_eps for i in range(n)]
    post = [2 * sig(scale[1] * m[n + i] + base[n + i]) for i in range(n)]
    Rm = [[float(scale[2] * m[2 * n + n * j + k] + base[2 * n + n * j + k]) for k in range(n)] for j in range(n)]
    C = []
    for j in range(n):
        mx = max(Rm[j])
        e = [math.exp(Rm[j][k] - mx) for k in range(n)]
        C.append([e[k] / sum(e) + hc_eps for k in range(n)])

    def colnorm():
        for k in range(n):
            s = sum(C[j][k] for j in range(n)) + hc_eps
            for j in range(n):
                C[j][k] /= s

    def rownorm():
        for j in range(n):
            s = sum(C[j]) + hc_eps
            C[j] = [c / s for c in C[j]]

    colnorm()
    for _ in range(iters - 1):
        rownorm()
        colnorm()
    u = sum(pre[i] * X[i].double() for i in range(n))
    return u, torch.tensor(post, dtype=torch.float64), torch.tensor(C, dtype=torch.float64)


# ------------------------------------------------------------------------------------ official semantics
def _sinkhorn_row_last(logits, iters, eps, trace=None):
    """A plausible wrong port: same rounds, but ending on a row normalisation (rows of comb sum to 1)."""
    c = torch.softmax(logits, dim=-1) + eps
    for _ in range(iters):
        c = c / (c.sum(-2, keepdim=True) + eps)
        c = c / (c.sum(-1, keepdim=True) + eps)
    return c


@pytest.mark.parametrize("wrong", [None, _sinkhorn_row_last])
def test_hc_pre_matches_loop_oracle(wrong, monkeypatch):
    if wrong is not None:
        monkeypatch.setattr(mhc, "_sinkhorn", wrong)
    n, d = 4, 8
    fn, scale, base = _params(n, d, logit_scale=10.0)
    x = _x(2, 2, n, d)
    u, post, comb = mhc.hc_pre(x, fn, scale, base, rms_eps=EPS, hc_eps=EPS, iters=20)
    errs = []
    for b in range(2):
        for s in range(2):
            u_o, post_o, comb_o = _oracle_token(x[b, s], fn, scale, base, EPS, EPS, 20)
            torch.testing.assert_close(u[b, s].double(), u_o, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(post[b, s].double(), post_o, atol=1e-6, rtol=1e-6)
            errs.append(float((comb[b, s].double() - comb_o).abs().max()))
    assert (max(errs) < 1e-5) == (wrong is None), errs


def test_hc_pre_matches_transformers_port():
    """HF transformers' DeepseekV4HyperConnection (an independent port) gives the same post/comb/u."""
    modeling = pytest.importorskip("transformers.models.deepseek_v4.modeling_deepseek_v4")
    n, d = 4, 16
    cfg = types.SimpleNamespace(hc_mult=n, hc_sinkhorn_iters=20, hc_eps=EPS, rms_norm_eps=EPS, hidden_size=d)
    hf = modeling.DeepseekV4HyperConnection(cfg)
    fn, scale, base = _params(n, d)
    with torch.no_grad():
        hf.fn.copy_(fn), hf.scale.copy_(scale), hf.base.copy_(base)
    x = _x(2, 5, n, d)
    post_h, comb_h, u_h = hf(x)
    u, post, comb = mhc.hc_pre(x, fn, scale, base, rms_eps=EPS, hc_eps=EPS, iters=20)
    torch.testing.assert_close(u, u_h, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(post, post_h, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(comb, comb_h, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("logit_scale", [1.0, 3.0, 10.0])
def test_official_convention_columns_of_comb_rows_of_h_res_sum_to_one(logit_scale):
    """20 iterations ending on a column normalisation: columns of comb = rows of H^res = combᵀ sum to 1."""
    logits = logit_scale * torch.randn(256, 4, 4, generator=torch.Generator().manual_seed(0))
    comb = mhc.sinkhorn(logits, 20, EPS)
    assert (comb.sum(-2) - 1).abs().max() < 1e-5          # columns of comb
    assert (mhc.h_res(comb).sum(-1) - 1).abs().max() < 1e-5  # rows of H^res: the exact forward gain
    if logit_scale >= 3:                                   # ... while rows of comb are visibly off
        assert (comb.sum(-1) - 1).abs().max() > 1e-3


def test_hc_pre_comb_columns_sum_to_one():
    fn, scale, base = _params(4, 8, logit_scale=10.0)
    _, _, comb = mhc.hc_pre(_x(2, 8, 4, 8), fn, scale, base, rms_eps=EPS, hc_eps=EPS, iters=20)
    assert (comb.sum(-2) - 1).abs().max() < 1e-5


def test_row_sums_approach_one_as_iterations_grow():
    logits = 3.0 * torch.randn(64, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    e = mhc.sinkhorn_errors(logits, 300, EPS)
    r = e["row_err"]
    assert r[0] > r[4] > r[19] > r[99] > r[299]
    assert r[299] < 1e-3 and r[0] > 0.5
    assert max(e["col_err"][1:]) < 1e-4                     # columns are fixed from the first round on
    mild_logits = torch.randn(64, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mild = mhc.sinkhorn_errors(mild_logits, 20, EPS)
    assert mild["row_err"][-1] < 1e-5


def test_non_negative_and_bounded():
    fn, scale, base = _params(4, 8, logit_scale=10.0)
    _, post, comb = mhc.hc_pre(_x(2, 8, 4, 8), fn, scale, base, rms_eps=EPS, hc_eps=EPS, iters=20)
    pre, _, _ = mhc.hc_pre_coeffs(_x(2, 8, 4, 8).view(16, 32), fn, scale, base, EPS, EPS, 20)
    assert (comb >= 0).all() and (comb <= 1 + 1e-6).all()
    assert (pre >= EPS).all() and (pre <= 1 + EPS).all()
    assert (post > 0).all() and (post < 2).all()


def _right_post(o, x, post, comb):
    return mhc.hc_post(o, x, post, comb)


def _swapped_post(o, x, post, comb):          # the classic porting bug: comb[j, i] instead of comb[i, j]
    return mhc.hc_post(o, x, post, comb.transpose(-1, -2))


@pytest.mark.parametrize("post_fn,correct", [(_right_post, True), (_swapped_post, False)])
def test_transposed_use_is_caught(post_fn, correct):
    """Copies of one vector stay copies under the official (column-stochastic) use; the swap breaks it."""
    n, d = 4, 8
    fn, scale, base = _params(n, d, logit_scale=10.0)
    x = mhc.init_streams(_x(1, 16, 1, d)[:, :, 0], n)
    _, post, comb = mhc.hc_pre(x, fn, scale, base, rms_eps=EPS, hc_eps=EPS, iters=20)
    y = post_fn(torch.zeros(1, 16, d), x, post, comb)
    err = (y - x).abs().max()
    assert (err < 1e-4) == correct, float(err)
    # and an explicit per-stream loop of X'_j = post_j·o + Σ_i comb[i, j]·X_i
    o = _x(1, 16, 1, d, seed=5)[:, :, 0]
    xs = _x(1, 16, n, d, seed=6)
    loop = torch.stack([post[..., j, None] * o + sum(comb[..., i, j, None] * xs[..., i, :] for i in range(n))
                        for j in range(n)], dim=2)
    assert torch.allclose(post_fn(o, xs, post, comb), loop, atol=1e-5) == correct


def test_n1_reduces_to_identity_residual():
    d = 8
    fn, scale, base = _params(1, d, logit_scale=10.0)
    x = _x(2, 3, 1, d)
    u, post, comb = mhc.hc_pre(x, fn, scale, base, rms_eps=EPS, hc_eps=EPS, iters=20)
    assert (comb - 1).abs().max() < 1e-5                  # H^res = [1]
    o = _x(2, 3, 1, d, seed=3)[:, :, 0]
    torch.testing.assert_close(mhc.hc_post(o, x, post, comb), x + post[..., None] * o[:, :, None], atol=1e-5,
                               rtol=1e-5)


def test_residual_mode_is_the_plain_residual():
    n, d = 4, 8
    fn, scale, base = _params(n, d)
    e = _x(2, 3, 1, d)[:, :, 0]
    x = mhc.init_streams(e, n)
    u, post, comb = mhc.hc_pre(x, fn, scale, base, rms_eps=EPS, hc_eps=EPS, iters=20, mode="residual")
    assert torch.equal(u, e)
    o = _x(2, 3, 1, d, seed=9)[:, :, 0]
    y = mhc.hc_post(o, x, post, comb)
    for j in range(n):
        torch.testing.assert_close(y[:, :, j], e + o)
    assert torch.equal(mhc.hc_head(y, None, None, None, rms_eps=EPS, hc_eps=EPS, mode="residual"), y[:, :, 0])


def test_hc_mode_is_identity_plus_logits():
    n, d = 4, 8
    fn, scale, base = _params(n, d)
    x = _x(1, 2, n, d)
    pre_m, post_m, _ = mhc.hc_pre_coeffs(x.view(2, -1), fn, scale, base, EPS, EPS, 20)
    pre, post, comb = mhc.hc_pre_coeffs(x.view(2, -1), fn, scale, base, EPS, EPS, 20, mode="hc")
    v = x.view(2, -1)
    m = (v @ fn.T) / v.pow(2).mean(-1, keepdim=True).add(EPS).sqrt()
    expect = torch.eye(n) + (scale[2] * m[:, 2 * n:] + base[2 * n:]).view(2, n, n)
    torch.testing.assert_close(comb, expect, atol=1e-5, rtol=1e-5)
    assert torch.equal(pre, pre_m) and torch.equal(post, post_m)


def test_hc_head_and_bf16():
    n, d = 4, 8
    g = torch.Generator().manual_seed(0)
    fn, base, scale = torch.randn(n, n * d, generator=g), torch.randn(n, generator=g), torch.tensor([0.7])
    x = _x(2, 3, n, d).bfloat16()
    y = mhc.hc_head(x, fn, scale, base, rms_eps=EPS, hc_eps=EPS)
    assert y.dtype == torch.bfloat16
    xf = x.float().view(6, -1)
    p = torch.sigmoid(scale * (xf @ fn.T) / xf.pow(2).mean(-1, keepdim=True).add(EPS).sqrt() + base) + EPS
    torch.testing.assert_close(y.float().view(6, d), (p[:, :, None] * xf.view(6, n, d)).sum(1), atol=2e-2, rtol=1e-2)
    fn3, scale3, base3 = _params(n, d)
    u, post, comb = mhc.hc_pre(x, fn3, scale3, base3, rms_eps=EPS, hc_eps=EPS, iters=20)
    assert u.dtype == torch.bfloat16 and post.dtype == torch.float32 and comb.dtype == torch.float32
    assert mhc.hc_post(u, x, post, comb).dtype == torch.bfloat16


# ------------------------------------------------------------------------------------ gradients
@pytest.mark.parametrize("mode", ["mhc", "hc"])
def test_gradcheck_float64(mode):
    n, d = 2, 2
    fn, scale, base = (t.requires_grad_() for t in _params(n, d, dtype=torch.float64))
    x = _x(1, 2, n, d, dtype=torch.float64).requires_grad_()
    o = _x(1, 2, 1, d, seed=4, dtype=torch.float64)[:, :, 0].requires_grad_()

    def f(x, fn, scale, base, o):
        u, post, comb = mhc.hc_pre(x, fn, scale, base, rms_eps=EPS, hc_eps=EPS, iters=20, mode=mode)
        return u, mhc.hc_post(o * u, x, post, comb)

    assert torch.autograd.gradcheck(f, (x, fn, scale, base, o), eps=1e-6, atol=1e-5)
    hfn = torch.randn(n, n * d, dtype=torch.float64, requires_grad=True)
    hs, hb = torch.tensor([0.5], dtype=torch.float64, requires_grad=True), torch.zeros(n, dtype=torch.float64,
                                                                                        requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, a, b, c: mhc.hc_head(x, a, b, c, rms_eps=EPS, hc_eps=EPS),
                                    (x, hfn, hs, hb), eps=1e-6, atol=1e-5)


# ------------------------------------------------------------------------------------ diagnostics
def test_composite_gains_by_hand():
    g = mhc.composite_gains(2 * torch.eye(4).expand(3, 4, 4))
    assert g["fwd_max"] == [2.0, 4.0, 8.0] and g["bwd_min"] == [2.0, 4.0, 8.0]
    perm = torch.eye(4)[[1, 2, 3, 0]]
    g = mhc.composite_gains(perm.expand(5, 4, 4))
    assert set(g["fwd_max"] + g["fwd_min"] + g["bwd_max"] + g["bwd_min"]) == {1.0}
    h = torch.tensor([[[1.0, 1.0], [0.0, 1.0]]])          # row sums 2, 1; column sums 1, 2
    g = mhc.composite_gains(h)
    assert (g["fwd_max"], g["fwd_min"], g["bwd_max"], g["bwd_min"]) == ([2.0], [1.0], [2.0], [1.0])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_surrogate_hc_explodes_mhc_stays_near_one(seed):
    from v4lab.experiments.mhc_stability import random_surrogate
    r = random_surrogate(60, seed)
    assert r["hc_peak"] > 2.0
    for key in ("fwd_max", "fwd_min", "bwd_max", "bwd_min"):
        assert all(0.9 <= v <= 1.1 for v in r["mhc"][key]), key


def test_module_init_names_and_diag():
    hc = mhc.HyperConnection(8, 4)
    assert dict((k, tuple(v.shape)) for k, v in hc.named_parameters()) == {
        "fn": (24, 32), "base": (24,), "scale": (3,)}
    assert torch.equal(hc.scale.data, torch.full((3,), 0.01)) and torch.equal(hc.base.data, torch.zeros(24))
    assert 0.015 < hc.fn.std() < 0.025
    head = mhc.HyperConnection(8, 4, head=True)
    assert tuple(head.fn.shape) == (4, 32) and tuple(head.scale.shape) == (1,)
    x = _x(1, 4, 4, 8)
    _, _, comb = hc(x)
    assert (comb - 0.25).abs().max() < 1e-2                # base 0: uniform mixing
    _, _, comb = hc.init_(diag=4.0)(x)
    assert (comb.diagonal(dim1=-2, dim2=-1) > 0.9).all()   # positive diagonal: near identity
    assert head(x).shape == (1, 4, 8)


def test_experiment_run_smoke():
    from v4lab.experiments.mhc_stability import run
    r = run(seed=0, n_sublayers=3, steps=2, batch=8)
    for v in ("residual", "hc", "mhc"):
        assert len(r[v]["loss"]) == 2 and all(torch.isfinite(torch.tensor(r[v]["grad_norm"])))
        assert len(r[v]["gains"]["final"]["amax"]) == 3 and len(r[v]["grad_norm_by_depth"]) == 3
    assert r["residual"]["gains"]["final"]["amax"] == [1.0, 1.0, 1.0]
    assert all(abs(g - 1) < 1e-3 for g in r["mhc"]["gains"]["final"]["amax"])


# ------------------------------------------------------------------------------------ bad inputs
def test_bad_inputs_raise_value_errors():
    n, d = 4, 8
    fn, scale, base = _params(n, d)
    kw = dict(rms_eps=EPS, hc_eps=EPS, iters=20)
    with pytest.raises(ValueError, match="hc_mult = 4"):
        mhc.hc_pre(_x(1, 2, 3, d), fn, scale, base, hc_mult=4, **kw)
    with pytest.raises(ValueError, match=r"fn.shape.*imply hc_mult = 4"):
        mhc.hc_pre(_x(1, 2, 3, d), fn, scale, base, **kw)
    with pytest.raises(ValueError, match="scale.shape"):
        mhc.hc_pre(_x(1, 2, n, d), fn, scale[:1], base, **kw)
    with pytest.raises(ValueError, match=r"x = \(2, 4, 8\)"):
        mhc.hc_pre(_x(1, 2, n, d)[0], fn, scale, base, **kw)
    with pytest.raises(ValueError, match="iters = 0"):
        mhc.hc_pre(_x(1, 2, n, d), fn, scale, base, rms_eps=EPS, hc_eps=EPS, iters=0)
    with pytest.raises(ValueError, match="mode"):
        mhc.hc_pre(_x(1, 2, n, d), fn, scale, base, mode="mHC", **kw)
    bad_x = _x(1, 2, n, d)
    bad_x[0, 1, 2, 3] = float("inf")
    with pytest.raises(ValueError, match="inf or nan"):
        mhc.hc_pre(bad_x, fn, scale, base, **kw)
    bad_fn = fn.clone()
    bad_fn[10, 0] = float("nan")
    with pytest.raises(ValueError, match="inf or nan"):
        mhc.hc_pre(_x(1, 2, n, d), bad_fn, scale, base, **kw)
    with pytest.raises(ValueError, match="inf or nan"):
        mhc.hc_pre(_x(1, 2, n, d), fn, scale, torch.full_like(base, float("inf")), **kw)
    with pytest.raises(ValueError, match="sinkhorn: logits"):
        mhc.sinkhorn(torch.tensor([[0.0, float("nan")], [1.0, 2.0]]), 20, EPS)
    with pytest.raises(ValueError, match="comb.shape"):
        mhc.hc_post(torch.zeros(1, 2, d), _x(1, 2, n, d), torch.ones(1, 2, n), torch.ones(1, 2, 3, 3))
    with pytest.raises(ValueError, match="fn.shape"):
        mhc.hc_head(_x(1, 2, n, d), fn, scale[:1], base[:n], rms_eps=EPS, hc_eps=EPS)
    with pytest.raises(ValueError, match="n = 0"):
        mhc.init_streams(torch.zeros(1, 2, d), 0)


@pytest.mark.parametrize("shape", [(4, 4), (7, 4, 4), (2, 5, 3, 3)])
def test_sinkhorn_token_last_layout_equals_the_reference_with_gradients(shape):
    """`sinkhorn` runs on a [n, n, T] layout for speed; `sinkhorn_rowmajor` is the plain reference."""
    from v4lab.mhc import sinkhorn, sinkhorn_rowmajor
    logits = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 2
    w = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    outs = []
    for fn in (sinkhorn, sinkhorn_rowmajor):
        x = logits.clone().requires_grad_(True)
        c = fn(x, 20, 1e-6)
        (c * w).sum().backward()
        outs.append((c.detach(), x.grad))
    assert outs[0][0].shape == shape
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(outs[0][1], outs[1][1], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(outs[0][0], torch.softmax(logits, -1))       # it did normalise columns


@pytest.mark.parametrize("n", [1, 4])
def test_mix_streams_equals_the_stream_by_stream_reference_with_gradients(n):
    """`mix_streams` (one broadcast product and a sum) against the written-out sum: values and gradients."""
    g = torch.Generator().manual_seed(3)
    w0, v0 = torch.randn(37, n, generator=g), torch.randn(37, n, 24, generator=g)
    gy = torch.randn(37, 24, generator=g)
    outs = []
    for fn in (mhc.mix_streams, mhc.mix_streams_reference):
        w, v = w0.clone().requires_grad_(), v0.clone().requires_grad_()
        y = fn(w, v)
        (y * gy).sum().backward()
        outs.append((y.detach(), w.grad, v.grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    # and the reference is what it says: stream i weighted by w[:, i]
    torch.testing.assert_close(outs[1][0][5], sum(w0[5, i] * v0[5, i] for i in range(n)), atol=1e-6, rtol=1e-6)
