"""Deploying V4 (notebook 11, `v4lab cost`, `v4lab remind`): facts with sources, the countdown, the RFC 5545
reminder, the routing calculator, the checklist, and the price marks."""
import json
import os
import re
from datetime import date, datetime, timedelta, timezone

import pytest

from v4lab import cli, deploy, pricing

UTC = timezone.utc


# ----------------------------------------------------------------------------- facts
def test_every_fact_has_a_source_of_a_known_kind():
    f = deploy.facts()
    for key, v in f["facts"].items():
        assert re.match(r"^(report, |derived from |v4lab assumption)", v["source"]), (key, v["source"])
    assert len(f["wrong_choice"]) == 7 and all(c["source"].startswith("report") for c in f["wrong_choice"])
    assert {u["key"] for u in f["unknowns"]} == {"red_team", "usage", "sub_fp4", "v5"}
    assert f["thesis"]["source"] == "report, closing thesis"


def test_report_figures_in_the_facts_file():
    # the figures the issue lists, exactly as the report prints them
    assert deploy.fact("openrouter_chinese_share") == 45
    assert deploy.fact("retirement_utc") == "2026-07-24T15:59:00Z" and deploy.fact("reminder_date") == "2026-07-15"
    assert deploy.fact("pro_overpay") == 12 and deploy.fact("easy_traffic_share") == 80
    assert deploy.fact("geopolitical_framing") == 91 and deploy.fact("simpleqa_gap_pp") == 18
    assert deploy.fact("terminal_bench") == 67.9 and deploy.fact("swe_pro") == 55.4 and deploy.fact("ttft_ms") == 300
    assert deploy.fact("month_flash_usd") == 4.76 and deploy.fact("month_opus_usd") == 185
    assert deploy.fact("v5_flash_price") == [0.07, 0.14] and deploy.fact("v5_pro_price") == [0.87, 1.74]
    # derived facts are derived from what they say
    assert deploy.fact("hard_traffic_share") == 100 - deploy.fact("easy_traffic_share")
    with pytest.raises(ValueError, match="fact = 'nope'"):
        deploy.fact("nope")


def test_prices_agree_with_the_facts_and_speculation_is_labelled():
    assert pricing.price("v4-pro").input == deploy.fact("v4pro_input_flat")
    assert pricing.price("v4-pro").mark("input") == "published"
    f, p = pricing.price("v5-flash"), pricing.price("v5-pro")
    assert [f.input, f.output] == deploy.fact("v5_flash_price") and [p.input, p.output] == deploy.fact("v5_pro_price")
    assert f.mark("input") == f.mark("output") == "speculation" and f.speculative
    g = pricing.price("gemini-3.1-pro")
    assert g.long_context_threshold == deploy.fact("gemini_long_threshold")
    assert g.long_context_input_multiplier == deploy.fact("gemini_long_multiplier")


# ----------------------------------------------------------------------------- price marks
def _claims_of(model, side):
    return getattr(pricing.price(model), f"{side}_from")


DERIVED = [(k, side) for k, p in pricing.load_prices().items() for side in ("input", "output")
           if getattr(p, f"{side}_basis") == "derived"]


def test_which_prices_are_published_and_which_derived():
    # the report prints exactly one price: V4-Pro's $1.74 input; the V5 guesses are its speculation
    published = {(k, s) for k, p in pricing.load_prices().items() for s in ("input", "output")
                 if getattr(p, f"{s}_basis") == "published"}
    assert published == {("v4-pro", "input")}
    assert set(DERIVED) == {("v4-flash", "input"), ("v4-flash", "output"), ("v4-pro", "output"), ("opus-4.7", "input"),
                            ("opus-4.7", "output"), ("gpt-5.5", "output"), ("gemini-3.1-pro", "output")}
    assert pricing.price("gpt-5.5").mark("input") == "unknown"
    assert pricing.price("gemini-3.1-pro").mark("input") == "assumed by v4lab"
    assert pricing.price("opus-4.7").mark("output") == \
        "derived (from 7.2x vs Opus, 89x vs Opus, the 185 USD Opus month)"


@pytest.mark.parametrize("model,side", DERIVED)
def test_a_derived_price_reproduces_the_figures_it_came_from(model, side, tmp_path, monkeypatch):
    claims = {r["id"]: r for r in pricing.report_claims()}
    listed = _claims_of(model, side)
    assert listed and all(claims[c]["ok"] for c in listed)
    # and the claims really pin it: 5 % either way breaks at least one of them
    raw = json.loads(pricing.PRICES_PATH.read_text())
    for factor in (0.95, 1.05):
        bad = json.loads(json.dumps(raw))
        bad["models"][model][side] = raw["models"][model][side] * factor
        path = tmp_path / f"prices_{factor}.json"
        path.write_text(json.dumps(bad))
        monkeypatch.setattr(pricing, "PRICES_PATH", path)
        broken = {r["id"] for r in pricing.report_claims() if not r["ok"]}
        assert broken & set(listed), (model, side, factor)
    monkeypatch.setattr(pricing, "PRICES_PATH", pricing.Path(pricing.__file__).with_name("prices.json"))


