"""The official release layout: key set, synthetic round trip, lazy reads, and every bad-file case
(docs/design/v4-moe-mhc-fp4.md §8)."""
import json
import shutil
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from v4lab import checkpoint as C
from v4lab import quant as Q
from v4lab.config import get_config


# ----------------------------------------------------------------------------- key set (no allocation)
def _split(keys):
    return sum(1 for k in keys if not k.startswith("mtp.")), sum(1 for k in keys if k.startswith("mtp."))


@pytest.mark.parametrize("preset,main,mtp", [("v4-flash", 67_612, 1_575), ("v4-pro", 142_773, 2_343)])
def test_key_counts_match_the_release(preset, main, mtp):
    assert _split(C.expected_keys(get_config(preset))) == (main, mtp)


def test_flash_per_layer_counts():
    cfg = get_config("v4-flash")
    keys = C.expected_keys(cfg)
    count = {i: 0 for i in range(cfg.num_hidden_layers)}
    for k in keys:
        if k.startswith("layers."):
            count[int(k.split(".")[1])] += 1
    assert count[0] == count[1] == 1565 and count[2] == 1576      # window+hash, CSA+hash
    assert {count[i] for i in range(3, 43, 2)} == {1569} and {count[i] for i in range(4, 43, 2)} == {1576}


FLASH_ROWS = [  # spec §8.2, Flash column
    ("layers.0.attn_norm.weight", (4096,), "BF16"),
    ("layers.0.attn.wq_a.weight", (1024, 4096), "F8_E4M3"), ("layers.0.attn.wq_a.scale", (8, 32), "F8_E8M0"),
    ("layers.0.attn.wq_b.scale", (256, 8), "F8_E8M0"), ("layers.0.attn.wkv.scale", (4, 32), "F8_E8M0"),
    ("layers.0.attn.wo_a.weight", (8192, 4096), "F8_E4M3"), ("layers.0.attn.wo_a.scale", (64, 32), "F8_E8M0"),
    ("layers.0.attn.wo_b.weight", (4096, 8192), "F8_E4M3"), ("layers.0.attn.wo_b.scale", (32, 64), "F8_E8M0"),
    ("layers.0.attn.attn_sink", (64,), "F32"),
    ("layers.2.attn.compressor.ape", (4, 1024), "F32"), ("layers.3.attn.compressor.ape", (128, 512), "F32"),
    ("layers.2.attn.compressor.wkv.weight", (1024, 4096), "BF16"),
    ("layers.3.attn.compressor.wgate.weight", (512, 4096), "BF16"),
    ("layers.2.attn.indexer.wq_b.weight", (8192, 1024), "F8_E4M3"),
    ("layers.2.attn.indexer.wq_b.scale", (64, 8), "F8_E8M0"),
    ("layers.2.attn.indexer.weights_proj.weight", (64, 4096), "BF16"),
    ("layers.2.attn.indexer.compressor.ape", (4, 256), "F32"),
    ("layers.2.attn.indexer.compressor.norm.weight", (128,), "BF16"),
    ("layers.0.hc_attn_fn", (24, 16384), "F32"), ("layers.0.hc_ffn_base", (24,), "F32"),
    ("layers.0.hc_ffn_scale", (3,), "F32"),
    ("layers.2.ffn.gate.tid2eid", (129280, 6), "I64"), ("layers.3.ffn.gate.bias", (256,), "F32"),
    ("layers.0.ffn.gate.weight", (256, 4096), "BF16"),
    ("layers.5.ffn.shared_experts.w1.scale", (16, 32), "F8_E8M0"),
    ("layers.5.ffn.shared_experts.w2.weight", (4096, 2048), "F8_E4M3"),
    ("layers.7.ffn.experts.255.w1.weight", (2048, 2048), "I8"),
    ("layers.7.ffn.experts.255.w1.scale", (2048, 128), "F8_E8M0"),
    ("layers.7.ffn.experts.0.w2.weight", (4096, 1024), "I8"),
    ("layers.7.ffn.experts.0.w2.scale", (4096, 64), "F8_E8M0"),
    ("embed.weight", (129280, 4096), "BF16"), ("head.weight", (129280, 4096), "BF16"),
    ("hc_head_fn", (4, 16384), "F32"), ("hc_head_scale", (1,), "F32"),
    ("mtp.0.e_proj.weight", (4096, 4096), "F8_E4M3"), ("mtp.0.h_proj.scale", (32, 32), "F8_E8M0"),
    ("mtp.0.enorm.weight", (4096,), "BF16"), ("mtp.0.ffn.gate.bias", (256,), "F32"),
    ("mtp.0.hc_head_base", (4,), "F32"), ("mtp.0.ffn.experts.3.w3.weight", (2048, 2048), "I8"),
]


