"""API prices and the deployment-economics arithmetic of the V4 report (observations 5-6).

Prices are data: ``v4lab/prices.json`` (dated, each with its source). This module only does the
arithmetic, so every figure the report quotes is recomputed here from the price table, and
:func:`report_claims` lists them next to the published values (notebook 09 and the tests use it).

Units: prices in US$ per million tokens; token counts in tokens (not millions) unless the argument
name ends in ``_m``.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

PRICES_PATH = Path(__file__).with_name("prices.json")
BASES = ("published", "derived", "assumed", "speculation", "unknown")
# report_claims() ids → how the report prints the figure (what a derived price's mark lists)
CLAIM_SHORT = {"pro_vs_opus": "7.2x vs Opus", "pro_vs_gpt": "8.6x vs GPT-5.5", "pro_vs_gemini": "3.4x vs Gemini",
               "flash_vs_opus": "89x vs Opus", "flash_month": "the 4.76 USD Flash month",
               "opus_month": "the 185 USD Opus month", "gemini_long": "Gemini 2x above 200K",
               "pro_flat": "Pro flat 1.74 USD", "pro_overpay": "12x overpay"}


@dataclass(frozen=True)
class Price:
    key: str
    label: str
    input: float | None          # $/1M input tokens (None = not given)
    output: float                # $/1M output tokens
    source: str
    speculative: bool = False
    input_assumed: bool = False  # True when the input price is v4lab's assumption, not the report's
    long_context_threshold: int | None = None       # context (tokens) above which input costs more
    long_context_input_multiplier: float = 1.0
    input_basis: str = "published"                  # one of BASES: where the number comes from
    output_basis: str = "published"
    input_from: tuple = ()                          # report_claims() ids a derived price reproduces
    output_from: tuple = ()

    def mark(self, side: str) -> str:
        """'published', 'derived (from 7.2x, ...)', 'assumed by v4lab', 'speculation' or 'unknown'."""
        if side not in ("input", "output"):
            raise ValueError(f"side = {side!r}: must be 'input' or 'output'")
        basis = getattr(self, f"{side}_basis")
        if basis == "derived":
            return "derived (from " + ", ".join(CLAIM_SHORT[c] for c in getattr(self, f"{side}_from")) + ")"
        return {"assumed": "assumed by v4lab"}.get(basis, basis)

    def input_rate(self, context: int = 0) -> float:
        """$/1M input tokens for a request whose prompt is ``context`` tokens long."""
        if self.input is None:
            raise ValueError(f"model {self.key!r}: no input price in prices.json (the report gives only output)")
        if self.long_context_threshold is not None and context > self.long_context_threshold:
            return self.input * self.long_context_input_multiplier
        return self.input


def _load(path: Path) -> dict[str, Price]:
    try:
        raw = json.loads(Path(path).read_text())
    except OSError as e:
        raise ValueError(f"prices file {str(path)!r}: cannot be read ({e.strerror or e})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"prices file {str(path)!r}: not valid JSON ({e.msg} at line {e.lineno})") from None
    out: dict[str, Price] = {}
    for section, spec in (("models", False), ("speculative", True)):
        for key, d in raw.get(section, {}).items():
            if key.startswith("_"):
                continue
            for need in ("label", "output", "source"):
                if need not in d:
                    raise ValueError(f"prices file: model {key!r} lacks key {need!r}")
            for k in ("input", "output"):
                v = d.get(k)
                if v is not None and (not isinstance(v, (int, float)) or v < 0):
                    raise ValueError(f"prices file: {key}.{k} = {v!r}: must be a non-negative number or null")
            marks = _marks(key, d)
            out[key] = Price(key=key, label=d["label"], input=d.get("input"), output=float(d["output"]),
                             source=d["source"], speculative=spec,
                             input_assumed=marks["input_basis"] == "assumed" or bool(d.get("input_assumed")),
                             long_context_threshold=d.get("long_context_threshold"),
                             long_context_input_multiplier=float(d.get("long_context_input_multiplier", 1.0)),
                             **marks)
    return out


def _marks(key: str, d: dict) -> dict:
    """The basis of each price (published / derived from which claims / ...), checked."""
    out = {}
    for side in ("input", "output"):
        if f"{side}_basis" not in d:
            raise ValueError(f"prices file: model {key!r} lacks key {side + '_basis'!r} (one of {BASES})")
        basis = d[f"{side}_basis"]
        if basis not in BASES:
            raise ValueError(f"prices file: {key}.{side}_basis = {basis!r}: must be one of {BASES}")
        if (d.get(side) is None) != (basis == "unknown"):
            raise ValueError(f"prices file: {key}.{side}_basis = {basis!r} with {side} = {d.get(side)!r}: "
                             "a null price is 'unknown' and only a null price is")
        src = tuple(d.get(f"{side}_from", ()))
        if (basis == "derived") != bool(src):
            raise ValueError(f"prices file: {key}.{side}_from = {list(src)!r}: a derived price lists the "
                             "claims it reproduces, and only a derived price does")
        bad = [c for c in src if c not in CLAIM_SHORT]
        if bad:
            raise ValueError(f"prices file: {key}.{side}_from has {bad[0]!r}: must be one of {sorted(CLAIM_SHORT)}")
        out[f"{side}_basis"], out[f"{side}_from"] = basis, src
    return out


@lru_cache(maxsize=4)
def _cached(path: str) -> dict[str, Price]:
    return _load(Path(path))


def load_prices(path: str | Path | None = None, speculative: bool = True) -> dict[str, Price]:
    """All prices, keyed by model (``v4-flash``, ``v4-pro``, ``opus-4.7`` ...)."""
    prices = dict(_cached(str(path or PRICES_PATH)))
    return prices if speculative else {k: p for k, p in prices.items() if not p.speculative}


def meta(path: str | Path | None = None) -> dict:
    """The file's date and source."""
    raw = json.loads(Path(path or PRICES_PATH).read_text())
    return {k: raw[k] for k in ("as_of", "recorded_on", "_recorded_on", "source", "currency") if k in raw}


