"""Manifold-constrained hyper-connections (mHC): V4's residual stream, widened to n parallel streams.

Each sublayer reads a mix of the n streams and writes its output back into all of them, while the streams
themselves are mixed by an n×n matrix projected (Sinkhorn) towards the doubly-stochastic set, so that the
residual path can neither amplify nor kill the signal across depth.

Exactly what the official code computes (docs/design/v4-moe-mhc-fp4.md §5.3), per token:

    v    = vec(X)                                  X: [n, d] → v: [n·d], stream-major
    m    = (fn · v) · 1/sqrt(mean(v²) + rms_eps)   matmul first, then the 1/RMS factor; m: [(2+n)·n]
    pre  = σ(scale[0]·m[:n]   + base[:n])   + hc_eps
    post = 2·σ(scale[1]·m[n:2n] + base[n:2n])
    comb = sinkhorn(scale[2]·m[2n:] + base[2n:] as a row-major n×n, iters, hc_eps)
    u    = Σ_i pre_i · X_i                          on the un-normalised X
    ... sublayer: o = F(norm(u)) ...
    X'_j = post_j · o + Σ_i comb[i, j] · X_i        (comb is used TRANSPOSED)

Convention. The paper writes X' = H^res X, so H^res = combᵀ. `sinkhorn` ends on a *column* normalisation
of comb, hence the columns of comb (= rows of H^res) sum to 1 up to ~eps: the forward gain is exact,
while the row sums of comb (backward gain) are only approximately 1. `h_res(comb)` gives H^res.

Modes (same interface, for comparisons):
  "mhc"      the official computation above.
  "hc"       plain hyper-connections: pre/post as in mHC, but the residual matrix is unconstrained,
             comb = I + R with R = scale[2]·m_res + base_res (the raw logits). Our choice: it isolates the
             one thing mHC changes (the projection of H^res); with the recommended init (scale 0.01,
             base 0) it starts at the identity residual, like the HC paper. Do not use a positive diagonal
             base_res here (I + 4I would be a 5× gain per layer).
  "residual" the plain residual: pre = one-hot on stream 0 (u = X_0, no eps), post = 1, comb = I; with
             streams initialised as copies (`init_streams`) every stream stays the ordinary residual.

Dtypes: math in fp32 (fp64 if the input is fp64, so gradcheck works), results cast back to x's dtype;
pre/post/comb are returned in the compute dtype, as the official code keeps them in fp32.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

MODES = ("mhc", "hc", "residual")



# ----------------------------------------------------------------------------------------------- checks
def _bad(arg, value, rule):
    raise ValueError(f"{arg} = {value}: {rule}")


def _hc_mult_from_rows(rows: int, pre_only: bool) -> int | None:
    """Solve rows = (2+n)·n (or rows = n for the head) for a positive integer n."""
    if pre_only:
        return rows
    n = int((-2 + math.sqrt(4 + 4 * rows)) / 2 + 0.5)
    return n if n > 0 and (2 + n) * n == rows else None


def _check_args(x, fn, scale, base, *, rms_eps, hc_eps, iters=1, mode="mhc", hc_mult=None, pre_only=False,
                where="hc_pre"):
    if mode not in MODES:
        _bad(f"{where}: mode", repr(mode), f"must be one of {MODES}")
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        _bad(f"{where}: x", tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__,
             "must be a floating tensor [B, S, n, d] (n = hc_mult streams)")
    n, d = x.shape[2], x.shape[3]
    if hc_mult is not None and n != hc_mult:
        _bad(f"{where}: x.shape[2] (stream count)", n, f"must equal hc_mult = {hc_mult}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        _bad(f"{where}: iters", iters, "must be an integer >= 1")
    for name, v in (("rms_eps", rms_eps), ("hc_eps", hc_eps)):
        if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            _bad(f"{where}: {name}", v, "must be a finite number >= 0")
    if mode == "residual":
        return n, d
    rows = n if pre_only else (2 + n) * n
    if not isinstance(fn, torch.Tensor) or fn.dim() != 2:
        _bad(f"{where}: fn", getattr(fn, "shape", fn), f"must be a 2-D tensor [{rows}, {n * d}]")
    if tuple(fn.shape) != (rows, n * d):
        implied = _hc_mult_from_rows(fn.shape[0], pre_only)
        hint = f" (its rows imply hc_mult = {implied})" if implied is not None and implied != n else ""
        _bad(f"{where}: fn.shape", tuple(fn.shape),
             f"must be [{'n' if pre_only else '(2+n)·n'}, n·d] = [{rows}, {n * d}] for x with n = {n} "
             f"streams of d = {d}{hint}")
    n_scale = 1 if pre_only else 3
    if not isinstance(scale, torch.Tensor) or tuple(scale.shape) != (n_scale,):
        _bad(f"{where}: scale.shape", tuple(getattr(scale, "shape", ())), f"must be [{n_scale}]")
    if not isinstance(base, torch.Tensor) or tuple(base.shape) != (rows,):
        _bad(f"{where}: base.shape", tuple(getattr(base, "shape", ())), f"must be [{rows}]")
    return n, d


def _check_finite(t: torch.Tensor, what: str, on: bool = True):
    # Checking the mixing logits for inf/nan costs a host sync: ``check_finite=False`` skips it in hot loops.
    if on and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{what}: contains inf or nan (check the inputs x and the parameters fn/scale/base)")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------- Sinkhorn
def _check_sinkhorn_args(logits, iters, eps):
    if logits.dim() < 2 or logits.shape[-1] != logits.shape[-2]:
        _bad("sinkhorn: logits.shape", tuple(logits.shape), "must end in a square [n, n]")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        _bad("sinkhorn: iters", iters, "must be an integer >= 1")
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        _bad("sinkhorn: eps", eps, "must be a finite number >= 0")
    _check_finite(logits, "sinkhorn: logits")


def sinkhorn(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Official-order Sinkhorn on [..., n, n] logits → comb (columns sum to 1; H^res = combᵀ).

    row softmax + eps, one column normalisation, then iters − 1 rounds of (row, column) normalisation,
    eps in every denominator: iters row and iters column normalisations in all, ending on a column one.
    """
    _check_sinkhorn_args(logits, iters, eps)
    return _sinkhorn(logits, iters, eps)


