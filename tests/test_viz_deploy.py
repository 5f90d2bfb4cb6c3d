"""Notebook 11's widgets: every callback swept, each figure checked against v4lab.deploy."""
import itertools

import pytest

from v4lab import deploy
from v4lab.viz import deploy as vd
from v4lab.viz.common import sweep


def _bars(w):
    known, unknown = w.fig.data[0], w.fig.data[1]
    return dict(zip(known.y, known.x)), dict(zip(unknown.y, unknown.x))


def _dollars_ok(fig):
    """Plotly reads two $ in one string as LaTeX and hides it: at most one per text."""
    j = fig.to_plotly_json()
    texts = [j["layout"].get("title", {}).get("text", "")]
    for t in j["data"]:
        for key in ("text", "hovertext", "name"):
            v = t.get(key)
            texts += v if isinstance(v, (list, tuple)) else [v] if isinstance(v, str) else []
    return all(str(s).count("$") <= 1 for s in texts)


@pytest.mark.parametrize("static", [True, False])
def test_routing_default_reproduces_the_report(static):
    w = vd.RoutingWidget(static=static)
    known, unknown = _bars(w)
    L = deploy.STRATEGY_LABELS
    assert round(known[L["flash"]], 2) == 4.76 and round(known[L["opus-4.7"]]) == 185
    assert known[L["pro"]] / known[L["flash"]] == pytest.approx(12.43, abs=0.005)
    assert L["gpt-5.5"] not in known and unknown[L["gpt-5.5"]] == pytest.approx(30.0)   # never a $0 total
    assert "unknown" in w.fig.data[1].name and list(w.fig.data[1].text)[0].startswith("≥ ")
    title = w.fig.layout.title.text
    assert "Flash 4.76" in title and "Opus 185" in title and "12.4x" in title and "80 %" in title
    assert _dollars_ok(w.fig)


@pytest.mark.parametrize("control", ["turns", "context", "output", "pro_share", "hard_share", "thinking"])
def test_routing_sweeps(control):
    w = vd.RoutingWidget(static=True)
    seen = set()
    for _value, _ in sweep(w, control):
        s = w.state
        r = deploy.route(s["turns"], s["context"], s["output"], s["pro_share"], s["hard_share"], s["thinking"])
        known, unknown = _bars(w)
        for k in deploy.STRATEGIES:
            lab = deploy.STRATEGY_LABELS[k]
            if r["bills"][k] is None:
                assert unknown[lab] == pytest.approx(r["known_part"][k])
            else:
                assert known[lab] == pytest.approx(r["bills"][k])
        seen.add((tuple(w.fig.data[0].x), w.fig.layout.title.text))
        assert _dollars_ok(w.fig)
    assert len(seen) == len(w.sweep_values(control))          # every step changes what the learner sees


def test_routing_traps_are_named():
    w = vd.RoutingWidget(static=True)
    w.on_pro_share(0.0)
    assert "20 % of turns are hard but stay on Flash" in w.fig.layout.title.text
    w.on_pro_share(1.0)
    assert "80 % of turns go to Pro without needing it" in w.fig.layout.title.text
    w.on_pro_share(0.2)
    w.on_context(256000)
    assert "Gemini's input rate doubled" in w.fig.layout.title.text
    with pytest.raises(ValueError, match="context = 12345"):
        w.on_context(12345)
    with pytest.raises(ValueError, match="pro_share"):
        w.on_pro_share(1.2)


KEYS = [c["key"] for c in deploy.conditions()]


@pytest.mark.parametrize("static", [True, False])
def test_checklist_sweeps(static):
    w = vd.ChecklistWidget(static=static)
    assert sorted(w.control_names) == sorted(KEYS)
    assert w.fig.layout.title.text.startswith("Verdict: none of the seven applies")
    for key in KEYS:
        for _value, _ in sweep(w, key):
            table = w.fig.data[0]
            marks = list(table.cells.values[0])
            on = [w.state[k] for k in KEYS]
            assert marks == ["✗ applies" if x else "–" for x in on]
            colors = list(table.cells.fill.color[0])
            assert [c != "#ffffff" for c in colors] == on
            expected = deploy.verdict([k for k in KEYS if w.state[k]])
            if expected["fits"]:
                assert "none of the seven" in w.fig.layout.title.text
            else:
                assert f"({len(expected['hits'])} of 7 apply)" in w.fig.layout.title.text
                assert expected["hits"][0]["alternative"] in w.fig.layout.title.text
        w.on_multimodal(False)


def test_checklist_every_combination_of_two():
    w = vd.ChecklistWidget(static=True)
    for a, b in itertools.combinations(KEYS, 2):
        for k in KEYS:
            getattr(w, f"on_{k}")(k in (a, b))
        assert "(2 of 7 apply)" in w.fig.layout.title.text
        first = next(c for c in deploy.conditions() if c["key"] in (a, b))
        assert first["alternative"] in w.fig.layout.title.text
    with pytest.raises(ValueError, match="latency = 'on'"):
        w.on_latency("on")


def test_text_blocks():
    html = vd.unknown_cards_html()
    assert html.count("<b>") == 4 and "speculation" in html and "source: report" in html
    link = vd.ics_download_html()
    assert 'download="v4-migration-reminder.ics"' in link and "base64," in link
    import base64
    b64 = link.split("base64,")[1].split('"')[0]
    assert base64.b64decode(b64).startswith(b"BEGIN:VCALENDAR\r\n")
    assert vd.kilo(32000) == "32K" and vd.kilo(1000000) == "1M" and vd.kilo(250) == "250"
    assert vd.money(4.76) == "4.76" and vd.money(185.0) == "185" and vd.money(59.16) == "59.2"
