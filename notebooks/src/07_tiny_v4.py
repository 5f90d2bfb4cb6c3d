# Source of notebooks/07_tiny_v4.ipynb — edit here, then run `python -m v4lab.viz.nbbuild --execute`.

# %% [markdown]
# # 07 · The whole tiny V4, trained
#
# **What you will learn**
# - what a complete V4 looks like end to end, at a size a CPU trains in minutes: window, [CSA](glossary.md#csa)
#   and [HCA](glossary.md#hca) attention layers, a hash-routed and learned-routed [MoE](glossary.md#moe),
#   [mHC](glossary.md#mhc) residual streams and an [MTP](glossary.md#mtp) block, in the
#   official checkpoint layout under `data/`;
# - how it routes *your* text: which expert each token goes to, layer by layer;
# - how its three attention kinds look from the inside, and what the MTP module predicts two tokens ahead.
#
# **You need** [01 · MoE expansion](01_moe_expansion.ipynb) (routers and experts),
# [02 · Compressed attention](02_compressed_attention.ipynb) (window, CSA, HCA, the indexer and the sink) and
# [03 · mHC](03_mhc.ipynb) (the residual streams).
#
# Everything here is the real `v4lab.V4Model` running the trained weights (or, before they exist, a
# synthetic stand-in that the first cell says it is).

# %%
from v4lab.device import configure_triton, describe
configure_triton()   # Triton interpreted on a CPU, compiled with CUDA
print(describe())

import torch

torch.set_num_threads(1)          # small ops: one thread is faster on a small shared CPU

from v4lab.viz import tiny, trained

model, tok, info = trained.trained_model()
print(info["description"])

# %% [markdown]
# ## The model
#
# The same structure as V4-Flash and V4-Pro, shrunk: layer 0 attends only to a sliding window and routes by
# a fixed hash of the token id; the others alternate CSA (one compressed entry per 4 tokens, an indexer picks
# the top-k) and HCA (one entry per 128 tokens, all attended), with learned routers
# ($s = \sqrt{\mathrm{softplus}(z)}$, top-2 of 8 experts plus one shared expert). Four residual streams
# mixed by mHC in every block; one MTP block predicts token $t+2$ from the streams at $t$ and the embedding of
# token $t+1$.

# %%
# NBVAL_CHECK_OUTPUT
print(tiny.model_summary(model))

# %% [markdown]
# ## Generate text
#
# `model.generate` decodes with the KV cache (window ring, compressed entries, indexer keys, exactly the
# official layout); greedy first, then sampled. A model of about a million parameters trained for minutes
# on the CPython documentation writes documentation-flavoured text, not sense.

# %%
print(repr(tiny.generate_text("The for statement", max_new_tokens=32)))
print(repr(tiny.generate_text("A list is", max_new_tokens=32, temperature=0.8, top_k=20, seed=0)))

# %% [markdown]
# ## Live: how your text is routed
#
# Type any text in the box (it runs the model once, up to 256 tokens). Left: the first-choice expert of
# every token in every MoE layer, one colour per expert. Layer 0 is hash-routed: a token id always goes
# to the same experts, so repeated tokens repeat their colour exactly. The learned layers route by the
# hidden state, which depends on the context. Right: for the token under the **token** slider, the routing
# weight of each expert in each layer (two non-zero per row: top-2).

# %%
tiny.RoutingWidget().display()

# %% [markdown]
# **What each expert receives.** Over the first 1024 tokens of the held-out text, per MoE block: the share of
# each expert's slots taken by each class of token, the tokens it receives most often (or most exclusively),
# and the mutual information between token class and expert for every block (hash-routed in grey, learned in
# blue, a router with random weights as red ticks; measured by v4lab with the measure of `data/README.md`).
# The expert colours are the ones of the routing map above.

# %%
from v4lab.viz import moe as moe_viz

moe_viz.SpecialisationWidget(sp=moe_viz.specialisation(model, tok, info["path"])).display()

