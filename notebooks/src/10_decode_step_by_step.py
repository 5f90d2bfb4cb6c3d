# Source of notebooks/10_decode_step_by_step.ipynb — edit here, then run `python -m v4lab.viz.nbbuild --execute`.

# %% [markdown]
# # 10 · Decode, step by step: what the cache holds, what one token reads
#
# **What you will learn**
# - what each layer kind keeps in its [KV cache](glossary.md#kv-cache) as tokens arrive: the **window ring**,
#   the compressor's **open block**, one **compressed entry** every m tokens (m = 4 for [CSA](glossary.md#csa),
#   128 for [HCA](glossary.md#hca)), the CSA **indexer keys** (for the [lightning indexer](glossary.md#lightning-indexer))
#   — and what the next token actually reads from it;
# - the moment an entry becomes readable: query t sees ⌊(t+1)/m⌋ entries;
# - one token walked through the whole model — embedding, [mHC](glossary.md#mhc), attention by kind,
#   [MoE](glossary.md#moe) routing, the [SwiGLU clamp](glossary.md#swiglu-clamp), the head,
#   [MTP](glossary.md#mtp)'s draft — with tensor shapes and the bytes each step reads;
# - the same step at V4-Flash and V4-Pro scale at 8K, 128K and 1M tokens, against V3.2. This is where the
#   report's "10% of V3.2's KV cache" (observation 3) comes from.
#
# **You need** [02 · Compressed attention](02_compressed_attention.ipynb) (window, CSA, HCA, the indexer) and
# [07 · The whole tiny V4, trained](07_tiny_v4.ipynb) (the model traced here); [00 · A tour](00_tour.ipynb)
# for the KV-cache totals.
#
# Everything here is the notebook model's own cached decode (`v4lab.trace`), not a re-implementation.

# %%
from v4lab.device import configure_triton, describe
configure_triton()   # Triton interpreted on a CPU, compiled with CUDA
print(describe())

from v4lab import accounting, trace
from v4lab.viz import decode as decode_viz
from v4lab.viz import trained

model, tok, info = trained.trained_model()
print(info["description"])
ids = trained.encode(tok, decode_viz.DEFAULT_TEXT, decode_viz.MAX_TOKENS)
print("text:", ids.shape[1], "tokens")

# %% [markdown]
# ## The cache of each layer kind
#
# A decoder keeps, per layer, what later tokens will need. In V4 every layer keeps a **ring** of the last
# `sliding_window` raw KV entries (slot p mod w holds token p). CSA and HCA layers also run a
# **compressor**: tokens wait in an *open block*; when the block of m tokens is complete it is pooled into
# one **compressed entry** (CSA pools 2m tokens — its own block and the one before, the overlap) and the
# block is emptied. A CSA layer also stores one small FP4 **indexer key** per entry. Query t may read entry
# s once s < ⌊(t+1)/m⌋, so an entry is readable by the very token that closes its block.
#
# What a token reads: the whole ring, plus in CSA the indexer's top-k entries (it scores every key), in HCA
# every entry, and a per-head [sink](glossary.md#sink) logit.
#
# `trace.decode_trace(model, ids)` feeds the text through the model's cached decode and records all of this
# per token and layer, with the cache's size in the released storage format (tested equal to
# `accounting.kv_cache` at every step). The widget below plays it.

# %%
tr = trace.decode_trace(model, ids, chunk=decode_viz.CHUNK, progress=True)

# %%
# NBVAL_CHECK_OUTPUT
m = model.cfg.compress_ratios[model.cfg.layer_kinds.index("csa")]
shown = [i for i in range(model.cfg.num_hidden_layers) if model.cfg.layer_kind(i) != "window"][:2]
for t in (1, m - 1, m, 2 * m, 129):
    print(trace.summarize(tr[t], layers=shown))
    assert tr[t]["cache_bytes"] == accounting.kv_cache(model.cfg, t + 1)["total_bytes"]

