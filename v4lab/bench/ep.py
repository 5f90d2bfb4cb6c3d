"""``v4lab bench ep [--quick] [--json] [--device D]``: expert-parallel dispatch/combine, measured and analytic.

Measured: one MoE layer (hidden 1024, expert width 256, 16 routed experts, top-6 with uniform random
routing, 256 tokens per rank; ``--quick``: 64) split over 2 and 4 processes (``v4lab.distributed.launch``:
gloo on the CPU, NCCL on CUDA when ``--device cuda`` and enough GPUs are visible). Each stage of
``v4lab.expert_parallel.ep_forward`` is timed on its own between barriers (count exchange, dispatch
all-to-all, local experts, combine all-to-all); the slowest rank's median over the repeats is reported, with
the bytes each rank put on the wire (max over ranks) and the analytic bytes for the same routing from
``v4lab.accounting.ep_message_bytes``. Rows are fp32 and FP8 dispatch; the combine is fp32 here.
On one CPU, "the wire" is loopback TCP between processes: times show gloo's overhead, not a network.

Analytic: all-to-all bytes per decode token for V4-Flash and V4-Pro at EP 8/16/32/64
(``v4lab.accounting.ep_all_to_all``): FP8 dispatch + BF16 combine (DeepSeek-V3 §3.3.3's recipe), and BF16
dispatch for comparison, per MoE layer and over all MoE layers, for uniform routing over the ranks.
"""
from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from v4lab.errors import OneLineParser
from v4lab.moe import expert_ffn

HIDDEN, INTER, EXPERTS, TOPK = 1024, 256, 16, 6
PRESETS = ("v4-flash", "v4-pro")
EP_SIZES = (8, 16, 32, 64)


def _sync(dev):
    import torch.distributed as dist
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    dist.barrier()


def _timed(fn, dev):
    _sync(dev)
    t0 = time.perf_counter()
    out = fn()
    _sync(dev)
    return out, time.perf_counter() - t0


def _worker(out_path, tokens, repeat, device, fp8):
    """One rank: time the stages of ep_forward on one layer (rank 0 writes the record)."""
    import torch.distributed as dist

    from v4lab import expert_parallel as EP
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = torch.device(device, rank) if device == "cuda" else torch.device("cpu")
    n_local = EXPERTS // world
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(tokens, HIDDEN, generator=g).to(dev)
    idx = torch.rand(tokens, EXPERTS, generator=g).argsort(-1)[:, :TOPK].to(dev)
    w = torch.rand(tokens, TOPK, generator=g).to(dev)
    ws = [[(torch.randn(*s, generator=g) * 0.02).to(dev) for _ in range(n_local)]
          for s in ((INTER, HIDDEN), (HIDDEN, INTER), (INTER, HIDDEN))]
    times = {k: [] for k in ("counts", "dispatch", "experts", "combine", "layer")}
    for _ in range(repeat + 1):                                         # the first round warms up
        plan = EP.dispatch_plan(idx.cpu(), EXPERTS, world)
        # default arguments bind this round's values into each timed closure
        recv_counts, t_c = _timed(lambda plan=plan: EP.exchange_counts(plan.counts_by_rank.to(dev)).cpu(), dev)
        send, recv = plan.send_counts.tolist(), recv_counts.sum(1).tolist()
        rows, t_d = _timed(lambda plan=plan, send=send, recv=recv:
                           EP.AllToAll.apply(x[plan.token.to(dev)], send, recv, None, fp8), dev)
        y, t_e = _timed(lambda rows=rows, rc=recv_counts: EP.run_local_experts(rows, rc, *ws, 10.0, ffn=expert_ffn),
                        dev)
        _, t_b = _timed(lambda y=y, send=send, recv=recv: EP.AllToAll.apply(y, recv, send, None, False), dev)
        (_, rec), t_l = _timed(lambda: EP.ep_forward(x, idx, w, *ws, 10.0, EXPERTS, None, fp8, ffn=expert_ffn), dev)
        for k, t in zip(times, (t_c, t_d, t_e, t_b, t_l)):
            times[k].append(t)
    med = torch.tensor([statistics.median(v[1:]) for v in times.values()], dtype=torch.float64, device=dev)
    traffic = torch.tensor([rec["dispatch_bytes"], rec["combine_bytes"], rec["remote_pairs"]], dtype=torch.float64,
                           device=dev)                                  # NCCL reduces GPU tensors only
    dist.all_reduce(med, op=dist.ReduceOp.MAX)
    dist.all_reduce(traffic, op=dist.ReduceOp.MAX)
    if rank == 0:
        from v4lab.accounting import ep_message_bytes
        remote = int(traffic[2])
        Path(out_path).write_text(json.dumps({
            "bench": "ep", "device": str(dev.type), "backend": dist.get_backend(), "ranks": world,
            "dispatch_dtype": "fp8" if fp8 else "fp32", "hidden": HIDDEN, "inter": INTER, "experts": EXPERTS,
            "topk": TOPK, "tokens_per_rank": tokens, "repeats": repeat,
            "seconds": {k: round(float(v), 6) for k, v in zip(times, med.tolist())},
            "dispatch_bytes": int(traffic[0]), "combine_bytes": int(traffic[1]), "remote_pairs": remote,
            "analytic_dispatch_bytes": ep_message_bytes(remote, HIDDEN, "fp8" if fp8 else "fp32")}))


