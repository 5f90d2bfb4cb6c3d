"""FP4 (MXFP4) and FP8 formats, bit by bit (docs/design/v4-moe-mhc-fp4.md §6)."""
import math

import pytest
import torch

from v4lab import quant as Q

# ----------------------------------------------------------------------------- E2M1 codes
CODES = [(0, 0.0), (1, 0.5), (2, 1.0), (3, 1.5), (4, 2.0), (5, 3.0), (6, 4.0), (7, 6.0),
         (8, -0.0), (9, -0.5), (10, -1.0), (11, -1.5), (12, -2.0), (13, -3.0), (14, -4.0), (15, -6.0)]


@pytest.mark.parametrize("code,value", CODES)
def test_every_e2m1_code(code, value):
    v = Q.e2m1_decode(torch.tensor([code], dtype=torch.uint8))
    assert v.item() == value and bool(torch.signbit(v)) == (math.copysign(1, value) < 0)
    assert Q.e2m1_encode(torch.tensor([value])).item() == code


def _unpack_high_first(packed):  # a port with the nibbles the wrong way round
    b = packed.view(torch.uint8) if packed.dtype != torch.uint8 else packed
    return torch.stack([(b >> 4) & 0xF, b & 0xF], -1).flatten(-2)


@pytest.mark.parametrize("impl", ["right", "wrong"])
def test_nibble_order_low_first(impl, monkeypatch):
    if impl == "wrong":
        monkeypatch.setattr(Q, "unpack_fp4", _unpack_high_first)
    vals = torch.tensor([0.5, 1.0, 1.5, -2.0])
    raw = torch.tensor([0x21, 0xC3], dtype=torch.uint8)
    ok = (Q.pack_fp4(Q.e2m1_encode(vals)).tolist() == [0x21, 0xC3]
          and torch.equal(Q.e2m1_decode(Q.unpack_fp4(raw)), vals)
          and torch.equal(Q.e2m1_decode(Q.unpack_fp4(raw.view(torch.int8))), vals))  # I8 as stored on disk
    assert ok == (impl == "right")


def test_byte_table_decode_equals_nibble_decode():
    every = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(Q.decode_fp4_bytes(every), Q.e2m1_decode(Q.unpack_fp4(every)))
    raw = torch.tensor([[0x21, 0xC3] * 8], dtype=torch.uint8)
    d = Q.mxfp4_dequantize(raw.view(torch.int8), torch.tensor([[128]], dtype=torch.uint8))   # scale 2
    assert d[0, :4].tolist() == [1.0, 2.0, 3.0, -4.0]


# (input, rounded): ties go to the even code (mantissa bit 0), saturation at 6, sign kept on zero
ROUNDING = [(0.25, 0.0), (0.75, 1.0), (1.25, 1.0), (1.75, 2.0), (2.5, 2.0), (3.5, 4.0), (5.0, 4.0),
            (-0.25, -0.0), (-0.75, -1.0), (-2.5, -2.0), (-5.0, -4.0),
            (0.26, 0.5), (1.26, 1.5), (2.51, 3.0), (5.01, 6.0), (4.99, 4.0), (0.2499, 0.0),
            (6.0, 6.0), (7.0, 6.0), (1e9, 6.0), (-7.0, -6.0), (float("inf"), 6.0),
            (-0.1, -0.0), (-0.0, -0.0), (0.0, 0.0)]


@pytest.mark.parametrize("x,want", ROUNDING)
def test_e2m1_round_half_even_saturate_signed_zero(x, want):
    r = Q.e2m1_round(torch.tensor([x]))
    assert r.item() == want and bool(torch.signbit(r)) == (math.copysign(1, want) < 0)


def test_e2m1_round_matches_brute_force_nearest():
    x = torch.linspace(-7, 7, 2801)                  # step 0.005: hits every tie (the multiples of 0.25)
    grid = list(Q.E2M1_VALUES)
    want = []
    for v in x.tolist():
        a = min(abs(v), 6.0)
        d = [abs(a - g) for g in grid]
        best = [c for c in range(8) if d[c] == min(d)]
        c = best[0] if len(best) == 1 else next(c for c in best if c % 2 == 0)   # tie -> even code
        want.append(math.copysign(grid[c], v))
    assert torch.equal(Q.e2m1_round(x), torch.tensor(want))


def test_e2m1_nan_propagates_and_encode_refuses():
    assert torch.isnan(Q.e2m1_round(torch.tensor([float("nan")]))).all()
    with pytest.raises(ValueError, match="NaN"):
        Q.e2m1_encode(torch.tensor([float("nan")]))


# ----------------------------------------------------------------------------- scales
@pytest.mark.parametrize("amax,scale", [(6.0, 1.0), (6.0001, 2.0), (7.0, 2.0), (3.0, 0.5), (3.01, 1.0),
                                        (12.0, 2.0), (0.0, 2.0 ** -126), (1e-40, 2.0 ** -126)])
def test_mxfp4_scale_rule_ceil(amax, scale):
    w = torch.zeros(1, 32)
    w[0, 5] = amax
    _, s = Q.mxfp4_quantize(w)
    assert Q.e8m0_to_float(s).item() == scale


def test_mxfp4_ocp_rule_clips_where_ceil_does_not():
    w = torch.zeros(1, 32)
    w[0, 0] = 7.0
    assert Q.fp4_fake_quant(w)[0, 0].item() == 8.0               # scale 2, 7/2 = 3.5 -> tie -> 4
    assert Q.fp4_fake_quant(w, rule="ocp")[0, 0].item() == 6.0   # scale 1, 7 saturates to 6


@pytest.mark.parametrize("amax,scale", [(448.0, 1.0), (449.0, 2.0), (1.0, 2.0 ** -8), (0.0, 2.0 ** -22)])
def test_fp8_scale_rule(amax, scale):
    # 1e-4 floor: 1e-4/448 = 2.2e-7 -> 2^ceil(log2) = 2^-22
    w = torch.zeros(128, 128)
    w[3, 7] = amax
    _, s = Q.fp8_block_quantize(w)
    assert Q.e8m0_to_float(s).item() == scale
    x = torch.zeros(1, 128)
    x[0, 9] = amax                                   # activations use the same rule on 1x128 blocks
    assert Q.act_quant_fp8(x)[0, 9].item() == Q.fp8_block_dequantize(*Q.fp8_block_quantize(w))[3, 7].item()


def test_e8m0_decode_and_nan():
    e = torch.tensor([0, 1, 126, 127, 128, 254, 255], dtype=torch.uint8)
    v = Q.e8m0_to_float(e)
    assert v[:6].tolist() == [2.0 ** -127, 2.0 ** -126, 0.5, 1.0, 2.0, 2.0 ** 127]
    assert torch.isnan(v[6])
    assert torch.equal(Q.e8m0_to_float(e.view(torch.float8_e8m0fnu)).nan_to_num(7), v.nan_to_num(7))
    # our E8M0 bytes equal torch's own float8_e8m0fnu encoding of the same powers of two
    s = torch.tensor([2.0 ** -126, 0.5, 1.0, 2.0, 2.0 ** 127])
    assert torch.equal(Q.scale_to_e8m0(s), s.to(torch.float8_e8m0fnu).view(torch.uint8))


# ----------------------------------------------------------------------------- NaN / inf
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("fn,block", [(Q.fp4_act_quant, 32), (Q.act_quant_fp8, 128), (Q.fp4_fake_quant, 32)])
def test_fake_quant_nonfinite_poisons_only_its_block(fn, block, bad):
    x = torch.randn(2, 2 * block)
    x[1, 3] = bad
    y = fn(x) if fn is not Q.act_quant_fp8 else fn(x, block)
    assert torch.isnan(y[1, :block]).all()
    assert torch.isfinite(y[1, block:]).all() and torch.isfinite(y[0]).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_real_quantisers_refuse_nonfinite(bad):
    w = torch.randn(4, 64)
    w[2, 10] = bad
    with pytest.raises(ValueError, match=r"w = non-finite at index \[2, 10\]"):
        Q.mxfp4_quantize(w)
    with pytest.raises(ValueError, match="non-finite"):
        Q.fp8_block_quantize(w)