def test_bad_marks_are_rejected(tmp_path):
    def load(entry, drop=()):
        p = tmp_path / "p.json"
        base = {"label": "x", "source": "s", "input": 1.0, "input_basis": "published", "output": 1.0,
                "output_basis": "published"}
        d = {k: v for k, v in {**base, **entry}.items() if k not in drop}
        p.write_text(json.dumps({"models": {"x": d}}))
        pricing._cached.cache_clear()
        return pricing.load_prices(p)
    with pytest.raises(ValueError, match="x.output_basis = 'rumour'"):
        load({"output_basis": "rumour"})
    with pytest.raises(ValueError, match="x.output_from"):
        load({"output_basis": "derived"})                       # derived but from nothing
    with pytest.raises(ValueError, match="'nope'"):
        load({"output_basis": "derived", "output_from": ["nope"]})
    with pytest.raises(ValueError, match="x.input_basis = 'published' with input = None"):
        load({"input": None})                                   # a null price must be 'unknown'
    assert load({"input": None, "input_basis": "unknown"})["x"].mark("input") == "unknown"
    with pytest.raises(ValueError, match="lacks key 'output_basis'"):
        load({}, drop=("output_basis",))


def test_recorded_on_says_what_it_means():
    m = pricing.meta()
    assert date.fromisoformat(m["recorded_on"])
    assert "copied" in m["_recorded_on"] and "not a date" in m["_recorded_on"]


# ----------------------------------------------------------------------------- countdown
def test_countdown_before_at_and_after():
    end = datetime(2026, 7, 24, 15, 59, tzinfo=UTC)
    c = deploy.countdown(end - timedelta(days=10, hours=3))
    assert not c["retired"] and c["days"] == 10 and c["hours"] == 3 and "10 days 3 h left" in c["text"]
    c = deploy.countdown(end)
    assert c["retired"] and c["days"] == 0
    c = deploy.countdown(end + timedelta(days=1, minutes=1))
    assert c["retired"] and c["days"] == -1 and "1 day ago" in c["text"]
    # the session's today (2026-12-03): retired 131 days ago, reminder 141 days past
    c = deploy.countdown(datetime(2026, 12, 3, 6, 0, tzinfo=UTC))
    assert c["retired"] and c["days"] == -131 and "131 days ago" in c["text"] and "2026-07-24 15:59 UTC" in c["text"]
    assert c["reminder_days"] == -141 and "passed 141 days ago" in c["reminder_text"]
    assert deploy.countdown(date(2026, 7, 15))["reminder_text"] == "reminder day is today"
    assert deploy.countdown(datetime(2026, 7, 24, 23, 0, tzinfo=timezone(timedelta(hours=8))))["retired"] is False
    with pytest.raises(ValueError, match="time zone"):
        deploy.countdown(datetime(2026, 7, 1))
    with pytest.raises(ValueError, match="now = 'today'"):
        deploy.countdown("today")


def test_migration_diff_changes_only_the_model_line():
    d = deploy.migration_diff().splitlines()
    changed = [x for x in d if x[:1] in "+-"]
    assert changed == ['-    model="deepseek-chat",', '+    model="<V4-Flash model ID>",']
    assert all(x.startswith(" ") or x in changed for x in d)
    assert any("base_url" in x for x in d)


# ----------------------------------------------------------------------------- calendar
NOW = datetime(2026, 12, 3, 6, 30, 5, tzinfo=UTC)


def test_ics_is_rfc5545_shaped():
    raw = deploy.reminder_ics(NOW).encode("utf-8")
    assert raw.endswith(b"\r\n") and b"\n" not in raw.replace(b"\r\n", b"")     # CRLF only
    lines = raw.split(b"\r\n")[:-1]
    assert all(len(x) <= 75 for x in lines)                                        # folded
    assert any(x.startswith(b" ") for x in lines)                                  # something needed folding
    text = raw.decode().replace("\r\n ", "")                                       # unfold
    assert "UID:v4-migration-reminder-20260715@v4lab" in text and "DTSTAMP:20261203T063005Z" in text
    assert "DTSTART;VALUE=DATE:20260715" in text and "DTEND;VALUE=DATE:20260716" in text
    assert "deepseek-chat\\, deepseek-reasoner\\;" in text                          # TEXT escaping


