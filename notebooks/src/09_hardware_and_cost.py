# Source of notebooks/09_hardware_and_cost.ipynb — edit here, then run `python -m v4lab.viz.nbbuild --execute`.

# %% [markdown]
# # 09 · Hardware and cost: V4 as a hardware bet, and what it costs to run
#
# **What you will learn**
# - why decoding a big MoE is bound by memory bandwidth, and where V4's FP8/FP4 choices move it on a
#   roofline of an H200 (Hopper: no FP4 tensor cores) and a B200 (Blackwell: FP4 at twice the FP8 rate)
#   — the report's observation 3, "V4 is a hardware bet";
# - the deployment economics (observations 5–6): the report's price comparisons recomputed from a
#   price table, long-context surcharges, and the Flash-first, Pro-on-escalation pattern.
#
# Inputs are data files you can edit: `v4lab/hardware.json` (GPU peaks, approximate, with sources)
# and `v4lab/prices.json` (API prices per million tokens, dated, with sources).

# %%
from v4lab.device import configure_triton, describe
configure_triton()   # Triton interpreted on a CPU, compiled with CUDA (before any kernel import)
print(describe())

from v4lab import hardware, pricing
from v4lab.viz import cost

# %% [markdown]
# ## Part 1 — the roofline of one decode step
#
# A step that does $F$ FLOPs and reads $B$ bytes has arithmetic intensity $I = F/B$. On a GPU with
# peak $P$ (FLOP/s, per precision) and bandwidth $W$ (bytes/s) it takes at least
#
# $$t = \max\Big(\sum_{\text{precision } p} \frac{F_p}{P_p},\; \frac{B}{W}\Big), \qquad
# \text{attainable FLOP/s} = \min(P,\; I \cdot W).$$
#
# For one decode step of `batch` sequences at `context` tokens, `v4lab.hardware.decode_step` takes
# $F$ from `accounting.decode_flops` and $B$ = weights read once (FP4 routed experts, FP8 projections;
# with uniform routing a layer touches $E(1-(1-k/E)^{\text{batch}})$ of its $E$ experts) + the KV
# each sequence reads (the whole cache except CSA's compressed entries, of which only the indexer's
# top-$k$ are read). The GPU figures (dense, approximate):

# %%
# NBVAL_CHECK_OUTPUT
print(cost.gpu_table())

# %%
# NBVAL_CHECK_OUTPUT
print(cost.decode_table(2 ** 20))
print()
print(cost.decode_table(4096))

# %% [markdown]
# Move the batch, the context and the model. The diamonds are the step on each GPU; the lines on the
# right are tokens/s per GPU (bytes and FLOPs both split over the GPUs a model is spread across, so
# the per-GPU figure does not depend on how many). "FP4 × FP4 expert GEMMs" imagines the expert
# matmuls on Blackwell's FP4 tensor cores instead of the FP8 rate they run at today.

# %%
roof = cost.RooflineWidget()
roof.display()

# %% [markdown]
# **What it means for V4.** Decode is memory-bound almost everywhere: with 384 experts and top-6,
# even a batch of 64 reads most of the expert weights, and at long context the KV read grows with
# every sequence. So the first pay-off of FP4 experts and a tiny compressed cache is **bytes**: fewer
# bytes per token on any GPU, and B200's 8 TB/s turns into ~1.67× H200's tokens/s. Only at very
# large batches (thousands of sequences, short contexts) does the step become compute-bound — and
# there the precision of the tensor cores decides: B200 runs the FP4 indexer (and, if the expert
# GEMMs went FP4 × FP4, the experts) at twice its FP8 rate; Hopper has no FP4 cores at all. That is
# the bet: V4's formats are chosen for the hardware that is arriving, not for the one it was
# trained on.
#
# ## Part 2 — deployment economics
#
# Prices per million tokens (the file says where each comes from; the Gemini base input price is not
# in the report and is labelled as v4lab's assumption; the V5 rows are the report's speculation):

