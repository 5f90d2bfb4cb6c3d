"""``v4lab bench train [--quick] [--json] [--no-progress]``: one training step of a tiny V4, v4lab vs transformers.

A training step = forward + next-token cross-entropy on the main head + backward (no optimizer, no MTP:
transformers' ``DeepseekV4ForCausalLM`` has no MTP block), fp32, batch 1, torch on 1 thread, on the ``tiny``
config (``max_position_embeddings`` raised to fit the longest sequence). Both sides load the same synthetic
checkpoint in the official layout (as ``tests/test_model_hf_parity.py`` does: v4lab through
``v4lab.model.load``, transformers through ``from_pretrained``, which renames and dequantises on its own),
so they compute the same function (the losses are recorded and agree to ~1e-4; indexer top-k ties may break
differently).

Each (impl, seq) point runs in a fresh process: one warm-up step, then ``steps`` timed steps (median of
``time.process_time``: the machine is shared); ``peak_bytes`` = peak RSS during the timed steps minus RSS
before them. The two implementations alternate (v4lab, peer, peer, v4lab, ...) over ``repeats`` rounds and
each record keeps the median. ``gflops`` = analytic FLOPs / seconds, where the analytic FLOPs of a step
are 3 × the forward's (backward ≈ 2 × forward), and the forward's = Σ over positions t of
``v4lab.accounting.decode_flops(cfg, t)["total_raw"]`` (weight GEMMs incl. the head, core attention over
window + top-k / compressed entries, indexer scores; 2 FLOPs per multiply-add). The same analytic count is
used for the peer (it does more work: dense attention), so its figure is "useful" GFLOP/s.
``peak_fraction`` = gflops / the machine's fp32 matmul peak, measured in the same run by a large
``torch.mm`` (2048², 1 thread, best of several, taken between the points: the physical limit on a CPU).
The peer is skipped where its eager attention (dense [S, S + S/m] scores per head and layer, kept for the
backward) would not fit ``V4LAB_BENCH_HF_GIB``.

Profile of one step (v4lab, seq 2048 unless said; fp32, 1 thread). The machine is shared, so costs are CPU
time (``time.process_time``) of each part's forward + backward on the inputs it sees in the step, all layers
and both mHC sites; torch.profiler's (wall-clock) op table and cProfile agree on the ranking.
  Before (commit b1ce90d), 1.8 s/step: CSA attention (3 layers) ~30 %, MoE ~17 %, mHC pre-mix ~15 % (26-30 ms
  a site: the per-token [1, 4] @ [4, 128] bmm of u = Σ pre_i X_i, the 20-iteration Sinkhorn's autograd
  nodes), HCA attention ~11 %, mHC post-mix ~10 %, window attention ~5 %, norms, head. By op: aten::mm
  ~21 %, aten::bmm ~14 %, then elementwise mul/div/add/sum (~28 %) and their backward nodes. Attention
  ran 32 blocks of 64 queries per layer (~0.7 ms of fixed cost each, fwd + bwd, whatever the FLOPs), the
  cost model choosing dense blocks for the narrow layers.
  Then (commit 2849302), 1.03-1.47 s/step (0.27-0.41 s at 512, runs of one session): u as one broadcast product and sum
  (``v4lab.mhc.mix_streams``), the Sinkhorn's normalisations as one autograd Function, attention projection
  blocks sized by floats and a per-block overhead in the training path cost model
  (``v4lab.attention.plan_attn_blocks``: a few wide gather blocks). Parts at 2048 (ms, fwd + bwd, all 6
  layers): attention ~400-550 (CSA ~95-115 a layer, of which the indexer's forward ~35: scores
  [S, 4, S/4] built with a graph nobody differentiates, ReLU on a fresh 16 MB copy, top-k), MoE ~230-300
  (GEMM-bound: 60 % of the peak), mHC pre-mix ~150-200 (a site: Sinkhorn 12.9, RMS-scaled mixing logits
  6.7, u 2.0), post-mix ~90-130, norms ~17-26. ~13 000 aten ops a step at 512 tokens, 61 % of op time in
  the backward. Two findings: the Sinkhorn's backward received its gradient token-major (from the
  [n, n, T] → [T, n, n] permute) and ran all 39 steps on that strided layout, ~5x slower than on a
  contiguous copy; the gather path's backward ran two [S, K, 4] x [S, 4, D] per-token products (inner
  dim 4) and added their [S, K, D] results.
  After (issue 21), 0.88-0.99 s/step at 2048 and 0.23-0.32 s at 512 (min-median of 9 and 20 steps run
  alternately with commit 2849302 in one session, which gave 1.03-1.14 and 0.27-0.34: -13 to -16 %, -6 %
  at the 512 median). Still ~13 500 top-level aten ops a step at 512 (12 900 before): the gains are layout
  and memory traffic, not op count. One autograd Function each, forward ops unchanged (bit-equal values,
  logits pinned), hand-written backward, a slow reference and tests (``tests/test_train_fastpaths.py``);
  Tensors kept for the backward at 2048 (``saved_tensors_hooks``, by storage): 580 → 478 MiB; ``peak_bytes``
  (sampled RSS growth over the warm-up step's, allocator-dependent) read 136-147 MiB before and 176-229 after.
  Per part (fwd + bwd, min of alternating runs):
    Sinkhorn (``mhc._Sinkhorn``: softmax + eps + 39 normalisations, outputs in one preallocated buffer, the
      backward on a contiguous gradient): 12.9 → 4.2 ms a site at 2048, 3.6 → 1.4 at 512;
    RMS-scaled mixing logits (``mhc._RmsMix``, hc_pre and hc_head): 6.7 → 4.3 ms a site, 1.3 → 0.9 at 512;
    the gather core after the gather (``attention.sparse_attn_fused``: one [S, K, 2H] x [S, 2H, D] product
      for the gathered rows' gradient): CSA-shaped layer core 43 → 29 ms, 8.1 → 6.2 at 512;
    RMSNorm (``norm._RMSNorm``): 1.9 → 1.2 ms a call on [2048, 128];
    hc_post (``mhc._Post``): 7.8 → 5.9 ms a site (median; equal at the minimum: memory-bound);
    the indexer builds no graph outside its warm-up (its scores and keys feed only top-k) and ReLUs in place.
  Now the largest parts at 2048: attention ~45 % (per-token [S, 4, D] x [S, D, K] products run at 1-2
  GFLOP/s: 2048 GEMMs of 4 rows; the gather and its scatter-add; the indexer's dense [S, 4, S/4] scores),
  MoE ~28 % (its GEMMs at 50-65 % of the peak), mHC pre-mix ~14 % (4.2 Sinkhorn + 4.3 logits + 2 u a site),
  post-mix ~10 % (its [T, 4, 4] x [T, 4, 128] per-token product: 2 ms at 2048 and no eager formulation is
  faster: broadcast or per-stream loops measured 2-2.5x slower).
What limits going further: on a model this narrow (hidden 128, 4 heads × 64, 4 streams) the remaining ops are
either per-token batched products with 4-row matrices (MKL's per-matrix overhead) or memory-bound passes over
[T, 4, 128] stream tensors; hand-written backwards no longer help there (a fused expert-FFN Function with a
hand-written SwiGLU backward measured no faster than autograd's nodes and was dropped, as was a single
gather / scatter for all experts). Forward ops are pinned by ``tests/test_refactor_reference.py`` (1e-6): a
[n, n, T] softmax in the Sinkhorn is 10x faster than the [T, n, n] one but moves the logits by 7e-6, and
causal blocking of the indexer scores would change their GEMM shapes (top-k near-ties). A compiler that
fuses the elementwise chains (torch.compile, not used: its compile time would count, and laptops may lack a
C++ toolchain) or batched kernels for the 4-row products are the next step. Noise: a quick run was 2 steps, one
round, whose "median" of 2 is the slower step; it is now 3 steps. With the cores shared it moved by ±25 % at
512 (four quick runs in one hour: 0.28-0.44 s, 1.11-1.67x the peer), and even on a quiet machine one process's
consecutive 512-token steps span 0.26-0.40 s of CPU time (no page faults): the full run (3 rounds of 3 steps)
gave 1.52x at 512, a quick run just before it 1.97x; 6.56x and 25.2 % of the matmul peak at 2048.
The peer spends most of its time in dense attention (bmm over [S, S] per head) and its masks.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import TYPE_CHECKING, Callable

import torch

if TYPE_CHECKING:
    from v4lab.config import V4Config

QUICK_SEQS = (512, 2048)
FULL_SEQS = (512, 2048, 8192)
IMPLS = ("v4lab", "hf-transformers")
HF_BUDGET = int(float(os.environ.get("V4LAB_BENCH_HF_GIB", "12")) * 2 ** 30)


def bench_config(seq: int) -> V4Config:
    from v4lab.config import get_config
    cfg = get_config("tiny")
    return cfg.replace(max_position_embeddings=max(cfg.max_position_embeddings, 2 * seq))


def step_flops(cfg: V4Config, seq: int) -> int:
    """Analytic FLOPs of one training step over `seq` tokens (see the module docstring)."""
    from v4lab import accounting as acc
    return 3 * sum(acc.decode_flops(cfg, t)["total_raw"] for t in range(1, seq + 1))


def hf_analytic_peak(cfg: V4Config, seq: int) -> int:
    """Bytes the peer's eager attention keeps for the backward: per attention layer, per head, the [S, S+T]
    scores, their masked and softmax copies (fp32), plus the [S, S+T] mask."""
    total = 0
    for i in range(cfg.num_hidden_layers):
        r = cfg.compress_ratio(i)
        T = seq // r if r else 0
        total += (3 * cfg.num_attention_heads + 1) * seq * (seq + T) * 4
    return total


def matmul_peak(n: int = 2048, tries: int = 3) -> float:
    """The machine's fp32 GEMM rate (FLOP/s) on this thread count: best of `tries` n×n @ n×n products."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(tries):
        t = time.process_time()
        a @ b
        best = min(best, time.process_time() - t)
    return 2 * n ** 3 / best


