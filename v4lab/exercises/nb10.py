"""Exercises of notebook 10 (decode, step by step): what the cache holds and what one token reads.

The first two run the notebook model's own cached decode (``v4lab.viz.decode.run_text``, i.e.
``v4lab.trace.decode_trace`` on whichever model ``trained_model()`` returns); the last two count bytes at
release scale from the configs (``v4lab.accounting``, ``v4lab.trace.decode_bytes``).
"""
from __future__ import annotations

from v4lab import accounting, trace
from v4lab.exercises import Answer, exercise
from v4lab.viz import decode as decode_viz
from v4lab.viz import trained

TOKEN = 100                 # inside the default text for every tokenizer the notebook models use (>= 125 tokens)
SHORT = 8192                # a short context for the cache ratio
LONG = accounting.ONE_M
# long enough for the indexer's top-k to fill in every notebook model (lab-v4: t = 131 of ~365 tokens)
LONG_TEXT = "\n\n".join(trained.SAMPLE_TEXTS.values())


def first_layer(run: decode_viz.Run, kind: str) -> int:
    return next(i for i in range(run.n_layers) if run.records[0]["layers"][i]["kind"] == kind)


@exercise("10.indexer_drops")
def indexer_drops() -> Answer:
    run = decode_viz.run_text(LONG_TEXT)
    li = first_layer(run, "csa")
    t = next((r["pos"] for r in run.records
              if len(r["layers"][li]["visible"]["compressed"]) < r["layers"][li]["n_visible"]), None)
    if t is None:
        raise ValueError(f"10.indexer_drops: LONG_TEXT ({run.n_tokens} tokens) never fills the indexer's top-k")
    rec = run.records[t]["layers"][li]
    return Answer(t, f"from token {t} on, layer {li} holds {rec['n_visible']} complete entries but reads only "
                     f"{len(rec['visible']['compressed'])}: the indexer's top-k. Before that every entry is read; "
                     "after it the read per token stays flat while the cache keeps growing.")


@exercise("10.hca_open_block")
def hca_open_block() -> Answer:
    run = decode_viz.run_text(decode_viz.DEFAULT_TEXT)
    li = first_layer(run, "hca")
    rec = run.records[TOKEN]["layers"][li]
    n = len(rec["pending"])
    return Answer(n, f"after token {TOKEN}, HCA layer {li} has {len(rec['entries'])} compressed entr"
                     f"{'y' if len(rec['entries']) == 1 else 'ies'} and {n} tokens waiting in its open block "
                     f"(m = {rec['ratio']}): tokens {rec['pending'][0] if n else '-'}..{TOKEN}. Until the "
                     "block closes, later queries see them only through the sliding window.")


def kv_percent(model: str, other: str, context: int) -> float:
    return 100 * accounting.kv_cache(model, context)["total_bytes"] / accounting.kv_cache(other, context)["total_bytes"]


@exercise("10.kv_percent_short")
def kv_percent_short() -> Answer:
    short, long = kv_percent("v4-flash", "v3.2", SHORT), kv_percent("v4-flash", "v3.2", LONG)
    return Answer(short, f"V4-Flash stores {short:.3g}% of V3.2's cache at {SHORT // 1024}K tokens, against "
                         f"{long:.3g}% at 1M: the sliding-window ring is a fixed cost per layer, a larger share of a "
                         "short cache. Within 5 %.", rel_tol=0.05)


@exercise("10.kv_share_of_read")
def kv_share_of_read() -> Answer:
    d = trace.decode_bytes("v4-pro", LONG)
    share = d["kv_total"] / d["total"]
    v32 = trace.decode_bytes("v3.2", LONG)
    return Answer(share, f"decoding one V4-Pro token at 1M context reads {d['total'] / 1e9:.3g} GB, of which "
                         f"{d['kv_total'] / 1e9:.3g} GB ({share:.1%}) is KV cache; V3.2 reads "
                         f"{v32['kv_total'] / 1e9:.3g} GB of KV ({v32['kv_total'] / v32['total']:.1%}), most of "
                         "it indexer keys. At batch 1 the weights dominate; a batch shares the weights but not "
                         "the KV. Within ±0.01.", abs_tol=0.01)
