# Source of notebooks/09_hardware_and_cost.ipynb — edit here, then run `python -m v4lab.viz.nbbuild --execute`.

# %% [markdown]
# # 09 · Hardware and cost: V4 as a hardware bet, and what it costs to run
#
# **What you will learn**
# - why decoding a big [MoE](glossary.md#moe) is bound by memory bandwidth, and where V4's
#   [FP8](glossary.md#fp8)/[FP4](glossary.md#fp4) choices move it on a [roofline](glossary.md#roofline) of an H200 (Hopper: no FP4 tensor cores) and a B200 (Blackwell: FP4 at twice the FP8 rate)
#   — the report's observation 3, "a hardware bet";
# - how a roofline's 1.67× (the bandwidth ratio) and the report's ~3× B200-over-H200 (a published
#   serving figure) fit together, and at which batch the roofline gets near 3×;
# - why A100 and H100 fleets see worse economics than the headline numbers;
# - the deployment economics (observations 5–6): the report's price comparisons recomputed from a
#   price table, long-context surcharges, and the Flash-first, Pro-on-escalation pattern.
#
# Inputs are data files you can edit: `v4lab/hardware.json` (GPU peaks from the vendors' datasheets,
# approximate, with sources) and `v4lab/prices.json` (API prices per million tokens, each marked
# *published* by the report or *derived* from its ratios and bills).
#
# **You need** [00 · A tour](00_tour.ipynb) (the models, KV cache and FLOPs) and [05 · FP4](05_fp4.ipynb)
# (the formats); [08 · Kernels](08_kernels.ipynb) puts single kernels on the same roofline.

# %%
from v4lab.device import configure_triton, describe
configure_triton()   # Triton interpreted on a CPU, compiled with CUDA (before any kernel import)
print(describe())

from v4lab import hardware, pricing
from v4lab.viz import cost

# %% [markdown]
# ## Part 1 — the roofline of one decode step
#
# A step that does $F$ FLOPs and reads $B$ bytes has [arithmetic intensity](glossary.md#arithmetic-intensity) $I = F/B$. On a GPU with
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
# Move the batch, the context and the model. Left: the diamonds are the step on each GPU. Middle:
# tokens/s per GPU over the batch (bytes and FLOPs both split over the GPUs a model is spread across, so
# the per-GPU figure does not depend on how many; H100 and A100 dotted). Right: B200 over H200, against
# the bandwidth ratio and the report's ~3×. "FP4 × FP4 expert GEMMs" runs the expert matmuls on
# Blackwell's FP4 tensor cores (FP4 weights *and* activations) instead of at the FP8 rate.
#
# **Find the batch where ~3× appears.** Start at batch 1 and move right: the ratio sits at 1.67×, the
# bandwidth ratio (8 / 4.8 TB/s), for as long as the step is memory-bound. It moves only once H200 runs
# out of compute. With FP8 expert GEMMs it then stops at 2.28× (B200's FP8 rate over H200's,
# 4500 / 1979). Tick the FP4 box: at short contexts the ratio climbs to about 2.9× from batch 8192 — the
# experts on FP4 tensor cores that Hopper does not have. At 1M context the KV reads keep the step
# memory-bound longer and the ratio stays near 2×.

# %%
roof = cost.RooflineWidget()
roof.display()

# %%
# NBVAL_CHECK_OUTPUT
print(cost.b200_ratio_table(4096))

# %% [markdown]
# **What it means for V4.** Decode is memory-bound almost everywhere: with 384 experts and top-6, even
# a batch of 64 reads most of the expert weights, and at long context the KV read grows with every
# sequence. So the first pay-off of FP4 experts and a small compressed cache is **bytes**: fewer bytes per
# token on any GPU. A roofline then gives B200 exactly its bandwidth advantage, 1.67×.
#
# The report's **~3×** (observation 3) is a different kind of number: a published end-to-end serving
# throughput, which the report attributes to Blackwell's FP4 tensor cores matching V4's FP4 [QAT](glossary.md#qat) experts.
# It is not a roofline bound, and the two differ for reasons a roofline leaves out. A server runs the
# large batches where the step is compute-bound, and there only FP4 × FP4 expert GEMMs get the roofline
# near 3× (2.9× above). B200's 180 GB against H200's 141 GB holds more KV per GPU, so larger batches fit.
# And real kernels reach a different fraction of each GPU's peak (Hopper has to convert FP4 weights before
# its FP8 tensor cores can use them). v4lab has not measured either GPU; these are the candidate
# explanations, not a measured decomposition.
#
# The report's conclusion: V4's formats were co-designed with the current GPU generation, which makes it
# future-proof in a way V3 is not, and makes **deployment economics on older hardware (A100, H100) worse
# than the headline numbers suggest**. The decode table above shows it. Per GPU, an H100 serves 0.42× a
# B200's tokens while memory-bound and 0.44× once compute-bound. An A100 (2.0 TB/s, BF16 only: no FP8 or
# FP4 tensor cores) serves 0.25× while memory-bound and under 0.1× once compute-bound.
#
# ## Part 2 — deployment economics
#
# Prices per million tokens. The report prints one price, V4-Pro's \$1.74 input. Every other list
# price is *derived*: the value that reproduces the ratios and monthly bills it does print (the mark
# names which; `tests/test_deploy.py` checks that each derived price still reproduces them, and that
# 5 % either way breaks one). Gemini's base input is v4lab's assumption, GPT-5.5's input is unknown,
# and the V5 rows are the report's speculation:

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
# The report's example is 32M input + 1M output tokens a month: \$4.76 on V4-Flash, \$185 on Opus 4.7.
# GPT-5.5's input price is unknown, so its bill is unknown: its bar is hatched and faded and labelled
# "≥": the output part alone, a lower bound, never a total. (Counted as a total it would look cheaper than
# V4-Pro, the opposite of the 8.6× it illustrates.) Push the prompt length past 200K and Gemini's input
# rate doubles.

