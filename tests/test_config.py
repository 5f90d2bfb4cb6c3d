"""V4Config: presets hold the released values, released config.json files load, every rule is enforced."""
from __future__ import annotations

import json

import pytest

from v4lab.config import PRESETS, V4Config, get_config

# --- released values, copied from the tables of docs/design/v4-attention.md §1/§6 and
# docs/design/v4-moe-mhc-fp4.md §1.1/§9.1 ---------------------------------------------------------------------
FLASH = dict(vocab_size=129280, hidden_size=4096, num_hidden_layers=43, num_attention_heads=64,
             num_key_value_heads=1, head_dim=512, qk_rope_head_dim=64, q_lora_rank=1024, o_groups=8,
             o_lora_rank=1024, sliding_window=128, rope_theta=10000, compress_rope_theta=160000,
             index_n_heads=64, index_head_dim=128, index_topk=512, n_routed_experts=256, n_shared_experts=1,
             num_experts_per_tok=6, moe_intermediate_size=2048, scoring_func="sqrtsoftplus",
             topk_method="noaux_tc", norm_topk_prob=True, routed_scaling_factor=1.5, num_hash_layers=3,
             swiglu_limit=10.0, hc_mult=4, hc_sinkhorn_iters=20, hc_eps=1e-6, rms_norm_eps=1e-6,
             num_nextn_predict_layers=1, max_position_embeddings=1048576, tie_word_embeddings=False,
             bos_token_id=0, eos_token_id=1, hidden_act="silu", torch_dtype="bfloat16", initializer_range=0.02,
             attention_bias=False, attention_dropout=0.0, expert_dtype="fp4",
             rope_scaling={"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
                           "beta_fast": 32, "beta_slow": 1},
             quantization_config={"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                  "scale_fmt": "ue8m0", "weight_block_size": [128, 128]},
             compress_ratios=[0, 0] + [4, 128] * 20 + [4, 0])
PRO = dict(FLASH, hidden_size=7168, num_hidden_layers=61, num_attention_heads=128, q_lora_rank=1536, o_groups=16,
           index_topk=1024, moe_intermediate_size=3072, n_routed_experts=384, routed_scaling_factor=2.5,
           compress_ratios=[128, 128] + [4, 128] * 29 + [4, 0])
V3 = dict(hidden_size=7168, num_hidden_layers=61, num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512,
          qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=256, n_shared_experts=1,
          num_experts_per_tok=8, moe_intermediate_size=2048, intermediate_size=18432, first_k_dense_replace=3,
          n_group=8, topk_group=4, scoring_func="sigmoid", topk_method="noaux_tc", routed_scaling_factor=2.5,
          vocab_size=129280, max_position_embeddings=163840, num_nextn_predict_layers=1, rope_theta=10000,
          rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                        "beta_fast": 32, "beta_slow": 1})
V32 = dict(V3, index_n_heads=64, index_head_dim=128, index_topk=2048)


@pytest.mark.parametrize("name, want, model_type", [("v4-flash", FLASH, "deepseek_v4"), ("v4-pro", PRO, "deepseek_v4"),
                                                    ("v3", V3, "deepseek_v3"), ("v3.2", V32, "deepseek_v32")])
def test_presets_carry_released_values(name, want, model_type):
    cfg = get_config(name)
    assert cfg.model_type == model_type and cfg.name == name
    for key, value in want.items():
        assert getattr(cfg, key) == value, key


