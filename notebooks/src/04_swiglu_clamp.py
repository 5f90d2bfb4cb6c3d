# Source of notebooks/04_swiglu_clamp.ipynb — edit here, then run `python -m v4lab.viz.nbbuild --execute`.

# %% [markdown]
# # 04 · The SwiGLU clamp: a hard ceiling on every expert's activations
#
# **What you will learn**
# - what V4 clamps ([SwiGLU clamp](glossary.md#swiglu-clamp)): inside every [routed expert](glossary.md#routed-expert), the gate pre-activation from **above only** (≤ 10) and the up
#   pre-activation on **both sides** ([−10, 10]), before SiLU and the product;
# - how often the limit bites on a trained model: histograms of the pre-activations each expert of the
#   trained tiny V4 really sees on a text, and what a smaller limit would clip and change;
# - what the clamp does for training stability: the same small V4 trained at a high learning rate with
#   and without the clamp (`v4lab.experiments.swiglu_clamp`), and a provoked regime (fast-growing experts,
#   an FP8 cast of their activations) where every run without the clamp diverges and every run with it
#   finishes, while a clamp of 1 costs loss.
#
# **You need**: [01 · MoE expansion](01_moe_expansion.ipynb) (what an expert and its routing are).
#
# **Terms used here**: [SwiGLU](glossary.md#swiglu) · [SiLU](glossary.md#silu) · [MoE](glossary.md#moe) · [loss spike](glossary.md#loss-spike) · [mHC](glossary.md#mhc) ·
# [Anticipatory Routing](glossary.md#anticipatory-routing) · [massive activations](glossary.md#massive-activations).
#
# Runs on a CPU in seconds; the training experiment was precomputed (how to rerun it is shown below).

# %%
from v4lab.device import configure_triton, describe
configure_triton()   # Triton interpreted on a CPU, compiled with CUDA
print(describe())

import torch

torch.set_num_threads(1)          # thousands of small ops: one thread is faster on a small shared CPU

import inspect

from v4lab import moe
from v4lab.experiments import swiglu_clamp
from v4lab.viz import clamp as clamp_viz
from v4lab.viz import trained

model, tok, info = trained.trained_model()
print(info["description"])

# %% [markdown]
# ## The idea
#
# A V4 expert is a SwiGLU MLP. With $g = W_1 x$ (gate) and $u = W_3 x$ (up) and $L$ = `swiglu_limit` = 10
# in V4-Flash and V4-Pro (`swiglu_limit: 10.0` in the official configs), the V4 technical report's
# (§4.2.3) "linear component clamped to [−10, 10], upper bound of the gate component capped at 10" reads
#
# $$E(x) = W_2\Big(\mathrm{SiLU}\big(\min(g, L)\big)\;\odot\;\mathrm{clip}(u, -L, L)\Big).$$
#
# The gate needs no lower bound: $\mathrm{SiLU}(g) = g\,\sigma(g) \ge -0.278$ for every $g$. With both
# clamps every intermediate activation is bounded, $|h| \le \mathrm{SiLU}(L) \cdot L \approx 100$, whatever
# the input: an outlier token cannot blow up an expert's output, and through the router's weights, the
# next layer's input. The V4 technical report (§4.2.3) ties V4's loss spikes to exactly such outliers in MoE layers.
#
# ## The code
#
# `v4lab.moe.swiglu` is the whole clamp (fp32, as the official code computes it); `expert_ffn` wraps it
# with the three projections, and every routed and shared expert of `MoE` calls it with the layer's limit:

# %%
print(inspect.getsource(moe.swiglu))

# %% [markdown]
# On a few inputs: the gate is cut at 10 from above but passes −30 (SiLU makes it ≈ 0 anyway), the up
# branch is cut on both sides, and `limit = 0` switches the clamp off.

# %%
# NBVAL_CHECK_OUTPUT
g = torch.tensor([-30.0, -1.0, 0.5, 9.0, 12.0, 50.0])
u = torch.tensor([-40.0, 2.0, -3.0, 11.0, 1.0, -15.0])
for lim in (10.0, 0.0):
    print(f"limit {lim:>4}:", [round(v, 3) for v in moe.swiglu(g, u, lim).tolist()])
print("largest possible |h| at L = 10:", round(float(torch.nn.functional.silu(torch.tensor(10.0)) * 10), 3))

