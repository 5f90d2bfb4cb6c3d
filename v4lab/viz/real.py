"""Figures and widgets for the optional "real weights" sections of the notebooks (MoE, attention, mHC, FP4,
tiny model).

Each section prints :func:`real_weights_status` and builds its figures only when a download is configured
(``$V4LAB_REAL_WEIGHTS`` or a ``path=`` argument, see ``v4lab.real``); otherwise the status line says how
to enable it. The section cells in ``notebooks/src/0{1,2,3,5,7}_*.py`` look like::

    from v4lab.viz import real as vr
    print(vr.real_weights_status())
    if vr.configured():
        vr.MhcWidget().display()

Builders follow the ``x_data(...) -> {"traces", "layout"}`` / ``build_x(...) -> go.Figure`` pattern of
``v4lab.viz.common``; each reads only the tensors it plots (a few KB to a few tens of MB), except the
streaming-forward figures, which take a ``StreamResult``. A layer argument left as ``None`` means the
first layer of the kind the figure needs in *this* download's config (so Flash, Pro and small synthetic
releases all work). The widgets (``MhcWidget``, ``ApeWidget``, ``Fp4Widget``, ``HashLoadWidget``) carry
``needs_real_weights = True``: they take ``path=`` (default ``$V4LAB_REAL_WEIGHTS``), and the registry
sweeps (``v4lab bench widgets``, the tests) hand them a download or :func:`write_demo_release`'s
synthetic one.
"""
from __future__ import annotations

from pathlib import Path

import plotly.graph_objects as go
import torch

from v4lab import real
from v4lab.config import V4Config
from v4lab.real import real_weights_status  # noqa: F401  (re-exported for notebooks)
from v4lab.viz.common import BASE_LAYOUT, Widget, check_choice, figure_from, register

SAMPLE_TEXTS = ["The quick brown fox jumps over the lazy dog.",
                "def add(a, b):\n    return a + b",
                "DeepSeek-V4 routes its first layers by token id."]


def configured(path=None) -> bool:
    """True when a usable download is configured (argument or $V4LAB_REAL_WEIGHTS)."""
    p = real.real_weights_path(path)
    if p is None:
        return False
    try:
        real.open_real(p)
    except ValueError:
        return False
    return True


def _cfg(path) -> V4Config:
    return real.open_real(path).config


# ------------------------------------------------------------------------------------------ layers by kind
def compressed_layers(cfg: V4Config) -> list[int]:
    """Main layers with a KV compressor (CSA or HCA)."""
    return [i for i in range(cfg.num_hidden_layers) if cfg.layer_kind(i) in ("csa", "hca")]


def csa_layers(cfg: V4Config) -> list[int]:
    """Main layers with an indexer (CSA)."""
    return [i for i in range(cfg.num_hidden_layers) if cfg.layer_kind(i) == "csa"]


def moe_layers(cfg: V4Config) -> list[int]:
    """Main layers whose FFN is a MoE (every V4 layer; V3's first layers are dense)."""
    return [i for i in range(cfg.num_hidden_layers) if not cfg.is_dense_layer(i)]


def hash_layers(cfg: V4Config) -> list[int]:
    return [i for i in range(cfg.num_hidden_layers) if cfg.is_hash_layer(i)]


def default_ape_layer(cfg: V4Config) -> int:
    """The first CSA layer (it has both compressors), else the first HCA layer."""
    c = csa_layers(cfg) or compressed_layers(cfg)
    if not c:
        raise ValueError(f"config {cfg.name!r}: compress_ratios = {cfg.compress_ratios}: no CSA or HCA layer, "
                         "so no compressor to show")
    return c[0]


def default_fp4_layer(cfg: V4Config) -> int:
    """The first MoE layer with a learned router (after the hash layers), else the first MoE layer."""
    m = moe_layers(cfg)
    if not m:
        raise ValueError(f"config {cfg.name!r}: no MoE layer, so no FP4 experts to show")
    return next((i for i in m if not cfg.is_hash_layer(i)), m[0])


