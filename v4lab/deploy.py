"""Deploying V4 (the report's observations 1 and 6, "When V4 is the wrong choice", "What we don't know
yet"): the facts with their sources, the migration countdown and calendar reminder, the routing
calculator and the wrong-choice checklist. Notebook 11 and ``v4lab cost`` / ``v4lab remind`` use it.

Figures live in ``v4lab/facts.json`` (each with its source); prices in ``v4lab/prices.json`` (each marked
published / derived). This module only does arithmetic and formatting.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Iterable
from datetime import date, datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any

from v4lab import pricing

FACTS_PATH = Path(__file__).with_name("facts.json")


# --------------------------------------------------------------------------------------- facts
@lru_cache(maxsize=2)
def _facts(path: str) -> dict:
    raw = json.loads(Path(path).read_text())
    for key, f in raw["facts"].items():
        for need in ("value", "text", "source"):
            if need not in f:
                raise ValueError(f"facts file: fact {key!r} lacks key {need!r}")
    for section in ("wrong_choice", "unknowns"):
        for item in raw[section]:
            if not item.get("source"):
                raise ValueError(f"facts file: {section} item {item.get('key')!r} lacks a source")
    return raw


def facts(path: str | Path | None = None) -> dict:
    """The whole facts file: ``facts`` (key → value, unit, text, source), ``wrong_choice``, ``unknowns``,
    ``thesis``."""
    return _facts(str(path or FACTS_PATH))


def fact(key: str) -> Any:
    """One figure's value (``fact("openrouter_chinese_share")`` → 45)."""
    f = facts()["facts"]
    if key not in f:
        raise ValueError(f"fact = {key!r}: not in facts.json; known: {sorted(f)}")
    return f[key]["value"]


def source(key: str) -> str:
    return facts()["facts"][key]["source"] if key in facts()["facts"] else fact(key)


# --------------------------------------------------------------------------------------- migration
def retirement_moment() -> datetime:
    """When the legacy model IDs retire (UTC)."""
    return datetime.strptime(fact("retirement_utc"), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)


def reminder_day() -> date:
    return date.fromisoformat(fact("reminder_date"))


def _as_utc(now) -> datetime:
    if now is None:
        return datetime.now(timezone.utc)
    if isinstance(now, datetime):
        if now.tzinfo is None:
            raise ValueError(f"now = {now!r}: must carry a time zone (naive datetimes are ambiguous)")
        return now.astimezone(timezone.utc)
    if isinstance(now, date):
        return datetime(now.year, now.month, now.day, tzinfo=timezone.utc)
    raise ValueError(f"now = {now!r}: must be a datetime with a time zone, a date or None")


