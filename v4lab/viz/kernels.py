"""Notebook 08: every Triton kernel in ``kernels/`` beside the v4lab reference it must equal.

* :data:`KERNELS` — one entry per kernel: the kernel function, its reference (same signature), and a
  seeded input maker at small shapes (the interpreter pays per program and per op).
* :func:`compare` / :func:`compare_all` — run both, report max |kernel − reference|, the tolerance the
  kernel's test uses, and wall time (interpreter times say nothing about a GPU).
* :class:`CompareWidget` — a kernel dropdown → the reference output, the kernel output and their
  difference as heatmaps (all kernels run once, at construction).
* :class:`RooflineWidget` — first-order arithmetic intensity of each kernel at V4-Flash shapes against a
  GPU's roofline (``v4lab.hardware``), with a tokens-per-call slider.
* :func:`bench_records` — benchmark results: the quick run of ``v4lab.bench.kernels`` (every kernel
  against its reference on the current device; on a CPU a correctness check, not a timing).
"""
from __future__ import annotations

import importlib
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import torch

from v4lab import attention, compressor, hardware, indexer, mhc, moe, quant
from v4lab.device import kernel_mode
from v4lab.viz.common import Widget, check_choice, figure_from, fmt3, register


@dataclass(frozen=True)
class KernelCase:
    name: str
    kernel: str            # "module:function" under v4lab.kernels
    reference: Callable
    make: Callable         # () -> (args tuple, kwargs dict, shapes text)
    atol: float            # the tolerance its test uses (0 = bit-exact)
    what: str


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _sparse_attn_inputs():
    g = _g(0)
    B, S, H, D, N, K = 1, 8, 4, 64, 48, 16
    q, kv, sink = torch.randn(B, S, H, D, generator=g), torch.randn(B, N, D, generator=g), torch.randn(H, generator=g)
    idx = torch.randint(0, N, (B, S, K), generator=g)
    idx[:, :, -3:] = -1                                       # empty slots are skipped
    return (q, kv, sink, idx, D ** -0.5), {}, "q [1,8,4,64], kv [1,48,64], idx [1,8,16]"


def _compressor_inputs():
    g = _g(1)
    B, n, c, m = 1, 32, 32, 4
    kv, score, ape = torch.randn(B, n, 2 * c, generator=g), torch.randn(B, n, 2 * c, generator=g), torch.randn(m, 2 * c, generator=g)
    return (kv, score, ape, m, True), {}, "kv, score [1,32,64], ape [4,64], m = 4, CSA overlap"


def _indexer_inputs():
    g = _g(2)
    return ((torch.randn(1, 8, 4, 32, generator=g), torch.randn(1, 40, 32, generator=g),
             torch.randn(1, 8, 4, generator=g)), {}, "q [1,8,4,32], k [1,40,32], w [1,8,4]")


def _mhc_inputs():
    g = _g(3)
    n, d, T = 4, 16, 16
    R = (2 + n) * n
    return ((torch.randn(T, n * d, generator=g), torch.randn(R, n * d, generator=g) * 0.5,
             torch.tensor([0.5, 0.5, 1.0]), torch.randn(R, generator=g), 1e-6, 1e-6, 20), {},
            "x [16 tokens, 4×16], fn [24,64], 20 Sinkhorn iterations")


def _moe_inputs():
    g = _g(4)
    E, D, I = 4, 32, 32
    counts = [5, 0, 9, 6]                                     # an expert with no rows too
    N = sum(counts)
    offsets = torch.tensor([0] + list(torch.tensor(counts).cumsum(0).tolist()))
    return ((torch.randn(N, D, generator=g) * 2, torch.randn(E, I, D, generator=g) * 0.3,
             torch.randn(E, I, D, generator=g) * 0.3, torch.randn(E, D, I, generator=g) * 0.3, offsets,
             torch.rand(N, generator=g), 10.0), {}, "x [20,32], 4 experts of width 32 (one empty), clamp 10")


