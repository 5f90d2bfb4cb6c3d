"""Notebook 10's decode widget: every token of the sweep checked against the decode trace behind it (ring,
open block, entries read / stored, indexer keys, the newly closed entry, bytes vs accounting and the
baselines), the empty-row notes, the text control, the ▶ play link, bad values."""
import pytest
import torch

from v4lab import accounting, get_config
from v4lab.model import V4Model
from v4lab.trace import cache_baselines
from v4lab.viz import decode as D
from v4lab.viz import trained
from v4lab.viz.common import sweep


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    model = V4Model(get_config("lab")).eval()           # window+hash, CSA, HCA (m' = 128), CSA
    for p in model.parameters():
        p.requires_grad_(False)
    return model, trained.byte_tokenizer(), {"source": "synthetic", "synthetic": True, "description": "test"}


@pytest.fixture
def nb_model(monkeypatch, small_model):
    monkeypatch.setattr(trained, "trained_model", lambda data_dir=None: small_model)
    return small_model


def _bars(tr, y):
    """Token positions covered by a bar trace's boxes on row y: [(first, last)]."""
    out = []
    for b, w, yy in zip(tr.base or [], tr.x or [], tr.y or []):
        if yy == y:
            out.append((round(b + 0.45), round(b + 0.45 + w + 0.1) - 1))
    return sorted(out)


def _texts(fig):
    yield fig.layout.title.text
    for a in fig.layout.annotations or []:
        yield a.text
    for tr in fig.data:
        yield from (tr.hovertext or [])
        yield from (getattr(tr, "text", None) or [])


@pytest.mark.parametrize("static", [True, False])
def test_token_sweep_matches_the_trace(nb_model, static):
    model, _, _ = nb_model
    w = D.DecodeWidget(static=static)
    run = w.run
    rows = D.row_layout(run)
    y_of = {key: len(rows) - 1 - j for j, key in enumerate(rows)}
    assert run.n_tokens > 129 and [model.cfg.layer_kind(i) for i in run.layers] == ["window", "csa", "hca"]
    titles = set()
    values = w.sweep_values("token")
    assert {1, 3, 4, 8, 127, 128, 129} <= set(values)
    for t, _ in sweep(w, "token"):
        f, rec = w.fig.data, run.records[t]
        for (i, row), y in y_of.items():
            L, m = rec["layers"][i], rec["layers"][i]["ratio"]
            if row == "ring":
                assert _bars(f[0], y) == sorted((p, p) for p in L["window_slots"] if p >= 0)
            elif row == "open block":
                assert _bars(f[1], y) == [(p, p) for p in L["pending"]]
            elif row == "entries":
                read, stored = _bars(f[3], y), _bars(f[2], y)
                assert read == [(m * s, m * s + m - 1) for s in L["visible"]["compressed"]]
                assert sorted(read + stored) == [(m * s, m * s + m - 1) for s in range(L["n_visible"])]
                if L["kind"] == "hca":
                    assert stored == []                          # HCA reads every visible entry
                assert _bars(f[5], y) == ([(m * (L["n_visible"] - 1), m * L["n_visible"] - 1)]
                                          if L["new_entry"] else [])
            else:
                assert len(_bars(f[4], y)) == L["index_keys"] == (t + 1) // 4
        assert list(f[7].x) == [t, t]
        base = dict(zip(["gqa8", "v3.2_mla", "v4"], f[8].x))
        assert base == cache_baselines(model.cfg, t + 1)
        assert base["v4"] == rec["cache_bytes"] == accounting.kv_cache(model.cfg, t + 1)["total_bytes"]
        for txt in _texts(w.fig):
            assert str(txt).count("$") < 2
        titles.add(w.fig.layout.title.text)
    assert len(titles) == len(values)


def test_empty_rows_say_why(nb_model):
    w = D.DecodeWidget(static=True)
    w.on_token(1)
    notes = [a.text for a in w.fig.layout.annotations]
    assert any("first closes at token 3" in n for n in notes)             # CSA: m = 4
    assert any("first closes at token 127" in n for n in notes)           # HCA: m' = 128
    assert any("no key yet" in n for n in notes)
    w.on_token(3)                                                          # the CSA block just closed
    notes = [a.text for a in w.fig.layout.annotations]
    assert any("a block of 4 closed at token 3" in n for n in notes)
    assert not any("first closes at token 3" in n for n in notes)
    w.on_token(129)
    notes = [a.text for a in w.fig.layout.annotations]
    assert not any("first closes" in n for n in notes)


def test_text_sweep_retraces_once_and_clamps_the_token(nb_model):
    w = D.DecodeWidget(static=False)
    w.on_token(150)
    seen = {}
    for text, _ in sweep(w, "text"):
        run = D.run_text(text)
        seen[text] = run.n_tokens
        assert w.state["token"] == min(150, run.n_tokens - 1)
        assert w.controls["token"].max == run.n_tokens - 1
    assert len(set(seen.values())) > 1
    n = len(D._RUNS)
    w.on_text(list(trained.SAMPLE_TEXTS.values())[0])
    assert len(D._RUNS) == n


def test_play_button_drives_the_slider(nb_model):
    import ipywidgets as W
    w = D.DecodeWidget(static=False)
    box = w.box()
    play = w.controls["play"]
    assert isinstance(play, W.Play) and play in box.children[0].children
    assert play.max == w.controls["token"].max == w.run.n_tokens - 1
    before = w.fig.layout.title.text
    w.controls["token"].value = 5                                         # what the linked play button sets
    assert w.state["token"] == 5 and w.fig.layout.title.text != before


def test_bad_values_name_the_control(nb_model):
    w = D.DecodeWidget(static=True)
    with pytest.raises(ValueError, match="token = 99999"):
        w.on_token(99999)
    with pytest.raises(ValueError, match="token = -2"):
        w.on_token(-2)
    with pytest.raises(ValueError, match="text = ''"):
        w.on_text("")


def test_a_short_text_starts_at_its_last_token(nb_model):
    w = D.DecodeWidget(static=True, text="short text")
    assert w.state["token"] == D.run_text("short text").n_tokens - 1 < D.DEFAULT_TOKEN
