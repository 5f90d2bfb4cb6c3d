"""Notebook 02's figures: the inspector swept over text, position, layer and head, checked against the
model's own inspection record; the cost calculator checked against v4lab.accounting; the notebook loader."""

import pytest
import torch

from v4lab import accounting, get_config
from v4lab.model import V4Model
from v4lab.viz import attention as A
from v4lab.viz import trained
from v4lab.viz.common import sweep
from v4lab.viz.tour import CONTEXT_STOPS


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    model = V4Model(get_config("tiny")).eval()
    tok = trained.byte_tokenizer()
    return model, tok, {"source": "synthetic", "synthetic": True, "path": "", "config": "tiny", "description": "test"}


@pytest.fixture
def notebook_model(monkeypatch, small_model):
    monkeypatch.setattr(trained, "trained_model", lambda data_dir=None: small_model)
    return small_model


def _ys(tr):
    return list(tr.y) if tr.y is not None else []


def _xs(tr):
    return list(tr.x) if tr.x is not None else []


@pytest.mark.parametrize("static", [True, False])
def test_position_layer_head_sweeps_match_the_inspection(notebook_model, static):
    model, _, _ = notebook_model
    w = A.InspectWidget(static=static)
    run = w.run
    cfg, S, wnd = model.cfg, run.n_tokens, model.cfg.sliding_window
    assert A.default_text() == A.DEFAULT_TEXT                        # a synthetic model ships no held-out text
    assert S == min(A.MAX_TOKENS, len(trained.encode(notebook_model[1], A.DEFAULT_TEXT)[0]))
    seen = set()
    layers = None if static else [1, 2]                             # live: one CSA and one HCA layer
    for layer, _ in sweep(w, "layer", layers):
        kind, m = cfg.layer_kind(layer), cfg.compress_ratio(layer)
        for pos, _ in sweep(w, "position"):
            f = w.fig.data
            # the raw window: exactly positions max(0, t-w+1)..t
            assert _xs(f[0]) == list(range(max(0, pos - wnd + 1), pos + 1))
            vis = (pos + 1) // m if m else 0
            entries = sorted(int(round((x - (m - 1) / 2) / m)) for x in _xs(f[1])) if m else []
            if kind == "window":
                assert entries == [] and _ys(f[3]) == [] and _xs(f[5]) == []
            elif kind == "hca":
                assert entries == list(range(vis))                  # HCA: every visible entry
                assert _ys(f[3]) == []
            else:                                                  # CSA: the top-k of the shown index scores
                sc = torch.tensor(_ys(f[3]))
                assert len(sc) == vis
                k = min(cfg.index_topk, vis)
                want = sorted(sc.sort(descending=True, stable=True).indices[:k].tolist())
                assert entries == want == sorted(_xs(f[4]))
            # one softmax over window + compressed + sink
            total = sum(_ys(f[0])) + sum(_ys(f[1])) + f[2].y[0]
            assert total == pytest.approx(1.0, abs=1e-5)
            assert 0 < f[2].y[0] < 1
            # pooling weights: each attended entry's slots (mean over channels) sum to 1
            for row in ([] if f[5].z is None else f[5].z):     # gaps: None (built) or NaN (updated)
                assert sum(v for v in row if v is not None and v == v) == pytest.approx(1.0, abs=1e-5)
            seen.add(w.fig.layout.title.text)
        w.on_position(S - 1)
    assert len(seen) >= len(w.sweep_values("position"))             # the title follows every slider
    heads = []
    w.on_layer(1)
    for h, _ in sweep(w, "head"):
        heads.append(_ys(w.fig.data[0]) + _ys(w.fig.data[1]))
        ref = run.layers[1]["probs_window"][S - 1, h]
        assert _ys(w.fig.data[0]) == pytest.approx(ref.tolist(), abs=0)
    assert len({tuple(x) for x in heads}) == cfg.num_attention_heads


def test_text_sweep_reruns_once_and_clamps_the_position(notebook_model):
    w = A.InspectWidget(static=False)
    lengths = {}
    for text, _ in sweep(w, "text"):
        run = A.run_text(text)
        lengths[text] = run.n_tokens
        assert w.state["position"] <= run.n_tokens - 1
        assert w.controls["position"].max == run.n_tokens - 1
        # hover text of the window bars are the text's tokens
        assert w.fig.data[0].hovertext[-1].endswith(repr(run.tokens[w.state["position"]]))
    assert len(set(lengths.values())) > 1
    n_before = len(A._RUNS)
    w.on_text(list(trained.SAMPLE_TEXTS.values())[0])             # cached: no new forward
    assert len(A._RUNS) == n_before


