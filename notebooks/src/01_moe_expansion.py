# Source of notebooks/01_moe_expansion.ipynb — edit here, then run `python -m v4lab.viz.nbbuild --execute`.

# %% [markdown]
# # 01 · MoE expansion: 671B → 1.6T, a new gate, hash layers and the bias knob
#
# **What you will learn**
# - where V4-Pro's 1.6T parameters come from: the same backbone as V3 with **more** [routed experts](glossary.md#routed-expert)
#   (256 → 384) that are **wider** (2048 → 3072), while fewer run per token (top-8 → top-6: `num_experts_per_tok` in the official V3 and V4 configs);
# - V4's router ([sqrt-softplus](glossary.md#sqrt-softplus)): affinities $\sqrt{\mathrm{softplus}(z)}$ instead of V3's sigmoid, renormalised over the
#   chosen experts, and why that matters;
# - [hash-routed](glossary.md#hash-routing) first layers: experts picked by the token id alone;
# - the [aux-loss-free](glossary.md#aux-loss-free-balancing) **bias**: a number per expert that changes *which* experts a token goes to but
#   never *how much* they count — moved by a slider on the trained model;
# - what the trained experts specialise in, and how far the bias evens out their load.
#
# **You need**: [00 · A tour of the V4 family](00_tour.ipynb) (the V4 family and its configs).
#
# **Terms used here**: [MoE](glossary.md#moe) · [top-k](glossary.md#top-k) · [SwiGLU](glossary.md#swiglu) · [active parameters](glossary.md#active-parameters) · [Shapley value](glossary.md#shapley-value) ·
# [expert parallelism](glossary.md#expert-parallelism) · [all-to-all](glossary.md#all-to-all) · [MLA](glossary.md#mla) · [CSA](glossary.md#csa) · [mHC](glossary.md#mhc).
#
# Everything is computed by `v4lab.accounting`, `v4lab.gate` and `v4lab.moe`; this notebook only calls them.

# %%
from v4lab.device import configure_triton, describe
configure_triton()   # Triton interpreted on a CPU, compiled with CUDA
print(describe())

import torch

from v4lab import accounting, gate, get_config, moe
from v4lab.viz import moe as moe_viz
from v4lab.viz import trained

model, tok, info = trained.trained_model()
print(info["description"])

# %% [markdown]
# ## 671B → 1.6T
#
# A routed expert is a SwiGLU MLP with three $d \times I$ matrices, so the routed parameters are a product
#
# $$P_\text{routed} = L_\text{MoE} \cdot E \cdot 3\,d\,I ,$$
#
# ($L_\text{MoE}$ MoE layers, $E$ experts, model width $d$, expert width $I$). V3 → V4-Pro multiplies $E$
# by 1.5 and $I$ by 1.5 and turns V3's 3 dense first layers into MoE layers; $d = 7168$ stays.
# `accounting.moe_expansion` splits the growth: in log terms exactly, and in parameters by the Shapley
# value of the product (each factor's growth averaged over every order of applying them).

# %%
# NBVAL_CHECK_OUTPUT
print(moe_viz.expansion_table())

# %%
moe_viz.build_expansion()

# %% [markdown]
# **Your own V3.** Start from V3's backbone and change the routed experts: count, width, and how many run
# per token. Stored parameters grow with $E \cdot I$; active parameters with $K \cdot I$. The orange bars
# are yours; V4-Pro (384 × 3072, top-6) is on the right for comparison (it also differs from V3 outside the
# MoE: attention, mHC, 61 MoE layers).

# %%
moe_viz.ExpansionWidget().display()

# %%
# NBVAL_CHECK_OUTPUT
for name in ("v3", "v4-flash", "v4-pro"):
    c, p = get_config(name), accounting.params(name)
    print(f"{name:<9} experts {c.n_routed_experts:>3} x width {c.moe_intermediate_size:>4}, top-{c.num_experts_per_tok}, "
          f"groups {c.n_group}: total {p['total'] / 1e9:7.1f}B, active {p['active'] / 1e9:5.1f}B "
          f"({100 * p['active'] / p['total']:.1f}%)")