def _worker(impl: str, seq: int, steps: int) -> dict:
    torch.set_num_threads(1)
    import torch.nn.functional as F

    from v4lab.bench.attention import _PeakRSS
    from v4lab.checkpoint import synthetic_masters, write_checkpoint
    cfg = bench_config(seq)
    with tempfile.TemporaryDirectory(prefix="v4lab-bench-train-") as tmp:
        ck = write_checkpoint(synthetic_masters(cfg, seed=0), cfg, os.path.join(tmp, "ck"))
        if impl == "v4lab":
            import v4lab.model as vm
            model = vm.load(ck)
            logits_of = model
        else:
            import transformers
            transformers.logging.set_verbosity_error()
            from transformers import DeepseekV4ForCausalLM
            model = DeepseekV4ForCausalLM.from_pretrained(str(ck), dtype=torch.float32)
            logits_of = lambda ids: model(ids).logits  # noqa: E731
    model.train()
    ids = torch.randint(0, cfg.vocab_size, (1, seq + 1), generator=torch.Generator().manual_seed(0))

    def step():
        model.zero_grad(set_to_none=True)
        loss = F.cross_entropy(logits_of(ids[:, :-1]).float().reshape(-1, cfg.vocab_size), ids[:, 1:].reshape(-1))
        loss.backward()
        return float(loss.detach())

    step()
    times = []
    with _PeakRSS() as m:
        for _ in range(steps):
            t = time.process_time()
            loss = step()
            times.append(time.process_time() - t)
    times.sort()
    return {"impl": impl, "seq": seq, "seconds": times[len(times) // 2], "step_seconds": times,
            "peak_bytes": m.delta, "loss": loss}


def _spawn(impl: str, seq: int, steps: int) -> dict:
    cmd = [sys.executable, "-m", "v4lab.bench.train", "--worker", impl, str(seq), str(steps)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"),
                       timeout=7200)
    if p.returncode != 0:
        raise RuntimeError(f"train bench worker {impl} seq={seq} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def run(quick: bool = False, progress: bool = False, log: Callable[[str], None] | None = None) -> list[dict]:
    """Records with keys impl, seq, seconds, tokens_per_s, peak_bytes, gflops, peak_fraction (+ details)."""
    from v4lab.progress import bar
    torch.set_num_threads(1)
    log = log or (lambda s: None)
    seqs = QUICK_SEQS if quick else FULL_SEQS
    steps, repeats = (3, 1) if quick else (3, 3)    # 3 steps: a true median (of 2 it is the slower)
    plan = []
    for seq in seqs:
        fits = hf_analytic_peak(bench_config(seq), seq) <= HF_BUDGET
        plan.append((seq, IMPLS if fits else IMPLS[:1]))
    records, peaks = [], []
    with bar(sum(len(i) for _, i in plan) * repeats, "train bench", progress) as pb:
        for seq, impls in plan:
            cfg = bench_config(seq)
            flops = step_flops(cfg, seq)
            runs = {i: [] for i in impls}
            for r in range(repeats):
                for impl in (impls if r % 2 == 0 else impls[::-1]):
                    log(f"train step {impl} seq={seq} (round {r + 1}/{repeats})")
                    pb.set_postfix_str(f"{impl} {seq}")
                    peaks.append(matmul_peak())
                    runs[impl].append(_spawn(impl, seq, steps))
                    pb.update(1)
            for impl in impls:
                rs = sorted(runs[impl], key=lambda x: x["seconds"])
                rec = dict(rs[len(rs) // 2])
                rec.update(bench="train", flops=flops, tokens_per_s=seq / rec["seconds"],
                           gflops=flops / rec["seconds"] / 1e9, threads=1, dtype="float32",
                           round_seconds=[x["seconds"] for x in runs[impl]], skipped=False)
                records.append(rec)
            if len(impls) == 1:
                records.append({"bench": "train", "impl": IMPLS[1], "seq": seq, "skipped": True, "seconds": None,
                                "tokens_per_s": None, "peak_bytes": None, "gflops": None, "peak_fraction": None,
                                "analytic_peak_bytes": hf_analytic_peak(cfg, seq),
                                "reason": f"eager attention needs ~{hf_analytic_peak(cfg, seq) / 2 ** 30:.1f} GiB "
                                          f"> budget {HF_BUDGET / 2 ** 30:.0f} GiB"})
    peak = max(peaks)
    for rec in records:
        rec["matmul_peak_gflops"] = peak / 1e9
        if not rec["skipped"]:
            rec["peak_fraction"] = rec["gflops"] * 1e9 / peak
    for seq, impls in plan:
        if len(impls) == 2:
            a, b = (next(r for r in records if r["seq"] == seq and r["impl"] == i) for i in IMPLS)
            a["speed_vs_peer"] = b["seconds"] / a["seconds"]
    return records


def report(records: list[dict]) -> str:
    peak = records[0]["matmul_peak_gflops"] if records else float("nan")
    lines = [f"Training step (fwd + bwd, fp32, 1 thread), tiny V4; matmul peak {peak:.1f} GFLOP/s (torch.mm 2048², "
             "same run)",
             f"{'impl':16} {'seq':>6} {'s/step':>8} {'tokens/s':>9} {'peak MiB':>9} {'GFLOP/s':>8} "
             f"{'of peak':>8}  vs peer"]
    for r in records:
        if r["skipped"]:
            lines.append(f"{r['impl']:16} {r['seq']:>6}  skipped: {r['reason']}")
            continue
        vs = f"{r['speed_vs_peer']:.2f}x" if "speed_vs_peer" in r else ""
        lines.append(f"{r['impl']:16} {r['seq']:>6} {r['seconds']:>8.3f} {r['tokens_per_s']:>9.0f} "
                     f"{r['peak_bytes'] / 2 ** 20:>9.0f} {r['gflops']:>8.2f} {r['peak_fraction']:>8.1%}  {vs}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        print(json.dumps(_worker(argv[1], int(argv[2]), int(argv[3]))))
        return 0
    from v4lab.progress import add_argument, enabled
    p = argparse.ArgumentParser(prog="v4lab bench train", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="seq 512 and 2048, one round of 3 steps")
    p.add_argument("--json", action="store_true", help="print the records as JSON")
    p.add_argument("--device", default=None, help="cpu only (the comparison is a CPU one)")
    add_argument(p)
    args = p.parse_args(argv)
    if args.device not in (None, "cpu", "auto") and not str(args.device).startswith("cpu"):
        print(f"v4lab: error: --device {args.device}: the train bench compares CPU steps (use cpu)", file=sys.stderr)
        return 2
    progress = enabled(not args.no_progress)
    quiet = args.json or progress
    records = run(args.quick, progress, None if quiet else (lambda s: print(f"# {s}", file=sys.stderr, flush=True)))
    print(json.dumps(records, indent=1) if args.json else report(records))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