def test_run_text_restores_inspect_and_equals_a_direct_forward(notebook_model):
    model, tok, _ = notebook_model
    text = "x = [i * i for i in range(10)]"
    run = A.run_text(text)
    assert all(not b.attn.inspect for b in model.layers)
    ids = trained.encode(tok, text)
    model.layers[1].attn.inspect = True
    with torch.no_grad():
        model(ids)
    model.layers[1].attn.inspect = False
    ref = model.layers[1].attn.last_inspect
    assert torch.equal(run.layers[1]["probs_compressed"], ref["probs_compressed"][0])
    assert torch.equal(run.layers[1]["index_scores"], ref["index_scores"][0])


def test_bad_values_name_the_control(notebook_model):
    w = A.InspectWidget(static=True)
    with pytest.raises(ValueError, match="position = 9999"):
        w.on_position(9999)
    with pytest.raises(ValueError, match="layer = 17"):
        w.on_layer(17)
    with pytest.raises(ValueError, match="head"):
        w.on_head(-2)
    with pytest.raises(ValueError, match="text"):
        w.on_text("")


def test_build_inspect_is_the_static_fallback(notebook_model):
    w = A.InspectWidget(static=True, layer=2, head=1, position=200)
    fig = A.build_inspect(A.DEFAULT_TEXT, 200, 2, 1)
    assert fig.to_plotly_json()["data"] == w.fig.to_plotly_json()["data"]


@pytest.mark.parametrize("static", [True, False])
def test_cost_sweep_matches_accounting(static):
    w = A.CostWidget(static=static)
    titles = set()
    for ctx, _ in sweep(w, "context"):
        kv = [t for t in w.fig.data if t.xaxis in (None, "x")]
        for part_tr, part in zip(kv, A.KV_PARTS):
            for m, y in zip(A.COST_MODELS, part_tr.y):
                want = (accounting.gqa8("v4-pro", ctx)["total_bytes"] if m == "gqa8" and part == "gqa_kv" else
                        0 if m == "gqa8" else accounting.kv_cache(m, ctx)["by_part"].get(part, 0))
                assert y == pytest.approx(want / 1e9)
        for m in ("v3.2", "v4-flash", "v4-pro"):
            i = A.COST_MODELS.index(m)
            got = sum(t.y[i] for t in w.fig.data[len(A.KV_PARTS):])
            assert got == pytest.approx(accounting.decode_flops(m, ctx)["total"] / 1e9)
        titles.add(w.fig.layout.title.text)
    assert len(titles) == len(CONTEXT_STOPS)
    kv_before = [list(t.y) for t in w.fig.data[:len(A.KV_PARTS)]]
    fl = {}
    for wt, _ in sweep(w, "weights"):
        fl[wt] = [list(t.y) for t in w.fig.data[len(A.KV_PARTS):]]
        assert [list(t.y) for t in w.fig.data[:len(A.KV_PARTS)]] == kv_before
    assert fl["A"] != fl["B"]
    with pytest.raises(ValueError, match="context = 1000"):
        w.on_context(1000)


def test_trained_model_falls_back_to_a_synthetic_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("V4LAB_CACHE", str(tmp_path / "cache"))
    empty = tmp_path / "data"
    empty.mkdir()
    assert trained.find_trained(empty) is None
    model, tok, info = trained.trained_model(empty)
    assert info["synthetic"] and "SYNTHETIC" in info["description"]
    assert model.cfg.num_hidden_layers == get_config("tiny").num_hidden_layers
    assert trained.trained_model(empty)[0] is model                 # cached
    ids = trained.encode(tok, "héllo")
    assert tok.decode(ids[0].tolist()) == "héllo" and int(ids.max()) < model.cfg.vocab_size
    # a directory with config.json + index is preferred (newest first); a tokenizer is required
    ckpt = trained.synthetic_checkpoint()
    fake = empty / "mine"
    fake.mkdir()
    for f in ("config.json", "model.safetensors.index.json"):
        (fake / f).write_text((ckpt / f).read_text())
    assert trained.find_trained(empty) == fake
    with pytest.raises(ValueError, match="tokenizer.json"):
        trained.load_dir(fake)
    # $V4LAB_WEIGHTS names the checkpoint to use
    monkeypatch.setenv("V4LAB_WEIGHTS", str(ckpt))
    m2, _, info2 = trained.trained_model()
    assert info2["source"] == "trained" and info2["path"] == str(ckpt)
    assert torch.equal(m2.embed.weight, model.embed.weight)         # the same weights, read through v4lab.load
    monkeypatch.setenv("V4LAB_WEIGHTS", str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="V4LAB_WEIGHTS"):
        trained.trained_model()
    trained._CACHE.clear()


