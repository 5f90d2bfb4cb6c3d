# Source of notebooks/00_tour.ipynb — edit here, then run `python -m v4lab.viz.nbbuild --execute`.

# %% [markdown]
# # 00 · A tour of the DeepSeek-V4 family
#
# **What you will learn**
# - how V3, V3.2, V4-Flash and V4-Pro compare in parameters, [KV cache](glossary.md#kv-cache) and decode compute, computed
#   from their configs by `v4lab.accounting` (nothing here is quoted; every number is recomputed);
# - why V4's cache stays small at 1M tokens: most layers keep only *compressed* entries;
# - where each V4 idea lives in the other notebooks and in the code.
#
# **You need**: no earlier notebook, only some PyTorch. This is the first one; the
# [index of the notebooks](README.md) lists them all.
#
# **Terms used here** (each links to the glossary): [MLA](glossary.md#mla) · [DSA](glossary.md#dsa) · [lightning indexer](glossary.md#lightning-indexer) ·
# [CSA](glossary.md#csa) · [HCA](glossary.md#hca) · [sliding window](glossary.md#sliding-window) · [GQA-8](glossary.md#gqa-8) · [E8M0](glossary.md#e8m0) · [active parameters](glossary.md#active-parameters) ·
# [FP8-equivalent FLOPs](glossary.md#fp8-equivalent-flops).
#
# Nothing here needs a GPU or weights.

# %%
from v4lab.device import configure_triton, describe
configure_triton()   # Triton interpreted on a CPU, compiled with CUDA (before any kernel import)
print(describe())

from v4lab import accounting, get_config
from v4lab.viz import tour

# %% [markdown]
# ## The family on one page
#
# V3 (671B parameters, 37B active per token) used Multi-head Latent Attention (MLA): one 576-wide
# latent per token per layer. V3.2 added DSA, a token-level *indexer* that picks the top 2048
# tokens to attend to — cheaper attention, but the indexer itself scores **every** cached token.
# V4 keeps the sparse idea but stops caching every token: most layers cache one entry per 4 tokens
# (CSA, with an indexer over those) or per 128 tokens (HCA), next to a 128-token sliding window.
#
# `accounting.summary(cfg, context)` gives every figure below; the table prints them at 1M
# (= 2^20) tokens of context. (V3 was released for 128K; it is shown at 1M only for scale: its dense
# MLA attention over every cached token is what V3.2's indexer removed.)

# %%
# NBVAL_CHECK_OUTPUT
print(tour.family_table(accounting.ONE_M))

# %% [markdown]
# ## The idea, in formulas
#
# **KV cache.** Per token of context, a V4 layer with compression ratio $m$ stores
#
# $$\text{bytes/token} = \frac{1}{m}\,\big(b_\text{entry} + [m{=}4]\; b_\text{index key}\big),
# \qquad b_\text{entry} = 448\cdot 1_\text{FP8} + 64\cdot 2_\text{BF16} + 7_\text{UE8M0 scales} = 583,$$
#
# with $b_\text{index key} = 128 \cdot \tfrac12_\text{FP4} + 4 = 68$ bytes, plus a fixed 128-entry window.
# V3.2 stores $656 + 132 = 788$ bytes per token in **every** layer. The parts, as `kv_cache` lists them:

# %%
# NBVAL_CHECK_OUTPUT
for p in accounting.kv_cache("v4-pro", accounting.ONE_M)["parts"]:
    print(f"{p['kind']:>4} {p['part']:<14} {p['layers']:>2} layers x {p['entries_per_layer']:>7} entries "
          f"x {p['bytes_per_entry']:>3} B = {p['bytes'] / 1e9:6.3f} GB   ({p['precision']})")

# %% [markdown]
# **Decode FLOPs.** One generated token costs $2\times$ the active parameters (the weight GEMMs),
# plus core attention ($H \times$ attended entries $\times\, 4 \cdot 512$) plus the indexer
# ($n_I (2 d_I + 2)$ per scored key; V4 scores $N/4$ compressed keys, V3.2 all $N$ tokens). The
# report's 27% / 10% are in "equivalent FP8 FLOPs" but it does not say how it weighs each precision.
# v4lab's weighting (`accounting.WEIGHTINGS["B"]`: BF16 attention 2×, the FP4 indexer ½×, GEMMs 1×) is a
# fit **calibrated to the published ratios**, not the report's own scheme, so the raw count is always
# printed beside it (the table's last column; `"A"` in the code). Raw, V4-Pro is at 26.1% and V4-Flash at
# 12.1% of V3.2: the Flash figure is the one the calibration moves.