# %% [markdown]
# V4-Pro stores 2.3× V3's parameters but activates only ~1.3× as many per token: the expansion buys
# capacity, not compute.
#
# ## The gate: sqrt-softplus, a bias that only selects, renormalised weights
#
# For a token $x$ and expert logits $z = W_g x$ (fp32):
#
# $$s_e = \sqrt{\mathrm{softplus}(z_e)}, \qquad \mathcal{K} = \operatorname{TopK}_K(s + b), \qquad
# w_e = \frac{s_e}{\sum_{j \in \mathcal{K}} s_j}\cdot \gamma_\text{route} \quad (e \in \mathcal{K}).$$
#
# The bias $b$ enters the choice only; the weights come from the unbiased $s$. In v4lab these are
# `gate.gate_scores`, `gate.select_topk` and `gate.route_weights` (the `Gate` module chains them):

# %%
# NBVAL_CHECK_OUTPUT
z = torch.tensor([[-2.0, 0.0, 1.0, 3.0]])
for f in ("sqrtsoftplus", "sigmoid", "softmax"):
    s = gate.gate_scores(z, f)
    idx = gate.select_topk(s, None, 2)
    w = gate.route_weights(s, idx, route_scale=1.0)
    print(f"{f:<13} s = {[round(v, 3) for v in s[0].tolist()]}  top-2 = {idx[0].tolist()}  "
          f"weights = {[round(v, 3) for v in w[0].tolist()]}")
b = torch.tensor([0.0, 1.0, 0.0, 0.0])          # a bias that pushes expert 1 past expert 2
s = gate.gate_scores(z, "sqrtsoftplus")
idx = gate.select_topk(s, b, 2).sort(-1).values
print("bias +1 on expert 1: top-2 =", idx[0].tolist(), " weights (from the unbiased s) =",
      [round(v, 3) for v in gate.route_weights(s, idx, 1.0)[0].tolist()])

# %% [markdown]
# **Live: the affinity curves.** Left: $\sqrt{\mathrm{softplus}(z)}$ and $\mathrm{sigmoid}(z)$, with one
# token's 16 logits on each. Right: the top-4 weights after renormalisation under each scoring function;
# the title gives top-1 weight / top-4 weight (1.00 = all four equal). It starts at shift +4, spread ×2:
# the sigmoid has saturated at 1, its four affinities are equal and so are its weights (ratio 1.01), while
# $\sqrt{\mathrm{softplus}}$ still grows like $\sqrt z$, its affinities stay apart on the left and its
# weights keep an order (ratio 1.28). Renormalisation divides by the sum, so as all logits grow both flatten
# — $\sqrt{\mathrm{softplus}}$ only slowly (1.20 at +6), the sigmoid at once. Shift them down: sigmoid ≈
# $e^{z}$ (renormalised, a softmax), $\sqrt{\mathrm{softplus}} ≈ e^{z/2}$ (a softer one). Softmax scoring is
# unchanged by any shift. (Ratios computed by `moe_viz.affinity_data` on this seeded token.)

# %%
moe_viz.AffinityWidget().display()

# %% [markdown]
# ## Hash layers and learned layers
#
# V4's first `num_hash_layers` MoE layers (3 in V4-Pro and V4-Flash) do not choose: a frozen table
# `ffn.gate.tid2eid[token_id]` gives each token its $K$ experts, and the learned gate only weights them.
# Those layers have no bias. A consequence you can check on the model: in a hash layer every occurrence of
# a token goes to the same experts; in a learned layer it depends on the context.

# %%
routes = moe_viz.route_text(moe_viz.DEFAULT_TEXT)
for row in moe_viz.hash_consistency(routes):
    kind = "hash   " if row["hash"] else "learned"
    print(f"layer {row['layer']} {kind}: {100 * row['same_experts']:5.1f}% of {row['repeats']} repeated tokens "
          "go to the experts of their first occurrence")
    if row["hash"]:
        assert row["same_experts"] == 1.0
moe_viz.build_routing()