def sinkhorn_rowmajor(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """The reference of `sinkhorn` (same signature and result) on the natural [..., n, n] layout."""
    _check_sinkhorn_args(logits, iters, eps)
    c = torch.softmax(logits, dim=-1) + eps
    c = c / (c.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        c = c / (c.sum(-1, keepdim=True) + eps)
        c = c / (c.sum(-2, keepdim=True) + eps)
    return c


class _Sinkhorn(torch.autograd.Function):
    """The whole Sinkhorn of logits [T, n, n] on a [n, n, T] layout (tokens the contiguous axis) with a
    hand-written backward: softmax over k, + eps, then 2·iters − 1 normalisations y = c / (Σ_a c + eps), a
    column one (a = 0) first, then rows (a = 1) and columns alternating; every step's output goes into one
    preallocated [2·iters − 1, n, n, T] buffer (a fresh tensor per step costs page faults at 2048 tokens).
    Backward: a step's input gradient is (g − Σ_a g·y) / (Σ_a c + eps), the softmax's s·(g − Σ_k g·s), on a
    contiguous copy of g (it arrives token-major from the permute, which made every op ~5x slower): ~4 small
    ops a step where autograd's DivBackward / SumBackward nodes took ~10. Same forward ops, same values."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
        steps, n = 2 * iters - 1, logits.shape[-1]
        # softmax on the [T, n, n] rows (a [n, n, T] softmax is 10x faster, but rounds differently and
        # moves the pinned logits of tests/test_refactor_reference.py by ~7e-6)
        s = torch.softmax(logits.reshape(-1, n, n), -1).permute(1, 2, 0).contiguous()             # [n, n, T]
        ys = s.new_empty(steps, *s.shape)
        dens, c = [], s + eps
        for k in range(steps):
            den = c.sum(k % 2, keepdim=True) + eps                     # k even: columns (axis 0), odd: rows
            c = torch.div(c, den, out=ys[k])
            dens.append(den)
        ctx.save_for_backward(s, ys, *dens)
        return c.clone()

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        s, ys, *dens = ctx.saved_tensors
        g = g.clone(memory_format=torch.contiguous_format)      # it arrives token-major from the permute
        for k in range(len(dens) - 1, -1, -1):
            g.sub_((g * ys[k]).sum(k % 2, keepdim=True)).div_(dens[k])
        return (s * (g - (g * s).sum(1, keepdim=True))).permute(2, 0, 1), None, None


def _sinkhorn(logits, iters, eps, trace=None):
    # The same steps as `sinkhorn_rowmajor`, on a [n, n, T] layout: the tokens are the contiguous axis, so
    # each of the 2·iters normalisations is one vectorised pass (with [T, n, n] every op broadcasts over
    # rows of 4 floats: ~8x slower on a CPU, ~25 % of a tiny model's training step at hc_mult 4).
    lead = logits.shape[:-2]
    n = logits.shape[-1]
    if trace is None:
        return _Sinkhorn.apply(logits.reshape(-1, n, n), iters, eps).permute(2, 0, 1).reshape(*lead, n, n)
    c = torch.softmax(logits, dim=-1).reshape(-1, n, n).permute(1, 2, 0).contiguous() + eps    # [n, n, T]
    c = c / (c.sum(0, keepdim=True) + eps)
    trace.append(c.permute(2, 0, 1).reshape(*lead, n, n))
    for _ in range(iters - 1):
        c = c / (c.sum(1, keepdim=True) + eps)
        c = c / (c.sum(0, keepdim=True) + eps)
        trace.append(c.permute(2, 0, 1).reshape(*lead, n, n))
    return c.permute(2, 0, 1).reshape(*lead, n, n)


def sinkhorn_errors(logits: torch.Tensor, iters: int, eps: float) -> dict:
    """Max |row sum − 1| and |column sum − 1| of comb after each iteration t = 1..iters (official order).

    Iteration t = t row and t column normalisations. Column errors (rows of H^res) fall to ~eps at once;
    row errors (columns of H^res, the backward gain) shrink only as t grows.
    """
    _check_sinkhorn_args(logits, iters, eps)
    trace, rows, cols = [], [], []
    _sinkhorn(logits.detach(), iters, eps, trace)
    for c in trace:
        rows.append(float((c.sum(-1) - 1).abs().max()))
        cols.append(float((c.sum(-2) - 1).abs().max()))
    return {"iteration": list(range(1, iters + 1)), "row_err": rows, "col_err": cols}


def h_res(comb: torch.Tensor) -> torch.Tensor:
    """The paper's H^res (X' = H^res X) from the official comb: its transpose."""
    return comb.transpose(-1, -2)


# ----------------------------------------------------------------------------------------------- pre / post
def _mixes_reference(x_flat: torch.Tensor, fn: torch.Tensor, rms_eps: float) -> torch.Tensor:
    """m = (fn · v) · 1/RMS(v): the matmul first, then the per-token 1/RMS factor (as the official code).
    The reference of `_mixes` (same signature and result), differentiated by autograd."""
    r = torch.rsqrt(x_flat.square().mean(-1, keepdim=True) + rms_eps)
    return F.linear(x_flat, fn.to(x_flat.dtype)) * r


class _RmsMix(torch.autograd.Function):
    """`_mixes_reference`'s ops with a hand-written backward. For m = (v·fnᵀ)·r, r = (mean(v²) + eps)^−½:
    d/dv = (g·r)·fn − v·r²·Σ_j g_j·m_j / (n·d) and d/dfn = (g·r)ᵀ·v, one GEMM each and one fused
    multiply-add over [T, n·d], where autograd's pow / mean / rsqrt / mul nodes make ~6 [T, n·d] passes
    (at 2048 tokens those were ~70 % of an hc_pre site's forward + backward)."""

    @staticmethod
    def forward(ctx, v: torch.Tensor, fn: torch.Tensor, rms_eps: float) -> torch.Tensor:
        r = torch.rsqrt(v.square().mean(-1, keepdim=True) + rms_eps)               # [T, 1]
        m = F.linear(v, fn) * r                                                   # [T, rows]
        ctx.save_for_backward(v, fn, r, m)
        return m

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        v, fn, r, m = ctx.saved_tensors
        gr = g * r
        coef = (g * m).sum(-1, keepdim=True) * r.square() / v.shape[-1]          # [T, 1]
        gv = torch.addcmul(gr @ fn, v, coef, value=-1.0) if ctx.needs_input_grad[0] else None
        gfn = gr.t() @ v if ctx.needs_input_grad[1] else None
        return gv, gfn, None


def _mixes(x_flat: torch.Tensor, fn: torch.Tensor, rms_eps: float) -> torch.Tensor:
    """m = (fn · v) · 1/RMS(v) as `_mixes_reference` (same values), with `_RmsMix`'s backward."""
    return _RmsMix.apply(x_flat, fn.to(x_flat.dtype), rms_eps)


def mix_streams(w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Σ_i w[t, i] · v[t, i]: weights w [T, n], streams v [T, n, d] → [T, d] (the pre-mix u, the head collapse).

    One broadcast product and a sum over the n streams: a [1, n] @ [n, d] bmm per token does the same work
    ~5x slower on a CPU (fwd + bwd, T = 2048, n = 4, d = 128), as each of the T products is tiny."""
    return (w.unsqueeze(-1) * v).sum(-2)


def mix_streams_reference(w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The reference of `mix_streams` (same signature and result): the weighted sum written out stream by stream."""
    u = w[:, 0, None] * v[:, 0]
    for i in range(1, v.shape[1]):
        u = u + w[:, i, None] * v[:, i]
    return u


def hc_pre_coeffs(x_flat: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor,
                  rms_eps: float, hc_eps: float, iters: int, mode: str = "mhc", check_finite: bool = True):
    """pre [T, n], post [T, n], comb [T, n, n] for flattened tokens x_flat [T, n·d] (reference for the kernel).

    The Triton kernel `v4lab.kernels.mhc.hc_pre_coeffs` has this signature and must equal it.
    """
    if not isinstance(x_flat, torch.Tensor) or x_flat.dim() != 2:
        _bad("hc_pre_coeffs: x_flat", tuple(getattr(x_flat, "shape", ())), "must be [T, n·d]")
    n = _hc_mult_from_rows(fn.shape[0], False) if isinstance(fn, torch.Tensor) and fn.dim() == 2 else None
    if n is None or x_flat.shape[1] % n:
        _bad("hc_pre_coeffs: fn.shape", tuple(getattr(fn, "shape", ())),
             f"must be [(2+n)·n, n·d] with n·d = x_flat.shape[1] = {x_flat.shape[1]}")
    x = x_flat.reshape(x_flat.shape[0], 1, n, x_flat.shape[1] // n)
    _check_args(x, fn, scale, base, rms_eps=rms_eps, hc_eps=hc_eps, iters=iters, mode=mode, where="hc_pre_coeffs")
    return _coeffs(x_flat, fn, scale, base, n, rms_eps, hc_eps, iters, mode, check_finite)


def _coeffs(v, fn, scale, base, n, rms_eps, hc_eps, iters, mode, check_finite=True):
    T, cd = v.shape[0], _compute_dtype(v.dtype)
    if mode == "residual":
        pre = torch.zeros(T, n, dtype=cd, device=v.device)
        pre[:, 0] = 1.0
        post = torch.ones(T, n, dtype=cd, device=v.device)
        comb = torch.eye(n, dtype=cd, device=v.device).expand(T, n, n)
        return pre, post, comb
    m = _mixes(v.to(cd), fn, rms_eps)
    scale, base = scale.to(cd), base.to(cd)
    z = torch.cat([scale[0] * m[:, :n], scale[1] * m[:, n:2 * n], scale[2] * m[:, 2 * n:]], -1) + base
    _check_finite(z, "hc_pre: logits scale·(fn·v)/RMS(v) + base", check_finite)
    pre = torch.sigmoid(z[:, :n]) + hc_eps
    post = 2 * torch.sigmoid(z[:, n:2 * n])
    logits = z[:, 2 * n:].view(T, n, n)                                  # row-major: logits[j, k] = z[2n + n·j + k]
    if mode == "mhc":
        comb = _sinkhorn(logits, iters, hc_eps)
    else:                                                                 # "hc": unconstrained, identity-centred
        comb = torch.eye(n, dtype=cd, device=v.device) + logits
    return pre, post, comb


def hc_pre(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, *, rms_eps: float,
           hc_eps: float, iters: int, mode: str = "mhc", hc_mult: int | None = None, check_finite: bool = True):
    """Collapse n streams into one sublayer input.

    x: [B, S, n, d] → u: [B, S, d] (x's dtype), post: [B, S, n], comb: [B, S, n, n] (fp32).
    fn [(2+n)n, n·d], base [(2+n)n], scale [3] (hc_{attn,ffn}_*). hc_mult, if given, must equal n.
    ``check_finite``: raise on inf/nan mixing logits (a host sync; off in hot loops).
    """
    n, d = _check_args(x, fn, scale, base, rms_eps=rms_eps, hc_eps=hc_eps, iters=iters, mode=mode,
                       hc_mult=hc_mult)
    B, S = x.shape[:2]
    cd = _compute_dtype(x.dtype)
    v = x.reshape(B * S, n * d).to(cd)                                    # stream-major flatten
    pre, post, comb = _coeffs(v, fn, scale, base, n, rms_eps, hc_eps, iters, mode, check_finite)
    u = mix_streams(pre, v.view(B * S, n, d))                            # Σ_i pre_i X_i, un-normalised X
    return u.to(x.dtype).view(B, S, d), post.view(B, S, n), comb.reshape(B, S, n, n)


def hc_post(o: torch.Tensor, x: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """Expand and mix: X'_j = post_j · o + Σ_i comb[i, j] · X_i (the transpose of comb). → [B, S, n, d]."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        _bad("hc_post: x", tuple(getattr(x, "shape", ())), "must be [B, S, n, d]")
    B, S, n, d = x.shape
    for name, t, shape in (("o", o, (B, S, d)), ("post", post, (B, S, n)), ("comb", comb, (B, S, n, n))):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
            _bad(f"hc_post: {name}.shape", tuple(getattr(t, "shape", ())),
                 f"must be {list(shape)} to match x [B, S, n, d] = {list(x.shape)}")
    cd = _compute_dtype(x.dtype)
    y = _Post.apply(o.to(cd).reshape(B * S, d), x.to(cd).reshape(B * S, n, d), post.to(cd).reshape(B * S, n),
                    comb.to(cd).reshape(B * S, n, n))
    return y.view(B, S, n, d).to(x.dtype)


def hc_post_reference(o: torch.Tensor, x: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """The reference of `hc_post` (same signature and result, without the checks), differentiated by autograd."""
    cd = _compute_dtype(x.dtype)
    # Σ_i comb[i, j] X_i = (combᵀ X)_j: the transpose is the official (column-stochastic) use.
    # contiguous: Sinkhorn leaves comb token-minor ([B, S, n, n] with stride 1 on S), which makes bmm crawl
    y = post.to(cd).unsqueeze(-1) * o.to(cd).unsqueeze(-2) + comb.to(cd).transpose(-1, -2).contiguous() @ x.to(cd)
    return y.to(x.dtype)


class _Post(torch.autograd.Function):
    """`hc_post_reference`'s ops on o [T, d], x [T, n, d], post [T, n], comb [T, n, n] with a hand-written
    backward: g_o = Σ_j post_j·g_j, g_post_j = g_j·o, g_comb = x·gᵀ ([T, n, d] @ [T, d, n]), g_x = comb·g;
    autograd's broadcast-product nodes reduce [T, n, d] temporaries to the broadcast shapes instead."""

    @staticmethod
    def forward(ctx, o: torch.Tensor, x: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
        comb_t = comb.transpose(-1, -2).contiguous()          # Sinkhorn leaves comb token-minor: bmm would crawl
        ctx.save_for_backward(o, x, post, comb_t)
        return post.unsqueeze(-1) * o.unsqueeze(-2) + comb_t @ x

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        o, x, post, comb_t = ctx.saved_tensors
        g = g.contiguous()
        g_o = (post.unsqueeze(-1) * g).sum(-2) if ctx.needs_input_grad[0] else None
        g_x = comb_t.transpose(-1, -2) @ g if ctx.needs_input_grad[1] else None
        g_post = (g * o.unsqueeze(-2)).sum(-1) if ctx.needs_input_grad[2] else None
        g_comb = x @ g.transpose(-1, -2) if ctx.needs_input_grad[3] else None
        return g_o, g_x, g_post, g_comb


def hc_head(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, *, rms_eps: float,
            hc_eps: float, mode: str = "mhc", hc_mult: int | None = None, check_finite: bool = True) -> torch.Tensor:
    """Final collapse (pre only, no Sinkhorn): y = Σ_i (σ(scale[0]·m_i + base_i) + hc_eps) X_i → [B, S, d].

    fn [n, n·d], base [n], scale [1] (hc_head_*). mode "residual" returns stream 0; "hc" equals "mhc".
    """
    n, d = _check_args(x, fn, scale, base, rms_eps=rms_eps, hc_eps=hc_eps, mode=mode, hc_mult=hc_mult,
                       pre_only=True, where="hc_head")
    if mode == "residual":
        return x[:, :, 0]
    B, S = x.shape[:2]
    cd = _compute_dtype(x.dtype)
    v = x.reshape(B * S, n * d).to(cd)
    m = _mixes(v, fn, rms_eps)
    z = scale.to(cd)[0] * m + base.to(cd)
    _check_finite(z, "hc_head: logits scale·(fn·v)/RMS(v) + base", check_finite)
    p = torch.sigmoid(z) + hc_eps
    return mix_streams(p, v.view(B * S, n, d)).to(x.dtype).view(B, S, d)


def init_streams(e: torch.Tensor, n: int) -> torch.Tensor:
    """Copy the embedding e [B, S, d] into n streams [B, S, n, d] (no 1/n scaling, as the official code)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        _bad("init_streams: n", n, "must be an integer >= 1 (hc_mult)")
    if e.dim() != 3:
        _bad("init_streams: e", tuple(e.shape), "must be [B, S, d]")
    return e.unsqueeze(2).expand(-1, -1, n, -1).contiguous()


# ----------------------------------------------------------------------------------------------- diagnostics
def composite_gains(h: torch.Tensor) -> dict:
    """Gains of P_l = H_l ⋯ H_1 H_0 for l = 0..L−1, from H^res matrices h: [L, n, n] (paper convention).

    forward gain = max_j |Σ_k P[j, k]| (abs row sums), backward gain = max_k |Σ_j P[j, k]| (abs column sums);
    the minima too, since a max-based metric hides attenuation. Ideal: all 1. Pass `h_res(comb)` for combs.
    """
    if h.dim() != 3 or h.shape[-1] != h.shape[-2]:
        _bad("composite_gains: h.shape", tuple(h.shape), "must be [L, n, n]")
    h = h.detach().double()
    P = torch.eye(h.shape[-1], dtype=h.dtype, device=h.device)
    out = {k: [] for k in ("fwd_max", "fwd_min", "bwd_max", "bwd_min")}
    for layer in h:
        P = layer @ P
        rs, cs = P.sum(-1).abs(), P.sum(-2).abs()
        out["fwd_max"].append(float(rs.max()))
        out["fwd_min"].append(float(rs.min()))
        out["bwd_max"].append(float(cs.max()))
        out["bwd_min"].append(float(cs.min()))
    out["depth"] = list(range(1, h.shape[0] + 1))
    return out


def token_mean_h_res(comb: torch.Tensor) -> torch.Tensor:
    """Token-averaged H^res [n, n] from comb [..., n, n] (S5 averages over one sequence before composing)."""
    return h_res(comb.detach().reshape(-1, *comb.shape[-2:]).double().mean(0))


# ----------------------------------------------------------------------------------------------- module
class HyperConnection(nn.Module):
    """One mHC site (params `fn`, `base`, `scale` = the checkpoint's hc_{attn,ffn}_*), or the head collapse
    (`head=True`: fn [n, n·d], base [n], scale [1] = hc_head_*).

    forward(x [B,S,n,d]) → (u, post, comb), or u for the head; `post(o, x, post, comb)` expands back.
    With `record=True` the last comb (detached) is kept in `last_comb` for diagnostics.
    """

    def __init__(self, d: int, n: int = 4, *, mode: str = "mhc", head: bool = False, rms_eps: float = 1e-6,
                 hc_eps: float = 1e-6, iters: int = 20):
        super().__init__()
        if mode not in MODES:
            _bad("HyperConnection: mode", repr(mode), f"must be one of {MODES}")
        for name, v in (("d", d), ("n", n)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                _bad(f"HyperConnection: {name}", v, "must be an integer >= 1")
        self.d, self.n, self.mode, self.head = d, n, mode, head
        self.rms_eps, self.hc_eps, self.iters = rms_eps, hc_eps, iters
        rows = n if head else (2 + n) * n
        self.fn = nn.Parameter(torch.empty(rows, n * d))
        self.base = nn.Parameter(torch.empty(rows))
        self.scale = nn.Parameter(torch.empty(1 if head else 3))
        self.record, self.last_comb = False, None
        self.init_()

    @torch.no_grad()
    def init_(self, std: float = 0.02, scale: float = 0.01, diag: float = 0.0, generator=None):
        """Spec §5.3's recommended init (UNCERTAIN whether DeepSeek used it): scale = α = 0.01,
        fn ~ N(0, std), base = 0 (pre = 0.5, post = 1, uniform 1/n mixing in mHC); `diag` > 0 adds a positive
        diagonal to base_res (mHC starts near the identity). Keep diag = 0 for mode "hc" (comb = I + R)."""
        self.fn.normal_(0.0, std, generator=generator)
        self.base.zero_()
        self.scale.fill_(scale)
        if diag and not self.head:
            n = self.n
            self.base[2 * n:].view(n, n).diagonal().add_(diag)
        return self

    def forward(self, x: torch.Tensor):
        if self.head:
            return hc_head(x, self.fn, self.scale, self.base, rms_eps=self.rms_eps, hc_eps=self.hc_eps,
                           mode=self.mode, hc_mult=self.n)
        u, post, comb = hc_pre(x, self.fn, self.scale, self.base, rms_eps=self.rms_eps, hc_eps=self.hc_eps,
                               iters=self.iters, mode=self.mode, hc_mult=self.n)
        if self.record:
            self.last_comb = comb.detach()
        return u, post, comb

    @staticmethod
    def post(o, x, post, comb):
        return hc_post(o, x, post, comb)

    def extra_repr(self):
        return f"d={self.d}, n={self.n}, mode={self.mode!r}, head={self.head}, iters={self.iters}"
