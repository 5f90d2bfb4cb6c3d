"""kernels/quant.py (MXFP4 activation fake-quant) == v4lab.quant.fp4_act_quant, bit for bit."""
import pytest
import torch

from v4lab import quant as Q
from v4lab.kernels.quant import fp4_act_quant

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _bits_equal(a, b):
    """Bit-identical, NaN positions included (NaN payloads not compared); -0 != +0."""
    na, nb = torch.isnan(a), torch.isnan(b)
    return torch.equal(na, nb) and torch.equal(a[~na].view(torch.int32), b[~nb].view(torch.int32))


def _hard_input():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 64, generator=g) * torch.logspace(-30, 30, 96)[:, None]   # scales over 200 binades
    # exact ties of the grid at scale 1 (amax 6 keeps the scale at 1), signed zeros, tiny values
    x[0, :16] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0,
                              -0.25, -2.5, -5.0, -0.0, 0.0, -1e-3, 4.9, 5.1])
    x[0, 16:32] = 0.1
    x[1] = 0.0                                            # all-zero block: the amax floor
    x[2, :32] = 1e-42                                     # denormal inputs
    x[3, 40] = float("nan")
    x[4, 3] = float("inf")
    x[5, 33] = -float("inf")
    return x


def test_fp4_act_quant_kernel_bit_exact():
    x = _hard_input()
    got = fp4_act_quant(x.to(DEV)).cpu()
    want = Q.fp4_act_quant(x)
    assert _bits_equal(got, want)
    assert got[0, 11].item() == 0 and torch.signbit(got[0, 11])       # -0 survives
    assert torch.isnan(got[3, 32:]).all() and torch.isfinite(got[3, :32]).all()


@pytest.mark.parametrize("shape,block,dtype", [((3, 5, 128), 32, torch.float32), ((7, 64), 64, torch.float32),
                                               ((4, 96), 32, torch.bfloat16)])
def test_fp4_act_quant_kernel_shapes_dtypes(shape, block, dtype):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    got = fp4_act_quant(x.to(DEV), block).cpu()
    want = Q.fp4_act_quant(x, block)
    assert got.dtype == dtype and got.shape == x.shape
    assert _bits_equal(got.float(), want.float())


def test_fp4_act_quant_kernel_ties_to_even_not_half_up():
    # the tie row separates round-half-even from half-up, so the bit-exact comparison above has teeth
    x = _hard_input()[:1]
    wrong = torch.floor(x / 1.0 * 2 + 0.5) / 2            # half-up at scale 1 for |x| < 2 (x[0] has amax 6)
    got = fp4_act_quant(x.to(DEV)).cpu()
    assert got[0, 0].item() == 0.0 and wrong[0, 0].item() == 0.5   # 0.25 -> 0 (even), half-up gives 0.5
    assert got[0, 2].item() == 1.0 and wrong[0, 2].item() == 1.5   # 1.25 -> 1


def test_fp4_act_quant_kernel_bad_block():
    with pytest.raises(ValueError, match="multiple of the block size 32"):
        fp4_act_quant(torch.randn(2, 48))