def _fake_checkpoint(d, src):
    d.mkdir()
    for f in ("config.json", "model.safetensors.index.json"):
        (d / f).write_text((src / f).read_text())
    return d


def test_the_default_checkpoint_is_lab_v4_then_tiny_v4_by_name_not_by_age(tmp_path, monkeypatch):
    import os
    monkeypatch.setenv("V4LAB_CACHE", str(tmp_path / "cache"))
    ckpt = trained.synthetic_checkpoint()
    data = tmp_path / "data"
    data.mkdir()
    other = _fake_checkpoint(data / "aaa-other", ckpt)
    assert trained.find_trained(data) == other                       # not a preferred name: any, by name
    tiny = _fake_checkpoint(data / "tiny-v4", ckpt)
    assert trained.find_trained(data) == tiny
    lab = _fake_checkpoint(data / "lab-v4", ckpt)
    os.utime(tiny / "config.json", (4e9, 4e9))                       # tiny written later: lab-v4 still wins
    assert trained.find_trained(data) == lab == trained.checkpoint_path(data)
    assert trained.find_trained(data, name="tiny-v4") == tiny == trained.checkpoint_path(data, "tiny-v4")
    (lab / "model.safetensors.index.json").unlink()                  # half a checkpoint is no checkpoint
    assert trained.find_trained(data) == tiny
    with pytest.raises(ValueError, match="name = 'lab-v4': no checkpoint"):
        trained.checkpoint_path(data, "lab-v4")
    with pytest.raises(ValueError, match="name = '../x'"):
        trained.checkpoint_path(data, "../x")
    # $V4LAB_WEIGHTS overrides the search of data/, an explicit name overrides $V4LAB_WEIGHTS
    monkeypatch.setattr(trained, "DATA_DIR", data)
    monkeypatch.setenv("V4LAB_WEIGHTS", str(other))
    assert trained.checkpoint_path() == other
    assert trained.checkpoint_path(name="tiny-v4") == tiny
    monkeypatch.delenv("V4LAB_WEIGHTS")
    assert trained.checkpoint_path() == tiny


def test_the_suite_pins_tiny_v4():
    if trained.find_trained(name="tiny-v4") is None:
        pytest.skip("data/tiny-v4 is not in this checkout")
    _, _, info = trained.trained_model()
    assert info["name"] == "tiny-v4" and info["path"].endswith("tiny-v4")


# ------------------------------------------------------------------ the compression picture
def _bars(tr):
    """(first token, last token) of each bar of a trace drawn over token blocks."""
    return [(round(x - w / 2 + 0.5), round(x + w / 2 - 0.5)) for x, w in zip(_xs(tr), list(tr.width or []))]