def _fp4_gemm_inputs():
    g = _g(5)
    w = torch.randn(64, 128, generator=g) * torch.logspace(-2, 1, 64)[:, None]
    packed, scales = quant.mxfp4_quantize(w)
    return (torch.randn(8, 128, generator=g), packed, scales), {}, "x [8,128], W [64,128] as MXFP4"


def _act_quant_inputs():
    g = _g(6)
    x = torch.randn(16, 128, generator=g) * torch.logspace(-3, 3, 16)[:, None]
    return (x,), {}, "x [16,128], blocks of 32"


KERNELS = {
    "sparse_attn": KernelCase("sparse_attn", "sparse_attn:sparse_attn", attention.sparse_attn, _sparse_attn_inputs,
                              1e-5, "attention over an index list, with the sink (window, CSA, HCA)"),
    "compressor": KernelCase("compressor", "compressor:compress_pool", compressor.compress_pool, _compressor_inputs,
                             1e-5, "softmax pooling of m tokens into one KV entry"),
    "indexer": KernelCase("indexer", "indexer:index_scores", indexer.index_scores, _indexer_inputs, 1e-4,
                          "lightning-indexer scores Σ_h w·ReLU(q·k)"),
    "mhc": KernelCase("mhc", "mhc:hc_pre_coeffs", mhc.hc_pre_coeffs, _mhc_inputs, 1e-5,
                      "mHC pre-mix: projection, RMS, sigmoids, Sinkhorn"),
    "moe": KernelCase("moe", "moe:grouped_expert_mlp", moe.grouped_expert_mlp, _moe_inputs, 1e-4,
                      "grouped expert MLP with the clamped SwiGLU"),
    "fp4_gemm": KernelCase("fp4_gemm", "fp4_gemm:fp4_gemm", quant.fp4_gemm_ref, _fp4_gemm_inputs, 1e-4,
                           "GEMM with FP4 weight dequant fused in"),
    "quant": KernelCase("quant", "quant:fp4_act_quant", quant.fp4_act_quant, _act_quant_inputs, 0.0,
                        "MXFP4 activation fake-quant (bit-exact)"),
}


def kernel_fn(case: KernelCase) -> Callable:
    mod, fn = case.kernel.split(":")
    return getattr(importlib.import_module(f"v4lab.kernels.{mod}"), fn)


def _first(out):
    """The tensor to compare: the output, or the comb of mHC's (pre, post, comb)."""
    return out[2] if isinstance(out, tuple) else out


def _rel_scale(ref: torch.Tensor) -> float:
    return max(1.0, float(ref.abs().max()))


@lru_cache(maxsize=len(KERNELS))
def compare(name: str) -> dict:
    """Run kernel and reference on the same seeded small inputs: max abs diff, tolerance, times."""
    check_choice("kernel", name, KERNELS)
    case = KERNELS[name]
    args, kwargs, shapes = case.make()
    if kernel_mode() == "compiled":          # compiled Triton needs CUDA tensors; the interpreter takes CPU ones
        args = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)
    fn = kernel_fn(case)
    sync = torch.cuda.synchronize if kernel_mode() == "compiled" else (lambda: None)
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    sync()
    t1 = time.perf_counter()
    ref = case.reference(*args, **kwargs)
    sync()
    t2 = time.perf_counter()
    outs = out if isinstance(out, tuple) else (out,)
    refs = ref if isinstance(ref, tuple) else (ref,)
    diff = max(float((a.float() - b.float()).abs().max()) for a, b in zip(outs, refs))
    tol = case.atol * _rel_scale(_first(ref).float())
    return {"kernel": name, "function": f"v4lab.kernels.{case.kernel.replace(':', '.')}",
            "reference": f"{case.reference.__module__}.{case.reference.__name__}", "shapes": shapes,
            "what": case.what, "max_abs_diff": diff, "tol": tol, "ok": diff <= tol,
            "ms_kernel": (t1 - t0) * 1e3, "ms_reference": (t2 - t1) * 1e3, "mode": kernel_mode(),
            "out": _first(out).detach().float().cpu(), "ref": _first(ref).detach().float().cpu()}


