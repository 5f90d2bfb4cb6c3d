"""``v4lab bench kernels [--quick] [--json]``: every Triton kernel against its torch reference, on the
current device (``v4lab.device.get_device``), with achieved bytes/s and FLOP/s and, on a known GPU, the
fraction of that GPU's roofline (peaks from ``v4lab/hardware.json``, GPU identified by
``torch.cuda.get_device_name()``).

Each record also carries ``max_abs_diff`` between kernel and reference from the same run, so a fast
but wrong kernel cannot hide in the table.

Shapes. On a GPU: V4-Flash layer shapes (d = 4096, 64 heads of 512, CSA ratio 4 with c = 512, indexer
64 x 128, experts 2048 x 4096, mHC n = 4) at prefill-chunk sizes. On the CPU the kernels run in Triton's
interpreter (numpy, per program and per op), so shapes are small and **the timings are not
performance** — the CPU run is a correctness check that the bench path works.

Counting (analytic, per call; written out per kernel in ``_CASES``):
* ``flops``: multiply-adds count 2; element-wise work (exp, ReLU, scaling) is counted where it is the
  kernel's whole job (compressor, quant) and left out where the dots dominate.
* ``bytes``: compulsory HBM traffic — every input read once, every output written once, at the dtypes
  passed. Gathers (sparse_attn) count each query's K gathered rows once per query (the heads of one
  query share them in one program); intermediates a kernel spills (moe's SwiGLU output h) count twice.
* roofline: ``t_roof = max(flops / peak, bytes / bandwidth)`` with ``peak`` the tensor-core rate of the
  kernel's math precision, or the FP32 CUDA-core rate for kernels whose dots run in IEEE fp32
  (``input_precision="ieee"``: the repo's kernels favour exactness over speed). ``roofline_frac =
  t_roof / t_measured`` (1.0 = at the hardware limit). ``frac_hbm`` and ``frac_bf16_peak`` are the plain
  ratios of achieved bytes/s and FLOP/s to the HBM bandwidth and the dense BF16 peak.
"""
from __future__ import annotations

import importlib
import json
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch

from v4lab import attention, compressor, hardware, indexer, mhc, moe, quant
from v4lab.device import check_kernel_device, describe, get_device, gpu_name, kernel_mode
from v4lab.errors import OneLineParser

CPU_NOTE = ("Triton interpreter on the CPU: timings are NOT performance (numpy per program and op); "
            "this run checks kernel == reference. Run on a CUDA GPU for the roofline table.")


@dataclass(frozen=True)
class Case:
    name: str
    kernel: str            # "module:function" under v4lab.kernels
    reference: Callable    # same signature
    make: Callable         # (device, size) -> (args, shapes text, flops, bytes, math precision)
    rel_tol: float         # max_abs_diff allowed, relative to max(1, max|reference|)
    what: str


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _es(t: torch.Tensor) -> int:
    return t.element_size()


