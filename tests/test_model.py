"""The whole V4 model: names and shapes, meta builds of the real presets, cached decode, MTP alignment,
forced routes, load/save round trip, bad inputs."""
import json

import pytest
import torch

from v4lab import accounting
from v4lab.checkpoint import CheckpointReader, expected_keys, make_synthetic_checkpoint
from v4lab.config import get_config
from v4lab.model import Block, MTPBlock, V4Model, load, load_layer, save


@pytest.fixture(scope="module")
def tiny():
    return get_config("tiny")


@pytest.fixture(scope="module")
def model(tiny):
    torch.manual_seed(0)
    return V4Model(tiny).eval()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tiny):
    path = tmp_path_factory.mktemp("ck") / "synthetic"
    make_synthetic_checkpoint(tiny, path, seed=3)
    return path


def _ids(cfg, B, S, seed=0):
    return torch.randint(0, cfg.vocab_size, (B, S), generator=torch.Generator().manual_seed(seed))


def _logical_shape(shape, dt):
    return (shape[0], shape[1] * 2) if dt == "I8" else tuple(shape)


# ------------------------------------------------------------------------------------------ structure
def test_state_dict_names_and_shapes_equal_the_release_layout(model, tiny):
    exp = {k: v for k, v in expected_keys(tiny).items() if not k.endswith(".scale")}
    sd = model.state_dict()
    assert set(sd) == set(exp)
    for k, (shape, dt) in exp.items():
        assert tuple(sd[k].shape) == _logical_shape(shape, dt), k
        if dt == "F32":                                  # hc_*, attn_sink, ape, gate.bias stay fp32
            assert sd[k].dtype == torch.float32, k


@pytest.mark.parametrize("preset,ratios", [("v4-flash", [0, 0, 4, 128, 0]), ("v4-pro", [128, 128, 4, 128, 0])])
def test_meta_build_of_real_widths_allocates_nothing_and_counts_match(preset, ratios):
    # Real widths (all 256/384 experts, d = 4096/7168), 4 layers to keep the test fast; every layer kind,
    # hash and learned routers and the MTP block are present.
    cfg = get_config(preset).replace(num_hidden_layers=4, compress_ratios=ratios)
    m = V4Model(cfg, device="meta")
    assert all(p.is_meta for p in m.parameters())
    sd = m.state_dict()
    exp = {k: v for k, v in expected_keys(cfg).items() if not k.endswith(".scale")}
    assert set(sd) == set(exp)
    assert all(tuple(sd[k].shape) == _logical_shape(*exp[k]) for k in exp)
    n = sum(p.numel() for p in m.parameters()) + sum(b.numel() for k, b in m.named_buffers()
                                                     if k.endswith("gate.bias"))
    assert n == accounting.params(cfg)["total_with_mtp"]
    assert isinstance(m.mtp[0], MTPBlock) and m.mtp[0].attn.kind == "window"
    assert m.layers[0].ffn.gate.is_hash and not m.mtp[0].ffn.gate.is_hash


# ------------------------------------------------------------------------------------------ forward
def test_forward_shapes_and_hidden_streams(model, tiny):
    ids = _ids(tiny, 2, 9)
    with torch.no_grad():
        logits, mtp, hidden = model(ids, return_mtp=True, return_hidden=True)
    assert logits.shape == (2, 9, tiny.vocab_size)
    assert mtp.shape == (2, 8, tiny.vocab_size)
    assert hidden.shape == (2, 9, tiny.hc_mult, tiny.hidden_size)
    assert torch.isfinite(logits).all() and torch.isfinite(mtp).all()


def test_cached_decode_equals_full_forward_at_every_position(model, tiny):
    # Prefill chunks and single tokens, crossing two HCA windows (128, 256) and many CSA/window edges;
    # MTP runs on the cache too (its streams wait for the next token between calls).
    ids = _ids(tiny, 2, 266, seed=1)
    sched = [(0, 118)] + [(i, i + 1) for i in range(118, 131)] + [(131, 252)] + [(i, i + 1) for i in range(252, 266)]
    with torch.no_grad():
        full, full_mtp = model(ids, return_mtp=True)
        cache = model.new_cache(2)
        outs, mtps = [], []
        for a, b in sched:
            lg, mt = model(ids[:, a:b], cache=cache, return_mtp=True)
            outs.append(lg)
            mtps.append(mt)
    dec, dec_mtp = torch.cat(outs, 1), torch.cat(mtps, 1)
    assert dec.shape == full.shape and dec_mtp.shape == full_mtp.shape
    assert (dec - full).abs().max() < 1e-5
    assert (dec_mtp - full_mtp).abs().max() < 1e-5
    assert cache.pos == 266 and cache.layers[2].length == 266


