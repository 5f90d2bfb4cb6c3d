"""Real-weights views and the streaming forward, on a synthetic `tiny` release in the official layout."""
import json
import shutil

import pytest
import torch

import v4lab
from v4lab import real
from v4lab.config import get_config
from v4lab.mhc import hc_pre_coeffs, sinkhorn

PROMPT_IDS = [0, 17, 301, 5, 99, 42, 7, 250, 3, 511, 64, 128]       # 12 tokens: CSA layers get 3 entries


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    from v4lab.viz.real import write_demo_release  # synthetic tiny release + word-level tokenizer
    return write_demo_release(tmp_path_factory.mktemp("real") / "V4-tiny", seed=0)


@pytest.fixture(scope="module")
def model(release):
    m = v4lab.load(release)
    m.eval()
    for b in m.layers:
        b.attn.inspect = b.attn.kind == "csa"
    return m


@pytest.fixture(scope="module")
def streamed(release):
    return real.stream_forward(PROMPT_IDS, release, progress=False)


def assert_one_layer_at_a_time(ledger, cfg):
    """The loader's bookkeeping: never two groups (layers / embed / head) held together, and never more
    than one layer's non-expert weights + one expert."""
    assert ledger.max_groups == 1, "weights of two layers were held at once"
    assert ledger.peak_bytes <= real.layer_weight_bound(cfg), (ledger.peak_bytes, real.layer_weight_bound(cfg))


# ------------------------------------------------------------------------------------------------ forward
def test_stream_equals_in_memory_model(streamed, model):
    with torch.no_grad():
        ref = model(torch.tensor([PROMPT_IDS]))
    assert streamed.logits.shape == ref.shape
    assert (streamed.logits - ref).abs().max().item() <= 1e-5
    for r, b in zip(streamed.routing, model.layers):                 # same routing, layer by layer
        assert torch.equal(r["idx"], b.ffn.last_routing["idx"])
        assert torch.allclose(r["weights"], b.ffn.last_routing["weights"], atol=1e-6)
        assert r["experts"] == sorted(set(r["idx"].reshape(-1).tolist()))
        assert r["hash"] == model.cfg.is_hash_layer(r["layer"]) and r["kind"] == model.cfg.layer_kind(r["layer"])
    csa = [i for i in range(model.cfg.num_hidden_layers) if model.cfg.layer_kind(i) == "csa"]
    assert sorted(streamed.index_selections) == csa
    for i in csa:
        assert torch.equal(streamed.index_selections[i], model.layers[i].attn.last_inspect["selected"][0])
        assert (streamed.index_selections[i] >= 0).any()              # the indexer did pick entries


def test_stream_bf16_low_precision(release):
    """The other dtype and the FP8/FP4 simulation flag follow the in-memory model too."""
    ids = PROMPT_IDS[:8]
    res = real.stream_forward(ids, release, dtype=torch.bfloat16, low_precision=True, progress=False)
    m = v4lab.load(release, dtype=torch.bfloat16)
    m.set_flags(low_precision=True)
    with torch.no_grad():
        ref = m(torch.tensor([ids])).float()
    assert (res.logits - ref).abs().max().item() <= 1e-5
    assert res.ledger.peak_bytes <= real.layer_weight_bound(get_config("tiny"), torch.bfloat16)


def test_wrong_expert_is_caught(release, model, monkeypatch):
    """Reading the neighbouring expert instead of the selected one must break the logits check."""
    orig = real.StreamingLoader.expert
    monkeypatch.setattr(real.StreamingLoader, "expert", lambda self, i, e: orig(self, i, (e + 1) % 8))
    res = real.stream_forward(PROMPT_IDS[:6], release, progress=False)
    with torch.no_grad():
        ref = model(torch.tensor([PROMPT_IDS[:6]]))
    assert (res.logits - ref).abs().max().item() > 1e-5


def test_one_layer_at_a_time(streamed, release):
    cfg = get_config("tiny")
    led = streamed.ledger
    assert_one_layer_at_a_time(led, cfg)
    assert led.held_bytes == 0                                      # everything dropped at the end
    for r in streamed.routing:                                      # only the selected experts were read
        read = {int(n.split(".")[4]) for op, g, n, _, _ in led.events
                if op == "hold" and g == f"layer.{r['layer']}" and ".experts." in n}
        assert read == set(r["experts"])
    holds = [g for op, g, *_ in led.events if op == "hold"]
    assert holds[0] == "embed" and holds[-1] == "head"
    assert any("embed.weight[" in n for op, g, n, *_ in led.events)   # embedding read by rows


