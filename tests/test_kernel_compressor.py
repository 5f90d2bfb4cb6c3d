"""kernels/compressor.py == v4lab.compressor.compress_pool (Triton interpreter on CPU, small shapes).

Tolerance: atol = rtol = 1e-5 in fp32 (exp and the slot sums run in a different order).
Partial windows are not this op's business: the caller parks them in its state buffer, and the op
rejects an n that is not a multiple of the ratio (tested below).
"""
import pytest
import torch

from v4lab.compressor import compress_pool as ref
from v4lab.kernels.compressor import compress_pool as kern

TOL = dict(atol=1e-5, rtol=1e-5)


def _case(B, n, w, ratio, seed=0, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, n, w, generator=g), torch.randn(B, n, w, generator=g) * spread,
            torch.randn(ratio, w, generator=g))


@pytest.mark.parametrize("B,windows,c,ratio,overlap", [
    (2, 3, 20, 4, True),      # CSA: entry 0 has no previous window; c not a power of two
    (1, 1, 16, 4, True),      # CSA with a single window: only the own-window slots count
    (2, 4, 12, 3, True),      # a ratio that is not a power of two (padded slots)
    (2, 3, 20, 8, False),     # HCA-style, plain windows
    (1, 2, 8, 128, False),    # the released HCA ratio
])
def test_matches_reference(B, windows, c, ratio, overlap):
    coff = 2 if overlap else 1
    kv, score, ape = _case(B, windows * ratio, coff * c, ratio)
    out = kern(kv, score, ape, ratio, overlap)
    assert out.shape == (B, windows, c) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref(kv, score, ape, ratio, overlap), **TOL)


def test_large_logits_are_stable():
    kv, score, ape = _case(2, 12, 32, 4, seed=1, spread=200.0)
    for overlap in (True, False):
        out = kern(kv, score, ape, 4, overlap)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, ref(kv, score, ape, 4, overlap), **TOL)


def test_overlap_halves_are_not_swapped():
    # A kernel that pooled the previous window through the [c:2c] half (HF's letter swap done in the
    # math, not just the names) must fail the comparison: check that such a variant differs.
    kv, score, ape = _case(1, 12, 16, 4, seed=2)
    swap = lambda t: torch.cat([t[..., 8:], t[..., :8]], -1)  # noqa: E731
    assert not torch.allclose(ref(swap(kv), swap(score), swap(ape), 4, True), ref(kv, score, ape, 4, True), **TOL)
    torch.testing.assert_close(kern(kv, score, ape, 4, True), ref(kv, score, ape, 4, True), **TOL)


def test_bf16_inputs_and_empty():
    kv, score, ape = _case(1, 8, 16, 4, seed=3)
    torch.testing.assert_close(kern(kv.bfloat16(), score.bfloat16(), ape, 4, True),
                               ref(kv.bfloat16(), score.bfloat16(), ape, 4, True), **TOL)
    assert kern(kv[:, :0], score[:, :0], ape, 4, True).shape == (1, 0, 8)


def test_bad_inputs():
    kv, score, ape = _case(1, 10, 16, 4)
    with pytest.raises(ValueError, match="multiple of ratio"):
        kern(kv, score, ape, 4, True)
    kv, score, ape = kv[:, :8], score[:, :8], ape
    with pytest.raises(ValueError, match="'ape'"):
        kern(kv, score, ape[:2], 4, True)
    with pytest.raises(ValueError, match="'score'"):
        kern(kv, score[..., :4], ape, 4, True)
    with pytest.raises(ValueError, match="'ratio'"):
        kern(kv, score, ape, 0, True)
    with pytest.raises(ValueError, match="coff=2"):
        kern(kv[..., :15], score[..., :15], ape[:, :15], 4, True)


def test_compressor_module_with_kernel_equals_reference():
    # Drop-in through Compressor.switches.kernels, streaming in uneven pieces (partial windows parked in state).
    from v4lab.compressor import Compressor, CompressorState
    from v4lab.rope import inv_freq
    torch.manual_seed(0)
    for ratio, overlap in ((4, True), (8, False)):
        comp = Compressor(32, 16, ratio, overlap, inv_freq(8, 10000.0)).eval()
        with torch.no_grad():
            comp.ape.normal_()
        x = torch.randn(2, 27, 32)
        outs = []
        for fn in (ref, kern):
            comp.switches.kernels = fn is kern
            st = CompressorState()
            with torch.no_grad():
                outs.append(torch.cat([comp(x[:, a:b], st) for a, b in ((0, 6), (6, 7), (7, 27))], 1))
        assert outs[0].shape[1] == 27 // ratio
        torch.testing.assert_close(outs[1], outs[0], **TOL)
