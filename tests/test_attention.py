"""V4 hybrid attention: sparse_attn reference, causality, prefill == decode, edge cases, bad inputs."""
import pytest
import torch

from v4lab import attention, quant
from v4lab.attention import (
    ATTN_BLOCK_FLOATS,
    ATTN_BLOCK_QUERIES,
    GATHER_COPY_FLOPS,
    Attention,
    attn_path_costs,
    choose_attn_path,
    dense_attn,
    plan_attn_blocks,
    sparse_attn,
    sparse_attn_probs,
)
from v4lab.config import get_config
from v4lab.indexer import visible_entries

KINDS = {"window": 0, "csa": 1, "hca": 2}


# ------------------------------------------------------------------------------------ sparse_attn
def dense_reference(q, kv, sink, idx, scale):
    B, S, H, D = q.shape
    out = torch.zeros(B, S, H, D, dtype=torch.float64)
    for b in range(B):
        for t in range(S):
            sel = [int(i) for i in idx[b, t] if i >= 0]
            for h in range(H):
                z = torch.stack([q[b, t, h].double() @ kv[b, j].double() * scale for j in sel] +
                                [sink[h].double()])
                p = z.softmax(0)[:-1]                 # the sink only enlarges the denominator
                for pj, j in zip(p, sel):
                    out[b, t, h] += pj * kv[b, j].double()
    return out


def no_sink(q, kv, sink, idx, scale):
    return sparse_attn(q, kv, torch.full_like(sink, -torch.inf), idx, scale)


@pytest.mark.parametrize("impl,right", [(sparse_attn, True), (no_sink, False)])
def test_sparse_attn_matches_dense(impl, right):
    torch.manual_seed(0)
    q, kv, sink = torch.randn(2, 5, 3, 8), torch.randn(2, 9, 8), torch.randn(3)
    idx = torch.randint(-1, 9, (2, 5, 6))
    idx[0, 1] = -1                                    # a row with nothing but the sink
    got = impl(q, kv, sink, idx, 0.35)
    assert torch.allclose(got.double(), dense_reference(q, kv, sink, idx, 0.35), atol=1e-5) == right
    if right:
        assert torch.equal(got[0, 1], torch.zeros_like(got[0, 1]))   # sink-only → zeros


def test_sparse_attn_minus_one_and_nan_do_not_leak():
    torch.manual_seed(1)
    q, kv, sink = torch.randn(1, 3, 2, 4), torch.randn(1, 6, 4), torch.zeros(2)
    idx = torch.tensor([[[0, 1, -1], [2, -1, -1], [-1, -1, -1]]])
    ref = sparse_attn(q, kv, sink, idx, 0.5)
    kv2 = kv.clone()
    kv2[0, 3:] = float("nan")                         # never selected
    kv2[0, 0] = kv[0, 0]
    torch.testing.assert_close(sparse_attn(q, kv2, sink, idx, 0.5), ref, rtol=0, atol=0)
    # a NaN in a selected entry is not silently dropped
    kv3 = kv.clone()
    kv3[0, 2] = float("nan")
    assert sparse_attn(q, kv3, sink, idx, 0.5)[0, 1].isnan().all()
    # with a −inf sink and no entry a row is still zeros, not NaN
    assert torch.equal(sparse_attn(q, kv, torch.full((2,), -torch.inf), idx, 0.5)[0, 2], torch.zeros(2, 4))
    p, s = sparse_attn_probs(q, kv, sink, idx, 0.5)
    torch.testing.assert_close(p.sum(-1) + s, torch.ones(1, 3, 2))
    assert torch.equal(s[0, 2], torch.ones(2)) and (p[0, 0, :, 2] == 0).all()


def test_sparse_attn_bad_inputs():
    q, kv, sink = torch.randn(1, 2, 3, 4), torch.randn(1, 5, 4), torch.zeros(3)
    with pytest.raises(ValueError, match="idx"):
        sparse_attn(q, kv, sink, torch.zeros(1, 2, 3), 1.0)          # float indices
    with pytest.raises(ValueError, match="N = 5"):
        sparse_attn(q, kv, sink, torch.full((1, 2, 3), 5), 1.0)
    with pytest.raises(ValueError, match="attn_sink"):
        sparse_attn(q, kv, torch.zeros(2), torch.zeros(1, 2, 3, dtype=torch.long), 1.0)


