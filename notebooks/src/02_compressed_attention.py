# Source of notebooks/02_compressed_attention.ipynb — edit here, then run `python -m v4lab.viz.nbbuild --execute`.

# %% [markdown]
# # 02 · Compressed attention: window, CSA, HCA, the lightning indexer and the sink
#
# **What you will learn**
# - V4's three attention layer kinds: a 128-token [sliding window](glossary.md#sliding-window) in every layer, plus either
#   **[CSA](glossary.md#csa)** (one compressed entry per 4 tokens, overlapping, of which a *[lightning indexer](glossary.md#lightning-indexer)* picks the [top-k](glossary.md#top-k))
#   or **[HCA](glossary.md#hca)** (one entry per 128 tokens, all of them attended);
# - how an entry is made (channel-wise gated softmax pooling), which entries a query may see, and how one
#   softmax with a learned **[sink](glossary.md#attention-sink)** spreads attention over the window and the entries;
# - what that does to the [KV cache](glossary.md#kv-cache) and the FLOPs of one decoded token at up to 1M tokens.
#
# **You need**: [00 · A tour of the V4 family](00_tour.ipynb) (KV cache and decode FLOPs of the V4 family).
#
# **Terms used here**: [compression ratio](glossary.md#compression-ratio) · [RoPE](glossary.md#rope) · [RMSNorm](glossary.md#rmsnorm) · [indexer warm-up](glossary.md#indexer-warm-up) ·
# [GQA-8](glossary.md#gqa-8) · [MLA](glossary.md#mla) · [FP4](glossary.md#fp4).
#
# The figures below run the notebook's trained model (the lab V4 in `data/lab-v4` when it is there, else the
# tiny one) on a text of up to 2048 tokens and show all of it for any query, layer and head.

# %%
from v4lab.device import configure_triton, describe
configure_triton()   # Triton interpreted on a CPU, compiled with CUDA
print(describe())

import torch

from v4lab import accounting, get_config
from v4lab.attention import sparse_attn
from v4lab.compressor import compress_pool
from v4lab.indexer import index_scores, visible_entries
from v4lab.viz import attention as attn_viz
from v4lab.viz import trained

model, tok, info = trained.trained_model()
print(info["description"])
cfg = model.cfg                    # the numbers the figures below show, from the model's config.json
m_of = {cfg.layer_kind(i): cfg.compress_ratio(i) for i in range(cfg.num_hidden_layers)}
print(f"window {cfg.sliding_window} tokens; CSA m = {m_of.get('csa')}, top-{cfg.index_topk}; HCA m = {m_of.get('hca')}; "
      f"a text of {attn_viz.MAX_TOKENS} tokens has {attn_viz.MAX_TOKENS // m_of['csa']} CSA and "
      f"{attn_viz.MAX_TOKENS // m_of['hca']} HCA entries")

# %% [markdown]
# ## The idea
#
# Layer $\ell$ has a compression ratio $m$ (`compress_ratios[ℓ]`: 0 = window only, 4 = CSA, 128 = HCA).
#
# **Compression.** The tokens of block $s$ (positions $ms..ms{+}m{-}1$) are pooled channel by channel with
# learned gates and a position bias $B$ (`ape`):
#
# $$C_s = \sum_{j} \operatorname{softmax}_j\!\big(Z_{j} + B_j\big) \odot K_{j} \qquad\text{(then RMSNorm and RoPE at position } ms),$$
#
# over the $m$ tokens of the block (HCA), or over $2m$ slots — the previous block through one half of the
# projection and this block through the other — in CSA (the *overlap*).
#
# **Visibility.** Query $t$ may use entry $s$ only once its block is complete: $s < \lfloor (t+1)/m \rfloor$.
#
# **Lightning indexer (CSA).** With its own small queries $q^I_{t,h}$, weights $w_{t,h}$ and compressed
# keys $k^I_s$: $\;I_{t,s} = \sum_h w_{t,h}\,\mathrm{ReLU}(q^I_{t,h}\cdot k^I_s)$; the top-`index_topk`
# visible entries are kept.
#
# **One softmax with a sink.** Over the candidates $j$ (the window $t{-}w{+}1..t$ and the chosen entries),
#
# $$p_j = \frac{e^{z_j}}{\sum_k e^{z_k} + e^{\text{sink}_h}},\qquad o_t = \sum_j p_j\, v_j ,$$
#
# so a head can put mass on "nothing" ($1-\sum_j p_j$) instead of being forced onto some token.
#
# ## The code
#
# Each formula is one function of `v4lab` (the Triton kernels in `kernels/` share their signatures):

