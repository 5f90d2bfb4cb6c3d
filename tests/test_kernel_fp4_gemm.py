"""kernels/fp4_gemm.py == v4lab.quant.fp4_gemm_ref (interpreter on CPU; compiled on a GPU)."""
import pytest
import torch

from v4lab import quant as Q
from v4lab.kernels.fp4_gemm import fp4_gemm

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _case(M, N, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * torch.logspace(-2, 2, N)[:, None]   # rows with very different scales
    pk, s = Q.mxfp4_quantize(w)
    x = torch.randn(M, K, generator=g)
    return x, pk, s


# (M, N, K): exact tiles, ragged M/N, K with a partial last chunk (160 = 128 + 32), decode-like M = 1
@pytest.mark.parametrize("M,N,K", [(64, 64, 128), (33, 80, 160), (1, 64, 256)])
def test_fp4_gemm_equals_reference(M, N, K):
    x, pk, s = _case(M, N, K)
    want = Q.fp4_gemm_ref(x, pk, s)
    got = fp4_gemm(x.to(DEV), pk.to(DEV), s.to(DEV)).cpu()
    assert got.shape == (M, N) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_fp4_gemm_storage_dtypes_and_nan_scale():
    x, pk, s = _case(16, 64, 128, seed=1)
    s = s.clone()
    s[5, 2] = 255                                        # NaN scale: row 5 of W is NaN -> column 5 of y
    want = Q.fp4_gemm_ref(x, pk, s)
    got = fp4_gemm(x.to(DEV), pk.view(torch.int8).to(DEV), s.view(torch.float8_e8m0fnu).to(DEV)).cpu()
    assert torch.isnan(got[:, 5]).all() and torch.equal(torch.isnan(got), torch.isnan(want))
    ok = ~torch.isnan(want)
    torch.testing.assert_close(got[ok], want[ok], rtol=1e-5, atol=1e-4)


def test_fp4_gemm_catches_a_swapped_nibble_weight():
    # the kernel must read element 2j from the low nibble: swapping nibbles changes the product
    x, pk, s = _case(16, 64, 128, seed=2)
    swapped = ((pk & 0xF) << 4) | (pk >> 4)
    want = Q.fp4_gemm_ref(x, pk, s)
    assert not torch.allclose(fp4_gemm(x, swapped, s), want, atol=1e-3)


def test_fp4_gemm_bad_shapes():
    x, pk, s = _case(4, 64, 128)
    with pytest.raises(ValueError, match="K must be a multiple of 32"):
        fp4_gemm(torch.randn(4, 96), pk, s)
    with pytest.raises(ValueError, match="scales.shape"):
        fp4_gemm(x, pk, s[:, :2])