def test_leaking_loader_is_caught(release, monkeypatch):
    """A loader that keeps every layer alive must fail the bookkeeping check."""
    kept = []
    orig = real.StreamingLoader.block

    def leaky(self, i, low_precision=False):
        kept.append(orig(self, i, low_precision))
        return kept[-1]

    monkeypatch.setattr(real.StreamingLoader, "block", leaky)
    res = real.stream_forward(PROMPT_IDS[:4], release, progress=False)
    with pytest.raises(AssertionError, match="two layers"):
        assert_one_layer_at_a_time(res.ledger, get_config("tiny"))


def test_text_prompt_uses_download_tokenizer(release, streamed):
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(release / "tokenizer.json"))
    text = "w14 w298 w508 w61"                                       # w508 is unknown -> [UNK]
    ids = real.encode(tok, text, get_config("tiny"))
    assert ids[0] == 0 and ids[1:] == tok.encode(text).ids and 2 in ids
    res = real.stream_forward(text, release, progress=False)
    assert res.ids == ids and res.tokens[0] == "<｜begin▁of▁sentence｜>"
    with torch.no_grad():
        again = real.stream_forward(ids, release, progress=False)
    assert torch.equal(res.logits, again.logits)


# ------------------------------------------------------------------------------------------------ errors
def test_missing_tokenizer(release, tmp_path):
    d = tmp_path / "no-tok"
    shutil.copytree(release, d)
    (d / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="tokenizer.json.*not found"):
        real.stream_forward("w1 w2", d, progress=False)
    assert "WITHOUT tokenizer.json" in real.real_weights_status(d)


def test_tokenizer_too_big_for_config(release, tmp_path):
    d = tmp_path / "big-tok"
    shutil.copytree(release, d)
    from v4lab.viz.real import demo_tokenizer
    demo_tokenizer(600).save(str(d / "tokenizer.json"))             # 603 tokens > vocab_size 512
    with pytest.raises(ValueError, match="603 tokens but config vocab_size = 512"):
        real.stream_forward("w1 w2", d, progress=False)


def test_config_mismatch(release, tmp_path):
    with pytest.raises(ValueError, match="config mismatch.*hidden_size: download 128 != expected 4096"):
        real.stream_forward(PROMPT_IDS, release, expect="v4-flash", progress=False)
    d = tmp_path / "bad-config"
    shutil.copytree(release, d)
    c = json.loads((d / "config.json").read_text())
    c["moe_intermediate_size"] = 256                                 # config.json no longer fits the shards
    (d / "config.json").write_text(json.dumps(c))
    with pytest.raises(ValueError, match="ffn.experts.0.w1"):
        real.stream_forward(PROMPT_IDS, d, progress=False)


def test_bad_prompts(release):
    with pytest.raises(ValueError, match="vocab_size = 512"):
        real.stream_forward([1, 512], release, progress=False)
    with pytest.raises(ValueError, match="prompt"):
        real.stream_forward([], release, progress=False)
    with pytest.raises(ValueError, match="max_tokens"):
        real.stream_forward(list(range(20)), release, progress=False, max_tokens=8)


def test_status_and_path(monkeypatch, release, tmp_path):
    monkeypatch.delenv("V4LAB_REAL_WEIGHTS", raising=False)
    msg = real.real_weights_status()
    assert "not set" in msg and "V4LAB_REAL_WEIGHTS=" in msg
    with pytest.raises(ValueError, match="V4LAB_REAL_WEIGHTS"):
        real.open_real()
    monkeypatch.setenv("V4LAB_REAL_WEIGHTS", str(release))
    assert real.real_weights_path() == release
    assert real.real_weights_status().startswith("Real weights:") and "6 layers" in real.real_weights_status()
    monkeypatch.setenv("V4LAB_REAL_WEIGHTS", str(tmp_path / "nowhere"))
    assert real.real_weights_status().startswith("$V4LAB_REAL_WEIGHTS points to") and "not usable" in \
        real.real_weights_status()
    msg = real.real_weights_status(tmp_path / "elsewhere")            # the argument, not the variable, is named
    assert msg.startswith("path = ") and "elsewhere" in msg and "not usable" in msg


# ------------------------------------------------------------------------------------------------ views
@pytest.mark.parametrize("site", ["attn", "ffn"])
def test_mhc_static(release, model, site):
    cfg = model.cfg
    n = cfg.hc_mult
    for layer in (0, cfg.num_hidden_layers - 1):
        v = real.mhc_static(release, layer, site)
        blk = model.layers[layer]
        base = getattr(blk, f"hc_{site}_base")
        assert torch.allclose(v["comb"].sum(-2), torch.ones(n), atol=1e-5)          # column-stochastic
        assert torch.equal(v["h_res"], v["comb"].T)
        assert torch.allclose(v["comb"], sinkhorn(base[2 * n:].view(n, n), cfg.hc_sinkhorn_iters, cfg.hc_eps))
        # the same as the full pre-mix with the input-dependent term switched off (fn = 0)
        fn0 = torch.zeros_like(getattr(blk, f"hc_{site}_fn"))
        pre, post, comb = hc_pre_coeffs(torch.randn(1, n * cfg.hidden_size), fn0, getattr(blk, f"hc_{site}_scale"),
                                        base, cfg.rms_norm_eps, cfg.hc_eps, cfg.hc_sinkhorn_iters)
        assert torch.allclose(v["pre"], pre[0]) and torch.allclose(v["post"], post[0])
        assert torch.allclose(v["comb"], comb[0], atol=1e-7)
    head = real.mhc_static(release, 0, "head")
    assert head["pre"].shape == (n,)
    with pytest.raises(ValueError, match="site"):
        real.mhc_static(release, 0, "mlp")


