"""v4lab.trace: the decode trace against the accounting (bytes at every step), against the prefill's own
attention record (what each query read), the chunked mode against the token-by-token decode, the rules."""
import pytest
import torch

from v4lab import accounting, get_config
from v4lab.attention import ring_positions
from v4lab.compressor import entry_span
from v4lab.model import V4Model
from v4lab.trace import decode_bytes, decode_bytes_rows, decode_trace, step_counts, weight_bytes_per_token

# window + CSA (m = 4) + HCA (m' = 128), hash layers, lab widths, six layers; 133 tokens cross one HCA block.
LAB6 = dict(num_hidden_layers=6, compress_ratios=[0, 4, 128, 4, 128, 4, 0], num_hash_layers=1)
S = 133


def _cfg(name):
    return get_config("lab").replace(**LAB6) if name == "lab6" else get_config(name)


@pytest.fixture(scope="module", params=["tiny", "lab6"])
def traced(request):
    cfg = _cfg(request.param)
    torch.manual_seed(0)
    model = V4Model(cfg).eval()
    ids = torch.randint(2, cfg.vocab_size, (1, S), generator=torch.Generator().manual_seed(1))
    return model, ids, decode_trace(model, ids)


def test_cache_bytes_equal_the_accounting_at_every_step(traced):
    model, ids, tr = traced
    cfg = model.cfg
    assert [r["pos"] for r in tr] == list(range(S)) and [r["token"] for r in tr] == ids[0].tolist()
    for t, r in enumerate(tr):
        acc = accounting.kv_cache(cfg, t + 1)
        assert r["cache_bytes"] == acc["total_bytes"], t
        assert r["cache_bytes"] == sum(x["cache_bytes"] for x in r["layers"])
        for kind, b in acc["by_kind"].items():                 # and kind by kind
            assert sum(x["cache_bytes"] for x in r["layers"] if x["kind"] == kind) == b, (t, kind)


def test_cache_contents_follow_the_v4_rules(traced):
    model, _, tr = traced
    cfg, w = model.cfg, model.cfg.sliding_window
    for t in (0, 2, 3, 4, 7, w - 1, w, 127, 128, S - 1):
        for x in tr[t]["layers"]:
            m = x["ratio"]
            assert sorted(p for p in x["window_slots"] if p >= 0) == list(range(max(0, t - w + 1), t + 1))
            assert x["visible"]["window"] == list(range(max(0, t - w + 1), t + 1))
            assert x["visible"]["sink"] is True
            if not m:
                assert x["pending"] == x["entries"] == x["visible"]["compressed"] == [] and x["n_visible"] == 0
                continue
            n = (t + 1) // m
            assert x["n_visible"] == n == len(x["entries"])
            assert x["pending"] == list(range(n * m, t + 1))             # the open block
            assert x["new_entry"] == ((t + 1) % m == 0)
            if x["kind"] == "csa":
                assert x["index_keys"] == n
                assert x["entries"][:2] == [(0, 3), (0, 7)][:n]              # 2m span; entry 0 has no left half
                picks = x["visible"]["compressed"]
                assert len(picks) == min(cfg.index_topk, n) and all(0 <= e < n for e in picks)
            else:
                assert x["index_keys"] == 0
                assert x["visible"]["compressed"] == list(range(n))          # HCA: every visible entry
                assert x["entries"][:1] == [(0, 127)][:n]


def test_visible_sets_equal_the_prefill_attention(traced):
    """Each decode step reads exactly what the prefill's query at that position reads (Attention.inspect)."""
    model, ids, tr = traced
    attns = [b.attn for b in model.layers]
    for a in attns:
        a.inspect = True
    try:
        with torch.no_grad():
            model(ids)
        rec = [a.last_inspect for a in attns]
    finally:
        for a in attns:
            a.inspect = False
    for i, ins in enumerate(rec):
        win, comp = ins["window_positions"][0].tolist(), ins["compressed_idx"][0].tolist()
        for t in range(S):
            vis = tr[t]["layers"][i]["visible"]
            assert vis["window"] == [p for p in win[t] if p >= 0], (i, t)
            assert vis["compressed"] == sorted(e for e in comp[t] if e >= 0), (i, t)


@pytest.mark.parametrize("chunk", [7, 64, 256])
def test_chunked_trace_equals_token_by_token(traced, chunk):
    model, ids, tr = traced
    assert decode_trace(model, ids, chunk=chunk) == tr


def test_rules():
    assert ring_positions(0, 4) == [-1] * 4
    assert ring_positions(3, 4) == [0, 1, 2, -1]
    assert ring_positions(6, 4) == [4, 5, 2, 3]
    assert entry_span(0, 4, True) == (0, 3) and entry_span(3, 4, True) == (8, 15)
    assert entry_span(1, 128, False) == (128, 255)
    assert step_counts(6, 4, "csa") == {"pending": 3, "entries": 1, "index_keys": 1}
    assert step_counts(127, 128, "hca") == {"pending": 0, "entries": 1, "index_keys": 0}
    assert step_counts(5, 0, "window") == {"pending": 0, "entries": 0, "index_keys": 0}


