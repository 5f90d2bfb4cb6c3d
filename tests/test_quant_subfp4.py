"""Sub-FP4 MX formats (E1M1, E2M0 FP3; ternary FP2) beside MXFP4: code tables, ties to even, scale choice."""
import pytest
import torch

from v4lab import quant as q


@pytest.mark.parametrize("fmt,table", [
    ("e1m1", [0.0, 0.5, 1.0, 1.5, -0.0, -0.5, -1.0, -1.5]),
    ("e2m0", [0.0, 1.0, 2.0, 4.0, -0.0, -1.0, -2.0, -4.0]),
    ("ternary", [0.0, 1.0, -0.0, -1.0]),
    ("e2m1", list(q.E2M1_VALUES) + [-v for v in q.E2M1_VALUES]),
])
def test_decode_table_and_encode_round_trip(fmt, table):
    codes = torch.arange(len(table), dtype=torch.uint8)
    vals = q.minifloat_decode(codes, fmt)
    assert vals.tolist() == table
    assert torch.equal(torch.signbit(vals), torch.tensor([c >= len(table) // 2 for c in range(len(table))]))
    assert torch.equal(q.minifloat_encode(vals, fmt), codes)          # -0 keeps its own code


def test_e2m1_through_the_generic_path_is_mxfp4_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 256, generator=g) * torch.logspace(-3, 3, 256)
    assert torch.equal(q.minifloat_round(x, "e2m1"), q.e2m1_round(x))
    assert torch.equal(q.minifloat_encode(x, "e2m1"), q.e2m1_encode(x))
    assert torch.equal(q.mx_fake_quant(x, "e2m1"), q.fp4_fake_quant(x))


@pytest.mark.parametrize("fmt,inputs,expected", [
    # halfway points go to the even magnitude code
    ("e1m1", [0.25, 0.75, 1.25, 2.0, -0.2], [0.0, 1.0, 1.0, 1.5, -0.0]),          # codes 0|1 -> 0, 1|2 -> 2, 2|3 -> 2
    ("e2m0", [0.5, 1.5, 3.0, 2.9, 3.1, 9.0], [0.0, 2.0, 2.0, 2.0, 4.0, 4.0]),     # 0|1 -> 0, 1|2 -> 2, 2|3 -> 2
    ("ternary", [0.5, 0.50001, 0.49999, -7.0], [0.0, 1.0, 0.0, -1.0]),
])
def test_round_to_nearest_even_and_saturation(fmt, inputs, expected):
    out = q.minifloat_round(torch.tensor(inputs), fmt)
    assert out.tolist() == expected
    assert torch.equal(torch.signbit(out), torch.signbit(torch.tensor(expected)))


@pytest.mark.parametrize("fmt,qmax", [("e1m1", 1.5), ("e2m0", 4.0), ("ternary", 1.0)])
@pytest.mark.parametrize("block", [32, 16, 8])
def test_block_scale_is_smallest_power_of_two_that_does_not_clip(fmt, qmax, block):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(4, 64, generator=g) * 0.02
    codes, scales = q.mx_quantize(w, fmt, block)
    assert codes.shape == w.shape and scales.shape == (4, 64 // block) and scales.dtype == torch.uint8
    s = q.e8m0_to_float(scales)
    amax = w.reshape(4, -1, block).abs().amax(-1)
    assert bool((amax <= qmax * s).all()) and bool((amax > qmax * s / 2).all())     # no clip, and minimal
    deq = q.mx_dequantize(codes, scales, fmt, block)
    assert torch.equal(deq, q.mx_fake_quant(w, fmt, block))
    # every block's largest element lands within half a grid step of the top of the grid's range
    assert bool(((deq - w).abs() <= s.repeat_interleave(block, -1) * qmax / 2).all())


def test_scale_exact_power_of_two_amax():
    w = torch.zeros(1, 32)
    w[0, 3] = 3.0                                       # amax/qmax for e1m1 = 2 = 2^1 exactly -> scale 2
    codes, scales = q.mx_quantize(w, "e1m1")
    assert q.e8m0_to_float(scales).item() == 2.0 and q.mx_dequantize(codes, scales, "e1m1")[0, 3] == 3.0


def test_bits_per_weight_and_error_order():
    assert q.bits_per_weight("e2m1") == 4.25 and q.bits_per_weight("e1m1", 16) == 3.5
    assert q.bits_per_weight("ternary", 8) == 3.0
    g = torch.Generator().manual_seed(2)
    w = torch.randn(64, 256, generator=g)
    sq = {f: q.sqnr_db(w, q.mx_fake_quant(w, f)) for f in ("e2m1", "e1m1", "e2m0", "ternary")}
    assert sq["e2m1"] > max(sq["e1m1"], sq["e2m0"]) > sq["ternary"] > 0
    assert q.sqnr_db(w, q.mx_fake_quant(w, "e1m1", 8)) > sq["e1m1"]   # smaller blocks: tighter scales


def test_ste_gradient_passes_straight_through():
    w = torch.randn(2, 32, requires_grad=True)
    y = q.mx_fake_quant_ste(w, "e2m0")
    assert torch.equal(y.detach(), q.mx_fake_quant(w.detach(), "e2m0"))
    y.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))


def test_bad_input_names_key_value_and_rule():
    with pytest.raises(ValueError, match="fmt = 'fp3'"):
        q.mx_fake_quant(torch.zeros(1, 32), "fp3")
    with pytest.raises(ValueError, match="multiple of the block size 32"):
        q.mx_quantize(torch.zeros(1, 40), "e1m1")
    with pytest.raises(ValueError, match="3 bits"):
        q.minifloat_decode(torch.tensor([8], dtype=torch.uint8), "e1m1")
    with pytest.raises(ValueError, match="non-finite"):
        q.mx_quantize(torch.full((1, 32), float("nan")), "e2m0")
    with pytest.raises(ValueError, match="NaN"):
        q.minifloat_encode(torch.tensor([float("nan")]), "ternary")