# %% [markdown]
# **What the experts learned.** Routing by hash spreads tokens evenly but cannot group them by meaning; a
# learned router can. `moe_viz.Specialisation` routes the first 1024 tokens of the model's held-out text
# (documents it never trained on) once, with the trained weights and with a twin of the same shapes and
# hash table but random weights (`v4lab.labeval.random_twin`), and counts which class of token (word start,
# word piece, punctuation, whitespace, digits ...: `v4lab.data.token_classes`) goes to which expert. Top:
# the mutual information between token class and expert per MoE block (`v4lab.train.mutual_information_bits`,
# the measure `expert_specialisation` reports in `data/README.md`), grey for hash-routed layers, blue for
# learned routers, red ticks for the random twin. A hash layer scores the same with either weights: the
# table, not the weights, routes. Bottom: for the chosen block, what share of each expert's slots each class
# takes (the last row is the text as a whole), the expert's colour (the same in every routing figure), and
# the tokens it receives most often, or most exclusively.

# %%
spec = moe_viz.specialisation(model, tok, info["path"])
moe_viz.SpecialisationWidget(sp=spec).display()

# %% [markdown]
# ## The bias knob and expert load
#
# V4 balances experts without an auxiliary loss (V3's mechanism, $\gamma = 0.001$): after each step
# `moe.bias_update` moves every bias by $\pm\gamma$ toward the mean load,
# $b_i \mathrel{+}= \gamma\,\mathrm{sign}(\bar{c} - c_i)$. `moe.bias_sensitivity(scores, bias, e, δ, K)`
# answers the question behind it: *which tokens would change experts if $b_e$ moved by δ?*
#
# **Live.** Pick a learned layer and an expert, then move its bias. Grey bars: the load now (the model's
# own routing of the sample text); coloured: the load with $b_e + δ$ (the chosen expert in orange). Below,
# the tokens that join (green) or leave (red) the expert. Raising $b_e$ only ever *adds* tokens to $e$ and
# takes them from others; the weights of every token are untouched.

# %%
w = moe_viz.BiasWidget()
w.display()

# %% [markdown]
# **Load and bias, as trained.** On the held-out tokens above: each expert's share of the top-k slots with
# the model's bias (bars, one colour per expert), the share the same affinities would give *without* the bias
# (black ticks: `gate.select_topk(scores, None, K)`), and the bias itself (right). Training pushed up the bias
# of experts the router under-used and down the bias of its favourites, so the bars sit closer to the dashed
# 1/E line than the ticks; the title gives max/mean load with and without it (measured by v4lab). A hash
# layer has no bias: the token id fixes its experts.

# %%
moe_viz.LoadWidget(sp=spec).display()

# %% [markdown]
# ## What it means for V4
#
# The report's observation 2: V4-Pro is V3's backbone with a wider MoE. The table above shows that 99% of
# the added 0.9T parameters are routed experts, split evenly between *more* experts and *wider* experts,
# while the active share falls from 5.5% (V3) to 3.1% (V4-Pro): more knowledge stored per FLOP spent.
# The gate changes keep that sparse routing trainable: $\sqrt{\mathrm{softplus}}$ does not saturate like
# the sigmoid, hash layers give the first layers a balanced, fixed assignment before the representation
# can route well, and the bias balances load without a loss term pulling on the weights.
#
# ## Check it yourself
#
# The bias alone balances the load: run `moe.bias_update` on this layer's cached affinities (no forward
# pass; the weights never change) and watch max/mean load fall. Try a larger γ, or another layer.

# %%
r = routes["layers"][w.state["layer"]]
scores, bias, K = r["scores"], r["bias"].clone(), r["k"]
before = moe.load_imbalance(moe.expert_load(gate.select_topk(scores, bias, K), scores.shape[-1]))
for step in range(400):
    load = moe.expert_load(gate.select_topk(scores, bias, K), scores.shape[-1])
    moe.bias_update(bias, load, gamma=0.001)
after = moe.load_imbalance(moe.expert_load(gate.select_topk(scores, bias, K), scores.shape[-1]))
print(f"layer {r['layer']}: max/mean load {before:.2f} -> {after:.2f} after 400 bias updates (gamma 0.001)")
assert after <= before + 1e-9 or after < 1.3