# %% [markdown]
# ## Live: attention maps by layer kind
#
# One map per attention kind, for the first layer of each (query rows × key columns, the first 160 tokens,
# from `Attention.inspect=True`). The window layer sees only the last tokens (a band along the diagonal).
# A CSA layer adds compressed entries, each standing for 4 tokens, only the indexer's top-k of them (the
# probability of an entry is spread over its 4 tokens here). An HCA layer attends to every 128-token entry;
# the first one becomes visible at query 127. The sink's share, the mass no key gets, is in the title.
# **query** reads one row of all three; **head** switches heads.

# %%
tiny.AttentionMapWidget().display()

# %% [markdown]
# The maps stop at 160 tokens; the model reads up to 2048 (the lab model's training length). Over a whole
# 2048-token held-out text, one query in the same three layers, side by side on the token axis: the toggle
# switches between what the query can read (raw window tokens, the compressed entries it reads over the
# tokens they stand for) and the attention it gives each of them and the sink. Notebook 02 opens up a
# single compressed entry.

# %%
from v4lab.viz import attention as attn_viz
attn_viz.CompareWidget().display()

# %% [markdown]
# ## Live: multi-token prediction
#
# `model(ids, return_mtp=True)` also returns the MTP module's logits: entry $t$ predicts token $t+2$.
# In training it adds a loss (weight 0.3); at inference a speculative decoder can use it as a draft.
# Move **position t**: the main head's top-5 for token $t+1$ on the left, the MTP's top-5 for $t+2$ on the
# right, the true token in green.

# %%
mtp = tiny.mtp_run()
print(mtp.summary())
tiny.MTPWidget().display()

# %% [markdown]
# ## What it means for V4
#
# Every mechanism of the 1.6T model is here and trained together: the hash layer's fixed routes, learned
# routers kept balanced by the bias, three kinds of attention with compressed KV, mHC streams and MTP.
# At this scale it learns the surface of its corpus (see `data/README.md` for its held-out loss against a
# bigram baseline and how much its experts specialise); the point is that the same code, with the
# released config and weights, is the real thing: `v4lab.load` reads both.
#
# ## Check it yourself
#
# Decoding with the cache must give what a full forward gives: every token of the greedy continuation
# is the argmax of the uncached logits of the whole sequence at its position (up to float rounding in a
# near-tie). And without a cache, the MTP logits cover every position but the last (entry $t$ predicts
# token $t+2$; the last position has no token $t+1$ to condition on).

# %%
ids = trained.encode(tok, "The for statement")
out = model.generate(ids, 8)
with torch.no_grad():
    full, mtp_logits = model(out, return_mtp=True)
new = out[0, ids.shape[1]:]
step_logits = full[0, ids.shape[1] - 1:-1]                      # the logits that chose each new token
gap = step_logits.max(-1).values - step_logits.gather(-1, new[:, None])[:, 0]
assert float(gap.max()) < 1e-4, f"cache and full forward disagree by {float(gap.max())}"
assert mtp_logits.shape[1] == out.shape[1] - 1
print("cached greedy decoding == argmax of the full forward for all", out.shape[1] - ids.shape[1], "new tokens")
print("MTP logits", tuple(mtp_logits.shape), "for", out.shape[1], "tokens: entry t predicts token t+2")

# %% [markdown]
# ## Optional: the same on real V4 weights
#
# `v4lab.real.stream_forward` runs a short prompt through the real V4-Flash (or V4-Pro) with one layer's
# weights in memory at a time, reading only the experts the tokens pick: under 1 GB of V4-Flash weights
# held at once, but every layer is read from disk, so expect minutes. You see the experts picked in every
# layer, the lightning indexer's picks in the first CSA layer, and the model's top-5 next tokens. To enable
# it, download DeepSeek-V4-Flash (or -Pro) from Hugging Face (with its `tokenizer.json`) and set
# `V4LAB_REAL_WEIGHTS=/path/to/download` before starting Jupyter, or pass `path=...` to `stream_forward`.