# %% [markdown]
# Read the lines above (measured by `v4lab.trace` on the notebook model) with the widget below; tokens are
# counted from 0:
# - **t = 1**: two tokens, in the ring and in both open blocks; no compressed entry exists yet, so CSA and
#   HCA read only the raw window.
# - **t = m − 1 = 3**: the CSA block closes: entry 0 appears (outlined green) and token 3 already reads it,
#   ⌊4/4⌋ = 1. The CSA open block is empty again; HCA's keeps filling (4/128).
# - **t = m = 4**: the next CSA block has one token; still one entry.
# - **t = 2m = 8**: two CSA entries; the newest pools tokens 0–7 (its 2m span, the bracket under the row).
# - **t = 129**: 32 CSA entries of which the indexer picked top-k; HCA's first entry (tokens 0–127) closed
#   at t = 127 and every HCA query reads it from then on.
#
# Press ▶ to play the text; the bars at the bottom compare this model's cache with the same number of layers
# holding V3.2's [MLA](glossary.md#mla) cache and a BF16 [GQA-8](glossary.md#gqa-8) cache (log scale).

# %%
decode_viz.DecodeWidget().display()

# %% [markdown]
# The notebook model is tiny (head dim 32 in its config), so its entries are much smaller than V3.2's 656-byte latents and
# the ratio in the widget is far below the report's 10%. At release widths the same rules give the numbers
# in the last section.
#
# ## One token through the whole model
#
# `trace.walk_token` prefills the text up to token t with the cache, then runs token t through the model's
# own pieces in `Block.forward`'s order and records for each: the tensor shapes, what it reads and how many
# bytes, in the released format (weights as `v4lab.checkpoint.expected_keys` lays them out: FP8 attention
# weights, FP4 routed experts, BF16/FP32 small tensors; cache entries as `accounting.entry_bytes`). The
# final logits equal a plain forward's (tested).
#
# 1. **embedding**: one row of `embed.weight`, copied into the n = `hc_mult` residual streams;
# 2. **mHC pre-mix**: the n streams are mixed down to one attention input (weights from `hc_attn_*`, a
#    Sinkhorn-normalised n×n mixing matrix kept for the post-mix);
# 3. **attention**: window, CSA or HCA — what it reads from its cache and how many bytes;
# 4. **MoE**: hash routing (`tid2eid[token]`, first layers) or learned routing (top-k of scores + bias),
#    plus the shared expert; only the chosen experts' weights are read;
# 5. **the clamp**: SwiGLU's gate and up pre-activations are clipped at `swiglu_limit`;
# 6. **mHC post-mix**: the block output is added back into the n streams;
# 7. **head**: `hc_head` collapses the streams, then the final norm and `head.weight`;
# 8. **MTP draft**: the MTP block takes the last streams and the embedding of the head's token t+1 and
#    drafts token t+2 (what a speculative decoder would verify next).

# %%
walk = trace.walk_token(model, ids, 150)
print(trace.format_walk(walk))

# %% [markdown]
# Per token, almost all of those bytes are weights; the KV cache read is a few kilobytes here. At release
# scale and long context the cache read grows with the context while the weights stay fixed.
#
# ## The same step at V4-Flash and V4-Pro, vs V3.2
#
# `trace.decode_bytes` counts the bytes one decoded token reads at a given context, from the configs
# alone: the weights it uses (V4: every tensor of the release layout except the routed experts it is not
# sent to; V3.2: active parameters at FP8 with BF16 head, its release format) and the KV entries it reads
# (V4: window, CSA top-k entries and every indexer key, every HCA entry; V3.2: its top-2048 latents of 656 B
# and every 132-B indexer key — V3.2's served FlashMLA format, an assumption documented in
# `v4lab.accounting`). All numbers below are derived from the configs by `v4lab.accounting`.

# %%
# NBVAL_CHECK_OUTPUT
rows = trace.decode_bytes_rows(("v3.2", "v4-flash", "v4-pro"), (8192, 131072, 1048576))
print(trace.format_decode_bytes(rows))
for name in ("v4-flash", "v4-pro"):
    k = accounting.kv_cache(name)["total_bytes"] / accounting.kv_cache("v3.2")["total_bytes"]
    print(f"{name}: KV cache stored at 1M = {100 * k:.3g}% of V3.2's")