# Sizes: "quick" and "cpu" run in the interpreter; "gpu" are V4-Flash shapes.
def _sparse_attn(dev, size):
    B, S, H, D, N, K = {"quick": (1, 8, 4, 64, 48, 16), "cpu": (1, 32, 8, 128, 256, 64),
                        "gpu": (1, 1024, 64, 512, 8192, 640)}[size]    # K = 128 window + 512 top-k
    g = _gen(0)
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    q = torch.randn(B, S, H, D, generator=g).to(dev, dt)
    kv = torch.randn(B, N, D, generator=g).to(dev, dt)
    sink = torch.randn(H, generator=g).to(dev)
    idx = torch.randint(0, N, (B, S, K), generator=g)
    idx[:, :, -K // 8:] = -1                                            # some empty slots, as at short context
    idx = idx.to(dev)
    flops = 4 * B * S * H * K * D                                       # q·kv and p·kv, 2 FLOPs per MAC
    byts = B * S * (2 * H * D * _es(q) + K * D * _es(kv) + K * 8) + H * 4
    prec = "bf16" if dt == torch.bfloat16 else "fp32"                   # bf16 path uses tensor cores
    shapes = f"q [{B},{S},{H},{D}] {str(dt)[6:]}, kv [{B},{N},{D}], K={K}"
    return (q, kv, sink, idx, D ** -0.5), shapes, flops, byts, prec


def _compressor(dev, size):
    B, n, c, m = {"quick": (1, 32, 32, 4), "cpu": (1, 128, 128, 4), "gpu": (1, 8192, 512, 4)}[size]
    g = _gen(1)
    kv, score = (torch.randn(B, n, 2 * c, generator=g).to(dev) for _ in range(2))
    ape = torch.randn(m, 2 * c, generator=g).to(dev)
    elems = B * n * 2 * c
    flops = 5 * elems                                                   # +ape, max, exp, ·kv, sums (approx.)
    byts = 2 * elems * 4 + ape.numel() * 4 + B * (n // m) * c * 4
    return (kv, score, ape, m, True), f"kv, score [{B},{n},{2 * c}] fp32, CSA m={m}", flops, byts, "fp32"


def _indexer(dev, size):
    B, S, Hi, Di, N = {"quick": (1, 8, 4, 32, 40), "cpu": (1, 32, 8, 64, 128),
                       "gpu": (1, 1024, 64, 128, 2048)}[size]           # 8192 tokens / m = 2048 entries
    g = _gen(2)
    q = torch.randn(B, S, Hi, Di, generator=g).to(dev)
    k = torch.randn(B, N, Di, generator=g).to(dev)
    w = torch.randn(B, S, Hi, generator=g).to(dev)
    flops = 2 * B * S * N * Hi * Di + 3 * B * S * N * Hi                 # dots, then ReLU·w and the head sum
    byts = (q.numel() + k.numel() + w.numel()) * 4 + B * S * N * 4
    return (q, k, w), f"q [{B},{S},{Hi},{Di}], k [{B},{N},{Di}] fp32", flops, byts, "fp32"


def _mhc(dev, size):
    T, n, d = {"quick": (16, 4, 16), "cpu": (64, 4, 64), "gpu": (4096, 4, 4096)}[size]
    g = _gen(3)
    R = (2 + n) * n
    x = torch.randn(T, n * d, generator=g).to(dev)
    fn = (torch.randn(R, n * d, generator=g) * 0.5 / math.sqrt(n * d / 64)).to(dev)
    scale = torch.tensor([0.5, 0.5, 1.0], device=dev)
    base = torch.randn(R, generator=g).to(dev)
    iters = 20
    flops = 2 * T * R * n * d + 2 * T * n * d + T * iters * 4 * n * n     # projection, RMS, Sinkhorn
    byts = x.numel() * 4 + fn.numel() * 4 + T * R * 4
    return ((x, fn, scale, base, 1e-6, 1e-6, iters), f"x [{T}, {n}x{d}] fp32, fn [{R},{n * d}], {iters} Sinkhorn",
            flops, byts, "fp32")


def _moe(dev, size):
    E, D, I, per = {"quick": (4, 32, 32, 5), "cpu": (4, 64, 64, 16), "gpu": (32, 4096, 2048, 96)}[size]
    g = _gen(4)
    counts = [per * (1 + (e % 3)) // 2 for e in range(E)]               # uneven groups, as routing gives
    counts[1] = 0                                                       # and an expert nobody picked
    N = sum(counts)
    offsets = torch.tensor([0] + torch.tensor(counts).cumsum(0).tolist(), device=dev)
    wdt = torch.bfloat16 if dev.type == "cuda" else torch.float32       # the release dequantises to BF16
    x = (torch.randn(N, D, generator=g) * 2).to(dev)
    w1, w3 = ((torch.randn(E, I, D, generator=g) / math.sqrt(D)).to(dev, wdt) for _ in range(2))
    w2 = (torch.randn(E, D, I, generator=g) / math.sqrt(I)).to(dev, wdt)
    rw = torch.rand(N, generator=g).to(dev)
    flops = 2 * 3 * N * D * I
    byts = 3 * E * I * D * _es(w1) + 2 * N * D * 4 + N * 4 + 2 * N * I * _es(w2)
    return ((x, w1, w3, w2, offsets, rw, 10.0),
            f"{N} rows over {E} experts, D={D}, I={I}, weights {str(wdt)[6:]}", flops, byts, "fp32")


def _fp4_gemm(dev, size):
    M, N, K = {"quick": (8, 64, 128), "cpu": (16, 128, 256), "gpu": (256, 2048, 4096)}[size]
    g = _gen(5)
    w = torch.randn(N, K, generator=g) * 0.02
    packed, scales = quant.mxfp4_quantize(w)
    x = torch.randn(M, K, generator=g).to(dev)
    flops = 2 * M * N * K
    byts = N * K // 2 + N * K // 32 + M * K * 4 + M * N * 4
    return (x, packed.to(dev), scales.to(dev)), f"x [{M},{K}] fp32, W [{N},{K}] MXFP4", flops, byts, "fp32"


def _quant(dev, size):
    R, D = {"quick": (16, 128), "cpu": (64, 512), "gpu": (8192, 4096)}[size]
    g = _gen(6)
    x = (torch.randn(R, D, generator=g) * torch.logspace(-3, 3, R)[:, None]).to(dev)
    flops = 8 * R * D                                                   # |x|, block max, scale, round, rescale
    byts = 2 * R * D * 4
    return (x,), f"x [{R},{D}] fp32, blocks of 32", flops, byts, "fp32"


_CASES = [
    Case("sparse_attn", "sparse_attn:sparse_attn", attention.sparse_attn, _sparse_attn, 1e-5,
         "attention over index lists with the sink"),
    Case("compressor", "compressor:compress_pool", compressor.compress_pool, _compressor, 1e-5,
         "CSA softmax pooling of m tokens into one entry"),
    Case("indexer", "indexer:index_scores", indexer.index_scores, _indexer, 1e-4,
         "lightning-indexer scores sum_h w·ReLU(q·k)"),
    Case("mhc", "mhc:hc_pre_coeffs", mhc.hc_pre_coeffs, _mhc, 1e-5, "mHC pre coefficients incl. Sinkhorn"),
    Case("moe", "moe:grouped_expert_mlp", moe.grouped_expert_mlp, _moe, 1e-4, "grouped expert SwiGLU MLP"),
    Case("fp4_gemm", "fp4_gemm:fp4_gemm", quant.fp4_gemm_ref, _fp4_gemm, 1e-4, "GEMM with fused FP4 dequant"),
    Case("quant", "quant:fp4_act_quant", quant.fp4_act_quant, _quant, 0.0, "MXFP4 activation fake-quant"),
]
CASES = {c.name: c for c in _CASES}
# On a GPU, cases with bf16 tensors (sparse_attn's q/kv, moe's weights) round differently from the
# reference (bf16 tensor-core products, bf16 p in sparse_attn): ~3 decimal digits.
GPU_BF16_REL_TOL = 2e-2


def _kernel_fn(spec: str) -> Callable:
    mod, fn = spec.split(":")
    return getattr(importlib.import_module(f"v4lab.kernels.{mod}"), fn)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _time(fn, dev: torch.device, repeat: int) -> float:
    """Best of ``repeat`` wall times in seconds after one warm-up (which also compiles and autotunes)."""
    fn()
    _sync(dev)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        best = min(best, time.perf_counter() - t0)
    return best


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _max_abs_diff(a, b) -> tuple[float, float]:
    a, b = (a if isinstance(a, tuple) else (a,)), (b if isinstance(b, tuple) else (b,))
    diff, ref = 0.0, 0.0
    for x, y in zip(a, b):
        x, y = x.float(), y.float()
        both_nan = torch.isnan(x) & torch.isnan(y)
        d = (x - y).abs().masked_fill(both_nan, 0.0)
        diff = max(diff, float(d.max()) if d.numel() else 0.0)
        ref = max(ref, float(y.abs().masked_fill(torch.isnan(y), 0).max()) if y.numel() else 0.0)
    return diff, ref


def roofline_fields(flops: float, byts: float, seconds: float, gpu_key: str | None, precision: str) -> dict:
    """Achieved rates and, for a GPU in hardware.json, the roofline fractions (see module docstring)."""
    out = {"flops_per_s": flops / seconds, "bytes_per_s": byts / seconds, "intensity": flops / byts}
    if gpu_key is None:
        return out
    g = hardware.gpu(gpu_key)
    bw = hardware.bandwidth(gpu_key)
    if precision == "fp32":
        if g.get("fp32_tflops") is None:
            raise ValueError(f"hardware.json: GPU {gpu_key!r} lacks 'fp32_tflops' (needed for fp32 kernels)")
        peak = float(g["fp32_tflops"]) * 1e12
    else:
        peak = hardware.peak_flops(gpu_key, precision)
    t_roof = max(flops / peak, byts / bw)
    out.update({"peak_flops": peak, "peak_precision": precision, "peak_bytes_per_s": bw,
                "bound": "compute" if flops / peak >= byts / bw else "memory",
                "t_roofline_us": t_roof * 1e6, "roofline_frac": t_roof / seconds,
                "frac_hbm": (byts / seconds) / bw,
                "frac_bf16_peak": (flops / seconds) / hardware.peak_flops(gpu_key, "bf16")})
    return out


@torch.no_grad()
def bench_case(case: Case, dev: torch.device, size: str, repeat: int, gpu: str | None = None) -> dict:
    """One record. ``gpu``: ``torch.cuda.get_device_name`` of ``dev`` (None on CPU)."""
    args, shapes, flops, byts, prec = case.make(dev, size)
    kern = _kernel_fn(case.kernel)
    out_k = kern(*args)
    out_r = case.reference(*args)          # the references take the same dtypes
    _sync(dev)
    diff, ref_max = _max_abs_diff(out_k, out_r)
    rel = case.rel_tol
    if any(isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 for a in args):
        rel = max(rel, GPU_BF16_REL_TOL)
    tol = rel * max(1.0, ref_max)
    interp = kernel_mode() == "interpreter"
    reps = 1 if interp else repeat
    t_k = _time(lambda: kern(*args), dev, reps)
    t_r = _time(lambda: case.reference(*args), dev, reps)
    name = gpu
    key = hardware.identify_gpu(name) if name else None
    ref_name = f"{case.reference.__module__}.{case.reference.__name__}"
    rec = {"kernel": case.name, "what": case.what, "reference": ref_name,
           "device": str(dev), "gpu": name, "gpu_key": key, "mode": kernel_mode(), "shapes": shapes,
           "flops": float(flops), "bytes": float(byts), "ms": t_k * 1e3, "ms_reference": t_r * 1e3,
           "speedup_vs_reference": t_r / t_k, "max_abs_diff": diff, "max_abs_reference": ref_max,
           "tol": tol, "ok": bool(diff <= tol), "timing_meaningful": not interp}
    rec.update(roofline_fields(flops, byts, t_k, key if not interp else None, prec))
    if interp:
        rec["note"] = CPU_NOTE
    elif key is None and name:
        rec["note"] = f"GPU {name!r} is not in hardware.json (add it with a 'match' entry): no roofline fractions"
    return rec


def run(quick: bool = False, device: str | torch.device | None = None, kernels: list[str] | None = None,
        progress: bool = False) -> list[dict]:
    """One record per kernel (see module docstring). ``device``: as ``v4lab.device.get_device``;
    ``progress``: a bar per kernel."""
    import v4lab.kernels  # noqa: F401  (sets the Triton mode before any kernel module is imported)
    from v4lab.progress import bar
    dev = check_kernel_device(get_device(device))
    names = list(CASES) if kernels is None else list(kernels)
    bad = [n for n in names if n not in CASES]
    if bad:
        raise ValueError(f"kernels = {bad}: unknown; choose from {list(CASES)}")
    if dev.type == "cuda":
        size, repeat = "gpu", (5 if quick else 20)
    else:
        size, repeat = ("quick" if quick else "cpu"), 1
    name = gpu_name(dev) if dev.type == "cuda" else None
    out = []
    pb = bar(len(names), "kernels", progress)
    for n in names:
        pb.set_postfix_str(n)
        try:
            out.append(bench_case(CASES[n], dev, size, repeat, name))
        except Exception as e:  # one kernel that fails to compile or run must not lose the others' rows
            out.append({"kernel": n, "device": str(dev), "gpu": name, "mode": kernel_mode(), "ok": False,
                        "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]})
        finally:
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            pb.update(1)
    pb.close()
    return out


def _fmt_rate(v: float, unit: str) -> str:
    for p, s in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if v >= p:
            return f"{v / p:.3g} {s}{unit}"
    return f"{v:.3g} {unit}"


def table(records: list[dict]) -> str:
    """Plain-text table (the one to paste into the README on a GPU)."""
    if not records:
        return "(no records)"
    r0 = records[0]
    lines = [f"device: {r0['device']}" + (f" ({r0['gpu']})" if r0["gpu"] else "") + f"; Triton: {r0['mode']}"]
    gpu = any("roofline_frac" in r for r in records)
    timed = [r for r in records if "error" not in r]
    head = f"{'kernel':<12} {'ms':>9} {'ref ms':>9} {'FLOP/s':>11} {'bytes/s':>11}"
    head += f" {'roofline':>8} {'HBM':>6} {'BF16pk':>6} {'bound':>7}" if gpu else ""
    head += f" {'max|diff|':>9} ok  shapes"
    lines.append(head)
    for r in records:
        if "error" in r:
            lines.append(f"{r['kernel']:<12} ERROR {r['error']}")
            continue
        s = (f"{r['kernel']:<12} {r['ms']:>9.3f} {r['ms_reference']:>9.3f} {_fmt_rate(r['flops_per_s'], 'FLOP/s'):>11}"
             f" {_fmt_rate(r['bytes_per_s'], 'B/s'):>11}")
        if gpu:
            s += (f" {r.get('roofline_frac', float('nan')):>8.1%} {r.get('frac_hbm', float('nan')):>6.1%}"
                  f" {r.get('frac_bf16_peak', float('nan')):>6.1%} {r.get('bound', '-'):>7}")
        s += f" {r['max_abs_diff']:>9.2e} {'yes' if r['ok'] else 'NO '} {r['shapes']}"
        lines.append(s)
    if timed and not timed[0]["timing_meaningful"]:
        lines.append("NOTE: " + CPU_NOTE)
    elif gpu:
        k = next(r["gpu_key"] for r in records if "roofline_frac" in r)
        g = hardware.gpu(k)
        lines.append(f"roofline: max(FLOPs/peak, bytes/HBM) / measured; {k}: {g['hbm_tb_s']} TB/s, "
                     f"BF16 {g['tflops']['bf16']} / FP8 {g['tflops']['fp8']} / FP32 {g.get('fp32_tflops')} "
                     "TFLOP/s dense"
                     " (peak = the kernel's math precision: fp32 CUDA cores for IEEE-fp32 dots)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="v4lab bench kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small shapes on CPU, fewer repeats on GPU")
    p.add_argument("--json", action="store_true", help="print the records as a JSON list")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N | auto (default: $V4LAB_DEVICE, else auto)")
    p.add_argument("--kernel", action="append", choices=list(CASES), help="only this kernel (repeatable)")
    from v4lab.progress import add_argument
    add_argument(p)
    a = p.parse_args(argv)
    try:
        recs = run(quick=a.quick, device=a.device, kernels=a.kernel, progress=not a.no_progress)
    except ValueError as e:
        print(f"v4lab bench kernels: error: {e}")
        return 2
    if a.json:
        print(json.dumps(recs, indent=1))
    else:
        print(describe(a.device))
        print(table(recs))
    return 0 if all(r["ok"] for r in recs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