# %%
bill = cost.BillWidget()
bill.display()

# %% [markdown]
# ### Long prompts: a step versus a flat line
#
# Gemini 3.1 Pro doubles its input price above 200K tokens of context; V4-Pro charges a flat
# \$1.74/1M at any length (both published). Its compressed cache (notebook 00) is what makes long
# prompts cheap to serve. Right: what 1,000 prompts of the slider's length cost a month on each.

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
# **any** input/output mix; the report rounds it to 12×. Right: the month at the slider's fraction, split
# into the Flash part, the Pro part and what it saves against all-Pro. The token sliders move the lines.

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
near3 = hardware.first_batch_reaching(cost.NEAR_PUBLISHED, "v4-pro", 4096, cost.BATCH_STOPS, fp4_experts=True)
print(f"V4-Pro, 4K context, FP4 x FP4 experts: B200/H200 >= {cost.NEAR_PUBLISHED}x from batch {near3}")
assert near3 == 8192 and hardware.first_batch_reaching(cost.NEAR_PUBLISHED, "v4-pro", 4096, cost.BATCH_STOPS) is None
r = hardware.roofline("v4-pro", "B200", 2 ** 20, 64)
h = hardware.roofline("v4-pro", "H200", 2 ** 20, 64)
print(f"V4-Pro, 1M, batch 64: {h['bound']}-bound, B200/H200 = {r['tokens_per_s'] / h['tokens_per_s']:.3f} "
      f"(bandwidth ratio {hardware.bandwidth('B200') / hardware.bandwidth('H200'):.3f})")

# %% [markdown]
# ## Exercises
#
# Predict first, then run. Write your prediction in `guess` and run the cell: `check` says whether it is
# right and why. Each exercise is followed by a collapsed solution cell that computes the answer with
# v4lab and checks it a second way.

# %%
from v4lab.exercises import answer, check

# %% [markdown]
# **1 · An older GPU at batch 1.** V4-Flash, 8K context, one sequence: what fraction of an H200's decode
# tokens/s does an A100 reach? Within 5 %.

# %%
guess = None  # your prediction
check("09.a100_share", guess)

# %% jupyter={"source_hidden": true, "outputs_hidden": true}
a = answer("09.a100_share")
assert abs(a.value - hardware.bandwidth("A100") / hardware.bandwidth("H200")) < 1e-9   # memory-bound: bandwidth decides
print(f"{a.value:.3f} -", a.why)

# %% [markdown]
# **2 · Where the roofline bends.** V4-Pro at 4K context on an H200: at which batch (1, 2, 4, … 16384
# sequences) does the decode step first become compute-bound?

# %%
guess = None  # your prediction
check("09.compute_bound_batch", guess)

# %% jupyter={"source_hidden": true, "outputs_hidden": true}
a = answer("09.compute_bound_batch")
at = hardware.roofline("v4-pro", "H200", 4096, a.value)
before = hardware.roofline("v4-pro", "H200", 4096, a.value // 2)
assert at["t_compute"] >= at["t_memory"] and before["t_compute"] < before["t_memory"]
print(f"{a.value:,} -", a.why)

# %% [markdown]
# **3 · A month on Flash.** What does a month of 100M input + 10M output tokens cost on V4-Flash, in US
# dollars? Within 2 %.

# %%
guess = None  # your prediction
check("09.flash_month", guess)

# %% jupyter={"source_hidden": true, "outputs_hidden": true}
a = answer("09.flash_month")
p = pricing.price("v4-flash")
assert abs(a.value - (100 * p.input + 10 * p.output)) < 1e-9               # prices are per million tokens
print(f"${a.value:.2f} -", a.why)

# %% [markdown]
# **4 · Half the bill.** With 32M input + 1M output tokens a month, what fraction of the requests can you
# escalate from V4-Flash to V4-Pro before the bill reaches half of all-Pro? Within ±0.03.

# %%
guess = None  # your prediction
check("09.half_of_pro", guess)

# %% jupyter={"source_hidden": true, "outputs_hidden": true}
a = answer("09.half_of_pro")
assert abs(pricing.blended_cost(a.value, 32e6, 1e6) - 0.5 * pricing.cost("v4-pro", 32e6, 1e6)) < 1e-6
print(f"{a.value:.3f} -", a.why)

# %% [markdown]
# ← [08 · Kernels](08_kernels.ipynb) · [glossary](glossary.md) · [10 · Decode, step by step](10_decode_step_by_step.ipynb) →
