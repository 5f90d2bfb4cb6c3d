"""The exercises of notebooks 00-05: every answer against an independent computation, and the notebooks
and the registered keys agree (each key has its question, its check cell and a hidden solution)."""
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from v4lab import accounting, gate, get_config, mhc
from v4lab import quant as Q
from v4lab.attention import sparse_attn
from v4lab.compressor import entry_span
from v4lab.exercises import Answer, _same, answer, keys
from v4lab.viz import nbbuild

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = {"00": "00_tour", "01": "01_moe_expansion", "02": "02_compressed_attention", "03": "03_mhc",
             "04": "04_swiglu_clamp", "05": "05_fp4"}


def v4_cache_bytes(name: str, n: int) -> int:
    """The notebook-00 formula by hand: a window per layer, one entry per m tokens (+ an FP4 index key in CSA)."""
    c = get_config(name)
    eb, ib, kinds = accounting.entry_bytes(c), accounting.index_key_bytes(c), c.layer_kinds
    return (len(kinds) * min(c.sliding_window, n) * eb + kinds.count("csa") * (n // 4) * (eb + ib)
            + kinds.count("hca") * (n // 128) * eb)


def v32_cache_bytes(n: int) -> int:
    """V3.2 per token per layer: 512 FP8 + 4 FP32 scales + 64 BF16 latent, 128 FP8 + 1 FP32 index key."""
    c = get_config("v3.2")
    latent = c.kv_lora_rank + 4 * (c.kv_lora_rank // 128) + 2 * c.qk_rope_head_dim
    return c.num_hidden_layers * n * (latent + c.index_head_dim + 4)


# ------------------------------------------------------------------------------------------------ 00
def test_00_indexer_crossover():
    c = get_config("v3.2")
    per_token = c.num_hidden_layers * c.index_n_heads * (2 * c.index_head_dim + 2)
    n = answer("00.indexer_crossover").value
    assert isinstance(n, int) and abs(n - 2 * accounting.params("v3.2")["active"] / per_token) <= 0.5
    lo, hi = (accounting.decode_flops("v3.2", x)["groups_raw"] for x in (n // 2, 2 * n))
    assert lo["indexer_scores"] < lo["gemm"] and hi["indexer_scores"] > hi["gemm"]


def test_00_kv_ratio_4k():
    assert v32_cache_bytes(4096) == accounting.kv_cache("v3.2", 4096)["total_bytes"]
    assert answer("00.kv_ratio_4k").value == pytest.approx(v4_cache_bytes("v4-pro", 4096) / v32_cache_bytes(4096),
                                                           rel=1e-12)


def test_00_v3_attention_share():
    c, n = get_config("v3"), accounting.ONE_M
    core = c.num_hidden_layers * c.num_attention_heads * n * (2 * (c.kv_lora_rank + c.qk_rope_head_dim)
                                                              + 2 * c.kv_lora_rank)
    gemm = 2 * accounting.params("v3")["active"]
    assert answer("00.v3_attention_share").value == pytest.approx(core / (core + gemm), rel=1e-12)


def test_00_flash_cache_gb():
    assert answer("00.flash_cache_gb").value == pytest.approx(v4_cache_bytes("v4-flash", accounting.ONE_M) / 1e9,
                                                              rel=1e-12)


# ------------------------------------------------------------------------------------------------ 01
def test_01_bias_share():
    from v4lab.viz import moe as moe_viz
    routes = moe_viz.route_text(moe_viz.DEFAULT_TEXT)
    r = routes["layers"][1]
    assert not r["hash"] and r["scores"].shape[-1] > 5
    b = r["bias"].clone()
    before = (gate.select_topk(r["scores"], b, r["k"], r["n_group"], r["topk_group"]) == 5).any(-1)
    b[5] += 0.5
    after = (gate.select_topk(r["scores"], b, r["k"], r["n_group"], r["topk_group"]) == 5).any(-1)
    assert not (before & ~after).any()                               # raising a bias never drops a token
    assert answer("01.bias_share").value == pytest.approx(float((after & ~before).sum()) / len(routes["tokens"]))


def test_01_big_v3_total():
    c = get_config("v3")
    added = (c.num_hidden_layers - c.first_k_dense_replace) * 256 * (3 * c.hidden_size * c.moe_intermediate_size
                                                                    + c.hidden_size + 1)
    assert answer("01.big_v3_total").value * 1e9 == pytest.approx(accounting.params("v3")["total"] + added, rel=1e-12)


def test_01_top_weight():
    s8, s4 = math.sqrt(math.log1p(math.exp(8.0))), math.sqrt(math.log1p(math.exp(4.0)))
    assert answer("01.top_weight").value == pytest.approx(s8 / (s8 + s4), abs=1e-6)


def test_01_sign_rule_is_independent_of_the_size_of_the_overload():
    from v4lab.exercises import nb01
    b = nb01.sign_rule()
    assert float(b[0]) == pytest.approx(-0.4, abs=1e-5) and float(b[0]) == float(b[1])   # fp32 sums
    assert float(b[2]) == pytest.approx(0.4, abs=1e-5)                    # underloaded experts rise by the same step
    assert answer("01.sign_rule").value == 0.0
    load = torch.tensor(nb01.LOADS)
    assert load[1] > load.mean()                                  # the question's expert 1 really is overloaded


# ------------------------------------------------------------------------------------------------ 02
def complete_entries(t: int, ratio: int, overlap: bool) -> int:
    """Entries whose last token has arrived by position t (entry_span, not the visibility formula)."""
    return sum(entry_span(s, ratio, overlap)[1] <= t for s in range(t + 2))


def test_02_csa_entries():
    assert answer("02.csa_entries").value == min(complete_entries(50, 4, True), 16) == 12   # fewer than k visible


def test_02_visible_at_edge():
    assert answer("02.visible_at_edge").value == complete_entries(299, 4, True)
    assert complete_entries(298, 4, True) == complete_entries(299, 4, True) - 1     # 299 completes a block


def test_02_hca_entries():
    assert answer("02.hca_entries").value == complete_entries(1000, 128, False)


def test_02_sink_mass():
    o = sparse_attn(torch.zeros(1, 1, 1, 4), torch.ones(1, 3, 4), torch.tensor([1.0]),
                    torch.arange(3).view(1, 1, 3), 0.5)
    m = answer("02.sink_mass").value
    assert m == pytest.approx(1 - float(o[0, 0, 0, 0]), abs=1e-6)
    assert m == pytest.approx(math.e / (3 + math.e), abs=1e-6)


# ------------------------------------------------------------------------------------------------ 03
def test_03_hc_gain():
    P = torch.linalg.matrix_power(torch.eye(4, dtype=torch.float64) + 0.1, 10)
    assert answer("03.hc_gain").value == pytest.approx(float(P.sum(-1).max()), rel=1e-12)
    assert answer("03.hc_gain").value == pytest.approx(1.4 ** 10, rel=1e-12)


def test_03_diag_entry():
    assert answer("03.diag_entry").value == pytest.approx(math.exp(5) / (math.exp(5) + 3), abs=1e-5)


def test_03_sharp_iterations():
    from v4lab.viz import mhc as mhc_viz
    logits = mhc_viz.base_logits() * 2
    t = answer("03.sharp_iterations").value

    def row_err(iters):
        return float((mhc.sinkhorn(logits, iters, 1e-6).sum(-1) - 1).abs().max())
    assert row_err(t) < 1e-3 <= row_err(t - 1)
    assert t > answer_default_iterations()                           # sharper logits need more


def answer_default_iterations() -> int:
    from v4lab.exercises import nb03
    from v4lab.viz import mhc as mhc_viz
    return nb03.iterations_needed(mhc_viz.base_logits())


def test_03_iterations_needed_refuses_what_never_converges():
    from v4lab.exercises import nb03
    with pytest.raises(ValueError, match="row error"):
        nb03.iterations_needed(nb03.sharp_logits() * 4, max_iters=3)


def test_03_streams_average():
    combs = mhc.sinkhorn(torch.randn(60, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64),
                         20, 1e-6)
    P = torch.linalg.multi_dot(list(mhc.h_res(combs).flip(0)))
    x = P @ torch.tensor([1.0, 2.0, 3.0, 10.0], dtype=torch.float64)
    v = answer("03.streams_average").value
    assert v == pytest.approx(float(x.max()), abs=1e-9)
    assert 3.9 < v < 4.25 and float(x.sum()) == pytest.approx(16.0, abs=1e-2)


# ------------------------------------------------------------------------------------------------ 04
def test_04_max_h():
    assert answer("04.max_h").value == pytest.approx(float(F.silu(torch.tensor(5.0))) * 5, rel=1e-6)


def test_04_up_clipped_and_gate_or_up():
    from v4lab.viz import clamp as clamp_viz
    acts = clamp_viz.preacts().acts
    up, g = acts["up"][1], acts["gate"][1]
    up_cut = float((up.clamp(-2, 2) != up).float().mean())
    gate_cut = float((g.clamp(max=2) != g).float().mean())
    assert answer("04.up_clipped").value == pytest.approx(up_cut, abs=1e-9)
    assert answer("04.gate_or_up").value == ("up" if up_cut > gate_cut else "gate")


def test_04_changes_logits():
    from v4lab.viz import clamp as clamp_viz
    from v4lab.viz import trained
    acts = clamp_viz.collect((trained.SAMPLE_TEXTS["for-loop"],))
    assert answer("04.changes_logits").value is (clamp_viz.peak(acts) > 7.5)


# ------------------------------------------------------------------------------------------------ 05
def test_05_e2m1_tie():
    w = torch.tensor([[5.0, 6.0] + [0.0] * 30])
    v = answer("05.e2m1_tie").value
    assert v == float(Q.mxfp4_dequantize(*Q.mxfp4_quantize(w))[0, 0]) == 4.0
    assert int(Q.e2m1_encode(torch.tensor(v))) % 2 == 0                 # the even code won the tie


def test_05_scale_byte():
    b = answer("05.scale_byte").value
    assert b == 127 + math.ceil(math.log2(0.05 / 6))
    assert 0.05 / 2.0 ** (b - 127) <= 6 < 0.05 / 2.0 ** (b - 128)        # the smallest scale that does not clip


def test_05_outlier_zeros():
    small = [0.5 + i for i in range(31)]
    scale = 2.0 ** math.ceil(math.log2(100 / 6))
    assert answer("05.outlier_zeros").value == sum(x / scale < 0.25 for x in small)


def test_05_outliers_sqnr():
    from v4lab.viz import fp4
    w = fp4.weights("outliers").double()
    back = Q.mxfp4_dequantize(*Q.mxfp4_quantize(fp4.weights("outliers"), 32)).double()
    sqnr = 10 * math.log10(float(w.pow(2).sum() / (w - back).pow(2).sum()))
    assert answer("05.outliers_sqnr").value == pytest.approx(sqnr, abs=1e-6)


# ------------------------------------------------------------------------------------------------ agreement
def source_cells(nb: str):
    return nbbuild.parse_cells_meta((ROOT / "notebooks" / "src" / f"{NOTEBOOKS[nb]}.py").read_text())


@pytest.mark.parametrize("nb", sorted(NOTEBOOKS))
def test_keys_and_notebook_agree(nb):
    cells = source_cells(nb)
    text = "\n".join(src for _, src, _ in cells)
    registered = keys(nb)
    assert len(registered) >= 3
    in_notebook = set(re.findall(r'(?:check|answer)\("(\d\d\.[a-z0-9_]+)"', text))
    assert in_notebook == set(registered), "keys in the notebook differ from v4lab.exercises.nb" + nb
    for key in registered:
        i = next(i for i, (kind, src, _) in enumerate(cells) if f'check("{key}", guess)' in src)
        question, trial, solution = cells[i - 1], cells[i], cells[i + 1]
        assert question[0] == "markdown" and trial[0] == "code" and "guess = None" in trial[1]
        # input and output collapsed: Run All must not show the answer under the question
        assert solution[0] == "code" and solution[2] == {"jupyter": {"source_hidden": True, "outputs_hidden": True}}
        assert f'answer("{key}")' in solution[1] and "assert " in solution[1] and "print(a.why)" in solution[1]
        value = answer(key).value
        shown = {f"{value}", f"{value:.3g}" if isinstance(value, float) else f"{value}"}
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value != 0:   # strings: a choice
            assert not any(re.search(rf"(?<![\d.]){re.escape(s)}(?![\d.])", question[1]) for s in shown), \
                f"{key}: the question gives the answer away"


@pytest.mark.parametrize("nb", sorted(NOTEBOOKS))
def test_exercises_sit_before_the_navigation_and_the_built_notebook_hides_solutions(nb):
    import nbformat
    built = nbformat.read(ROOT / "notebooks" / f"{NOTEBOOKS[nb]}.ipynb", as_version=4)
    hidden = [c for c in built.cells if nbbuild.is_hidden(c)]
    assert len(hidden) == len(keys(nb)) and all("answer(" in c.source for c in hidden)
    heads = [i for i, c in enumerate(built.cells) if c.cell_type == "markdown" and c.source.startswith("## Exercises")]
    assert len(heads) == 1
    last = built.cells[-1]
    assert last.cell_type == "markdown" and "[glossary](glossary.md)" in last.source
    assert all(i > heads[0] for i, c in enumerate(built.cells) if nbbuild.is_hidden(c))
    assert "**You need**" in built.cells[0].source and "What you will learn" in built.cells[0].source


@pytest.mark.parametrize("nb", sorted(NOTEBOOKS))
def test_navigation_links_point_to_existing_files(nb):
    src = (ROOT / "notebooks" / "src" / f"{NOTEBOOKS[nb]}.py").read_text()
    nav = [c for k, c, _ in source_cells(nb) if k == "markdown"][-1]
    targets = re.findall(r"\]\(([^)#]+\.(?:ipynb|md))\)", nav)
    n = int(nb)
    want = ([f"{NOTEBOOKS[f'{n - 1:02d}']}.ipynb"] if n else []) + ["README.md", "glossary.md"]
    assert targets[:len(want)] == want
    nxt = sorted((ROOT / "notebooks").glob(f"{n + 1:02d}_*.ipynb"))
    assert targets[-1] == nxt[0].name and nav.rstrip().endswith("→")
    for t in targets:
        if t != "glossary.md":                                     # written by the glossary branch
            assert (ROOT / "notebooks" / t).exists(), t
    for anchor in re.findall(r"\(glossary\.md#([^)]*)\)", src):
        assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", anchor), anchor


def test_every_answer_is_right_for_itself_and_wrong_nearby():
    for nb in sorted(NOTEBOOKS):
        for key in keys(nb):
            a = answer(key)
            assert isinstance(a, Answer) and a.why and _same(a.value, a)
            v = a.value
            if isinstance(v, bool):
                assert not _same(not v, a)
            elif isinstance(v, (int, float)):
                far = v * 3 + 1 if v >= 0 else v * 3 - 1
                assert not _same(far, a), key
            else:
                assert not _same(v + "x", a)