def test_mtp_position_i_reads_token_i_plus_1_and_nothing_later(model, tiny):
    ids = _ids(tiny, 1, 12, seed=2)
    i = 5
    with torch.no_grad():
        _, base = model(ids, return_mtp=True)
        later = ids.clone()
        later[0, i + 2] = (later[0, i + 2] + 1) % tiny.vocab_size
        _, m_later = model(later, return_mtp=True)
        nxt = ids.clone()
        nxt[0, i + 1] = (nxt[0, i + 1] + 1) % tiny.vocab_size
        _, m_next = model(nxt, return_mtp=True)
    # (not bit-equal: the MoE groups tokens by expert, so a changed token reorders the GEMM rows)
    assert (m_later[:, : i + 1] - base[:, : i + 1]).abs().max() < 1e-6   # token i+2 is its target: unseen
    assert (m_next[:, i] - base[:, i]).abs().max() > 1e-3                # token i+1 is its input
    assert (m_next[:, : i] - base[:, : i]).abs().max() < 1e-6


def test_mtp_with_cache_must_be_requested_from_the_first_token(model, tiny):
    ids = _ids(tiny, 1, 6)
    cache = model.new_cache(1)
    with torch.no_grad():
        model(ids[:, :3], cache=cache)
        with pytest.raises(ValueError, match="MTP"):
            model(ids[:, 3:], cache=cache, return_mtp=True)
        assert cache.pos == 3 and cache.layers[0].length == 3      # the refused call moved nothing
        model(ids[:, 3:], cache=cache)


def test_flags_reach_every_block(tiny):
    m = V4Model(tiny, hc_mode="residual", low_precision=True, qat=True)
    assert all(b.hc_mode == "residual" and b.attn.low_precision and b.ffn.qat for b in m.blocks())
    m.set_flags(hc_mode="hc", low_precision=False)
    assert all(b.hc_mode == "hc" and not b.attn.low_precision and b.ffn.qat for b in m.blocks())
    with pytest.raises(ValueError, match="hc_mode"):
        m.set_flags(hc_mode="dense")
    with torch.no_grad():                           # every mode runs end to end
        for mode in ("mhc", "hc", "residual"):
            m.set_flags(hc_mode=mode, low_precision=mode == "mhc")
            assert torch.isfinite(m(_ids(tiny, 1, 5))).all()


# ------------------------------------------------------------------------------------------ routes
def test_forced_routes_reproduce_or_change_the_output(model, tiny):
    ids = _ids(tiny, 2, 10, seed=4)
    routes = model.route_only(ids, return_mtp=True)
    assert len(routes) == tiny.num_hidden_layers + 1
    assert [r is None for r in routes[:tiny.num_hidden_layers]] == [tiny.is_hash_layer(i) for i in range(6)]
    assert routes[2].shape == (20, tiny.num_experts_per_tok) and routes[-1].shape == (18, 2)
    with torch.no_grad():
        ref, ref_mtp = model(ids, return_mtp=True)
        same, same_mtp = model(ids, return_mtp=True, forced_routes=routes)
        moved = [None if r is None else (r + 1) % tiny.n_routed_experts for r in routes]
        other = model(ids, forced_routes=moved)
    assert torch.equal(same, ref) and torch.equal(same_mtp, ref_mtp)
    assert (other - ref).abs().max() > 1e-4
    assert torch.equal(model.layers[2].ffn.last_routing["idx"], moved[2])


