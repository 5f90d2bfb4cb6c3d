"""v4lab.trace: the decode trace against the accounting (bytes at every step), against the prefill's own
attention record (what each query read), the chunked mode against the token-by-token decode, the rules."""
import pytest
import torch

from v4lab import accounting, get_config
from v4lab.attention import ring_positions
from v4lab.compressor import entry_span
from v4lab.model import V4Model
from v4lab.trace import decode_trace, step_counts

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


@pytest.mark.parametrize("chunk", [7, 64])
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