def test_flash_shapes_and_dtypes():
    keys = C.expected_keys(get_config("v4-flash"))
    for name, shape, dt in FLASH_ROWS:
        assert keys[name] == (shape, dt), name
    assert "layers.3.ffn.gate.tid2eid" not in keys and "layers.2.ffn.gate.bias" not in keys
    assert "layers.3.attn.indexer.wq_b.weight" not in keys and "layers.0.attn.compressor.ape" not in keys
    assert "mtp.0.attn.compressor.ape" not in keys and "mtp.0.ffn.gate.tid2eid" not in keys


def test_pro_expert_shapes_and_hca_hash_layers():
    keys = C.expected_keys(get_config("v4-pro"))
    assert keys["layers.9.ffn.experts.383.w1.weight"] == ((3072, 3584), "I8")
    assert keys["layers.9.ffn.experts.383.w1.scale"] == ((3072, 224), "F8_E8M0")
    assert keys["layers.9.ffn.experts.0.w2.scale"] == ((7168, 96), "F8_E8M0")
    assert keys["layers.0.attn.wo_a.weight"] == ((16384, 4096), "F8_E4M3")
    assert keys["layers.0.attn.compressor.ape"] == ((128, 512), "F32")      # Pro layers 0-1 are HCA
    assert keys["layers.1.ffn.gate.tid2eid"] == ((129280, 6), "I64")


def test_expert_format_choices():
    cfg = get_config("tiny")
    k8 = C.expected_keys(cfg.replace(expert_dtype="fp8"))
    assert k8["layers.3.ffn.experts.0.w1.weight"] == ((128, 128), "F8_E4M3")
    assert k8["layers.3.ffn.experts.0.w1.scale"] == ((1, 1), "F8_E8M0")
    kb = C.expected_keys(cfg.replace(quantization_config=None))
    assert kb["layers.3.ffn.experts.0.w1.weight"] == ((128, 128), "BF16")
    assert not any(k.endswith(".scale") for k in kb)
    with pytest.raises(ValueError, match="model_type"):
        C.expected_keys(get_config("v3"))


# ----------------------------------------------------------------------------- synthetic round trip
@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    cfg = get_config("tiny")
    path = C.make_synthetic_checkpoint(cfg, tmp_path_factory.mktemp("ck") / "tiny", seed=0)
    return cfg, path, C.synthetic_masters(cfg, seed=0)


def test_layout_files_index_and_mtp_shard(synth):
    cfg, path, _ = synth
    assert sorted(p.name for p in path.iterdir()) == [
        "config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", C.INDEX_FILE]
    idx = json.loads((path / C.INDEX_FILE).read_text())
    assert set(idx) == {"metadata", "weight_map"} and set(idx["weight_map"]) == set(C.expected_keys(cfg))
    assert {v for k, v in idx["weight_map"].items() if k.startswith("mtp.")} == {"model-00002-of-00002.safetensors"}
    assert {v for k, v in idx["weight_map"].items() if not k.startswith("mtp.")} == {"model-00001-of-00002.safetensors"}
    assert idx["metadata"]["total_size"] == sum(C.nbytes(*v) for v in C.expected_keys(cfg).values())
    with safe_open(str(path / "model-00001-of-00002.safetensors"), "pt") as f:
        assert f.get_slice("layers.3.ffn.experts.0.w1.weight").get_dtype() == "I8"
        assert f.get_slice("layers.3.ffn.experts.0.w1.scale").get_dtype() == "F8_E8M0"
        assert f.get_slice("layers.3.attn.wq_a.weight").get_dtype() == "F8_E4M3"


