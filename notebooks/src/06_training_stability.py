# Source of notebooks/06_training_stability.ipynb — edit here, then run `python -m v4lab.viz.nbbuild --execute`.

# %% [markdown]
# # 06 · Training stability: Anticipatory Routing and the aux-loss-free bias
#
# **What you will learn**
# - what [Anticipatory Routing](glossary.md#anticipatory-routing) (AR) is: the experts of step $t$ are chosen with the parameters of step
#   $t-\Delta t$, while everything else, gate weights included, uses the current ones;
# - how V4 uses it: off by default, switched on for a while by a loss-spike detector after a short
#   rollback, at a cost the report puts at about 20 % wall-clock while it is on;
# - how the [aux-loss-free bias](glossary.md#aux-loss-free-bias) keeps experts evenly loaded without a balance loss, step by step;
# - and why this notebook can show the mechanisms but not prove they work: DeepSeek itself says it does
#   not fully understand why they do (the report's observation 4).
#
# **You need** [01 · MoE expansion](01_moe_expansion.ipynb) (routers, top-k and the bias) and
# [04 · The SwiGLU clamp](04_swiglu_clamp.ipynb) (the other stability mechanism).
#
# The training experiment was precomputed (a minute or two on 2 cores; how to rerun it is shown below);
# everything else runs in seconds.

# %%
from v4lab.device import configure_triton, describe
configure_triton()   # Triton interpreted on a CPU, compiled with CUDA
print(describe())

import torch

torch.set_num_threads(1)          # thousands of small ops: one thread is faster on a small shared CPU

import inspect

from v4lab import moe
from v4lab.experiments import anticipatory
from v4lab.viz import stability

# %% [markdown]
# ## The idea
#
# **Anticipatory Routing.** Loss spikes in V4's trillion-scale runs were consistently tied to outliers in
# [MoE](glossary.md#moe) layers, and the routing seemed to amplify them in a feedback loop: an update moves the router,
# tokens move to other experts, those experts see inputs they were not trained on, the next update is
# larger. Rolling back alone did not stop the spikes from recurring. AR cuts the loop by making the
# choice of experts lag:
#
# $$\text{experts}_t = \mathrm{TopK}\big(s(x_t;\,\theta_{t-\Delta t}) + b_{t-\Delta t}\big),\qquad
# \text{weights}_t = s(x_t;\,\theta_t)\big[\text{experts}_t\big].$$
#
# The trick that makes it affordable: the batch of step $t$ is fetched early, at step $t-\Delta t$, when
# the model *is* $\theta_{t-\Delta t}$; one forward pass over it gives its routes, cached until step $t$.
# That extra forward costs about a third of a training step (v4lab's estimate: one forward of a
# forward + backward); with pipelining and overlap the V4 technical report (§4.2.3) measures ~20 %
# wall-clock, and only while AR is on. $\Delta t$, the detector, the rollback length and
# the duration are not disclosed, so they are arguments of `v4lab.train.train` here.
#
# **The aux-loss-free bias.** Each learned router adds a per-expert bias $b$ to the affinities *for the
# choice only* (the weights use the unbiased $s$). After every step, with the step's load $c_i$ (tokens
# routed to expert $i$): $b_i \leftarrow b_i + \gamma\,\mathrm{sign}(\bar c - c_i)$, $\gamma = 0.001$ in V4.
# Overloaded experts become a little less attractive, underloaded ones a little more; no gradient, no
# loss term fighting the language-model loss.
#
# ## The code
#
# The bias update is one line of `v4lab.moe`; AR lives in `v4lab.train.train` (`anticipatory="off" |
# "always" | "spike"`, `ar_lag` = $\Delta t$), and the experiment below calls it three times:

# %%
print(inspect.getsource(moe.bias_update))
print(inspect.signature(anticipatory.run))

