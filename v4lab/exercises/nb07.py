"""Exercises of notebook 07 (the whole tiny V4, trained).

Each answer runs whichever model :func:`v4lab.viz.trained.trained_model` returns (the trained checkpoint
under ``data/``, ``$V4LAB_WEIGHTS``, or the synthetic stand-in), so nothing here assumes one model's
numbers: routes from ``v4lab.viz.moe.route_text``, attention records from ``v4lab.viz.attention.run_text``
(``Attention.inspect``), predictions from ``v4lab.viz.tiny.MTPRun``.
"""
from __future__ import annotations

from collections import Counter

from v4lab.exercises import Answer, exercise
from v4lab.viz import attention as attn_viz
from v4lab.viz import moe as moe_viz
from v4lab.viz import tiny, trained

COUNTING = "numbers"      # trained.SAMPLE_TEXTS key: "1 2 3 ... 64"
QUERY = 100               # inside the default text for every tokenizer the notebook models use (>= 125 tokens)


@exercise("07.counting_accuracy")
def counting_accuracy() -> Answer:
    run = tiny.MTPRun(trained.SAMPLE_TEXTS[COUNTING])
    learned = ("did not learn to continue it: it learned what its training text looks like, and counting is "
               "not much of it" if run.main_acc < 0.5 else "picked the pattern up from its training text")
    return Answer(run.main_acc, f"on the counting text the main head's top-1 is right for {run.main_acc:.1%} of "
                                f"{run.n} positions (MTP for t+2: {run.mtp_acc:.1%}). A sequence any person "
                                f"continues is only as easy as the corpus made it: this model {learned}. "
                                "Within ±0.1.", abs_tol=0.1)


def most_frequent_token(routes: dict) -> tuple[str, list[int]]:
    """The most frequent token of a routed text and its positions."""
    tok, _ = Counter(routes["tokens"]).most_common(1)[0]
    return tok, [i for i, t in enumerate(routes["tokens"]) if t == tok]


def expert_sets(routes: dict, layer: int, positions: list[int]) -> set[tuple[int, ...]]:
    """The distinct expert sets (sorted top-k) a layer gives the tokens at ``positions``."""
    r = next(r for r in routes["layers"] if r["layer"] == layer)
    return {tuple(sorted(r["idx"][p].tolist())) for p in positions}


@exercise("07.repeat_sets")
def repeat_sets() -> Answer:
    routes = moe_viz.route_text(tiny.DEFAULT_TEXT)
    tok, pos = most_frequent_token(routes)
    layer = moe_viz.learned_layers(routes)[0]
    n = len(expert_sets(routes, layer, pos))
    hashed = [r["layer"] for r in routes["layers"] if r["hash"]]
    hash_n = len(expert_sets(routes, hashed[0], pos)) if hashed else None
    return Answer(n, f"{tok!r} occurs {len(pos)} times; layer {layer} (learned router) sends it to {n} different "
                     f"expert set(s)" + (f", the hash layer {hashed[0]} to {hash_n}" if hashed else "") +
                     ". A learned router reads the hidden state, which carries the context, so the same token can "
                     "move; how much it moves is what a trained router learned.")


@exercise("07.csa_reads")
def csa_reads() -> Answer:
    run = attn_viz.run_text(tiny.DEFAULT_TEXT)
    layer = run.kinds.index("csa")
    n = int((run.layers[layer]["compressed_idx"][QUERY] >= 0).sum())
    m, complete = run.ratios[layer], (QUERY + 1) // run.ratios[layer]
    kept = ("only the indexer's top-k of them" if n < complete else
            "all of them: the indexer's top-k is not full yet")
    return Answer(n, f"query {QUERY} of layer {layer} reads {n} compressed entries: {complete} blocks of {m} tokens "
                     f"are complete, and it reads {kept} (plus the raw sliding window).")


def sink_share(query: int, kind: str = "csa") -> float:
    """The sink's attention mass at ``query`` in the first layer of ``kind``, averaged over heads."""
    run = attn_viz.run_text(tiny.DEFAULT_TEXT)
    return float(run.layers[run.kinds.index(kind)]["sink"][query].float().mean())


@exercise("07.sink_at_start")
def sink_at_start() -> Answer:
    first, later = sink_share(0), sink_share(QUERY)
    return Answer(first > later, f"the sink takes {first:.3f} of the mass at query 0 and {later:.3f} at query "
                                 f"{QUERY} (first CSA layer, mean over heads). The sink's logit competes in the "
                                 "softmax with every key the query sees: one at query 0, a full window and the "
                                 "selected compressed entries later on.")