# %%
# NBVAL_CHECK_OUTPUT
t = torch.arange(10)
print("visible entries (m=4) for t = 0..9:", visible_entries(t, 4).tolist())
g = torch.Generator().manual_seed(0)
kv, score = torch.randn(1, 8, 2 * 3, generator=g), torch.randn(1, 8, 2 * 3, generator=g)
ape = torch.zeros(4, 2 * 3)
print("CSA pooling: 8 tokens -> entries", tuple(compress_pool(kv, score, ape, 4, overlap=True).shape),
      "; HCA pooling of the same 8 tokens at m=8 ->", tuple(compress_pool(kv[..., :3], score[..., :3], ape[:, :3].repeat(2, 1), 8, overlap=False).shape))
q, k, w = torch.ones(1, 1, 2, 4), torch.tensor([[[1.0, 0, 0, 0], [-1.0, 0, 0, 0]]]), torch.tensor([[[0.5, 2.0]]])
print("index scores (ReLU kills the negative match):", index_scores(q, k, w).tolist())
o = sparse_attn(torch.ones(1, 1, 1, 4), torch.ones(1, 2, 4), torch.zeros(1), torch.tensor([[[-1, -1]]]), 0.5)
print("a query with no candidate puts all its mass on the sink, output =", o.flatten().tolist())

# %%
# NBVAL_CHECK_OUTPUT
for name in ("v4-flash", "v4-pro"):
    c = get_config(name)
    kinds = [c.layer_kind(i) for i in range(c.num_hidden_layers)]
    print(f"{name:<9} {c.num_hidden_layers} layers: {kinds.count('window')} window-only, {kinds.count('csa')} CSA "
          f"(m=4, top-{c.index_topk}), {kinds.count('hca')} HCA (m=128); window {c.sliding_window}, "
          f"{c.num_attention_heads} heads")

# %% [markdown]
# ## Live: inside one query
#
# The model ran once on the text (every attention layer with `Attention.inspect = True`, which fills
# `last_inspect`); the sliders only re-slice what it recorded. **Top:** the final attention of the query —
# blue bars are raw tokens of the window (shaded), orange bars compressed entries drawn over the tokens
# of their block, grey at the far left the sink. **Bottom left (CSA):** the indexer score of every visible
# entry and the top-k it keeps (red). **Bottom right:** how each attended entry pooled its tokens (mean of
# the channel-wise pooling weights). Hover for the tokens. The default text is the start of the model's
# held-out text (`heldout.txt`, documents it was not trained on); edit it to run the model again ("running…"
# shows under the controls while it computes; texts are cut at 2048 tokens). The top panel spans the whole
# text: zoom in (drag) on the query's window to see its tokens one by one.

# %%
inspector = attn_viz.InspectWidget()
inspector.display()
run = inspector.run
print("layers:", ", ".join(f"{i}: {k}" for i, k in enumerate(run.kinds)), f"· {run.n_tokens} tokens")

# %% [markdown]
# Things to try: move the query to the start (no entry is visible before position $m-1$; all mass is on
# the window and the sink); compare a CSA layer (a few chosen entries) with an HCA layer (at most
# $\lfloor (t+1)/128 \rfloor$ entries, all attended); find heads that park most of their mass on the sink.
#
# How the indexer learned to pick (`data/README.md`): top-k selection has no gradient, so the
# language-model loss never reaches the indexer. V4 (like V3.2) warms it up separately: with everything
# else frozen, the indexer's softmax over the visible entries is trained towards the main attention's
# probability on each entry, summed over heads (a KL loss, `v4lab.indexer.distill_kl`;
# `v4lab.train.indexer_warmup`). The lab model keeps that loss on for the rest of its training, so its
# picks follow the attention as the attention changes; its recall of the main attention's heaviest entries
# is measured in `data/lab-v4/training_summary.json`. (For `tiny-v4`, warmed up only after training, the
# warm-up raised that recall on held-out text from 0.358, about what random picks get, to 0.847:
# measured by v4lab, `data/README.md`.)
#
# ## Live: how a compressed entry is made, and which ones a query reads
#
# One compressed layer at a time. **Top:** the token axis of the whole text. The `entries` row is the
# layer's compressed entries over the tokens they stand for: light blue = complete (visible to the query),
# grey = not complete yet at the query (an entry becomes visible only once its last token has passed), red
# = the ones the query actually reads (CSA: the indexer's top-k; HCA: every complete one). Above them the
# query's raw window (blue) and the sink (grey, left of token 0). **Bottom:** the entry under the `entry`
# slider opened up (it starts at the entry the query attends most, outlined above): the learned pooling
# weight of every token it pools. Each channel has its own softmax over these tokens; the bars are the mean
# over channels, the black lines the range from the smallest to the largest channel (a logarithmic axis). A
# CSA entry pools 2m tokens: its own m (orange) and the m before them (purple, the overlap). An HCA entry
# pools its own 128. Try: the `layer` toggle between CSA and HCA layers; a query early in the text (few
# complete entries); the last HCA entry at the end of a 2048-token text (16 of them).