# %%
# NBVAL_CHECK_OUTPUT
for name, terms in (("V3.2", accounting.decode_flops("v3.2")), ("V4-Pro", accounting.decode_flops("v4-pro"))):
    g = terms["groups_raw"]
    print(f"{name:<7} GEMMs {g['gemm'] / 1e9:7.1f}  core attention {g['core_attention'] / 1e9:7.1f}  "
          f"indexer {g['indexer_scores'] / 1e9:7.1f}  GFLOP raw; weighted total {terms['total'] / 1e9:7.1f}")

# %% [markdown]
# ## Live: move the context
#
# Left: KV cache per sequence; right: decode FLOPs per token (log scales). The dotted line is a
# plain BF16 GQA-8 cache (head dim 128) at V4-Pro's depth. On the left every line has the same slope:
# every model's cache grows linearly with context, and V4's gain is a constant factor — the vertical
# gap, about 10× below V3.2 (the title gives the ratio at the slider's context). On the right the
# shapes differ: V3.2's indexer scores every cached token, so from 1K to 1M its FLOPs per token grow
# 10.8×, V4-Pro's 3.0× and V4-Flash's 4.1× (`accounting.decode_flops`). The toggle switches between
# FP8-equivalent FLOPs (calibrated to the published ratios: v4lab's fit, the report does not state its
# weighting) and raw FLOPs.

# %%
w = tour.ContextWidget()
w.display()

# %% [markdown]
# ## What it means for V4
#
# The report's claim (observation 3): at 1M tokens V4-Pro needs about **27%** of V3.2's single-token
# FLOPs and **10%** of its KV cache. The V4-Flash figures (**10%** and **7%**) and the cache at about **2%**
# of a BF16 GQA-8 model's are from the V4 technical report (its introduction and Section 2). The table
# reproduces the KV ratios from the configs alone; the FLOP ratios are reproduced with the calibrated
# weighting (raw: 26.1% and 12.1%). Two things the widget makes
# visible: the FLOP savings come from the indexer (V3.2 scores every token in every layer, V4 one
# key per 4 tokens in half the layers, in FP4), so they grow with context — at 128K V4-Pro is still
# at about half of V3.2; and the cache ratio is almost constant beyond ~32K, because it is set by
# the compression ratios, not by the context.
#
# ## Where each idea lives

# %%
from IPython.display import Markdown
Markdown(tour.notebook_map())

# %% [markdown]
# ## Check it yourself
#
# The claims as assertions (change a config and rerun: e.g. V4-Flash with an FP8 indexer key, or a
# larger `index_topk`).

# %%
# NBVAL_CHECK_OUTPUT
pro = accounting.compare("v4-pro", "v3.2")["ratios"]
flash = accounting.compare("v4-flash", "v3.2")["ratios"]
raw_pro = accounting.compare("v4-pro", "v3.2", weights="A")["ratios"]["decode_flops"]
raw_flash = accounting.compare("v4-flash", "v3.2", weights="A")["ratios"]["decode_flops"]
print(f"V4-Pro   KV {pro['kv_cache_bytes']:.3f}  FLOPs {pro['decode_flops']:.3f} calibrated, {raw_pro:.3f} raw"
      "  (published: 0.10, 0.27)")
print(f"V4-Flash KV {flash['kv_cache_bytes']:.3f}  FLOPs {flash['decode_flops']:.3f} calibrated, {raw_flash:.3f} raw"
      "  (published: 0.07, 0.10)")
gq = accounting.summary("v4-pro", include_scales=False)["kv_vs_gqa8"]
print(f"V4-Pro KV vs BF16 GQA-8: {gq:.4f}  (published: about 0.02)")
assert abs(pro["kv_cache_bytes"] - 0.10) < 0.01 and abs(pro["decode_flops"] - 0.27) < 0.015
assert abs(flash["kv_cache_bytes"] - 0.07) < 0.01 and abs(flash["decode_flops"] - 0.10) < 0.01
assert abs(gq - 0.02) < 0.002