# %%
# NBVAL_CHECK_OUTPUT
e = accounting.moe_expansion()
assert abs(sum(e["shapley_params"].values()) - e["routed_growth"]) < 1e3      # Shapley parts add up
assert abs(sum(e["log_share"].values()) - 1) < 1e-12                          # log shares add up
pro, v3 = accounting.params("v4-pro"), accounting.params("v3")
print(f"V4-Pro / V3: total {pro['total'] / v3['total']:.2f}x, active {pro['active'] / v3['active']:.2f}x")

# %% [markdown]
# ## Optional: the same on real V4 weights
#
# On the released weights, the first three layers of V4-Flash and V4-Pro route each token with a fixed
# table `ffn.gate.tid2eid` (one row of 6 experts per token id, out of 256 or 384). Type any text and see
# how it loads the experts of each hash layer: only the tables and the download's own tokenizer are read,
# no forward pass. To enable it, download DeepSeek-V4-Flash (or -Pro) from Hugging Face and set
# `V4LAB_REAL_WEIGHTS=/path/to/download` before starting Jupyter, or pass `path=...` to the widget.

# %%
# real-weights section: builds only when a download is configured
from v4lab.viz import real as vr
print(vr.real_weights_status())
if vr.configured():
    vr.HashLoadWidget().display()

# %% [markdown]
# ## Past one device: expert parallelism
#
# V4-Pro's 384 routed experts per layer do not fit on one GPU, so serving and training spread them over
# devices: with expert parallelism (EP) of size $n$, each rank holds $384/n$ experts of every MoE layer
# and its own share of the tokens. The gate and the shared expert are replicated; the routed part of one
# layer becomes a round trip through the network (the pattern DeepSeek's DeepEP library implements):
#
# 1. route locally: top-$k$ experts and weights for each of this rank's tokens;
# 2. sort the (token, expert) pairs by expert, which groups them by the rank that owns the expert;
# 3. tell every rank how many rows to expect (`all_to_all_single` of the counts);
# 4. **dispatch**: send each token's row once per chosen expert (`all_to_all_single` of the rows);
# 5. run the local experts, one matmul per expert over the rows it received;
# 6. **combine**: send the outputs back the same way, and add them up with the routing weights.
#
# `v4lab.expert_parallel` writes steps 2–6 as pure functions of tensors. `MoE(cfg, layer, ep_size=n)` runs
# them across real processes with `torch.distributed` (tested on 2 and 4 CPU processes against the
# one-process layer); `EP.simulate` runs the same functions for every rank of a simulated world in
# one process, the all-to-all being a transpose of per-rank lists. The plan of one rank, by hand:

# %%
from v4lab import expert_parallel as EP
from v4lab.viz import ep as ep_viz

idx = torch.tensor([[5, 0], [1, 6], [7, 2]])          # 3 tokens, top-2 of 8 experts, 2 ranks (0-3 | 4-7)
plan = EP.dispatch_plan(idx, n_experts=8, ep_size=2)
print("pairs in expert order:", plan.order.tolist(), "-> tokens", plan.token.tolist())
print("rows per expert on each destination rank:", plan.counts_by_rank.tolist())
print("rows sent to rank 0 / rank 1:", plan.send_counts.tolist())

# %% [markdown]
# **Live.** A toy layer (32 experts, top-4, 48 tokens per rank, hidden 128) whose router prefers low
# expert ids, run by `EP.simulate`. Left: where this batch's rows go, from the rank holding the token to
# the rank holding the expert (grey rows stay home and cost no bandwidth). Top right: rows each rank's
# experts receive, without the bias and after *n* bias updates (V4's sign rule, γ = 0.001, on the
# batch's global load — in training every rank applies it after an all-reduce of the loads, so all
# ranks move their biases the same way). The slowest rank sets the pace of every layer, so the bias that
# balances experts also balances ranks. Bottom right: bytes per token per MoE layer for V4-Pro at EP 32,
# counted on 32 simulated ranks with V4-Pro's 7168-wide rows (measured by v4lab) beside the formula in
# `accounting.ep_all_to_all`. FP8 dispatch with BF16 combine is DeepSeek-V3's recipe (V3 technical report
# §3.3.3); each FP8 row carries one scale byte per 128 values here. Hidden size, experts, top-6 and
# 61 layers come from the V4-Pro config.