def test_synthetic_decodes_to_its_masters(synth):
    cfg, path, masters = synth
    r = C.CheckpointReader(path)
    r.validate(check_scales=True)
    assert r.config.to_dict() == cfg.to_dict()
    fp4_m, fp4_got = [], []
    for name, (_shape, dt) in C.expected_keys(cfg).items():
        if name.endswith(".scale"):
            continue
        m, got = masters[name], r.get_dequantized(name, torch.float32)
        assert got.shape == m.shape, name
        if dt == "I8":
            fp4_m.append(m)
            fp4_got.append(got)
        elif dt == "F8_E4M3":
            assert ((got - m).norm() / m.norm()) < 0.05, name
        elif dt == "BF16":
            assert torch.equal(got, m.bfloat16().float()), name
        else:
            assert torch.equal(got, m), name
    m, got = torch.stack(fp4_m), torch.stack(fp4_got)          # all routed experts, one comparison
    assert torch.equal(got, Q.fp4_fake_quant(m))
    assert (((got - m).flatten(1).norm(dim=1) / m.flatten(1).norm(dim=1)) < 0.2).all()
    tid = r.get("layers.0.ffn.gate.tid2eid")
    assert tid.dtype == torch.int64 and tid.shape == (cfg.vocab_size, cfg.num_experts_per_tok)
    assert all(len(set(row)) == cfg.num_experts_per_tok for row in tid.tolist())
    assert tid.min() >= 0 and tid.max() < cfg.n_routed_experts


def test_fp4_experts_convert_to_fp8_exactly(synth):
    _, path, _ = synth
    r = C.CheckpointReader(path)
    w, s = r.get("layers.3.ffn.experts.1.w2.weight"), r.get("layers.3.ffn.experts.1.w2.scale")
    q, s8 = Q.fp4_to_fp8(w, s)
    assert torch.equal(Q.fp8_block_dequantize(q, s8), r.get_dequantized("layers.3.ffn.experts.1.w2.weight"))


def test_rewrite_is_byte_identical(synth, tmp_path):
    cfg, path, _ = synth
    r = C.CheckpointReader(path)
    stored = {k: r.get(k) for k in r.keys()}
    out = C.write_checkpoint(stored, cfg, tmp_path / "again")
    for f in sorted(path.iterdir()):
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name


def test_small_shards_still_keep_mtp_last(synth, tmp_path):
    cfg, path, _ = synth
    r = C.CheckpointReader(path)
    out = C.write_checkpoint({k: r.get(k) for k in r.keys()}, cfg, tmp_path / "many", max_shard_bytes=200_000)
    r2 = C.CheckpointReader(out)
    shards = sorted(set(r2.weight_map.values()))
    assert len(shards) > 3 and shards[-1].endswith(f"-of-{len(shards):05d}.safetensors")
    assert {r2.weight_map[k] for k in r2.keys() if k.startswith("mtp.")} == {shards[-1]}
    assert not any(r2.weight_map[k] == shards[-1] for k in r2.keys() if not k.startswith("mtp."))
    r2.validate()
    assert torch.equal(r2.get_dequantized("layers.5.attn.wo_b.weight"), r.get_dequantized("layers.5.attn.wo_b.weight"))