def price(model: str, path: str | Path | None = None) -> Price:
    prices = load_prices(path)
    if model not in prices:
        raise ValueError(f"model = {model!r}: not in prices.json; known: {sorted(prices)}")
    return prices[model]


def cost(model: str, input_tokens: float, output_tokens: float, context: int = 0) -> float:
    """Dollars for ``input_tokens`` + ``output_tokens``; ``context`` = prompt length per request
    (only matters for long-context surcharges)."""
    if input_tokens < 0 or output_tokens < 0:
        raise ValueError(f"tokens: input_tokens = {input_tokens!r}, output_tokens = {output_tokens!r}: "
                         "must be >= 0")
    p = price(model)
    inp = p.input_rate(context) * input_tokens / 1e6 if input_tokens else 0.0
    return inp + p.output * output_tokens / 1e6


def output_ratio(expensive: str, cheap: str) -> float:
    """How many times cheaper ``cheap`` is than ``expensive`` per output token."""
    return price(expensive).output / price(cheap).output


def blended_cost(escalated: float, input_tokens: float, output_tokens: float, base: str = "v4-flash",
                 escalation: str = "v4-pro", context: int = 0) -> float:
    """Flash-first routing: a fraction ``escalated`` of the traffic goes to the bigger model."""
    if not 0.0 <= escalated <= 1.0:
        raise ValueError(f"escalated = {escalated!r}: must be a fraction in [0, 1]")
    return ((1 - escalated) * cost(base, input_tokens, output_tokens, context)
            + escalated * cost(escalation, input_tokens, output_tokens, context))


def overpay(input_share: float = 32 / 33, big: str = "v4-pro", small: str = "v4-flash") -> float:
    """Cost ratio big/small for traffic with ``input_share`` of its tokens as input.

    The report's "12x overpay": sending traffic Flash could serve to Pro. Pro/Flash is
    1.74/0.14 = 12.43 for input and 3.48/0.28 = 12.43 for output, so the ratio is 12.4x for every
    input/output mix (the share does not matter) and the report rounds it to 12x.
    """
    if not 0.0 <= input_share <= 1.0:
        raise ValueError(f"input_share = {input_share!r}: must be a fraction in [0, 1]")
    return cost(big, input_share, 1 - input_share) / cost(small, input_share, 1 - input_share)


def report_claims() -> list[dict]:
    """Every price figure the report quotes, recomputed from prices.json.

    Each record: ``claim``, ``computed`` (full precision), ``shown`` (rounded the way the report
    prints it), ``published`` and ``ok`` (shown == published).
    """
    def rec(cid, claim, computed, published, digits, derivation):
        shown = round(computed, digits) if digits else round(computed)
        return {"id": cid, "claim": claim, "computed": computed, "shown": shown, "published": published,
                "ok": math.isclose(shown, published, abs_tol=1e-9), "derivation": derivation}

    flash_month = cost("v4-flash", 32e6, 1e6)
    opus_month = cost("opus-4.7", 32e6, 1e6)
    g = price("gemini-3.1-pro")
    return [
        rec("pro_vs_opus", "V4-Pro output cheaper than Opus 4.7 (x)", output_ratio("opus-4.7", "v4-pro"), 7.2, 1,
            "25 / 3.48"),
        rec("pro_vs_gpt", "V4-Pro output cheaper than GPT-5.5 (x)", output_ratio("gpt-5.5", "v4-pro"), 8.6, 1,
            "30 / 3.48"),
        rec("pro_vs_gemini", "V4-Pro output cheaper than Gemini 3.1 Pro (x)", output_ratio("gemini-3.1-pro", "v4-pro"),
            3.4, 1, "12 / 3.48"),
        rec("flash_vs_opus", "V4-Flash output cheaper than Opus 4.7 (x)", output_ratio("opus-4.7", "v4-flash"), 89, 0,
            "25 / 0.28"),
        rec("flash_month", "32M in + 1M out a month on V4-Flash ($)", flash_month, 4.76, 2, "32 x 0.14 + 1 x 0.28"),
        rec("opus_month", "32M in + 1M out a month on Opus 4.7 ($)", opus_month, 185, 0, "32 x 5 + 1 x 25"),
        rec("gemini_long", "Gemini 3.1 Pro input multiplier above 200K (x)",
            g.input_rate(g.long_context_threshold + 1) / g.input_rate(0), 2, 0, "doubled above 200K"),
        rec("pro_flat", "V4-Pro input multiplier above 200K (x)",
            price("v4-pro").input_rate(10**6) / price("v4-pro").input_rate(0), 1, 0, "flat $1.74/1M at any context"),
        rec("pro_overpay", "Pro overpay on traffic Flash could serve (x)", overpay(), 12, 0,
            "(32 x 1.74 + 3.48) / (32 x 0.14 + 0.28) = 12.43; the same for any input/output mix"),
    ]
