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
tokens per call (a chunked prefill, 20–50x faster); the cache then shows its state only at chunk ends, so
the per-step counts inside a chunk come from the ring/compressor rules (:func:`step_counts`), which are
checked against the real cache at every chunk end, and tests compare the two modes record for record.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from v4lab import accounting
from v4lab.attention import ring_positions
from v4lab.checkpoint import expected_keys, nbytes
from v4lab.compressor import entry_span
from v4lab.config import V4Config


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
    held = len(slots) - slots.count(-1)
    by = {"window": held * info["entry_bytes"], "entries": counts["entries"] * info["entry_bytes"],
          "index_keys": counts["index_keys"] * info["key_bytes"]}
    n_vis = (t + 1) // m if m else 0
    return {"layer": info["layer"], "kind": kind, "ratio": m, "cache_bytes": by["window"] + by["entries"]
            + by["index_keys"], "bytes": by, "window_slots": slots,
            "pending": list(range(t + 1 - counts["pending"], t + 1)),
            "entries": spans[:counts["entries"]], "new_entry": bool(m) and counts["pending"] == 0,
            "n_visible": n_vis, "index_keys": counts["index_keys"],
            "visible": {"window": [p for p in win if p >= 0],
                        "compressed": sorted(e for e in comp if e >= 0) if m else [], "sink": True}}


@torch.no_grad()
def decode_trace(model: nn.Module, ids: torch.Tensor | Sequence[int], chunk: int = 1,
                 progress: bool = False) -> list[dict]:
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
                rule_slots = ring_positions(t + 1, infos[0]["window"]) if t < s1 - 1 else None   # one window size
                for i, (win, comp, real) in enumerate(reads):
                    f = infos[i]
                    counts = real if t == s1 - 1 else step_counts(t, f["ratio"], f["kind"])
                    slots = cache.layers[i].window_positions() if t == s1 - 1 else rule_slots
                    layers.append(_layer_record(f, t, counts, slots, win[t - s0], comp[t - s0], spans[i]))
                out.append({"pos": t, "token": toks[t], "cache_bytes": sum(r["cache_bytes"] for r in layers),
                            "layers": layers})
            bar.update(s1 - s0)
    finally:
        bar.close()
    assert len(out) == S and all(len(r["layers"]) == L for r in out)
    return out


def cache_baselines(cfg: V4Config, n_tokens: int) -> dict:
    """Cache bytes after ``n_tokens`` for ``cfg``'s layer count with other caches: ``v4`` (this config,
    ``accounting.kv_cache``), ``v3.2_mla`` (V3.2's served MLA format, 656 B latent + 132 B indexer key per
    token per layer, on the same number of layers) and ``gqa8`` (BF16 GQA-8, head dim 128, same layers)."""
    L = cfg.num_hidden_layers
    v32 = accounting.kv_cache("v3.2", n_tokens)
    return {"v4": accounting.kv_cache(cfg, n_tokens)["total_bytes"],
            "v3.2_mla": v32["total_bytes"] // v32["layers_by_kind"]["mla+dsa"] * L,
            "gqa8": accounting.gqa8(cfg, n_tokens)["total_bytes"]}


# ------------------------------------------------------------------------------------------ one token
def _bytes_under(cfg, prefix: str, skip: tuple = ()) -> int:
    """Release-format bytes of every tensor whose name starts with ``prefix`` (minus ``skip`` prefixes)."""
    from v4lab.checkpoint import expected_keys, nbytes
    return sum(nbytes(s, dt) for n, (s, dt) in expected_keys(cfg).items()
               if n.startswith(prefix) and not any(n.startswith(prefix + k) for k in skip))


def _shape(t) -> str:
    return "[" + ", ".join(map(str, t.shape)) + "]"


def _attn_row(cfg, i, x_in, out, cache) -> dict:
    """What layer i's attention read for the token: its weights and the cache entries of ``cache.reads``."""
    r = cache.reads[-1]
    win = [p for p in r["window"][0, -1].tolist() if p >= 0]
    comp = [e for e in r["compressed"][0, -1].tolist() if e >= 0]
    kind, m = cfg.layer_kind(i), cfg.compress_ratio(i)
    eb, kb = accounting.entry_bytes(cfg), accounting.index_key_bytes(cfg)
    keys = cache.index_keys.n if kind == "csa" else 0
    kv = (len(win) + len(comp)) * eb + keys * kb
    w = _bytes_under(cfg, f"layers.{i}.attn.") + _bytes_under(cfg, f"layers.{i}.attn_norm.")
    what = {"window": f"{len(win)} raw window entries",
            "csa": f"{len(win)} raw + top-{len(comp)} of {cache.entries.n} compressed (m={m}); "
                   f"indexer scored {keys} FP4 keys",
            "hca": f"{len(win)} raw + all {len(comp)} compressed (m={m})"}[kind]
    return {"step": "attention", "layer": i, "kind": kind, "shapes": f"{_shape(x_in)} → {_shape(out)}",
            "reads": what + " + sink", "weight_bytes": w, "cache_bytes": kv}