# %%
# NBVAL_CHECK_OUTPUT
print(cost.price_table())

# %% [markdown]
# Every price figure the report quotes, recomputed from that table by `pricing.report_claims()`:

# %%
# NBVAL_CHECK_OUTPUT
print(cost.claims_table())

# %% [markdown]
# ### A monthly bill
#
# $\text{bill} = \text{input}_M \cdot p_\text{in}(\text{prompt}) + \text{output}_M \cdot p_\text{out}$.
# The report's example is 32M input + 1M output tokens a month: $4.76 on V4-Flash, $185 on Opus 4.7.
# GPT-5.5's bar counts output only (the report gives no input price). Push the prompt length past
# 200K and Gemini's input rate doubles.

# %%
bill = cost.BillWidget()
bill.display()

# %% [markdown]
# ### Long prompts: a step versus a flat line
#
# Gemini 3.1 Pro doubles its input price above 200K tokens of context; V4-Pro charges a flat
# $1.74/1M at any length — its compressed cache (notebook 00) makes long prompts cheap to serve.

# %%
long_ctx = cost.LongContextWidget()
long_ctx.display()

# %% [markdown]
# ### Flash first, Pro on escalation
#
# Send every request to V4-Flash and escalate a fraction $f$ to V4-Pro:
# $\text{bill}(f) = (1-f)\,\text{bill}_\text{Flash} + f\,\text{bill}_\text{Pro}$.
#
# **The "12× overpay".** Sending traffic Flash could serve to Pro costs
# $\frac{32 \cdot 1.74 + 1 \cdot 3.48}{32 \cdot 0.14 + 1 \cdot 0.28} = \frac{59.16}{4.76} = 12.43$ times
# as much. The ratio is the same for input ($1.74/0.14$) and output ($3.48/0.28$), so it is 12.4× for
# **any** input/output mix; the report rounds it to 12×.

# %%
esc = cost.EscalationWidget()
esc.display()

# %%
# NBVAL_CHECK_OUTPUT
for share in (0.0, 0.5, 32 / 33, 1.0):
    print(f"input share {share:.3f}: Pro/Flash = {pricing.overpay(share):.3f}")
for f in (0.0, 0.1, 0.25, 0.5):
    print(f"escalate {f:.0%}: ${pricing.blended_cost(f, 32e6, 1e6):.2f}/month "
          f"(all-Pro ${pricing.cost('v4-pro', 32e6, 1e6):.2f})")

# %% [markdown]
# **What it means for V4.** The architecture's savings show up as list prices: V4-Pro's output is
# 3.4–8.6× cheaper than the closed frontier models the report compares it with, V4-Flash's 89×
# cheaper than Opus 4.7, and long prompts are not surcharged. With Flash 12× cheaper than Pro,
# routing easy traffic to Flash is where most of the remaining saving is: even escalating a quarter
# of the requests costs about a third of all-Pro. The report's V5 figures (about half of V4's) are
# speculation and are shown as such.
#
# ## Check it yourself
#
# Every reproduced figure must match the report after rounding. Edit `v4lab/prices.json` (a new
# price, a new model) and rerun: the claims table and the widgets follow the file.

# %%
# NBVAL_CHECK_OUTPUT
bad = [r["claim"] for r in pricing.report_claims() if not r["ok"]]
print("all report figures reproduced" if not bad else f"not reproduced: {bad}")
assert not bad
r = hardware.roofline("v4-pro", "B200", 2 ** 20, 64)
h = hardware.roofline("v4-pro", "H200", 2 ** 20, 64)
print(f"V4-Pro, 1M, batch 64: {h['bound']}-bound, B200/H200 = {r['tokens_per_s'] / h['tokens_per_s']:.3f} "
      f"(bandwidth ratio {hardware.bandwidth('B200') / hardware.bandwidth('H200'):.3f})")
