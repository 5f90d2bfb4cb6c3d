"""Exercises of notebooks 06-11: every answer against an independent computation, the tolerances against
the tempting wrong answers they must reject, and the keys against the notebook sources.

"Independent" here means from first principles where that is cheap: the data files read as JSON, the
config's numbers and the documented formulas, the bias simulation re-run step by step with
``v4lab.gate``/``v4lab.moe``, the model run directly; not the helper the answer itself calls.
"""
import json
import math
import re
from pathlib import Path

import pytest
import torch

from v4lab import accounting, attention, exercises, gate, hardware, trace
from v4lab.exercises import answer

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ("06", "07", "08", "09", "10", "11")
PRICES = json.loads((ROOT / "v4lab" / "prices.json").read_text())["models"]
GPUS = json.loads((ROOT / "v4lab" / "hardware.json").read_text())["gpus"]


def close(a, b, rel=1e-9):
    return math.isclose(float(a), float(b), rel_tol=rel, abs_tol=1e-12)


# ------------------------------------------------------------------------------------ keys vs notebooks
def source(nb: str) -> str:
    (path,) = (ROOT / "notebooks" / "src").glob(f"{nb}_*.py")
    return path.read_text()


@pytest.mark.parametrize("nb", NOTEBOOKS)
def test_keys_match_the_notebook(nb):
    text = source(nb)
    keys = exercises.keys(nb)
    assert len(keys) >= 3, f"notebook {nb}: {len(keys)} exercises"
    checked = re.findall(r'check\("([^"]+)", guess\)', text)
    solved = re.findall(r'answer\("([^"]+)"\)', text)
    assert sorted(checked) == sorted(keys), f"notebook {nb}: check() cells {checked} vs registered {keys}"
    assert sorted(solved) == sorted(keys), f"notebook {nb}: solution cells {solved} vs registered {keys}"


@pytest.mark.parametrize("nb", NOTEBOOKS)
def test_each_exercise_has_a_guess_cell_and_a_hidden_solution(nb):
    cells = re.split(r"^# %%", source(nb), flags=re.M)
    for key in exercises.keys(nb):
        i = next(i for i, c in enumerate(cells) if f'check("{key}", guess)' in c)
        assert "guess = None  # your prediction" in cells[i]
        assert cells[i + 1].startswith(' jupyter={"source_hidden": true') and f'answer("{key}")' in cells[i + 1]
        assert "assert " in cells[i + 1], f"{key}: the solution asserts nothing"
        assert cells[i - 1].startswith(" [markdown]"), f"{key}: no question before the guess cell"


@pytest.mark.parametrize("nb", NOTEBOOKS)
def test_exercises_sit_before_the_final_navigation(nb):
    cells = re.split(r"^# %%", source(nb), flags=re.M)
    last = cells[-1]
    assert last.startswith(" [markdown]") and "[glossary](glossary.md)" in last and "←" in last
    assert "## Exercises" in "".join(cells[-1 - 3 * len(exercises.keys(nb)) - 3:])


# ------------------------------------------------------------------------------------ tolerances
# A guess a learner plausibly makes, and that the answer's tolerance must not accept.
TEMPTING = {
    "06.best_gamma": 0.03,                 # "the largest step balances best"
    "06.churn_at_spike": 0.1,
    "08.fp4_gemm_compute_bound": 1,
    "08.sparse_attn_batching": 4096,       # "intensity grows with the batch like a GEMM's"
    "08.mxfp4_bytes": 2048 * 4096 // 2,    # the codes without their E8M0 scales
    "08.empty_row": float("nan"),
    "09.a100_share": 312 / 1979,           # the compute ratio instead of the bandwidth ratio
    "09.half_of_pro": 0.5,
    "10.kv_percent_short": 7.31,           # the 1M figure
    "10.kv_share_of_read": 0.5,
    "11.opus_over_flash": 25.0 / 0.28,     # the output-price ratio alone
    "11.thinking_factor": 3.0,             # "output triples, so the bill triples"
    "11.gemini_long_prompt": 76.0 / 59.16,  # the 32K ratio
}


@pytest.mark.parametrize("key", sorted(TEMPTING))
def test_tolerance_rejects_the_tempting_answer(key, capsys):
    a = answer(key)
    assert exercises.check(key, a.value)
    assert not exercises.check(key, TEMPTING[key])
    assert "not yet" in capsys.readouterr().out


@pytest.mark.parametrize("nb", NOTEBOOKS)
def test_every_answer_explains_itself(nb):
    for key in exercises.keys(nb):
        a = answer(key)
        assert len(a.why) > 40 and a.value is not None, key