# %%
w_ep = ep_viz.EPWidget()
w_ep.display()

# %% [markdown]
# ## Check it yourself
#
# The simulated world computes what one process computes: compare its per-rank outputs with the
# single-process grouped MoE on the whole batch, then print the analytic bytes per token (derived from
# the V4 configs: tokens × top-k × hidden × bytes per element, (n−1)/n of it leaving the rank).

# %%
# NBVAL_CHECK_OUTPUT
world = ep_viz.ep_world(ranks=4, bias_steps=100, skew=0.5)
s_, x_, ws_ = ep_viz.toy_world(4, 0.5)
ref = moe.moe_grouped(x_, world["bias"]["idx"], world["bias"]["weights"], *ws_, 0.0)
print("simulated EP == one process:", torch.allclose(torch.cat(world["bias"]["outs"]), ref, atol=1e-5))
for name in ("v4-flash", "v4-pro"):
    for n in (8, 32):
        a = accounting.ep_all_to_all(name, n)
        print(f"{name} EP {n:2d}: {a['experts_per_rank']:2d} experts/rank, "
              f"{a['remote_per_layer_total'] / 1024:.1f} KiB per token per layer, "
              f"{a['remote_all_layers_total'] / 2**20:.2f} MiB per token over {a['moe_layers']} layers")

# %% [markdown]
# ## V3 → V4-Pro, side by side: the backbone did not move
#
# The report's second observation is that the 1.6T parameter count is risk management, not a new design:
# V4-Pro keeps V3's backbone shape (hidden size 7168, 61 layers, 128 attention heads) and grows by widening
# the MoE; the new ideas sit in a few places (hybrid CSA/HCA attention, mHC residual streams, FP4 routed
# experts). The tech report says so itself in its §6: DeepSeek kept many components already validated at V3
# scale to limit the risk of the run, and leaves a more principled redesign for later.
#
# `v4lab.diff` reads this off the presets (values of the released `config.json` files) and off the modules
# built on the meta device (shapes, no memory): which config keys changed, the parameter tensors of one block
# on each side, and the parameter delta attributed to each change (routed experts by the Shapley split above).
# The same tables print in a terminal with `v4lab compare v3 v4-pro --diff`.

# %%
from v4lab import diff
from v4lab.viz import diff as diff_viz

d = diff.diff("v3", "v4-pro")
diff_viz.build_block_diff("v3", "v4-pro").show()

# %%
# NBVAL_CHECK_OUTPUT
rows = {r["key"]: r for r in d["table"]}
for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "n_routed_experts", "moe_intermediate_size",
            "compress_ratios", "hc_mult", "expert_dtype", "kv_lora_rank"):
    r = rows[key]
    print(f"{key:<22} {r['a']:>10} -> {r['b']:<28} {r['status']}")
print(f"parameters {accounting._h(d['total_a'])} -> {accounting._h(d['total_b'])}; share of the growth:")
growth = d["total_b"] - d["total_a"]
for r in sorted(d["attribution"], key=lambda r: -abs(r["params"]))[:6]:
    print(f"  {r['change']:<42} {100 * r['params'] / growth:6.1f}%")

# %% [markdown]
# Read the figure from the bottom up. The MoE rows are all orange: the same tensors, wider (3072 instead of
# 2048) and more of them (384 instead of 256 routed experts) — about 93% of the growth (derived above by
# `v4lab.diff.attribution`). The attention rows are where the design changed: V3's MLA projections
# (`wkv_a`, `wkv_b`, `wo`, blue) are gone, replaced by one shared K=V head (`wkv`), a grouped output
# projection (`wo_a`, `wo_b`), the compressor and the lightning indexer (red). The red mHC rows at each site
# are the other new component. Everything grey — the norms, the query path `wq_a`, the 7168-wide residual —
# is V3 unchanged. A wider MoE on a known backbone is a low-risk way to spend a bigger training budget; the
# risky bets are confined to the red boxes, each of which v4lab tests in isolation (notebooks 02, 03, 05).