# %% [markdown]
# ## Live: the clamp on the trained model's activations
#
# The three sample texts run through the model once; for every MoE layer we keep the input of each
# routed expert and compute $W_1 x$ and $W_3 x$ for the tokens routed to it (`clamp_viz.collect`). The
# histograms (log counts) show them with the limit drawn in red; bins beyond it are the values the clamp
# cuts. The right panel sweeps the limit: the share of gate and up values clipped, and how much the layer's
# routed-expert output changes (`moe.moe_grouped` with that limit vs with none, same routes).
#
# Move **limit L** down from V4's 10 and watch where the clamp starts to matter; switch **MoE layer**.

# %%
pre = clamp_viz.preacts()
print(clamp_viz.layer_summary(pre.acts))

# %%
clamp_viz.PreactWidget(pre=pre).display()

# %% [markdown]
# The last line of the table above says how often V4's limit bites on ordinary text, for the model loaded
# here (measured by v4lab, so it changes with the checkpoint). Where the largest pre-activations stay below
# 10, the clamp is inactive at $L = 10$ and the model behaves exactly as if it were not there; where a few
# values pass 10, the clamp changes only those few and the layer's output by the share the right panel
# gives. That is the point: the clamp costs nothing on normal activations and acts only on outliers, the kind
# that feed a spike. Clamping at 1 or 2 instead cuts a large share of the values and changes the output by
# tens of percent: the limit has to sit above the normal range.
#
# **Every layer at once.** Rows are the MoE layers, columns the pre-activation value, colour the log count
# of values there; the dashed red line is the limit (the gate is clamped only from above, the up branch on
# both sides: **branch** switches them) and the pale red region is what the clamp changes. Orange diamonds
# mark each layer's largest value; the bars on the right give the share of values the clamp touches at the
# model's own limit (`clamp_viz.touched`, measured by v4lab on the sample texts).

# %%
clamp_viz.OverviewWidget(pre=pre).display()

# %% [markdown]
# ## At a sane learning rate: nothing happens (the honest null result)
#
# The provoked run further down shows the clamp at work; this one first shows why it had to be provoked.
# `swiglu_clamp.run` trains the micro V4 (`v4lab.train.micro_config`: 2 layers, d = 32, 8 experts)
# twice from the same seed at a learning rate well above the comfortable one, once with the clamp
# ($L = 10$) and once without, logging the largest pre-clamp activation, the largest MoE output and
# the loss. A spike counts as a step whose loss exceeds the running minimum by `spike_margin`. The run
# takes about a minute on 2 cores, so the notebook reads its stored result (the first line is its
# configuration); `clamp_viz.experiment_result(recompute=True)` reruns it.

# %%
# NBVAL_CHECK_OUTPUT
result = clamp_viz.experiment_result()
print(clamp_viz.experiment_table(result))

# %%
clamp_viz.ExperimentWidget(result=result).display()

# %% [markdown]
# ## What it means for V4
#
# The report (observation 4, after the technical report's §4.2.3) lists the clamp among the measures that
# kept training stable and, with Anticipatory Routing, among the techniques whose effect DeepSeek says
# it does not fully understand
# (see notebook 06). What this notebook shows is the mechanism, at toy scale: on a trained model the
# limit of 10 sits above almost all normal activations (the overview above gives the share it touches,
# per layer), so it changes little or nothing there, while it puts a hard bound on any single expert
# activation. At this size and for this seed the two training runs stay
# close (the table above says how close): a 2-layer model at d = 32 does not grow the outliers that a
# trillion-parameter run does. The clamp is insurance against a failure mode that needs scale to appear.
#
# ## Check it yourself
#
# If no gate pre-activation exceeds 10 and no up pre-activation leaves [−10, 10] on a text, the clamp
# cannot change anything: the model's logits with $L = 10$ and with the clamp switched off
# (`clamp_viz.swiglu_limit(model, 0)`) must be identical. With a limit that does cut values, they differ.

# %%
ids = trained.encode(tok, trained.SAMPLE_TEXTS["for-loop"], clamp_viz.MAX_TOKENS)   # one of the texts above
with torch.no_grad():
    ref = model(ids)
    with clamp_viz.swiglu_limit(model, 0.0):
        off = model(ids)
    with clamp_viz.swiglu_limit(model, 1.0):
        tight = model(ids)
peak = clamp_viz.peak(pre.acts)
print(f"largest value the clamp could act on (routed and shared experts): {peak:.2f}")
print("logits with L = 10 vs no clamp: max |difference| =", float((ref - off).abs().max()))
print("logits with L = 1  vs no clamp: max |difference| =", round(float((tight - off).abs().max()), 4))
if peak < 10:
    assert torch.equal(ref, off), "nothing reached the limit, so the clamp must change nothing"
