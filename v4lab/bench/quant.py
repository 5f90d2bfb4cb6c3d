"""``v4lab bench quant [--quick] [--json]``: what FP4 costs and saves.

1. FP4 weight GEMM ``y = x . deq(W)^T`` on one V4-Flash expert projection (W [2048, 4096] as MXFP4):
   * ``dequant_then_matmul``: decode the whole W to fp32, then one matmul (what a naive loader does);
   * ``fused_torch``: decode 256 rows at a time right before their matmul (``quant.fp4_gemm_tiled``): the
     CPU analogue of fusing dequant into the GEMM;
   * ``triton``: ``v4lab.kernels.fp4_gemm`` — timed only when compiled on CUDA. Under TRITON_INTERPRET=1
     the interpreter is a correctness checker (numpy per program and op), so its time is not reported;
   * ``matmul_predecoded``: W already in fp32 — the floor, paying 8x the memory of FP4.
   ``ratio_vs_dequant`` = time(dequant_then_matmul) / time(path). Measured on this project's 2-core CPU
   the tiled torch path does not win (x0.5-0.85: per-tile op overhead, and decoding dominates either way);
   what it buys on CPU is memory (W never exists whole in fp32). The speed case for fusing is the GPU
   kernel, which reads 4.25 bits per weight instead of 32.
2. Bytes per parameter of the three layouts (data + scales), measured on real quantised tensors, and the
   V4-Flash / V4-Pro release sizes by format from ``checkpoint.expected_keys``.
"""
from __future__ import annotations

import json
import time
from functools import partial

import torch

from v4lab import quant as Q
from v4lab.checkpoint import expected_keys, nbytes
from v4lab.config import get_config
from v4lab.errors import OneLineParser


def _time(fn, repeat: int, device: str = "cpu") -> float:
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeat):                     # best of N: the machine is shared, the minimum is the signal
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def _dequant_then_matmul(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return x @ Q.mxfp4_dequantize(packed, scales).t()


@torch.no_grad()
def gemm_records(quick: bool, device: str | torch.device | None = None, progress: bool = False) -> list[dict]:
    """CPU always (the reference point); CUDA too when the device setting picks it (Triton only there).
    ``progress``: a bar per (device, M) point."""
    from v4lab.device import get_device
    from v4lab.progress import bar
    on_gpu = get_device(device).type == "cuda"
    N, K = (1024, 2048) if quick else (2048, 4096)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(N, K, generator=g) * 0.02
    pk, s = Q.mxfp4_quantize(w)
    wf = Q.mxfp4_dequantize(pk, s)
    out = []
    devices = ["cpu"] + (["cuda"] if on_gpu else [])
    pb = bar(len(devices) * (2 if quick else 3), "fp4 gemm", progress)
    for device in devices:
        pkd, sd, wfd = pk.to(device), s.to(device), wf.to(device)
        for M in ((1, 64) if quick else (1, 16, 256)):
            x = torch.randn(M, K, generator=g).to(device)
            ref = Q.fp4_gemm_ref(x, pkd, sd)
            paths = {"dequant_then_matmul": partial(_dequant_then_matmul, x, pkd, sd),
                     "fused_torch": partial(Q.fp4_gemm_tiled, x, pkd, sd),
                     "matmul_predecoded": partial(torch.matmul, x, wfd.t())}
            if device == "cuda":
                from v4lab.kernels.fp4_gemm import fp4_gemm
                paths["triton"] = partial(fp4_gemm, x, pkd, sd)
            times = {k: _time(f, 3 if quick else 10, device) for k, f in paths.items()}
            pb.update(1)
            for k, t in times.items():
                err = (paths[k]() - ref).abs().max().item()
                out.append({"bench": "fp4_gemm", "device": device, "path": k, "M": M, "N": N, "K": K,
                            "ms": round(t * 1e3, 3), "ratio_vs_dequant": round(times["dequant_then_matmul"] / t, 2),
                            "max_abs_err_vs_ref": err})
    pb.close()
    if not on_gpu:
        out.append({"bench": "fp4_gemm", "device": "cpu", "path": "triton", "M": None, "N": N, "K": K, "ms": None,
                    "ratio_vs_dequant": None, "note": "interpreter only here: checked for correctness in "
                    "tests/test_kernel_fp4_gemm.py, not timed (its speed says nothing about a GPU)"})
    return out


def bytes_records() -> list[dict]:
    w = torch.randn(1024, 1024) * 0.02
    q8, s8 = Q.fp8_block_quantize(w)
    q4, s4 = Q.mxfp4_quantize(w)
    n = w.numel()
    meas = {"BF16": w.bfloat16().nbytes / n, "FP8 E4M3 + 128x128 E8M0": (q8.nbytes + s8.nbytes) / n,
            "MXFP4 E2M1 + 1x32 E8M0": (q4.nbytes + s4.nbytes) / n}
    formula = {"BF16": 2.0, "FP8 E4M3 + 128x128 E8M0": 1 + 1 / 128 ** 2, "MXFP4 E2M1 + 1x32 E8M0": 0.5 + 1 / 32}
    out = [{"bench": "bytes_per_param", "layout": k, "bytes_per_param": round(v, 6),
            "formula": round(formula[k], 6), "vs_bf16": round(v / 2.0, 4)} for k, v in meas.items()]
    fmt = {"BF16": "BF16", "F32": "F32", "I64": "I64", "I8": "FP4", "F8_E4M3": "FP8", "F8_E8M0": "scales"}
    for preset in ("v4-flash", "v4-pro"):
        by: dict[str, int] = {}
        for shape, dt in expected_keys(get_config(preset)).values():
            by[fmt[dt]] = by.get(fmt[dt], 0) + nbytes(shape, dt)
        total = sum(by.values())
        out.append({"bench": "release_bytes", "preset": preset, "total_GB": round(total / 1e9, 2),
                    **{f"{k}_GB": round(v / 1e9, 2) for k, v in sorted(by.items())}})
    return out


def run(quick: bool = False, device: str | torch.device | None = None, progress: bool = False) -> list[dict]:
    return gemm_records(quick, device, progress) + bytes_records()


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="v4lab bench quant")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", action="store_true")
    p.add_argument("--device", default=None, help="cpu | cuda | auto (default: $V4LAB_DEVICE, else auto)")
    from v4lab.progress import add_argument
    add_argument(p)
    a = p.parse_args(argv)
    recs = run(a.quick, a.device, progress=not a.no_progress)
    if a.json:
        print(json.dumps(recs, indent=1))
        return 0
    for r in recs:
        if r["bench"] == "fp4_gemm":
            if r["ms"] is None:
                print(f"fp4_gemm  {r['path']:<20} {r['note']}")
            else:
                print(f"fp4_gemm  {r['device']:<4} M={r['M']:<4} N={r['N']} K={r['K']}  {r['path']:<20} "
                      f"{r['ms']:9.3f} ms  x{r['ratio_vs_dequant']:<5} vs dequant-then-matmul  "
                      f"err {r['max_abs_err_vs_ref']:.1e}")
        elif r["bench"] == "bytes_per_param":
            print(f"bytes/param  {r['layout']:<26} {r['bytes_per_param']:.5f}  ({r['vs_bf16']:.3f} x BF16)")
        else:
            rest = "  ".join(f"{k[:-3]} {v}" for k, v in r.items() if k.endswith("_GB") and k != "total_GB")
            print(f"release {r['preset']:<9} {r['total_GB']} GB   ({rest})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
