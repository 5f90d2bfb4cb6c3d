"""The real-weights widgets and notebook sections (v4lab.viz.real), on a synthetic `tiny` release in the
official download layout: every callback's figure checked against v4lab.real / v4lab.compressor."""
import io
import re
from contextlib import redirect_stdout
from pathlib import Path

import plotly.graph_objects as go
import pytest
import torch

from v4lab import real
from v4lab.checkpoint import make_synthetic_checkpoint
from v4lab.compressor import compress_pool
from v4lab.config import get_config
from v4lab.viz import nbbuild
from v4lab.viz import real as vr
from v4lab.viz.common import Widget, sweep

ROOT = Path(__file__).resolve().parents[1]
MARKER = "# real-weights section"
SECTIONS = {"01_moe_expansion": {"widgets": ["real.hash_load"], "figures": 0},
            "02_compressed_attention": {"widgets": ["real.ape"], "figures": 1},
            "03_mhc": {"widgets": ["real.mhc"], "figures": 1},
            "05_fp4": {"widgets": ["real.fp4"], "figures": 0},
            "07_tiny_v4": {"widgets": [], "figures": 2}}


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return vr.write_demo_release(tmp_path_factory.mktemp("viz-real") / "V4-tiny")


@pytest.fixture(autouse=True)
def no_env(monkeypatch):
    monkeypatch.delenv(real.ENV, raising=False)          # every test says which download it uses


def z(trace) -> list:
    return [list(r) for r in trace.z]


# ------------------------------------------------------------------------------------------------ mHC
@pytest.mark.parametrize("static", [True, False])
def test_mhc_widget_follows_layer_and_site(release, static):
    w = vr.MhcWidget(static=static, path=release)
    assert w.state == {"layer": 0, "site": "attn"}
    seen = set()
    for site in ("ffn", "attn"):
        w.on_site(site)
        for layer, _ in sweep(w, "layer"):
            v = real.mhc_static(release, layer, site)
            assert z(w.fig.data[0]) == v["h_res"].tolist()
            assert list(w.fig.data[1].y) == v["pre"].tolist() and list(w.fig.data[2].y) == v["post"].tolist()
            assert f"layer {layer} {site}" in w.fig.layout.title.text
            seen.add(str(z(w.fig.data[0])))
    assert len(seen) == 2 * 6                               # every (layer, site) shows its own matrix


# ------------------------------------------------------------------------------------------------ attention
def _pooling_by_compress_pool(ape: torch.Tensor, ratio: int, overlap: bool) -> torch.Tensor:
    """The weights compress_pool applies at equal scores, read off its output with one-hot values."""
    w = ape.shape[1]
    c = w // (2 if overlap else 1)
    slots = 2 * ratio if overlap else ratio
    out = torch.zeros(slots, c)
    for s in range(slots):                                 # value 1 in slot s of entry 1, 0 elsewhere
        kv = torch.zeros(1, 2 * ratio, w)
        if overlap and s < ratio:
            kv[0, s, :c] = 1                               # window 0 feeds entry 1 through [0:c]
        elif overlap:
            kv[0, s, c:] = 1                               # window 1 (tokens ratio..) through [c:2c]
        else:
            kv[0, ratio + s] = 1
        out[s] = compress_pool(kv, torch.zeros_like(kv), ape, ratio, overlap)[0, 1]
    return out


