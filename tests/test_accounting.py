"""v4lab.accounting reproduces the published V3 / V3.2 / V4 figures from the configs alone.

Published figures and the tolerances asserted here:
  parameters (total / active, MTP excluded):  V4-Pro 1.6T / 49B, V4-Flash 284B / 13B, V3 671B / 37B   ±3 %
  KV cache at 1M vs V3.2:       V4-Pro 10 %, V4-Flash 7 %                                           ±1 point
  KV cache at 1M vs BF16 GQA-8: ≈2 % (both models)                                                  ±0.25 point
  decode FLOPs at 1M vs V3.2:   V4-Pro 27 %, V4-Flash 10 % (spec §5.4 weighting scheme B)           ±2 points
and the spec's worked byte / FLOP counts (docs/design/v4-attention.md §5.2–5.4) exactly or to its printed rounding.
"""
from __future__ import annotations

import math

import pytest

from v4lab import accounting as acc
from v4lab.checkpoint import expected_keys
from v4lab.config import get_config
from v4lab.model import V4Model

M = 2 ** 20


def rel(a, b):
    return abs(a - b) / b


# ---------------------------------------------------------------------------------------- parameters
@pytest.mark.parametrize("name, total, active", [("v4-pro", 1.6e12, 49e9), ("v4-flash", 284e9, 13e9),
                                                 ("v3", 671e9, 37e9)])
def test_published_parameter_counts(name, total, active):
    p = acc.params(name)
    assert rel(p["total"], total) < 0.03, p["total"]
    assert rel(p["active"], active) < 0.03, p["active"]


def test_v3_checkpoint_size_includes_a_14b_mtp_module():
    # V3's model card: 685B on the hub = 671B main model + 14B MTP (which also ships embedding and head).
    p = acc.params("v3")
    mtp_files = p["by_component"]["mtp"] + p["by_component"]["embedding"] + p["by_component"]["head"]
    assert rel(mtp_files, 14e9) < 0.05
    assert rel(p["total_with_mtp"] + p["by_component"]["embedding"] + p["by_component"]["head"], 685e9) < 0.01


def test_counting_mtp_or_embedding_the_other_way_misses_a_published_figure():
    # Why the conventions are what they are: the alternatives break at least one published number.
    assert rel(acc.params("v4-flash")["total_with_mtp"], 284e9) > 0.02
    assert rel(acc.params("v4-flash")["active_with_embedding"], 13e9) > 0.03