def compare_all() -> list[dict]:
    return [compare(k) for k in KERNELS]


def compare_table(rows: list[dict] | None = None, times: bool = True) -> str:
    rows = compare_all() if rows is None else rows
    head = f"{'kernel':<12} {'max |kernel - ref|':>18} {'tolerance':>10}  ok "
    head += f"{'kernel ms':>10} {'ref ms':>8}" if times else ""
    lines = [f"Triton mode: {rows[0]['mode'] if rows else kernel_mode()}", head]
    for r in rows:
        line = f"{r['kernel']:<12} {r['max_abs_diff']:>18.2e} {r['tol']:>10.1e}  {'yes' if r['ok'] else 'NO':<3}"
        if times:
            line += f"{r['ms_kernel']:>10.1f} {r['ms_reference']:>8.2f}"
        lines.append(line)
    return "\n".join(lines)


def _as2d(t: torch.Tensor) -> torch.Tensor:
    """A readable 2-D slice of an output: rows = first dim after flattening all but the last."""
    t = t.reshape(-1, t.shape[-1]) if t.dim() > 1 else t.view(1, -1)
    return t[:16, :48]          # small enough that a callback redraws three heatmaps in well under 100 ms


def compare_data(kernel: str = "sparse_attn") -> dict:
    """Traces: reference heatmap, kernel heatmap, |difference| heatmap (log10)."""
    r = compare(kernel)
    ref, out = _as2d(r["ref"]), _as2d(r["out"])
    lim = max(float(ref.abs().max()), 1e-30)
    d = (out - ref).abs()
    logd = torch.log10(d.clamp(min=1e-12)).tolist()
    traces = [dict(type="heatmap", z=ref.tolist(), zmin=-lim, zmax=lim, colorscale="RdBu", reversescale=True,
                   showscale=False, name="reference", xaxis="x", yaxis="y"),
              # reference and kernel share one scale: one bar, beside the kernel's panel
              dict(type="heatmap", z=out.tolist(), zmin=-lim, zmax=lim, colorscale="RdBu", reversescale=True,
                   name="kernel", colorbar=dict(title="value", x=0.6, xanchor="left", len=0.8, thickness=10),
                   xaxis="x2", yaxis="y2"),
              dict(type="heatmap", z=logd, zmin=-12, zmax=0, colorscale="Viridis", name="log10 |diff|",
                   colorbar=dict(title="log10|Δ|", x=0.935, xanchor="left", len=0.8, thickness=10),
                   xaxis="x3", yaxis="y3")]
    title = (f"{kernel}: {r['what']}<br>{r['shapes']}; max |Δ| = {r['max_abs_diff']:.1e} "
             f"(tolerance {r['tol']:.0e}, {r['mode']})")
    ann = [dict(text=_wrap(t, 34), x=0.5, xref=f"{xa} domain", y=1.0, yref=f"{ya} domain", showarrow=False,
                yanchor="bottom", font=dict(size=11))
           for t, xa, ya in ((r["reference"], "x", "y"), (r["function"], "x2", "y2"),
                             ("|kernel − reference| (0 shown as 1e-12)", "x3", "y3"))]
    return {"traces": traces, "layout": {"title": {"text": title, "font": {"size": 12}}, "annotations": ann}}


def _wrap(text: str, width: int) -> str:
    """Break ``text`` into lines of at most ``width`` characters (at spaces, dots or underscores)."""
    import re
    parts, lines, cur = re.split(r"(?<=[ ._])", text), [], ""
    for p in parts:
        if cur and len(cur) + len(p) > width:
            lines.append(cur.rstrip())
            cur = ""
        cur += p
    return "<br>".join(lines + [cur.rstrip()])


_AX = dict(title="column (first 48)")
COMPARE_LAYOUT = dict(
    height=420, margin=dict(l=70, r=20, t=120, b=50),
    xaxis=dict(domain=[0, 0.27], **_AX), yaxis=dict(autorange="reversed", title="row (first 16)"),
    xaxis2=dict(domain=[0.32, 0.59], anchor="y2", **_AX),
    yaxis2=dict(autorange="reversed", anchor="x2", showticklabels=False),     # the same rows as the first
    xaxis3=dict(domain=[0.66, 0.93], anchor="y3", **_AX),
    yaxis3=dict(autorange="reversed", anchor="x3", showticklabels=False),
)