# %% [markdown]
# ## Anticipatory Routing around a spike
#
# `anticipatory.run` trains the micro V4 (2 layers, d = 32, 8 experts) three times from the same seed on
# the same batches, and at step `spike_at` multiplies one step's learning rate by `spike_lr_mult` to induce
# a spike: AR off, AR always on, and AR switched on by the detector (loss > `spike_ratio` × its EMA →
# roll back 2Δt steps, AR on for `ar_duration` steps). Logged: the loss, the **routing [churn](glossary.md#churn)** (the share
# of tokens whose expert set the updated router would change: the feedback loop the V4 technical report, §4.2.3, blames) and
# the largest MoE output. The stored run (its configuration is the first line):

# %%
# NBVAL_CHECK_OUTPUT
ar = stability.ar_result()
print(stability.ar_table(ar))

# %% [markdown]
# Read the table with care. The detector variant ends far below the others mostly because of its
# **rollback**: it restores the parameters of a few steps earlier, and the induced glitch is a one-off
# that is not repeated. AR always on does not undo a spike caused by one huge update, nor is it meant to:
# it is meant to break the routing feedback loop that makes spikes *recur* at scale, which a 30-step toy
# cannot show. That is also why V4 pairs AR with a short rollback.
#
# **Live:** pick the quantity, and move the **iteration** cursor through the spike (orange dash). The
# title reads all three variants at the cursor. Churn jumps at the spike: one large update re-routes
# most tokens at once. With AR on, tokens still go where the router of Δt steps earlier sent them, so the
# experts keep seeing the inputs they were trained on while the router settles. The detector's events
# are marked with crosses, and squares show the iterations it ran with AR (the x axis counts iterations,
# so the steps replayed after a rollback appear again).

# %%
stability.ARWidget(result=ar).display()

# %% [markdown]
# The cost, measured on this machine: seconds per training step (the same work in every variant except
# AR's look-ahead forward and, in the detector variant, the snapshots it keeps for a rollback). At this
# size Python overhead dominates and nothing is overlapped, so the extra forward costs far more than the
# third of a step it costs a large model. v4lab's reading (not a published breakdown): the published ~20 %
# (observation 4) is that third, partly hidden behind expert-parallel communication, and paid only while
# AR is on.

# %%
stability.build_overhead(ar)

# %% [markdown]
# ## The aux-loss-free bias, on its own
#
# A router with fixed preferences (logits $\mathcal N(0,1)$ plus a per-expert offset spread over
# [−skew, skew]), fresh tokens every step, top-2 of 8 experts by `v4lab.gate.select_topk` with the bias,
# then `moe.bias_update` with the step's load (`stability.simulate_bias`). Left: the load's max/mean
# (1 = perfectly even); right: every expert's bias. Move **γ**: with γ = 0 nothing changes; V4's 0.001
# reaches balance within a few hundred steps and then dithers around it; a large γ gets there fast but
# keeps overshooting (the sign rule moves every bias by γ every step, balanced or not).

# %%
stability.BiasWidget().display()

# %%
# NBVAL_CHECK_OUTPUT
for g in (0.0, 0.001, 0.01):
    r = stability.simulate_bias(g, 1.0)
    print(f"gamma {g:<6}: load max/mean at step 1 {r['imbalance'][0]:.2f}, "
          f"mean of the last 50 steps {sum(r['imbalance'][-50:]) / 50:.3f}")

# %% [markdown]
# The same quantity in the real training run of the notebook model (`data/`, its `train_log.jsonl`; the
# exact command, with the γ that run used, is in `data/README.md`):
# the learned routers (solid) stay at a max/mean of about 1.2 for the whole run (layer 1: 1.24 over the
# first tenth of the steps, 1.23 over the last, measured from the log), a little above the hash layer
# (dotted, about 1.1). The hash layer is balanced by construction (its table is frequency-balanced), so
# its line is the unevenness a batch of this size shows even when the expected loads are equal. In this
# short run the bias holds the learned layers near that floor; it does not pull them visibly towards 1.