def _layer(arg: str, value, allowed: list[int], what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value not in allowed:
        raise ValueError(f"{arg} = {value!r}: must be one of the {what} {allowed}")
    return value


def _experts(value, n: int) -> tuple[int, ...]:
    ok = isinstance(value, (list, tuple)) and len(value) > 0 and all(
        isinstance(e, int) and not isinstance(e, bool) and 0 <= e < n for e in value)
    if not ok:
        raise ValueError(f"experts = {value!r}: must be a non-empty list of expert ids in [0, {n})")
    return tuple(value)


# ------------------------------------------------------------------------------------------ mHC
MHC_SITES = ("attn", "ffn")


def mhc_data(path=None, layer: int = 0, site: str = "attn") -> dict:
    """H^res (Sinkhorn of the static bias) as a heatmap, and pre / post as bars."""
    cfg = _cfg(path)
    _layer("layer", layer, list(range(cfg.num_hidden_layers)), "layers")
    check_choice("site", site, MHC_SITES)
    v = real.mhc_static(path, layer, site)
    n = v["h_res"].shape[0]
    lab = [f"stream {i}" for i in range(n)]
    h = v["h_res"].tolist()
    return {"traces": [
        dict(type="heatmap", z=h, x=lab, y=lab, colorscale="Blues", zmin=0, zmax=1, xaxis="x", yaxis="y",
             text=[[f"{c:.3f}" for c in row] for row in h], texttemplate="%{text}", showscale=False,
             name="H^res"),
        dict(type="bar", x=lab, y=v["pre"].tolist(), name="pre (sigmoid + eps)", xaxis="x2", yaxis="y2"),
        dict(type="bar", x=lab, y=v["post"].tolist(), name="post (2 sigmoid)", xaxis="x2", yaxis="y2")],
        "layout": dict(title=f"{cfg.name} layer {layer} {site}: static mHC (input term = 0)")}


MHC_LAYOUT = dict(xaxis=dict(domain=[0, 0.45], title="from stream i"),
                  yaxis=dict(title="to stream j", autorange="reversed"),
                  xaxis2=dict(domain=[0.55, 1]), yaxis2=dict(anchor="x2", title="coefficient"))


def build_mhc(path=None, layer: int = 0, site: str = "attn") -> go.Figure:
    return figure_from(mhc_data(path, layer, site), MHC_LAYOUT)


def mhc_layers_data(path=None, site: str = "attn") -> dict:
    """Per layer: the mean diagonal of H^res (1 = streams kept apart, 1/n = fully mixed)."""
    check_choice("site", site, MHC_SITES)
    cfg = _cfg(path)
    L = cfg.num_hidden_layers
    diag = [float(real.mhc_static(path, i, site)["h_res"].diagonal().mean()) for i in range(L)]
    return {"traces": [dict(type="scatter", mode="lines+markers", x=list(range(L)), y=diag, name="mean diag H^res")],
            "layout": dict(title=f"{cfg.name}: how much each layer's static {site} mHC keeps streams apart",
                           xaxis=dict(title="layer"), yaxis=dict(title="mean diagonal", range=[0, 1]),
                           shapes=[dict(type="line", x0=0, x1=L - 1, y0=1 / cfg.hc_mult, y1=1 / cfg.hc_mult,
                                        line=dict(dash="dot", color="#999"))])}


def build_mhc_layers(path=None, site: str = "attn") -> go.Figure:
    return figure_from(mhc_layers_data(path, site), BASE_LAYOUT)


# ------------------------------------------------------------------------------------------ attention
def sinks_data(path=None) -> dict:
    s = real.attn_sinks(path)
    return {"traces": [dict(type="heatmap", z=s.tolist(), colorscale="RdBu", zmid=0, name="attn_sink",
                            colorbar=dict(title="sink logit"))],
            "layout": dict(title=f"{_cfg(path).name}: attention-sink logit per layer and head",
                           xaxis=dict(title="head"), yaxis=dict(title="layer"))}


def build_sinks(path=None) -> go.Figure:
    return figure_from(sinks_data(path), BASE_LAYOUT)


def ape_weights(path=None, layer: int | None = None, indexer: bool = False) -> torch.Tensor:
    """The pooling weights of one compressed entry when every token's score is equal: ``ape`` through the
    layer's own slot layout and softmax (``v4lab.compressor.pool_weights``). HCA: [ratio, c]. CSA and the
    indexer's compressor (overlapping): [2·ratio, c], the previous window's slots (ape[:, :c]) then the
    entry's own (ape[:, c:]), one softmax per channel over all 2·ratio of them."""
    from v4lab.compressor import pool_weights
    cfg = _cfg(path)
    layer = default_ape_layer(cfg) if layer is None else _layer("layer", layer, compressed_layers(cfg),
                                                                 "CSA/HCA layers")
    if indexer not in (False, True):
        raise ValueError(f"indexer = {indexer!r}: must be True or False")
    a = real.compressor_ape(path, layer, indexer)                     # [ratio, coff*c]
    ratio = a.shape[0]
    overlap = indexer or cfg.layer_kind(layer) == "csa"
    zeros = torch.zeros(1, 2 * ratio, a.shape[1])                     # two windows: entry 1 has a predecessor
    return pool_weights(zeros, zeros, a, ratio, overlap)[0, -1]       # [slots, c]


def ape_data(path=None, layer: int | None = None, indexer: bool = False) -> dict:
    """Heatmap of :func:`ape_weights`: slot (token position) x channel."""
    cfg = _cfg(path)
    layer = default_ape_layer(cfg) if layer is None else layer
    w = ape_weights(path, layer, indexer)
    overlap = w.shape[0] != cfg.compress_ratio(layer)
    r = cfg.compress_ratio(layer)
    own = [f"own {j}" if overlap else f"{j}" for j in range(r)]
    slots = [f"prev {j}" for j in range(r)] + own if overlap else own
    what = (f"one softmax over {2 * r} slots (previous window + own window)" if overlap
            else f"one softmax over the {r} tokens of the window")
    return {"traces": [dict(type="heatmap", z=w.tolist(), y=slots, colorscale="Viridis", name="pooling weight",
                            colorbar=dict(title="weight"))],
            "layout": dict(title=f"{cfg.name} layer {layer} ({cfg.layer_kind(layer)}){' indexer' if indexer else ''}: "
                                 f"pooling at equal scores, softmax of ape<br>{what}",
                           xaxis=dict(title="channel"),
                           yaxis=dict(title="slot (token in the window)", type="category", autorange="reversed"))}


def build_ape(path=None, layer: int | None = None, indexer: bool = False) -> go.Figure:
    return figure_from(ape_data(path, layer, indexer), BASE_LAYOUT)


# ------------------------------------------------------------------------------------------ FP4
def fp4_data(path=None, layer: int | None = None, experts=(0,)) -> dict:
    """Stored E2M1 codes (fraction per code) and E8M0 block scales (count per exponent) of ``experts``."""
    cfg = _cfg(path)
    layer = default_fp4_layer(cfg) if layer is None else _layer("layer", layer, moe_layers(cfg), "MoE layers")
    experts = _experts(experts, cfg.n_routed_experts)
    h = real.expert_fp4_histograms(path, layer, experts)
    vals = h["values"].tolist()
    codes = h["codes"].float()
    nz = (h["e8m0"] > 0).nonzero().flatten().tolist()
    lo, hi = (min(nz), max(nz)) if nz else (120, 127)
    exps = list(range(lo, hi + 1))
    return {"traces": [
        dict(type="bar", x=[f"{v:g}" + ("(-0)" if i == 8 else "") for i, v in enumerate(vals)],
             y=(codes / codes.sum()).tolist(), name="E2M1 codes", xaxis="x", yaxis="y"),
        dict(type="bar", x=[f"2^{e - 127}" for e in exps], y=[int(h["e8m0"][e]) for e in exps],
             name="E8M0 scales", xaxis="x2", yaxis="y2")],
        "layout": dict(title=f"{cfg.name} layer {layer}, experts {list(experts)}: stored FP4 codes and scales")}


FP4_LAYOUT = dict(xaxis=dict(domain=[0, 0.5], title="code value"), yaxis=dict(title="fraction"),
                  xaxis2=dict(domain=[0.58, 1], title="block scale"), yaxis2=dict(anchor="x2", title="blocks"))


def build_fp4(path=None, layer: int | None = None, experts=(0,)) -> go.Figure:
    return figure_from(fp4_data(path, layer, experts), FP4_LAYOUT)


# ------------------------------------------------------------------------------------------ MoE
def hash_load_data(path=None, text: str = SAMPLE_TEXTS[0]) -> dict:
    """One bar trace per hash layer: how often each expert is picked for the tokens of ``text``."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"text = {text!r}: must be a non-empty string")
    cfg = _cfg(path)
    if not hash_layers(cfg):
        raise ValueError(f"config {cfg.name!r}: num_hash_layers = {cfg.num_hash_layers}: no hash-routed layer")
    out = real.hash_load(path, text)
    return {"traces": [dict(type="bar", x=list(range(len(ld))), y=ld.tolist(), name=f"hash layer {i}")
                       for i, ld in out["load"].items()],
            "layout": dict(title=f"{cfg.name}: expert load of the hash layers on a {len(out['ids'])}-token text")}


HASH_LAYOUT = dict(xaxis=dict(title="expert"), yaxis=dict(title="tokens x slots"), barmode="group")


def build_hash_load(path=None, text: str = SAMPLE_TEXTS[0]) -> go.Figure:
    return figure_from(hash_load_data(path, text), HASH_LAYOUT)


# ------------------------------------------------------------------------------------------ streaming forward
def routing_data(result: real.StreamResult) -> dict:
    """Expert load per layer of a streaming forward (layers x experts)."""
    z = [r["load"].tolist() for r in result.routing]
    return {"traces": [dict(type="heatmap", z=z, colorscale="Greys", name="load", colorbar=dict(title="picks"))],
            "layout": dict(title=f"streaming forward: experts picked per layer ({len(result.ids)} tokens)",
                           xaxis=dict(title="expert"), yaxis=dict(title="layer"))}


def build_routing(result: real.StreamResult) -> go.Figure:
    return figure_from(routing_data(result), BASE_LAYOUT)


def indexer_data(result: real.StreamResult, layer: int | None = None) -> dict:
    """Which compressed entries the CSA indexer picked for each query (1 = picked). ``layer=None``: the
    first CSA layer of the forward (an empty figure saying so if the model has none)."""
    csa = sorted(result.index_selections)
    if layer is None and not csa:
        return {"traces": [dict(type="heatmap", z=[[0]], colorscale="Blues", showscale=False, name="picked")],
                "layout": dict(title="this model has no CSA layer: no indexer picks to show")}
    layer = csa[0] if layer is None else layer
    if layer not in result.index_selections:
        raise ValueError(f"layer = {layer!r}: not a CSA layer of this forward; CSA layers: {csa}")
    sel = result.index_selections[layer]                      # [S, k], -1 = none
    n = max(1, int(sel.max()) + 1)
    grid = [[0] * n for _ in range(sel.shape[0])]
    for t, row in enumerate(sel.tolist()):
        for j in row:
            if j >= 0:
                grid[t][j] = 1
    return {"traces": [dict(type="heatmap", z=grid, colorscale="Blues", showscale=False, name="picked")],
            "layout": dict(title=f"layer {layer}: compressed entries picked by the lightning indexer",
                           xaxis=dict(title="compressed entry"), yaxis=dict(title="query position"))}


def build_indexer(result: real.StreamResult, layer: int | None = None) -> go.Figure:
    return figure_from(indexer_data(result, layer), BASE_LAYOUT)


def top_tokens_text(result: real.StreamResult, tokenizer=None, k: int = 5) -> str:
    """Plain text: per position, the prompt token and the model's top-k next tokens."""
    lines = []
    for pos, cands in enumerate(result.top_tokens(k, tokenizer)):
        cur = result.tokens[pos] if result.tokens else str(result.ids[pos])
        c = ", ".join(f"{x[2] if len(x) > 2 else x[0]!s} {x[1]:.2f}" for x in cands)
        lines.append(f"{pos:>3} {cur!s:>16} -> {c}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ widgets
class RealWidget(Widget):
    """Base of the widgets that read a download. ``path``: the download (default ``$V4LAB_REAL_WEIGHTS``;
    ValueError when there is none). ``config_defaults`` fills the state keys whose default depends on the
    download's config (which layers exist); instance ``defaults`` then hold the resolved values."""

    needs_real_weights = True

    def __init__(self, static=None, path=None, **state):
        reader = real.open_real(path)
        self.path: Path = reader.path
        self.cfg: V4Config = reader.config
        self.defaults = {**type(self).defaults, **self.config_defaults()}
        super().__init__(static, **state)

    def config_defaults(self) -> dict:
        return {}


@register
class MhcWidget(RealWidget):
    """Layer slider and attn/ffn site over :func:`build_mhc`: H^res heatmap, pre and post bars."""

    name = "real.mhc"
    defaults = {"layer": 0, "site": "attn"}

    def validate(self, state):
        _layer("layer", state["layer"], list(range(self.cfg.num_hidden_layers)), "layers")
        check_choice("site", state["site"], MHC_SITES)

    def data(self):
        return mhc_data(self.path, **self.state)

    def layout(self):
        return MHC_LAYOUT

    def make_controls(self):
        import ipywidgets as W
        return {"layer": W.IntSlider(min=0, max=self.cfg.num_hidden_layers - 1, value=self.state["layer"],
                                     description="layer"),
                "site": W.ToggleButtons(options=list(MHC_SITES), value=self.state["site"], description="site")}

    def sweep_values(self, control):
        return {"layer": list(range(self.cfg.num_hidden_layers)), "site": list(MHC_SITES)}[control]

    def on_layer(self, value):
        self.set(layer=int(value))

    def on_site(self, value):
        self.set(site=value)


@register
class ApeWidget(RealWidget):
    """Layer selector over the CSA/HCA layers and a main/indexer toggle (CSA only) over :func:`build_ape`."""

    name = "real.ape"
    defaults = {"layer": None, "indexer": False}

    def config_defaults(self):
        return {"layer": default_ape_layer(self.cfg)}

    def validate(self, state):
        _layer("layer", state["layer"], compressed_layers(self.cfg), "CSA/HCA layers")
        if state["indexer"] not in (False, True):
            raise ValueError(f"indexer = {state['indexer']!r}: must be True or False")
        if state["indexer"] and self.cfg.layer_kind(state["layer"]) != "csa":
            raise ValueError(f"indexer = True: layer {state['layer']} is {self.cfg.layer_kind(state['layer'])}; "
                             "only CSA layers have an indexer")

    def data(self):
        return ape_data(self.path, **self.state)

    def make_controls(self):
        import ipywidgets as W
        kinds = {i: self.cfg.layer_kind(i) for i in compressed_layers(self.cfg)}
        return {"layer": W.Dropdown(options=[(f"{i} ({k.upper()})", i) for i, k in kinds.items()],
                                    value=self.state["layer"], description="layer"),
                "indexer": W.ToggleButtons(options=[("main", False), ("indexer", True)], value=self.state["indexer"],
                                           description="compressor", disabled=kinds[self.state["layer"]] != "csa")}

    def sweep_values(self, control):
        return {"layer": compressed_layers(self.cfg),
                "indexer": [False, True] if csa_layers(self.cfg) else [False]}[control]

    def on_layer(self, value):
        csa = self.cfg.layer_kind(int(value)) == "csa"
        self.set(layer=int(value), indexer=self.state["indexer"] and csa)   # HCA: back to the main compressor
        ctl = self.controls.get("indexer")
        if ctl is not None:
            ctl.value = self.state["indexer"]                 # its callback then sees no change
            ctl.disabled = not csa

    def on_indexer(self, value):
        if value != self.state["indexer"]:                    # on_layer's own reset of the toggle lands here
            self.set(indexer=value)


@register
class Fp4Widget(RealWidget):
    """Layer slider over the MoE layers and an expert selection over :func:`build_fp4`."""

    name = "real.fp4"
    defaults = {"layer": None, "experts": (0,)}

    def config_defaults(self):
        return {"layer": default_fp4_layer(self.cfg)}

    def validate(self, state):
        _layer("layer", state["layer"], moe_layers(self.cfg), "MoE layers")
        state["experts"] = _experts(state["experts"], self.cfg.n_routed_experts)

    def data(self):
        return fp4_data(self.path, **self.state)

    def layout(self):
        return FP4_LAYOUT

    def make_controls(self):
        import ipywidgets as W
        h = set(hash_layers(self.cfg))
        return {"layer": W.SelectionSlider(options=[(f"{i} ({'hash' if i in h else 'learned'})", i)
                                                    for i in moe_layers(self.cfg)],
                                           value=self.state["layer"], description="MoE layer"),
                "experts": W.SelectMultiple(options=list(range(self.cfg.n_routed_experts)), rows=6,
                                            value=self.state["experts"], description="experts")}

    def sweep_values(self, control):
        E = self.cfg.n_routed_experts
        return {"layer": moe_layers(self.cfg),
                "experts": [(0,), (E - 1,), tuple(range(min(4, E)))]}[control]

    def on_layer(self, value):
        self.set(layer=int(value))

    def on_experts(self, value):
        if len(value):                                        # an emptied selection keeps the last figure
            self.set(experts=tuple(int(e) for e in value))


@register
class HashLoadWidget(RealWidget):
    """A text box over :func:`build_hash_load` (needs the download's tokenizer.json)."""

    name = "real.hash_load"
    defaults = {"text": SAMPLE_TEXTS[0]}

    def validate(self, state):
        if not isinstance(state["text"], str) or not state["text"].strip():
            raise ValueError(f"text = {state['text']!r}: must be a non-empty string")

    def data(self):
        return hash_load_data(self.path, **self.state)

    def layout(self):
        return HASH_LAYOUT

    def make_controls(self):
        import ipywidgets as W
        return {"text": W.Textarea(value=self.state["text"], description="text", continuous_update=False,
                                   layout=W.Layout(width="98%", height="60px"))}

    def sweep_values(self, control):
        return {"text": SAMPLE_TEXTS}[control]

    def on_text(self, value):
        self.set(text=value)


# ------------------------------------------------------------------------------------------ a synthetic release
def write_demo_release(path, seed: int = 0) -> Path:
    """A synthetic ``tiny`` release in the official download layout (config.json, index, shards with FP4
    experts and FP8 weights, and a word-level tokenizer.json: ``w0`` ... ``w299``, unknown words -> [UNK]).
    Random weights: it exercises the real-weights code paths in seconds (tests, ``v4lab bench widgets``,
    trying the notebook sections), it shows nothing about the trained model."""
    from v4lab.checkpoint import make_synthetic_checkpoint
    from v4lab.config import get_config
    path = Path(path)
    make_synthetic_checkpoint(get_config("tiny"), path, seed=seed)
    demo_tokenizer().save(str(path / real.TOKENIZER_FILE))
    return path


def demo_tokenizer(n_words: int = 300):
    """A word-level ``tokenizers`` tokenizer: BOS, EOS, [UNK], then ``w0`` ... ``w{n_words-1}``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {"<｜begin▁of▁sentence｜>": 0, "<｜end▁of▁sentence｜>": 1, "[UNK]": 2}
    vocab.update({f"w{i}": i + 3 for i in range(n_words)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok
