"""FP4 (MXFP4) and FP8 (E4M3, UE8M0 block scales) exactly as DeepSeek-V4 stores and simulates them.

Formats (docs/design/v4-moe-mhc-fp4.md §6):

* **E2M1** (FP4): nibble ``s e1 e0 m``; codes 0..7 -> {0, .5, 1, 1.5, 2, 3, 4, 6}, codes 8..15 the same
  negated (code 8 = -0). Two codes per byte: element ``2j`` in the LOW nibble, ``2j+1`` in the high one.
* **E8M0** scales: one byte ``e`` means ``2^(e-127)``; ``e = 255`` is NaN.
* **MXFP4** (routed experts): one E8M0 scale per 32 consecutive elements along K (the input dim).
* **FP8 E4M3fn** (everything else that is quantised): max 448, no inf; weights with one E8M0 scale per
  128x128 block, activations with one per 1x128 block (``act_quant_fp8``).

Every scale here is a power of two chosen as ``2^ceil(log2(amax / qmax))`` (qmax = 6 for FP4, 448 for
FP8), the rule of the official activation kernels: it never clips. The spec leaves the FP4 *weight*
rule UNCERTAIN (§6.8; OCP MXFP4 would use ``2^(floor(log2 amax) - 2)`` and clip); we use the activation
rule for weights too, as the spec recommends, and ``mxfp4_quantize(..., rule="ocp")`` gives the other.

Non-finite input (our choice, following the OCP MX spec): a block that holds a NaN or an inf gets a NaN
scale, so fake-quant returns NaN for the whole block; the real quantisers (``mxfp4_quantize``,
``fp8_block_quantize``) refuse non-finite weights with a ValueError; decoding an E8M0 255 gives NaN, and
the checkpoint reader rejects it.

torch 2.13 on CPU can cast to ``float8_e4m3fn`` / ``float8_e8m0fnu`` (used as storage here) but not to
``float4_e2m1fn_x2``, so FP4 is encoded and decoded by hand.
"""
from __future__ import annotations

import math

import torch

FP4_MAX = 6.0
FP8_MAX = 448.0
FP4_BLOCK = 32
FP8_BLOCK = 128
FP4_AMAX_FLOOR = 6.0 * 2.0 ** -126     # keeps the scale a normal float (>= 2^-126)
FP8_AMAX_FLOOR = 1e-4
E8M0_NAN = 255

# code -> value; code 8 is -0.0 (sign bit set)
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_GRID = torch.tensor(list(E2M1_VALUES) + [-v for v in E2M1_VALUES], dtype=torch.float32)


def _bad(arg: str, value, rule: str):
    raise ValueError(f"{arg} = {value}: {rule}")


# ------------------------------------------------------------------------------------ E8M0 scales
def ceil_log2(y: torch.Tensor) -> torch.Tensor:
    """Exact ``ceil(log2(y))`` for positive finite fp32 ``y`` (int32); frexp avoids log2 rounding."""
    m, e = torch.frexp(y.float())              # y = m * 2^e, m in [0.5, 1)
    return torch.where(m == 0.5, e - 1, e).to(torch.int32)


def pow2_scale(amax: torch.Tensor, qmax: float, floor: float) -> torch.Tensor:
    """``2^ceil(log2(max(amax, floor) / qmax))`` in fp32; NaN where amax is NaN or inf."""
    a = amax.float()
    bad = ~torch.isfinite(a)
    y = torch.clamp(torch.where(bad, torch.ones_like(a), a), min=floor) / qmax
    s = torch.ldexp(torch.ones_like(y), ceil_log2(y).float())
    return torch.where(bad, torch.full_like(s, float("nan")), s)


def scale_to_e8m0(scale: torch.Tensor) -> torch.Tensor:
    """Power-of-two fp32 scale -> E8M0 byte (uint8); NaN -> 255. Exponents outside [-127, 127] are an error."""
    s = scale.float()
    nan = torch.isnan(s)
    m, e = torch.frexp(torch.where(nan, torch.ones_like(s), s))
    if not bool(((m == 0.5) | nan).all()):
        _bad("scale", "not a power of two", "E8M0 stores powers of two only")
    b = (e - 1 + 127).to(torch.int32)
    if bool(((b < 0) | (b > 254)).any()):
        _bad("scale", f"exponent range [{int(b.min()) - 127}, {int(b.max()) - 127}]", "E8M0 holds 2^-127..2^127")
    return torch.where(nan, torch.full_like(b, E8M0_NAN), b).to(torch.uint8)


def _as_u8(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.uint8 else t.view(torch.uint8)


_E8M0_LUT = torch.where(torch.arange(256) == E8M0_NAN, float("nan"),
                        torch.ldexp(torch.ones(256), torch.arange(256).float() - 127))


def e8m0_to_float(e: torch.Tensor) -> torch.Tensor:
    """E8M0 bytes (uint8 or float8_e8m0fnu) -> fp32 ``2^(e-127)``; 255 -> NaN (0 -> 2^-127, a denormal)."""
    return _E8M0_LUT.to(e.device)[_as_u8(e).long()]


# ------------------------------------------------------------------------------------ E2M1 codes
def e2m1_round(v: torch.Tensor) -> torch.Tensor:
    """Round fp32 values onto the E2M1 grid: nearest, ties to the even code, saturate at +-6, keep the sign
    (so -0.1 -> -0). NaN stays NaN."""
    v = v.float()
    a = v.abs().clamp(max=FP4_MAX)
    # grid spacing is 0.5 in [0, 2), 1 in [2, 4), 2 in [4, 6]; an even multiple of the spacing is an even
    # code, so torch.round (half to even) on a/step is exactly round-half-to-even onto the codes.
    step = torch.where(a < 2, 0.5, torch.where(a < 4, 1.0, 2.0))
    r = torch.round(a / step) * step
    return torch.copysign(r, v)


def e2m1_encode(v: torch.Tensor) -> torch.Tensor:
    """Values (rounded onto the grid first; -0 kept) -> codes uint8 0..15."""
    r = e2m1_round(v)
    if bool(torch.isnan(r).any()):
        _bad("v", "contains NaN", "E2M1 has no NaN encoding")
    a = r.abs()
    # magnitude -> code: 0,.5,1,1.5 -> 0..3 (2a); 2,3 -> 4,5 (a+2); 4,6 -> 6,7 (a/2+4)
    mag = torch.where(a < 2, 2 * a, torch.where(a < 4, a + 2, a / 2 + 4))
    return (mag + 8 * torch.signbit(r)).to(torch.uint8)


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    """Codes (uint8, 0..15) -> fp32 values."""
    return E2M1_GRID.to(codes.device)[codes.long() & 0xF]


# byte -> (value of the low nibble, value of the high nibble): one gather decodes packed FP4
_BYTE_LUT = torch.stack([E2M1_GRID[torch.arange(256) & 0xF], E2M1_GRID[torch.arange(256) >> 4]], dim=-1)


def decode_fp4_bytes(packed: torch.Tensor) -> torch.Tensor:
    """Packed bytes ``[..., K/2]`` (uint8 or int8) -> fp32 values ``[..., K]`` (low nibble first)."""
    b = _as_u8(packed)
    return _BYTE_LUT.to(b.device)[b.long()].flatten(-2)


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """Codes ``[..., K]`` -> bytes ``[..., K/2]``: element 2j in the low nibble, 2j+1 in the high nibble."""
    if codes.shape[-1] % 2:
        _bad("codes.shape[-1]", codes.shape[-1], "FP4 packs two values per byte; K must be even")
    c = codes.to(torch.uint8)
    return (c[..., 0::2] & 0xF) | ((c[..., 1::2] & 0xF) << 4)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """Bytes ``[..., K/2]`` (uint8, or int8 as stored in safetensors) -> codes ``[..., K]`` uint8."""
    b = _as_u8(packed)
    return torch.stack([b & 0xF, (b >> 4) & 0xF], dim=-1).flatten(-2)


# ------------------------------------------------------------------------------------ MXFP4
def _blocks(x: torch.Tensor, block: int, arg: str) -> torch.Tensor:
    if x.shape[-1] % block:
        _bad(f"{arg}.shape[-1]", x.shape[-1], f"must be a multiple of the block size {block}")
    return x.reshape(*x.shape[:-1], x.shape[-1] // block, block)


def _mxfp4_scale(xb: torch.Tensor, rule: str) -> torch.Tensor:
    amax = xb.abs().amax(-1, keepdim=True)
    if rule == "ceil":
        return pow2_scale(amax, FP4_MAX, FP4_AMAX_FLOOR)
    if rule == "ocp":   # OCP MX: 2^(floor(log2 amax) - emax_elem), emax_elem = 2 for E2M1; clips above 6
        a = torch.clamp(torch.where(torch.isfinite(amax), amax, 1.0), min=2.0 ** -125)
        _, e = torch.frexp(a)
        s = torch.ldexp(torch.ones_like(a), (e - 1 - 2).float())
        return torch.where(torch.isfinite(amax), s, float("nan"))
    _bad("rule", repr(rule), "must be 'ceil' (official kernels) or 'ocp'")


def mxfp4_quantize(w: torch.Tensor, block: int = FP4_BLOCK, rule: str = "ceil") -> tuple[torch.Tensor, torch.Tensor]:
    """``w [..., K]`` -> ``(packed uint8 [..., K/2], scales uint8 E8M0 [..., K/32])``.

    scale = 2^ceil(log2(amax/6)) per 32 along K (amax floored at 6*2^-126), codes = round-half-to-even of
    w/scale onto E2M1, saturating at +-6 (only reachable with ``rule="ocp"``)."""
    if not bool(torch.isfinite(w).all()):
        bad = (~torch.isfinite(w)).nonzero()[0].tolist()
        _bad("w", f"non-finite at index {bad}", "MXFP4 weights must be finite (a NaN/inf block has no scale)")
    xb = _blocks(w.float(), block, "w")
    s = _mxfp4_scale(xb, rule)
    codes = e2m1_encode(xb / s).reshape(w.shape)
    return pack_fp4(codes), scale_to_e8m0(s.squeeze(-1))


def mxfp4_dequantize(packed: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32,
                     block: int = FP4_BLOCK) -> torch.Tensor:
    """Inverse of ``mxfp4_quantize``: ``W[n, k] = E2M1[code] * 2^(E[n, k // 32] - 127)``; E8M0 255 -> NaN."""
    vals = decode_fp4_bytes(packed)
    k = vals.shape[-1]
    if scales.shape[:-1] != vals.shape[:-1] or scales.shape[-1] * block != k:
        _bad("scales.shape", tuple(scales.shape), f"must be {tuple(vals.shape[:-1]) + (k // block,)} "
             f"for packed {tuple(packed.shape)} (one scale per {block} values)")
    s = e8m0_to_float(scales)
    return (_blocks(vals, block, "packed") * s.unsqueeze(-1)).reshape(vals.shape).to(dtype)


def fp4_fake_quant(w: torch.Tensor, block: int = FP4_BLOCK, rule: str = "ceil") -> torch.Tensor:
    """``deq(q(w))`` in w's dtype, differentiable nowhere useful (see ``fp4_fake_quant_ste``).
    A block holding NaN/inf comes back all NaN."""
    xb = _blocks(w.float(), block, "w")
    s = _mxfp4_scale(xb, rule)
    return (e2m1_round(xb / s) * s).reshape(w.shape).to(w.dtype)


def fp4_fake_quant_ste(w: torch.Tensor) -> torch.Tensor:
    """QAT of routed experts (spec §6.8): forward uses the MXFP4-rounded weight, backward passes the
    gradient straight through to the master weight: ``w + (deq(q(w)) - w).detach()``."""
    return w + (fp4_fake_quant(w.detach()) - w).detach()


def fp4_act_quant(x: torch.Tensor, block: int = FP4_BLOCK) -> torch.Tensor:
    """Official MXFP4 activation fake-quant (indexer q / compressed k after Hadamard): per 1x``block``
    along the last dim, scale 2^ceil(log2(amax/6)) with amax >= 6*2^-126, clamp +-6, round to E2M1."""
    return fp4_fake_quant(x, block, "ceil")


# ------------------------------------------------------------------------------------ FP8 E4M3
def _e4m3_round(v: torch.Tensor) -> torch.Tensor:
    """Clamp to +-448 and round to E4M3 (torch's cast rounds to nearest even); NaN stays NaN."""
    return v.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def act_quant_fp8(x: torch.Tensor, block: int = FP8_BLOCK, scale_fmt: str | None = "ue8m0") -> torch.Tensor:
    """Official FP8 activation fake-quant (current revision, spec §6.5/6.6): per 1x``block`` along the
    last dim, amax = max(|x|, 1e-4), scale = 2^ceil(log2(amax/448)) (``scale_fmt=None``: amax/448),
    q = e4m3(clamp(x/scale, +-448)); returns q*scale in x's dtype."""
    xb = _blocks(x.float(), block, "x")
    amax = xb.abs().amax(-1, keepdim=True)
    if scale_fmt == "ue8m0":
        s = pow2_scale(amax, FP8_MAX, FP8_AMAX_FLOOR)
    elif scale_fmt is None:
        s = torch.where(torch.isfinite(amax), amax.clamp(min=FP8_AMAX_FLOOR), float("nan")) / FP8_MAX
    else:
        _bad("scale_fmt", repr(scale_fmt), "must be 'ue8m0' or None")
    q = _e4m3_round(xb / s).float()
    return (q * s).reshape(x.shape).to(x.dtype)


FP8_OVERFLOW = 464.0       # the midpoint between 448 and the next E4M3 step (480, which E4M3fn lacks)


def fp8_static_cast(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``x`` through E4M3fn with one fixed (static) ``scale``: q = e4m3(x/scale)·scale, round-to-nearest-even,
    and, as a non-saturating cast does (the OCP FP8 spec's overflow-to-NaN mode), NaN where |x/scale|
    rounds above 448 (|x/scale| >= 464). Unlike ``act_quant_fp8`` the scale does not follow the data: a
    value that outgrows it is lost. Forward only (the clamp experiment wraps it in a straight-through
    estimator)."""
    if not (isinstance(scale, (int, float)) and not isinstance(scale, bool) and 0 < scale < math.inf):
        _bad("scale", scale, "must be a finite number > 0")
    v = x.float() / scale
    q = _e4m3_round(v).float()
    return torch.where(v.abs() >= FP8_OVERFLOW, torch.full_like(q, math.nan), q * scale)


def _pad2d(w: torch.Tensor, block: int) -> torch.Tensor:
    o, i = w.shape
    po, pi = -o % block, -i % block
    return torch.nn.functional.pad(w, (0, pi, 0, po)) if (po or pi) else w


def fp8_block_quantize(w: torch.Tensor, block: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [o, i]`` -> ``(float8_e4m3fn [o, i], float8_e8m0fnu [ceil(o/128), ceil(i/128)])``.
    Per 128x128 block (partial edge blocks allowed): scale 2^ceil(log2(max(amax, 1e-4)/448))."""
    if w.dim() != 2:
        _bad("w.dim()", w.dim(), "FP8 block quantisation takes a 2-D weight [out, in]")
    if not bool(torch.isfinite(w).all()):
        bad = (~torch.isfinite(w)).nonzero()[0].tolist()
        _bad("w", f"non-finite at index {bad}", "FP8 weights must be finite")
    o, i = w.shape
    wp = _pad2d(w.float(), block)
    bo, bi = wp.shape[0] // block, wp.shape[1] // block
    blocks = wp.reshape(bo, block, bi, block)
    s = pow2_scale(blocks.abs().amax(dim=(1, 3)), FP8_MAX, FP8_AMAX_FLOOR)          # [bo, bi]
    q = _e4m3_round(blocks / s[:, None, :, None]).reshape(wp.shape)[:o, :i].contiguous()
    return q, scale_to_e8m0(s).view(torch.float8_e8m0fnu)


def fp8_block_dequantize(w: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32,
                         block: int = FP8_BLOCK) -> torch.Tensor:
    """``W[i, j] = fp8[i, j] * 2^(S[i // 128, j // 128] - 127)``. ``scale`` may be E8M0 (bytes) or a float
    tensor (the -Base checkpoints reportedly store F32 scales)."""
    o, i = w.shape
    want = (math.ceil(o / block), math.ceil(i / block))
    if tuple(scale.shape) != want:
        _bad("scale.shape", tuple(scale.shape), f"must be {want} for weight {(o, i)} with {block}x{block} blocks")
    s = scale.float() if scale.dtype in (torch.float32, torch.bfloat16, torch.float16) else e8m0_to_float(scale)
    full = s.repeat_interleave(block, 0)[:o].repeat_interleave(block, 1)[:, :i]
    return (w.float() * full).to(dtype)


# ------------------------------------------------------------------------------------ Hadamard
def hadamard_rotate(x: torch.Tensor) -> torch.Tensor:
    """Normalised Walsh-Hadamard transform over the last dim (Sylvester order, scale n^-1/2), as the
    official indexer applies before its FP4 simulation. Orthogonal and its own inverse. Computed in fp32
    (fp64 stays fp64)."""
    n = x.shape[-1]
    if n < 1 or n & (n - 1):
        _bad("x.shape[-1]", n, "Hadamard rotation needs a power of two")
    y = x if x.dtype == torch.float64 else x.float()
    h = 1
    while h < n:
        y = y.reshape(*x.shape[:-1], n // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack([a + b, a - b], dim=-2)
        h *= 2
    return (y.reshape(x.shape) * n ** -0.5).to(x.dtype)


# ------------------------------------------------------------------------------------ FP4 -> FP8
def fp4_to_fp8_spread(scales: torch.Tensor, block: int = FP8_BLOCK, sub: int = FP4_BLOCK) -> torch.Tensor:
    """log2(max/min) of the E8M0 sub-scales inside each 128x128 FP8 block: int32 ``[ceil(o/128), K/128]``.
    The conversion is exact when every entry is <= 14 (spec §6.7)."""
    e = _as_u8(scales).to(torch.int32)
    o, ns = e.shape
    per = block // sub
    if ns % per:
        _bad("scales.shape[1]", ns, f"K/{sub} must be a multiple of {per} (K a multiple of {block})")
    po = -o % block
    hi = torch.nn.functional.pad(e, (0, 0, 0, po), value=-1).reshape(-1, block, ns // per, per)
    lo = torch.nn.functional.pad(e, (0, 0, 0, po), value=10 ** 6).reshape(-1, block, ns // per, per)
    return hi.amax(dim=(1, 3)) - lo.amin(dim=(1, 3))


def fp4_to_fp8(packed: torch.Tensor, scales: torch.Tensor, check: bool = True,
               block: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-express MXFP4 weights ``[o, K/2]`` + ``[o, K/32]`` as FP8 E4M3 with 128x128 E8M0 scales (spec §6.7):
    block scale S = max sub-scale / 2^6, element = fp4 * (sub_scale / S) (a power of two <= 64, so |.| <= 384).
    Exact while the sub-scale spread in a block is <= 2^14; with ``check`` a larger spread is a ValueError,
    without it the small values underflow E4M3's 2^-9 floor (lossy)."""
    e = _as_u8(scales).to(torch.int32)
    if bool((e == E8M0_NAN).any()):
        _bad("scales", "contains E8M0 255 (NaN)", "cannot convert a NaN scale")
    spread = fp4_to_fp8_spread(scales, block)
    if check and int(spread.max()) > 14:
        _bad("scales", f"sub-scale spread 2^{int(spread.max())} in a 128x128 block",
             "FP4->FP8 is lossless only up to 2^14 (pass check=False to convert anyway)")
    o = e.shape[0]
    per = block // FP4_BLOCK
    po = -o % block
    emax = torch.nn.functional.pad(e, (0, 0, 0, po), value=0)
    emax = emax.reshape(-1, block, e.shape[1] // per, per).amax(dim=(1, 3))
    es = (emax - 6).clamp(min=0)                                                     # [bo, bi]
    es_full = es.repeat_interleave(block, 0)[:o].repeat_interleave(per, 1)          # [o, K/32]
    ratio = torch.ldexp(torch.ones(e.shape, device=e.device), (e - es_full).float())   # sub_scale / S, <= 64
    vals = decode_fp4_bytes(packed)
    q = _e4m3_round(_blocks(vals, FP4_BLOCK, "packed") * ratio.unsqueeze(-1)).reshape(vals.shape)
    return q, es.to(torch.uint8).view(torch.float8_e8m0fnu)


# ------------------------------------------------------------------------------------ GEMM reference
def fp4_gemm_ref(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``y [M, N] = x [M, K] . deq(W)^T`` in fp32 with W given as MXFP4 (``packed`` uint8 [N, K/2],
    ``scales`` uint8 E8M0 [N, K/32]). Reference for ``v4lab.kernels.fp4_gemm.fp4_gemm``."""
    if x.dim() != 2 or packed.dim() != 2 or x.shape[1] != 2 * packed.shape[1]:
        _bad("shapes", f"x {tuple(x.shape)}, packed {tuple(packed.shape)}", "need x [M, K] and packed [N, K/2]")
    return x.float() @ mxfp4_dequantize(packed, scales, torch.float32).t()


def fp4_gemm_tiled(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, tile_n: int = 256) -> torch.Tensor:
    """CPU stand-in for the fused kernel, same signature and result as ``fp4_gemm_ref``: W is decoded
    ``tile_n`` output rows at a time right before its matmul, so the fp32 copy of W never exists whole
    (only a cache-sized tile does), which is the point of fusing dequant into the GEMM."""
    if x.dim() != 2 or packed.dim() != 2 or x.shape[1] != 2 * packed.shape[1]:
        _bad("shapes", f"x {tuple(x.shape)}, packed {tuple(packed.shape)}", "need x [M, K] and packed [N, K/2]")
    xf = x.float()
    y = torch.empty(x.shape[0], packed.shape[0], dtype=torch.float32, device=x.device)
    for n0 in range(0, packed.shape[0], tile_n):
        w = mxfp4_dequantize(packed[n0:n0 + tile_n], scales[n0:n0 + tile_n], torch.float32)
        torch.matmul(xf, w.t(), out=y[:, n0:n0 + tile_n])
    return y


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantisation-noise ratio 10*log10(|ref|^2 / |ref - approx|^2) in dB."""
    r = ref.double()
    noise = (r - approx.double()).pow(2).sum()
    return float(10 * torch.log10(r.pow(2).sum() / noise)) if noise > 0 else float("inf")


# ------------------------------------------------------------------------------------ below FP4 (sub-FP4)
# The report leaves open how far below FP4 V4 could go. These element formats share MXFP4's machinery: an
# E8M0 power-of-two scale per ``block`` values along K, chosen as 2^ceil(log2(amax / qmax)) (never clips),
# and round-to-nearest with ties to the even code. Codes are ``sign << (bits - 1) | magnitude code``; they
# are returned one per uint8 (bit-packing 3-bit codes is a storage detail left out here).
#
# * E2M1 (FP4, 4 bits): the MXFP4 element, magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6 (for cross-checking).
# * E1M1 (FP3, 3 bits, exponent bias 1): 0, .5 (subnormal), 1, 1.5 — a uniform grid, qmax 1.5.
# * E2M0 (FP3, 3 bits, exponent bias 1, no mantissa): 0, 1, 2, 4 — a log grid, qmax 4.
# * TERNARY (FP2, 2 bits; log2(3) = 1.58 bits of information): 0, 1 — sign + one magnitude bit, -0 unused.
SUBFP4_FORMATS = {
    "e2m1": (4, (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)),
    "e1m1": (3, (0.0, 0.5, 1.0, 1.5)),
    "e2m0": (3, (0.0, 1.0, 2.0, 4.0)),
    "ternary": (2, (0.0, 1.0)),
}
E8M0_BITS = 8


def _format(fmt: str) -> tuple[int, torch.Tensor]:
    if fmt not in SUBFP4_FORMATS:
        _bad("fmt", repr(fmt), f"must be one of {tuple(SUBFP4_FORMATS)}")
    bits, mags = SUBFP4_FORMATS[fmt]
    return bits, torch.tensor(mags, dtype=torch.float32)


def bits_per_weight(fmt: str, block: int = FP4_BLOCK) -> float:
    """Storage bits per element: element bits + one 8-bit E8M0 scale shared by ``block`` elements."""
    if block < 1:
        _bad("block", block, "must be >= 1")
    return _format(fmt)[0] + E8M0_BITS / block


def minifloat_round(v: torch.Tensor, fmt: str) -> torch.Tensor:
    """Round fp32 values onto the ``fmt`` grid: nearest magnitude, ties to the even magnitude code,
    saturate at the largest magnitude, keep the sign (-0.1 -> -0). NaN stays NaN."""
    _, mags = _format(fmt)
    v = v.float()
    a = v.abs()
    return torch.copysign(mags.to(v.device)[_magnitude_code(a, mags.to(v.device))], v).where(~torch.isnan(v), v)


def _magnitude_code(a: torch.Tensor, mags: torch.Tensor) -> torch.Tensor:
    """|v| -> magnitude code (int64): the nearest grid point; exactly halfway -> the even code."""
    mids = (mags[1:] + mags[:-1]) / 2                       # exact in fp32 for these grids
    a = torch.nan_to_num(a, nan=0.0)
    lo = torch.searchsorted(mids, a.contiguous(), right=False)   # mids strictly below a
    hi = torch.searchsorted(mids, a.contiguous(), right=True)    # mids at or below a
    return torch.where((hi != lo) & (lo % 2 == 1), hi, lo)      # a tie sits on mids[lo]: lo or lo + 1


def minifloat_encode(v: torch.Tensor, fmt: str) -> torch.Tensor:
    """Values -> codes (uint8, ``sign << (bits-1) | magnitude code``), rounding as ``minifloat_round``."""
    bits, mags = _format(fmt)
    v = v.float()
    if bool(torch.isnan(v).any()):
        _bad("v", "contains NaN", f"{fmt} has no NaN encoding")
    code = _magnitude_code(v.abs(), mags.to(v.device))
    return (code + (torch.signbit(v).long() << (bits - 1))).to(torch.uint8)


def minifloat_decode(codes: torch.Tensor, fmt: str) -> torch.Tensor:
    """Codes (uint8) -> fp32 values; the sign bit of a zero magnitude gives -0."""
    bits, mags = _format(fmt)
    c = codes.long()
    if bool((c >> bits).any()):
        _bad("codes", f"max {int(c.max())}", f"{fmt} codes have {bits} bits (0..{2 ** bits - 1})")
    mag = mags.to(codes.device)[c & ((1 << (bits - 1)) - 1)]
    return torch.where((c >> (bits - 1)) == 1, -mag, mag)


def _mx_scale(xb: torch.Tensor, qmax: float) -> torch.Tensor:
    return pow2_scale(xb.abs().amax(-1, keepdim=True), qmax, qmax * 2.0 ** -126)


def mx_quantize(w: torch.Tensor, fmt: str, block: int = FP4_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [..., K]`` -> ``(codes uint8 [..., K], scales uint8 E8M0 [..., K/block])``: MX block quantisation
    with element format ``fmt``; scale = 2^ceil(log2(amax / qmax)) per ``block`` values along K."""
    _, mags = _format(fmt)
    if not bool(torch.isfinite(w).all()):
        _bad("w", "non-finite", f"MX {fmt} weights must be finite (a NaN/inf block has no scale)")
    xb = _blocks(w.float(), block, "w")
    s = _mx_scale(xb, float(mags[-1]))
    return minifloat_encode(xb / s, fmt).reshape(w.shape), scale_to_e8m0(s.squeeze(-1))


def mx_dequantize(codes: torch.Tensor, scales: torch.Tensor, fmt: str, block: int = FP4_BLOCK) -> torch.Tensor:
    """Inverse of ``mx_quantize``: ``W[n, k] = value(code) * 2^(E[n, k // block] - 127)`` in fp32."""
    vals = minifloat_decode(codes, fmt)
    if scales.shape[:-1] != vals.shape[:-1] or scales.shape[-1] * block != vals.shape[-1]:
        _bad("scales.shape", tuple(scales.shape), f"must be {tuple(vals.shape[:-1]) + (vals.shape[-1] // block,)}"
             f" (one scale per {block} values)")
    return (_blocks(vals, block, "codes") * e8m0_to_float(scales).unsqueeze(-1)).reshape(vals.shape)


def mx_fake_quant(w: torch.Tensor, fmt: str, block: int = FP4_BLOCK) -> torch.Tensor:
    """``deq(q(w))`` in w's dtype for element format ``fmt`` (fmt = "e2m1" equals ``fp4_fake_quant``)."""
    _, mags = _format(fmt)
    xb = _blocks(w.float(), block, "w")
    s = _mx_scale(xb, float(mags[-1]))
    return (minifloat_round(xb / s, fmt) * s).reshape(w.shape).to(w.dtype)


def mx_fake_quant_ste(w: torch.Tensor, fmt: str, block: int = FP4_BLOCK) -> torch.Tensor:
    """Straight-through QAT for any MX format: forward ``mx_fake_quant(w)``, gradient passed to ``w``."""
    return w + (mx_fake_quant(w.detach(), fmt, block) - w).detach()