def test_ape_pooling_equals_compress_pool_and_softmax_over_ratio_is_caught(release):
    cfg = get_config("tiny")
    for layer, indexer in [(1, False), (1, True), (2, False)]:
        ape = real.compressor_ape(release, layer, indexer)
        want = _pooling_by_compress_pool(ape, cfg.compress_ratio(layer), indexer or layer == 1)
        assert torch.allclose(vr.ape_weights(release, layer, indexer), want, atol=1e-6)
    # the earlier reading, softmax of ape over its ratio rows, is not what a CSA layer pools with
    ape = real.compressor_ape(release, 1)
    wrong = ape.softmax(0)[:, :ape.shape[1] // 2]
    assert not torch.allclose(wrong, _pooling_by_compress_pool(ape, 4, True)[:4], atol=1e-3)


@pytest.mark.parametrize("static", [True, False])
def test_ape_widget_layer_and_indexer(release, static):
    w = vr.ApeWidget(static=static, path=release)
    assert w.state == {"layer": 1, "indexer": False}       # the first CSA layer of tiny
    for layer, _ in sweep(w, "layer"):
        assert z(w.fig.data[0]) == vr.ape_weights(release, layer).tolist()
        assert len(w.fig.data[0].z) == (8 if layer in (1, 3, 5) else 128)    # CSA: 2 x 4 slots, HCA: 128
        assert f"layer {layer} (" in w.fig.layout.title.text
    w.on_layer(3)
    w.on_indexer(True)
    assert z(w.fig.data[0]) == vr.ape_weights(release, 3, indexer=True).tolist()
    assert "indexer" in w.fig.layout.title.text
    w.on_layer(4)                                          # HCA has no indexer: back to the main compressor
    assert w.state == {"layer": 4, "indexer": False}
    assert z(w.fig.data[0]) == vr.ape_weights(release, 4).tolist()
    if not static:
        assert w.controls["indexer"].value is False and w.controls["indexer"].disabled
        w.controls["layer"].value = 5                      # through the frontend's path
        assert not w.controls["indexer"].disabled
        w.controls["indexer"].value = True
        assert w.state == {"layer": 5, "indexer": True}
        assert z(w.fig.data[0]) == vr.ape_weights(release, 5, indexer=True).tolist()
    with pytest.raises(ValueError, match=r"indexer = True: layer 2 is hca"):
        vr.ApeWidget(static=True, path=release, layer=2, indexer=True)


def test_sinks_figure(release):
    f = vr.build_sinks(release)
    assert z(f.data[0]) == real.attn_sinks(release).tolist()


# ------------------------------------------------------------------------------------------------ FP4
@pytest.mark.parametrize("static", [True, False])
def test_fp4_widget_layer_and_experts(release, static):
    cfg = get_config("tiny")
    w = vr.Fp4Widget(static=static, path=release)
    assert w.state == {"layer": 2, "experts": (0,)}       # the first layer after the 2 hash layers
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    for layer, _ in sweep(w, "layer"):
        h = real.expert_fp4_histograms(release, layer, [0])
        assert list(w.fig.data[0].y) == (h["codes"].float() / per_expert).tolist()
        assert sum(w.fig.data[1].y) == per_expert // 32 and sum(w.fig.data[1].y) == int(h["e8m0"].sum())
    for experts, _ in sweep(w, "experts"):
        h = real.expert_fp4_histograms(release, 5, experts)
        assert list(w.fig.data[0].y) == (h["codes"].float() / h["codes"].sum()).tolist()
        nz = [int(h["e8m0"][e]) for e in range(256) if h["e8m0"][e] > 0]
        assert [y for y in w.fig.data[1].y if y] == nz
        assert sum(w.fig.data[1].y) == len(experts) * per_expert // 32
    before = list(w.fig.data[0].y)
    w.on_experts(())                                       # an emptied selection keeps the figure
    assert list(w.fig.data[0].y) == before
    with pytest.raises(ValueError, match=r"experts = \(8,\): must be a non-empty list of expert ids in \[0, 8\)"):
        w.on_experts((8,))


# ------------------------------------------------------------------------------------------------ MoE
@pytest.mark.parametrize("static", [True, False])
def test_hash_load_widget_follows_text(release, static):
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(release / "tokenizer.json"))
    tabs = real.hash_tables(release)
    w = vr.HashLoadWidget(static=static, path=release)
    loads = set()
    for text in ["w1 w2 w3 w1", "w200 w7", "w9"]:
        w.on_text(text)
        ids = torch.tensor(tok.encode(text).ids)
        for tr, (layer, tab) in zip(w.fig.data, sorted(tabs.items())):
            assert tr.name == f"hash layer {layer}"
            assert list(tr.y) == torch.bincount(tab[ids].reshape(-1), minlength=8).tolist()
            assert sum(tr.y) == len(ids) * get_config("tiny").num_experts_per_tok
        loads.add(str([list(t.y) for t in w.fig.data]))
    assert len(loads) == 3
    with pytest.raises(ValueError, match=r"text = '  ': must be a non-empty string"):
        w.on_text("  ")


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("make,match", [
    (lambda p: vr.MhcWidget(static=True, path=p, layer=6),
     r"layer = 6: must be one of the layers \[0, 1, 2, 3, 4, 5\]"),
    (lambda p: vr.MhcWidget(static=True, path=p).on_layer(-1), r"layer = -1: must be one of the layers"),
    (lambda p: vr.MhcWidget(static=True, path=p, site="mlp"), r"site = 'mlp': must be one of"),
    (lambda p: vr.ApeWidget(static=True, path=p, layer=0),
     r"layer = 0: must be one of the CSA/HCA layers \[1, 2, 3, 4, 5\]"),
    (lambda p: vr.Fp4Widget(static=True, path=p, layer="3"), r"layer = '3': must be one of the MoE layers"),
    (lambda p: vr.Fp4Widget(static=True, path=p).on_layer(9), r"layer = 9: must be one of the MoE layers"),
    (lambda p: vr.build_mhc(p, layer=True), r"layer = True: must be one of the layers"),
    (lambda p: vr.build_ape(p, layer=0), r"layer = 0: must be one of the CSA/HCA layers"),
    (lambda p: vr.build_fp4(p, layer=7), r"layer = 7: must be one of the MoE layers"),
    (lambda p: vr.MhcWidget(static=True, path=p, heads=2), r"unknown state key 'heads'"),
])
def test_bad_values_name_key_value_and_rule(release, make, match):
    with pytest.raises(ValueError, match=match):
        make(release)


def test_unconfigured_status_and_widgets():
    assert not vr.configured()
    msg = vr.real_weights_status()
    assert msg.startswith("No real V4 download configured ($V4LAB_REAL_WEIGHTS is not set).")
    for part in ("V4LAB_REAL_WEIGHTS=/path/to/it before starting Jupyter", "path=...", "tokenizer.json",
                 "model.safetensors.index.json", "Hugging Face"):
        assert part in msg, part
    for cls in (vr.MhcWidget, vr.ApeWidget, vr.Fp4Widget, vr.HashLoadWidget):
        assert cls.needs_real_weights
        with pytest.raises(ValueError, match="V4LAB_REAL_WEIGHTS is not set"):
            cls(static=True)