def test_nan_scale_decodes_to_nan_block():
    pk, s = Q.mxfp4_quantize(torch.randn(2, 64))
    s[1, 0] = 255
    d = Q.mxfp4_dequantize(pk, s)
    assert torch.isnan(d[1, :32]).all() and torch.isfinite(d[1, 32:]).all() and torch.isfinite(d[0]).all()
    with pytest.raises(ValueError, match="255"):
        Q.fp4_to_fp8(pk, s)


# ----------------------------------------------------------------------------- block value sets
def _clamp_no_round(w, block=32, rule="ceil"):  # a wrong port: scales right, but no rounding to the grid
    xb = w.float().reshape(*w.shape[:-1], -1, block)
    s = Q._mxfp4_scale(xb, rule)
    return ((xb / s).clamp(-6, 6) * s).reshape(w.shape)


@pytest.mark.parametrize("impl", ["right", "wrong"])
def test_fake_quant_block_takes_at_most_15_values(impl, monkeypatch):
    if impl == "wrong":
        monkeypatch.setattr(Q, "fp4_fake_quant", _clamp_no_round)
    w = torch.randn(16, 256, generator=torch.Generator().manual_seed(0))
    y = Q.fp4_fake_quant(w).reshape(16, 8, 32)
    s = Q._mxfp4_scale(w.reshape(16, 8, 32), "ceil")
    on_grid = torch.isin(y / s, Q.E2M1_GRID).all()
    few = max(len(torch.unique(b)) for b in y.reshape(-1, 32)) <= 15
    assert bool(on_grid and few) == (impl == "right")


def test_pack_quantize_dequantize_consistent_with_fake_quant():
    w = torch.randn(8, 128, generator=torch.Generator().manual_seed(1))
    pk, s = Q.mxfp4_quantize(w)
    assert pk.shape == (8, 64) and s.shape == (8, 4) and pk.dtype == s.dtype == torch.uint8
    assert torch.equal(Q.mxfp4_dequantize(pk, s), Q.fp4_fake_quant(w))
    assert torch.equal(Q.fp4_act_quant(w), Q.fp4_fake_quant(w))


# ----------------------------------------------------------------------------- error floors
# Stated floors on N(0,1) weights (measured: FP8 block ~31.5 dB, FP8 act ~31.5 dB, MXFP4 ~18.7 dB).
SQNR_FLOOR = {"fp8_block": 30.0, "fp8_act": 30.0, "mxfp4": 17.0}


def test_sqnr_floors_gaussian():
    w = torch.randn(256, 512, generator=torch.Generator().manual_seed(2))
    q, s = Q.fp8_block_quantize(w)
    got = {"fp8_block": Q.sqnr_db(w, Q.fp8_block_dequantize(q, s)),
           "fp8_act": Q.sqnr_db(w, Q.act_quant_fp8(w, 128)),
           "mxfp4": Q.sqnr_db(w, Q.mxfp4_dequantize(*Q.mxfp4_quantize(w)))}
    for k, floor in SQNR_FLOOR.items():
        assert got[k] >= floor, (k, got[k])
    assert got["mxfp4"] < 22 and got["fp8_block"] < 40        # and they are what the formats allow, not lossless


def test_fp8_block_partial_blocks_and_layout():
    w = torch.randn(200, 300, generator=torch.Generator().manual_seed(3))
    w[150:, 260:] *= 1000                                     # one far-off block keeps its own scale
    q, s = Q.fp8_block_quantize(w)
    assert q.dtype == torch.float8_e4m3fn and q.shape == (200, 300)
    assert s.dtype == torch.float8_e8m0fnu and s.shape == (2, 3)
    d = Q.fp8_block_dequantize(q, s)
    rel = ((d - w).norm() / w.norm()).item()
    assert rel < 0.05
    assert ((d[:128, :128] - w[:128, :128]).abs() <= w[:128, :128].abs() / 16 + 2 ** -9).all()  # its own scale
    assert (d[:128, 260:] - w[:128, 260:]).abs().max() < 0.3          # right edge: partial block, own scale
    assert q.float().abs().max() <= 448
    with pytest.raises(ValueError, match="scale.shape"):
        Q.fp8_block_dequantize(q, s[:, :2])


