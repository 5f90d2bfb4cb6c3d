"""Decode, step by step: what each layer's KV cache holds as tokens arrive, and what the next token reads.

:func:`decode_trace` runs the model's own cached decode (``V4Model`` with a ``ModelCache``; the
``Attention`` cache code, nothing re-implemented) and returns one record per step ``t`` (after token t
was fed, i.e. with t + 1 tokens cached)::

    {"pos": t, "token": id, "cache_bytes": int,
     "layers": [{"layer": i, "kind": "window" | "csa" | "hca", "ratio": m, "cache_bytes": int,
                 "bytes": {"window": .., "entries": .., "index_keys": ..},
                 "window_slots": [position held by ring slot s, −1 = empty],
                 "pending": [positions in the compressor's open block (not readable yet)],
                 "entries": [(first, last) token span of each stored compressed entry],
                 "new_entry": True when a block closed at this step,
                 "n_visible": ⌊(t+1)/m⌋ entries the query may read (0 for window layers),
                 "index_keys": indexer keys stored (CSA),
                 "visible": {"window": [positions], "compressed": [entry ids], "sink": True}}, ...]}

``visible`` is what token t's query attended in that layer (read back from the forward through
``model.new_cache(1, record=True)``): its raw window, the indexer's top-k picks (CSA) or every visible
entry (HCA), and the sink. A CSA entry's span is 2m tokens (it also pools the window before its own).

``cache_bytes`` counts the released storage format (``v4lab.accounting.entry_bytes``: non-RoPE dims
FP8 + one UE8M0 scale per 64, RoPE dims BF16; indexer keys FP4 + a scale per 32) of what the cache holds:
ring slots written, compressed entries, indexer keys. It equals ``accounting.kv_cache(cfg, t + 1)`` at
every step (tests). Not counted, as in the accounting: the compressor's open-block buffer (raw FP32
projections of at most 2m tokens per layer, a fixed-size state) and the MTP block's cache.

``chunk`` = tokens per cached forward call. ``chunk=1`` (default) is the real decode: every per-step
number is read from the cache after that step. A larger chunk runs the same cache code on several
tokens per call (a chunked prefill, ~30x faster); the cache then shows its state only at chunk ends, so
the per-step counts inside a chunk come from the ring/compressor rules (:func:`step_counts`), which are
checked against the real cache at every chunk end, and tests compare the two modes record for record.
"""
from __future__ import annotations

import torch

from v4lab import accounting
from v4lab.attention import ring_positions
from v4lab.compressor import entry_span


def step_counts(t: int, ratio: int, kind: str) -> dict:
    """What a layer's cache holds after token t by the rules alone: open-block tokens, entries, keys."""
    if not ratio:
        return {"pending": 0, "entries": 0, "index_keys": 0}
    n = (t + 1) // ratio
    return {"pending": (t + 1) % ratio, "entries": n, "index_keys": n if kind == "csa" else 0}


def _read_counts(c) -> dict:
    """The same numbers read from a layer's real ``AttentionCache``."""
    if c.kind == "window":
        return {"pending": 0, "entries": 0, "index_keys": 0}
    pk = c.comp_state.pending_kv
    return {"pending": 0 if pk is None else int(pk.shape[1]), "entries": c.entries.n,
            "index_keys": c.index_keys.n if c.kind == "csa" else 0}


def _check_ids(model, ids) -> torch.Tensor:
    ids = ids if isinstance(ids, torch.Tensor) else torch.tensor(ids, dtype=torch.long)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] < 1:
        raise ValueError(f"ids {tuple(ids.shape)}: decode_trace follows one sequence, [S] or [1, S] with S >= 1")
    return ids


def _layer_info(model) -> list[dict]:
    cfg = model.cfg
    eb, kb = accounting.entry_bytes(cfg), accounting.index_key_bytes(cfg)
    return [{"layer": i, "kind": cfg.layer_kind(i), "ratio": cfg.compress_ratio(i), "window": cfg.sliding_window,
             "entry_bytes": eb, "key_bytes": kb} for i in range(cfg.num_hidden_layers)]