def _moe_row(cfg, i, ffn, x_in, out, tok) -> tuple[dict, dict]:
    """Layer i's routing (hash or learned, top-k, shared) and the clamp on the chosen experts' pre-activations."""
    r = ffn.last_routing
    experts = r["idx"][-1].tolist()
    weights = r["weights"][-1].tolist()
    hashed = cfg.is_hash_layer(i)
    p = f"layers.{i}.ffn."
    one = _bytes_under(cfg, p + "experts.0.")
    w = _bytes_under(cfg, p, skip=("experts.",)) + len(experts) * one + _bytes_under(cfg, f"layers.{i}.ffn_norm.")
    if hashed:                      # only one row of tid2eid is read
        from v4lab.checkpoint import expected_keys, nbytes
        s, dt = expected_keys(cfg)[p + "gate.tid2eid"]
        w -= nbytes(s, dt) - nbytes(s[1:], dt)
    how = f"hash: tid2eid[{tok}]" if hashed else "learned: top-k of scores + bias"
    route = {"step": "moe", "layer": i, "shapes": f"{_shape(x_in)} → {_shape(out)}",
             "reads": f"{how} → experts {experts} (weights {', '.join(f'{v:.3g}' for v in weights)}) + 1 shared",
             "weight_bytes": w, "cache_bytes": 0, "experts": experts, "hash": hashed}
    lim, xf = ffn.limit, x_in.reshape(-1, x_in.shape[-1])[-1:].float()
    n_hit = n_all = 0
    for e in experts:                       # the same pre-activations the expert computes, counted
        g = torch.nn.functional.linear(xf, ffn.experts[e].w1.weight.float())
        u = torch.nn.functional.linear(xf, ffn.experts[e].w3.weight.float())
        n_hit += int((g > lim).sum() + (u.abs() > lim).sum()) if lim > 0 else 0
        n_all += g.numel() + u.numel()
    clamp = {"step": "clamp", "layer": i, "shapes": f"{len(experts)} × [{cfg.moe_intermediate_size}] gate and up",
             "reads": (f"SwiGLU clamp at {lim:g}: {n_hit} of {n_all} pre-activations clipped" if lim > 0
                       else "no clamp (swiglu_limit ≤ 0)"),
             "weight_bytes": 0, "cache_bytes": 0, "clipped": n_hit}
    return route, clamp