# %%
attn_viz.CompressionWidget().display()

# %% [markdown]
# ## Live: one query in the window, CSA and HCA layers side by side
#
# The same query in the first layer of each kind, on one token axis. **what it can read**: a bar of height 1
# over every token the query reads raw (the window) and over the tokens of every compressed entry it reads
# (CSA: light blue under the red picks = complete entries the indexer left out). **attention p**: the
# probability it gives each window token, each entry (one bar over the entry's tokens) and the sink; per
# layer they sum to 1. The title counts what each layer reads: the window layer is blind past its window,
# the CSA layer adds a few far 4-token summaries, the HCA layer a coarse summary of everything before it.

# %%
attn_viz.CompareWidget().display()

# %% [markdown]

#
# ## KV cache and FLOPs up to 1M tokens
#
# What each model stores per sequence and spends per decoded token, from `v4lab.accounting` (`kv_cache`,
# `decode_flops`, `gqa8`): V3.2 keeps a 656-byte MLA latent and a 132-byte indexer key for **every**
# token in every layer; V4 keeps a window of 128 raw entries per layer plus one 583-byte entry per 4
# tokens (CSA, with a 68-byte FP4 indexer key) or per 128 tokens (HCA). The GQA-8 baseline is a plain
# BF16 cache at V4-Pro's depth. (The same figures against context, as curves, are in `00_tour`.)

# %%
attn_viz.CostWidget().display()

# %%
# NBVAL_CHECK_OUTPUT
for ctx in (2 ** 17, accounting.ONE_M):
    n = attn_viz.cost_numbers(ctx)
    kv = {m: sum(v["kv"].values()) for m, v in n.items()}
    fl = {m: sum(v["flops"].values()) for m, v in n.items() if v["flops"]}
    print(f"{ctx:>8} tokens  KV GB: " + "  ".join(f"{m} {kv[m]:.2f}" for m in kv)
          + "  | GFLOPs: " + "  ".join(f"{m} {fl[m]:.1f}" for m in fl))

# %% [markdown]
# ## What it means for V4
#
# The report's claim (observation 3): at 1M tokens V4-Pro needs **10%** of V3.2's KV cache and **27%** of
# its per-token FLOPs; the V4 technical report (abstract, §2.3.4) adds V4-Flash's 7% and 10% and about
# **2%** of a GQA-8 cache. (The FLOP ratios use v4lab's weighting calibrated to those published ratios;
# the raw counts are beside them in notebook 00.) The inspector shows *why* that costs
# little quality: every query still sees its last 128 tokens exactly, CSA layers reach anywhere in the
# context through the indexer's top-k, HCA layers see a coarse summary of everything, and the sink lets a
# head attend to nothing. The calculator shows *where* the savings come from: the cache shrinks by the
# compression ratios (so its ratio to V3.2 is flat beyond ~32K), while the FLOP savings grow with context
# because V3.2's indexer scores every token in every layer and V4's scores one key per 4 tokens in half
# the layers.
#
# ## Check it yourself

# %%
# the inspector's numbers are the model's: probabilities + sink sum to 1 for every query, layer and head
for layer, rec in enumerate(run.layers):
    total = rec["probs_window"].sum(-1) + rec["probs_compressed"].sum(-1) + rec["sink"]
    assert torch.allclose(total, torch.ones_like(total), atol=1e-5), layer
    if run.kinds[layer] == "csa":                 # every pick is a visible entry
        sel, pos = rec["selected"], torch.arange(run.n_tokens)[:, None]
        assert bool(((sel < 0) | (sel < visible_entries(pos, run.ratios[layer]))).all())
print("attention rows sum to 1 (sink included); CSA picks are all visible entries")