def test_lazy_layer_and_expert_reads(synth, monkeypatch):
    cfg, path, _ = synth
    r = C.CheckpointReader(path)
    assert r._open == {}                                 # constructing reads headers only
    seen = []
    real_get = C.CheckpointReader.get
    monkeypatch.setattr(C.CheckpointReader, "get", lambda self, n: seen.append(n) or real_get(self, n))
    st = r.layer_state(3, torch.float32, experts=[5])
    assert all(n.startswith("layers.3.") for n in seen)
    assert {n.split(".")[4] for n in seen if ".experts." in n} == {"5"}
    assert "ffn.experts.5.w2.weight" in st and "ffn.experts.0.w1.weight" not in st
    assert st["ffn.experts.5.w1.weight"].shape == (cfg.moe_intermediate_size, cfg.hidden_size)
    assert not any(k.endswith(".scale") for k in st)
    mtp = r.layer_state(cfg.num_hidden_layers, torch.bfloat16, experts=[])
    assert "e_proj.weight" in mtp and mtp["e_proj.weight"].dtype == torch.bfloat16
    with pytest.raises(ValueError, match="layer index 99"):
        r.layer_state(99)
    with pytest.raises(ValueError, match=r"experts = \[8\]"):
        r.layer_state(3, experts=[8])


def test_state_dict_keys_are_expected_minus_scales(synth):
    cfg, path, _ = synth
    sd = C.CheckpointReader(path).state_dict(torch.float32)
    assert set(sd) == {k for k in C.expected_keys(cfg) if not k.endswith(".scale")}


# ----------------------------------------------------------------------------- writer refuses bad input
def test_writer_checks_before_writing(synth, tmp_path):
    cfg, _, masters = synth
    bad = dict(masters)
    del bad["layers.1.attn.wkv.weight"]
    with pytest.raises(ValueError, match=r"'layers.1.attn.wkv.weight': missing"):
        C.write_checkpoint(bad, cfg, tmp_path / "x")
    extra = {**masters, "layers.1.attn.extra": torch.zeros(3)}
    with pytest.raises(ValueError, match=r"'layers.1.attn.extra': unexpected key"):
        C.write_checkpoint(extra, cfg, tmp_path / "x")
    wrong = {**masters, "layers.1.attn.attn_sink": torch.zeros(5)}
    with pytest.raises(ValueError, match=r"'layers.1.attn.attn_sink': F32 \[5\], expected F32 \[4\]"):
        C.write_checkpoint(wrong, cfg, tmp_path / "x")
    assert list(tmp_path.iterdir()) == []


def test_writer_is_atomic_on_failure(synth, tmp_path, monkeypatch):
    cfg, path, _ = synth
    r = C.CheckpointReader(path)
    stored = {k: r.get(k) for k in r.keys()}
    import safetensors.torch as st
    calls = []
    real = st.save_file

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(*a, **k)

    monkeypatch.setattr(st, "save_file", flaky)
    with pytest.raises(OSError):
        C.write_checkpoint(stored, cfg, tmp_path / "x")
    assert list(tmp_path.iterdir()) == []                # no target, no temp dir left behind
    with pytest.raises(ValueError, match="already exists"):
        C.write_checkpoint(stored, cfg, path)


# ----------------------------------------------------------------------------- bad files
def _rewrite_shard(file, change):
    with safe_open(str(file), "pt") as f:
        ts = {k: f.get_tensor(k) for k in f.keys()}
    change(ts)
    save_file(ts, str(file), metadata={"format": "pt"})


def _set_index(d, change):
    p = d / C.INDEX_FILE
    idx = json.loads(p.read_text())
    change(idx["weight_map"])
    p.write_text(json.dumps(idx))


S1 = "model-00001-of-00002.safetensors"
S2 = "model-00002-of-00002.safetensors"


def _truncate(d):
    f = d / S1
    f.write_bytes(f.read_bytes()[:-1000])


def _bad_header(d):
    f = d / S1
    b = bytearray(f.read_bytes())
    (n,) = struct.unpack("<Q", b[:8])
    b[8:8 + n] = b"{ not json" + b" " * (n - 10)
    f.write_bytes(bytes(b))


def _wrong_dtype(d):
    key = "layers.2.attn_norm.weight"
    _rewrite_shard(d / S1, lambda ts: ts.__setitem__(key, ts[key].float()))


def _wrong_shape(d):
    _rewrite_shard(d / S1, lambda ts: ts.__setitem__("layers.4.attn.attn_sink", torch.zeros(7)))