def test_act_quant_fp8_blocks_are_independent():
    x = torch.randn(3, 256)
    x[0, 200] = 1e4
    y = Q.act_quant_fp8(x, 128)
    assert torch.equal(y[0, :128], Q.act_quant_fp8(x[0:1, :128], 128)[0])
    assert ((y[1:] - x[1:]).abs() <= x[1:].abs() / 16 + 2 ** -12).all()   # half an E4M3 ulp
    y2 = Q.act_quant_fp8(x, 128, scale_fmt=None)            # amax/448 scale: the max maps to exactly 448
    assert y2[0, 200].item() == pytest.approx(1e4, rel=1e-6)
    with pytest.raises(ValueError, match="block size 128"):
        Q.act_quant_fp8(torch.randn(2, 100), 128)
    with pytest.raises(ValueError, match="scale_fmt"):
        Q.act_quant_fp8(x, 128, scale_fmt="e5m2")


# ----------------------------------------------------------------------------- FP4 -> FP8
def _fp4_with_spread(spread, o=128, k=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (o, k), generator=g, dtype=torch.uint8)
    codes[:, 0::32] = 1                                          # every sub-block holds the smallest value 0.5
    e = torch.full((o, k // 32), 130, dtype=torch.uint8)
    e[0, 0] = 130 + spread // 2                                  # spread = e_max - e_min inside block (0, 0)
    e[5, 1] = 130 - (spread - spread // 2)
    return Q.pack_fp4(codes), e


@pytest.mark.parametrize("spread", [0, 1, 6, 7, 13, 14])
def test_fp4_to_fp8_bit_exact_up_to_2_14(spread):
    pk, e = _fp4_with_spread(spread)
    assert int(Q.fp4_to_fp8_spread(e).max()) == spread
    q, s = Q.fp4_to_fp8(pk, e)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (1, 2)
    assert q.float().abs().max() <= 384
    assert torch.equal(Q.fp8_block_dequantize(q, s), Q.mxfp4_dequantize(pk, e))


@pytest.mark.parametrize("spread", [15, 16, 20])
def test_fp4_to_fp8_lossy_beyond_2_14(spread):
    pk, e = _fp4_with_spread(spread)
    with pytest.raises(ValueError, match=rf"spread 2\^{spread}"):
        Q.fp4_to_fp8(pk, e)
    q, s = Q.fp4_to_fp8(pk, e, check=False)
    assert not torch.equal(Q.fp8_block_dequantize(q, s), Q.mxfp4_dequantize(pk, e))


def test_fp4_to_fp8_partial_row_block():
    w = torch.randn(200, 256, generator=torch.Generator().manual_seed(4))
    pk, e = Q.mxfp4_quantize(w)
    q, s = Q.fp4_to_fp8(pk, e)
    assert s.shape == (2, 2)
    assert torch.equal(Q.fp8_block_dequantize(q, s), Q.mxfp4_dequantize(pk, e))


# ----------------------------------------------------------------------------- Hadamard
def test_hadamard_matches_sylvester_matrix_and_is_involution():
    H = torch.ones(1, 1)
    for _ in range(4):
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    assert torch.allclose(Q.hadamard_rotate(x), x @ H.double() / 4, atol=1e-12)
    assert torch.allclose(Q.hadamard_rotate(Q.hadamard_rotate(x)), x, atol=1e-12)
    xb = torch.randn(4, 128).bfloat16()
    assert Q.hadamard_rotate(xb).dtype == torch.bfloat16
    for n in (0, 3, 96):
        with pytest.raises(ValueError, match="power of two"):
            Q.hadamard_rotate(torch.randn(2, n))


def test_hadamard_spreads_an_outlier_before_fp4():
    # why the indexer rotates: one outlier forces a big scale on its block; after rotation the energy is
    # spread and MXFP4 keeps more of the signal.
    x = torch.randn(64, 128, generator=torch.Generator().manual_seed(5))
    x[:, 7] *= 30
    plain = Q.sqnr_db(x, Q.fp4_act_quant(x))
    rot = Q.sqnr_db(x, Q.hadamard_rotate(Q.fp4_act_quant(Q.hadamard_rotate(x))))
    assert rot > plain


# ----------------------------------------------------------------------------- STE
def _no_ste(w):  # a wrong QAT port: gradient of the rounded weight is zero almost everywhere
    return Q.fp4_fake_quant(w) * 1.0 + 0 * w


@pytest.mark.parametrize("impl", ["right", "wrong"])
def test_ste_forward_rounds_backward_passes_through(impl):
    fn = Q.fp4_fake_quant_ste if impl == "right" else _no_ste
    w = torch.randn(4, 64, requires_grad=True)
    g = torch.randn(4, 64)
    y = fn(w)
    y.backward(g)
    ok = torch.equal(y.detach(), Q.fp4_fake_quant(w.detach())) and torch.equal(w.grad, g)
    assert ok == (impl == "right")


# ----------------------------------------------------------------------------- bad arguments
def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match=r"w.shape\[-1\] = 40: must be a multiple of the block size 32"):
        Q.mxfp4_quantize(torch.randn(2, 40))
    with pytest.raises(ValueError, match=r"codes.shape\[-1\] = 3"):
        Q.pack_fp4(torch.zeros(3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="scales.shape"):
        Q.mxfp4_dequantize(torch.zeros(2, 32, dtype=torch.uint8), torch.zeros(2, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="rule"):
        Q.fp4_fake_quant(torch.randn(2, 32), rule="floor")
    with pytest.raises(ValueError, match="w.dim"):
        Q.fp8_block_quantize(torch.randn(2, 3, 4))


def test_fp4_gemm_ref_equals_dequantise_then_matmul():
    w = torch.randn(48, 128)
    pk, s = Q.mxfp4_quantize(w)
    x = torch.randn(5, 128)
    assert torch.allclose(Q.fp4_gemm_ref(x, pk, s), x @ Q.fp4_fake_quant(w).t(), atol=1e-5)
    with pytest.raises(ValueError, match="shapes"):
        Q.fp4_gemm_ref(torch.randn(5, 64), pk, s)


def test_fp4_gemm_tiled_equals_reference():
    w = torch.randn(100, 64)                              # N not a multiple of the tile
    pk, s = Q.mxfp4_quantize(w)
    x = torch.randn(3, 64)
    torch.testing.assert_close(Q.fp4_gemm_tiled(x, pk, s, tile_n=32), Q.fp4_gemm_ref(x, pk, s))


def test_bench_bytes_per_param_match_formula():
    from v4lab.bench.quant import bytes_records
    recs = bytes_records()
    per = {r["layout"]: r for r in recs if r["bench"] == "bytes_per_param"}
    assert all(r["bytes_per_param"] == r["formula"] for r in per.values())
    assert [round(r["bytes_per_param"], 5) for r in per.values()] == [2.0, 1.00006, 0.53125]
    flash = next(r for r in recs if r.get("preset") == "v4-flash")
    assert 150 < flash["total_GB"] < 170 and flash["FP4_GB"] > 0.85 * flash["total_GB"]


# E4M3 element rounding as the FP8 paths use it: nearest-even, subnormal floor 2^-9, clamp at 448
@pytest.mark.parametrize("x,want", [(1.0625, 1.0), (1.1875, 1.25), (2.0 ** -10, 0.0), (3 * 2.0 ** -11, 2.0 ** -9),
                                    (-2.0 ** -9, -2.0 ** -9), (1e6, 448.0), (-1e6, -448.0), (240.0, 240.0)])
def test_e4m3_rounding_table(x, want):
    assert Q._e4m3_round(torch.tensor([x])).float().item() == want