def test_layer_schedules():
    flash, pro = get_config("v4-flash"), get_config("v4-pro")
    assert len(flash.compress_ratios) == 44 and len(pro.compress_ratios) == 62
    assert [flash.layer_kinds.count(k) for k in ("window", "csa", "hca")] == [2, 21, 20]
    assert [pro.layer_kinds.count(k) for k in ("window", "csa", "hca")] == [0, 30, 31]
    assert flash.layer_kinds[:4] == ["window", "window", "csa", "hca"] and flash.layer_kind(42) == "csa"
    assert pro.layer_kinds[:4] == ["hca", "hca", "csa", "hca"] and pro.layer_kind(60) == "csa"
    for cfg in (flash, pro):  # the MTP block (layer_id == num_hidden_layers) is window-only, learned routing
        L = cfg.num_hidden_layers
        assert cfg.layer_kind(L) == "window" and cfg.compress_ratio(L) == 0 and not cfg.is_hash_layer(L)
        assert [cfg.is_hash_layer(i) for i in range(4)] == [True, True, True, False]
    v3 = get_config("v3")
    assert set(v3.layer_kinds) == {"mla"} and set(get_config("v3.2").layer_kinds) == {"mla+dsa"}
    assert [v3.is_dense_layer(i) for i in range(4)] == [True, True, True, False] and not v3.is_hash_layer(0)


def test_tiny_has_every_structural_feature():
    t = get_config("tiny")
    assert {"window", "csa", "hca"} <= set(t.layer_kinds)
    assert 0 < t.num_hash_layers < t.num_hidden_layers and t.hc_mult > 1 and t.num_nextn_predict_layers == 1
    assert t.is_v4 and t.hidden_size <= 256 and t.n_routed_experts <= 16


def _released_flash_json() -> dict:
    """The released DeepSeek-V4-Flash config.json (docs/design/v4-attention.md §6.1), as a dict."""
    d = {k: v for k, v in FLASH.items()}
    d.update(architectures=["DeepseekV4ForCausalLM"], model_type="deepseek_v4", transformers_version="4.57.1",
             use_cache=True)
    return d


def test_released_hf_config_loads_as_the_preset(tmp_path):
    path = tmp_path / "DeepSeek-V4-Flash" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(_released_flash_json(), indent=2))
    for arg in (path, path.parent, str(path)):
        cfg = get_config(arg)
        assert cfg.name == "DeepSeek-V4-Flash"
        assert cfg.replace(name="v4-flash") == get_config("v4-flash")
        assert cfg.to_dict() == get_config("v4-flash").to_dict()


def test_pro_config_without_expert_dtype_loads(tmp_path):
    # The Pro copy in the spec (§6.2) has no expert_dtype key: the FP4 default applies.
    d = dict(PRO, architectures=["DeepseekV4ForCausalLM"], model_type="deepseek_v4")
    del d["expert_dtype"]
    (tmp_path / "pro.json").write_text(json.dumps(d))
    assert V4Config.from_json(tmp_path / "pro.json").replace(name="v4-pro") == get_config("v4-pro")


def test_inference_modelargs_names_load():
    # Official inference/config.json names (spec §6.3) map onto the HF keys.
    d = dict(dim=4096, n_layers=43, n_heads=64, moe_inter_dim=2048, n_activated_experts=6, n_hash_layers=3,
             score_func="sqrtsoftplus", route_scale=1.5, rope_head_dim=64, window_size=128, norm_eps=1e-6,
             n_mtp_layers=1, compress_ratios=FLASH["compress_ratios"])
    assert V4Config.from_dict(d, name="v4-flash") == get_config("v4-flash")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_json_round_trip(tmp_path, name):
    cfg = get_config(name)
    cfg.to_json(tmp_path / f"{name}.json")
    back = V4Config.from_json(tmp_path / f"{name}.json")
    assert back.name == name and back == cfg
    assert json.loads((tmp_path / f"{name}.json").read_text())["architectures"][0].startswith("DeepseekV")


def test_replace_validates_and_copies():
    a = get_config("tiny")
    b = a.replace(index_topk=4)
    assert b.index_topk == 4 and a.index_topk == 8
    b.compress_ratios[0] = 4
    assert a.compress_ratios[0] == 0