def _missing_key(d):
    _rewrite_shard(d / S1, lambda ts: ts.pop("layers.1.ffn.experts.2.w3.scale"))
    _set_index(d, lambda wm: wm.pop("layers.1.ffn.experts.2.w3.scale"))


def _unexpected_key(d):
    _rewrite_shard(d / S2, lambda ts: ts.__setitem__("mtp.0.surprise", torch.zeros(2)))
    _set_index(d, lambda wm: wm.__setitem__("mtp.0.surprise", S2))


def _index_only_key(d):
    _set_index(d, lambda wm: wm.__setitem__("layers.0.ghost", S1))


def _missing_shard(d):
    (d / S2).unlink()


def _bad_index(d):
    (d / C.INDEX_FILE).write_text("{weight_map: oops")


def _bad_config(d):
    (d / "config.json").write_text('{"hidden_size": "big"')


def _nan_scale(d):
    def poke(ts):
        s = ts["layers.3.ffn.experts.4.w2.scale"].view(torch.uint8).clone()
        s[7, 1] = 255
        ts["layers.3.ffn.experts.4.w2.scale"] = s.view(torch.float8_e8m0fnu)
    _rewrite_shard(d / S1, poke)


# (corruption, when it is caught, message regex: file and key named)
BAD = [
    (_truncate, "open", rf"shard '.*{S1}'.*truncated"),
    (_bad_header, "open", rf"shard '.*{S1}': header is not JSON"),
    (_missing_shard, "open", rf"key 'mtp\.0\..*' points to missing shard '.*{S2}'"),
    (_index_only_key, "open", rf"shard '.*{S1}': key 'layers\.0\.ghost' listed in the index is not in it"),
    (_bad_index, "open", r"index '.*model.safetensors.index.json': not valid JSON"),
    (_bad_config, "open", r"config file '.*config.json': not valid JSON"),
    (_wrong_dtype, "validate",
     rf"shard '.*{S1}', key 'layers\.2\.attn_norm\.weight': stored F32 \[128\], expected BF16 \[128\]"),
    (_wrong_shape, "validate", r"key 'layers\.4\.attn\.attn_sink': stored F32 \[7\], expected F32 \[4\]"),
    (_missing_key, "validate", r"missing key 'layers\.1\.ffn\.experts\.2\.w3\.scale'"),
    (_unexpected_key, "validate", rf"shard '.*{S2}', key 'mtp\.0\.surprise': unexpected key"),
    (_nan_scale, "scales",
     rf"shard '.*{S1}', key 'layers\.3\.ffn\.experts\.4\.w2\.scale': NaN scale \(E8M0 255\) at \[7, 1\]"),
]


@pytest.mark.parametrize("corrupt,stage,msg", BAD, ids=[b[0].__name__[1:] for b in BAD])
def test_bad_files_give_clear_errors(synth, tmp_path, corrupt, stage, msg):
    _, path, _ = synth
    d = tmp_path / "ck"
    shutil.copytree(path, d)
    corrupt(d)
    if stage == "open":
        with pytest.raises(ValueError, match=msg):
            C.CheckpointReader(d)
        return
    r = C.CheckpointReader(d)
    if stage == "validate":
        with pytest.raises(ValueError, match=msg):
            r.validate()
        layer = int(msg.split("layers\\.")[1].split("\\.")[0]) if "layers\\." in msg else 6
        with pytest.raises(ValueError):                  # the layer read refuses too, returning nothing
            r.layer_state(layer)
    else:
        r.validate()                                     # headers are fine; the scale bytes are not
        with pytest.raises(ValueError, match=msg):
            r.validate(check_scales=True)
        with pytest.raises(ValueError, match=msg):
            r.layer_state(3, experts=[4])
        with pytest.raises(ValueError, match=msg):
            r.get_dequantized("layers.3.ffn.experts.4.w2.weight")
        assert r.layer_state(3, experts=[0])["ffn.experts.0.w2.weight"].isfinite().all()