@pytest.mark.parametrize("static", [True, False])
def test_compression_sweeps_match_the_inspection(notebook_model, static):
    model, _, _ = notebook_model
    w = A.CompressionWidget(static=static)
    run, cfg = w.run, model.cfg
    S = run.n_tokens
    assert w.state["layer"] == 1 and w.state["position"] == S - 1
    assert w.state["entry"] == A.top_entry(run, 1, S - 1)            # default: the entry the query attends most
    for layer, _ in sweep(w, "layer"):
        kind, m = cfg.layer_kind(layer), cfg.compress_ratio(layer)
        rec = run.layers[layer]
        n = rec["n_entries"]
        assert n == S // m
        for pos, _ in sweep(w, "position"):
            f = w.fig.data
            vis = (pos + 1) // m
            assert _bars(f[0]) == ([(0, m * vis - 1)] if vis else [])            # complete entries, one run
            assert _bars(f[1]) == ([(m * vis, m * n - 1)] if n > vis else [])    # the rest: not complete yet
            picked = [round(x - (m - 1) / 2) for x in _xs(f[3])]             # bar centres over own blocks
            if kind == "hca":
                assert picked == [m * s for s in range(vis)]                     # HCA: every complete entry
            else:
                sel = sorted(s for s in rec["selected"][pos].tolist() if s >= 0)
                assert picked == [m * s for s in sel] and len(sel) == min(cfg.index_topk, vis)
            att = A.attended_entries(run, layer, pos)
            assert [float(h.split("p = ")[1].split(" ")[0]) for h in f[3].hovertext] == \
                pytest.approx([att[s] for s in sorted(att)], rel=5e-3)
            assert _bars(f[4]) == [(max(0, pos - cfg.sliding_window + 1), pos)]  # the raw window
            assert f[5].x[0] < 0 and "sink" in f[5].name                          # the sink left of token 0
            assert list(f[6].x) == [pos]
        for e, _ in sweep(w, "entry"):
            f = w.fig.data
            toks = [p for p in A.entry_tokens(kind, m, e) if p >= 0]
            assert min(_xs(f[7])) == min(toks) - 0.5 and max(_xs(f[7])) == max(toks) + 0.5   # the outline
            prev, own = _xs(f[8]), _xs(f[9])
            assert own == list(range(m * e, m * e + m))
            assert prev == (list(range(max(0, m * (e - 1)), m * e)) if kind == "csa" else [])
            pool = rec["pool"][e]                                              # [slots, channels]
            assert torch.allclose(pool.sum(0), torch.ones(pool.shape[1]), atol=1e-5)   # a softmax per channel
            want = pool.mean(-1)[-len(prev + own):].clamp(min=A.POOL_FLOOR)
            assert _ys(f[8]) + _ys(f[9]) == pytest.approx(want.tolist(), rel=1e-6)
            assert f"entry {e} pools" in w.fig.layout.title.text
    with pytest.raises(ValueError, match="layer = 0"):
        w.on_layer(0)                                                       # window-only: nothing to picture
    for control in w.control_names:                                         # the defaults are valid values
        getattr(w, f"on_{control}")(w.defaults[control])
    assert w.state["layer"] == 1 and w.state["position"] == S - 1 and w.state["text"] == A.default_text()
    with pytest.raises(ValueError, match="entry = 9999"):
        w.on_entry(9999)


def test_compression_of_a_text_too_short_for_an_hca_entry_says_why(notebook_model):
    w = A.CompressionWidget(static=True, text="short text", layer=2)
    assert w.run.layers[2]["n_entries"] == 0
    assert _xs(w.fig.data[8]) == [] and _xs(w.fig.data[9]) == []
    assert any("no compressed entry" in a.text for a in w.fig.layout.annotations)
    assert "no entry: the text has 10 tokens" in w.fig.layout.title.text