def test_env_var_configures_widgets(release, monkeypatch):
    monkeypatch.setenv(real.ENV, str(release))
    assert vr.configured() and vr.real_weights_status().startswith("Real weights:")
    assert vr.MhcWidget(static=True).path == release


# ------------------------------------------------------------------------------------------------ other configs
def test_defaults_follow_the_config(tmp_path):
    """A Pro-like layout (HCA first, no CSA before layer 2) and no hash layers: the defaults move with it."""
    cfg = get_config("tiny").replace(compress_ratios=[128, 128, 4, 128, 0, 0, 0], num_hash_layers=0)
    d = make_synthetic_checkpoint(cfg, tmp_path / "pro-like", seed=1)
    assert vr.ApeWidget(static=True, path=d).state["layer"] == 2
    assert vr.Fp4Widget(static=True, path=d).state["layer"] == 0
    assert vr.MhcWidget(static=True, path=d).state["layer"] == 0
    assert z(vr.ApeWidget(static=True, path=d).fig.data[0]) == vr.ape_weights(d, 2).tolist()
    with pytest.raises(ValueError, match="num_hash_layers = 0: no hash-routed layer"):
        vr.build_hash_load(d)
    no_csa = get_config("tiny").replace(compress_ratios=[0, 128, 0, 128, 0, 0, 0], num_hash_layers=1)
    assert vr.default_ape_layer(no_csa) == 1 and vr.csa_layers(no_csa) == []
    none = get_config("tiny").replace(compress_ratios=[0] * 7)
    with pytest.raises(ValueError, match="no CSA or HCA layer"):
        vr.default_ape_layer(none)
    empty = real.StreamResult(ids=[0], tokens=None, logits=torch.zeros(1, 1, 4), routing=[])
    assert "no CSA layer" in vr.build_indexer(empty).layout.title.text


# ------------------------------------------------------------------------------------------------ bench
def test_bench_finds_weights_for_the_real_widgets(release, tmp_path, monkeypatch, capsys):
    from v4lab.bench import widgets as bw
    path, name = bw._real_weights(tmp_path)
    assert name == "synthetic tiny" and (path / "tokenizer.json").is_file() and vr.configured(path)
    assert "no real V4 download configured" in capsys.readouterr().err
    monkeypatch.setenv(real.ENV, str(release))
    assert bw._real_weights(tmp_path) == (release, "V4-tiny")


# ------------------------------------------------------------------------------------------------ notebooks
def section_cell(stem: str) -> str:
    cells = [src for kind, src in nbbuild.parse_cells((ROOT / "notebooks" / "src" / f"{stem}.py").read_text())
             if kind == "code" and src.startswith(MARKER)]
    assert len(cells) == 1, f"{stem}: expected one code cell starting with {MARKER!r}"
    return cells[0]


def run_cell(src: str, monkeypatch) -> tuple[str, list, list]:
    shown, displayed = [], []
    monkeypatch.setattr(go.Figure, "show", lambda self, *a, **k: shown.append(self))
    monkeypatch.setattr(Widget, "display", lambda self: displayed.append(self))
    out = io.StringIO()
    with redirect_stdout(out):
        exec(compile(src, "<section>", "exec"), {})
    return out.getvalue(), shown, displayed


@pytest.mark.parametrize("stem", sorted(SECTIONS))
def test_notebook_section_runs(stem, release, monkeypatch):
    src = section_cell(stem)
    assert not re.search(r"\b(for|while|def|class)\b", src), "no logic in notebooks: imports and calls"
    md = [m for kind, m in nbbuild.parse_cells((ROOT / "notebooks" / "src" / f"{stem}.py").read_text())
          if kind == "markdown" and m.startswith("## Optional: the same on real V4 weights")]
    assert len(md) == 1 and "V4LAB_REAL_WEIGHTS=/path/to/download" in md[0] and "path=..." in md[0]

    out, shown, displayed = run_cell(src, monkeypatch)               # not configured: status only
    assert out.startswith("No real V4 download configured") and "V4LAB_REAL_WEIGHTS" in out
    assert shown == [] and displayed == []

    monkeypatch.setenv(real.ENV, str(release))                        # configured: every figure built
    out, shown, displayed = run_cell(src, monkeypatch)
    assert out.startswith(f"Real weights: {str(release)!r} (V4-tiny, 6 layers")
    assert [w.name for w in displayed] == SECTIONS[stem]["widgets"]
    assert all(w.path == release for w in displayed)
    assert len(shown) == SECTIONS[stem]["figures"]
    if stem == "07_tiny_v4":
        routing, picks = shown
        assert len(routing.data[0].z) == 6 and "layer 1:" in picks.layout.title.text   # first CSA layer
        assert len(out.strip().splitlines()) == 1 + 6                # status + one line per prompt token