assert not torch.equal(tight, off)

# %% [markdown]
# ## Provoking the outliers: a run that diverges without the clamp
#
# The comparison above is honest and shows nothing, because a micro model trained at a sane learning
# rate never grows pre-activations near 10. Wortsman et al. (2023, "Small-scale proxies for large-scale
# Transformer training instabilities") reproduce the instabilities of large runs in small models by
# raising the learning rate. Raised for the whole model (lr 0.3), every variant here diverges sooner or
# later, the clamped ones too: the attention, mHC and output paths get the same huge updates, and the clamp
# closes only one of those routes, so which run dies first is chaotic (measured by v4lab, see
# `benchmarks/experiments/README.md`). `v4lab experiment clamp` therefore opens the SwiGLU route alone:
#
# - **only the routed experts' W1, W2, W3 train fast**, at 50× the learning rate (0.15,
#   `TrainConfig.expert_lr_mult`); the rest keeps the stable recipe (lr 3e-3, warm-up, gradient clipping,
#   weight decay). Their pre-activations then grow step after step, and the product SiLU(g)·u with both,
#   as in Fishman et al. (2024, "Scaling FP8 training to trillion-token LLMs"), where the gate and up
#   weights of large SwiGLU models aligned late in training and the outliers broke FP8 training;
# - **the expert's intermediate h goes through FP8 before W2**: E4M3 (largest value 448) with a fixed
#   scale of 1, and a value out of range becomes NaN, as a non-saturating cast makes it
#   (`TrainConfig.expert_h_fp8`, `v4lab.quant.fp8_static_cast`). This is a regime chosen to provoke the
#   failure, not V4's recipe: V4's FP8 activation scales follow the data (one per 128 values,
#   `quant.act_quant_fp8`), which never overflows. Without it, in fp32, this small model shrugs the outliers
#   off (every consumer of the MoE output normalises it first), as the right panel of the second figure shows.
#
# With V4's clamp, $|h| \le \mathrm{SiLU}(10) \cdot 10 \approx 100 < 448$ whatever the weights do: whether
# h fits the FP8 range stops depending on training and becomes a property of the architecture. The three
# runs of each seed share the seed and the batches (no clamp, V4's clamp, a clamp of 1); the metric is the
# held-out loss, and a run that hit a NaN is scored as a model that knows nothing, $\ln V$ = 6.238 nats
# ($V$ = 512 tokens). The stored full run: 150 steps, seeds 0–4.

# %%
from v4lab.viz import experiments as exp_viz

clamp_res = exp_viz.load("clamp")
print(exp_viz.effect_line(clamp_res))
print(exp_viz.clamp_table(clamp_res))
exp_viz.build_clamp(clamp_res)

# %%
exp_viz.build_clamp_seeds(clamp_res)

# %% [markdown]
# **What it shows** (stored full run, measured by v4lab). Without the clamp every seed diverges, at step
# 14, 15 or 16: the largest pre-activation passes about 23, SiLU(g)·u passes the FP8 range and the loss is
# NaN. The loss curve gives no warning before (0 spikes in every run: the failure is a cliff, not a
# bump), and up to the step where some pre-activation first passes 10 the clamped and unclamped runs are
# the same run to the last bit. With V4's clamp all five seeds finish, held-out loss 4.939–5.031: the
# effect is **+1.27 nats** of held-out loss (6.238 against a mean 4.971). The pre-activations keep growing
# to about 31 with the clamp on (the clamp bounds what comes out of SwiGLU, not W1 x itself) while every h
# stays below 100. The clamp of 1 finishes too and holds the MoE output near 20 instead of 2 000–2 400,
# but costs **+0.092 nats** of held-out loss against the clamp at 10 on average, worse in every seed
# (+0.050 to +0.112): every expert becomes a small, nearly linear map. That is the trade-off the limit
# sets: high enough that normal activations pass, low enough that the product fits the arithmetic. The
# fp32 check (no FP8 cast, seed 0) is the honest null at this size: held-out 4.951 without the clamp,
# 4.949 with it, largest MoE outputs 4 930 and 2 320 — no divergence, no spike.
#
# **How far from V4.** V4 trains its experts' weights in FP4 and their activations in FP8 with
# data-following scales, at a learning rate chosen to be stable, in models of up to 1.6 T parameters
# (V4-Pro, the report's observation 2) where massive activations appear by themselves (Sun et al. 2024 find them in
# billion-parameter models, not in a 2-layer d = 32 toy). Here both the outlier (a 50× expert learning
# rate) and its consequence (a fixed FP8 scale that overflows to NaN) are forced. What carries over is the
# arithmetic: with the clamp, $|h|$ can never exceed about 100, so any FP8 scale chosen for that range holds for the whole run.
#
# ### Run it yourself
#
# `v4lab experiment clamp --quick` runs seed 0 for 100 steps plus the fp32 check (34 s on one thread of
# the lab's 2-core machine; it gave effect +1.15 and a clamp-1 cost of +0.034 nats); `--json` prints the
# result object. The cell below does the same from Python. It is marked
# `# NBVAL_SKIP`: the automated notebook test runs all notebooks in a few minutes and this cell would take
# a large share of that budget, so the check skips it; in Jupyter it runs normally.