# ------------------------------------------------------------------------------------ 06
def resimulate(gamma: float, skew: float = 1.0, steps: int = 300, tokens: int = 256, experts: int = 8, k: int = 2):
    """The bias simulation of notebook 06, step by step from its documented rule."""
    g = torch.Generator().manual_seed(0)
    pref = skew * torch.linspace(-1.0, 1.0, experts)
    bias, imb = torch.zeros(experts), []
    for _ in range(steps):
        s = gate.gate_scores(torch.randn(tokens, experts, generator=g) + pref)
        load = torch.bincount(gate.select_topk(s, bias, k).reshape(-1), minlength=experts).float()
        imb.append(float(load.max() / load.mean()))
        bias += gamma * torch.sign(load.mean() - load)
    return imb


def test_06_bias_answers():
    from v4lab.viz import stability
    sims = {g: resimulate(g) for g in stability.GAMMA_STOPS}
    tails = {g: sum(v[-50:]) / 50 for g, v in sims.items()}
    assert answer("06.best_gamma").value == min(tails, key=tails.get)
    v4 = sims[0.001]
    assert answer("06.steps_to_balance").value == next(i + 1 for i, x in enumerate(v4) if x < 1.2)


def test_06_ar_answers_from_the_stored_file():
    from v4lab.viz import stability
    ar = json.loads(stability.AR_CACHE.read_text())
    off, spike = ar["off"], ar["config"]["spike_at"]
    i = off["step"].index(spike)
    assert close(answer("06.churn_at_spike").value, off["churn"][i])
    assert close(answer("06.moe_jump").value, off["max_moe"][i + 1] / off["max_moe"][i])


# ------------------------------------------------------------------------------------ 07
@pytest.fixture(scope="module")
def lab():
    from v4lab.viz import trained
    model, tok, _ = trained.trained_model()
    return model, tok


def test_07_counting_accuracy(lab):
    from v4lab.viz import trained
    model, tok = lab
    ids = trained.encode(tok, trained.SAMPLE_TEXTS["numbers"], 256)
    with torch.no_grad():
        logits = model(ids).cpu()
    acc = float((logits[0, :-2].argmax(-1) == ids[0, 1:-1]).float().mean())
    assert close(answer("07.counting_accuracy").value, acc, 1e-6)