# %%
# NBVAL_CHECK_OUTPUT
pro = accounting.compare("v4-pro", "v3.2")["ratios"]
flash = accounting.compare("v4-flash", "v3.2")["ratios"]
gq = accounting.summary("v4-pro", include_scales=False)["kv_vs_gqa8"]
print(f"1M tokens  V4-Pro KV {pro['kv_cache_bytes']:.3f} FLOPs {pro['decode_flops']:.3f} | "
      f"V4-Flash KV {flash['kv_cache_bytes']:.3f} FLOPs {flash['decode_flops']:.3f} | V4-Pro KV vs GQA-8 {gq:.3f}")
assert abs(pro["kv_cache_bytes"] - 0.10) < 0.01 and abs(pro["decode_flops"] - 0.27) < 0.015
assert abs(flash["kv_cache_bytes"] - 0.07) < 0.01 and abs(flash["decode_flops"] - 0.10) < 0.01

# %% [markdown]
# ## Optional: the same on real V4 weights
#
# On the released weights: the learned attention-sink logit of every layer and head (the share of
# probability a head may leave unassigned), and the compressor's learned position bias `ape` turned into the
# pooling weights it gives when all scores are equal: 4-token windows overlapping the previous one in CSA
# layers (for the main and the indexer's compressor), 128-token windows in HCA layers. To enable it, download
# DeepSeek-V4-Flash (or -Pro) from Hugging Face and set `V4LAB_REAL_WEIGHTS=/path/to/download` before
# starting Jupyter, or pass `path=...` to the figure and the widget.

# %%
# real-weights section: builds only when a download is configured
from v4lab.viz import real as vr
print(vr.real_weights_status())
if vr.configured():
    vr.build_sinks().show()
    vr.ApeWidget().display()

# %% [markdown]
# ## Exercises
#
# Predict first, then run. Write your prediction in `guess` and run the cell: `check` says whether it is
# right, and why. The collapsed cell under each exercise is its solution (click the bar to expand it): it
# computes the answer with v4lab, confirms it a second, independent way, and prints the explanation.

# %%
from v4lab.exercises import answer, check

# %% [markdown]
# **1. An early query.** In a CSA layer with $m = 4$ and `index_topk` = 16, how many compressed entries does
# the query at position 50 attend to (not counting its window)?

# %%
guess = None  # your prediction
check("02.csa_entries", guess)

# %% jupyter={"source_hidden": true, "outputs_hidden": true}
from v4lab.compressor import entry_span

a = answer("02.csa_entries")
complete = sum(entry_span(s, 4, overlap=True)[1] <= 50 for s in range(100))    # entries whose last token has arrived
assert a.value == min(complete, 16)
print(a.why)

# %% [markdown]
# **2. At the edge of a block.** Still $m = 4$: how many compressed entries are *visible* (candidates for
# the indexer) to the query at position 299?

# %%
guess = None  # your prediction
check("02.visible_at_edge", guess)

# %% jupyter={"source_hidden": true, "outputs_hidden": true}
a = answer("02.visible_at_edge")
assert a.value == sum(entry_span(s, 4, overlap=True)[1] <= 299 for s in range(400))
print(a.why)

# %% [markdown]
# **3. HCA.** In an HCA layer ($m = 128$), how many compressed entries does the query at position 1000
# attend to?

# %%
guess = None  # your prediction
check("02.hca_entries", guess)

# %% jupyter={"source_hidden": true, "outputs_hidden": true}
a = answer("02.hca_entries")
assert a.value == sum(entry_span(s, 128, overlap=False)[1] <= 1000 for s in range(20))
print(a.why)

# %% [markdown]
# **4. The sink's share.** A head has three candidates, all with logit 0, and a sink logit of 1.0. What
# share of its attention goes to the sink? Within ±0.03 counts.

# %%
guess = None  # your prediction
check("02.sink_mass", guess)

# %% jupyter={"source_hidden": true, "outputs_hidden": true}
a = answer("02.sink_mass")
# second route: with every value = 1 the output is the total mass on the candidates, 1 − the sink's share
o = sparse_attn(torch.zeros(1, 1, 1, 4), torch.ones(1, 3, 4), torch.tensor([1.0]), torch.arange(3).view(1, 1, 3), 0.5)
assert abs(a.value - (1 - float(o[0, 0, 0, 0]))) < 1e-6
print(a.why)

# %% [markdown]
# ← [01 · MoE expansion](01_moe_expansion.ipynb) · [index](README.md) · [glossary](glossary.md) · [03 · mHC](03_mhc.ipynb) →