# %%
stability.build_training_loads()

# %% [markdown]
# ## What it means for V4
#
# Both mechanisms are cheap and local: a sign rule on a bias vector, and a cached top-k from a forward
# pass Δt steps old, switched on only around spikes (so its ~20 % overhead is paid rarely; the V4
# technical report, §4.2.3, calls the total negligible). The report is candid that DeepSeek does not fully understand *why*
# Anticipatory Routing and the [SwiGLU clamp](glossary.md#swiglu-clamp) prevent spikes (observation 4): they were found to work at
# scale. A toy run cannot settle that either, and the table above says what this one showed. What it
# does show is the mechanism the explanation rests on: a single large update re-routes most tokens at
# once (the churn spike), and AR decouples the routes the experts see from that jump for Δt steps.
#
# ## Check it yourself
#
# The bias update is a sign rule: overloaded experts lose exactly γ, underloaded ones gain exactly γ,
# balanced ones do not move, whatever the size of the imbalance.

# %%
# NBVAL_CHECK_OUTPUT
bias = torch.zeros(4)
load = torch.tensor([10.0, 2.0, 4.0, 4.0])          # mean 5
moe.bias_update(bias, load, gamma=0.001)
print("load", load.tolist(), "-> bias", [round(v, 6) for v in bias.tolist()])
moe.bias_update(bias, torch.tensor([1000.0, 0.0, 500.0, 500.0]), gamma=0.001)
print("a 100x larger imbalance moves it by the same step:", [round(v, 6) for v in bias.tolist()])
assert torch.allclose(bias, torch.tensor([-0.002, 0.002, 0.001, 0.001]))   # experts 2, 3 balanced: unmoved

# %% [markdown]
# ## AR and rollback as separate switches: the 2×2
#
# V4's recipe couples two things when the detector fires: a rollback to a snapshot a few steps back,
# and AR for a while. `v4lab experiment ar` separates them, four ways from the same weights, batches and
# provoked spike: neither, rollback only, AR only (the detector switches AR on and training goes on from
# the spiked weights), both; plus the same run without the spike, the reference every loss is compared
# with.
#
# **Where AR can matter at all.** AR changes *which experts* a token goes to and nothing else, so a spike
# it can soften must be one whose damage is in the routing, in a model whose experts are different
# enough that the wrong ones cost loss. The micro V4 above is not such a model: after 40 steps its
# experts are interchangeable (an update that re-routed 97 % of the tokens left the loss unchanged,
# measured by v4lab). The trained tiny-v4 (`data/tiny-v4`) is: scrambling its learned routers (noise of
# 4× their spread) costs 0.13–0.20 nats, negating them 0.37–0.42 (three batches of 8 × 64 tokens,
# measured by v4lab). So the experiment continues tiny-v4's training at a small learning rate (2 × 10⁻⁴,
# fresh AdamW) and provokes the spike with **one update of the learned routers at 5000 × the learning
# rate** at step 5, the backbone untouched: routing is the spike's mechanism by construction. The
# detector (loss > 1.06 × its running mean, armed from step 6, the first loss the kick can change) turns
# AR on for 5 steps with Δt = 6, so every AR step routes with parameters from before the kick. The
# metric is the mean training loss over the 5 steps after the spike; the effect is AR alone against
# neither.

# %%
from v4lab.viz import experiments as exp_viz

ar_res = exp_viz.load("ar")
d = ar_res["details"]
print(exp_viz.effect_line(ar_res))
for name, cell in d["cells"].items():
    print(f"{name:>14}: post-spike loss {cell['post_spike_loss']:.4f}, final {cell['final_loss']:.4f}, events {cell['events']}")
print("loss − no-spike run's, steps", [st for st, _ in d["excess"]["neither"]])
for name, xs in d["excess"].items():
    print(f"{name:>14}:", " ".join(f"{v:+.3f}" for _, v in xs))