def test_bad_input_names_the_argument():
    model = V4Model(get_config("tiny")).eval()
    with pytest.raises(ValueError, match="chunk = 0"):
        decode_trace(model, [1, 2, 3], chunk=0)
    with pytest.raises(ValueError, match=r"ids \(2, 3\)"):
        decode_trace(model, torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="vocab_size"):
        decode_trace(model, [1, 99999])


# ------------------------------------------------------------------------------------------ walk_token
@pytest.fixture(scope="module")
def walked():
    torch.manual_seed(0)
    model = V4Model(_cfg("lab6")).eval()
    ids = torch.randint(2, model.cfg.vocab_size, (1, 140), generator=torch.Generator().manual_seed(2))
    from v4lab.trace import walk_token
    return model, ids, walk_token(model, ids, 133)


def test_walk_token_equals_the_forward_and_the_mtp_draft(walked):
    model, ids, w = walked
    t = w["t"]
    with torch.no_grad():
        full = model(ids[:, :t + 1])[0, -1]
        ext = torch.cat([ids[:, :t + 1], torch.tensor([[w["next"]]])], 1)
        _, mtp = model(ext, return_mtp=True)
    torch.testing.assert_close(w["logits"], full, rtol=1e-4, atol=1e-4)
    assert w["next"] == int(full.argmax())
    torch.testing.assert_close(w["mtp_logits"], mtp[0, t], rtol=1e-4, atol=1e-4)
    assert w["draft"] == int(mtp[0, t].argmax())


def test_walk_token_rows_follow_the_block_and_the_trace(walked):
    model, ids, w = walked
    cfg, t = model.cfg, w["t"]
    steps = [r["step"] for r in w["rows"]]
    per_layer = ["mhc_pre", "attention", "mhc_post", "mhc_pre", "moe", "clamp", "mhc_post"]
    assert steps == ["embedding"] + per_layer * cfg.num_hidden_layers + ["head", "mtp_draft"]
    rec = decode_trace(model, ids[:, :t + 1], chunk=64)[t]
    eb, kb = accounting.entry_bytes(cfg), accounting.index_key_bytes(cfg)
    with torch.no_grad():
        model(ids[:, :t + 1])
    for r in (r for r in w["rows"] if r["step"] == "attention"):
        x = rec["layers"][r["layer"]]
        vis = x["visible"]
        assert r["cache_bytes"] == (len(vis["window"]) + len(vis["compressed"])) * eb + x["index_keys"] * kb
    for r in (r for r in w["rows"] if r["step"] == "moe"):
        ffn = model.layers[r["layer"]].ffn
        assert r["experts"] == ffn.last_routing["idx"][t].tolist()            # the full forward's choice
        assert r["hash"] == cfg.is_hash_layer(r["layer"])
        one = sum(p.numel() for p in ffn.experts[0].parameters())
        assert r["weight_bytes"] > cfg.num_experts_per_tok * one * 0.5        # at least the FP4 experts
    emb = w["rows"][0]
    assert emb["weight_bytes"] == 2 * cfg.hidden_size                         # one BF16 row


def test_walk_token_bad_position(walked):
    model, ids, _ = walked
    from v4lab.trace import walk_token
    with pytest.raises(ValueError, match="t = 500"):
        walk_token(model, ids, 500)


# ------------------------------------------------------------------------------------------ decode bytes
def test_decode_bytes_at_release_widths():
    """V4-Flash at 1M, from the published shapes: 43 layers (2 window, 21 CSA, 20 HCA), window 128, top-512,
    entries of 448 FP8 + 64 BF16 + 7 scales = 583 B, FP4 indexer keys of 64 + 4 scales = 68 B."""
    N = 2 ** 20
    kv = accounting.kv_bytes_read("v4-flash", N)
    assert kv["window"] == 43 * 128 * 583
    assert kv["compressed_entries"] == 21 * 512 * 583 + 20 * (N // 128) * 583
    assert kv["indexer_keys"] == 21 * (N // 4) * 68
    w = weight_bytes_per_token("v4-flash")
    one_expert = 3 * (2048 * 4096 // 2 + 2048 * 4096 // 32)                  # FP4 packed + one scale per 32
    assert w["routed_experts"] == 6 * 43 * one_expert
    assert w["embedding_row"] == 2 * 4096 and w["head"] == 2 * 4096 * 129280
    v32 = accounting.kv_bytes_read("v3.2", N)
    assert v32 == {"latents": 61 * 2048 * 656, "indexer_keys": 61 * N * 132}
    d = decode_bytes("v4-pro", N)
    assert d["total"] == d["weights_total"] + d["kv_total"]
    rows = {(r["model"], r["context"]): r for r in decode_bytes_rows()}
    assert rows[("v3.2", N)]["kv_vs_first"] == 1.0
    assert rows[("v4-pro", N)]["kv_vs_first"] == pytest.approx(d["kv_total"] / sum(v32.values()))


def test_summarize_names_the_counts(traced):
    from v4lab.trace import summarize
    _, _, tr = traced
    text = summarize(tr[3])
    assert "entries ⌊4/4⌋ = 1 (one just closed)" in text and "open block 0/4" in text
    assert "entries ⌊4/128⌋ = 0" in text
