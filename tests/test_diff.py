"""v4lab.diff: V3 → V4 read off the presets and the meta-device module trees; `v4lab compare A B --diff`."""
import json

import pytest

from v4lab import accounting, diff
from v4lab.cli import main


@pytest.fixture(scope="module")
def v3_pro():
    return diff.diff("v3", "v4-pro")


def _rows(d):
    return {r["key"]: r for r in d["table"]}


def test_backbone_unchanged_moe_and_attention_changed(v3_pro):
    t = _rows(v3_pro)
    for key, v in (("hidden_size", "7168"), ("num_hidden_layers", "61"), ("num_attention_heads", "128"),
                   ("vocab_size", "129280"), ("q_lora_rank", "1536")):
        assert t[key]["status"] == "unchanged" and t[key]["a"] == t[key]["b"] == v, key
    experts = t["n_routed_experts"]
    assert (experts["a"], experts["b"], experts["status"]) == ("256", "384", "changed")
    assert (t["moe_intermediate_size"]["a"], t["moe_intermediate_size"]["b"]) == ("2048", "3072")
    for key in ("sliding_window", "compress_ratios", "index_topk", "hc_mult", "swiglu_limit", "expert_dtype",
                "compress_rope_theta", "hc_eps"):
        assert t[key]["status"] == "added" and t[key]["a"] == "—", key
    for key in ("kv_lora_rank", "first_k_dense_replace", "intermediate_size"):
        assert t[key]["status"] == "removed", key
    assert t["compress_ratios"]["b"] == "61 entries: 31×128, 30×4"


def test_block_shapes_come_from_the_modules(v3_pro):
    b = {r["name"]: r for r in v3_pro["block"]}
    assert b["ffn.experts.*.w1.weight"]["a"] == (2048, 7168) and b["ffn.experts.*.w1.weight"]["b"] == (3072, 7168)
    assert b["ffn.gate.weight"]["status"] == "changed" and b["ffn.gate.weight"]["b"] == (384, 7168)
    assert b["attn.wq_a.weight"]["status"] == "unchanged" and b["attn.wq_a.weight"]["a"] == (1536, 7168)
    assert b["attn.wkv_b.weight"]["status"] == "removed" and b["attn.wkv_b.weight"]["b"] is None
    assert b["hc_attn_fn"]["status"] == "added" and b["hc_attn_fn"]["b"] == (24, 4 * 7168)
    assert b["attn.indexer.compressor.ape"]["b"] == (4, 256) and b["attn.compressor.ape"]["b"] == (4, 1024)
    names = [r["name"] for r in v3_pro["block"]]
    assert names.index("hc_attn_fn") < names.index("attn_norm.weight") < names.index("attn.wq_a.weight") \
        < names.index("hc_ffn_fn") < names.index("ffn_norm.weight") < names.index("ffn.gate.weight")
    assert v3_pro["n_experts"] == (256, 384) and (v3_pro["layer_a"], v3_pro["layer_b"]) == (3, 4)


def test_attribution_sums_to_the_delta_and_reuses_the_shapley_split(v3_pro):
    rows = {r["change"]: r["params"] for r in v3_pro["attribution"]}
    total = accounting.params("v4-pro")["total"] - accounting.params("v3")["total"]
    assert sum(rows.values()) == pytest.approx(total, rel=1e-12)
    shap = accounting.moe_expansion("v3", "v4-pro")["shapley_params"]
    assert rows["routed experts: more experts per layer"] == shap["experts"]
    assert rows["routed experts: wider experts"] == shap["expert_width"] > 0
    assert rows["routed experts: wider model"] == 0                  # hidden 7168 on both sides
    assert rows["dense_ffn"] < 0 < rows["mhc"]                       # V3's dense layers gone, mHC new
    routed = sum(v for k, v in rows.items() if k.startswith("routed"))
    assert routed / total > 0.95                                    # the growth is the MoE


def test_other_pairs():
    d = diff.diff("v3.2", "v4-flash")
    t = _rows(d)
    assert t["hidden_size"]["status"] == "changed" and t["index_topk"]["status"] == "changed"
    assert {r["name"] for r in d["block"] if r["status"] == "removed"} >= {"attn.indexer.wk.weight"}
    same = diff.diff("v4-pro", "v4-pro")
    assert {r["status"] for r in same["table"]} == {"unchanged"}
    assert {r["status"] for r in same["block"]} == {"unchanged"}
    assert all(r["params"] == 0 for r in same["attribution"])


def test_compare_diff_cli(capsys):
    assert main(["compare", "v3", "v4-pro", "--diff"]) == 0
    out = capsys.readouterr().out
    assert "| backbone | hidden_size | 7168 | 7168 | unchanged |" in out
    assert "| moe | n_routed_experts | 256 | 384 | changed |" in out
    assert "| ffn.experts.*.w1.weight | 2048×7168 | 3072×7168 | changed |" in out
    assert "| attention | compress_ratios | — | 61 entries: 31×128, 30×4 | added |" in out
    assert "routed experts per block (ffn.experts.*): 256 → 384" in out
    assert main(["compare", "v3", "v4-pro", "--diff", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)["diff"]
    assert d["n_experts"] == [256, 384]
    assert main(["compare", "v3", "nope", "--diff"]) == 2
    assert "unknown preset" in capsys.readouterr().err


def test_block_diagram_figure_shows_every_tensor_with_its_status(v3_pro):
    from v4lab.viz import diff as diff_viz
    fig = diff_viz.build_block_diff("v3", "v4-pro")
    by_status = dict(zip(diff.STATUSES, fig.data[:4]))
    n = len(v3_pro["block"])
    for r in v3_pro["block"]:
        tr = by_status[r["status"]]
        y = n - 1 - v3_pro["block"].index(r)
        sides = {int(round(b - 0.02)) for b, yy in zip(tr.base, tr.y) if yy == y}
        assert sides == {i for i, s in ((0, "a"), (1, "b")) if r[s] is not None}, r["name"]
        for s in (r["a"], r["b"]):
            if s is not None:
                assert f"{r['name']}  {'×'.join(map(str, s))}" in tr.text
    assert [t.marker.color for t in fig.data[:4]] == [diff_viz.STATUS_COLORS[s] for s in diff.STATUSES]
    assert {t.name for t in fig.data[:4]} == {"same shape", "shape changed", "only in v3", "new in v4-pro"}
    assert "256 → 384" in fig.layout.title.text and fig.layout.title.text.count("$") < 2
    assert list(fig.data[4].text) == ["mHC (attention site)", "attention norm", "attention", "mHC (FFN site)",
                                      "FFN norm", "MoE"]