@torch.no_grad()
def walk_token(model: nn.Module, ids: torch.Tensor | Sequence[int], t: int | None = None) -> dict:
    """Walk token ``t`` of ``ids`` (default: the last) through ``model`` after a cached prefill of ids[:t].

    Runs the model's own pieces in ``Block.forward``'s order (embedding, then per layer: mHC pre-mix,
    attention with the layer's cache, mHC post-mix, mHC pre-mix, MoE, mHC post-mix; then hc_head, norm,
    head) and the MTP block's draft of token t+2 from the head's greedy token t+1. Returns ``{"rows":
    [{"step", "layer", "shapes", "reads", "weight_bytes", "cache_bytes", ...}], "logits": [V],
    "next": token t+1, "draft": MTP's token t+2, "mtp_logits": [V]}``; bytes in the released format
    (``checkpoint.expected_keys``, ``accounting.entry_bytes``)."""
    ids = _check_ids(model, ids)
    S = ids.shape[1]
    t = S - 1 if t is None else t
    if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < S:
        raise ValueError(f"t = {t!r}: must be a token position in [0, {S - 1}]")
    cfg, dev = model.cfg, model.device
    ids = ids.to(dev)
    cache = model.new_cache(1, record=True)
    if t:
        model(ids[:, :t], cache=cache, return_mtp=bool(len(model.mtp)))
    tok = ids[:, t:t + 1]
    rows = []
    e = model.embed(tok)                                                        # [1, 1, d]
    rows.append({"step": "embedding", "layer": None, "shapes": f"token {int(tok)} → {_shape(e)}",
                 "reads": "one row of embed.weight", "cache_bytes": 0,
                 "weight_bytes": _bytes_under(cfg, "embed.") // cfg.vocab_size})
    x = e.unsqueeze(2).expand(1, 1, cfg.hc_mult, cfg.hidden_size).contiguous()  # [1, 1, n, d]
    for i, blk in enumerate(model.layers):
        x = _walk_layer(cfg, i, blk, x, t, tok, cache.layers[i], rows)
    logits = model.logits_from_streams(x, model.hc_head_fn, model.hc_head_base, model.hc_head_scale, model.norm)
    nxt = int(logits[0, -1].argmax())
    rows.append({"step": "head", "layer": None, "shapes": f"{_shape(x)} → {_shape(logits)}",
                 "reads": f"hc_head (pre-only mix), norm, head.weight → greedy token {nxt}", "cache_bytes": 0,
                 "weight_bytes": sum(_bytes_under(cfg, p) for p in ("hc_head_", "norm.", "head."))})
    out = {"rows": rows, "logits": logits[0, -1], "next": nxt, "draft": None, "mtp_logits": None, "t": t}
    if len(model.mtp):
        model._mtp(x, tok, t, cache, None)                     # the MTP block catches up on position t−1
        ml = model._mtp_forward(x, torch.tensor([[nxt]], device=dev), t, cache.mtp[0], None)
        out["mtp_logits"], out["draft"] = ml[0, -1], int(ml[0, -1].argmax())
        rows.append(_mtp_row(cfg, x, ml, nxt, out["draft"], t))
    return out


def _walk_layer(cfg, i: int, blk, x: torch.Tensor, t: int, tok: torch.Tensor, cache, rows: list) -> torch.Tensor:
    """Layer i on the streams x [1, 1, n, d] of token t, in ``Block.forward``'s order, one row per step."""
    from v4lab.mhc import hc_post
    for site in ("attn", "ffn"):
        u, post, comb = blk._pre(site, x)
        rows.append({"step": "mhc_pre", "layer": i, "site": site, "cache_bytes": 0,
                     "shapes": f"{_shape(x)} → {_shape(u)}", "reads": f"hc_{site}_fn/base/scale; Sinkhorn "
                     f"{cfg.hc_sinkhorn_iters} iterations → pre [{cfg.hc_mult}], post, "
                     f"comb [{cfg.hc_mult}×{cfg.hc_mult}]",
                     "weight_bytes": _bytes_under(cfg, f"layers.{i}.hc_{site}_")})
        if site == "attn":
            h = blk.attn_norm(u)
            o = blk.attn(h, t, cache)
            rows.append(_attn_row(cfg, i, h, o, cache))
        else:
            h = blk.ffn_norm(u)
            o = blk.ffn(h, tok)
            rows.extend(_moe_row(cfg, i, blk.ffn, h, o, int(tok)))
        x = hc_post(o, x, post, comb)
        rows.append({"step": "mhc_post", "layer": i, "site": site, "weight_bytes": 0, "cache_bytes": 0,
                     "shapes": f"{_shape(o)} + {_shape(x)} → {_shape(x)}",
                     "reads": "post · output + combᵀ · streams (no weights)"})
    return x


def _mtp_row(cfg, x: torch.Tensor, ml: torch.Tensor, nxt: int, draft: int, t: int) -> dict:
    mtp = "mtp.0."
    return {"step": "mtp_draft", "layer": None, "shapes": f"streams {_shape(x)} + embed(token {nxt}) → "
            f"{_shape(ml)}", "reads": f"e_proj, h_proj, one window block, shared head → draft token "
            f"{draft} for position {t + 2}",
            "cache_bytes": accounting.entry_bytes(cfg) * min(cfg.sliding_window, t + 1),
            "weight_bytes": _bytes_under(cfg, mtp, skip=("ffn.experts.",)) + cfg.num_experts_per_tok
            * _bytes_under(cfg, mtp + "ffn.experts.0.") + _bytes_under(cfg, "head.")}


# ------------------------------------------------------------------------------------------ text views
def summarize(record: dict, layers: list[int] | None = None) -> str:
    """One line per layer of a trace record: ring, open block, entries (visible = ⌊(t+1)/m⌋), what was read."""
    t = record["pos"]
    out = [f"token t = {t}: {t + 1} tokens cached, {record['cache_bytes']:,} B in the released format"]
    for x in record["layers"]:
        if layers is not None and x["layer"] not in layers:
            continue
        m, held = x["ratio"], sum(p >= 0 for p in x["window_slots"])
        line = f"  layer {x['layer']} {x['kind']:<6} ring {held:>3}/{len(x['window_slots'])}"
        if m:
            line += (f" · open block {len(x['pending'])}/{m} · entries ⌊{t + 1}/{m}⌋ = {x['n_visible']}"
                     f"{' (one just closed)' if x['new_entry'] else ''} · reads {len(x['visible']['compressed'])}")
            if x["kind"] == "csa":
                line += f" (top-k) · indexer keys {x['index_keys']}"
        out.append(line + f" · {x['cache_bytes']:,} B")
    return "\n".join(out)


def format_walk(walk: dict) -> str:
    """The rows of :func:`walk_token` as a table, with the totals."""
    head = f"{'step':<10}{'layer':>5}  {'shapes':<38}{'weights B':>11}{'cache B':>9}  reads"
    out = [head, "-" * len(head)]
    for r in walk["rows"]:
        lay = "" if r["layer"] is None else str(r["layer"])
        out.append(f"{r['step']:<10}{lay:>5}  {r['shapes']:<38}{r['weight_bytes']:>11,}{r['cache_bytes']:>9,}  "
                   f"{r['reads']}")
    w = sum(r["weight_bytes"] for r in walk["rows"])
    c = sum(r["cache_bytes"] for r in walk["rows"])
    out.append(f"total: {w:,} B of weights + {c:,} B of KV cache read for token {walk['t']} "
               f"(→ next {walk['next']}, MTP draft {walk['draft']})")
    return "\n".join(out)


# Weight and total bytes per decode token need the release layout (v4lab.checkpoint), so they live here,
# above accounting, which counts the KV cache.
def weight_bytes_per_token(cfg: V4Config | str) -> dict:
    """Weight bytes one decode token reads, by part, in the released storage format.

    V4: every tensor of the release layout (``checkpoint.expected_keys``: FP8 + UE8M0 scales, FP4 experts +
    scales, BF16, FP32) that the token's forward reads — everything of the backbone except the routed experts
    it is not sent to (K of E per MoE layer; each expert has the same bytes), one embedding row and one
    ``tid2eid`` row per hash layer; MTP excluded. V3 / V3.2 (no release layout here): active parameters
    (``params``) at FP8 with one FP32 scale per 128×128 block, the head in BF16 and one BF16 embedding row
    (their released checkpoints' formats)."""
    cfg = accounting._cfg(cfg)
    d, K = cfg.hidden_size, cfg.num_experts_per_tok
    if not cfg.is_v4:
        p = accounting.params(cfg)
        head = p["active_by_component"]["head"]
        rest = p["active"] - head
        return {"embedding_row": 2 * d, "head": 2 * head, "other": math.ceil(rest * (1 + 4 / 128 ** 2))}
    out = {"embedding_row": 0, "routed_experts": 0, "head": 0, "other": 0}
    for name, (shape, dt) in expected_keys(cfg).items():
        if name.startswith("mtp."):
            continue
        n = nbytes(shape, dt)
        if name == "embed.weight":
            out["embedding_row"] += n // shape[0]
        elif name.endswith("tid2eid"):
            out["other"] += n // shape[0]
        elif ".ffn.experts." in name:
            if name.split(".ffn.experts.")[1].split(".")[0] == "0":      # one expert's bytes, K times
                out["routed_experts"] += K * n
        elif name.startswith("head."):
            out["head"] += n
        else:
            out["other"] += n
    return out


def decode_bytes(cfg: V4Config | str, context: int = accounting.ONE_M) -> dict:
    """Bytes read to decode one token at ``context``: weights (``weight_bytes_per_token``) + KV cache
    (``kv_bytes_read``); activations are left out (kilobytes)."""
    w, kv = weight_bytes_per_token(cfg), accounting.kv_bytes_read(cfg, context)
    return {"context": accounting._check_context(context), "weights": w, "kv": kv, "weights_total": sum(w.values()),
            "kv_total": sum(kv.values()), "total": sum(w.values()) + sum(kv.values())}


def decode_bytes_rows(models: Sequence[str] = ("v3.2", "v4-flash", "v4-pro"),
                      contexts: Sequence[int] = (8192, 131072, 1048576)) -> list[dict]:
    """``accounting.decode_bytes`` for each model and context, with the ratio to the first model."""
    rows = []
    for n in contexts:
        ref = decode_bytes(models[0], n)
        for m in models:
            d = decode_bytes(m, n)
            rows.append({"model": m, "context": n, "weights_GB": d["weights_total"] / 1e9, "kv_GB": d["kv_total"] / 1e9,
                         "total_GB": d["total"] / 1e9, "kv_vs_first": d["kv_total"] / ref["kv_total"],
                         "total_vs_first": d["total"] / ref["total"]})
    return rows


def format_decode_bytes(rows: list[dict]) -> str:
    first = rows[0]["model"]
    out = [f"{'context':>8} {'model':<9}{'weights GB':>11}{'KV read GB':>12}{'total GB':>10}"
           f"{'KV vs ' + first:>13}{'total vs ' + first:>15}"]
    for r in rows:
        out.append(f"{accounting._ctx(r['context']):>8} {r['model']:<9}{r['weights_GB']:>11.3g}{r['kv_GB']:>12.3g}"
                   f"{r['total_GB']:>10.3g}{100 * r['kv_vs_first']:>12.3g}%{100 * r['total_vs_first']:>14.3g}%")
    return "\n".join(out)