def build_compare(kernel: str = "sparse_attn"):
    """Reference output, kernel output, and their difference (static figure)."""
    return figure_from(compare_data(kernel), COMPARE_LAYOUT)


@register
class CompareWidget(Widget):
    """A kernel dropdown over :func:`build_compare`; every kernel is run once at construction."""

    name = "kernels.compare"
    defaults = {"kernel": "sparse_attn"}

    def __init__(self, static=None, **state):
        compare_all()
        super().__init__(static, **state)

    def validate(self, state):
        check_choice("kernel", state["kernel"], KERNELS)

    def data(self):
        return compare_data(**self.state)

    def layout(self):
        return COMPARE_LAYOUT

    def make_controls(self):
        import ipywidgets as W
        return {"kernel": W.Dropdown(options=list(KERNELS), value=self.state["kernel"], description="kernel")}

    def sweep_values(self, control):
        return {"kernel": list(KERNELS)}[control]

    def on_kernel(self, value):
        self.set(kernel=value)


# ------------------------------------------------------------------------------------ roofline
# First-order FLOPs and HBM bytes of one call at V4-Flash shapes for M tokens (queries or rows), in the
# precision the official kernels use. Constants: hidden 4096, 64 query heads of 512, FP8 KV entries
# (584 B incl. BF16 rope + scales), top-512 + 128-window entries per query, indexer 64 heads × 128 with FP4
# keys (68 B), 64K-token context (16K compressed keys), 256 experts of width 2048 (top-6), hc_mult 4.
D_MODEL, HEADS, HEAD_DIM, KV_ENTRY_B, ATTENDED = 4096, 64, 512, 584, 512 + 128
IDX_HEADS, IDX_DIM, IDX_KEY_B, IDX_KEYS = 64, 128, 68, 2 ** 16 // 4
EXPERTS, EXPERT_I, TOPK, FP4_B = 256, 2048, 6, 0.5 + 1 / 32


def _cost(kernel: str, M: int) -> tuple[float, float, str]:
    """(FLOPs, bytes, precision) of one call over M tokens."""
    if kernel == "sparse_attn":      # each query gathers its own 640 entries; all 64 heads share them
        return 4 * M * HEADS * HEAD_DIM * ATTENDED, M * (ATTENDED * KV_ENTRY_B + 2 * 2 * HEADS * HEAD_DIM), "bf16"
    if kernel == "indexer":          # M queries score the same 16K FP4 keys
        return 2 * M * IDX_HEADS * IDX_DIM * IDX_KEYS, IDX_KEYS * IDX_KEY_B + M * IDX_HEADS * (IDX_DIM * FP4_B + 4), "fp4"
    if kernel == "compressor":       # softmax pooling: ~6 FLOPs per input element (CSA: 2 × 512 wide, fp32)
        el = M * 2 * 512
        return 6 * el, 4 * (2 * el + el / 4), "bf16"
    if kernel == "mhc":              # 24 × 16384 projection per token; fn (fp32) read once per call
        return 2 * M * 24 * 4 * D_MODEL, M * 4 * D_MODEL * 2 + 24 * 4 * D_MODEL * 4, "bf16"
    if kernel == "moe":              # the experts the M tokens reach, each read once (FP4)
        touched = EXPERTS * (1 - (1 - TOPK / EXPERTS) ** M)
        return 2 * 3 * M * TOPK * D_MODEL * EXPERT_I, touched * 3 * D_MODEL * EXPERT_I * FP4_B + M * D_MODEL * 4, "fp4"
    if kernel == "fp4_gemm":         # one expert projection [2048, 4096] in MXFP4
        return 2 * M * EXPERT_I * D_MODEL, EXPERT_I * D_MODEL * FP4_B + M * (D_MODEL + EXPERT_I) * 2, "fp4"
    if kernel == "quant":            # read bf16, write fp4 + scales; ~10 FLOPs per element
        return 10 * M * D_MODEL, M * D_MODEL * (2 + FP4_B), "bf16"
    raise ValueError(f"kernel = {kernel!r}: must be one of {list(KERNELS)}")


