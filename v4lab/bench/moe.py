"""``v4lab bench moe [--quick] [--json]``: naive vs grouped MoE dispatch (vs the Triton kernel on a GPU).

One V4-Flash-width layer (d = 4096, expert width I = 2048, top-6) with a slice of the routed experts
(16 of 256, so the weights fit in CPU memory: 16 x 3 x 4096 x 2048 fp32 = 1.6 GB), random top-6
routing over the slice. The naive reference runs token by token (each (token, expert) pair reads the
whole expert), the grouped one sorts tokens by expert and runs one matmul per expert. Reports tokens/s
and the speed-up over naive. The Triton kernel is timed only on CUDA (the interpreter is a checker,
not a fast path).

What it shows: naive is a string of matrix-vector products, bound by reading each expert's 96 MB once
per (token, expert) pair; grouped reads each expert once per batch and runs a GEMM, so it wins only once
an expert gets enough rows (on a 2-core CPU a GEMM of a dozen rows costs about as much per row as a
matvec). The grouped run therefore uses more tokens than the naive one; tokens/s is per token.
"""
from __future__ import annotations

import json
import time
from functools import partial

import torch

from v4lab.errors import OneLineParser
from v4lab.moe import moe_grouped, moe_naive, moe_triton

D, I, K = 4096, 2048, 6


def _weights(E: int, device: str, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def make(shape):
        return [(torch.randn(*shape, generator=g) * 0.02).to(device, dtype) for _ in range(E)]
    return make((I, D)), make((D, I)), make((I, D))


def _tokens(T: int, E: int, device: str, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g).to(device)
    idx = torch.rand(T, E, generator=g).argsort(-1)[:, :K].to(device)       # distinct experts per token
    w = torch.rand(T, K, generator=g).to(device)
    return x, idx, w / w.sum(-1, keepdim=True) * 1.5


def _time(fn, device: str, repeat: int) -> float:
    fn()                                                     # warm-up (and Triton compile/autotune)
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeat


@torch.no_grad()
def run(quick: bool = False, device: str | torch.device | None = None, progress: bool = False) -> list[dict]:
    """CPU always (the reference point); CUDA too when the device setting (``device``, else
    $V4LAB_DEVICE, else auto) picks it — the Triton path only there. ``progress``: a bar per impl timed."""
    from v4lab.device import get_device
    from v4lab.progress import bar
    E = 16
    records = []
    plans = [("cpu", torch.float32, 8 if quick else 32, 128 if quick else 512)]
    if get_device(device).type == "cuda":
        plans.append(("cuda", torch.bfloat16, 64 if quick else 256, 2048 if quick else 16384))
    pb = bar(sum(2 + (d == "cuda") for d, *_ in plans), "moe", progress)
    for device, dtype, t_naive, t_fast in plans:
        w1s, w2s, w3s = _weights(E, device, dtype)           # one set of weights for every impl
        impls = [("naive", moe_naive, t_naive), ("grouped", moe_grouped, t_fast)]
        if device == "cuda":
            impls.append(("triton", moe_triton, t_fast))
        naive_tps = None
        for name, fn, T in impls:
            x, idx, w = _tokens(T, E, device)
            sec = _time(partial(fn, x, idx, w, w1s, w2s, w3s, 10.0), device, 1 if (quick or name == "naive") else 3)
            tps = T / sec
            naive_tps = tps if name == "naive" else naive_tps
            pb.update(1)
            records.append({"bench": "moe", "impl": name, "device": device, "weight_dtype": str(dtype).split(".")[-1],
                            "hidden": D, "inter": I, "topk": K, "experts": E, "tokens": T,
                            "seconds": round(sec, 5), "tokens_per_s": round(tps, 1),
                            "speedup_vs_naive": round(tps / naive_tps, 2)})
        del w1s, w2s, w3s
    pb.close()
    return records


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="v4lab bench moe")
    p.add_argument("--quick", action="store_true", help="fewer tokens (under a minute on 2 CPU cores)")
    p.add_argument("--json", action="store_true", help="print a JSON list of records")
    p.add_argument("--device", default=None, help="cpu | cuda | auto (default: $V4LAB_DEVICE, else auto)")
    from v4lab.progress import add_argument
    add_argument(p)
    args = p.parse_args(argv)
    recs = run(quick=args.quick, device=args.device, progress=not args.no_progress)
    if args.json:
        print(json.dumps(recs, indent=1))
    else:
        print(f"MoE dispatch, d={D} I={I} top-{K}, {recs[0]['experts']} experts (slice of V4-Flash's 256)")
        for r in recs:
            print(f"  {r['device']:4s} {r['impl']:8s} {r['weight_dtype']:8s} tokens={r['tokens']:6d}  "
                  f"{r['tokens_per_s']:10.1f} tok/s  x{r['speedup_vs_naive']:.2f} vs naive")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