print(f"contrast, lr × {ar_res['settings']['contrast_lr_mult']:g} on every parameter: AR alone "
      f"{d['contrast_all_params']['effect']:+.3f} nats")
print(f"AR overhead while on: wall {d['overhead']:+.1%}, CPU {d['overhead_cpu']:+.1%} "
      f"(steady {d['overhead_cpu_steady']:+.1%}); one routing forward = {d['forward_share_cpu']['share']:.1%} "
      f"of a step's CPU time; AR on for {d['ar_on_fraction']:.0%} of the AR-only run")
exp_viz.build_ar(ar_res)

# %% [markdown]
# **What it shows** (stored full run, batch 8 × 64 tokens, 14 steps; measured by v4lab). The kick
# re-routes 91 % of the tokens, and from the next step on the loss runs 0.16–0.23 nats above the run
# without it. The detector sees the spike at step 7, two steps late: at step 6 the excess (+0.16) hides
# inside the ordinary batch-to-batch variation (the no-spike losses range over 2.73–3.06 in the first six
# steps alone). **AR alone helps**: while its routes come from before the kick (steps 8–11) the excess
# falls to 0.05–0.08 nats, and the mean loss over the 5 steps after the spike is 3.008 against 3.092
# without AR, an effect of **+0.085 nats** (the quick run: +0.081). At step 12 the lagged routes come from
# θ₆, after the kick, and the excess is back at +0.20: AR does not repair the router, it keeps the
# experts fed with the routes they were trained on while it is on. The rollback helps more here (2.953,
# +0.140), because it removes the cause; AR + rollback (2.952) equals the rollback alone, since after a
# rollback there is no routing damage left for AR to hide. The contrast, one step at 100 × the learning
# rate for *every* parameter (backbone damaged too): AR alone still helps, +0.079 nats (4.219 vs 4.298).
#
# **What did not work** (the search, measured by v4lab): the same 2×2 on the micro V4 with a 100× step
# for every parameter gave −0.002 nats (Δt = 2) and −0.017 (Δt = 4), because its experts are
# interchangeable; a router-only kick there re-routed 97 % of the tokens with no loss change at all; on
# tiny-v4 a 1000× router kick cost 0.08–0.10 nats, less than the batch-to-batch noise, so the detector at
# ratio 1.03 fired on ordinary batches and, armed after the kick, missed it; 20 000× made the next forward
# non-finite. **How far this is from V4:** tiny-v4 has 1.2 M parameters and 8 routed experts (top 2);
# V4-Flash has 256 (top 6, its `config.json`) and batches of millions of tokens, where a spike of a few
# percent stands out from the noise at once. The kick here is made by hand; the report's spikes come from
# a feedback loop between outliers and routing that grows over many steps, which a 14-step run cannot
# grow. What carries over is the mechanism: routes frozen from before the disturbance keep the loss down
# for as long as they are used.
#
# **The overhead.** AR's steady cost is one routing-only forward over the batch of step t + Δt per step.
# Measured in CPU seconds (wall time on this shared machine swings with the other jobs: three runs of the
# full settings gave +19 %, +43 % and +33 % wall), that forward is 38 % of a training step, about the third a
# forward is of a forward + backward; a steady AR step costs 28 % more (the forward, plus v4lab's per-step
# check of how far the router has moved from the routes it was given). Averaged over all AR steps it is
# 81 %, because the first AR step also routes Δt = 6 steps from stored snapshots (one forward each), a
# start-up cost that a 5-step AR period cannot spread. What the report's ~20 % (§4.2.3) amortises and this
# run cannot: V4 overlaps the look-ahead forward with expert-parallel communication in its pipeline (one
# CPU process has no communication to hide it behind); an AR period many times longer than Δt (the report
# does not give its length) spreads the start-up thin; and AR is on only around spikes (here 36 % of the
# AR-only run), which is why the report calls the total cost negligible.
#
# ### Run it yourself
#
# `v4lab experiment ar --quick` reruns the 2×2 at batch 4 (about a minute on a busy 2-core machine); `--json`
# prints the result object. The cell below does the same from Python. It is marked `# NBVAL_SKIP` because
# it is over the notebook test's time budget, so the automated check skips it; in Jupyter it runs normally.

