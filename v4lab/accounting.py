"""Parameters, KV cache and decode FLOPs of a DeepSeek model, computed from its config alone.

Nothing here allocates a weight: every number is a product of config keys, written out so it can be
checked against the spec (docs/design/v4-attention.md §3.10, §4, §5; docs/design/v4-moe-mhc-fp4.md §1, §8).

Conventions (each one chosen so the published headline figures reproduce; see the tests):
- ``total`` counts every stored parameter of the backbone, embedding and head included, and EXCLUDES the
  MTP module. V3's "671B" is this count (its checkpoint holds 671B + ~11.5B MTP weights), and the V4
  figures reproduce the same way. ``total_with_mtp`` adds it back.
- ``active`` counts the parameters that take part in multiply-adds for one token: all K routed experts
  plus everything dense, EXCLUDING the embedding table (a single row is read, no FLOPs) and MTP.
  ``active_with_embedding`` adds the table back. V3's 37B lands within 1.5% either way; V4-Flash's 13B
  only without the table (13.3B vs 13.8B), so the FLOP-based reading is the one used.
- ``hash_table`` (``ffn.gate.tid2eid``, integer expert ids in hash-routed layers) is a buffer, not a
  parameter, and is reported apart.
- In-module RMSNorm gains (``q_norm``, ``kv_norm``, compressor/indexer norms) belong to their module;
  the ``norms`` component holds ``attn_norm``, ``ffn_norm`` and the final ``norm``.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
import sys
from typing import Any, Callable

from v4lab.config import V4Config, get_config

COMPONENTS = ("embedding", "attention", "compressor", "indexer", "mhc", "router", "routed_experts",
              "shared_expert", "dense_ffn", "norms", "head", "mtp")
ONE_M = 2 ** 20  # "1M tokens" in the paper's accounting is 2^20 (docs/design/v4-attention.md §5)


ConfigLike = V4Config | str     # a config, or the name of a preset ("v4-flash", "v3.2", ...)


def _cfg(c: ConfigLike) -> V4Config:
    return c if isinstance(c, V4Config) else get_config(c)


def _zeros() -> dict:
    return {k: 0 for k in COMPONENTS}


# ---------------------------------------------------------------------------------------- parameters
def _v4_attention(cfg: V4Config, ratio: int) -> dict:
    """One V4 attention block with compress ratio ``ratio`` (0 window, 4 CSA, 128 HCA)."""
    d, qr, H, hd = cfg.hidden_size, cfg.q_lora_rank, cfg.num_attention_heads, cfg.head_dim
    g, orank = cfg.o_groups, cfg.o_lora_rank
    attn = (d * qr + qr                      # wq_a, q_norm
            + qr * H * hd                     # wq_b
            + d * hd + hd                     # wkv (one K=V head), kv_norm
            + (H * hd // g) * g * orank       # wo_a: g blocks of [orank, H*hd/g], stored [g*orank, H*hd/g]
            + g * orank * d                   # wo_b
            + H)                              # attn_sink
    comp = idx = 0
    if ratio:
        coff = 2 if ratio == 4 else 1         # CSA pools overlapping windows: two halves per entry
        comp = 2 * coff * hd * d + ratio * coff * hd + hd      # wkv, wgate, ape, norm
    if ratio == 4:
        nI, dI = cfg.index_n_heads, cfg.index_head_dim
        idx = (qr * nI * dI + d * nI                            # wq_b (from the query latent), weights_proj
               + 2 * 2 * dI * d + 4 * 2 * dI + dI)              # its own CSA compressor: wkv, wgate, ape, norm
    return {"attention": attn, "compressor": comp, "indexer": idx}


def _mla_attention(cfg: V4Config) -> dict:
    """One V3/V3.2 MLA block (+ the V3.2 DSA indexer)."""
    d, qr, H = cfg.hidden_size, cfg.q_lora_rank, cfg.num_attention_heads
    nope, rope, vd, kvr = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    attn = (d * qr + qr                      # wq_a, q_norm
            + qr * H * (nope + rope)          # wq_b
            + d * (kvr + rope) + kvr          # wkv_a (latent + shared rope key), kv_norm
            + kvr * H * (nope + vd)           # wkv_b
            + H * vd * d)                     # wo
    idx = 0
    if cfg.arch == "v3.2":
        nI, dI = cfg.index_n_heads, cfg.index_head_dim
        idx = qr * nI * dI + d * dI + 2 * dI + d * nI   # wq_b, wk, k_norm (LayerNorm: weight + bias), weights_proj
    return {"attention": attn, "compressor": 0, "indexer": idx}


def _ffn(cfg: V4Config, layer_id: int) -> tuple[dict, dict]:
    """(total, active) of the FFN part of layer ``layer_id`` (router, experts, dense FFN)."""
    d = cfg.hidden_size
    tot, act = _zeros(), _zeros()
    if cfg.is_dense_layer(layer_id):
        tot["dense_ffn"] = act["dense_ffn"] = 3 * d * cfg.intermediate_size    # w1, w2, w3
        return tot, act
    E, K, inter = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size
    expert = 3 * d * inter                                                    # w1, w2, w3
    # gate.weight is used in hash layers too (it gives the weights of the hashed experts); gate.bias
    # (aux-loss-free balancing) exists only in learned layers, tid2eid only in hash layers.
    router = E * d + (0 if cfg.is_hash_layer(layer_id) else E)
    tot["router"] = act["router"] = router
    tot["routed_experts"], act["routed_experts"] = E * expert, K * expert
    tot["shared_expert"] = act["shared_expert"] = cfg.n_shared_experts * expert
    return tot, act


def _mhc_layer(cfg: V4Config) -> int:
    if not cfg.is_v4:
        return 0
    n, d = cfg.hc_mult, cfg.hidden_size
    mix = (2 + n) * n                          # pre (n) + post (n) + comb (n*n) logits
    return 2 * (mix * n * d + mix + 3)         # hc_attn_{fn,base,scale} and hc_ffn_{fn,base,scale}


def _mhc_head(cfg: V4Config) -> int:
    n, d = cfg.hc_mult, cfg.hidden_size
    return (n * n * d + n + 1) if cfg.is_v4 else 0


def _layer(cfg: V4Config, layer_id: int) -> tuple[dict, dict]:
    """(total, active) by component of decoder layer ``layer_id`` (``num_hidden_layers`` = MTP block)."""
    attn = _v4_attention(cfg, cfg.compress_ratio(layer_id)) if cfg.is_v4 else _mla_attention(cfg)
    tot, act = _ffn(cfg, layer_id)
    for k, v in attn.items():
        tot[k] = act[k] = v
    tot["mhc"] = act["mhc"] = _mhc_layer(cfg)
    tot["norms"] = act["norms"] = 2 * cfg.hidden_size        # attn_norm, ffn_norm
    return tot, act


def _mtp(cfg: V4Config) -> tuple[int, int]:
    """(total, active) of all MTP modules; embedding and head are shared with the main model."""
    if cfg.num_nextn_predict_layers == 0:
        return 0, 0
    d = cfg.hidden_size
    tot, act = _layer(cfg, cfg.num_hidden_layers)
    if cfg.is_v4:
        extra = 2 * d * d + 3 * d + _mhc_head(cfg)           # e_proj, h_proj, enorm/hnorm/norm, hc_head_*
    else:
        extra = 2 * d * d + 3 * d                            # eh_proj [d, 2d], enorm, hnorm, shared_head.norm
    n = cfg.num_nextn_predict_layers
    return n * (sum(tot.values()) + extra), n * (sum(act.values()) + extra)


def params(cfg: ConfigLike) -> dict:
    """Total and activated parameters by component (see the module docstring for the conventions).

    Returns ``{"total": int, "active": int, "total_with_mtp", "active_with_mtp", "active_with_embedding",
    "hash_table": int, "by_component": {comp: total}, "active_by_component": {comp: active}}``.
    """
    cfg = _cfg(cfg)
    tot, act = _zeros(), _zeros()
    for i in range(cfg.num_hidden_layers):
        t, a = _layer(cfg, i)
        for k in COMPONENTS:
            tot[k] += t[k]
            act[k] += a[k]
    V, d = cfg.vocab_size, cfg.hidden_size
    tot["embedding"] = V * d
    act["embedding"] = 0                                   # a row lookup: no multiply-adds
    tot["head"] = 0 if cfg.tie_word_embeddings else V * d   # tied: stored once, as the embedding,
    act["head"] = V * d                                       # but the logits matmul runs either way
    tot["norms"] += d                                      # final norm
    act["norms"] += d
    tot["mhc"] += _mhc_head(cfg)
    act["mhc"] += _mhc_head(cfg)
    tot["mtp"], act["mtp"] = _mtp(cfg)
    total = sum(v for k, v in tot.items() if k != "mtp")
    active = sum(v for k, v in act.items() if k != "mtp")
    hash_table = sum(V * cfg.num_experts_per_tok for i in range(cfg.num_hidden_layers) if cfg.is_hash_layer(i))
    return {"total": total, "active": active, "total_with_mtp": total + tot["mtp"],
            "active_with_mtp": active + act["mtp"], "active_with_embedding": active + tot["embedding"],
            "hash_table": hash_table, "by_component": tot, "active_by_component": act}


# ---------------------------------------------------------------------------------------- KV cache
def _v4_entry(cfg: V4Config, include_scales: bool) -> tuple[int, str]:
    """Bytes of one main-branch KV entry (window or compressed): the non-RoPE dims FP8 E4M3 with one
    UE8M0 scale per 64 values, the RoPE dims BF16 (spec §4, OFF ``act_quant(kv[..., :-64], 64)``)."""
    nope, rope = cfg.head_dim - cfg.qk_rope_head_dim, cfg.qk_rope_head_dim
    scales = math.ceil(nope / 64) if include_scales else 0
    text = f"{nope} FP8 e4m3 + {rope} BF16" + (f" + {scales} UE8M0 scales" if scales else "")
    return nope + 2 * rope + scales, text


def _v4_index_key(cfg: V4Config, include_scales: bool) -> tuple[int, str]:
    """Bytes of one indexer key: FP4 E2M1 (two per byte) with one UE8M0 scale per 32 values."""
    dI = cfg.index_head_dim
    scales = math.ceil(dI / 32) if include_scales else 0
    return dI // 2 + scales, f"{dI} FP4 e2m1" + (f" + {scales} UE8M0 scales" if scales else "")


def entry_bytes(cfg: V4Config | str, include_scales: bool = True) -> int:
    """Bytes of one stored V4 KV entry (window or compressed) in the released format (see ``_v4_entry``)."""
    return _v4_entry(_cfg(cfg), include_scales)[0]


def index_key_bytes(cfg: V4Config | str, include_scales: bool = True) -> int:
    """Bytes of one stored V4 indexer key (FP4 + block-32 scales, see ``_v4_index_key``)."""
    return _v4_index_key(_cfg(cfg), include_scales)[0]


def kv_cache(cfg: ConfigLike, context: int = ONE_M, *, include_scales: bool = True) -> dict:
    """KV-cache bytes for one sequence of ``context`` tokens, by layer kind and by stored part.

    V4 (spec §5.2): every layer keeps its last ``sliding_window`` raw entries; a CSA layer adds one
    compressed entry and one indexer key per 4 tokens, an HCA layer one entry per 128 tokens (complete
    blocks only). V3.2 (FlashMLA FP8 sparse-MLA layout): 656 B latent (512 FP8 + 4 FP32 scales + 64 BF16)
    plus a 132 B indexer key (128 FP8 + 1 FP32 scale) per token per layer; V3 the same latent, no
    indexer. MTP layers are not counted (they serve speculative decoding). ``include_scales=False``
    drops scale bytes (V4: 576 + 64 B, the paper's "≈2% of GQA-8" format).
    """
    cfg = _cfg(cfg)
    N = _check_context(context)
    parts = []

    def part(name, kind, layers, entries, nbytes, precision):
        parts.append({"part": name, "kind": kind, "layers": layers, "entries_per_layer": entries,
                      "bytes_per_entry": nbytes, "precision": precision, "bytes": layers * entries * nbytes})

    kinds = cfg.layer_kinds
    if cfg.is_v4:
        eb, etext = _v4_entry(cfg, include_scales)
        ib, itext = _v4_index_key(cfg, include_scales)
        for kind, ratio in (("window", 0), ("csa", 4), ("hca", 128)):
            n = kinds.count(kind)
            if not n:
                continue
            part("window_kv", kind, n, min(cfg.sliding_window, N), eb, etext)
            if ratio:
                part("compressed_kv", kind, n, N // ratio, eb, etext)
            if ratio == 4:
                part("indexer_keys", kind, n, N // ratio, ib, itext)
    else:
        nope, rope = cfg.kv_lora_rank, cfg.qk_rope_head_dim
        sc = 4 * math.ceil(nope / 128) if include_scales else 0
        part("latent_kv", kinds[0], cfg.num_hidden_layers, N, nope + 2 * rope + sc,
             f"{nope} FP8 e4m3 + {rope} BF16" + (f" + {sc // 4} FP32 scales" if sc else ""))
        if cfg.arch == "v3.2":
            dI = cfg.index_head_dim
            isc = 4 * math.ceil(dI / 128) if include_scales else 0
            part("indexer_keys", kinds[0], cfg.num_hidden_layers, N, dI + isc,
                 f"{dI} FP8 e4m3" + (f" + {isc // 4} FP32 scale" if isc else ""))
    total = sum(p["bytes"] for p in parts)
    by_kind, by_part = {}, {}
    for p in parts:
        by_kind[p["kind"]] = by_kind.get(p["kind"], 0) + p["bytes"]
        by_part[p["part"]] = by_part.get(p["part"], 0) + p["bytes"]
    return {"context": N, "total_bytes": total, "bytes_per_token": total / N, "include_scales": include_scales,
            "layers_by_kind": {k: kinds.count(k) for k in dict.fromkeys(kinds)},
            "by_kind": by_kind, "by_part": by_part, "parts": parts}


def kv_cache_gqa(n_layers: int, context: int = ONE_M, *, n_kv_heads: int = 8, head_dim: int = 128,
                 bytes_per_elem: int = 2) -> dict:
    """A plain GQA baseline (default: BF16 GQA-8, head dim 128): K and V per KV head per layer."""
    for k, v in (("n_layers", n_layers), ("n_kv_heads", n_kv_heads), ("head_dim", head_dim),
                 ("bytes_per_elem", bytes_per_elem)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"kv_cache_gqa: {k} = {v!r}: must be a positive integer")
    N = _check_context(context)
    per_layer = 2 * n_kv_heads * head_dim * bytes_per_elem
    return {"context": N, "bytes_per_token_per_layer": per_layer, "bytes_per_token": per_layer * n_layers,
            "total_bytes": per_layer * n_layers * N}


def gqa8(cfg: ConfigLike, context: int = ONE_M) -> dict:
    """The paper's BF16 GQA-8 (head dim 128) baseline with ``cfg``'s layer count."""
    return kv_cache_gqa(_cfg(cfg).num_hidden_layers, context)


# ---------------------------------------------------------------------------------------- decode FLOPs
# Precision weighting to "equivalent FP8 FLOPs": a multiplier per precision class. The report does not
# spell out its weighting; scheme B is v4lab's fit, *calibrated to the published ratios* (27% / 10%),
# and is always shown beside the raw count (scheme A): BF16 core
# attention costs 2x (half the FP8 tensor-core rate), the FP4 x FP4 V4 indexer 0.5x, the FP8 V3.2
# indexer 1x, and all weight GEMMs 1x (FP8 weights; FP4 x FP8 expert GEMMs run at FP8 peak today).
SCHEME_LABELS = {"A": "raw FLOPs", "B": "FP8-equivalent, calibrated to the published ratios (v4lab's fit)",
                 "C": "FP8-equivalent, variant C", "D": "FP8-equivalent, variant D", "custom": "custom weighting"}
WEIGHTINGS = {
    "A": {"gemm": 1.0, "bf16": 1.0, "fp8": 1.0, "fp4": 1.0},   # raw FLOPs
    "B": {"gemm": 1.0, "bf16": 2.0, "fp8": 1.0, "fp4": 0.5},   # default: calibrated to the published ratios
    "C": {"gemm": 1.0, "bf16": 1.0, "fp8": 1.0, "fp4": 0.5},
    "D": {"gemm": 1.0, "bf16": 2.0, "fp8": 1.0, "fp4": 1.0},
}


def _weighting(weights) -> tuple[str, dict]:
    if isinstance(weights, str):
        if weights not in WEIGHTINGS:
            raise ValueError(f"weights = {weights!r}: must be one of {', '.join(WEIGHTINGS)} or a dict")
        return weights, dict(WEIGHTINGS[weights])
    if not isinstance(weights, dict) or set(weights) != set(WEIGHTINGS["A"]) or not all(
            isinstance(v, (int, float)) and v >= 0 for v in weights.values()):
        raise ValueError(f"weights = {weights!r}: a dict needs non-negative numbers for exactly "
                         f"{sorted(WEIGHTINGS['A'])}")
    return "custom", dict(weights)


def decode_flops(cfg: ConfigLike, context: int = ONE_M, *, weights: str = "B") -> dict:
    """FLOPs to decode one token with ``context`` tokens already cached (2 FLOPs per multiply-add).

    Terms: weight GEMMs = 2 x active parameters by component (embedding excluded, head included, MTP
    excluded); core attention = per head per attended entry QK + AV; indexer scores = per index head
    per scored key a dot product + the weighted ReLU sum. Each term carries a precision class and is
    multiplied by ``WEIGHTINGS[weights][class]`` (or a dict of the same keys).
    """
    cfg = _cfg(cfg)
    N = _check_context(context)
    scheme, w = _weighting(weights)
    p = params(cfg)
    # 2 x active parameters per component (spec §5.4). The few norm gains and biases in there are not
    # GEMM weights, but they are ~1e-5 of the total, so the spec's convention is kept as is.
    raw = {f"gemm_{k}": 2 * v for k, v in p["active_by_component"].items() if k not in ("embedding", "mtp")}
    prec = {k: "gemm" for k in raw}
    core = index = 0
    H = cfg.num_attention_heads
    if cfg.is_v4:
        per_entry = 2 * cfg.head_dim + 2 * cfg.head_dim                  # q.k and p.v, K = V of width head_dim
        per_key = 2 * cfg.index_head_dim + 2                               # q_h.k, then w_h * relu(.) summed
        for i in range(cfg.num_hidden_layers):
            r = cfg.compress_ratio(i)
            entries = min(cfg.sliding_window, N)
            if r == 4:
                entries += min(cfg.index_topk, N // 4)
                index += cfg.index_n_heads * per_key * (N // 4)            # every compressed key is scored
            elif r == 128:
                entries += N // 128                                        # HCA: dense over all entries
            core += H * entries * per_entry
        index_prec = "fp4"                                                 # FP4 q and k after Hadamard
    else:
        lat = cfg.kv_lora_rank + cfg.qk_rope_head_dim                      # absorbed MLA: q.k over 576,
        per_entry = 2 * lat + 2 * cfg.kv_lora_rank                         # p.v over the 512 latent
        if cfg.arch == "v3.2":
            core = cfg.num_hidden_layers * H * min(cfg.index_topk, N) * per_entry
            index = cfg.num_hidden_layers * cfg.index_n_heads * (2 * cfg.index_head_dim + 2) * N
        else:
            core = cfg.num_hidden_layers * H * N * per_entry
        index_prec = "fp8"
    raw["core_attention"], prec["core_attention"] = core, "bf16"
    raw["indexer_scores"], prec["indexer_scores"] = index, index_prec
    weighted = {k: v * w[prec[k]] for k, v in raw.items()}
    gemm = sum(v for k, v in raw.items() if k.startswith("gemm_"))
    return {"context": N, "scheme": scheme, "weights": w, "precision": prec,
            "raw": raw, "weighted": weighted, "total_raw": sum(raw.values()), "total": sum(weighted.values()),
            "groups_raw": {"gemm": gemm, "core_attention": core, "indexer_scores": index}}


# ---------------------------------------------------------------------------------------- decode bytes
def kv_bytes_read(cfg: V4Config | str, context: int) -> dict:
    """KV-cache bytes one decode token reads at ``context`` cached tokens, by part (the formats of ``kv_cache``).

    V4, per layer: the window (min(w, N) entries); CSA: its top-k compressed entries and every indexer key
    (the indexer scores all of them); HCA: every compressed entry. V3.2, per layer: the top-2048 latents and
    every indexer key; V3: every latent."""
    cfg = _cfg(cfg)
    N = _check_context(context)
    if not cfg.is_v4:
        per = {q["part"]: q["bytes_per_entry"] for q in kv_cache(cfg, 1)["parts"]}
        L = cfg.num_hidden_layers
        lat = min(cfg.index_topk, N) if cfg.arch == "v3.2" else N
        out = {"latents": L * lat * per["latent_kv"]}
        if cfg.arch == "v3.2":
            out["indexer_keys"] = L * N * per["indexer_keys"]
        return out
    eb, kb = entry_bytes(cfg), index_key_bytes(cfg)
    out = {"window": 0, "compressed_entries": 0, "indexer_keys": 0}
    for i in range(cfg.num_hidden_layers):
        r = cfg.compress_ratio(i)
        out["window"] += min(cfg.sliding_window, N) * eb
        if r == 4:
            out["compressed_entries"] += min(cfg.index_topk, N // 4) * eb
            out["indexer_keys"] += (N // 4) * kb
        elif r == 128:
            out["compressed_entries"] += (N // 128) * eb
    return out


# ---------------------------------------------------------------------------------------- MoE expansion
def moe_expansion(v3_cfg: ConfigLike = "v3", v4pro_cfg: ConfigLike = "v4-pro") -> dict:
    """Split the routed-expert growth between two models into four multiplicative factors: more experts
    per layer, wider experts (moe_intermediate_size), a wider model (hidden_size) and more MoE layers.

    routed = n_moe_layers x n_experts x 3 x hidden x inter is a product, so log(ratio) splits exactly
    into a sum of per-factor logs (``log_share``). For additive parameter counts we use the Shapley
    value of the product (each factor's growth averaged over all orders in which it could be applied):
    it sums exactly to the growth and does not depend on an arbitrary order. ``rest`` is everything
    that is not a routed expert (attention, embedding, ...).
    """
    a, b = _cfg(v3_cfg), _cfg(v4pro_cfg)

    def factors(c):
        return {"experts": c.n_routed_experts, "expert_width": c.moe_intermediate_size,
                "hidden_size": c.hidden_size,
                "moe_layers": sum(not c.is_dense_layer(i) for i in range(c.num_hidden_layers))}

    fa, fb = factors(a), factors(b)
    pa, pb = params(a), params(b)
    ra, rb = pa["by_component"]["routed_experts"], pb["by_component"]["routed_experts"]
    names = list(fa)
    ratio = {k: fb[k] / fa[k] for k in names}
    total_log = math.log(rb / ra)
    log_share = {k: math.log(ratio[k]) / total_log for k in names}

    shap = {k: 0.0 for k in names}
    orders = list(itertools.permutations(names))
    for order in orders:
        cur = ra
        for k in order:
            nxt = cur * ratio[k]
            shap[k] += (nxt - cur) / len(orders)
            cur = nxt
    growth_total = pb["total"] - pa["total"]
    return {"from": a.name, "to": b.name, "factors_from": fa, "factors_to": fb, "factor_ratio": ratio,
            "routed_from": ra, "routed_to": rb, "routed_growth": rb - ra, "log_share": log_share,
            "shapley_params": shap, "total_from": pa["total"], "total_to": pb["total"],
            "total_growth": growth_total, "rest_growth": growth_total - (rb - ra),
            "routed_share_of_growth": (rb - ra) / growth_total}


# ---------------------------------------------------------------------------------------- summary
def summary(cfg: ConfigLike, context: int = ONE_M, *, weights: str = "B", include_scales: bool = True) -> dict:
    """The headline figures of one model at ``context`` tokens, with every breakdown."""
    cfg = _cfg(cfg)
    p, kv = params(cfg), kv_cache(cfg, context, include_scales=include_scales)
    fl = decode_flops(cfg, context, weights=weights)
    g = gqa8(cfg, context)
    return {"name": cfg.name, "model_type": cfg.model_type, "context": kv["context"],
            "total_params": p["total"], "active_params": p["active"],
            "kv_cache_bytes": kv["total_bytes"], "kv_cache_bytes_per_token": kv["bytes_per_token"],
            "decode_flops": fl["total"], "decode_flops_raw": fl["total_raw"],
            "kv_cache_gqa8_bytes": g["total_bytes"], "kv_vs_gqa8": kv["total_bytes"] / g["total_bytes"],
            "params": p, "kv_cache": kv, "flops": fl}


HEADLINE = ("total_params", "active_params", "kv_cache_bytes", "decode_flops")


def compare(a: ConfigLike, b: ConfigLike, context: int = ONE_M, **kw: Any) -> dict:
    """Both summaries and ``ratios`` a/b of the four headline figures."""
    sa, sb = summary(a, context, **kw), summary(b, context, **kw)
    return {"context": sa["context"], "a": sa, "b": sb, "ratios": {k: sa[k] / sb[k] for k in HEADLINE}}


# ---------------------------------------------------------------------------------------- CLI
_SUFFIX = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30}


def parse_context(text: str | int) -> int:
    """``1048576``, ``1M`` (= 2^20), ``128K`` (= 131072), ``1.5M``; must be a positive whole count."""
    if isinstance(text, int) and not isinstance(text, bool):
        return _check_context(text)
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([kKmMgG]?)\s*", str(text))
    if not m:
        raise ValueError(f"--context {text!r}: must be a positive token count like 131072, 128K or 1M")
    value = float(m.group(1)) * _SUFFIX[m.group(2).upper()]
    if not value.is_integer():
        raise ValueError(f"--context {text!r}: must be a whole number of tokens")
    return _check_context(int(value), str(text))


def _check_context(n, shown=None) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ValueError(f"--context {shown if shown is not None else n!r}: must be a positive integer")
    return n


def _load(spec: str) -> V4Config:
    try:
        return get_config(spec)
    except ValueError:
        raise
    except (OSError, TypeError, KeyError, AttributeError) as e:   # anything a hand-written file can provoke
        raise ValueError(f"config {spec!r}: {e}") from None


def _h(n: float, unit: str = "") -> str:
    for s, f in (("T", 1e12), ("G" if unit else "B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= f:
            return f"{n / f:.2f} {s}{unit}".rstrip()
    return f"{n:.0f} {unit}".rstrip()


def _ctx(n: int) -> str:
    for s, f in (("M", 2 ** 20), ("K", 2 ** 10)):
        if n % f == 0:
            return f"{n // f}{s}"
    return str(n)


def format_summary(s: dict) -> str:
    p, kv, fl = s["params"], s["kv_cache"], s["flops"]
    out = [f"{s['name']} ({s['model_type']}), context {s['context']:,} tokens ({_ctx(s['context'])})", "",
           f"{'parameters':<18}{'total':>12}{'active':>12}"]
    for k in COMPONENTS:
        t, a = p["by_component"][k], p["active_by_component"][k]
        if t:
            note = "  (not in totals)" if k == "mtp" else ""
            out.append(f"  {k:<16}{_h(t):>12}{_h(a) if a else '-':>12}{note}")
    out.append(f"  {'total':<16}{_h(p['total']):>12}{_h(p['active']):>12}")
    out += ["", f"KV cache: {_h(s['kv_cache_bytes'], 'B')} ({s['kv_cache_bytes_per_token']:,.1f} B/token; "
                f"{100 * s['kv_vs_gqa8']:.2f}% of BF16 GQA-8)",
            f"  {'part':<14}{'kind':<8}{'layers':>7}{'entries':>10}{'B/entry':>9}{'bytes':>12}  precision"]
    for q in kv["parts"]:
        out.append(f"  {q['part']:<14}{q['kind']:<8}{q['layers']:>7}{q['entries_per_layer']:>10,}"
                   f"{q['bytes_per_entry']:>9}{_h(q['bytes'], 'B'):>12}  {q['precision']}")
    out += ["", f"decode FLOPs per token (scheme {fl['scheme']}, {SCHEME_LABELS.get(fl['scheme'], fl['scheme'])}: "
                f"weights {fl['weights']}): {_h(s['decode_flops'], 'FLOP')} weighted, "
                f"{_h(fl['total_raw'], 'FLOP')} raw",
            f"  {'term':<24}{'precision':<10}{'raw':>14}{'weighted':>14}"]
    for k, v in fl["raw"].items():
        if v:
            out.append(f"  {k:<24}{fl['precision'][k]:<10}{_h(v, 'FLOP'):>14}{_h(fl['weighted'][k], 'FLOP'):>14}")
    return "\n".join(out)


def format_compare(c: dict) -> str:
    a, b, r = c["a"], c["b"], c["ratios"]
    rows = [("total parameters", _h(a["total_params"]), _h(b["total_params"]), f"{100 * r['total_params']:.1f}%"),
            ("active parameters", _h(a["active_params"]), _h(b["active_params"]), f"{100 * r['active_params']:.1f}%"),
            (f"KV cache @ {_ctx(c['context'])}", _h(a["kv_cache_bytes"], "B"), _h(b["kv_cache_bytes"], "B"),
             f"{100 * r['kv_cache_bytes']:.1f}%"),
            (f"KV cache vs BF16 GQA-8 @ {_ctx(c['context'])}", f"{100 * a['kv_vs_gqa8']:.2f}%",
             f"{100 * b['kv_vs_gqa8']:.2f}%", ""),
            (f"decode FLOPs/token @ {_ctx(c['context'])} (scheme {a['flops']['scheme']}: "
             f"{SCHEME_LABELS.get(a['flops']['scheme'], a['flops']['scheme'])})",
             _h(a["decode_flops"], "FLOP"), _h(b["decode_flops"], "FLOP"), f"{100 * r['decode_flops']:.1f}%"),
            (f"decode FLOPs/token @ {_ctx(c['context'])} (raw count)", _h(a["decode_flops_raw"], "FLOP"),
             _h(b["decode_flops_raw"], "FLOP"), f"{100 * a['decode_flops_raw'] / b['decode_flops_raw']:.1f}%")]
    out = [f"| | {a['name']} | {b['name']} | {a['name']} / {b['name']} |", "|---|---:|---:|---:|"]
    out += [f"| {n} | {x} | {y} | {q} |" for n, x, y, q in rows]
    return "\n".join(out)


def cli(cmd: str, argv: list[str], parser_cls: type[argparse.ArgumentParser] = argparse.ArgumentParser,
        differ: Callable[[V4Config, V4Config], tuple[dict, str]] | None = None) -> int:
    """``v4lab info`` and ``v4lab compare``; bad input raises ValueError (the caller prints one line).

    differ: ``v4lab.diff.diff_report`` for ``compare --diff`` (passed in: diff builds modules, which sit
    above this module)."""
    p = parser_cls(prog=f"v4lab {cmd}")
    if cmd == "info":
        p.add_argument("config", help="preset (v4-flash, v4-pro, v3, v3.2, tiny) or a config.json path")
    else:
        p.add_argument("a")
        p.add_argument("b")
    p.add_argument("--context", default=str(ONE_M), help="tokens: an integer or 128K / 1M (powers of 2)")
    p.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    if cmd == "compare":
        p.add_argument("--diff", action="store_true", help="also what changed from A to B: config keys, one "
                                                           "block's parameter shapes, the parameter delta by change")
    args = p.parse_args(argv)
    context = parse_context(args.context)
    cfgs = [_load(args.config)] if cmd == "info" else [_load(args.a), _load(args.b)]
    # A context no model of the command can hold has no meaningful cost. (compare may extrapolate the
    # shorter model to the longer one's context, as the report does for V3.2 at 1M.)
    longest = max(cfgs, key=lambda c: c.max_position_embeddings)
    if context > longest.max_position_embeddings:
        raise ValueError(f"--context = {args.context!r}: {context} tokens is more than {longest.name}'s "
                         f"max_position_embeddings ({longest.max_position_embeddings})")
    if cmd == "info":
        res = summary(cfgs[0], context)
        text = json.dumps(res) if args.json else format_summary(res)
    else:
        a, b = cfgs
        res = compare(a, b, context)
        text = json.dumps(res) if args.json else format_compare(res)
        if args.diff:
            if differ is None:
                raise ValueError("--diff: this entry point was built without v4lab.diff (use the v4lab command)")
            d, d_text = differ(a, b)
            text = json.dumps({**res, "diff": d}) if args.json else text + "\n\n" + d_text
    try:
        print(text, flush=True)
    except BrokenPipeError:  # `v4lab info ... | head`: the reader left, which is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


# ---------------------------------------------------------------------------------------- expert parallelism
# Bytes per element of a dispatched/combined row. FP8 rows carry one UE8M0 scale byte per 128 values
# (v4lab.expert_parallel.fp8_pack; DeepSeek-V3 report §3.3.3: FP8 dispatch, BF16 combine).
EP_DTYPES = {"fp32": 4, "bf16": 2, "fp8": 1}
EP_SCALE_BLOCK = 128


def ep_message_bytes(rows: int, hidden: int, dtype: str = "bf16") -> int:
    """Bytes of ``rows`` token rows of width ``hidden`` in ``dtype`` (fp32, bf16, or fp8 + scales)."""
    if dtype not in EP_DTYPES:
        raise ValueError(f"dtype = {dtype!r}: must be one of {', '.join(EP_DTYPES)}")
    scales = hidden // EP_SCALE_BLOCK if dtype == "fp8" else 0
    return int(rows) * (hidden * EP_DTYPES[dtype] + scales)


def ep_all_to_all(cfg: ConfigLike, ep_size: int, tokens: int = 1, *, dispatch: str = "fp8",
                  combine: str = "bf16") -> dict:
    """All-to-all bytes of expert parallelism for ``tokens`` tokens (per rank, e.g. one decode token).

    Each token is sent once per routed expert (tokens x top-k rows; no de-duplication of two experts on
    one rank), dispatch in ``dispatch`` and combine back in ``combine``. ``upper`` counts every row;
    ``remote`` only those leaving the rank, (ep-1)/ep of them when routing is uniform over ranks (a
    balanced router's expectation). Per layer, and over the model's MoE layers (MTP excluded)."""
    cfg = _cfg(cfg)
    E, K, d = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.hidden_size
    if isinstance(ep_size, bool) or not isinstance(ep_size, int) or ep_size < 1 or E % ep_size:
        raise ValueError(f"ep_size = {ep_size!r}: must be a positive integer dividing n_routed_experts = {E}")
    rows = tokens * K
    layers = sum(not cfg.is_dense_layer(i) for i in range(cfg.num_hidden_layers))
    upper = {"dispatch": ep_message_bytes(rows, d, dispatch), "combine": ep_message_bytes(rows, d, combine)}
    frac = (ep_size - 1) / ep_size
    remote = {k: v * frac for k, v in upper.items()}
    return {"name": cfg.name, "ep_size": ep_size, "tokens": tokens, "topk": K, "hidden": d,
            "experts_per_rank": E // ep_size, "moe_layers": layers, "dispatch_dtype": dispatch,
            "combine_dtype": combine, "upper_per_layer": upper, "remote_per_layer": remote,
            "remote_per_layer_total": sum(remote.values()),
            "remote_all_layers_total": layers * sum(remote.values())}
