"""Fused mHC pre-mix kernel (v4lab.kernels.mhc) == the reference v4lab.mhc.hc_pre_coeffs / hc_pre."""
import pytest
import torch

from v4lab import mhc
from v4lab.kernels import mhc as kmhc

EPS = 1e-6


def _case(n, d, T, seed=0, logit_scale=3.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    R = (2 + n) * n
    x = torch.randn(T, n * d, generator=g).to(dtype)
    fn = torch.randn(R, n * d, generator=g) * 0.5
    base = torch.randn(R, generator=g)
    scale = torch.tensor([1.0, 1.0, logit_scale])
    return x, fn, scale, base


@pytest.mark.parametrize("n,d,T,mode", [(4, 64, 100, "mhc"), (4, 16, 7, "hc"), (3, 8, 20, "mhc"),
                                        (1, 16, 5, "mhc"), (4, 16, 9, "residual")])
def test_kernel_equals_reference(n, d, T, mode):
    x, fn, scale, base = _case(n, d, T, logit_scale=10.0 if n == 4 else 3.0)
    ref = mhc.hc_pre_coeffs(x, fn, scale, base, EPS, EPS, 20, mode)
    out = kmhc.hc_pre_coeffs(x, fn, scale, base, EPS, EPS, 20, mode)
    for name, a, b in zip(("pre", "post", "comb"), out, ref):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a, b.float(), atol=2e-5, rtol=1e-5, msg=name)
    if mode == "mhc":
        assert (out[2].sum(-2) - 1).abs().max() < 1e-5


def test_kernel_iteration_count_matters():
    """A kernel running a different number of Sinkhorn rounds would not pass: the comparison is sharp."""
    x, fn, scale, base = _case(4, 16, 16, logit_scale=10.0)
    out = kmhc.hc_pre_coeffs(x, fn, scale, base, EPS, EPS, 20)[2]
    assert (out - mhc.hc_pre_coeffs(x, fn, scale, base, EPS, EPS, 19)[2]).abs().max() > 1e-4
    assert (out - mhc.hc_pre_coeffs(x, fn, scale, base, EPS, EPS, 20)[2]).abs().max() < 2e-5


def test_kernel_hc_pre_bf16():
    n, d = 4, 32
    x, fn, scale, base = _case(n, d, 24, dtype=torch.bfloat16)
    xs = x.view(2, 12, n, d)
    u, post, comb = kmhc.hc_pre(xs, fn, scale, base, rms_eps=EPS, hc_eps=EPS, iters=20)
    u_r, post_r, comb_r = mhc.hc_pre(xs, fn, scale, base, rms_eps=EPS, hc_eps=EPS, iters=20)
    assert u.dtype == torch.bfloat16
    torch.testing.assert_close(u.float(), u_r.float(), atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(post, post_r, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(comb, comb_r, atol=2e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_kernel_bad_inputs():
    x, fn, scale, base = _case(4, 8, 4)
    with pytest.raises(ValueError, match="fn.shape"):
        kmhc.hc_pre_coeffs(x[:, :24], fn, scale, base, EPS, EPS, 20)
    with pytest.raises(ValueError, match="hc_mult = 4"):
        kmhc.hc_pre(x.view(1, 4, 4, 8)[:, :, :3], fn, scale, base, rms_eps=EPS, hc_eps=EPS, iters=20, hc_mult=4)
    bad = fn.clone()
    bad[3, 0] = float("inf")                     # only a pre logit: σ would hide it without the NaN flag
    with pytest.raises(ValueError, match="inf or nan"):
        kmhc.hc_pre_coeffs(x, bad, scale, base, EPS, EPS, 20)