def measured(quick: bool = False, device: str | torch.device | None = None,
             worlds: Sequence[int] = (2, 4), progress: bool = False) -> list[dict]:
    """One record per (ranks, dispatch dtype): a launched group of processes each. ``progress``: a bar per launch."""
    from v4lab.device import get_device
    from v4lab.distributed import launch
    from v4lab.progress import bar
    dev = get_device(device)
    records = []
    with tempfile.TemporaryDirectory(prefix="v4lab-bench-ep-") as tmp, bar(2 * len(worlds), "ep", progress) as pb:
        for world in worlds:
            if dev.type == "cuda" and torch.cuda.device_count() < world:
                records.append({"bench": "ep", "device": "cuda", "ranks": world, "skipped":
                                f"needs {world} GPUs, {torch.cuda.device_count()} visible"})
                pb.update(2)
                continue
            for fp8 in (False, True):
                out = Path(tmp) / f"w{world}-{fp8}.json"
                launch(_worker, world, (str(out), 64 if quick else 256, 3 if quick else 10, dev.type, fp8),
                       device=dev.type, timeout_s=600)
                records.append(json.loads(out.read_text()))
                pb.update(1)
    return records


def analytic() -> list[dict]:
    from v4lab.accounting import ep_all_to_all
    rows = []
    for name in PRESETS:
        for ep in EP_SIZES:
            fp8 = ep_all_to_all(name, ep, dispatch="fp8", combine="bf16")
            bf16 = ep_all_to_all(name, ep, dispatch="bf16", combine="bf16")
            rows.append({"bench": "ep_analytic", "model": name, "ep_size": ep,
                         "experts_per_rank": fp8["experts_per_rank"], "moe_layers": fp8["moe_layers"],
                         "fp8_dispatch_per_layer": fp8["remote_per_layer"]["dispatch"],
                         "bf16_combine_per_layer": fp8["remote_per_layer"]["combine"],
                         "fp8_total_all_layers": fp8["remote_all_layers_total"],
                         "bf16_total_all_layers": bf16["remote_all_layers_total"]})
    return rows


def run(quick: bool = False, device: str | torch.device | None = None, progress: bool = False) -> list[dict]:
    return measured(quick, device, progress=progress) + analytic()


def _kib(b):
    return f"{b / 1024:,.1f}"


def format_records(recs: list[dict]) -> str:
    out = [f"Measured: one MoE layer, hidden {HIDDEN}, {EXPERTS} experts of width {INTER}, top-{TOPK}, uniform "
           "random routing; slowest rank's median seconds; bytes = max over ranks, off-rank rows only",
           f"{'ranks':>5} {'backend':>7} {'dispatch':>8} {'tokens':>6} {'counts s':>9} {'dispatch s':>10} "
           f"{'experts s':>9} {'combine s':>9} {'layer s':>8} {'disp. KiB':>10} {'comb. KiB':>10} {'analytic':>9}"]
    for r in recs:
        if r["bench"] != "ep":
            continue
        if "skipped" in r:
            out.append(f"{r['ranks']:>5} {r['device']:>7}  skipped: {r['skipped']}")
            continue
        s = r["seconds"]
        ok = "= meas." if r["analytic_dispatch_bytes"] == r["dispatch_bytes"] else "DIFFERS"
        out.append(f"{r['ranks']:>5} {r['backend']:>7} {r['dispatch_dtype']:>8} {r['tokens_per_rank']:>6} "
                   f"{s['counts']:>9.5f} {s['dispatch']:>10.5f} {s['experts']:>9.5f} {s['combine']:>9.5f} "
                   f"{s['layer']:>8.5f} {_kib(r['dispatch_bytes']):>10} {_kib(r['combine_bytes']):>10} {ok:>9}")
    out += ["", "Analytic all-to-all bytes per decode token (one token, top-k rows, (ep-1)/ep of them off-rank; "
                "v4lab.accounting.ep_all_to_all)",
            f"{'model':>9} {'EP':>3} {'experts/rank':>12} {'FP8 disp./layer':>15} {'BF16 comb./layer':>16} "
            f"{'all layers FP8+BF16':>19} {'all layers BF16':>15}"]
    for r in recs:
        if r["bench"] == "ep_analytic":
            out.append(f"{r['model']:>9} {r['ep_size']:>3} {r['experts_per_rank']:>12} "
                       f"{_kib(r['fp8_dispatch_per_layer']) + ' KiB':>15} "
                       f"{_kib(r['bf16_combine_per_layer']) + ' KiB':>16} "
                       f"{r['fp8_total_all_layers'] / 2**20:>15.2f} MiB "
                       f"{r['bf16_total_all_layers'] / 2**20:>11.2f} MiB")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    p = OneLineParser(prog="v4lab bench ep", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="64 tokens per rank, 3 repeats")
    p.add_argument("--json", action="store_true", help="print a JSON list of records")
    p.add_argument("--device", default=None, help="cpu | cuda | auto (default: $V4LAB_DEVICE, else auto)")
    p.add_argument("--analytic-only", action="store_true", help="only the analytic table (no processes)")
    from v4lab.progress import add_argument
    add_argument(p)
    a = p.parse_args(argv)
    recs = analytic() if a.analytic_only else run(a.quick, a.device, progress=not a.no_progress)
    print(json.dumps(recs, indent=1) if a.json else format_records(recs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