def test_ics_parses_with_icalendar():
    icalendar = pytest.importorskip("icalendar")
    cal = icalendar.Calendar.from_ical(deploy.reminder_ics(NOW))
    ev = cal.walk("VEVENT")
    assert len(ev) == 1
    ev = ev[0]
    assert ev.decoded("DTSTART") == date(2026, 7, 15) and ev.decoded("DTEND") == date(2026, 7, 16)
    assert ev.decoded("DTSTAMP") == NOW
    assert str(ev["UID"]) == "v4-migration-reminder-20260715@v4lab"
    desc = str(ev["DESCRIPTION"])
    assert "deepseek-chat, deepseek-reasoner;" in desc and "2026-07-24 15:59 UTC" in desc   # unescaped, unfolded
    assert len(ev.walk("VALARM")) == 1


def test_fold_never_splits_a_utf8_character():
    line = "DESCRIPTION:" + "é" * 100
    folded = deploy._fold(line).encode("utf-8")
    for part in folded.split(b"\r\n"):
        assert len(part) <= 75
        part.decode("utf-8")                                  # would raise on a split character
    assert deploy._fold(line).replace("\r\n ", "") == line


def test_write_ics_refuses_then_forces_atomically(tmp_path):
    f = tmp_path / "mine.ics"
    f.write_text("my calendar")
    with pytest.raises(ValueError, match="exists; pass --force"):
        deploy.write_ics(f, now=NOW)
    assert f.read_text() == "my calendar"                     # untouched
    deploy.write_ics(f, force=True, now=NOW)
    assert f.read_bytes() == deploy.reminder_ics(NOW).encode()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.ics"]     # no temporary left
    new = tmp_path / "new.ics"
    deploy.write_ics(new, now=NOW)
    assert new.read_bytes() == f.read_bytes()
    assert new.stat().st_mode & 0o777 == 0o666 & ~_umask()
    with pytest.raises(ValueError, match="is a directory"):
        deploy.write_ics(tmp_path, now=NOW)
    with pytest.raises(ValueError, match="does not exist"):
        deploy.write_ics(tmp_path / "no" / "x.ics", now=NOW)


