"""A roofline model of one decode step: why the report calls V4 a hardware bet (observation 3).

Bytes and FLOPs come from :mod:`v4lab.accounting`; GPU peaks from ``v4lab/hardware.json`` (dated,
with sources, approximate). One decode step for ``batch`` sequences at ``context`` tokens:

* FLOPs = batch x the raw decode FLOPs of ``accounting.decode_flops`` (weights="A"), each term
  on the tensor cores of its precision: weight GEMMs at the FP8 rate (FP8 weights; the FP4 x FP8
  expert GEMMs run at FP8 peak today, as the report notes), core attention at the BF16 rate, the
  V4 indexer (FP4 x FP4) at the FP4 rate where the GPU has FP4 tensor cores, else at the FP8 rate.
  ``fp4_experts=True`` imagines FP4 x FP4 expert GEMMs on FP4 cores (the bet's pay-off).
* Bytes = weights read once per step + KV read per sequence. Routed experts: with uniform routing a
  layer touches E(1 - (1 - k/E)^batch) of its E experts, so expert bytes grow with the batch until
  every expert is read. KV: everything in the cache is read except CSA's compressed entries (only the
  indexer's top-k) and V3.2's latents (top-k); indexer keys are read in full.
* Time = max(compute time, memory time) — a roofline, no overlap losses, no communication. Bytes and
  FLOPs both divide by the number of GPUs the model is spread over, so per-GPU throughput does not
  depend on it; a model too big for one GPU is simply assumed spread over several.

Storage bytes per parameter are approximate (``WEIGHT_BYTES``): FP8 with 128x128 UE8M0 scales for
projection weights, FP4 with one UE8M0 byte per 32 values for V4's routed experts, BF16 for the
compressor projections, norms, head and embedding, FP32 for mHC and router.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

from v4lab import accounting
from v4lab.config import PRESETS, V4Config, get_config

HARDWARE_PATH = Path(__file__).with_name("hardware.json")

FP8 = 1 + 1 / (128 * 128)
FP4 = 0.5 + 1 / 32
# bytes per stored parameter, by accounting component (V4; V3/V3.2 store experts in FP8 too)
WEIGHT_BYTES = {"embedding": 2, "attention": FP8, "compressor": 2, "indexer": FP8, "mhc": 4, "router": 4,
                "routed_experts": FP4, "shared_expert": FP8, "dense_ffn": FP8, "norms": 2, "head": 2, "mtp": 0}
PRECISIONS = ("bf16", "fp8", "fp4")


@lru_cache(maxsize=2)
def _gpus(path: str) -> dict:
    raw = json.loads(Path(path).read_text())
    for name, g in raw["gpus"].items():
        for k in ("hbm_tb_s", "tflops", "source"):
            if k not in g:
                raise ValueError(f"hardware file: GPU {name!r} lacks key {k!r}")
    return raw["gpus"]


def gpus(path: str | Path | None = None) -> dict:
    """GPU name → {label, hbm_tb_s, hbm_gb, tflops: {bf16, fp8, fp4 | None}, source}."""
    return _gpus(str(path or HARDWARE_PATH))


def gpu(name: str) -> dict:
    g = gpus()
    if name not in g:
        raise ValueError(f"gpu = {name!r}: not in hardware.json; known: {sorted(g)}")
    return g[name]


def peak_flops(name: str, precision: str) -> float:
    """FLOP/s of ``precision`` tensor cores. Without FP4 cores FP4 operands run at the FP8 rate, without
    FP8 cores (A100) FP8 and FP4 operands are converted and run at the BF16 rate."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision = {precision!r}: must be one of {PRECISIONS}")
    t = gpu(name)["tflops"]
    for p in PRECISIONS[PRECISIONS.index(precision)::-1]:     # fp4 → fp8 → bf16
        if t.get(p) is not None:
            return float(t[p]) * 1e12
    raise ValueError(f"gpu {name!r}: hardware.json gives no tensor-core rate at or above {precision!r}")


def bandwidth(name: str) -> float:
    return float(gpu(name)["hbm_tb_s"]) * 1e12


@lru_cache(maxsize=16)
def _preset(name: str) -> V4Config:
    return get_config(name)


def _cfg(c) -> V4Config:
    if isinstance(c, V4Config):
        return c
    return _preset(c) if isinstance(c, str) and c in PRESETS else get_config(c)


def experts_touched(n_experts: int, top_k: int, batch: int) -> float:
    """Expected distinct experts one MoE layer reads for ``batch`` tokens under uniform routing."""
    return n_experts * (1 - (1 - top_k / n_experts) ** batch)


