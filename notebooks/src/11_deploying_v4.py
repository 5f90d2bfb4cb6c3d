# Source of notebooks/11_deploying_v4.ipynb — edit here, then run `python -m v4lab.viz.nbbuild --execute`.

# %% [markdown]
# # 11 · Deploying V4: the market, the migration, the routing pattern, and when not to use it
#
# **What you will learn**
# - the market V4 landed in, and why analysts read it as confirmation rather than news (the report's
#   observation 1);
# - how to move an existing DeepSeek integration to V4 (observation 6): a one-line change, a retirement
#   date that has to be checked against *today*, and a calendar reminder v4lab writes for you;
# - what a month of traffic costs on V4-Flash, V4-Pro, Flash with Pro escalation and the closed models,
#   and the two traps of standardising on one model;
# - the seven situations where the report says V4 is the wrong choice, what it suggests instead, and what
#   nobody knows yet.
#
# Every figure printed here comes from `v4lab/facts.json` or `v4lab/prices.json`, each with its source
# in brackets: *report, observation N* (the distilled V4 report these notebooks teach), *derived from …*
# (v4lab's arithmetic on published figures) or *v4lab assumption*. Nothing needs a GPU.
#
# **You need** nothing technical; [09 · Hardware and cost](09_hardware_and_cost.ipynb) derives the prices and
# the hardware side of the same economics, and [00 · A tour](00_tour.ipynb) introduces the V4 family.

# %%
from v4lab.device import configure_triton, describe
configure_triton()   # Triton interpreted on a CPU, compiled with CUDA (before any kernel import)
print(describe())

from IPython.display import HTML, Markdown, display
from v4lab import deploy, pricing
from v4lab.viz import deploy as vdeploy

# %% [markdown]
# ## 1 · The market V4 arrived in
#
# V4 did not enter an empty field: Chinese open-weight models already carried a large share of the
# tokens routed through OpenRouter. R1 (January 2025) was the surprise that showed such models could be
# competitive and cheap; V4 is that thesis carried out well. For anyone reasoning about where open-weight
# models are going, the useful reading is *confirmation*: expect the price pressure of section 3 below to
# persist (observation 5 calls the pressure on closed-model prices structural, not cyclical).

# %%
# NBVAL_CHECK_OUTPUT
print(deploy.market_text())

# %% [markdown]
# ## 2 · Migration: one line, and a date that has already passed
#
# An integration that calls DeepSeek through an OpenAI-compatible client keeps its key, its base URL,
# its request shape, streaming, tools and JSON mode. Only the `model=` argument changes. (The report
# does not print V4's model IDs, so the new one below is a placeholder: take it from DeepSeek's API docs.)

# %%
print(deploy.migration_diff())

# %%
# NBVAL_CHECK_OUTPUT
print(deploy.migration_text())

# %% [markdown]
# **Where today stands.** The countdown uses the clock of the machine running this notebook. The report
# was written before the retirement; if you read this afterwards, the honest answer is "retired N days
# ago", and any code still naming `deepseek-chat` or `deepseek-reasoner` is broken until it gets the
# one-line change.

# %%
c = deploy.countdown()
print(f"today (UTC): {c['now']:%Y-%m-%d %H:%M}")
print(c["text"])
print(c["reminder_text"])

# %% [markdown]
# **The reminder.** `deploy.reminder_ics()` writes an RFC 5545 calendar (CRLF line ends, a fixed `UID`
# so a re-import updates rather than duplicates, `DTSTAMP`, long lines folded at 75 octets) with an
# all-day event on 2026-07-15. Download it from the link, or from a terminal run
# `v4lab remind --ics reminder.ics` (it refuses to replace an existing file unless you add `--force`).

# %%
display(HTML(vdeploy.ics_download_html()))
print(deploy.reminder_ics().replace("\r\n", "\n")[:420] + "...")