# %% [markdown]
# ## Exercises
#
# Predict first, then run. Write your prediction in `guess` and run the cell: `check` says whether it is
# right, and why. The collapsed cell under each exercise is its solution (click the bar to expand it): it
# computes the answer with v4lab, confirms it a second, independent way, and prints the explanation.

# %%
from v4lab.exercises import answer, check

# %% [markdown]
# **1. A big push on one bias.** In learned layer 1 of the trained model, on the sample text above, raise
# expert 5's bias by +0.5. What share of all the tokens
# of the text join expert 5? Within ±0.1 counts.

# %%
guess = None  # your prediction
check("01.bias_share", guess)

# %% jupyter={"source_hidden": true, "outputs_hidden": true}
a = answer("01.bias_share")
rt = moe_viz.route_text(moe_viz.DEFAULT_TEXT)
lay = rt["layers"][1]
b = lay["bias"].clone()
load_before = moe.expert_load(gate.select_topk(lay["scores"], b, lay["k"]), b.numel())[5]
b[5] += 0.5
load_after = moe.expert_load(gate.select_topk(lay["scores"], b, lay["k"]), b.numel())[5]
assert abs(a.value - float(load_after - load_before) / len(rt["tokens"])) < 1e-9    # a raised bias only adds tokens
print(a.why)

# %% [markdown]
# **2. Your own expansion.** Take V3 and double its routed experts, 256 → 512, keeping their width (2048)
# and top-8. How many parameters does it store, in billions? Within 10% counts.

# %%
guess = None  # your prediction
check("01.big_v3_total", guess)

# %% jupyter={"source_hidden": true, "outputs_hidden": true}
a = answer("01.big_v3_total")
v3 = get_config("v3")
moe_layers = v3.num_hidden_layers - v3.first_k_dense_replace
added = moe_layers * 256 * (3 * v3.hidden_size * v3.moe_intermediate_size    # w1, w2, w3 of each new expert
                            + v3.hidden_size + 1)                             # + its router row and bias
assert abs(a.value * 1e9 - (accounting.params("v3")["total"] + added)) / (a.value * 1e9) < 1e-9
print(a.why)

# %% [markdown]
# **3. Saturation.** A token's logits over four experts are $z = [0, 0, 4, 8]$ and it keeps the top 2. With
# V4's $\sqrt{\mathrm{softplus}}$ scoring, what routing weight does the top expert get after
# renormalisation? Within ±0.03 counts.

# %%
guess = None  # your prediction
check("01.top_weight", guess)

# %% jupyter={"source_hidden": true, "outputs_hidden": true}
a = answer("01.top_weight")
s = torch.nn.functional.softplus(torch.tensor([8.0, 4.0])).sqrt()      # the two chosen affinities
assert abs(a.value - float(s[0] / s.sum())) < 1e-6
print(a.why)

# %% [markdown]
# **4. The sign rule.** Eight experts; per step expert 0 receives 10 tokens, expert 1 receives 2.5 and the
# other six 0.5 each. Suppose the loads stayed frozen while `moe.bias_update` (γ = 0.001) ran 400 times. What
# is expert 0's bias minus expert 1's bias at the end? Within ±0.01 counts.

# %%
guess = None  # your prediction
check("01.sign_rule", guess)

# %% jupyter={"source_hidden": true, "outputs_hidden": true}
a = answer("01.sign_rule")
load = torch.tensor([10.0, 2.5] + [0.5] * 6)
direction = torch.sign(load.mean() - load)                          # the update's direction for each expert
assert direction[0] == direction[1] == -1 and a.value == 0.0        # same direction, same step: no gap opens
print(a.why)

# %% [markdown]
# ← [00 · A tour of the V4 family](00_tour.ipynb) · [index](README.md) · [glossary](glossary.md) · [02 · Compressed attention](02_compressed_attention.ipynb) →