# ------------------------------------------------------------------------------------ the layer
def make(kind, seed=0, cfg=None):
    cfg = cfg or get_config("tiny")
    torch.manual_seed(seed)
    a = Attention(cfg, KINDS[kind])
    with torch.no_grad():
        for name, p in a.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape))
            else:
                p.normal_(0, 0.5 if ("ape" in name or "sink" in name) else 0.1)
    return a.eval()


def seq_len(kind):
    return 300 if kind == "hca" else 43               # HCA crosses 2 windows of 128; others end mid-window


def test_parameter_names_and_shapes():
    cfg = get_config("tiny")
    D, H, g = cfg.head_dim, cfg.num_attention_heads, cfg.o_groups
    want_common = {"wq_a.weight": (cfg.q_lora_rank, cfg.hidden_size), "q_norm.weight": (cfg.q_lora_rank,),
                   "wq_b.weight": (H * D, cfg.q_lora_rank), "wkv.weight": (D, cfg.hidden_size),
                   "kv_norm.weight": (D,), "wo_a.weight": (g * cfg.o_lora_rank, H * D // g),
                   "wo_b.weight": (cfg.hidden_size, g * cfg.o_lora_rank), "attn_sink": (H,)}
    for kind, lid in KINDS.items():
        sd = {k: tuple(v.shape) for k, v in Attention(cfg, lid).state_dict().items()}
        want = dict(want_common)
        if kind != "window":
            coff = 2 if kind == "csa" else 1
            m = cfg.compress_ratio(lid)
            want.update({"compressor.wkv.weight": (coff * D, cfg.hidden_size),
                         "compressor.wgate.weight": (coff * D, cfg.hidden_size),
                         "compressor.ape": (m, coff * D), "compressor.norm.weight": (D,)})
        if kind == "csa":
            Hi, Di = cfg.index_n_heads, cfg.index_head_dim
            want.update({"indexer.wq_b.weight": (Hi * Di, cfg.q_lora_rank),
                         "indexer.weights_proj.weight": (Hi, cfg.hidden_size),
                         "indexer.compressor.wkv.weight": (2 * Di, cfg.hidden_size),
                         "indexer.compressor.wgate.weight": (2 * Di, cfg.hidden_size),
                         "indexer.compressor.ape": (4, 2 * Di), "indexer.compressor.norm.weight": (Di,)})
        assert sd == want, kind
        assert Attention(cfg, lid).attn_sink.dtype == torch.float32


@pytest.mark.parametrize("kind", list(KINDS))
def test_causality_bit_identical(kind):
    a = make(kind)
    S = seq_len(kind)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, S, 128, generator=g)
    with torch.no_grad():
        base = a(x)
        for t in ([3, 15, 16, 30] if kind != "hca" else [126, 127, 200, 255]):
            x2 = x.clone()
            x2[:, t + 1:] = torch.randn(1, S - t - 1, 128, generator=g) * 3
            y = a(x2)
            assert torch.equal(y[:, :t + 1], base[:, :t + 1]), (kind, t)
            assert not torch.allclose(y[:, t + 1:], base[:, t + 1:])


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("schedule", ["tokens", "prompt+steps", "odd_chunks"])
def test_prefill_equals_decode(kind, schedule):
    a = make(kind, seed=1)
    S = seq_len(kind)
    x = torch.randn(2, S, 128, generator=torch.Generator().manual_seed(6))
    if schedule == "tokens":
        sizes = [1] * S if kind != "hca" else [125] + [1] * 6    # the HCA window closes at t=127 in decode
    elif schedule == "prompt+steps":
        sizes = [21] + [1] * 22 if kind != "hca" else [250] + [1] * 10    # ends mid-window, crosses t=255
    else:
        sizes = [5, 3, 7, 1, 11, 2, 6, 8] if kind != "hca" else [100, 27, 1, 60, 70, 2]
    L = sum(sizes)
    with torch.no_grad():
        full = a(x[:, :L])
        cache, outs, s0 = a.new_cache(2), [], 0
        for n in sizes:
            outs.append(a(x[:, s0:s0 + n], s0, cache))
            s0 += n
    assert cache.length == L
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=2e-6, rtol=1e-5)