# ------------------------------------------------------------------ window vs CSA vs HCA
@pytest.mark.parametrize("static", [True, False])
def test_compare_sweeps_match_the_inspection(notebook_model, static):
    model, _, _ = notebook_model
    w = A.CompareWidget(static=static)
    run, cfg = w.run, model.cfg
    layers = A.first_layers(run)
    assert layers == {"window": 0, "csa": 1, "hca": 2}
    for measure, _ in sweep(w, "measure"):
        for head in ("mean", 1):
            w.on_head(head)
            for pos, _ in sweep(w, "position"):
                f = w.fig.data
                for r, layer in enumerate(layers.values()):
                    win, ent, unread, sink = f[5 * r:5 * r + 4]
                    assert _xs(win) == list(range(max(0, pos - cfg.sliding_window + 1), pos + 1))
                    att = A.attended_entries(run, layer, pos, head)
                    m = run.ratios[layer]
                    assert [round(x - (m - 1) / 2) // m for x in _xs(ent)] == sorted(att)
                    if measure == "visible":
                        assert set(_ys(win) + _ys(ent)) <= {1.0}
                        continue
                    rec = run.layers[layer]
                    pw = rec["probs_window"][pos]
                    pw = pw.mean(0) if head == "mean" else pw[head]
                    assert sum(_ys(win)) == pytest.approx(float(pw.sum()), abs=1e-5)
                    total = sum(_ys(win)) + sum(_ys(ent)) + sink.y[0]          # one softmax with the sink
                    assert total == pytest.approx(1.0, abs=1e-4)
                assert w.fig.layout.title.text.startswith(f"query {pos} ")
    with pytest.raises(ValueError, match="measure = 'both'"):
        w.on_measure("both")
    with pytest.raises(ValueError, match="head = 7"):
        w.on_head(7)


def test_a_new_text_shows_running_and_runs_the_model_once(notebook_model, monkeypatch):
    calls, seen = [], []
    real = A._run
    w = A.CompressionWidget(static=False)

    def counting(text, model, tok):
        calls.append(text)
        seen.append(w.status.value)
        return real(text, model, tok)
    monkeypatch.setattr(A, "_run", counting)
    text = "a text no widget has run yet, for the running state"
    w._on_change("text", text)
    assert calls == [text] and seen[0].startswith("<i>running…")      # shown while the model runs
    assert w.status.value == ""                                         # and cleared after
    assert w.controls["position"].max == w.run.n_tokens - 1
    w._on_change("position", 3)
    w._on_change("text", text)
    assert calls == [text]                                              # cached: no second run
    w._on_change("text", "")
    assert "must be a non-empty string" in w.status.value and "running" not in w.status.value


# ------------------------------------------------------------------ on the lab model (data/lab-v4)
@pytest.fixture
def lab_model(monkeypatch):
    path = trained.find_trained(name="lab-v4")
    if path is None:
        pytest.skip("data/lab-v4 is absent (the lab model is trained separately; see data/README.md)")
    monkeypatch.setenv("V4LAB_WEIGHTS", str(path))
    return trained.trained_model()


@pytest.mark.slow
def test_lab_model_compression_shows_hca_with_16_entries(lab_model):
    w = A.CompressionWidget(static=True, layer=2)
    run = w.run
    assert run.n_tokens == A.MAX_TOKENS == 2048                         # the default: 2048 held-out tokens
    assert run.kinds[2] == "hca" and run.layers[2]["n_entries"] == 16
    assert _xs(w.fig.data[3]) == [128 * s + 63.5 for s in range(16)]      # all 16, over their own blocks
    w.on_layer(1)
    assert len(_xs(w.fig.data[3])) == lab_model[0].cfg.index_topk         # CSA: the indexer's top-k of 512


@pytest.mark.slow
def test_lab_model_compare_reads_window_csa_and_hca(lab_model):
    w = A.CompareWidget(static=True, measure="attention")
    cfg = lab_model[0].cfg
    f = w.fig.data
    assert [len(_xs(f[5 * r])) for r in range(3)] == [cfg.sliding_window] * 3
    assert len(_xs(f[6])) == cfg.index_topk and len(_xs(f[11])) == 16
    for r in range(3):
        assert sum(_ys(f[5 * r])) + sum(_ys(f[5 * r + 1])) + f[5 * r + 3].y[0] == pytest.approx(1.0, abs=1e-4)


def test_bench_typing_runs_the_model_once_per_new_text(monkeypatch):
    from v4lab.bench import widgets as bw
    if trained.find_trained(name="tiny-v4") is None:
        pytest.skip("data/tiny-v4 is not in this checkout")
    runs = []
    real = A._run
    monkeypatch.setattr(A, "_run", lambda text, model, tok: runs.append(text) or real(text, model, tok))
    (rec,) = bw._typing("tiny-v4", 24, 100.0, 3)
    assert rec["calls"] == 3 and len(runs) == 4 and len(set(runs)) == 4    # 1 to build the widget + 3 typed
    assert 20 <= rec["tokens"] <= 28 and rec["weights"] == "tiny-v4" and rec["target_p95_ms"] == 100.0
    assert rec["p50_ms"] <= rec["p95_ms"] <= rec["max_ms"] and rec["ok"] == (rec["p95_ms"] <= 100.0)
    assert bw._typing("no-such-model", 24, 100.0, 3) == []


def test_bench_records_a_widget_that_fails_and_goes_on(monkeypatch, tmp_path):
    import v4lab.viz as viz
    from v4lab.bench import widgets as bw

    class Broken:
        name = "x.broken"

        def __init__(self, **kw):
            raise ValueError("token = 129: must be an integer in [0, 124]")

    monkeypatch.setattr(viz, "load_all", lambda: {"x.broken": Broken, "attention.cost": A.CostWidget})
    monkeypatch.setattr(bw, "TYPING", ())
    recs = bw._run(True, tmp_path)                                       # widgets in name order
    assert recs[-1] == {"bench": "widgets", "widget": "x.broken", "control": "-", "ok": False,
                        "error": "token = 129: must be an integer in [0, 124]"}
    # the working widget's records come through (their "ok" is a latency verdict: not asserted in a test)
    assert {r["control"] for r in recs[:-1]} == {"context", "weights"} and all("p95_ms" in r for r in recs[:-1])