# --- every validation rule, each with one bad config: (preset, change, key named, rule fragment) ---------
RULES = [
    ("tiny", dict(model_type="llama"), "model_type", "deepseek_v4"),
    ("tiny", dict(hidden_size=0), "hidden_size", "positive"),
    ("tiny", dict(num_hidden_layers=-1), "num_hidden_layers", "positive"),
    ("tiny", dict(num_attention_heads=0), "num_attention_heads", "positive"),
    ("tiny", dict(moe_intermediate_size=-128), "moe_intermediate_size", "positive"),
    ("tiny", dict(n_routed_experts=0), "n_routed_experts", "positive"),
    ("tiny", dict(sliding_window=0), "sliding_window", "positive"),
    ("tiny", dict(index_topk=0), "index_topk", "positive"),
    ("tiny", dict(hc_mult=0), "hc_mult", "positive"),
    ("tiny", dict(vocab_size=0), "vocab_size", "positive"),
    ("v3", dict(kv_lora_rank=0), "kv_lora_rank", "positive"),
    ("tiny", dict(hidden_size="128"), "hidden_size", "integer"),
    ("tiny", dict(head_dim=64.0), "head_dim", "integer"),
    ("tiny", dict(hc_eps="tiny"), "hc_eps", "number"),
    ("tiny", dict(norm_topk_prob="yes"), "norm_topk_prob", "true or false"),
    ("tiny", dict(rms_norm_eps=0.0), "rms_norm_eps", "positive"),
    ("tiny", dict(rope_theta=float("inf")), "rope_theta", "finite"),
    ("tiny", dict(hc_eps=-1e-6), "hc_eps", ">= 0"),
    ("tiny", dict(n_shared_experts=-1), "n_shared_experts", ">= 0"),
    ("tiny", dict(num_hash_layers=-1), "num_hash_layers", ">= 0"),
    ("tiny", dict(num_hash_layers=7), "num_hash_layers", "num_hidden_layers"),
    ("tiny", dict(num_nextn_predict_layers=-1), "num_nextn_predict_layers", ">= 0"),
    ("tiny", dict(num_experts_per_tok=9), "num_experts_per_tok", "top-k must be <= n_routed_experts"),
    ("tiny", dict(scoring_func="relu"), "scoring_func", "must be one of"),
    ("tiny", dict(routed_scaling_factor=0.0), "routed_scaling_factor", "> 0"),
    ("tiny", dict(swiglu_limit=float("nan")), "swiglu_limit", "finite"),
    ("v3", dict(n_group=3), "n_group", "divide n_routed_experts"),
    ("v3", dict(topk_group=9), "topk_group", "<= n_group"),
    ("v3", dict(num_experts_per_tok=65, n_group=8, topk_group=2), "num_experts_per_tok", "topk_group"),
    ("v3", dict(first_k_dense_replace=62), "first_k_dense_replace", "[0, num_hidden_layers]"),
    ("v3", dict(intermediate_size=0), "intermediate_size", "dense first layers"),
    ("tiny", dict(qk_rope_head_dim=15), "qk_rope_head_dim", "even"),
    ("v3", dict(qk_rope_head_dim=63), "qk_rope_head_dim", "even"),
    ("tiny", dict(qk_rope_head_dim=66, index_head_dim=128), "qk_rope_head_dim", "<= head_dim"),
    ("tiny", dict(qk_rope_head_dim=48), "qk_rope_head_dim", "<= index_head_dim"),
    ("v3.2", dict(index_head_dim=32), "qk_rope_head_dim", "<= index_head_dim"),
    ("v3.2", dict(index_topk=0), "index_topk", "V3.2 DSA indexer"),
    ("tiny", dict(num_key_value_heads=2), "num_key_value_heads", "must be 1"),
    ("tiny", dict(o_groups=3), "o_groups", "divide num_attention_heads"),
    ("v4-flash", dict(o_groups=5), "o_groups", "divide num_attention_heads"),
    ("tiny", dict(compress_ratios=[0, 4, 128, 4, 128, 4]), "compress_ratios", "num_hidden_layers + 1"),
    ("tiny", dict(compress_ratios=[0] * 9), "compress_ratios", "num_hidden_layers + 1"),
    ("tiny", dict(compress_ratios=4), "compress_ratios", "num_hidden_layers + 1"),
    ("tiny", dict(compress_ratios=[0, 4, 64, 4, 128, 4, 0]), "compress_ratios[2]", "0 (window), 4 (CSA) or 128"),
    ("tiny", dict(compress_ratios=[0, 4, 128, 4, 128, 4, 4]), "compress_ratios[6]", "MTP block"),
    ("v4-pro", dict(compress_ratios=[128] * 62), "compress_ratios[61]", "MTP block"),
    ("tiny", dict(rope_scaling={"type": "yarn", "factor": 0.5}), "rope_scaling.factor", ">= 1"),
    ("tiny", dict(rope_scaling="yarn"), "rope_scaling", "dict or null"),
    ("tiny", dict(expert_dtype="int4"), "expert_dtype", "fp4, fp8, bf16"),
]