def test_07_routes_and_attention(lab):
    from collections import Counter

    from v4lab.viz import tiny, trained
    model, tok = lab
    ids = trained.encode(tok, tiny.DEFAULT_TEXT, 256)
    with torch.no_grad():
        model(ids)
    toks = ids[0].tolist()
    c = Counter(trained.token_strings(tok, ids))
    top = max(c.values())
    cfg = model.cfg
    learned = next(i for i in range(cfg.num_hidden_layers) if not model.layers[i].ffn.gate.is_hash)
    idx = model.layers[learned].ffn.last_routing["idx"].cpu()
    strs = trained.token_strings(tok, ids)
    # every token tied for most frequent is a fair reading; the answer must be one of them
    counts = {len({tuple(sorted(idx[p].tolist())) for p in range(len(toks)) if strs[p] == s})
              for s, n in c.items() if n == top}
    assert answer("07.repeat_sets").value in counts
    csa = cfg.layer_kinds.index("csa")
    assert answer("07.csa_reads").value == min(101 // cfg.compress_ratio(csa), cfg.index_topk)


def test_07_sink(lab):
    from v4lab.viz import attention as attn_viz
    from v4lab.viz import tiny
    run = attn_viz.run_text(tiny.DEFAULT_TEXT)
    csa = run.kinds.index("csa")
    rec = run.layers[csa]
    assert answer("07.sink_at_start").value == bool(rec["sink"][0].float().mean() > rec["sink"][100].float().mean())
    # the sink is 1 - the probability the keys get (the record's probabilities, both parts)
    p = rec["probs_window"][100].float().sum(-1) + rec["probs_compressed"][100].float().sum(-1)
    assert torch.allclose(rec["sink"][100].float(), 1 - p, atol=1e-5)


# ------------------------------------------------------------------------------------ 08
def test_08_fp4_gemm_from_the_formula():
    d, i = 4096, 2048                                  # a V4-Flash expert projection [2048, 4096]
    ridge = GPUS["H200"]["tflops"]["fp8"] / GPUS["H200"]["hbm_tb_s"]     # Hopper runs FP4 at the FP8 rate
    ai = lambda m: 2 * m * i * d / (i * d * (0.5 + 1 / 32) + m * (d + i) * 2)   # noqa: E731
    assert answer("08.fp4_gemm_compute_bound").value == next(2 ** e for e in range(20) if ai(2 ** e) >= ridge)


def test_08_sparse_attn_and_mxfp4():
    assert close(answer("08.sparse_attn_batching").value, 1.0)       # FLOPs and bytes both scale with M
    assert answer("08.mxfp4_bytes").value == 2048 * 4096 // 2 + 2048 * 4096 // 32


def test_08_empty_row_kernel_equals_reference():
    from v4lab.exercises import nb08
    from v4lab.kernels.sparse_attn import sparse_attn
    args = nb08.empty_row_inputs()
    o, ref = sparse_attn(*args), attention.sparse_attn(*args)
    assert answer("08.empty_row").value == 0.0 and float(ref[:, 0].abs().max()) == 0.0
    assert not torch.isnan(o).any() and torch.allclose(o, ref, atol=1e-5)
    assert float(o[:, 1:].abs().max()) > 0                              # the other rows do attend


# ------------------------------------------------------------------------------------ 09
def test_09_hardware_answers():
    assert close(answer("09.a100_share").value, GPUS["A100"]["hbm_tb_s"] / GPUS["H200"]["hbm_tb_s"])
    b = answer("09.compute_bound_batch").value
    for batch, bound in ((b, "compute"), (b // 2, "memory")):
        r = hardware.roofline("v4-pro", "H200", 4096, batch)
        assert r["bound"] == bound and (r["t_compute"] >= r["t_memory"]) == (bound == "compute")


def test_09_price_answers():
    f, p = PRICES["v4-flash"], PRICES["v4-pro"]
    assert close(answer("09.flash_month").value, 100 * f["input"] + 10 * f["output"])
    lo, hi = 32 * f["input"] + f["output"], 32 * p["input"] + p["output"]
    share = answer("09.half_of_pro").value
    assert close((1 - share) * lo + share * hi, hi / 2)


# ------------------------------------------------------------------------------------ 10
def test_10_cache_rules(lab):
    model, _ = lab
    cfg = model.cfg
    csa, hca = cfg.layer_kinds.index("csa"), cfg.layer_kinds.index("hca")
    m = cfg.compress_ratio(csa)
    assert answer("10.indexer_drops").value == m * (cfg.index_topk + 1) - 1
    assert answer("10.hca_open_block").value == (100 + 1) % cfg.compress_ratio(hca)


def v4_kv_bytes(name: str, n: int) -> int:
    """Stored KV bytes from the documented rule: every layer a window of min(w, n) entries, CSA one entry +
    one indexer key per 4 tokens, HCA one entry per 128 tokens."""
    from v4lab.config import get_config
    cfg = get_config(name)
    eb, kb = accounting.entry_bytes(cfg), accounting.index_key_bytes(cfg)
    total = 0
    for kind in cfg.layer_kinds:
        total += min(cfg.sliding_window, n) * eb
        total += {"csa": (n // 4) * (eb + kb), "hca": (n // 128) * eb}.get(kind, 0)
    return total


def test_10_byte_answers():
    from v4lab.config import get_config
    v32 = get_config("v3.2")
    per_token = 656 + 132                          # V3.2's served latent + indexer key (accounting's format)
    ratio = v4_kv_bytes("v4-flash", 8192) / (v32.num_hidden_layers * 8192 * per_token)
    assert close(answer("10.kv_percent_short").value, 100 * ratio)
    pro = get_config("v4-pro")
    n, eb, kb = 2 ** 20, accounting.entry_bytes(pro), accounting.index_key_bytes(pro)
    kv = 0
    for kind in pro.layer_kinds:                   # what one token reads: window, top-k / all entries, all keys
        kv += min(pro.sliding_window, n) * eb
        kv += {"csa": min(pro.index_topk, n // 4) * eb + (n // 4) * kb, "hca": (n // 128) * eb}.get(kind, 0)
    w = sum(trace.weight_bytes_per_token("v4-pro").values())
    assert close(answer("10.kv_share_of_read").value, kv / (kv + w))


# ------------------------------------------------------------------------------------ 11
def bill(model: str, inp_m: float, out_m: float, prompt: int = 32000) -> float:
    p = PRICES[model]
    rate = p["input"] * (p.get("long_context_input_multiplier", 1.0)
                         if prompt > p.get("long_context_threshold", float("inf")) else 1.0)
    return inp_m * rate + out_m * p["output"]


def test_11_answers_from_the_price_file():
    from v4lab import deploy
    assert close(answer("11.opus_over_flash").value, bill("opus-4.7", 32, 1) / bill("v4-flash", 32, 1))
    assert close(answer("11.routed_share_of_pro").value,
                 (0.8 * bill("v4-flash", 32, 1) + 0.2 * bill("v4-pro", 32, 1)) / bill("v4-pro", 32, 1))
    think = 1 + deploy.fact("thinking_output_tokens") / 1000          # million output tokens a month
    assert close(answer("11.thinking_factor").value, bill("v4-flash", 32, think) / bill("v4-flash", 32, 1))
    assert close(answer("11.gemini_long_prompt").value,
                 bill("gemini-3.1-pro", 300, 1, 300_000) / bill("v4-pro", 300, 1, 300_000))