def _layer_record(info: dict, t: int, counts: dict, slots: list[int], win: list[int], comp: list[int],
                  spans: list) -> dict:
    m, kind = info["ratio"], info["kind"]
    held = sum(p >= 0 for p in slots)
    by = {"window": held * info["entry_bytes"], "entries": counts["entries"] * info["entry_bytes"],
          "index_keys": counts["index_keys"] * info["key_bytes"]}
    n_vis = (t + 1) // m if m else 0
    return {"layer": info["layer"], "kind": kind, "ratio": m, "cache_bytes": sum(by.values()), "bytes": by,
            "window_slots": slots, "pending": list(range(t + 1 - counts["pending"], t + 1)),
            "entries": spans[:counts["entries"]], "new_entry": bool(m) and counts["pending"] == 0,
            "n_visible": n_vis, "index_keys": counts["index_keys"],
            "visible": {"window": [p for p in win if p >= 0],
                        "compressed": sorted(e for e in comp if e >= 0), "sink": True}}


@torch.no_grad()
def decode_trace(model, ids, chunk: int = 1, progress: bool = False) -> list[dict]:
    """Feed ``ids`` ([S] or [1, S]) through ``model``'s cached decode; one record per token (module doc).

    ``progress``: a tqdm bar over the tokens (notebook-aware ``tqdm.auto``)."""
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk = {chunk!r}: must be a positive int (tokens per cached forward call)")
    ids = _check_ids(model, ids)
    S = ids.shape[1]
    infos = _layer_info(model)
    L = len(infos)
    spans = [[entry_span(i, f["ratio"], f["kind"] == "csa") for i in range(S // f["ratio"])] if f["ratio"] else []
             for f in infos]
    cache = model.new_cache(1, record=True)
    from tqdm.auto import tqdm
    bar = tqdm(total=S, desc="decode trace", unit="tok", disable=not progress, leave=False)
    out, toks = [], ids[0].tolist()
    try:
        for s0 in range(0, S, chunk):
            s1 = min(S, s0 + chunk)
            model(ids[:, s0:s1], cache=cache)
            reads = []
            for i, c in enumerate(cache.layers):        # per layer: [S', w] window positions, [S', K] entries
                win = torch.cat([r["window"][0] for r in c.reads]).tolist()
                comp = torch.cat([r["compressed"][0] for r in c.reads]).tolist()
                c.reads.clear()
                real = _read_counts(c)
                rule = step_counts(s1 - 1, infos[i]["ratio"], infos[i]["kind"])
                if real != rule:                       # the rules the chunked mode relies on
                    raise RuntimeError(f"layer {i}: cache holds {real} after token {s1 - 1}, the rules say {rule}")
                reads.append((win, comp, real))
            for t in range(s0, s1):
                layers = []
                for i, (win, comp, real) in enumerate(reads):
                    f = infos[i]
                    counts = real if t == s1 - 1 else step_counts(t, f["ratio"], f["kind"])
                    slots = cache.layers[i].window_positions() if t == s1 - 1 else ring_positions(t + 1, f["window"])
                    layers.append(_layer_record(f, t, counts, slots, win[t - s0], comp[t - s0], spans[i]))
                out.append({"pos": t, "token": toks[t], "cache_bytes": sum(r["cache_bytes"] for r in layers),
                            "layers": layers})
            bar.update(s1 - s0)
    finally:
        bar.close()
    assert len(out) == S and all(len(r["layers"]) == L for r in out)
    return out


def cache_baselines(cfg, n_tokens: int) -> dict:
    """Cache bytes after ``n_tokens`` for ``cfg``'s layer count with other caches: ``v4`` (this config,
    ``accounting.kv_cache``), ``v3.2_mla`` (V3.2's served MLA format, 656 B latent + 132 B indexer key per
    token per layer, on the same number of layers) and ``gqa8`` (BF16 GQA-8, head dim 128, same layers)."""
    L = cfg.num_hidden_layers
    v32 = accounting.kv_cache("v3.2", n_tokens)
    return {"v4": accounting.kv_cache(cfg, n_tokens)["total_bytes"],
            "v3.2_mla": v32["total_bytes"] // v32["layers_by_kind"]["mla+dsa"] * L,
            "gqa8": accounting.gqa8(cfg, n_tokens)["total_bytes"]}