# %% [markdown]
# What to take away (numbers from the table above, derived by `v4lab.accounting`):
# - **The stored cache** at 1M tokens is 10.5% of V3.2's for V4-Pro and 7.31% for V4-Flash (printed above) — the
#   report's "10% of V3.2's KV cache". It comes from the rules you watched in the widget: most layers keep
#   one entry per 4 or 128 tokens instead of one per token, in FP8 with BF16 RoPE dims.
# - **The cache read per token** also shrinks: V3.2 reads a top-2048 set of latents but scores *every*
#   token's indexer key, which grows to gigabytes at 1M; V4's indexer scores one FP4 key per 4 tokens.
# - **At batch 1 the weights dominate** the bytes of one token (tens of GB for V4-Pro and V3.2, whose active
#   weights are of similar size). Serving batches many sequences: the weights are read once per batch, the
#   cache once per sequence — so at long context it is the cache column that decides how many sequences fit
#   and how fast each step is.

# %% [markdown]
# ## Exercises
#
# Predict first, then run. Write your prediction in `guess` and run the cell: `check` says whether it is
# right and why. Each exercise is followed by a collapsed solution cell that computes the answer with
# v4lab and checks it a second way.

# %%
from v4lab.exercises import answer, check, nb10

# %% [markdown]
# **1 · When the indexer starts choosing.** Trace a longer text, `nb10.LONG_TEXT` (the three sample texts
# one after another). In the first CSA layer of the notebook model, from which token t on does the query of
# token t read *fewer* compressed entries than the layer holds?

# %%
guess = None  # your prediction
check("10.indexer_drops", guess)

# %% jupyter={"source_hidden": true, "outputs_hidden": true}
a = answer("10.indexer_drops")
csa = model.cfg.layer_kinds.index("csa")
assert a.value == model.cfg.compress_ratio(csa) * (model.cfg.index_topk + 1) - 1   # the first t with ⌊(t+1)/m⌋ > top-k
print(a.value, "-", a.why)

# %% [markdown]
# **2 · The open block.** Right after token 100, how many tokens wait in the HCA layer's open block (not
# yet pooled into a compressed entry)?

# %%
guess = None  # your prediction
check("10.hca_open_block", guess)

# %% jupyter={"source_hidden": true, "outputs_hidden": true}
a = answer("10.hca_open_block")
hca = model.cfg.layer_kinds.index("hca")
assert a.value == trace.step_counts(100, model.cfg.compress_ratio(hca), "hca")["pending"]   # the rules alone
print(a.value, "-", a.why)

# %% [markdown]
# **3 · A short context.** At 8K tokens, V4-Flash's stored KV cache is what percentage of V3.2's at 8K?
# (The 1M figure is printed above: do you expect more or less?) Within 5 %.

# %%
guess = None  # your prediction
check("10.kv_percent_short", guess)

# %% jupyter={"source_hidden": true, "outputs_hidden": true}
a = answer("10.kv_percent_short")
assert abs(a.value - 100 * accounting.compare("v4-flash", "v3.2", 8192)["ratios"]["kv_cache_bytes"]) < 1e-9
print(f"{a.value:.3g}% -", a.why)

# %% [markdown]
# **4 · Weights or cache?** One decoded V4-Pro token at 1M context: what fraction (0 to 1) of the bytes it
# reads is KV cache, the rest being weights? Within ±0.01.

# %%
guess = None  # your prediction
check("10.kv_share_of_read", guess)

# %% jupyter={"source_hidden": true, "outputs_hidden": true}
a = answer("10.kv_share_of_read")
kv = sum(accounting.kv_bytes_read("v4-pro", 2 ** 20).values())
w = sum(trace.weight_bytes_per_token("v4-pro").values())
assert abs(a.value - kv / (kv + w)) < 1e-12
print(f"{a.value:.4f} -", a.why)

# %% [markdown]
# ← [09 · Hardware and cost](09_hardware_and_cost.ipynb) · [glossary](glossary.md) · [11 · Deploying V4](11_deploying_v4.ipynb) →
