"""Exercises of notebook 11 (deploying V4): the routing calculator ``v4lab.deploy.route`` on the report's
heavy-fleet month, with the prices of ``v4lab/prices.json``."""
from __future__ import annotations

from v4lab import deploy, pricing
from v4lab.exercises import Answer, exercise

LONG_PROMPT = 300_000        # tokens: past Gemini 3.1 Pro's 200K threshold


@exercise("11.opus_over_flash")
def opus_over_flash() -> Answer:
    r = deploy.route()
    ratio = r["bills"]["opus-4.7"] / r["bills"]["flash"]
    opus, flash = pricing.price("opus-4.7"), pricing.price("v4-flash")
    return Answer(ratio, f"the heavy-fleet month ({r['input_tokens'] / 1e6:.0f}M in + {r['output_tokens'] / 1e6:.0f}M "
                         f"out) costs ${r['bills']['opus-4.7']:.0f} on Opus 4.7 and ${r['bills']['flash']:.2f} on "
                         f"V4-Flash: ×{ratio:.3g}. Per token Opus costs ×{opus.output / flash.output:.3g} for output "
                         f"but ×{opus.input / flash.input:.3g} for input, and this month is mostly input: the mix "
                         "decides the ratio between vendors. Within 5 %.", rel_tol=0.05)


@exercise("11.routed_share_of_pro")
def routed_share_of_pro() -> Answer:
    r = deploy.route()
    share = r["bills"]["routed"] / r["bills"]["pro"]
    b = r["bills"]
    return Answer(share, f"with {r['pro_share']:.0%} of the turns on V4-Pro the month costs ${b['routed']:.2f} "
                         f"against ${b['pro']:.2f} all-Pro: {share:.3f} of it. The Flash turns cost "
                         f"1/{r['overpay']:.3g} of what they would on Pro, so the bill is about the Pro share plus a "
                         "little. Within ±0.03.", abs_tol=0.03)


@exercise("11.thinking_factor")
def thinking_factor() -> Answer:
    off, on = deploy.route(), deploy.route(thinking=True)
    f = on["bills"]["flash"] / off["bills"]["flash"]
    return Answer(f, f"thinking adds {on['thinking_tokens']:,} output tokens a turn (v4lab's assumption): the "
                     f"V4-Flash month goes from ${off['bills']['flash']:.2f} to ${on['bills']['flash']:.2f}, ×{f:.3g}. "
                     f"Output grows ×{on['output_tokens'] / off['output_tokens']:.3g}, but this month is "
                     f"{off['input_tokens'] / 1e6:.0f}M input tokens against "
                     f"{off['output_tokens'] / 1e6:.0f}M output, so the input bill dominates. Within 5 %.",
                  rel_tol=0.05)


@exercise("11.gemini_long_prompt")
def gemini_long_prompt() -> Answer:
    r = deploy.route(context=LONG_PROMPT)
    ratio = r["bills"]["gemini-3.1-pro"] / r["bills"]["pro"]
    base = deploy.route()
    gem, pro = r["bills"]["gemini-3.1-pro"], r["bills"]["pro"]
    return Answer(ratio, f"with {LONG_PROMPT:,}-token prompts Gemini 3.1 Pro costs ${gem:,.0f} a month against "
                         f"V4-Pro's ${pro:,.0f}: ×{ratio:.3g} (×"
                         f"{base['bills']['gemini-3.1-pro'] / base['bills']['pro']:.3g} at 32K). Past 200K its input "
                         "rate doubles, and input is almost the whole bill; V4-Pro's rate is flat. Within 5 %.",
                  rel_tol=0.05)