# %%
cfg = get_config("v4-flash")
cfg.index_topk = 2048            # try your own change
print(f"V4-Flash with top-{cfg.index_topk}: FLOPs {accounting.compare(cfg, 'v3.2')['ratios']['decode_flops']:.3f} of V3.2")

# %% [markdown]
# ## Exercises
#
# Predict first, then run. Write your prediction in `guess` and run the cell: `check` says whether it is
# right, and why. The collapsed cell under each exercise is its solution (click the bar to expand it): it
# computes the answer with v4lab, confirms it a second, independent way, and prints the explanation.

# %%
from v4lab.exercises import answer, check

# %% [markdown]
# **1. When does the indexer catch up with the weights?** For every decoded token V3.2's indexer scores
# every cached token, while its weight GEMMs cost the same at any context. At roughly what context (in
# tokens) do V3.2's indexer FLOPs per decoded token (raw, unweighted) equal those of all its weight GEMMs?
# Within a factor of 2 counts.

# %%
guess = None  # your prediction
check("00.indexer_crossover", guess)

# %% jupyter={"source_hidden": true, "outputs_hidden": true}
a = answer("00.indexer_crossover")
terms = accounting.decode_flops("v3.2", a.value)["groups_raw"]      # evaluated at the answer's context
assert abs(terms["indexer_scores"] / terms["gemm"] - 1) < 1e-3, terms
print(a.why)

# %% [markdown]
# **2. A short context.** At 1M tokens V4-Pro caches about a tenth of what V3.2 caches. What fraction is it
# at a 4K context (4096 tokens)? Within ±0.03 counts.

# %%
guess = None  # your prediction
check("00.kv_ratio_4k", guess)

# %% jupyter={"source_hidden": true, "outputs_hidden": true}
a = answer("00.kv_ratio_4k")
# second route: the per-token formula of "The idea, in formulas", by hand from the configs
pro, N = get_config("v4-pro"), 4096
eb, ib, kinds = accounting.entry_bytes(pro), accounting.index_key_bytes(pro), pro.layer_kinds
v4_bytes = (len(kinds) * pro.sliding_window * eb + kinds.count("csa") * (N // 4) * (eb + ib)
            + kinds.count("hca") * (N // 128) * eb)
v32_bytes = get_config("v3.2").num_hidden_layers * N * (656 + 132)
assert abs(a.value - v4_bytes / v32_bytes) < 1e-9
print(a.why)

# %% [markdown]
# **3. Where V3's decode FLOPs go.** V3 has no indexer: each decoded token attends every cached token with
# its dense MLA, 128 heads in 61 layers. At 1M tokens, what share of V3's raw decode FLOPs is attention
# (a number between 0 and 1)? Within ±0.05 counts.

# %%
guess = None  # your prediction
check("00.v3_attention_share", guess)

# %% jupyter={"source_hidden": true, "outputs_hidden": true}
a = answer("00.v3_attention_share")
v3, N = get_config("v3"), accounting.ONE_M
# absorbed MLA per head and cached token: q.k over 512 + 64 dims, p.v over the 512-dim latent (2 FLOPs per MAC)
core = v3.num_hidden_layers * v3.num_attention_heads * N * (2 * (v3.kv_lora_rank + v3.qk_rope_head_dim) + 2 * v3.kv_lora_rank)
gemm = 2 * accounting.params("v3")["active"]
assert abs(a.value - core / (core + gemm)) < 1e-9
print(a.why)

# %% [markdown]
# **4. One long conversation.** How many GB (10⁹ bytes) of KV cache does V4-Flash keep for one sequence of
# 1M (2²⁰) tokens? Within 25% counts.

# %%
guess = None  # your prediction
check("00.flash_cache_gb", guess)

# %% jupyter={"source_hidden": true, "outputs_hidden": true}
a = answer("00.flash_cache_gb")
flash, N = get_config("v4-flash"), accounting.ONE_M
eb, ib, kinds = accounting.entry_bytes(flash), accounting.index_key_bytes(flash), flash.layer_kinds
by_hand = (len(kinds) * flash.sliding_window * eb + kinds.count("csa") * (N // 4) * (eb + ib)
           + kinds.count("hca") * (N // 128) * eb)
assert abs(a.value - by_hand / 1e9) < 1e-9
print(a.why)

# %% [markdown]
# [index](README.md) · [glossary](glossary.md) · [01 · MoE expansion](01_moe_expansion.ipynb) →