def test_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def boom(*a):
        raise OSError("disk full")
    monkeypatch.setattr(deploy.os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        deploy.write_ics(tmp_path / "r.ics", now=NOW)
    assert list(tmp_path.iterdir()) == []


def _umask():
    u = os.umask(0)
    os.umask(u)
    return u


# ----------------------------------------------------------------------------- routing calculator
def test_route_reproduces_the_report():
    r = deploy.route()                                        # the report's 32M in + 1M out
    assert (r["input_tokens"], r["output_tokens"]) == (32_000_000, 1_000_000)
    assert round(r["bills"]["flash"], 2) == 4.76 and round(r["bills"]["opus-4.7"]) == 185
    assert round(r["overpay"]) == 12 and r["easy_share"] == pytest.approx(0.8)
    assert r["bills"]["pro"] == pytest.approx(32 * 1.74 + 3.48)
    assert r["bills"]["gpt-5.5"] is None and r["known_part"]["gpt-5.5"] == pytest.approx(30.0)   # unknown, not $0
    assert r["bills"]["routed"] == pytest.approx(0.8 * 4.76 + 0.2 * 59.16)
    # Pro on the easy 80 % costs 12.4x what Flash would
    assert r["pro_on_easy"] / r["flash_on_easy"] == pytest.approx(r["overpay"])


def test_route_edges():
    assert deploy.route(pro_share=0)["bills"]["routed"] == pytest.approx(deploy.route()["bills"]["flash"])
    assert deploy.route(pro_share=1)["bills"]["routed"] == pytest.approx(deploy.route()["bills"]["pro"])
    r = deploy.route(pro_share=0.05, hard_share=0.2)
    assert r["at_risk_share"] == pytest.approx(0.15) and r["overpaid_share"] == 0
    r = deploy.route(pro_share=0.5, hard_share=0.2)
    assert r["overpaid_share"] == pytest.approx(0.3) and r["at_risk_share"] == 0
    # Gemini doubles input above 200K, V4-Pro stays flat
    a, b = deploy.route(context=200_000), deploy.route(context=200_001)
    assert a["bills"]["gemini-3.1-pro"] == pytest.approx(1000 * 200_000 * 2e-6 + 12 * 1e-3 * 1000)
    assert b["bills"]["gemini-3.1-pro"] == pytest.approx(1000 * 200_001 * 4e-6 + 12 * 1e-3 * 1000)
    assert b["bills"]["pro"] / a["bills"]["pro"] == pytest.approx((200_001 * 1.74 + 1000 * 3.48)
                                                                  / (200_000 * 1.74 + 1000 * 3.48))
    assert not a["gemini_surcharged"] and b["gemini_surcharged"]
    # thinking bills extra output tokens on every model
    t = deploy.route(thinking=True, thinking_tokens=2000)
    assert t["output_tokens"] == 3_000_000 and t["bills"]["flash"] == pytest.approx(32 * 0.14 + 3 * 0.28)
    assert deploy.route(turns=0)["bills"]["flash"] == 0
    for kw, msg in ((dict(pro_share=1.5), "pro_share = 1.5"), (dict(turns=-1), "turns = -1"),
                    (dict(context=2.5), "context = 2.5"), (dict(thinking="yes"), "thinking = 'yes'"),
                    (dict(hard_share=True), "hard_share = True")):
        with pytest.raises(ValueError, match=re.escape(msg)):
            deploy.route(**kw)


# ----------------------------------------------------------------------------- checklist
def test_verdict_names_the_alternative_and_the_figure():
    assert deploy.verdict([])["fits"]
    keys = [c["key"] for c in deploy.conditions()]
    assert keys == ["multimodal", "geopolitical", "strict_format", "knowledge_breadth", "procurement",
                    "long_horizon", "latency"]
    expect = {"multimodal": ("Gemini 3.1 Pro or Opus 4.7", "text-only"), "geopolitical": ("", "~91 %"),
              "strict_format": ("Opus or GPT-5", "Section 5.4"), "knowledge_breadth": ("Gemini 3.1 Pro", "~18 pp"),
              "procurement": ("", "OSTP"), "long_horizon": ("", "Terminal-Bench 67.9 and SWE-Pro 55.4"),
              "latency": ("benchmark", "300 ms")}
    for k, (alt, fig) in expect.items():
        v = deploy.verdict([k])
        assert not v["fits"] and len(v["hits"]) == 1
        assert alt in v["text"] and fig in v["text"]
    assert len(deploy.verdict(keys)["hits"]) == 7
    with pytest.raises(ValueError, match="condition = 'price'"):
        deploy.verdict(["price"])


def test_unknown_cards_link_the_subfp4_experiment_only_when_it_exists(monkeypatch):
    card = {c["key"]: c for c in deploy.unknown_cards()}["sub_fp4"]
    if deploy.subfp4_experiment() is None:
        assert "planned" in card["v4lab"] and "not in this version" in card["v4lab"]
    monkeypatch.setattr(deploy, "subfp4_experiment", lambda: "v4lab experiment subfp4")
    card = {c["key"]: c for c in deploy.unknown_cards()}["sub_fp4"]
    assert card["v4lab"] == "v4lab measures it: run `v4lab experiment subfp4`"
    v5 = {c["key"]: c for c in deploy.unknown_cards()}["v5"]
    assert "speculation" in v5["text"] and "0.07" in v5["text"] and "0.87" in v5["text"]


# ----------------------------------------------------------------------------- command line
def test_cli_cost_table_and_json(capsys):
    assert cli.main(["cost"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"V4-Flash only\s+4\.76", out) and re.search(r"Opus 4\.7 only\s+185\.00", out)
    assert re.search(r"GPT-5\.5 only\s+unknown", out) and "12.4x" in out and "derived (from" in out
    assert cli.main(["cost", "--context", "256K", "--pro-share", "10%", "--thinking", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["context"] == 256_000 and r["pro_share"] == 0.1 and r["gemini_surcharged"]
    assert r["bills"]["gpt-5.5"] is None and r["price_marks"]["pro"]["input"] == "published"


@pytest.mark.parametrize("argv,msg", [
    (["cost", "--pro-share", "2"], "--pro-share = 2.0: must be a fraction"),
    (["cost", "--context", "lots"], "--context = 'lots'"),
    (["cost", "--turns", "1.5"], "--turns = '1.5': must be a whole number"),
    (["cost", "--bogus"], "unrecognized arguments"),
    (["remind"], "--ics"),
])
def test_cli_bad_input_is_one_line_exit_2(argv, msg, capsys):
    with pytest.raises(SystemExit) as e:
        rc = cli.main(argv)
        raise SystemExit(rc)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and msg in err


def test_cli_remind(tmp_path, capsys):
    f = tmp_path / "r.ics"
    assert cli.main(["remind", "--ics", str(f)]) == 0
    assert "2026-07-15" in capsys.readouterr().out and f.read_bytes().startswith(b"BEGIN:VCALENDAR\r\n")
    f.write_text("keep me")
    assert cli.main(["remind", "--ics", str(f)]) == 2
    assert "exists; pass --force" in capsys.readouterr().err and f.read_text() == "keep me"
    assert cli.main(["remind", "--ics", str(f), "--force"]) == 0 and f.read_bytes().startswith(b"BEGIN:VCALENDAR")