def test_forced_routes_are_validated(model, tiny):
    ids = _ids(tiny, 1, 4)
    good = model.route_only(ids)
    with pytest.raises(ValueError, match=r"forced_routes\[0\].*hash"):
        model(ids, forced_routes=[torch.zeros(4, 2, dtype=torch.long)] + good[1:])
    with pytest.raises(ValueError, match=r"forced_routes\[2\]"):
        model(ids, forced_routes=good[:2] + [torch.zeros(3, 2, dtype=torch.long)] + good[3:])
    with pytest.raises(ValueError, match="forced_routes"):
        model(ids, forced_routes=good[:3])


# ------------------------------------------------------------------------------------------ generation
def test_generate_greedy_equals_argmax_of_full_forwards(model, tiny):
    prompt = _ids(tiny, 2, 5, seed=5)
    out = model.generate(prompt, max_new_tokens=4)
    seq = prompt
    with torch.no_grad():
        for _ in range(4):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)


def test_generate_sampling_is_seeded_and_top_k_1_is_greedy(model, tiny):
    prompt = _ids(tiny, 1, 4, seed=6)
    a = model.generate(prompt, 5, temperature=1.5, seed=7)
    b = model.generate(prompt, 5, temperature=1.5, seed=7)
    c = model.generate(prompt, 5, temperature=1.5, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    ids, mtp = model.generate(prompt, 3, return_mtp=True)
    assert torch.equal(model.generate(prompt, 3, temperature=1.0, top_k=1, seed=1), ids)
    assert mtp.shape == (1, ids.shape[1] - 2, tiny.vocab_size)
    with torch.no_grad():
        _, full_mtp = model(ids[:, :-1], return_mtp=True)
    assert (mtp - full_mtp).abs().max() < 1e-5


# ------------------------------------------------------------------------------------------ bad input
def test_bad_inputs_give_clear_errors(model, tiny):
    with pytest.raises(ValueError, match=r"input_ids.*vocab_size = 512"):
        model(torch.tensor([[1, 512]]))
    with pytest.raises(ValueError, match=r"input_ids.*-1"):
        model(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.tensor([1.0, 2.0]))
    short = V4Model(tiny.replace(max_position_embeddings=16))
    with pytest.raises(ValueError, match="max_position_embeddings = 16"):
        short(_ids(tiny, 1, 17))
    cache = short.new_cache(1)
    with torch.no_grad():
        short(_ids(tiny, 1, 16), cache=cache)
    with pytest.raises(ValueError, match="max_position_embeddings = 16"):
        short(_ids(tiny, 1, 1), cache=cache)
    with pytest.raises(ValueError, match="max_new_tokens"):
        short.generate(_ids(tiny, 1, 10), 7)
    cache = model.new_cache(1)
    with pytest.raises(ValueError, match="start_pos"):
        model(_ids(tiny, 1, 2), start_pos=3, cache=cache)
    with pytest.raises(ValueError, match="batch size"):
        model(_ids(tiny, 2, 2), cache=cache)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(_ids(tiny, 1, 2), 2, temperature=-1)


# ------------------------------------------------------------------------------------------ load / save
def test_synthetic_checkpoint_loads_runs_and_saves_back_byte_identically(ckpt, tiny, tmp_path):
    m = load(ckpt)
    assert m.cfg.to_dict() == tiny.to_dict()
    reader = CheckpointReader(ckpt)
    assert torch.equal(m.layers[1].attn.wq_b.weight, reader.get_dequantized("layers.1.attn.wq_b.weight"))
    assert torch.equal(m.mtp[0].ffn.experts[3].w2.weight, reader.get_dequantized("mtp.0.ffn.experts.3.w2.weight"))
    with torch.no_grad():
        assert torch.isfinite(m(_ids(tiny, 1, 20))).all()
    save(m, tmp_path / "out")
    files = sorted(p.name for p in ckpt.iterdir())
    assert files == sorted(p.name for p in (tmp_path / "out").iterdir())
    for f in files:
        assert (ckpt / f).read_bytes() == (tmp_path / "out" / f).read_bytes(), f

    # A changed FP8 weight is re-quantised; everything else keeps its bytes.
    with torch.no_grad():
        m.layers[0].attn.wkv.weight.mul_(2.0)
    save(m, tmp_path / "changed")
    a, b = CheckpointReader(ckpt), CheckpointReader(tmp_path / "changed")
    differ = [k for k in a.keys() if not torch.equal(a.get(k).view(torch.uint8) if a.get(k).element_size() == 1
                                                     else a.get(k), b.get(k).view(torch.uint8)
                                                     if b.get(k).element_size() == 1 else b.get(k))]
    assert differ == ["layers.0.attn.wkv.scale"]          # x2 is a power of two: codes stay, scales move
    assert torch.equal(b.get_dequantized("layers.0.attn.wkv.weight"), m.layers[0].attn.wkv.weight)


def test_load_one_layer_and_a_subset(ckpt, tiny):
    full = load(ckpt)
    blk = load_layer(ckpt, 3)
    assert isinstance(blk, Block) and blk.attn.kind == "csa"
    ref = full.layers[3].state_dict()
    assert set(blk.state_dict()) == set(ref)
    assert all(torch.equal(v, ref[k]) for k, v in blk.state_dict().items())
    assert isinstance(load_layer(ckpt, tiny.num_hidden_layers), MTPBlock)
    part = load(ckpt, layers=[1])
    assert not part.layers[1].hc_attn_fn.is_meta and part.layers[0].hc_attn_fn.is_meta
    with pytest.raises(ValueError, match="layer 0.*not loaded"):
        part(_ids(tiny, 1, 3))
    with pytest.raises(ValueError, match="layer"):
        load_layer(ckpt, 99)


def test_checkpoint_whose_config_and_tensors_disagree_is_rejected(ckpt, tmp_path):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    c = json.loads((bad / "config.json").read_text())
    c["moe_intermediate_size"] = 256                       # tensors were written for 128
    (bad / "config.json").write_text(json.dumps(c))
    with pytest.raises(ValueError, match=r"key 'layers\.0\..*expected"):
        load(bad)
    c["moe_intermediate_size"] = 128
    c["num_hash_layers"] = 1                                # layer 1 now expects gate.bias, has tid2eid
    (bad / "config.json").write_text(json.dumps(c))
    with pytest.raises(ValueError, match="layers.1.ffn.gate"):
        load(bad)
    with pytest.raises(ValueError, match="not a directory"):
        load(tmp_path / "nowhere")


def test_training_forward_reaches_every_parameter(tiny):
    # 132 tokens: the HCA compressor emits its first entry at 128, so every module takes part.
    torch.manual_seed(1)
    m = V4Model(tiny).train()
    ids = _ids(tiny, 1, 132, seed=9)
    logits, mtp = m(ids, return_mtp=True)
    loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]) + \
        0.3 * torch.nn.functional.cross_entropy(mtp[0, :-1], ids[0, 2:])
    loss.backward()
    no_grad = [k for k, p in m.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    # The lightning indexer only chooses (top-k): the LM loss cannot reach it (the report trains it with
    # its own objective). Everything else must get a finite gradient.
    assert no_grad and all(".attn.indexer." in k for k in no_grad), no_grad
    assert {k.split(".attn.")[0] for k in no_grad} == {f"layers.{i}" for i in range(6) if tiny.layer_kind(i) == "csa"}
    zero = [k for k, p in m.named_parameters() if k not in no_grad and p.grad.abs().max() == 0]
    assert all(".experts." in k for k in zero), zero      # only an expert nobody picked may see no gradient


def test_streams_are_the_forwards_final_streams_without_the_head():
    """model.streams(ids) = the hidden streams forward(return_hidden=True) returns, and it runs no head."""
    from v4lab.config import get_config
    from v4lab.model import V4Model
    torch.manual_seed(0)
    m = V4Model(get_config("tiny")).eval()
    ids = torch.randint(0, m.cfg.vocab_size, (2, 37))
    calls = []
    hook = m.head.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        _, hidden = m(ids, return_hidden=True)
        n_forward = len(calls)
        s = m.streams(ids)
    hook.remove()
    assert n_forward == 1 and len(calls) == 1          # the forward ran the head once, streams did not
    assert torch.equal(s, hidden)
    with pytest.raises(ValueError, match="input_ids"):
        m.streams(torch.full((1, 3), m.cfg.vocab_size))
