"""Exercises of notebook 00 (the tour): KV cache and decode FLOPs, computed by `v4lab.accounting`."""
from __future__ import annotations

from v4lab import accounting, get_config
from v4lab.exercises import Answer, exercise

CROSSOVER_MODEL = "v3.2"
SHORT_CONTEXT = 4096


def indexer_crossover(name: str = CROSSOVER_MODEL) -> int:
    """The context at which the indexer's raw FLOPs per decoded token equal the weight GEMMs' (the indexer
    term is linear in the context, so one evaluation gives its slope)."""
    big = accounting.decode_flops(name, accounting.ONE_M)["groups_raw"]
    per_token = big["indexer_scores"] / accounting.ONE_M
    return round(big["gemm"] / per_token)


@exercise("00.indexer_crossover")
def _indexer_crossover() -> Answer:
    n = indexer_crossover()
    at_1m = accounting.decode_flops(CROSSOVER_MODEL, accounting.ONE_M)["groups_raw"]
    times = at_1m["indexer_scores"] / at_1m["gemm"]
    c = get_config(CROSSOVER_MODEL)
    return Answer(n, f"V3.2's indexer scores every cached token in every layer ({c.index_n_heads} heads x "
                     f"{c.index_head_dim} dims each), so its "
                     f"cost grows linearly and passes the {accounting.params('v3.2')['active'] / 1e9:.0f}B active "
                     f"parameters' GEMMs at about {n:,} tokens; at 1M it is {times:.0f}x them. "
                     "Within a factor 2 counts.",
                  rel_tol=0.5)


@exercise("00.kv_ratio_4k")
def _kv_ratio_4k() -> Answer:
    r = accounting.compare("v4-pro", "v3.2", SHORT_CONTEXT)["ratios"]["kv_cache_bytes"]
    return Answer(r, f"At {SHORT_CONTEXT} tokens V4-Pro still keeps a 128-entry window in every layer, which is a "
                     f"larger share of a short context, so the ratio is {r:.3f} rather than the ~0.10 of 1M; "
                     "beyond a few tens of thousands of tokens the compressed entries dominate. Within ±0.03 counts.",
                  abs_tol=0.03)


@exercise("00.v3_attention_share")
def _v3_attention_share() -> Answer:
    g = accounting.decode_flops("v3", accounting.ONE_M)["groups_raw"]
    share = g["core_attention"] / (g["core_attention"] + g["gemm"] + g["indexer_scores"])
    return Answer(share, f"V3's MLA attends every cached token with all 128 heads, so at 1M tokens attention is "
                         f"{100 * share:.1f}% of its raw decode FLOPs: the weights hardly matter any more. That is "
                         "the cost V3.2's top-k and V4's compression remove. Within ±0.05 counts.", abs_tol=0.05)


@exercise("00.flash_cache_gb")
def _flash_cache_gb() -> Answer:
    kv = accounting.kv_cache("v4-flash", accounting.ONE_M)
    gb, n = kv["total_bytes"] / 1e9, kv["layers_by_kind"]
    v32 = accounting.kv_cache("v3.2", accounting.ONE_M)["total_bytes"] / 1e9
    return Answer(gb, f"V4-Flash caches {gb:.2f} GB for one 1M-token sequence ({sum(n.values())} layers: a window "
                      f"each, one {accounting.entry_bytes('v4-flash')}-byte entry per 4 tokens plus a "
                      f"{accounting.index_key_bytes('v4-flash')}-byte FP4 index key in its {n.get('csa', 0)} CSA "
                      f"layers, one entry per 128 tokens in its {n.get('hca', 0)} HCA layers); V3.2 needs "
                      f"{v32:.1f} GB. Within 25% counts.", rel_tol=0.25)