# %% [markdown]
# ## 3 · Routing: Flash + Thinking on the hot path, Pro for the hard turns
#
# The report's recommendation is one router, two models: V4-Flash (with Thinking) takes every turn,
# and the turns that genuinely need Pro-class quality are escalated to V4-Pro. The calculator prices a
# month of traffic:
#
# $$\text{bill} = \text{turns}\,\big(\text{prompt}\cdot p_\text{in}(\text{prompt}) +
# (\text{output} + \text{thinking})\cdot p_\text{out}\big) / 10^6,\qquad
# \text{routed} = (1-s)\,\text{bill}_\text{Flash} + s\,\text{bill}_\text{Pro},$$
#
# with $s$ the share of turns sent to Pro. Its defaults are the report's heavy-fleet month (1,000 turns
# of 32K prompt + 1K answer = 32M in + 1M out). Move the controls and watch for the two traps:
#
# - **Pro everywhere**: on the ~80 % of turns Flash could serve, Pro costs $\frac{1.74}{0.14} =
#   \frac{3.48}{0.28} = 12.4$ times as much (the report rounds it to 12×), for any mix of input and output.
# - **Flash everywhere**: set "share sent to Pro" below "share of hard turns" and the title counts the hard
#   turns left on Flash: the knowledge-breadth-hard tail the report says will regress.
#
# Push the prompt past 200K: Gemini 3.1 Pro's input rate doubles (published), V4-Pro stays flat at
# \$1.74 per 1M. GPT-5.5's input price is unknown, so its bar is hatched and labelled as a lower bound,
# never a total. Thinking adds 2K output tokens per turn: **v4lab's assumption**, the report gives no figure.

# %%
route = vdeploy.RoutingWidget()
route.display()

# %%
# NBVAL_CHECK_OUTPUT
print(deploy.format_route(deploy.route()))

# %% [markdown]
# Where each price comes from (the report prints one price, V4-Pro's \$1.74 input; the others are the
# values that reproduce its ratios and monthly bills, and a test checks that each still does):

# %%
# NBVAL_CHECK_OUTPUT
for p in pricing.load_prices(speculative=False).values():
    print(f"{p.label:<18} input: {p.mark('input'):<40} output: {p.mark('output')}")

# %% [markdown]
# The hardware side of the same economics (why B200 serves V4 far better than H200, and why A100/H100
# fleets see worse numbers than the headline) is in notebook 09.
#
# ## 4 · When V4 is the wrong choice
#
# The report lists seven conditions under which it would not deploy V4. Tick the ones that describe
# your product: the table marks them, and the verdict names what the report suggests instead and the
# figure behind it.

# %%
check = vdeploy.ChecklistWidget()
check.display()

# %%
# NBVAL_CHECK_OUTPUT
print(deploy.conditions_text())

# %% [markdown]
# Two notes on reading these. The ~91 % was measured on R1, not V4 (the report argues the bias is baked
# in by pre-training and persists through fine-tunes). The agentic scores are single-turn results; the
# report's point is the absence of long-horizon evidence, not a low score.
#
# ## 5 · What we don't know yet

# %%
display(HTML(vdeploy.unknown_cards_html()))

# %% [markdown]
# ## 6 · Where this leaves V4, and V5
#
# Observation 4 ends on a forecast: because DeepSeek itself says it does not fully understand why
# [Anticipatory Routing](glossary.md#anticipatory-routing) and the [SwiGLU clamp](glossary.md#swiglu-clamp) keep
# training stable (notebooks 04 and 06), the most likely research thread for V5 is a principled account of
# training stability for trillion-parameter [MoE](glossary.md#moe).
# Observation 2 adds the architectural side: V4 kept V3's backbone shape deliberately, to limit risk
# (notebook 01 shows that 99 % of the growth is routed experts), so V5 is the likelier place for a new one.
# The price guesses for V5 in circulation are printed here only with their label:

# %%
# NBVAL_CHECK_OUTPUT
print(deploy.v5_text())

# %% [markdown]
# **The closing thesis.** V4 does not top every benchmark: knowledge breadth trails Gemini, instruction
# following trails Opus, and the list above is real. What it changes is the default: frontier-class
# quality at a price where the cheapest serious option is also a good one for most workloads. That is the
# claim to keep once the launch noise is gone.

# %%
print(deploy.facts()["thesis"]["text"], f"[{deploy.facts()['thesis']['source']}]")