@pytest.mark.parametrize("preset, change, key, rule", RULES,
                         ids=[f"{k}:{list(c.values())[0]!r}"[:60] for _, c, k, _ in RULES])
def test_each_rule_raises_naming_key_value_rule(preset, change, key, rule):
    with pytest.raises(ValueError) as e:
        get_config(preset).replace(**change)
    msg = str(e.value)
    assert f"'{key}'" in msg, msg
    assert rule in msg, msg
    root = key.split("[")[0].split(".")[0]
    value = change[root] if root in change else getattr(get_config(preset), root)
    if key.endswith("]"):
        value = value[int(key[key.index("[") + 1:-1])]
    elif key == "rope_scaling.factor":
        value = change["rope_scaling"]["factor"]
    if not isinstance(value, (list, dict)) and key != "compress_ratios":
        assert repr(value) in msg, msg
    assert "\n" not in msg


def test_no_mtp_means_the_last_backbone_layer_may_be_csa():
    cfg = get_config("tiny").replace(num_nextn_predict_layers=0, compress_ratios=[0, 4, 128, 4, 128, 4])
    assert cfg.layer_kind(5) == "csa"


def test_good_edge_values_pass():
    t = get_config("tiny")
    t.replace(num_experts_per_tok=t.n_routed_experts, o_groups=t.num_attention_heads, num_hash_layers=0)
    t.replace(qk_rope_head_dim=32, rope_scaling=None, swiglu_limit=0.0, n_shared_experts=0, expert_dtype=None)
    t.replace(compress_ratios=[float(r) for r in t.compress_ratios])  # JSON numbers like 4.0 normalise


# --- loading errors: one ValueError line naming the file or key -----------------------------------------
def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset or config file 'v5'.*v4-flash"):
        get_config("v5")


@pytest.mark.parametrize("content, fragment", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "top level must be a JSON object"),
    (b"\xff\xfe\x00garbage", "not valid JSON"),
    ('{"model_type": "gpt2"}', "'model_type' = 'gpt2'"),
    ('{"model_type": "deepseek_v4", "hidden_size": 64}', "'compress_ratios' is missing"),
    ('{"model_type": "deepseek_v3", "hidden_size": "big", "kv_lora_rank": 512, "qk_nope_head_dim": 128,'
     ' "v_head_dim": 128}', "'hidden_size' = 'big'"),
])
def test_malformed_files(tmp_path, content, fragment):
    p = tmp_path / "config.json"
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError) as e:
        get_config(p)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match="cannot be read"):
        get_config(tmp_path / "nope.json")
    with pytest.raises(ValueError, match="cannot be read"):
        get_config(tmp_path)  # a folder without config.json


def test_strict_mode_rejects_unknown_keys():
    d = dict(FLASH, some_new_key=1)
    assert V4Config.from_dict(d) == get_config("v4-flash").replace(name="custom")
    with pytest.raises(ValueError, match="'some_new_key'"):
        V4Config.from_dict(d, strict=True)