def _v4_tensor_shapes(cfg):
    """Every parameter of a V4 checkpoint, from the tables in docs/design/v4-moe-mhc-fp4.md §8.2
    (no .scale, no tid2eid).
    Written independently of v4lab.accounting: it lists tensors, accounting multiplies config keys."""
    d, H, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
    qr, g, orr = cfg.q_lora_rank, cfg.o_groups, cfg.o_lora_rank
    E, inter, n, V = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hc_mult, cfg.vocab_size
    shapes = [("embed", [V, d]), ("head", [V, d]), ("norm", [d]),
              ("hc_head_fn", [n, n * d]), ("hc_head_base", [n]), ("hc_head_scale", [1])]

    def block(prefix, ratio, hashed):
        out = [("attn_norm", [d]), ("wq_a", [qr, d]), ("q_norm", [qr]), ("wq_b", [H * hd, qr]), ("wkv", [hd, d]),
               ("kv_norm", [hd]), ("wo_a", [g * orr, H * hd // g]), ("wo_b", [d, g * orr]), ("attn_sink", [H])]
        if ratio:
            c = 1 + (ratio == 4)
            out += [("c.ape", [ratio, c * hd]), ("c.wkv", [c * hd, d]), ("c.wgate", [c * hd, d]), ("c.norm", [hd])]
        if ratio == 4:
            dI, nI = cfg.index_head_dim, cfg.index_n_heads
            out += [("i.wq_b", [nI * dI, qr]), ("i.weights_proj", [nI, d]), ("i.c.ape", [4, 2 * dI]),
                    ("i.c.wkv", [2 * dI, d]), ("i.c.wgate", [2 * dI, d]), ("i.c.norm", [dI])]
        for site in ("attn", "ffn"):
            out += [(f"hc_{site}_fn", [(2 + n) * n, n * d]), (f"hc_{site}_base", [(2 + n) * n]),
                    (f"hc_{site}_scale", [3])]
        out += [("ffn_norm", [d]), ("gate.weight", [E, d])] + ([] if hashed else [("gate.bias", [E])])
        out += [("shared.w1", [inter, d]), ("shared.w3", [inter, d]), ("shared.w2", [d, inter])]
        out += [("experts.w1", [E, inter, d]), ("experts.w3", [E, inter, d]), ("experts.w2", [E, d, inter])]
        return [(f"{prefix}.{k}", s) for k, s in out]

    for i in range(cfg.num_hidden_layers):
        shapes += block(f"layers.{i}", cfg.compress_ratios[i], i < cfg.num_hash_layers)
    L = cfg.num_hidden_layers
    mtp = block("mtp.0", cfg.compress_ratios[L], False)
    mtp += [("mtp.0.e_proj", [d, d]), ("mtp.0.h_proj", [d, d]), ("mtp.0.enorm", [d]), ("mtp.0.hnorm", [d]),
            ("mtp.0.norm", [d]), ("mtp.0.hc_head_fn", [n, n * d]), ("mtp.0.hc_head_base", [n]),
            ("mtp.0.hc_head_scale", [1])]
    return shapes, mtp


@pytest.mark.parametrize("name", ["v4-flash", "v4-pro", "tiny"])
def test_v4_count_equals_the_checkpoint_tensor_listing(name):
    cfg = get_config(name)
    main, mtp = _v4_tensor_shapes(cfg)
    p = acc.params(cfg)
    assert p["total"] == sum(math.prod(s) for _, s in main)
    assert p["by_component"]["mtp"] == sum(math.prod(s) for _, s in mtp)


def test_against_v4lab_checkpoint_expected_keys():
    cfg = get_config("tiny")
    keys = expected_keys(cfg)
    n = sum(math.prod(shape) for k, (shape, dt) in keys.items()
            if not k.endswith(".scale") and "tid2eid" not in k)
    # packed FP4 experts store two values per byte: count logical parameters from the config instead
    p = acc.params(cfg)
    if cfg.expert_dtype == "fp4":
        n += sum(math.prod(shape) for k, (shape, dt) in keys.items() if ".experts." in k and not k.endswith(".scale"))
    assert n == p["total_with_mtp"]


@pytest.mark.slow
def test_against_the_v4lab_model():
    # V4Model keeps gate.bias (aux-loss-free balancing, updated outside autograd) as a buffer; the release
    # stores it as a tensor, so accounting counts it. Everything else must be a parameter of the model.
    cfg = get_config("tiny")
    m = V4Model(cfg, device="meta")
    n = sum(p.numel() for p in m.parameters())
    n += sum(b.numel() for k, b in m.named_buffers() if k.endswith("gate.bias"))
    assert n == acc.params(cfg)["total_with_mtp"]


def test_v3_mla_and_dsa_components():
    v3, v32 = acc.params("v3"), acc.params("v3.2")
    d, H = 7168, 128
    mla = d * 1536 + 1536 + 1536 * H * 192 + d * 576 + 512 + 512 * H * 256 + H * 128 * d
    assert v3["by_component"]["attention"] == 61 * mla
    assert v3["by_component"]["indexer"] == 0
    assert v32["by_component"]["indexer"] == 61 * (1536 * 64 * 128 + d * 128 + 2 * 128 + d * 64)
    assert v3["by_component"]["dense_ffn"] == 3 * 3 * d * 18432
    assert v3["by_component"]["routed_experts"] == 58 * 256 * 3 * d * 2048
    assert v3["active_by_component"]["routed_experts"] == 58 * 8 * 3 * d * 2048
    assert v3["by_component"]["mhc"] == v3["by_component"]["compressor"] == 0
    assert v3["hash_table"] == 0 and acc.params("v4-flash")["hash_table"] == 3 * 129280 * 6


def test_active_is_total_minus_unpicked_experts():
    for name in ("v4-flash", "v4-pro", "v3", "tiny"):
        cfg, p = get_config(name), acc.params(name)
        unpicked = p["by_component"]["routed_experts"] - p["active_by_component"]["routed_experts"]
        assert p["total"] - p["active"] == unpicked + p["by_component"]["embedding"]
        assert unpicked * cfg.num_experts_per_tok == p["active_by_component"]["routed_experts"] * (
            cfg.n_routed_experts - cfg.num_experts_per_tok)


def test_tied_embeddings_drop_the_head():
    cfg = get_config("tiny")
    tied = cfg.replace(tie_word_embeddings=True)
    assert acc.params(tied)["total"] == acc.params(cfg)["total"] - 512 * 128
    assert acc.params(tied)["active"] == acc.params(cfg)["active"]  # the logits matmul still runs
    assert acc.decode_flops(tied)["total"] == acc.decode_flops(cfg)["total"]


# ---------------------------------------------------------------------------------------- KV cache
def _per_token_per_layer(kv, part, kind):
    return next(p["bytes_per_entry"] for p in kv["parts"] if p["part"] == part and p["kind"] == kind)


def test_entry_sizes_match_the_spec():
    kv = acc.kv_cache("v4-flash", M)
    assert _per_token_per_layer(kv, "compressed_kv", "csa") == 448 + 128 + 7
    assert _per_token_per_layer(kv, "indexer_keys", "csa") == 64 + 4
    assert _per_token_per_layer(kv, "window_kv", "window") == 583
    kv = acc.kv_cache("v4-flash", M, include_scales=False)
    assert _per_token_per_layer(kv, "compressed_kv", "hca") == 576
    assert _per_token_per_layer(kv, "indexer_keys", "csa") == 64
    assert acc.kv_cache("v3.2", M)["bytes_per_token"] == 61 * (656 + 132)
    assert acc.kv_cache("v3", M)["bytes_per_token"] == 61 * 656
    assert "448 FP8" in kv["parts"][0]["precision"] and "64 BF16" in kv["parts"][0]["precision"]
    assert "FP4" in next(p["precision"] for p in kv["parts"] if p["part"] == "indexer_keys")


def test_spec_worked_kv_table():
    # spec §5.3: bytes/token at 2^20: Pro 5,028, Flash 3,512 (scales counted); 4,944 / 3,453 without.
    assert round(acc.kv_cache("v4-pro", M)["bytes_per_token"]) == 5028
    assert round(acc.kv_cache("v4-flash", M)["bytes_per_token"]) == 3512
    assert round(acc.kv_cache("v4-pro", M, include_scales=False)["bytes_per_token"]) == 4944
    assert round(acc.kv_cache("v4-flash", M, include_scales=False)["bytes_per_token"]) == 3453


@pytest.mark.parametrize("name, published", [("v4-pro", 0.10), ("v4-flash", 0.07)])
def test_kv_vs_v32_at_1m(name, published):
    r = acc.compare(name, "v3.2", M)["ratios"]["kv_cache_bytes"]
    assert abs(r - published) < 0.01, r


@pytest.mark.parametrize("name", ["v4-pro", "v4-flash"])
@pytest.mark.parametrize("scales", [True, False])
def test_kv_vs_bf16_gqa8_at_1m(name, scales):
    cfg = get_config(name)
    r = acc.kv_cache(cfg, M, include_scales=scales)["total_bytes"] / acc.gqa8(cfg, M)["total_bytes"]
    assert abs(r - 0.02) < 0.0025, r
    assert acc.kv_cache_gqa(61, 1)["bytes_per_token"] == 61 * 2 * 8 * 128 * 2


def test_kv_at_short_context_and_growth():
    cfg = get_config("v4-flash")
    short = acc.kv_cache(cfg, 100)  # shorter than the window, shorter than one HCA block
    assert short["by_part"]["window_kv"] == 43 * 100 * 583
    assert short["by_part"]["compressed_kv"] == 21 * 25 * 583  # 100 // 4 CSA entries, 0 HCA entries
    assert short["by_part"]["indexer_keys"] == 21 * 25 * 68
    a, b = acc.kv_cache(cfg, M), acc.kv_cache(cfg, 2 * M)
    assert b["total_bytes"] - a["total_bytes"] == (b["by_part"]["compressed_kv"] - a["by_part"]["compressed_kv"]
                                                  + b["by_part"]["indexer_keys"] - a["by_part"]["indexer_keys"])
    assert sum(a["by_kind"].values()) == a["total_bytes"] == sum(a["by_part"].values())
    assert a["layers_by_kind"] == {"window": 2, "csa": 21, "hca": 20}


@pytest.mark.parametrize("bad", [0, -5, 1.5, "1M", True])
def test_bad_context(bad):
    with pytest.raises(ValueError, match="context"):
        acc.kv_cache("tiny", bad)


# ---------------------------------------------------------------------------------------- decode FLOPs
def test_spec_worked_flop_terms():
    def g(name, k):
        return acc.decode_flops(name, M, weights="A")["groups_raw"][k] / 1e9

    assert abs(g("v3.2", "core_attention") - 34.8) < 0.05
    assert abs(g("v3.2", "indexer_scores") - 1056) < 1
    assert abs(g("v4-flash", "indexer_scores") - 90.9) < 0.1 and abs(g("v4-pro", "indexer_scores") - 129.9) < 0.1
    assert abs(g("v4-flash", "core_attention") - 23.6) < 0.1 and abs(g("v4-pro", "core_attention") - 76.7) < 0.1
    assert abs(g("v4-flash", "gemm") - 26.5) < 0.1 and abs(g("v4-pro", "gemm") - 97.7) < 0.1
    assert abs(g("v3.2", "gemm") - 75.0) < 0.1


@pytest.mark.parametrize("name, published", [("v4-pro", 0.27), ("v4-flash", 0.10)])
def test_decode_flops_vs_v32_at_1m(name, published):
    r = acc.compare(name, "v3.2", M)["ratios"]["decode_flops"]
    assert abs(r - published) < 0.02, r


def test_wrong_weighting_is_caught(monkeypatch):
    # Counting raw FLOPs (scheme A) puts Flash at 12.1 %: outside the ±2 point band around 10 %.
    monkeypatch.setitem(acc.WEIGHTINGS, "B", dict(acc.WEIGHTINGS["A"]))
    r = acc.compare("v4-flash", "v3.2", M)["ratios"]["decode_flops"]
    assert abs(r - 0.10) > 0.02


@pytest.mark.parametrize("scheme, pro, flash", [("A", 0.261, 0.121), ("B", 0.263, 0.099), ("C", 0.205, 0.082),
                                                ("D", 0.317, 0.137)])
def test_spec_weighting_table(scheme, pro, flash):
    v32 = acc.decode_flops("v3.2", M, weights=scheme)["total"]
    assert abs(acc.decode_flops("v4-pro", M, weights=scheme)["total"] / v32 - pro) < 0.002
    assert abs(acc.decode_flops("v4-flash", M, weights=scheme)["total"] / v32 - flash) < 0.002


def test_weighting_is_applied_per_precision():
    f = acc.decode_flops("v4-flash", M, weights={"gemm": 1.0, "bf16": 3.0, "fp8": 1.0, "fp4": 0.25})
    assert f["weighted"]["core_attention"] == 3 * f["raw"]["core_attention"]
    assert f["weighted"]["indexer_scores"] == 0.25 * f["raw"]["indexer_scores"]
    assert f["precision"]["indexer_scores"] == "fp4"
    assert acc.decode_flops("v3.2")["precision"]["indexer_scores"] == "fp8"
    routed = acc.params("v4-flash")["active_by_component"]["routed_experts"]
    assert f["weighted"]["gemm_routed_experts"] == f["raw"]["gemm_routed_experts"] == 2 * routed
    with pytest.raises(ValueError, match="weights"):
        acc.decode_flops("tiny", weights="Z")
    with pytest.raises(ValueError, match="weights"):
        acc.decode_flops("tiny", weights={"bf16": 2})


def test_flops_at_short_context():
    cfg = get_config("v4-flash")
    f = acc.decode_flops(cfg, 64, weights="A")
    # 64 tokens: window sees 64, CSA 16 compressed entries (< top-k), HCA none yet
    assert f["raw"]["core_attention"] == 64 * 4 * 512 * (43 * 64 + 21 * 16)
    assert f["raw"]["indexer_scores"] == 21 * 64 * 258 * 16
    assert acc.decode_flops("v3", 1000, weights="A")["raw"]["core_attention"] == 61 * 128 * 1000 * (2 * 576 + 2 * 512)


def test_128k_ratios_from_the_spec():
    # spec §5.4: at 128K, Pro 52 % / Flash 15 % of V3.2's FLOPs; KV ratio stays ≈10.5 % / 7.3 %
    def c(a):
        return acc.compare(a, "v3.2", 128 * 1024)["ratios"]

    assert abs(c("v4-pro")["decode_flops"] - 0.52) < 0.01 and abs(c("v4-flash")["decode_flops"] - 0.15) < 0.01
    assert abs(c("v4-pro")["kv_cache_bytes"] - 0.105) < 0.003


# ---------------------------------------------------------------------------------------- MoE expansion
def test_moe_expansion_v3_to_pro():
    e = acc.moe_expansion("v3", "v4-pro")
    assert e["factor_ratio"] == {"experts": 1.5, "expert_width": 1.5, "hidden_size": 1.0, "moe_layers": 61 / 58}
    assert sum(e["shapley_params"].values()) == pytest.approx(e["routed_growth"], rel=1e-12)
    assert sum(e["log_share"].values()) == pytest.approx(1.0)
    assert e["shapley_params"]["experts"] == pytest.approx(e["shapley_params"]["expert_width"])
    assert e["log_share"]["experts"] == pytest.approx(math.log(1.5) / math.log(e["routed_to"] / e["routed_from"]))
    assert e["routed_from"] * 1.5 * 1.5 * 61 / 58 == pytest.approx(e["routed_to"])
    assert e["routed_share_of_growth"] > 0.95  # nearly all of 671B -> 1.6T is routed experts
    assert e["total_growth"] == e["routed_growth"] + e["rest_growth"]


# ---------------------------------------------------------------------------------------- summary/compare
def test_summary_and_compare_shape():
    s = acc.summary("v4-flash", 128 * 1024)
    for k in ("total_params", "active_params", "kv_cache_bytes", "decode_flops", "context", "params", "kv_cache",
              "flops"):
        assert k in s
    assert s["context"] == 131072 and s["total_params"] == acc.params("v4-flash")["total"]
    c = acc.compare("v4-pro", get_config("v3.2"))
    assert set(acc.HEADLINE) <= set(c["ratios"])
    for k in acc.HEADLINE:
        assert c["ratios"][k] == c["a"][k] / c["b"][k]


@pytest.mark.parametrize("text, n", [("1M", M), ("128K", 131072), ("128k", 131072), ("1048576", M),
                                     ("1.5M", 3 * M // 2), (" 64 ", 64), (4096, 4096)])
def test_parse_context(text, n):
    assert acc.parse_context(text) == n


@pytest.mark.parametrize("text", ["", "0", "-1", "1X", "1.3K", "M", "1e6", "1M tokens"])
def test_parse_context_rejects(text):
    with pytest.raises(ValueError, match="--context"):
        acc.parse_context(text)
