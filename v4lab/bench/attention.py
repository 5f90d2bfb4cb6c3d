"""``v4lab bench attention [--quick] [--json] [--device D]``: V4's attention cost beside its baselines.

Device: ``--device`` / $V4LAB_DEVICE / CUDA when present (``v4lab.device.get_device``). On CUDA every
layer, cache and input lives on the GPU (cache contents are drawn by a CPU generator and copied, so both
devices see the same values); ``seconds`` is then synchronised wall time and ``peak_bytes``
``torch.cuda.max_memory_allocated`` (weights + cache + step) instead of process CPU time and RSS, and
HF's budget is 90 % of the GPU's memory. What follows describes the CPU run.

Decode (real shapes, one layer, random weights, fp32 on CPU; full run: 8K, 128K, 1M tokens):
  V4-Flash / V4-Pro CSA and HCA layers (``v4lab.attention.Attention``), a V3.2 MLA+DSA layer and a dense
  MQA layer (``v4lab.baselines``; MQA = V4-Flash's 64 × 512 query path with one K=V head, dense over all
  tokens). A decode step at context N does not need N tokens of prefill: each cache is filled
  synthetically with random entries of the right shapes and counts (window ring, N // m compressed
  entries, N // 4 indexer keys, compressor states for the open window), see ``fill_v4_cache``; ``check_fill``
  compares that layout with a real prefill on the tiny config. Then ``steps`` decode steps are timed
  (the minimum is kept; the cache is filled with N − steps tokens so the last step leaves N).
  ``seconds`` is single-thread CPU time (``time.process_time``, torch on 1 thread): the machine is shared,
  and wall time under contention measured 3-7x the CPU time; ``wall_seconds`` is recorded too.
  ``cache_bytes`` counts the entries the cache holds after the step, priced in the
  released storage format (V4: FP8 nope + BF16 rope + UE8M0 scales, FP4 indexer keys; V3.2: FP8 latent +
  scales, FP8 indexer key; MQA: BF16) — the figure ``v4lab.accounting.kv_cache`` predicts; ``stored_bytes``
  is what this fp32 simulation holds. Analytic per-layer FLOPs use ``v4lab.accounting``'s formulas.
  One subprocess per layer walks its contexts upward: ``peak_bytes`` is that process's RSS high-water mark
  (weights + cache + step), not a per-point figure.

Prefill (v4lab vs Hugging Face ``DeepseekV4Attention``, same shapes and weights' shapes, eager attention) at
two shapes of a V4-Flash CSA and HCA layer:
  - narrow: the attention geometry is real (head_dim 512, rope 64, window 128, m = 4 / 128, top-k 512,
    indexer head dim 128), the widths are cut (hidden 1024, 2 query heads, 2 indexer heads, q_lora 256, one
    output group of rank 256): cheap enough for 1K-32K on a shared 2-core CPU.
  - real: the released V4-Flash attention (d 4096, 64 heads × 512, q_lora 1024, 8 output groups of rank 1024,
    64 indexer heads × 128): ~0.25 GFLOP per token in projections alone, 6-10 CPU-s per 1K tokens.
  --quick: narrow 1K, 2K, 4K (3 interleaved runs per side, medians), narrow 8K (memory target) and real 1K,
  2K, 4K (one run per side); full: narrow 1K-32K and real 1K-4K plus the 64K real-shape points (v4lab only).
  Each point runs in a fresh subprocess; ``peak_bytes`` = peak RSS during the forward (sampled every 5 ms)
  minus RSS before it; ``seconds`` is the process's CPU time (1 thread).
  HF builds dense [S, S + S/m] scores per head (plus mask, softmax copies): where its analytic footprint
  exceeds ``HF_BUDGET`` (12 GiB: the CPU machine has 24 GiB, shared; the real shape's 4K point needs ~16 GiB)
  the record is marked ``skipped`` with that figure in ``analytic_peak_bytes`` and the reason.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import threading
import time
from functools import partial
from typing import TYPE_CHECKING, Callable

import torch

from v4lab.errors import OneLineParser
from v4lab.loading import no_init

if TYPE_CHECKING:
    from v4lab.attention import Attention, AttentionCache
    from v4lab.config import V4Config

KIB = 1024
HF_BUDGET = int(float(os.environ.get("V4LAB_BENCH_HF_GIB", "12")) * 2 ** 30)  # bytes the peer may use
DECODE_LAYERS = {                          # name: (preset, layer_id or None)
    "v4-flash-csa": ("v4-flash", 2), "v4-flash-hca": ("v4-flash", 3),
    "v4-pro-csa": ("v4-pro", 2), "v4-pro-hca": ("v4-pro", 3),
    "v3.2-mla-dsa": ("v3.2", None), "mqa-dense": ("v4-flash", None),
}
PREFILL_LAYERS = {"v4-flash-csa": 2, "v4-flash-hca": 3}
PREFILL_SHAPES = ("narrow", "real")
FULL_DECODE = (8192, 131072, 1048576)
# (shape, context): v4lab runs every point, HF where its analytic footprint fits in the budget
FULL_PREFILL = [("narrow", S) for S in (1024, 2048, 4096, 8192, 16384, 32768)] + \
               [("real", S) for S in (1024, 2048, 4096, 65536)]
# quick: both shapes at 1K-4K (the peer's real-shape 4K needs ~16 GiB and is skipped with that reason) and the
# narrow 8K point, the first context of the memory target
QUICK_PREFILL = [("narrow", S) for S in (1024, 2048, 4096, 8192)] + [("real", S) for S in (1024, 2048, 4096)]
FULL_PREFILL_ANALYTIC = (65536,)
# side-by-side repeats (v4lab and HF interleaved) below REPEAT_BELOW tokens; a real-shape point costs 6-30
# CPU-s per run on each side, so it runs once (its ratios are far from 1: see the README table)
PREFILL_REPEATS = {"narrow": 3, "real": 1}
REPEAT_BELOW = 8192


# ------------------------------------------------------------------------------------------ helpers
def _randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Random weights, fast: a 1M-value random pool tiled over each matrix, scaled by fan_in^-½ (values
    do not change the timing; drawing 300M fresh numbers on 2 cores would take longer than the benchmark).
    Norm gains 1, sinks 0, other vectors (ape, position_bias) small random."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.randn(1 << 20, generator=g)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2:
                flat, fan_in = p.view(-1), p.shape[-1]
                for i in range(0, flat.numel(), pool.numel()):
                    n = min(pool.numel(), flat.numel() - i)
                    flat[i:i + n].copy_(pool[:n])
                p.mul_(fan_in ** -0.5)
            elif "norm" in name:
                p.fill_(1.0)
            elif "sink" in name:
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def _build(factory):
    """Construct a module without its default init (kaiming on 10^8 weights is slow), then randomize."""
    with no_init():
        m = factory()
    _randomize(m)
    return m.eval()


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * KIB


class _PeakRSS:
    """Peak RSS while the block runs, sampled every 5 ms (torch CPU tensors are invisible to tracemalloc)."""

    def __enter__(self):
        self.base = self.peak = _rss()
        self._stop = False
        self._t = threading.Thread(target=self._poll, daemon=True)
        self._t.start()
        return self

    def _poll(self):
        while not self._stop:
            self.peak = max(self.peak, _rss())
            time.sleep(0.005)

    def __exit__(self, *exc):
        self._stop = True
        self._t.join()
        self.peak = max(self.peak, _rss())
        self.delta = self.peak - self.base


# ------------------------------------------------------------------------------------------ V4 cache
def _v4_decode_step(attn, x: torch.Tensor, cache) -> torch.Tensor:
    """One V4 decode step at the position the cache has reached (read at call time)."""
    return attn(x, cache.length, cache)


def fill_v4_cache(attn: Attention, cache: AttentionCache, context: int, generator: torch.Generator | None = None,
                  device: str | torch.device | None = None) -> None:
    """Put `context` synthetic tokens into a v4lab AttentionCache: the same tensors, shapes and counts a
    real prefill of `context` tokens leaves (checked by `check_fill`), filled with random values drawn on
    the CPU and placed on `device` (default: the layer's)."""
    from v4lab.norm import rms_norm
    g, B, D, w = generator, cache.batch_size, attn.head_dim, attn.window
    dev = device or attn.wkv.weight.device
    randn = lambda *s: torch.randn(*s, generator=g).to(dev)  # noqa: E731
    cache.window = rms_norm(randn(B, w, D), None, 1e-6)
    cache.length = context
    if attn.kind == "window":
        return
    r, coff = attn.ratio, 2 if attn.kind == "csa" else 1
    n_ent, rem = context // r, context % r
    cache.entries.append(rms_norm(randn(B, n_ent, D), None, 1e-6))
    states = [(cache.comp_state, D)]
    if attn.kind == "csa":
        Di = attn.indexer.head_dim
        cache.index_keys.append(rms_norm(randn(B, n_ent, Di), None, 1e-6))
        states.append((cache.index_state, Di))
    for st, c in states:
        st.n_entries = n_ent
        st.pending_kv, st.pending_score = randn(B, rem, coff * c), randn(B, rem, coff * c)
        if attn.kind == "csa" and n_ent:
            st.prev_kv, st.prev_score = randn(B, r, coff * c), randn(B, r, coff * c)


def _cache_layout(cache) -> dict:
    def shape(t):
        return None if t is None else tuple(t.shape)
    out = {"length": cache.length, "window": shape(cache.window), "entries": shape(cache.entries.get()),
           "index_keys": shape(cache.index_keys.get())}
    for key in ("comp_state", "index_state"):
        st = getattr(cache, key)
        if st is not None:
            out[key] = (st.n_entries, shape(st.pending_kv), shape(st.pending_score), shape(st.prev_kv),
                        shape(st.prev_score))
    return out


def check_fill(lengths: tuple[int, ...] = (3, 130, 300)) -> None:
    """A synthetic fill must leave the cache layout a real prefill leaves (tiny config, every kind)."""
    from v4lab.attention import Attention
    from v4lab.config import get_config
    cfg = get_config("tiny")
    for layer_id in (0, 1, 2):
        attn = Attention(cfg, layer_id).eval()
        for n in lengths:
            real = attn.new_cache(1)
            with torch.no_grad():
                attn(torch.randn(1, n, cfg.hidden_size), 0, real)
            fake = attn.new_cache(1)
            fill_v4_cache(attn, fake, n)
            a, b = _cache_layout(real), _cache_layout(fake)
            if a != b:
                raise RuntimeError(f"synthetic cache fill disagrees with prefill ({attn.kind}, n={n}): {a} vs {b}")


def _v4_cache_counts(attn, cache) -> dict:
    return {"window": min(cache.length, attn.window), "entries": cache.entries.n, "index_keys": cache.index_keys.n}


# ------------------------------------------------------------------------------------------ analytic
def layer_kind_of(name: str) -> str:
    return name.rsplit("-", 1)[-1] if name.startswith("v4") else name


def analytic(name: str, context: int) -> dict:
    """Per-layer decode FLOPs (raw, 2 per MAC) and cache bytes at `context` tokens.

    V4 and V3.2 figures come from v4lab.accounting: its per-layer parameter counts (``_v4_attention``,
    ``_mla_attention``), the same core/indexer terms as ``decode_flops`` (checked against it in
    ``check_accounting``), and ``kv_cache`` divided by the number of layers of that kind. MQA is not a
    released model, so its figures are written out here.
    """
    from v4lab import accounting as acc
    from v4lab.config import get_config
    preset, layer_id = DECODE_LAYERS[name]
    cfg = get_config(preset)
    N = context
    if name == "mqa-dense":
        p = acc._v4_attention(cfg, 0)
        gemm = 2 * sum(p.values())
        core = cfg.num_attention_heads * N * 4 * cfg.head_dim
        return {"gemm": gemm, "core": core, "indexer": 0, "flops": gemm + core, "cache_bytes": N * 2 * cfg.head_dim,
                "source": "bench (MQA is not in v4lab.accounting)"}
    if cfg.is_v4:
        r = cfg.compress_ratio(layer_id)
        gemm = 2 * sum(acc._v4_attention(cfg, r).values())
        entries = min(cfg.sliding_window, N) + (min(cfg.index_topk, N // 4) if r == 4 else N // 128)
        core = cfg.num_attention_heads * entries * 4 * cfg.head_dim
        index = cfg.index_n_heads * (2 * cfg.index_head_dim + 2) * (N // 4) if r == 4 else 0
        kind = cfg.layer_kind(layer_id)
    else:
        gemm = 2 * sum(acc._mla_attention(cfg).values())
        lat = cfg.kv_lora_rank + cfg.qk_rope_head_dim
        core = cfg.num_attention_heads * min(cfg.index_topk, N) * (2 * lat + 2 * cfg.kv_lora_rank)
        index = cfg.index_n_heads * (2 * cfg.index_head_dim + 2) * N
        kind = cfg.layer_kind(0)
    kv = acc.kv_cache(cfg, N)
    per_layer = kv["by_kind"][kind] / kv["layers_by_kind"][kind]
    return {"gemm": gemm, "core": core, "indexer": index, "flops": gemm + core + index, "cache_bytes": per_layer,
            "source": "v4lab.accounting"}


def check_accounting(context: int = 2 ** 20) -> None:
    """Our per-layer core/indexer terms summed over a model's layers must equal accounting.decode_flops."""
    from v4lab import accounting as acc
    from v4lab.config import get_config
    for preset, names in (("v4-flash", ("v4-flash-csa", "v4-flash-hca")), ("v4-pro", ("v4-pro-csa", "v4-pro-hca")),
                          ("v3.2", ("v3.2-mla-dsa",))):
        cfg = get_config(preset)
        kinds = cfg.layer_kinds
        core = index = 0
        for kind in dict.fromkeys(kinds):
            n = kinds.count(kind)
            if kind == "window":
                core += n * cfg.num_attention_heads * min(cfg.sliding_window, context) * 4 * cfg.head_dim
                continue
            nm = [x for x in names if x.endswith(kind) or kind == "mla+dsa"][0]
            a = analytic(nm, context)
            core, index = core + n * a["core"], index + n * a["indexer"]
        raw = acc.decode_flops(cfg, context)["groups_raw"]
        if core != raw["core_attention"] or index != raw["indexer_scores"]:
            raise RuntimeError(f"{preset}: per-layer FLOPs disagree with accounting.decode_flops: "
                               f"core {core} vs {raw['core_attention']}, indexer {index} vs {raw['indexer_scores']}")


# ------------------------------------------------------------------------------------------ workers
class _Clock:
    """CPU: process time (the machine is shared) and RSS high-water mark. CUDA: synchronised wall time and
    the allocator's peak since the last reset."""

    def __init__(self, dev: torch.device):
        self.dev, self.cuda = dev, dev.type == "cuda"

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize(self.dev)
            return time.perf_counter()
        return time.process_time()

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated(self.dev) if self.cuda else _maxrss()


def _decode_worker(name: str, contexts: list[int], steps: int, device: str = "cpu") -> list[dict]:
    from v4lab.config import get_config
    torch.set_num_threads(1)
    dev = torch.device(device)
    clock = _Clock(dev)
    preset, layer_id = DECODE_LAYERS[name]
    cfg = get_config(preset)
    g = torch.Generator().manual_seed(0)
    if name == "v3.2-mla-dsa":
        from v4lab.baselines import MLADSA
        layer = _build(lambda: MLADSA(cfg))
    elif name == "mqa-dense":
        from v4lab.baselines import DenseMQA
        layer = _build(lambda: DenseMQA(cfg))
    else:
        from v4lab.attention import Attention
        layer = _build(lambda: Attention(cfg, layer_id))
    layer = layer.to(dev)
    out = []
    for N in contexts:
        x = (torch.randn(1, 1, cfg.hidden_size, generator=g) * 0.1).to(dev)
        n0 = N - steps            # the last step sees N tokens (and 1M stays < max_position_embeddings)
        if hasattr(layer, "decode"):
            cache = layer.new_cache(1, n0, generator=g, device=dev)
            step = partial(layer.decode, x, cache)
        else:
            cache = layer.new_cache(1)
            fill_v4_cache(layer, cache, n0, g, dev)
            step = partial(_v4_decode_step, layer, x, cache)
        times, walls = [], []
        with torch.no_grad():
            for _ in range(steps):
                t0, w0 = clock.now(), time.perf_counter()
                y = step()
                times.append(clock.now() - t0)
                walls.append(time.perf_counter() - w0)
        if not torch.isfinite(y).all():
            raise RuntimeError(f"{name} at {N}: non-finite output")
        ctx = cache.length                                     # = N: the cache the last step left
        if name == "v3.2-mla-dsa":
            fmt = layer.cache_format_bytes(cfg, ctx)
        elif name == "mqa-dense":
            fmt = layer.cache_format_bytes(cfg, ctx)
        else:
            from v4lab import accounting as acc
            cnt = _v4_cache_counts(layer, cache)
            eb, ib = acc._v4_entry(cfg, True)[0], acc._v4_index_key(cfg, True)[0]
            fmt = (cnt["window"] + cnt["entries"]) * eb + cnt["index_keys"] * ib
        out.append({"layer": name, "impl": "v4lab" if name.startswith("v4") else "baseline", "mode": "decode",
                    "device": str(dev), "context": N, "seconds": min(times), "step_seconds": times,
                    "wall_seconds": min(walls), "peak_bytes": clock.peak(),
                    "cache_bytes": fmt, "cache_context": ctx, "stored_bytes": cache.nbytes(), "skipped": False})
        del cache, step
    return out


def narrow_config() -> V4Config:
    """V4-Flash attention geometry with cut widths (see module docstring)."""
    from v4lab.config import get_config
    return get_config("v4-flash").replace(hidden_size=1024, num_attention_heads=2, q_lora_rank=256, o_groups=1,
                                          o_lora_rank=256, index_n_heads=2)


def hf_analytic_peak(cfg: V4Config, layer_id: int, S: int) -> int:
    """Bytes HF's eager DeepseekV4Attention needs at S tokens (fp32): per head [S, S + T] scores, the
    masked copy, the softmax copy (with the sink column), plus the extended mask; CSA adds its indexer's
    [S, Hi, T] per-head scores and the [S, T] block bias."""
    r = cfg.compress_ratio(layer_id)
    T = S // r if r else 0
    H = cfg.num_attention_heads
    b = 3 * H * S * (S + T + 1) * 4 + 2 * S * (S + T) * 4
    if r == 4:
        b += (cfg.index_n_heads + 2) * S * T * 4
    return b


def _hf_module(cfg, layer_id: int):
    from transformers.models.deepseek_v4 import modeling_deepseek_v4 as M
    from transformers.models.deepseek_v4.configuration_deepseek_v4 import DeepseekV4Config
    hf = DeepseekV4Config(
        hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads, head_dim=cfg.head_dim,
        q_lora_rank=cfg.q_lora_rank, o_groups=cfg.o_groups, o_lora_rank=cfg.o_lora_rank,
        sliding_window=cfg.sliding_window, compress_ratios=[cfg.compress_ratio(layer_id), 0],
        num_hidden_layers=1, index_n_heads=cfg.index_n_heads, index_head_dim=cfg.index_head_dim,
        index_topk=cfg.index_topk, qk_rope_head_dim=cfg.qk_rope_head_dim, rope_theta=cfg.rope_theta,
        compress_rope_theta=cfg.compress_rope_theta, rms_norm_eps=cfg.rms_norm_eps,
        n_routed_experts=4, num_experts_per_tok=2, num_hash_layers=0)
    hf._attn_implementation = "eager"
    return hf, _build(lambda: M.DeepseekV4Attention(hf, 0)), M.DeepseekV4RotaryEmbedding(hf)


def prefill_config(shape: str) -> V4Config:
    """"narrow" (the cut widths above) or "real" (the released V4-Flash attention: d 4096, 64 heads × 512,
    q_lora 1024, 8 output groups of rank 1024, 64 indexer heads × 128)."""
    from v4lab.config import get_config
    if shape not in PREFILL_SHAPES:
        raise ValueError(f"shape = {shape!r}: must be one of {PREFILL_SHAPES}")
    return narrow_config() if shape == "narrow" else get_config("v4-flash")


def _prefill_worker(name: str, impl: str, S: int, device: str = "cpu", shape: str = "narrow") -> list[dict]:
    torch.set_num_threads(1)
    dev = torch.device(device)
    clock = _Clock(dev)
    cfg = prefill_config(shape)
    layer_id = PREFILL_LAYERS[name]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, S, cfg.hidden_size, generator=g).to(dev)
    rec = {"layer": name, "impl": impl, "mode": "prefill", "device": str(dev), "context": S, "shape": shape,
           "skipped": False}
    if impl == "v4lab":
        from v4lab.attention import Attention
        attn = _build(lambda: Attention(cfg, layer_id)).to(dev)
        cache = attn.new_cache(1)
        run = lambda: attn(x, 0, cache)  # noqa: E731
    else:
        from transformers.masking_utils import create_sliding_window_causal_mask
        hf, attn, rot = _hf_module(cfg, layer_id)
        attn, rot = attn.to(dev), rot.to(dev)
        pid = torch.arange(S, device=dev)[None]

        def run():
            pe = {k: rot(x, pid, layer_type=k) for k in ("main", "compress")}
            mask = create_sliding_window_causal_mask(config=hf, inputs_embeds=x, attention_mask=None, cache=None,
                                                     position_ids=pid)
            return attn(x, pe, pid, mask)[0]
        rec["analytic_peak_bytes"] = hf_analytic_peak(cfg, layer_id, S)
        cache = None
    if clock.cuda:
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    with torch.no_grad(), _PeakRSS() as m:
        t0, w0 = clock.now(), time.perf_counter()
        y = run()
        rec["seconds"] = clock.now() - t0
        rec["wall_seconds"] = time.perf_counter() - w0
    if not torch.isfinite(y).all():
        raise RuntimeError(f"{impl} {name} prefill at {S}: non-finite output")
    rec["peak_bytes"] = clock.peak() - base if clock.cuda else m.delta
    rec["rss_peak_bytes"] = m.peak
    if cache is not None:
        from v4lab import accounting as acc
        cnt = _v4_cache_counts(attn, cache)
        rec["cache_bytes"] = (cnt["window"] + cnt["entries"]) * acc._v4_entry(cfg, True)[0] + \
            cnt["index_keys"] * acc._v4_index_key(cfg, True)[0]
    else:
        rec["cache_bytes"] = None        # HF's cache path is not used by a cache-less prefill
    return [rec]


def hf_budget(dev: torch.device) -> int:
    """Bytes HF's prefill may need before it is skipped: $V4LAB_BENCH_HF_GIB on the CPU, 90 % of the GPU."""
    if dev.type == "cuda":
        return int(0.9 * torch.cuda.get_device_properties(dev).total_memory)
    return HF_BUDGET


def _spawn(args: list[str], timeout: float) -> list[dict]:
    cmd = [sys.executable, "-m", "v4lab.bench.attention", "--worker", *args]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"worker {' '.join(args)} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------ driver
def _decode_records(name, contexts, steps, dev) -> list[dict]:
    recs = _spawn(["decode", name, ",".join(map(str, contexts)), str(steps), str(dev)], timeout=3600)
    for r in recs:
        a = analytic(name, r["context"])
        a_ctx = analytic(name, r["cache_context"])
        r.update(flops=a["flops"], flops_gemm=a["gemm"], flops_core=a["core"], flops_indexer=a["indexer"],
                 accounting_cache_bytes=a_ctx["cache_bytes"], analytic_source=a["source"])
    return recs


def _median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def prefill_side_by_side(points: list[tuple[str, int]], dev: str | torch.device, budget: int,
                         log: Callable[[str], None], progress: bool = False) -> list[dict]:
    """Prefill records for every (shape, context) point and both layer kinds: v4lab and HF run in fresh
    processes, interleaved (v4lab, HF, HF, v4lab, ...) `PREFILL_REPEATS` times below `REPEAT_BELOW` tokens
    (once above), and each record keeps the median ``seconds`` and ``peak_bytes`` with every run in
    ``runs_seconds``; ``speed_vs_hf`` = HF median / v4lab median of the same point."""
    from v4lab.progress import bar
    plan = []
    for shape, S in points:
        cfg = prefill_config(shape)
        for name in PREFILL_LAYERS:
            need = hf_analytic_peak(cfg, PREFILL_LAYERS[name], S)
            plan.append((shape, S, name, need, PREFILL_REPEATS[shape] if S < REPEAT_BELOW else 1))
    total = sum(reps * (1 + (need <= budget)) for *_, need, reps in plan)
    records = []
    with bar(total, "prefill", progress) as pb:
        for shape, S, name, need, reps in plan:
            impls = ["v4lab"] + (["hf-transformers"] if need <= budget else [])
            runs = {i: [] for i in impls}
            for r in range(reps):
                for impl in (impls if r % 2 == 0 else impls[::-1]):
                    log(f"prefill {shape} {name} S={S} {impl} (run {r + 1}/{reps})")
                    pb.set_postfix_str(f"{shape} {name} {S} {impl}")
                    runs[impl] += _spawn(["prefill", name, impl, str(S), str(dev), shape], timeout=7200)
                    pb.update(1)
            for impl in impls:
                rec = dict(runs[impl][-1])
                rec["runs_seconds"] = [x["seconds"] for x in runs[impl]]
                rec["seconds"] = _median(rec["runs_seconds"])
                rec["wall_seconds"] = _median([x["wall_seconds"] for x in runs[impl]])
                rec["peak_bytes"] = _median([x["peak_bytes"] for x in runs[impl]])
                records.append(rec)
            if len(impls) == 1:
                records.append({"layer": name, "impl": "hf-transformers", "mode": "prefill", "device": str(dev),
                                "context": S, "shape": shape, "skipped": True, "seconds": None, "peak_bytes": None,
                                "analytic_peak_bytes": need, "cache_bytes": None,
                                "reason": f"dense [S, S+T] scores need ~{need / 2 ** 30:.1f} GiB > budget "
                                          f"{budget / 2 ** 30:.0f} GiB (V4LAB_BENCH_HF_GIB; the CPU machine "
                                          "has 24 GiB, shared)"})
            else:
                records[-2]["speed_vs_hf"] = records[-1]["seconds"] / records[-2]["seconds"]
                records[-2]["memory_vs_hf"] = records[-1]["peak_bytes"] / max(1, records[-2]["peak_bytes"])
    return records


def run(quick: bool = False, log: Callable[[str], None] | None = None,
        device: str | torch.device | None = None, progress: bool = False) -> list[dict]:
    """Records (see the module docstring). ``device``: as ``v4lab.device.get_device``."""
    from v4lab.device import get_device
    dev = get_device(device)
    budget = hf_budget(dev)
    log = log or (lambda s: None)
    check_fill()
    check_accounting()
    if quick:
        dec_layers = ["v4-flash-csa", "v4-flash-hca", "v3.2-mla-dsa", "mqa-dense"]
        dec_ctx, steps = [8192], 1
        pre = QUICK_PREFILL
    else:
        dec_layers = list(DECODE_LAYERS)
        dec_ctx, steps = list(FULL_DECODE), 2
        pre = FULL_PREFILL
    records = []
    from v4lab.progress import bar
    with bar(len(dec_layers), "decode", progress) as pb:
        for name in dec_layers:
            log(f"decode {name} at {dec_ctx}")
            pb.set_postfix_str(name)
            records += _decode_records(name, dec_ctx, steps, dev)
            pb.update(1)
    records += prefill_side_by_side(pre, dev, budget, log, progress)
    if not quick:
        cfg = narrow_config()
        for name in PREFILL_LAYERS:
            for S in FULL_PREFILL_ANALYTIC:
                need = hf_analytic_peak(cfg, PREFILL_LAYERS[name], S)
                records.append({"layer": name, "impl": "hf-transformers", "mode": "prefill", "device": str(dev),
                                "context": S,
                                "shape": "narrow", "skipped": True, "seconds": None, "peak_bytes": None,
                                "analytic_peak_bytes": need, "cache_bytes": None,
                                "reason": "analytic only (not run: CPU time on the shared 2-core machine)"})
    return records


def _fmt_b(n) -> str:
    if n is None:
        return "-"
    for unit, s in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(n) >= s:
            return f"{n / s:.2f} {unit}"
    return f"{n} B"


def report(records: list[dict]) -> str:
    lines = []
    dec = [r for r in records if r["mode"] == "decode"]
    if dec:
        where = dec[0].get("device", "cpu")
        lines.append(f"Decode step, one layer, real shapes, fp32 on {where} (ratios vs the V3.2 MLA+DSA layer at "
                     "the same context)")
        lines.append(f"{'layer':14} {'context':>8} {'ms':>9} {'cache (format)':>15} {'= accounting':>12} "
                     f"{'t/t_v32':>8} {'flops/v32':>9} {'dev':>6} {'cache/v32':>9}")
        base = {r["context"]: r for r in dec if r["layer"] == "v3.2-mla-dsa"}
        for r in dec:
            b = base.get(r["context"])
            tr = r["seconds"] / b["seconds"] if b else float("nan")
            fr = r["flops"] / b["flops"] if b else float("nan")
            cr = r["cache_bytes"] / b["cache_bytes"] if b else float("nan")
            acc_b = r["accounting_cache_bytes"]
            eq = "yes" if r["cache_bytes"] == acc_b else f"NO {_fmt_b(acc_b)}"
            lines.append(f"{r['layer']:14} {r['context']:>8} {1e3 * r['seconds']:>9.1f} {_fmt_b(r['cache_bytes']):>15} "
                         f"{eq:>12} {tr:>8.3f} {fr:>9.3f} {tr / fr - 1:>+6.0%} {cr:>9.4f}")
    pre = [r for r in records if r["mode"] == "prefill"]
    if pre:
        lines.append("")
        lines.append("Prefill, one V4-Flash layer (narrow: 2 heads, hidden 1024; real: the released widths), fresh "
                     "process per run, medians of interleaved runs")
        lines.append(f"{'layer':14} {'shape':6} {'impl':16} {'S':>6} {'seconds':>9} {'s/1K':>7} {'peak':>11} "
                     f"{'HF analytic':>12}  vs HF")
        hf = {(r["layer"], r.get("shape", "narrow"), r["context"]): r for r in pre if r["impl"] != "v4lab"}
        for r in pre:
            extra = ""
            h = hf.get((r["layer"], r.get("shape", "narrow"), r["context"]))
            if r["impl"] == "v4lab" and h is not None:
                if h["skipped"]:
                    extra = f"HF skipped; memory ≥ {h['analytic_peak_bytes'] / max(1, r['peak_bytes']):.0f}x (analytic)"
                else:
                    extra = (f"{h['seconds'] / r['seconds']:.2f}x speed, "
                             f"{h['peak_bytes'] / max(1, r['peak_bytes']):.1f}x less memory")
            sec = "skipped" if r["skipped"] else f"{r['seconds']:.2f}"
            per = "" if r["skipped"] else f"{1024 * r['seconds'] / r['context']:.3f}"
            lines.append(f"{r['layer']:14} {r.get('shape', 'narrow'):6} {r['impl']:16} {r['context']:>6} {sec:>9} "
                         f"{per:>7} {_fmt_b(r['peak_bytes']):>11} {_fmt_b(r.get('analytic_peak_bytes')):>12}  {extra}")
    return "\n".join(lines)


def _worker_args(args: list[str]) -> tuple[str, str, list[int] | str, int, str, str]:
    """``decode NAME CONTEXTS STEPS [DEVICE]`` | ``prefill NAME IMPL S [DEVICE [SHAPE]]`` (what ``_spawn``
    passes); SHAPE is ``narrow`` (default) or ``real``."""
    usage = "internal: --worker {decode NAME C1,C2 STEPS [DEVICE] | prefill NAME IMPL S [DEVICE [SHAPE]]}"
    if not (4 <= len(args) <= (6 if args[:1] == ["prefill"] else 5)) or args[0] not in ("decode", "prefill"):
        raise ValueError(f"--worker = {' '.join(args)!r}: {usage}")
    try:
        n = int(args[3])
        third = [int(c) for c in args[2].split(",")] if args[0] == "decode" else args[2]
    except ValueError:
        raise ValueError(f"--worker = {' '.join(args)!r}: {usage} (whole numbers)") from None
    return args[0], args[1], third, n, args[4] if len(args) >= 5 else "cpu", args[5] if len(args) == 6 else "narrow"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        kind, name, a3, n, dev, shape = _worker_args(argv[1:])
        if kind == "decode":
            recs = _decode_worker(name, a3, n, dev)
        else:
            recs = _prefill_worker(name, a3, n, dev, shape)
        print(json.dumps(recs))
        return 0
    p = OneLineParser(prog="v4lab bench attention")
    p.add_argument("--quick", action="store_true",
                   help="a subset: decode at 8K, prefill at 1K-8K (narrow) and 1K-4K (real); ~10 CPU-minutes")
    p.add_argument("--json", action="store_true", help="print the records as JSON")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N | auto (default: $V4LAB_DEVICE, else auto)")
    from v4lab.progress import add_argument, enabled
    add_argument(p)
    args = p.parse_args(argv)
    progress = enabled(not args.no_progress)
    quiet = args.json or progress                      # the bar says what runs; without it, one line per run
    records = run(args.quick, log=None if quiet else (lambda s: print(f"# {s}", file=sys.stderr, flush=True)),
                  device=args.device, progress=progress)
    print(json.dumps(records, indent=1) if args.json else report(records))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