# %%
# NBVAL_SKIP
from v4lab.experiments.runner import run_experiment

mine = run_experiment("ar", quick=True)
print(exp_viz.effect_line(mine))
exp_viz.build_ar(mine)

# %% [markdown]
# ## Exercises
#
# Predict first, then run. Write your prediction in `guess` and run the cell: `check` says whether it is
# right and why. Each exercise is followed by a collapsed solution cell (click its "…" to open it) that
# computes the answer with v4lab and checks it a second way.

# %%
from v4lab.exercises import answer, check

# %% [markdown]
# **1 · Which γ balances best?** The bias simulation above (skew 1.0, 300 steps) can run with any γ of
# the widget's slider: 0, 0.0001, 0.0003, 0.001, 0.003, 0.01, 0.03. Which one leaves the load most
# even, averaged over the last 50 steps? Decide before you move the slider.

# %%
guess = None  # your prediction
check("06.best_gamma", guess)

# %% jupyter={"source_hidden": true, "outputs_hidden": true}
a = answer("06.best_gamma")
tail = {g: sum(stability.bias_data(g, 1.0)["traces"][2]["y"][-50:]) / 50 for g in stability.GAMMA_STOPS}
assert all(tail[a.value] <= t for t in tail.values())          # the widget's own curves agree
print(a.value, "-", a.why)

# %% [markdown]
# **2 · How long does balancing take?** At V4's γ = 0.001 (skew 1.0), at which step (counted from 1) does
# the load max/mean first fall below 1.2? Think about how far one bias can move in one step, and how far
# apart the experts' preferences start. Within 25 %.

# %%
guess = None  # your prediction
check("06.steps_to_balance", guess)

# %% jupyter={"source_hidden": true, "outputs_hidden": true}
a = answer("06.steps_to_balance")
imb = stability.bias_data(stability.V4_GAMMA, 1.0)["traces"][2]["y"]
assert imb[a.value - 1] < 1.2 <= min(imb[:a.value - 1])
print(a.value, "-", a.why)

# %% [markdown]
# **3 · How many tokens does one bad update re-route?** In the stored Anticipatory Routing run with AR
# off, what share of the tokens (0 to 1) would the router change after the spiked step's update? Predict
# before you move the widget's cursor to the spike. Within ±0.1.

# %%
guess = None  # your prediction
check("06.churn_at_spike", guess)

# %% jupyter={"source_hidden": true, "outputs_hidden": true}
a = answer("06.churn_at_spike")
it = ar["config"]["spike_at"]
assert a.value == stability.ar_data(ar, "churn", it)["traces"][0]["y"][it]   # the "AR off" curve
print(round(a.value, 3), "-", a.why)

# %% [markdown]
# **4 · Outliers after the spike.** Same run, AR off: by what factor does the largest |MoE output| grow
# from the spiked step to the step after it? Within 30 %.

# %%
guess = None  # your prediction
check("06.moe_jump", guess)

# %% jupyter={"source_hidden": true, "outputs_hidden": true}
a = answer("06.moe_jump")
y = stability.ar_data(ar, "max_moe", it)["traces"][0]["y"]
assert abs(a.value - y[it + 1] / y[it]) < 1e-9
print(f"{a.value:.3g} -", a.why)

# %% [markdown]
# ← [05 · FP4](05_fp4.ipynb) · [glossary](glossary.md) · [07 · The whole tiny V4, trained](07_tiny_v4.ipynb) →