def test_unknown_key_and_not_a_directory(synth, tmp_path):
    _, path, _ = synth
    r = C.CheckpointReader(path)
    with pytest.raises(ValueError, match="no key 'layers.0.nope'"):
        r.get("layers.0.nope")
    with pytest.raises(ValueError, match="not a directory"):
        C.CheckpointReader(tmp_path / "absent")


# ----------------------------------------------------------------------------- an independent decoder
@pytest.mark.slow
def test_transformers_loads_our_layout_to_the_same_values(synth):
    """HF transformers' DeepseekV4 loader (its own renames, FP8/FP4 decoders, nibble order, fused expert
    layout) reads the synthetic release with no missing/unexpected/mismatched keys and gets our values."""
    pytest.importorskip("accelerate")
    tr = pytest.importorskip("transformers")
    from transformers.utils import logging
    logging.set_verbosity_error()
    cfg, path, _ = synth
    model, info = tr.DeepseekV4ForCausalLM.from_pretrained(str(path), dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    sd = model.state_dict()
    r = C.CheckpointReader(path)
    I = cfg.moe_intermediate_size
    for i in (0, 3):
        gu, down = sd[f"model.layers.{i}.mlp.experts.gate_up_proj"], sd[f"model.layers.{i}.mlp.experts.down_proj"]
        for e in range(cfg.n_routed_experts):
            assert torch.equal(gu[e, :I], r.get_dequantized(f"layers.{i}.ffn.experts.{e}.w1.weight"))
            assert torch.equal(gu[e, I:], r.get_dequantized(f"layers.{i}.ffn.experts.{e}.w3.weight"))
            assert torch.equal(down[e], r.get_dequantized(f"layers.{i}.ffn.experts.{e}.w2.weight"))
    pairs = {"self_attn.q_a_proj.weight": "attn.wq_a.weight", "self_attn.o_a_proj.weight": "attn.wo_a.weight",
             "self_attn.o_b_proj.weight": "attn.wo_b.weight", "self_attn.q_b_proj.weight": "attn.wq_b.weight",
             "self_attn.compressor.indexer.q_b_proj.weight": "attn.indexer.wq_b.weight",
             "mlp.shared_experts.gate_proj.weight": "ffn.shared_experts.w1.weight",
             "mlp.shared_experts.down_proj.weight": "ffn.shared_experts.w2.weight",
             "attn_hc.fn": "hc_attn_fn", "self_attn.sinks": "attn.attn_sink",
             "mlp.gate.e_score_correction_bias": "ffn.gate.bias"}
    for hf, ours in pairs.items():
        assert torch.equal(sd[f"model.layers.3.{hf}"], r.get_dequantized(f"layers.3.{ours}")), hf
    assert torch.equal(sd["model.layers.0.mlp.gate.tid2eid"], r.get("layers.0.ffn.gate.tid2eid"))


@pytest.mark.parametrize("variant", ["fp8_experts", "bf16"])
def test_other_expert_formats_round_trip(variant, tmp_path):
    # -Base style FP8 experts, and an unquantised BF16 release (no quantization_config, no .scale)
    base = get_config("tiny").replace(num_hidden_layers=2, compress_ratios=[4, 128, 0], num_hash_layers=1,
                                      n_routed_experts=4)
    cfg = base.replace(expert_dtype="fp8") if variant == "fp8_experts" else base.replace(quantization_config=None)
    path = C.make_synthetic_checkpoint(cfg, tmp_path / variant, seed=3)
    r = C.CheckpointReader(path)
    r.validate(check_scales=True)
    m = C.synthetic_masters(cfg, seed=3)["layers.1.ffn.experts.2.w2.weight"]
    got = r.get_dequantized("layers.1.ffn.experts.2.w2.weight")
    if variant == "fp8_experts":
        assert r.info("layers.1.ffn.experts.2.w2.weight")["dtype"] == "F8_E4M3"
        assert ((got - m).norm() / m.norm()) < 0.05
    else:
        assert not any(k.endswith(".scale") for k in r.keys())
        assert torch.equal(got, m.bfloat16().float())