# %% [markdown]
# ## Check it yourself
#
# The report's figures, recomputed or read from the data files (change `v4lab/prices.json` and rerun:
# the assertions tell you which published figure you broke).

# %%
# NBVAL_CHECK_OUTPUT
r = deploy.route()
print(f"32M in + 1M out: V4-Flash ${r['bills']['flash']:.2f}, Opus 4.7 ${r['bills']['opus-4.7']:.0f}; "
      f"Pro overpays {r['overpay']:.1f}x on the {100 * r['easy_share']:.0f} % Flash could serve")
assert round(r["bills"]["flash"], 2) == 4.76 and round(r["bills"]["opus-4.7"]) == 185 and round(r["overpay"]) == 12
assert r["bills"]["gpt-5.5"] is None                      # unknown stays unknown
bad = [x["claim"] for x in pricing.report_claims() if not x["ok"]]
assert not bad, bad
print("all of the report's price figures reproduced")

# %% [markdown]
# ## Exercises
#
# Predict first, then run. Write your prediction in `guess` and run the cell: `check` says whether it is
# right and why. Each exercise is followed by a collapsed solution cell that computes the answer with
# v4lab and checks it a second way. All four use the calculator's heavy-fleet month (1,000 turns of 32K
# prompt + 1K answer) unless they say otherwise.

# %%
from v4lab.exercises import answer, check

# %% [markdown]
# **1 · Across vendors.** How many times V4-Flash's monthly bill is Opus 4.7's? Within 5 %.

# %%
guess = None  # your prediction
check("11.opus_over_flash", guess)

# %% jupyter={"source_hidden": true, "outputs_hidden": true}
a = answer("11.opus_over_flash")
assert abs(a.value - pricing.cost("opus-4.7", 32e6, 1e6) / pricing.cost("v4-flash", 32e6, 1e6)) < 1e-9
print(f"{a.value:.3g} -", a.why)

# %% [markdown]
# **2 · The routed bill.** Send 20 % of the turns to V4-Pro and the rest to V4-Flash. What fraction of the
# all-Pro bill do you pay? Within ±0.03.

# %%
guess = None  # your prediction
check("11.routed_share_of_pro", guess)

# %% jupyter={"source_hidden": true, "outputs_hidden": true}
a = answer("11.routed_share_of_pro")
assert abs(a.value - pricing.blended_cost(0.2, 32e6, 1e6) / pricing.cost("v4-pro", 32e6, 1e6)) < 1e-9
print(f"{a.value:.3f} -", a.why)

# %% [markdown]
# **3 · The price of thinking.** Turn Thinking on (v4lab assumes 2K extra output tokens a turn). By what
# factor does the V4-Flash month grow? Within 5 %.

# %%
guess = None  # your prediction
check("11.thinking_factor", guess)

# %% jupyter={"source_hidden": true, "outputs_hidden": true}
a = answer("11.thinking_factor")
out = 1e6 + 1000 * deploy.fact("thinking_output_tokens")                  # answers + thinking, 1,000 turns
assert abs(a.value - pricing.cost("v4-flash", 32e6, out) / pricing.cost("v4-flash", 32e6, 1e6)) < 1e-9
print(f"{a.value:.3g} -", a.why)

# %% [markdown]
# **4 · Long prompts.** Make every prompt 300K tokens (still 1,000 turns with 1K answers). How many times
# V4-Pro's bill is Gemini 3.1 Pro's? Within 5 %.

# %%
guess = None  # your prediction
check("11.gemini_long_prompt", guess)

# %% jupyter={"source_hidden": true, "outputs_hidden": true}
a = answer("11.gemini_long_prompt")
bills = {m: pricing.cost(m, 300e6, 1e6, context=300_000) for m in ("gemini-3.1-pro", "v4-pro")}
assert abs(a.value - bills["gemini-3.1-pro"] / bills["v4-pro"]) < 1e-9
print(f"{a.value:.3g} -", a.why)

# %% [markdown]
# ← [10 · Decode, step by step](10_decode_step_by_step.ipynb) · [glossary](glossary.md) · [index of the notebooks](README.md)