def test_sinks_and_ape(release, model):
    s = real.attn_sinks(release)
    assert s.shape == (6, 4)
    assert torch.equal(s, torch.stack([b.attn.attn_sink.detach() for b in model.layers]))
    assert torch.equal(real.compressor_ape(release, 1), model.layers[1].attn.compressor.ape.detach())
    assert torch.equal(real.compressor_ape(release, 1, indexer=True),
                       model.layers[1].attn.indexer.compressor.ape.detach())
    assert real.compressor_ape(release, 2).shape == (128, 64)                       # HCA: one stream
    with pytest.raises(ValueError, match="no compressor"):
        real.compressor_ape(release, 0)
    with pytest.raises(ValueError, match="only CSA"):
        real.compressor_ape(release, 2, indexer=True)


def test_fp4_histograms(release):
    from v4lab.checkpoint import CheckpointReader
    cfg = get_config("tiny")
    h = real.expert_fp4_histograms(release, 3, experts=[0, 5])
    d, inter = cfg.hidden_size, cfg.moe_intermediate_size
    assert int(h["codes"].sum()) == 2 * 3 * d * inter
    assert int(h["e8m0"].sum()) == 2 * 3 * d * inter // 32
    r = CheckpointReader(release)
    w = r.get("layers.3.ffn.experts.5.w2.weight").view(torch.uint8)
    one = real.expert_fp4_histograms(release, 3, experts=[5], projections=("w2",))
    expect = torch.bincount(torch.cat([w & 0xF, w >> 4]).reshape(-1).long(), minlength=16)
    assert torch.equal(one["codes"], expect)
    assert h["values"][7] == 6.0 and h["values"][15] == -6.0 and h["values"][1] == 0.5
    with pytest.raises(ValueError, match="experts"):
        real.expert_fp4_histograms(release, 3, experts=[8])


def test_hash_tables_and_load(release, model):
    tabs = real.hash_tables(release)
    assert sorted(tabs) == [0, 1]
    assert torch.equal(tabs[0], model.layers[0].ffn.gate.tid2eid)
    out = real.hash_load(release, "w1 w2 w3 w1")
    ids = out["ids"]
    assert len(ids) == 4
    for i, load in out["load"].items():
        assert int(load.sum()) == 4 * get_config("tiny").num_experts_per_tok
        assert torch.equal(load, torch.bincount(tabs[i][torch.tensor(ids)].reshape(-1), minlength=8))


# ------------------------------------------------------------------------------------------------ figures
def test_figure_builders(release, streamed, monkeypatch):
    from v4lab.viz import real as vr
    monkeypatch.delenv("V4LAB_REAL_WEIGHTS", raising=False)
    assert not vr.configured()
    monkeypatch.setenv("V4LAB_REAL_WEIGHTS", str(release))
    assert vr.configured()
    f = vr.build_mhc(layer=2, site="ffn")
    assert len(f.data) == 3 and f.data[0].type == "heatmap"
    assert [list(r) for r in f.data[0].z] == real.mhc_static(release, 2, "ffn")["h_res"].tolist()
    assert len(vr.build_mhc_layers().data[0].y) == 6
    assert len(vr.build_sinks().data[0].z) == 6
    assert len(vr.build_ape(layer=1).data[0].z) == 8                   # CSA: 4 own + 4 previous-window slots
    fp4 = vr.build_fp4(layer=3, experts=(0,))
    assert sum(fp4.data[0].y) == pytest.approx(1.0) and sum(fp4.data[1].y) == 3 * 128 * 128 // 32
    assert len(vr.build_hash_load(text="w1 w2 w3").data) == 2
    assert len(vr.build_routing(streamed).data[0].z) == 6
    ind = vr.build_indexer(streamed, 1)
    assert sum(map(sum, ind.data[0].z)) == int((streamed.index_selections[1] >= 0).sum())
    with pytest.raises(ValueError, match="CSA layers"):
        vr.build_indexer(streamed, 0)
    assert len(vr.top_tokens_text(streamed).splitlines()) == len(PROMPT_IDS)