@lru_cache(maxsize=512)
def _per_sequence(cfg_key: str, context: int) -> tuple:
    """The batch-independent parts of a decode step (accounting is called once per config/context).
    ``cfg_key`` is a preset name or a config's JSON."""
    cfg = get_config(cfg_key) if not cfg_key.startswith("{") else V4Config(**json.loads(cfg_key))
    p = accounting.params(cfg)
    kv = accounting.kv_cache(cfg, context)
    kv_read = 0.0
    for part in kv["parts"]:
        entries = part["entries_per_layer"]
        if (part["part"] == "compressed_kv" and part["kind"] == "csa") or (
                part["part"] == "latent_kv" and cfg.arch == "v3.2"):
            entries = min(entries, cfg.index_topk)          # only the indexer's top-k entries are read
        kv_read += part["layers"] * entries * part["bytes_per_entry"]
    fl = accounting.decode_flops(cfg, context, weights="A")
    by_class = {"gemm": 0.0, "gemm_experts": 0.0, "bf16": 0.0, "fp8": 0.0, "fp4": 0.0}
    for term, v in fl["raw"].items():
        by_class["gemm_experts" if term == "gemm_routed_experts" else fl["precision"][term]] += v
    return p["by_component"], kv_read, kv["total_bytes"], by_class, kv["context"]


def decode_step(cfg: V4Config | str, context: int, batch: int = 1) -> dict:
    """Bytes read and FLOPs (by precision class) of one decode step for ``batch`` sequences."""
    key = cfg if isinstance(cfg, str) and cfg in PRESETS else None
    cfg = _cfg(cfg)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch = {batch!r}: must be a positive integer")
    accounting._check_context(context)
    key = key or json.dumps(dataclasses.asdict(cfg), sort_keys=True)
    comps, kv_read, kv_total, by_class, N = _per_sequence(key, context)
    wb = dict(WEIGHT_BYTES)
    if not cfg.is_v4:
        wb["routed_experts"] = FP8
    frac = experts_touched(cfg.n_routed_experts, cfg.num_experts_per_tok, batch) / cfg.n_routed_experts
    weights = {}
    for comp, n in comps.items():
        if comp == "embedding":
            n = batch * cfg.hidden_size                      # a row per token
        elif comp == "routed_experts":
            n = n * frac
        weights[comp] = n * wb[comp]
    flops = {k: batch * v for k, v in by_class.items()}
    weight_bytes = sum(weights.values())
    return {"context": N, "batch": batch, "flops": sum(flops.values()), "flops_by_class": flops,
            "weight_bytes": weight_bytes, "weight_bytes_by_component": weights, "kv_read_bytes": batch * kv_read,
            "kv_cache_bytes": batch * kv_total, "bytes": weight_bytes + batch * kv_read,
            "experts_touched_fraction": frac}


def roofline(cfg: V4Config | str, gpu_name: str, context: int, batch: int = 1, fp4_experts: bool = False) -> dict:
    """Where one decode step sits on ``gpu_name``'s roofline, and its throughput per GPU."""
    cfg = _cfg(cfg)
    s = decode_step(cfg, context, batch)
    cls_peak = {"gemm": "fp8", "gemm_experts": "fp4" if (fp4_experts and cfg.is_v4) else "fp8",
                "bf16": "bf16", "fp8": "fp8", "fp4": "fp4"}
    t_compute = sum(v / peak_flops(gpu_name, cls_peak[c]) for c, v in s["flops_by_class"].items())
    t_memory = s["bytes"] / bandwidth(gpu_name)
    t = max(t_compute, t_memory)
    return {**s, "gpu": gpu_name, "intensity": s["flops"] / s["bytes"], "t_compute": t_compute,
            "t_memory": t_memory, "t_step": t, "bound": "compute" if t_compute >= t_memory else "memory",
            "achieved_flops": s["flops"] / t, "tokens_per_s": batch / t,
            # the FLOP rate this mix of precisions would reach if compute-bound (its own "roof")
            "mix_peak_flops": s["flops"] / t_compute}


def identify_gpu(device_name: str | None) -> str | None:
    """hardware.json key for a ``torch.cuda.get_device_name()`` string (its ``match`` substrings,
    case-insensitive), or None for a GPU the table does not know."""
    if not device_name:
        return None
    low = device_name.lower()
    for key, g in gpus().items():
        if any(m.lower() in low for m in g.get("match", [])):
            return key
    return None


def speedup(cfg: V4Config | str, context: int, batch: int, fast: str = "B200", slow: str = "H200",
            fp4_experts: bool = False) -> float:
    """tokens/s of ``fast`` over ``slow`` for one decode step (roofline, per GPU)."""
    return (roofline(cfg, fast, context, batch, fp4_experts)["tokens_per_s"]
            / roofline(cfg, slow, context, batch, fp4_experts)["tokens_per_s"])


def first_batch_reaching(ratio: float, cfg: V4Config | str, context: int, batches: Iterable[int],
                         fast: str = "B200", slow: str = "H200", fp4_experts: bool = False) -> int | None:
    """The smallest batch in ``batches`` at which ``fast``/``slow`` reaches ``ratio``; None if none does.

    Small batches are bandwidth-bound (the ratio is the bandwidth ratio); the ratio can only grow past
    it where the step turns compute-bound and the tensor-core rates decide."""
    for b in sorted(batches):
        if speedup(cfg, context, b, fast, slow, fp4_experts) >= ratio:
            return b
    return None
