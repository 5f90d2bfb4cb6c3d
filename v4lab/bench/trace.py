"""``v4lab bench trace [--quick] [--json]``: how long a decode trace (``v4lab.trace.decode_trace``) takes.

A 1,024-token text (random ids; the timing does not depend on them) through a lab-sized model — the
``lab`` preset's widths at six layers (window, CSA m = 4, HCA m' = 128, ...), random init — in the widget's
chunked mode (``chunk = 256``, the target: ≤ 2 s) and, on fewer tokens, token by token (``chunk = 1``: the
reference decode, a Python loop of one-token forwards, reported per token). Best of N runs (the machine
is shared). Runs on ``$V4LAB_DEVICE`` / ``--device`` like every bench.
"""
from __future__ import annotations

import json
import time

import torch

from v4lab.config import V4Config, get_config
from v4lab.errors import OneLineParser

TARGET_S = 2.0


def lab_sized() -> V4Config:
    return get_config("lab").replace(num_hidden_layers=6, compress_ratios=[0, 4, 128, 4, 128, 4, 0],
                                     num_hash_layers=1)


def run(quick: bool = False, device: str | torch.device | None = None, progress: bool = False) -> list[dict]:
    """Prefill (chunk 256) and decode (chunk 1) traces, best of a few runs. ``progress``: a bar per run."""
    from v4lab.device import get_device
    from v4lab.model import V4Model
    from v4lab.progress import bar
    from v4lab.trace import decode_trace
    dev = get_device(device)
    torch.manual_seed(0)
    cfg = lab_sized()
    model = V4Model(cfg, device=dev).eval()
    ids = torch.randint(2, cfg.vocab_size, (1, 1024), generator=torch.Generator().manual_seed(0))
    recs = []
    plan = ((256, 1024, 2 if quick else 3), (1, 64 if quick else 256, 1))
    pb = bar(sum(p[2] for p in plan), "trace", progress)
    for chunk, n, reps in plan:
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            decode_trace(model, ids[:, :n], chunk=chunk)
            best = min(best, time.perf_counter() - t0)
            pb.update(1)
        r = {"bench": "trace", "device": str(dev), "config": "lab widths, 6 layers", "tokens": n, "chunk": chunk,
             "seconds": round(best, 3), "ms_per_token": round(1e3 * best / n, 2)}
        if n == 1024:
            r.update(target_s=TARGET_S, ok=best <= TARGET_S)
        recs.append(r)
    pb.close()
    return recs


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="v4lab bench trace", description=__doc__.split("\n")[0])
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
        ok = f"  (target <= {r['target_s']:g} s: {'yes' if r['ok'] else 'NO'})" if "target_s" in r else ""
        print(f"decode_trace {r['config']} on {r['device']}: {r['tokens']} tokens, chunk {r['chunk']}: "
              f"{r['seconds']:.3f} s ({r['ms_per_token']} ms/token){ok}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