# %%
# real-weights section: builds only when a download is configured
from v4lab import real
from v4lab.viz import real as vr
print(vr.real_weights_status())
if vr.configured():
    res = real.stream_forward("The capital of France is")
    vr.build_routing(res).show()
    vr.build_indexer(res).show()
    print(vr.top_tokens_text(res, real.load_tokenizer()))

# %% [markdown]
# ## Exercises
#
# Predict first, then run. Write your prediction in `guess` and run the cell: `check` says whether it is
# right and why. Each exercise is followed by a collapsed solution cell that computes the answer with
# v4lab on this notebook's model and checks it a second way.

# %%
from v4lab import moe
from v4lab.exercises import answer, check, nb07
from v4lab.viz import moe as moe_viz

# %% [markdown]
# **1 · Can it count?** Feed the model the text `1 2 3 4 ... 64` (`trained.SAMPLE_TEXTS["numbers"]`).
# For what share of the positions is the main head's top-1 prediction of the next token right? A fraction
# between 0 and 1, within ±0.1.

# %%
guess = None  # your prediction
check("07.counting_accuracy", guess)

# %% jupyter={"source_hidden": true, "outputs_hidden": true}
a = answer("07.counting_accuracy")
ids = trained.encode(tok, trained.SAMPLE_TEXTS["numbers"], moe_viz.MAX_TOKENS)
with torch.no_grad():
    logits = model(ids).cpu()
assert abs(a.value - float((logits[0, :-2].argmax(-1) == ids[0, 1:-1]).float().mean())) < 1e-6
print(f"{a.value:.3f} -", a.why)

# %% [markdown]
# **2 · Does a token always go to the same experts?** Take the most frequent token of the default text
# (`tiny.DEFAULT_TEXT`). Over all its occurrences, to how many different expert sets (its top-k) does
# the first *learned* MoE layer send it?

# %%
guess = None  # your prediction
check("07.repeat_sets", guess)

# %% jupyter={"source_hidden": true, "outputs_hidden": true}
a = answer("07.repeat_sets")
routes = moe_viz.route_text(tiny.DEFAULT_TEXT)
token, positions = nb07.most_frequent_token(routes)
layer = moe_viz.learned_layers(routes)[0]
with torch.no_grad():
    model(trained.encode(tok, tiny.DEFAULT_TEXT, moe_viz.MAX_TOKENS))         # a fresh forward
idx = model.layers[layer].ffn.last_routing["idx"].cpu()
assert a.value == len(set(moe.topk_sets(idx[positions])))
print(a.value, "-", a.why)

# %% [markdown]
# **3 · Compressed entries read.** In the first CSA layer, how many compressed entries does query 100 of
# the default text attend to (not counting the raw tokens of the window)?

# %%
guess = None  # your prediction
check("07.csa_reads", guess)

# %% jupyter={"source_hidden": true, "outputs_hidden": true}
a = answer("07.csa_reads")
csa = model.cfg.layer_kinds.index("csa")
assert a.value == min((100 + 1) // model.cfg.compress_ratio(csa), model.cfg.index_topk)   # the rules, from the config
print(a.value, "-", a.why)

# %% [markdown]
# **4 · The sink early and late.** In the first CSA layer, is the sink's share of the attention (mean over
# heads) larger at query 0 than at query 100? Answer `True` or `False`.

# %%
guess = None  # your prediction
check("07.sink_at_start", guess)

# %% jupyter={"source_hidden": true, "outputs_hidden": true}
a = answer("07.sink_at_start")
sink = tiny.maps().sink["csa", "mean"]                     # the attention-map widget's numbers
assert a.value == (sink[0] > sink[100])
print(a.value, "-", a.why)

# %% [markdown]
# ← [06 · Training stability](06_training_stability.ipynb) · [glossary](glossary.md) · [08 · Kernels](08_kernels.ipynb) →