def roofline_points(gpu: str = "H200", tokens: int = 1) -> list[dict]:
    """Per kernel: arithmetic intensity (FLOP/B), attainable TFLOP/s on ``gpu``, and the bound."""
    bw = hardware.bandwidth(gpu)
    out = []
    for k in KERNELS:
        f, b, prec = _cost(k, tokens)
        peak = hardware.peak_flops(gpu, prec)
        ai = f / b
        att = min(peak, ai * bw)
        out.append({"kernel": k, "flops": f, "bytes": b, "intensity": ai, "precision": prec,
                    "attainable_tflops": att / 1e12, "bound": "compute" if ai * bw >= peak else "memory",
                    "time_us": max(f / peak, b / bw) * 1e6})
    return out


TOKEN_STOPS = [1, 4, 16, 64, 256, 1024, 4096]
GPUS = ("H200", "B200")
AI_GRID = [2 ** (e / 2) for e in range(-4, 29)]       # 0.25 .. 16384 FLOP/B


def roofline_data(gpu: str = "H200", tokens: int = 1) -> dict:
    """Traces: roofline for bf16 / fp8 / fp4 peaks (3) and one point per kernel (7)."""
    check_choice("gpu", gpu, GPUS)
    check_choice("tokens", tokens, TOKEN_STOPS)
    bw = hardware.bandwidth(gpu)
    traces = []
    for prec, dash in (("bf16", "dot"), ("fp8", "dash"), ("fp4", "solid")):
        peak = hardware.peak_flops(gpu, prec)
        traces.append(dict(type="scatter", mode="lines", x=AI_GRID, y=[min(peak, a * bw) / 1e12 for a in AI_GRID],
                           name=f"{gpu} {prec.upper()} roof", line=dict(color="#555", dash=dash, width=1.5)))
    pts = roofline_points(gpu, tokens)
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2"]
    symbols = ["circle", "square", "diamond", "triangle-up", "cross", "triangle-down", "star"]
    for p, c, sym in zip(pts, colors, symbols):
        # named by the legend (colour and symbol), not by text: at 1 token the points crowd together
        traces.append(dict(type="scatter", mode="markers", x=[p["intensity"]], y=[p["attainable_tflops"]],
                           name=p["kernel"], marker=dict(size=11, color=c, symbol=sym,
                                                         line=dict(width=1, color="white")),
                           hovertext=[f"{p['kernel']}: {p['intensity']:.3g} FLOP/B, {p['bound']}-bound, "
                                      f"{p['time_us']:.3g} µs"]))
    mem = [p["kernel"] for p in pts if p["bound"] == "memory"]
    title = (f"{gpu}, {tokens} token{'s' if tokens > 1 else ''} per call: memory-bound: {', '.join(mem) or 'none'}")
    return {"traces": traces, "layout": {"title": {"text": title, "font": {"size": 13}}}}


ROOFLINE_LAYOUT = dict(height=460, xaxis=dict(type="log", title="arithmetic intensity (FLOP per HBM byte)"),
                       yaxis=dict(type="log", title="attainable TFLOP/s", range=[-2, 4.1]),
                       legend=dict(orientation="h", yanchor="top", y=-0.15, xanchor="left", x=0),
                       margin=dict(l=60, r=20, t=60, b=110))


def build_roofline(gpu: str = "H200", tokens: int = 1):
    """The kernels on a GPU's roofline (static figure)."""
    return figure_from(roofline_data(gpu, tokens), ROOFLINE_LAYOUT)