def test_many_decode_steps_wrap_ring_and_match():
    a = make("csa", seed=2)
    x = torch.randn(1, 90, 128, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        full = a(x)
        cache = a.new_cache(1)
        outs = [a(x[:, :6], 0, cache)] + [a(x[:, t:t + 1], t, cache) for t in range(6, 90)]
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=2e-6, rtol=1e-5)
    assert cache.entries.get().shape[1] == 90 // 4 and cache.index_keys.get().shape[1] == 90 // 4
    assert cache.window.shape[1] == 16 and cache.comp_state.pending_kv.shape[1] == 90 % 4
    assert cache.nbytes() > 0


@pytest.mark.parametrize("path", ["gather", "dense"])
@pytest.mark.parametrize("kind", ["csa", "hca"])
def test_chunked_prefill_never_builds_square_scores(kind, path, monkeypatch):
    """Prefill runs per query block: the gather path over index lists of window + top-k / visible entries,
    the dense-block path over only the rows the block can see (its window rows + visible entries)."""
    a = make(kind, seed=3)
    S = seq_len(kind)
    x = torch.randn(1, S, 128)
    with torch.no_grad():
        ref = a(x, attn_path="gather")
        calls = []

        def spy(fn):
            def f(q, kv, sink, idx, scale):
                calls.append((fn.__name__, q.shape[1], kv.shape[1], idx.shape[2]))
                return fn(q, kv, sink, idx, scale)
            return f

        monkeypatch.setattr(attention, "sparse_attn_fused", spy(attention.sparse_attn_fused))   # the layer's gather
        monkeypatch.setattr(attention, "dense_attn", spy(dense_attn))
        a.q_chunk = 16
        got = a(x, attn_path=path)
    cfg, w = a.cfg, a.cfg.sliding_window
    assert {c[0] for c in calls} == {"sparse_attn_fused" if path == "gather" else "dense_attn"}
    assert all(s <= 16 for _, s, _, _ in calls) and sum(s for _, s, _, _ in calls) == S
    if path == "gather":
        k_max = w + (cfg.index_topk if kind == "csa" else S // a.ratio)
        assert all(k <= k_max for *_, k in calls) and max(k for *_, k in calls) < S
    else:
        assert all(n <= s + w - 1 + S // a.ratio for _, s, n, _ in calls) and max(n for _, _, n, _ in calls) < S
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------ dense-block path
def _attn_case(seed, B=2, S=7, H=3, N=11, K=6, D=8):
    g = torch.Generator().manual_seed(seed)
    q, kv, sink = torch.randn(B, S, H, D, generator=g), torch.randn(B, N, D, generator=g), torch.randn(H, generator=g)
    idx = torch.randint(-1, N, (B, S, K), generator=g)
    idx[0, 1] = -1                                    # a row with nothing but the sink
    idx[-1, 2, :3] = 4                                # an index listed three times counts three times
    return q, kv, sink, idx


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dense_attn_equals_sparse_attn_forward_and_gradients(seed):
    q, kv, sink, idx = _attn_case(seed)
    outs, grads = [], []
    for fn in (sparse_attn, dense_attn):
        leaves = [t.clone().requires_grad_(True) for t in (q, kv, sink)]
        o = fn(*leaves, idx, 0.4)
        (o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum().backward()
        outs.append(o.detach())
        grads.append([t.grad for t in leaves])
    torch.testing.assert_close(outs[1], outs[0], atol=1e-6, rtol=1e-5)
    assert torch.equal(outs[1][0, 1], torch.zeros_like(outs[1][0, 1]))
    for gd, gs in zip(grads[1], grads[0]):
        torch.testing.assert_close(gd, gs, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(outs[1].double(), dense_reference(q, kv, sink, idx, 0.4), atol=1e-5, rtol=1e-5)


def test_dense_attn_nan_rows_and_bad_inputs():
    q, kv, sink, idx = _attn_case(3, B=1)
    idx[0, :, :] = torch.tensor([0, 1, 2, -1, -1, -1])
    idx[0, 4, 0] = 7
    kv2 = kv.clone()
    kv2[0, 7] = float("nan")                          # picked only by query 4
    o = dense_attn(q, kv2, sink, idx, 0.4)
    assert o[0, 4].isnan().all() and torch.isfinite(o[0, torch.arange(7) != 4]).all()
    torch.testing.assert_close(o[0, :4], sparse_attn(q, kv, sink, idx, 0.4)[0, :4], atol=0, rtol=0)
    with pytest.raises(ValueError, match="dense_attn.*N = 11"):
        dense_attn(q, kv, sink, torch.full_like(idx, 11), 0.4)
    with pytest.raises(ValueError, match="dense_attn.*attn_sink"):
        dense_attn(q, kv, torch.zeros(2), idx, 0.4)


def test_cost_model_crossover():
    """Dense wins while the block sees few rows besides its picks; with 64 heads the gather wins from
    ~1.7·K rows; with 2 heads (the narrow bench layer) dense wins up to ~32·K rows."""
    K, D = 640, 512
    assert choose_attn_path(64, 64, 800, K, D) == "dense"
    assert choose_attn_path(64, 64, 2 * K, K, D) == "gather"
    assert choose_attn_path(2, 64, 16 * K, K, D) == "dense"
    assert choose_attn_path(2, 64, 40 * K, K, D) == "gather"
    c = attn_path_costs(8, 16, 100, 50, 64)
    assert c["dense"] == 4 * 16 * 8 * 100 * 64 and c["gather"] == 16 * 50 * 64 * (GATHER_COPY_FLOPS + 4 * 16)


def test_plan_attn_blocks_training_counts_the_per_block_overhead():
    """Inference keeps the per-block choice of `choose_attn_path` on ATTN_BLOCK_QUERIES-query blocks; training
    adds a fixed cost per block, so the tiny config's window layer (4 heads × 64, 16 + 15 rows per query) runs
    one wide gather instead of 32 dense blocks, while the released shape keeps its dense blocks."""
    # tiny window layer, a 2048-query projection block: last dense block sees 64 + 15 rows, K = 16
    assert plan_attn_blocks(4, 2048, 79, 16, 64) == ("dense", ATTN_BLOCK_QUERIES)
    assert plan_attn_blocks(4, 2048, 79, 16, 64, training=True) == ("gather", 2048)
    # released V4-Flash CSA at 1K context: dense blocks either way (a block there costs GFLOPs)
    for training in (False, True):
        assert plan_attn_blocks(64, 256, 64 + 127 + 256, 128 + 512, 512, training=training) == ("dense", 64)
    # gather blocks are cut so their [s, K, D] gathered rows stay within ATTN_BLOCK_FLOATS
    path, sub = plan_attn_blocks(64, 256, 64 + 127 + 4096, 128 + 512, 512, path="gather")
    assert path == "gather" and sub == ATTN_BLOCK_FLOATS // (640 * 512) and sub * 640 * 512 <= ATTN_BLOCK_FLOATS
    for heads, s, n, k, d in ((2, 64, 16 * 640, 640, 512), (2, 64, 40 * 640, 640, 512), (64, 64, 800, 640, 512)):
        assert plan_attn_blocks(heads, s, n, k, d)[0] == choose_attn_path(heads, s, n, k, d)
    assert plan_attn_blocks(4, 10, 79, 16, 64, path="dense") == ("dense", 10)


def test_q_chunk_default_keeps_projection_blocks_within_the_float_budget():
    """256 queries per projection block at the released 64 × 512 heads (as before), the whole chunk for tiny."""
    real = get_config("tiny").replace(num_attention_heads=64, head_dim=512)
    assert Attention(real, 0).q_chunk == 256
    tiny = get_config("tiny")
    assert Attention(tiny, 0).q_chunk == ATTN_BLOCK_FLOATS // (tiny.num_attention_heads * tiny.head_dim)


def test_training_forward_runs_wide_gather_blocks_with_the_same_result(monkeypatch):
    """With grad enabled "auto" runs the tiny window layer as one gather block; output and gradients equal
    the dense-block path's (which the inference forward of "auto" takes here)."""
    a = make("window", seed=8).train()
    x = torch.randn(1, 300, 128, generator=torch.Generator().manual_seed(9))
    ref = _grads(a, x, attn_path="dense")
    calls = []

    def spy(q, kv, sink, idx, scale):
        calls.append(q.shape[1])
        return fused(q, kv, sink, idx, scale)

    fused = attention.sparse_attn_fused                          # the layer's gather core (fused backward)
    monkeypatch.setattr(attention, "sparse_attn_fused", spy)
    y, gx, gp = _grads(a, x, attn_path="auto")
    assert calls == [300]
    torch.testing.assert_close(y, ref[0], atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(gx, ref[1], atol=2e-6, rtol=1e-4)
    for n in gp:
        assert (gp[n] - ref[2][n]).abs().max() <= 1e-5 * ref[2][n].abs().max(), n


def _grads(a, x, **kw):
    a.zero_grad()
    xx = x.clone().requires_grad_(True)
    y = a(xx, **kw)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return y.detach(), xx.grad, {n: p.grad.clone() for n, p in a.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", list(KINDS))
def test_layer_paths_and_prefill_chunks_agree_with_gradients(kind):
    """The dense-block path, the gather path and a prefill cut into chunks through the cache give the same
    output and the same gradients (input and every parameter): training runs through all of them."""
    a = make(kind, seed=8).train()
    S = seq_len(kind)
    x = torch.randn(1, S, 128, generator=torch.Generator().manual_seed(9))
    ref = _grads(a, x, attn_path="gather")
    runs = [_grads(a, x, attn_path="dense"), _grads(a, x, attn_path="auto")]
    a.prefill_chunk = 37 if kind != "hca" else 101
    runs.append(_grads(a, x, attn_path="dense"))
    for y, gx, gp in runs:
        torch.testing.assert_close(y, ref[0], atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(gx, ref[1], atol=2e-6, rtol=1e-4)
        assert gp.keys() == ref[2].keys() and len(gp) > 5
        for n in gp:                              # fp32 sums over S tokens: compare relative to the largest
            assert (gp[n] - ref[2][n]).abs().max() <= 1e-5 * ref[2][n].abs().max(), n


def test_attn_path_and_prefill_chunk_are_checked():
    a = make("csa")
    x = torch.randn(1, 5, 128)
    with pytest.raises(ValueError, match="attn_path = 'fast'"):
        a(x, attn_path="fast")
    a.attn_path = "sparse"
    with pytest.raises(ValueError, match="attn_path = 'sparse'"):
        a(x)
    a.attn_path, a.prefill_chunk = "auto", 0
    with pytest.raises(ValueError, match="prefill_chunk = 0"):
        a(x)
    a.prefill_chunk, a.q_chunk = 2048, 2.5
    with pytest.raises(ValueError, match="q_chunk = 2.5"):
        a(x)


@pytest.mark.parametrize("kind", ["window", "csa", "hca"])
def test_inspect_reports_visibility_window_and_probs(kind):
    a = make(kind, seed=4)
    a.inspect = True
    S = seq_len(kind)
    with torch.no_grad():
        a(torch.randn(1, S, 128))
    ins = a.last_inspect
    w = a.window
    t = torch.arange(S)
    wp = ins["window_positions"][0]
    assert torch.equal(wp, torch.where(t[:, None] - torch.arange(w - 1, -1, -1) >= 0,
                                       t[:, None] - torch.arange(w - 1, -1, -1), -1))
    total = ins["probs_window"].sum(-1) + ins["probs_compressed"].sum(-1) + ins["sink"]
    torch.testing.assert_close(total, torch.ones_like(total))
    assert ((ins["sink"] > 0) & (ins["sink"] < 1)).all()
    if kind == "window":
        assert ins["probs_compressed"].shape[-1] == 0
        return
    m = a.ratio
    cidx = ins["compressed_idx"][0]
    n_vis = visible_entries(t, m)
    assert (cidx[: m - 1] == -1).all()               # t < m−1: no compressed entry at all
    assert ((cidx < n_vis[:, None]) | (cidx == -1)).all()
    n_valid = (cidx >= 0).sum(-1)
    expect = n_vis.clamp(max=a.cfg.index_topk) if kind == "csa" else n_vis
    assert torch.equal(n_valid, expect)              # HCA: all visible; CSA: min(k, visible)
    assert ins["pool_weights"] is not None and ins["entries"].shape[1] == S // m
    if kind == "csa":
        sc = ins["index_scores"][0]
        assert (sc[torch.arange(S // m)[None] >= n_vis[:, None]] == float("-inf")).all()


def test_nan_input_is_not_silently_dropped():
    a = make("csa")
    x = torch.randn(1, 20, 128)
    x[:, 9] = float("nan")
    with torch.no_grad():
        y = a(x)
    assert torch.isfinite(y[:, :9]).all() and y[:, 9].isnan().all()


def test_batch_rows_are_independent():
    a = make("csa", seed=5)
    x = torch.randn(3, 30, 128)
    with torch.no_grad():
        y = a(x)
        for b in range(3):
            torch.testing.assert_close(a(x[b:b + 1]), y[b:b + 1], atol=1e-6, rtol=1e-5)


def test_bad_inputs_raise_clear_errors():
    a = make("csa")
    x = torch.randn(1, 4, 128)
    cases = [
        (lambda: a(torch.randn(4, 128)), "x"),
        (lambda: a(torch.randn(1, 4, 64)), "hidden_size=128"),
        (lambda: a(torch.ones(1, 4, 128, dtype=torch.long)), "floating point"),
        (lambda: a(x, start_pos=3), "start_pos = 3"),
        (lambda: a(x, start_pos=-1), "start_pos"),
        (lambda: a(x, 0, a.new_cache(2)), "batch"),
        (lambda: a(x, 0, make("hca").new_cache(1)), "kind"),
        (lambda: a(x, seq_lens=[4, 3]), "seq_lens"),
        (lambda: a.new_cache(0), "batch_size"),
    ]
    cache = a.new_cache(1)
    a(x, 0, cache)
    cases.append((lambda: a(x, 2, cache), "cache length \\(4"))
    # sliding_window must fit in max_position_embeddings (config rule), so it shrinks with it
    big = make("window", cfg=get_config("tiny").replace(max_position_embeddings=6, sliding_window=4))
    cases.append((lambda: big(torch.randn(1, 7, 128)), "max_position_embeddings = 6"))
    for fn, msg in cases:
        with pytest.raises(ValueError, match=msg):
            fn()
    cfg = get_config("tiny")
    cfg.index_topk = None                            # a config without a key the CSA layer needs
    with pytest.raises(ValueError, match="index_topk"):
        Attention(cfg, 1)
    Attention(cfg, 0)                                # ... which a window layer does not need
    with pytest.raises(ValueError, match="layer_id"):
        Attention(get_config("tiny"), 99)
    with pytest.raises(ValueError, match="mla"):
        Attention(get_config("v3"), 0)


def test_low_precision_simulation():
    a = make("csa", seed=6)
    x = torch.randn(1, 40, 128)
    with torch.no_grad():
        ref = a(x)
        a.low_precision = True
        a.inspect = True
        lp = a(x)
        cache = a.new_cache(1)
        dec = torch.cat([a(x[:, :9], 0, cache)] + [a(x[:, t:t + 1], t, cache) for t in range(9, 40)], 1)
    assert a.indexer.low_precision
    assert not torch.equal(lp, ref) and (lp - ref).abs().max() < 0.1 * ref.abs().max()
    torch.testing.assert_close(dec, lp, atol=2e-6, rtol=1e-5)
    # stored compressed entries: nope dims are FP8-representable after the block scale
    for stored in (cache.entries.get(), cache.window):
        e = torch.nn.functional.pad(stored[0, :, : a.head_dim - a.rope_dim], (0, 16))   # 48 → one 64-block
        assert torch.equal(quant.act_quant_fp8(e, 64), e)
        assert not torch.equal(quant.act_quant_fp8(stored[0, :, -64:], 64), stored[0, :, -64:])  # rope dims: not FP8


def test_kernels_plug_in_and_match_reference():
    """The Triton kernels (interpreted on CPU) drop into the layer through its switch object."""
    a = make("csa", seed=7)
    x = torch.randn(1, 22, 128)
    with torch.no_grad():
        ref = a(x)
        a.switches.kernels = True
        got = a(x)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)


def test_bf16_module_keeps_fp32_rope_frequencies():
    a = make("hca").to(torch.bfloat16)
    assert a.rope_freqs.dtype == torch.float32 and a.compressor.rope_freqs.dtype == torch.float32
    with torch.no_grad():
        y = a(torch.randn(1, 130, 128, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()


def _probs_case(seed, B=2, S=5, H=3, D=8, N=11, K=6):
    g = torch.Generator().manual_seed(seed)
    q, kv = torch.randn(B, S, H, D, generator=g), torch.randn(B, N, D, generator=g)
    sink = torch.randn(H, generator=g)
    idx = torch.randint(-1, N, (B, S, K), generator=g)
    idx[0, 1, 2] = idx[0, 1, 3] = 4                   # a row listed twice counts twice
    idx[1, 2] = -1                                    # a query that reads nothing but the sink
    return q, kv, sink, idx


@pytest.mark.parametrize("seed", range(4))
def test_dense_attn_probs_equals_the_gather(seed):
    from v4lab.attention import dense_attn_probs
    q, kv, sink, idx = _probs_case(seed)
    p_ref, s_ref = sparse_attn_probs(q, kv, sink, idx, 0.3)
    p, s = dense_attn_probs(q, kv, sink, idx, 0.3)
    torch.testing.assert_close(p, p_ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(s, s_ref, rtol=1e-6, atol=1e-7)
    assert torch.equal(s[1, 2], torch.ones(3)) and (p[1, 2] == 0).all()
    # a NaN in a row no query lists never reaches the probabilities
    unlisted = sorted(set(range(kv.shape[1])) - set(idx[idx >= 0].tolist()))
    if unlisted:
        kv2 = kv.clone()
        kv2[:, unlisted[0]] = float("nan")
        torch.testing.assert_close(dense_attn_probs(q, kv2, sink, idx, 0.3)[0], p)
    # nothing listed at all: only the sink
    p0, s0 = dense_attn_probs(q, kv, sink, torch.full_like(idx, -1), 0.3)
    assert (p0 == 0).all() and torch.equal(s0, torch.ones_like(s0))


def test_attn_probs_takes_both_paths_with_one_result(monkeypatch):
    from v4lab import attention as A
    seen = []
    for rows, n_q in ((4, 64), (4000, 64)):          # few distinct rows → dense; ~256 distinct rows → gather
        g = torch.Generator().manual_seed(rows)
        q, kv = torch.randn(1, n_q, 2, 8, generator=g), torch.randn(1, rows, 8, generator=g)
        idx = torch.randint(0, rows, (1, n_q, 4), generator=g)
        path = A.choose_attn_path(2, n_q, int(torch.unique(idx).numel()), 4, 8)
        seen.append(path)
        p, s = A.attn_probs(q, kv, torch.zeros(2), idx, 0.5)
        p_ref, s_ref = sparse_attn_probs(q, kv, torch.zeros(2), idx, 0.5)
        torch.testing.assert_close(p, p_ref, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(s, s_ref, rtol=1e-6, atol=1e-7)
    assert seen == ["dense", "gather"]


@pytest.mark.parametrize("seed", range(4))
def test_attn_inspect_twins_equal_the_attention_and_its_probabilities(seed):
    """sparse/dense_attn_inspect: o exactly as sparse/dense_attn, p and the sink as sparse_attn_probs, on
    duplicated slots, −1 slots, a sink-only query and a NaN row nobody lists."""
    from v4lab.attention import dense_attn, dense_attn_inspect, sparse_attn_inspect
    q, kv, sink, idx = _probs_case(seed)
    p_ref, s_ref = sparse_attn_probs(q, kv, sink, idx, 0.3)
    for fn, attn in ((sparse_attn_inspect, sparse_attn), (dense_attn_inspect, dense_attn)):
        o, p, s = fn(q, kv, sink, idx, 0.3)
        assert torch.equal(o, attn(q, kv, sink, idx, 0.3)), fn.__name__
        torch.testing.assert_close(p, p_ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(s, s_ref, rtol=1e-6, atol=1e-6)
        assert (p[1, 2] == 0).all() and torch.allclose(s[1, 2], torch.ones(3))
    unlisted = sorted(set(range(kv.shape[1])) - set(idx[idx >= 0].tolist()))
    if unlisted:
        kv2 = kv.clone()
        kv2[:, unlisted[0]] = float("nan")
        o, p, s = dense_attn_inspect(q, kv2, sink, idx, 0.3)
        assert torch.isfinite(o).all()
        torch.testing.assert_close(p, p_ref, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="dense_attn_inspect"):
        dense_attn_inspect(q, kv, sink, idx[..., None], 0.3)


@pytest.mark.parametrize("kind", ["window", "csa", "hca"])
def test_inspected_forward_matches_the_plain_one_and_recomputed_probabilities(kind):
    """Inspection takes the probabilities from the attention's own pass: the output is bit-identical to
    the plain forward's, and the recorded probabilities equal sparse_attn_probs recomputed from q."""
    a = make(kind, seed=3)
    x = torch.randn(1, 300, a.cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = a(x)
        a.inspect = True
        yi = a(x)
    assert torch.equal(y, yi)
    rec = a.last_inspect
    p = torch.cat([rec["probs_window"], rec["probs_compressed"]], -1)
    total = p.sum(-1) + rec["sink"]
    torch.testing.assert_close(total, torch.ones_like(total), rtol=0, atol=1e-5)
    assert (rec["probs_compressed"][rec["compressed_idx"][:, :, None, :].expand_as(rec["probs_compressed"]) < 0]
            == 0).all()