# %%
# NBVAL_SKIP
from v4lab.experiments.runner import run_experiment

mine = run_experiment("clamp", quick=True)
print(exp_viz.effect_line(mine))
print(exp_viz.clamp_table(mine))
exp_viz.build_clamp(mine)

# %% [markdown]
# ## Exercises
#
# Predict first, then run. Write your prediction in `guess` and run the cell: `check` says whether it is
# right, and why. The collapsed cell under each exercise is its solution (click the bar to expand it): it
# computes the answer with v4lab, confirms it a second, independent way, and prints the explanation.

# %%
from v4lab.exercises import answer, check

# %% [markdown]
# **1. A lower ceiling.** With $L = 5$ instead of 10, what is the largest $|h|$ a SwiGLU expert's hidden
# activation can reach, whatever its input? Within 5% counts.

# %%
guess = None  # your prediction
check("04.max_h", guess)

# %% jupyter={"source_hidden": true, "outputs_hidden": true}
a = answer("04.max_h")
assert abs(a.value - float(torch.nn.functional.silu(torch.tensor(5.0)) * 5)) < 1e-4
print(a.why)

# %% [markdown]
# **2. A tight clamp on real activations.** On the trained model's sample texts, what share of the *up*
# pre-activations ($W_3 x$) of layer 1's routed experts would a limit $L = 2$ cut? Within ±0.03 counts.

# %%
guess = None  # your prediction
check("04.up_clipped", guess)

# %% jupyter={"source_hidden": true, "outputs_hidden": true}
a = answer("04.up_clipped")
acts = clamp_viz.preacts().acts
up, gate_pre = acts["up"][1], acts["gate"][1]
up_cut = float((up.clamp(-2, 2) != up).float().mean())          # the values the clamp would change
assert abs(a.value - up_cut) < 1e-9
print(a.why)

# %% [markdown]
# **3. Which branch loses more?** Same layer, same $L = 2$: which branch has the larger share of values
# cut, `"gate"` ($W_1 x$) or `"up"` ($W_3 x$)? Answer with the string.

# %%
guess = None  # your prediction
check("04.gate_or_up", guess)

# %% jupyter={"source_hidden": true, "outputs_hidden": true}
a = answer("04.gate_or_up")
acts = clamp_viz.preacts().acts
up, gate_pre = acts["up"][1], acts["gate"][1]
up_cut = float((up.clamp(-2, 2) != up).float().mean())
gate_cut = float((gate_pre.clamp(max=2) != gate_pre).float().mean())
assert a.value == ("up" if up_cut > gate_cut else "gate")
print(a.why)

# %% [markdown]
# **4. Does 7.5 change anything?** Set every expert's limit to $L = 7.5$ and run the model on the
# `for-loop` sample text. Do its logits differ from the unclamped model's at all? Answer `True` or `False`.

# %%
guess = None  # your prediction
check("04.changes_logits", guess)

# %% jupyter={"source_hidden": true, "outputs_hidden": true}
a = answer("04.changes_logits")
text_acts = clamp_viz.collect((trained.SAMPLE_TEXTS["for-loop"],))     # pre-activations on that text alone
assert a.value == (clamp_viz.peak(text_acts) > 7.5)                     # it changes iff some value passes 7.5
print(a.why)

# %% [markdown]
# ← [03 · mHC](03_mhc.ipynb) · [index](README.md) · [glossary](glossary.md) · [05 · FP4](05_fp4.ipynb) →