def countdown(now: datetime | date | None = None) -> dict:
    """Where ``now`` (default: the current UTC time) stands against the retirement and the reminder.

    ``days`` counts whole days to the retirement (negative after it); ``retired`` is True once the
    retirement moment has passed; ``text`` says it in words, honestly in both directions."""
    now = _as_utc(now)
    end = retirement_moment()
    delta = end - now
    seconds = delta.total_seconds()
    retired = seconds <= 0
    days = int(abs(seconds) // 86400)
    hours = int((abs(seconds) % 86400) // 3600)
    when = end.strftime("%Y-%m-%d %H:%M UTC")
    if retired:
        text = (f"The legacy IDs retired after {when}: {days} day{'s' * (days != 1)} ago. "
                "A call that still names one of them needs the one-line change now.")
    else:
        text = (f"{days} day{'s' * (days != 1)} {hours} h left until the legacy IDs retire after {when}.")
    rem = reminder_day()
    rem_days = (rem - now.date()).days
    rem_text = (f"reminder day {rem.isoformat()} is {rem_days} days ahead" if rem_days > 0 else
                "reminder day is today" if rem_days == 0 else
                f"reminder day {rem.isoformat()} passed {-rem_days} days ago")
    return {"now": now, "retirement": end, "retired": retired, "days": -days if retired else days,
            "hours": hours, "text": text, "reminder": rem, "reminder_days": rem_days, "reminder_text": rem_text}


def migration_diff(new_model: str = "<V4-Flash model ID>", old_model: str = "deepseek-chat") -> str:
    """The one-line change for an OpenAI-compatible client, as a unified diff (the only changed line is
    ``model=``). The report does not print V4's model IDs, so the new one is a placeholder by default:
    take it from DeepSeek's API docs."""
    head = ["import os", "from openai import OpenAI", "",
            'client = OpenAI(api_key=os.environ["DEEPSEEK_API_KEY"], base_url="https://api.deepseek.com")',
            "resp = client.chat.completions.create("]
    tail = ['    messages=[{"role": "user", "content": "Hello"}],', "    stream=True,", ")"]
    return "\n".join([" " + h for h in head] + [f'-    model="{old_model}",', f'+    model="{new_model}",']
                     + [" " + t for t in tail])


# --------------------------------------------------------------------------------------- calendar
def _ics_text(s: str) -> str:
    """RFC 5545 TEXT escaping (backslash, semicolon, comma, newline)."""
    return s.replace("\\", "\\\\").replace(";", "\\;").replace(",", "\\,").replace("\n", "\\n")


def _fold(line: str) -> str:
    """RFC 5545 §3.1: lines longer than 75 octets continue on lines that start with one space; never
    split inside a UTF-8 sequence."""
    out, cur, limit = [], b"", 75
    for ch in line:
        b = ch.encode("utf-8")
        if len(cur) + len(b) > limit:
            out.append(cur.decode("utf-8"))
            cur, limit = b"", 74                       # continuation lines: 1 space + 74 octets
        cur += b
    out.append(cur.decode("utf-8"))
    return "\r\n ".join(out)


def reminder_ics(now: datetime | date | None = None) -> str:
    """An RFC 5545 calendar with one all-day event on the reminder day (CRLF line ends, folded lines).

    The UID is fixed, so importing a regenerated file updates the same event instead of adding a copy;
    DTSTAMP is ``now`` (when the file was made)."""
    stamp = _as_utc(now).strftime("%Y%m%dT%H%M%SZ")
    day = reminder_day()
    end = retirement_moment()
    legacy = ", ".join(fact("legacy_ids"))
    desc = (f"The legacy DeepSeek model IDs ({legacy}; the V3, V3.2 and R1 integrations) retire after "
            f"{end.strftime('%Y-%m-%d %H:%M UTC')}. Migrating is a one-line change: the model parameter. "
            f"Auth, base URL, request shape, streaming, tools and JSON mode stay the same. "
            "Generated by v4lab (v4lab remind --ics FILE).")
    lines = ["BEGIN:VCALENDAR", "VERSION:2.0", "PRODID:-//v4lab//deploying V4//EN", "CALSCALE:GREGORIAN",
             "BEGIN:VEVENT", f"UID:v4-migration-reminder-{day.strftime('%Y%m%d')}@v4lab", f"DTSTAMP:{stamp}",
             f"DTSTART;VALUE=DATE:{day.strftime('%Y%m%d')}",
             f"DTEND;VALUE=DATE:{date.fromordinal(day.toordinal() + 1).strftime('%Y%m%d')}",
             "SUMMARY:" + _ics_text("Migrate off deepseek-chat / deepseek-reasoner (retire after "
                                    f"{end.strftime('%Y-%m-%d %H:%M UTC')})"),
             "DESCRIPTION:" + _ics_text(desc), "TRANSP:TRANSPARENT",
             "BEGIN:VALARM", "ACTION:DISPLAY", "DESCRIPTION:" + _ics_text("Migrate to DeepSeek V4"),
             "TRIGGER:-PT0M", "END:VALARM", "END:VEVENT", "END:VCALENDAR"]
    return "".join(_fold(line) + "\r\n" for line in lines)


def write_ics(path: str | os.PathLike[str], force: bool = False, now: datetime | date | None = None) -> Path:
    """Write :func:`reminder_ics` to ``path`` atomically. An existing file is refused unless ``force``
    (then replaced in one step); a half-written file is never left behind."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"--ics = {str(path)!r}: is a directory; give a file name")
    if path.exists() and not force:
        raise ValueError(f"--ics = {str(path)!r}: the file exists; pass --force to replace it")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise ValueError(f"--ics = {str(path)!r}: folder {str(parent)!r} does not exist")
    data = reminder_ics(now).encode("utf-8")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    # mkstemp makes the file private (0600): give it the mode a plain open() would (or the replaced file's)
    mode = (path.stat().st_mode & 0o777) if path.exists() else (0o666 & ~umask)
    try:
        os.chmod(tmp, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if force:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)             # fails if the file appeared meanwhile: never clobbers
            except FileExistsError:
                raise
            except OSError:                    # a file system without hard links: check, then rename
                if path.exists():
                    raise FileExistsError(str(path)) from None
                os.replace(tmp, path)
            if os.path.exists(tmp):
                os.unlink(tmp)
    except FileExistsError:
        os.unlink(tmp)
        raise ValueError(f"--ics = {str(path)!r}: the file exists; pass --force to replace it") from None
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


# --------------------------------------------------------------------------------------- routing
STRATEGIES = ("flash", "routed", "pro", "opus-4.7", "gemini-3.1-pro", "gpt-5.5")
STRATEGY_LABELS = {"flash": "V4-Flash only", "routed": "Flash + Pro escalation", "pro": "V4-Pro only",
                   "opus-4.7": "Opus 4.7 only", "gemini-3.1-pro": "Gemini 3.1 Pro only", "gpt-5.5": "GPT-5.5 only"}


def _check_share(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
        raise ValueError(f"{name} = {v!r}: must be a fraction in [0, 1]")
    return float(v)


def _check_count(name: str, v, lo: int = 0) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v) or v < lo:
        raise ValueError(f"{name} = {v!r}: must be a whole number >= {lo}")
    return int(v)


def route(turns: int = 1000, context: int = 32000, output: int = 1000, pro_share: float = 0.2,
          hard_share: float = 0.2, thinking: bool = False, thinking_tokens: int | None = None) -> dict:
    """A month of traffic under each strategy. ``turns`` a month, each with a ``context``-token prompt
    (billed as input; Gemini's rate doubles above 200K) and ``output`` tokens of answer (+
    ``thinking_tokens`` billed as output when ``thinking``). ``pro_share`` of the turns go to V4-Pro
    in the routed strategy; ``hard_share`` of them need Pro-class quality.

    The defaults are the report's heavy-fleet month (32M in + 1M out): $4.76 on Flash, $185 on Opus.
    Returns ``bills`` (strategy → $ or None when a price is unknown), ``known_part`` (the part of a bill
    v4lab can price: GPT-5.5's output), ``overpay`` (Pro/Flash on turns Flash could serve), the shares of
    turns overpaid (easy turns on Pro) and at risk (hard turns left on Flash)."""
    turns, context = _check_count("turns", turns), _check_count("context", context)
    output = _check_count("output", output)
    pro_share, hard_share = _check_share("pro_share", pro_share), _check_share("hard_share", hard_share)
    if not isinstance(thinking, bool):
        raise ValueError(f"thinking = {thinking!r}: must be True or False")
    think = (fact("thinking_output_tokens") if thinking_tokens is None
             else _check_count("thinking_tokens", thinking_tokens))
    inp, out = turns * context, turns * (output + (think if thinking else 0))
    bills, known = {}, {}
    for k, model in (("flash", "v4-flash"), ("pro", "v4-pro"), ("opus-4.7", "opus-4.7"),
                     ("gemini-3.1-pro", "gemini-3.1-pro"), ("gpt-5.5", "gpt-5.5")):
        p = pricing.price(model)
        known[k] = pricing.cost(model, 0, out)
        bills[k] = None if (p.input is None and inp) else pricing.cost(model, inp if p.input is not None else 0, out,
                                                                       context=context)
    bills["routed"] = (1 - pro_share) * bills["flash"] + pro_share * bills["pro"]
    known["routed"] = bills["routed"]
    easy = 1 - hard_share
    easy_turns = easy * turns
    return {"turns": turns, "context": context, "input_tokens": inp, "output_tokens": out,
            "thinking_tokens": think if thinking else 0, "pro_share": pro_share, "hard_share": hard_share,
            "bills": {k: bills[k] for k in STRATEGIES}, "known_part": {k: known[k] for k in STRATEGIES},
            "overpay": pricing.overpay(inp / (inp + out)) if inp + out else pricing.overpay(),
            "easy_share": easy, "overpaid_share": max(0.0, pro_share - hard_share),
            "at_risk_share": max(0.0, hard_share - pro_share),
            "pro_on_easy": bills["pro"] * easy, "flash_on_easy": bills["flash"] * easy,
            "gemini_surcharged": context > (pricing.price("gemini-3.1-pro").long_context_threshold or 10 ** 18),
            "easy_turns": easy_turns}


def format_route(r: dict) -> str:
    """The calculator's result as a table with each price's mark (what ``v4lab cost`` prints)."""
    lines = [f"{r['turns']:,} turns/month x ({r['context']:,} prompt + {r['output_tokens'] // max(r['turns'], 1):,} "
             f"output tokens"
             f"{', incl. ' + format(r['thinking_tokens'], ',') + ' thinking' if r['thinking_tokens'] else ''})"
             f" = {r['input_tokens'] / 1e6:,.3g}M in + {r['output_tokens'] / 1e6:,.3g}M out a month",
             f"{'strategy':<24} {'US$/month':>12}  prices (input; output)"]
    marks = {"flash": "v4-flash", "pro": "v4-pro", "opus-4.7": "opus-4.7", "gemini-3.1-pro": "gemini-3.1-pro",
             "gpt-5.5": "gpt-5.5"}
    for k in STRATEGIES:
        b = r["bills"][k]
        shown = "unknown" if b is None else f"{b:,.2f}"
        if k == "routed":
            note = f"{100 * r['pro_share']:.0f}% of turns on V4-Pro"
        else:
            p = pricing.price(marks[k])
            note = f"{p.mark('input')}; {p.mark('output')}"
            if b is None:
                note = f"input price unknown (output alone ${r['known_part'][k]:,.2f}); {p.mark('output')}"
        lines.append(f"{STRATEGY_LABELS[k]:<24} {shown:>12}  {note}")
    lines.append(f"Pro everywhere pays {r['overpay']:.1f}x on the {100 * r['easy_share']:.0f}% of turns Flash could "
                 f"serve (the report: {fact('pro_overpay')}x on {fact('easy_traffic_share')}%)")
    if r["at_risk_share"]:
        lines.append(f"{100 * r['at_risk_share']:.0f}% of turns are hard but stay on Flash: the Flash-everywhere trap")
    if r["overpaid_share"]:
        lines.append(f"{100 * r['overpaid_share']:.0f}% of turns go to Pro without needing it")
    if r["gemini_surcharged"]:
        lines.append("prompts above 200K: Gemini's input rate doubled; V4-Pro stays flat")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------- checklist
def conditions() -> list[dict]:
    """The seven "wrong choice" conditions (key, condition, why, figure, alternative, source)."""
    return [dict(c) for c in facts()["wrong_choice"]]


def verdict(checked: Iterable[str]) -> dict:
    """The checklist's answer for the set of condition keys that apply."""
    conds = {c["key"]: c for c in conditions()}
    checked = list(checked)
    bad = [k for k in checked if k not in conds]
    if bad:
        raise ValueError(f"condition = {bad[0]!r}: must be one of {sorted(conds)}")
    hits = [conds[k] for k in conds if k in checked]
    if not hits:
        return {"fits": True, "hits": [], "text": "None of the seven applies: V4 is the right choice for most "
                "workloads like yours (the report's closing advice)."}
    lines = [f"V4 is the wrong choice here ({len(hits)} of 7 conditions):"]
    lines += [f"- {h['condition']} [{h['figure']}] -> {h['alternative']}" for h in hits]
    return {"fits": False, "hits": hits, "text": "\n".join(lines)}


def subfp4_experiment() -> str | None:
    """The CLI command of v4lab's sub-FP4 robustness experiment, or None while it does not exist."""
    import importlib.util
    try:
        found = importlib.util.find_spec("v4lab.experiments.subfp4") is not None
    except (ImportError, ValueError):
        found = False
    return "v4lab experiment subfp4" if found else None


def unknown_cards() -> list[dict]:
    """"What we don't know yet" as cards; the sub-FP4 card says where v4lab measures it (or that the
    experiment is planned and not in this version)."""
    cards = []
    for u in facts()["unknowns"]:
        c = dict(u)
        if c["key"] == "sub_fp4":
            cmd = subfp4_experiment()
            c["v4lab"] = (f"v4lab measures it: run `{cmd}`" if cmd else
                          "v4lab's own sub-FP4 experiment (`v4lab experiment subfp4`) is planned and not in "
                          "this version yet")
        cards.append(c)
    return cards


# --------------------------------------------------------------------------------------- command line
def parse_tokens(arg: str, text: str | int | float) -> int:
    """``32000``, ``32K`` (= 32,000: decimal, as price pages count), ``1M`` (= 1,000,000)."""
    import re
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([kKmM]?)\s*", str(text))
    if not m:
        raise ValueError(f"{arg} = {text!r}: must be a whole token count like 32000, 32K or 1M")
    v = float(m.group(1)) * {"": 1, "k": 10 ** 3, "m": 10 ** 6}[m.group(2).lower()]
    if v != int(v):
        raise ValueError(f"{arg} = {text!r}: must be a whole number of tokens")
    return int(v)


def _fraction(arg: str, text) -> float:
    try:
        v = float(str(text).rstrip("%")) / (100 if str(text).endswith("%") else 1)
    except ValueError:
        raise ValueError(f"{arg} = {text!r}: must be a fraction in [0, 1] or a percentage like 20%") from None
    return _check_share(arg, v)


def _print(text: str) -> None:
    try:
        print(text, flush=True)
    except BrokenPipeError:              # `v4lab cost | head`: the reader left, which is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def cli(cmd: str, argv: list[str], parser_cls: type[argparse.ArgumentParser]) -> int:
    """``v4lab cost`` (the routing calculator) and ``v4lab remind --ics FILE``; bad input raises
    ValueError (the caller prints one line and exits 2)."""
    p = parser_cls(prog=f"v4lab {cmd}")
    if cmd == "cost":
        p.add_argument("--turns", default="1000", help="turns (requests) a month (default 1000)")
        p.add_argument("--context", default="32K",
                       help="prompt tokens per turn, e.g. 32K, 256K (decimal K; default 32K)")
        p.add_argument("--output", default="1K", help="answer tokens per turn (default 1K)")
        p.add_argument("--pro-share", default="0.2", help="share of turns routed to V4-Pro (default 0.2)")
        p.add_argument("--hard-share", default="0.2", help="share of turns that need Pro-class quality (default 0.2)")
        p.add_argument("--thinking", action="store_true", help="Thinking on: bill extra output tokens per turn")
        p.add_argument("--thinking-tokens", default=None,
                       help=f"thinking tokens per turn (default {fact('thinking_output_tokens')}, a v4lab assumption)")
        p.add_argument("--json", action="store_true", help="one JSON object instead of a table")
        a = p.parse_args(argv)
        r = route(parse_tokens("--turns", a.turns), parse_tokens("--context", a.context),
                  parse_tokens("--output", a.output), _fraction("--pro-share", a.pro_share),
                  _fraction("--hard-share", a.hard_share), a.thinking,
                  None if a.thinking_tokens is None else parse_tokens("--thinking-tokens", a.thinking_tokens))
        if a.json:
            marks = {k: {"input": pricing.price(m).mark("input"), "output": pricing.price(m).mark("output")}
                     for k, m in (("flash", "v4-flash"), ("pro", "v4-pro"), ("opus-4.7", "opus-4.7"),
                                  ("gemini-3.1-pro", "gemini-3.1-pro"), ("gpt-5.5", "gpt-5.5"))}
            text = json.dumps({**r, "price_marks": marks})
        else:
            text = format_route(r)
        _print(text)
        return 0
    p.add_argument("--ics", required=True, metavar="FILE", help="write the reminder (.ics) here")
    p.add_argument("--force", action="store_true", help="replace FILE if it exists")
    a = p.parse_args(argv)
    path = write_ics(a.ics, force=a.force)
    c = countdown()
    _print(f"wrote {path}: an all-day reminder on {c['reminder'].isoformat()} ({c['reminder_text']}). {c['text']}")
    return 0


# --------------------------------------------------------------------------------------- printed blocks
def _src(key: str) -> str:
    return f"[{facts()['facts'][key]['source']}]"


def market_text() -> str:
    """Observation 1 with its figures and sources (notebook 11 prints it)."""
    return "\n".join([
        f"Chinese open-weight models: {fact('openrouter_chinese_share')} % of OpenRouter's weekly volume at V4's "
        f"launch {_src('openrouter_chinese_share')}",
        f"Analyst consensus: V4 is {fact('analyst_consensus')}. {facts()['facts']['analyst_consensus']['text']} "
        f"{_src('analyst_consensus')}"])


def migration_text(now: datetime | date | None = None) -> str:
    """Observation 6's dates, what changes and what does not, and where ``now`` stands."""
    c = countdown(now)
    return "\n".join([
        f"legacy IDs: {', '.join(fact('legacy_ids'))} (V3 / V3.2 / R1 integrations) {_src('legacy_ids')}",
        "the change: the model parameter; unchanged: " + ", ".join(fact("unchanged_on_migration")),
        f"retirement: after {c['retirement'].strftime('%Y-%m-%d %H:%M UTC')} {_src('retirement_utc')}",
        f"reminder:   {c['reminder'].isoformat()} {_src('reminder_date')}",
        f"pattern:    {fact('recommended_pattern')} {_src('recommended_pattern')}",
        f"traps:      Pro everywhere overpays {fact('pro_overpay')}x on the ~{fact('easy_traffic_share')} % of traffic "
        f"that does not need it; Flash everywhere regresses the knowledge-hard long tail {_src('pro_overpay')}"])


def conditions_text() -> str:
    """The seven "wrong choice" conditions, each with its figure and the alternative."""
    lines = []
    for i, c in enumerate(conditions(), 1):
        lines.append(f"{i}. {c['condition']}\n   figure: {c['figure']}\n   instead: {c['alternative']}")
    return "\n".join(lines)


def v5_text() -> str:
    """Observation 4's pointer to V5 and the speculative V5 prices, labelled."""
    f, p = fact("v5_flash_price"), fact("v5_pro_price")
    return "\n".join([
        f"V5's likely research direction: {fact('v5_direction')} {_src('v5_direction')}",
        f"and its architecture: {fact('v5_backbone')} {_src('v5_backbone')}",
        f"SPECULATION, not prices anyone charges: V5-Flash ~${f[0]:.2f} / ${f[1]:.2f}, "
        f"V5-Pro ~${p[0]:.2f} / ${p[1]:.2f} per 1M input / output tokens {_src('v5_flash_price')}"])