@register
class RooflineWidget(Widget):
    """Controls: the GPU and the tokens per call, over :func:`build_roofline`."""

    name = "kernels.roofline"
    defaults = {"gpu": "H200", "tokens": 1}

    def validate(self, state):
        check_choice("gpu", state["gpu"], GPUS)
        check_choice("tokens", state["tokens"], TOKEN_STOPS)

    def data(self):
        return roofline_data(**self.state)

    def layout(self):
        return ROOFLINE_LAYOUT

    def make_controls(self):
        import ipywidgets as W
        return {"gpu": W.ToggleButtons(options=list(GPUS), value=self.state["gpu"], description="GPU"),
                "tokens": W.SelectionSlider(options=TOKEN_STOPS, value=self.state["tokens"], description="tokens")}

    def sweep_values(self, control):
        return {"gpu": list(GPUS), "tokens": TOKEN_STOPS}[control]

    def on_gpu(self, value):
        self.set(gpu=value)

    def on_tokens(self, value):
        self.set(tokens=int(value))


# ------------------------------------------------------------------------------------ benchmark results
@torch.no_grad()
def whole_model(text: str = "def fib(n):\n    a, b = 0, 1", max_tokens: int = 16) -> dict:
    """The notebooks' trained model on ``text`` twice: through the torch references, then through the Triton
    kernels (``model.use_kernels()``: every hot op at once). Returns {"tokens", "max_abs_diff" of the
    logits, "same_next_tokens" (greedy), "seconds_reference", "seconds_kernels", "mode"}."""
    from v4lab.viz import trained
    model, tok, _ = trained.trained_model()
    ids = trained.encode(tok, text, max_tokens)
    t0 = time.perf_counter()
    ref = model(ids)
    t1 = time.perf_counter()
    model.use_kernels()
    try:
        out = model(ids)
    finally:
        model.use_kernels(False)
    t2 = time.perf_counter()
    return {"tokens": ids.shape[1], "max_abs_diff": float((out - ref).abs().max()),
            "same_next_tokens": bool(torch.equal(out.argmax(-1), ref.argmax(-1))),
            "seconds_reference": t1 - t0, "seconds_kernels": t2 - t1, "mode": kernel_mode()}


def bench_records() -> tuple[str, list[dict]]:
    """(source, records) of the quick ``v4lab.bench.kernels`` run. The other per-op benches (attention,
    moe) allocate real-width layers and take minutes: run them with ``v4lab bench attention --quick`` etc."""
    from v4lab.bench import kernels as bench_kernels
    return "v4lab.bench.kernels", bench_kernels.run(quick=True)



def bench_table(source: str, records: list[dict]) -> str:
    """One line per record, numbers to three significant figures with units. Records timed in Triton's
    interpreter (``timing_meaningful`` False) show only whether kernel and reference agree."""
    lines = [f"source: {source}; Triton mode: {kernel_mode()}"]
    for r in records:
        name = r.get("path", r.get("kernel", "?"))
        if r.get("error"):
            lines.append(f"{name}: failed: {r['error']}")
            continue
        if r.get("ms") is None and "note" in r:
            lines.append(f"{name}: {r['note']}")
            continue
        keys = [k for k in ("path", "kernel", "impl", "device", "M", "N", "K") if k in r]
        desc = " ".join(f"{k}={r[k]}" for k in keys)
        if r.get("timing_meaningful") is False:
            ok = "agrees with" if r.get("ok", True) else "DIFFERS from"
            lines.append(f"{desc:<40} {ok} its reference (max |Δ| {r.get('max_abs_diff', float('nan')):.1e}); "
                         "not timed: interpreter")
            continue
        vals = []
        if r.get("ms") is not None:
            vals.append(f"{fmt3(r['ms'])} ms")
        for k, label in (("ratio_vs_dequant", "vs dequantise-all"), ("speedup", "speed-up"),
                         ("speedup_vs_reference", "vs reference")):
            if r.get(k) is not None:
                vals.append(f"{fmt3(r[k])}× {label}")
        for k in ("max_abs_err_vs_ref", "max_abs_diff"):
            if r.get(k) is not None:
                vals.append(f"max |Δ| {r[k]:.1e}")
        lines.append(f"{desc:<40} " + ", ".join(vals))
    return "\n".join(lines)
