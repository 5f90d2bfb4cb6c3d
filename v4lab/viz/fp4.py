"""Notebook 05: FP4 as V4 stores it — E2M1 values, E8M0 scales, nibble packing, error, FP4 → FP8.

Text helpers print the formats from ``v4lab.quant`` (nothing is re-derived here), and two widgets on the
pattern of :mod:`v4lab.viz.common`:

* :class:`BlockErrorWidget` — SQNR of MXFP4 (E2M1 + one power-of-two scale per block) and of FP8 E4M3 with
  the same per-block scales, against the block size, on Gaussian or heavy-tailed weights; and one block
  before/after rounding.
* :class:`LosslessWidget` — the FP4 → FP8 re-expression (``quant.fp4_to_fp8``) of a 128×128 block whose 512
  MXFP4 sub-scales span 2^spread: exact up to a spread of 2^14, lossy beyond.

Everything expensive is computed once per process (module-level caches), so callbacks only look up.
"""
from __future__ import annotations

import contextlib
import math
from functools import lru_cache
from pathlib import Path

import torch

from v4lab import quant as Q
from v4lab.checkpoint import shards_fingerprint
from v4lab.viz.common import Widget, check_choice, figure_from, register, stored_result


# ------------------------------------------------------------------------------------ formats as text
def e2m1_table() -> str:
    """Every E2M1 code: its bits (sign, two exponent bits, one mantissa bit) and value (``quant.e2m1_decode``)."""
    vals = Q.e2m1_decode(torch.arange(16, dtype=torch.uint8)).tolist()
    lines = ["code  s e1e0 m   value"]
    for c, v in enumerate(vals):
        b = f"{c:04b}"
        lines.append(f"{c:>4}  {b[0]} {b[1:3]}   {b[3]}  {v:>6g}")
    return "\n".join(lines)


def nibble_demo(values=(0.5, 1.0, 1.5, -2.0)) -> str:
    """Encode ``values`` to E2M1 codes, pack two per byte (element 2j low nibble), and decode the bytes back."""
    v = torch.tensor(values, dtype=torch.float32)
    codes = Q.e2m1_encode(v)
    packed = Q.pack_fp4(codes)
    back = Q.decode_fp4_bytes(packed)
    lines = ["values " + ", ".join(f"{x:g}" for x in values),
             "codes  " + ", ".join(f"{int(c)} (0x{int(c):X})" for c in codes),
             "bytes  " + ", ".join(f"0x{int(b):02X}" for b in packed) + "   (element 2j = low nibble)",
             "decode " + ", ".join(f"{x:g}" for x in back.tolist())]
    return "\n".join(lines)


E8M0_EXAMPLES = (0, 1, 120, 126, 127, 128, 133, 254, 255)


def e8m0_table(bytes_=E8M0_EXAMPLES) -> str:
    """E8M0 bytes → scales (``quant.e8m0_to_float``): 2^(e−127), 255 = NaN."""
    s = Q.e8m0_to_float(torch.tensor(bytes_, dtype=torch.uint8)).tolist()
    return "\n".join(f"byte {b:>3} (0x{b:02X}) -> 2^{b - 127:<4} = {x:.6g}" if b != 255 else
                     f"byte {b:>3} (0x{b:02X}) -> NaN" for b, x in zip(bytes_, s))


# ------------------------------------------------------------------------------------ error vs block size
DISTS = {"gaussian": "Gaussian", "student3": "heavy-tailed (Student-t, ν = 3)",
         "outliers": "Gaussian + 0.1% outliers ×30"}
BLOCKS = [8, 16, 32, 64, 128, 256, 1024]
ROWS, COLS = 8, 4096
FMT_COLORS = {"fp4": "#d62728", "fp8": "#1f77b4"}


@lru_cache(maxsize=len(DISTS))
def weights(dist: str) -> torch.Tensor:
    """A seeded [8, 4096] weight matrix of the given distribution (unit-ish scale)."""
    check_choice("dist", dist, DISTS)
    g = torch.Generator().manual_seed(0)
    if dist == "gaussian":
        return torch.randn(ROWS, COLS, generator=g)
    if dist == "student3":
        z = torch.randn(ROWS, COLS, generator=g)
        chi2 = torch.randn(3, ROWS, COLS, generator=g).pow(2).sum(0)
        return z / (chi2 / 3).sqrt()
    w = torch.randn(ROWS, COLS, generator=g)
    mask = torch.rand(ROWS, COLS, generator=g) < 1e-3
    return torch.where(mask, 30 * w, w)


@lru_cache(maxsize=len(DISTS) * len(BLOCKS))
def quantised(dist: str, block: int) -> dict:
    """MXFP4 and FP8 (both with per-block power-of-two scales) fake-quant of ``weights(dist)`` and their SQNR."""
    check_choice("block", block, BLOCKS)
    w = weights(dist)
    fp4 = Q.fp4_fake_quant(w, block)              # E2M1, scale 2^ceil(log2(amax/6)) per 1×block
    fp8 = Q.act_quant_fp8(w, block)               # E4M3, scale 2^ceil(log2(amax/448)) per 1×block
    return {"fp4": fp4, "fp8": fp8, "sqnr_fp4": Q.sqnr_db(w, fp4), "sqnr_fp8": Q.sqnr_db(w, fp8),
            "zero_fp4": float(((fp4 == 0) & (w != 0)).float().mean())}


def sqnr_table(dist: str = "gaussian") -> str:
    lines = [f"{DISTS[dist]}: SQNR in dB (higher is better)", f"{'block':>6} {'MXFP4':>7} {'FP8':>7} {'FP4 zeros':>10}"]
    for b in BLOCKS:
        r = quantised(dist, b)
        lines.append(f"{b:>6} {r['sqnr_fp4']:>7.2f} {r['sqnr_fp8']:>7.2f} {100 * r['zero_fp4']:>9.2f}%")
    return "\n".join(lines)


def _worst_block(dist: str, block: int) -> int:
    """Index (in row 0) of the block with the largest amax: where the scale hurts most."""
    w = weights(dist)[0].view(-1, block)
    return int(w.abs().amax(-1).argmax())


def block_error_data(dist: str = "gaussian", block: int = 32) -> dict:
    """Traces: SQNR lines (FP4, FP8), the points at ``block``, one block before and after FP4 rounding."""
    check_choice("dist", dist, DISTS)
    check_choice("block", block, BLOCKS)
    rows = {b: quantised(dist, b) for b in BLOCKS}
    traces = [dict(type="scatter", mode="lines+markers", x=BLOCKS, y=[rows[b][f"sqnr_{f}"] for b in BLOCKS],
                   name=lab, line=dict(color=FMT_COLORS[f]), xaxis="x", yaxis="y")
              for f, lab in (("fp4", "MXFP4 (E2M1)"), ("fp8", "FP8 (E4M3)"))]
    cur = rows[block]
    traces.append(dict(type="scatter", mode="markers", x=[block, block], y=[cur["sqnr_fp4"], cur["sqnr_fp8"]],
                       marker=dict(size=13, symbol="circle-open", line=dict(width=3),
                                   color=[FMT_COLORS["fp4"], FMT_COLORS["fp8"]]),
                       showlegend=False, name="now", xaxis="x", yaxis="y"))
    k = _worst_block(dist, block)
    sl = slice(k * block, (k + 1) * block)
    w = weights(dist)[0, sl]
    q = cur["fp4"][0, sl]
    idx = list(range(block))
    traces.append(dict(type="scatter", mode="markers", x=idx, y=w.tolist(), name="weight",
                       marker=dict(color="#7f7f7f", size=5), xaxis="x2", yaxis="y2"))
    traces.append(dict(type="scatter", mode="markers", x=idx, y=q.tolist(), name="after MXFP4",
                       marker=dict(color=FMT_COLORS["fp4"], size=6, symbol="x"), xaxis="x2", yaxis="y2"))
    amax = float(w.abs().max())
    scale = float(Q.pow2_scale(torch.tensor(amax), Q.FP4_MAX, Q.FP4_AMAX_FLOOR))
    # one layout property per update (each one costs plotly validation time in a callback)
    title = (f"{DISTS[dist]}, block {block}: MXFP4 {cur['sqnr_fp4']:.1f} dB, FP8 {cur['sqnr_fp8']:.1f} dB; "
             f"{100 * cur['zero_fp4']:.1f}% of weights become 0 in FP4<br>right: row 0, block {k} (largest amax "
             f"{amax:.3g}), scale 2^{round(math.log2(scale))}, steps of {0.5 * scale:.3g} near 0")
    return {"traces": traces, "layout": {"title": {"text": title, "font": {"size": 13}}}}


BLOCK_LAYOUT = dict(
    height=430, margin=dict(l=60, r=20, t=90, b=50),
    xaxis=dict(domain=[0, 0.45], type="log", title="block size (elements per scale)", tickvals=BLOCKS,
               ticktext=[str(b) for b in BLOCKS]),
    yaxis=dict(title="SQNR (dB)"),
    xaxis2=dict(domain=[0.56, 1], title="element in the block", anchor="y2"),
    yaxis2=dict(title="value", anchor="x2"),
)


def build_block_error(dist: str = "gaussian", block: int = 32):
    """SQNR vs block size for MXFP4 and FP8, and one block before/after rounding (static figure)."""
    return figure_from(block_error_data(dist, block), BLOCK_LAYOUT)


@register
class BlockErrorWidget(Widget):
    """Controls: the weight distribution and the block size, over :func:`build_block_error`."""

    name = "fp4.block_error"
    defaults = {"dist": "gaussian", "block": 32}

    def __init__(self, static=None, **state):
        for d in DISTS:                      # 42 fake-quants of 32K weights up front (~1 s)
            for b in BLOCKS:
                quantised(d, b)
        super().__init__(static, **state)

    def validate(self, state):
        check_choice("dist", state["dist"], DISTS)
        check_choice("block", state["block"], BLOCKS)

    def data(self):
        return block_error_data(**self.state)

    def layout(self):
        return BLOCK_LAYOUT

    def make_controls(self):
        import ipywidgets as W
        return {"dist": W.Dropdown(options=[(v, k) for k, v in DISTS.items()], value=self.state["dist"],
                                   description="weights", layout=W.Layout(width="360px")),
                "block": W.SelectionSlider(options=BLOCKS, value=self.state["block"], description="block")}

    def sweep_values(self, control):
        return {"dist": list(DISTS), "block": BLOCKS}[control]

    def on_dist(self, value):
        self.set(dist=value)

    def on_block(self, value):
        self.set(block=int(value))


# ------------------------------------------------------------------------------------ lossless FP4 -> FP8
SPREADS = list(range(0, 21))
LOSSLESS_MAX = 14                                  # the spec's condition: spread <= 2^14


@lru_cache(maxsize=len(SPREADS))
def conversion(spread: int) -> dict:
    """One 128×128 MXFP4 block (random codes) whose 512 sub-scales span exponents 127 − spread … 127,
    converted with ``quant.fp4_to_fp8(check=False)`` and decoded back: what changed, by sub-scale offset."""
    check_choice("spread", spread, SPREADS)
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (128, 128), generator=g, dtype=torch.uint8)
    offs = torch.round(torch.linspace(0, spread, 512)).to(torch.int32).view(128, 4)   # emax − e per sub-block
    scales = (127 - offs).to(torch.uint8)
    packed = Q.pack_fp4(codes)
    fp4 = Q.mxfp4_dequantize(packed, scales)
    q8, s8 = Q.fp4_to_fp8(packed, scales, check=False)
    back = Q.fp8_block_dequantize(q8, s8)
    nz = fp4 != 0
    changed = (back != fp4) & nz
    off_el = offs.repeat_interleave(32, 1)
    per_off = []
    for k in range(spread + 1):
        m = (off_el == k) & nz
        per_off.append(1.0 - float(changed[m].float().mean()) if bool(m.any()) else 1.0)
    rel = ((back - fp4).abs() / fp4.abs().clamp(min=1e-30))[nz]
    try:
        Q.fp4_to_fp8(packed, scales, check=True)
        refused = False
    except ValueError:
        refused = True
    return {"changed": int(changed.sum()), "nonzero": int(nz.sum()), "max_rel_err": float(rel.max()),
            "exact_by_offset": per_off, "measured_spread": int(Q.fp4_to_fp8_spread(scales).max()),
            "refused_by_check": refused}


def lossless_table(spreads=(0, 8, 13, 14, 15, 16, 20)) -> str:
    lines = [f"{'spread':>8} {'changed':>8} {'of':>6} {'max rel err':>11}  check=True"]
    for s in spreads:
        c = conversion(s)
        lines.append(f"{'2^' + str(s):>8} {c['changed']:>8} {c['nonzero']:>6} {c['max_rel_err']:>11.3g}  "
                     f"{'refuses' if c['refused_by_check'] else 'converts'}")
    return "\n".join(lines)


def lossless_data(spread: int = 14) -> dict:
    """Traces: values changed vs spread (line), the point at ``spread``, exact fraction by sub-scale offset."""
    check_choice("spread", spread, SPREADS)
    rows = [conversion(s) for s in SPREADS]
    cur = conversion(spread)
    offs = list(range(spread + 1))
    traces = [
        dict(type="scatter", mode="lines+markers", x=SPREADS, y=[r["changed"] for r in rows],
             name="values changed", line=dict(color="#d62728"), xaxis="x", yaxis="y"),
        dict(type="scatter", mode="markers", x=[spread], y=[cur["changed"]], showlegend=False, name="now",
             marker=dict(size=14, symbol="circle-open", color="#d62728", line=dict(width=3)), xaxis="x", yaxis="y"),
        dict(type="bar", x=offs, y=cur["exact_by_offset"], name="exact fraction",
             marker=dict(color=["#2ca02c" if o <= LOSSLESS_MAX else "#d62728" for o in offs]), xaxis="x2", yaxis="y2"),
    ]
    verdict = "lossless" if cur["changed"] == 0 else f"lossy: {cur['changed']} of {cur['nonzero']} values changed"
    title = (f"sub-scale spread 2^{spread} in one 128×128 block → FP8 E4M3, one E8M0 scale: {verdict}"
             f"{'<br>(quant.fp4_to_fp8 refuses it unless check=False)' if cur['refused_by_check'] else ''}")
    shapes = [dict(type="line", xref="x", yref="y domain", x0=LOSSLESS_MAX + 0.5, x1=LOSSLESS_MAX + 0.5, y0=0, y1=1,
                   line=dict(color="#888", dash="dash", width=1))]
    return {"traces": traces, "layout": {"title": {"text": title, "font": {"size": 13}}, "shapes": shapes}}


LOSSLESS_LAYOUT = dict(
    height=410, showlegend=False, margin=dict(l=60, r=20, t=70, b=50),
    xaxis=dict(domain=[0, 0.45], title="log2 of the sub-scale spread in the block", dtick=2),
    yaxis=dict(title="values changed (of 14.3K non-zero)"),
    xaxis2=dict(domain=[0.56, 1], title="sub-block's scale below the block's largest (log2)", anchor="y2"),
    yaxis2=dict(title="fraction of its values kept exactly", range=[0, 1.05], anchor="x2"),
)


def build_lossless(spread: int = 14):
    """The lossless FP4 → FP8 condition (static figure)."""
    return figure_from(lossless_data(spread), LOSSLESS_LAYOUT)


@register
class LosslessWidget(Widget):
    """A sub-scale spread slider (2^0 … 2^20) over :func:`build_lossless`."""

    name = "fp4.lossless"
    defaults = {"spread": 14}

    def __init__(self, static=None, **state):
        for s in SPREADS:
            conversion(s)
        super().__init__(static, **state)

    def validate(self, state):
        check_choice("spread", state["spread"], SPREADS)

    def data(self):
        return lossless_data(**self.state)

    def layout(self):
        return LOSSLESS_LAYOUT

    def make_controls(self):
        import ipywidgets as W
        return {"spread": W.IntSlider(min=SPREADS[0], max=SPREADS[-1], value=self.state["spread"],
                                      description="spread 2^")}

    def sweep_values(self, control):
        return {"spread": SPREADS}[control]

    def on_spread(self, value):
        self.set(spread=int(value))


# ------------------------------------------------------------------------------------ the QAT experiment
QAT_CACHE = Path(__file__).resolve().parent / "data" / "qat_run.json"
HELDOUT_LABELS = {"bf16": "BF16 experts (as trained)", "bf16_rounded_after": "BF16, rounded to FP4 after training",
                  "qat_fp4": "QAT, FP4 experts (as shipped)", "qat_unrounded": "QAT, experts not rounded"}


def qat_result(recompute: bool = False, **kwargs) -> dict:
    """``v4lab.experiments.qat.run`` with its defaults (a micro V4 trained twice: BF16 vs FP4-QAT experts).

    Minutes on 2 CPU cores, so the result is stored in ``v4lab/viz/data/qat_run.json``; ``recompute=True``
    (or any keyword for ``run``) runs it again, and with the defaults refreshes the file."""
    from v4lab.experiments import qat
    return stored_result(QAT_CACHE, qat.run, recompute, digits=None, **kwargs)


def qat_table(result: dict | None = None) -> str:
    r = qat_result() if result is None else result
    h = r["heldout"]
    lines = [f"held-out loss after {r['config']['steps']} steps (seed {r['config']['seed']}):"]
    lines += [f"  {HELDOUT_LABELS[k]:<38} {h[k]:.4f}" for k in HELDOUT_LABELS]
    lines.append(f"cost of FP4 without QAT (rounded after training): {r['gap_ptq']:+.4f}")
    lines.append(f"cost of FP4 with QAT:                             {r['gap_qat']:+.4f}")
    s = r["weight_sqnr_db"]
    lines.append(f"expert weights' SQNR under MXFP4: BF16-trained {s['bf16']:.2f} dB, QAT-trained {s['qat']:.2f} dB")
    return "\n".join(lines)


def build_qat(result: dict | None = None):
    """Training loss of both runs, and the four held-out losses (static figure)."""
    r = qat_result() if result is None else result
    traces = [dict(type="scatter", mode="lines", x=r["step"], y=r[k]["loss"], name=lab, line=dict(color=c))
              for k, lab, c in (("bf16", "BF16 experts", "#1f77b4"), ("qat", "FP4 QAT experts", "#d62728"))]
    h = r["heldout"]
    # the four losses agree to ~0.01 nats: an axis of losses would have to start near 5.06 and make that
    # look large, so the bars show each one's difference to the BF16 model as trained, from 0
    diff = [h[k] - h["bf16"] for k in HELDOUT_LABELS]
    traces.append(dict(type="bar", x=[HELDOUT_LABELS[k] for k in HELDOUT_LABELS], y=diff,
                       marker=dict(color=["#1f77b4", "#9ecae1", "#d62728", "#fcbba1"]), showlegend=False,
                       text=[f"{d:+.3f}" for d in diff], textposition="outside", xaxis="x2", yaxis="y2",
                       hovertext=[f"held-out loss {h[k]:.4f}" for k in HELDOUT_LABELS]))
    span = max(0.02, 1.3 * max(abs(d) for d in diff))
    layout = dict(height=470, margin=dict(l=60, r=20, t=100, b=110),
                  title={"text": f"QAT vs BF16 experts: rounding after training costs {r['gap_ptq']:+.3f} nats, "
                                 f"QAT {r['gap_qat']:+.3f}<br>held-out losses {min(h.values()):.3f}…"
                                 f"{max(h.values()):.3f} nats (right: each minus BF16 as trained)",
                         "font": {"size": 13}},
                  xaxis=dict(domain=[0, 0.45], title="step"), yaxis=dict(title="training loss (nats)"),
                  xaxis2=dict(domain=[0.55, 1], anchor="y2", tickangle=-20),
                  yaxis2=dict(title="held-out loss − BF16 (nats)", anchor="x2", range=[-span, span],
                              zeroline=True))
    return figure_from({"traces": traces}, layout)


# ------------------------------------------------------------------------------------ the trained model's FP4 experts
MATRICES = {"w1": "w1 (gate)", "w3": "w3 (up)", "w2": "w2 (down)"}
CODE_ORDER = [15, 14, 13, 12, 11, 10, 9, 8, 0, 1, 2, 3, 4, 5, 6, 7]        # E2M1 codes by value, −6 … −0, +0 … 6
COARSE_BLOCK = 128                     # the "what if": one scale per 128 weights instead of 32
LOSS_TOKENS = 1024
MASTERS_FILE = Path(__file__).resolve().parent / "data" / "lab_fp4_masters.json"


def coarse_round(w: torch.Tensor, block: int = COARSE_BLOCK) -> torch.Tensor:
    """``quant.fp4_fake_quant`` with one scale per ``block`` weights along each row; a row whose length is not
    a multiple of ``block`` is padded with zeros for the rounding (a zero never raises a block's amax)."""
    pad = (-w.shape[-1]) % block
    wp = torch.nn.functional.pad(w, (0, pad)) if pad else w
    return Q.fp4_fake_quant(wp, block)[..., :w.shape[-1]]


def _expert_name(cfg, layer: int, expert: int, matrix: str) -> str:
    from v4lab.checkpoint import layer_prefix
    return f"{layer_prefix(cfg, layer)}ffn.experts.{expert}.{matrix}"


class ExpertFP4:
    """The routed experts exactly as the checkpoint stores them (``v4lab.checkpoint.CheckpointReader``: packed
    E2M1 nibbles + one E8M0 byte per 32 weights), per block (layers, then MTP), expert and matrix: the count of
    each of the 16 codes, the count of each scale exponent, and per expert the SQNR of one more rounding onto
    MXFP4 with one scale per COARSE_BLOCK weights (the stored weights as the reference)."""

    def __init__(self, path):
        from v4lab.checkpoint import CheckpointReader
        r = CheckpointReader(path)
        self.path, self.cfg = Path(path), r.config
        self.E = self.cfg.n_routed_experts
        self.layers = list(range(self.cfg.num_hidden_layers + self.cfg.num_nextn_predict_layers))
        self.codes, self.exps, self.coarse_db = {}, {}, {}
        for layer in self.layers:
            sq = []
            for e in range(self.E):
                sig = err = 0.0
                for m in MATRICES:
                    name = _expert_name(self.cfg, layer, e, m)
                    packed, scale = r.get(name + ".weight"), r.get(name + ".scale").view(torch.uint8)
                    self.codes[layer, e, m] = torch.bincount(Q.unpack_fp4(packed.view(torch.uint8)).flatten().long(),
                                                             minlength=16)
                    self.exps[layer, e, m] = scale.flatten().long() - 127
                    w = Q.mxfp4_dequantize(packed.view(torch.uint8), scale)
                    sig += float(w.double().square().sum())
                    err += float((coarse_round(w) - w).double().square().sum())
                sq.append(10 * math.log10(sig / err) if err > 0 else float("inf"))
            self.coarse_db[layer] = sq


_EXPERT_FP4: dict = {}


def expert_fp4(path=None) -> ExpertFP4:
    """:class:`ExpertFP4` of the notebook model's checkpoint (cached per directory)."""
    if path is None:
        from v4lab.viz import trained
        path = trained.trained_model()[2]["path"]
    key = str(Path(path).resolve())
    if key not in _EXPERT_FP4:
        _EXPERT_FP4[key] = ExpertFP4(path)
    return _EXPERT_FP4[key]


def masters_result(path, stored: Path = MASTERS_FILE) -> dict | None:
    """The stored comparison with the fp32 master weights (:func:`measure_masters`), when it was measured on
    exactly these shards (same fingerprint); else None."""
    import json
    if not Path(stored).is_file():
        return None
    res = json.loads(Path(stored).read_text())
    return res if res.get("fingerprint") == shards_fingerprint(path) else None


def _block_label(cfg, layer: int) -> str:
    return f"MTP {layer}" if layer >= cfg.num_hidden_layers else f"layer {layer}"


def expert_codes_data(ef: ExpertFP4, layer: int, expert: int = 0, matrix: str = "w1", masters: dict | None = None) -> dict:
    """Traces (fixed count 5): the 16 E2M1 codes of one expert matrix (by value), its scale exponents, each
    expert's SQNR under coarser scales, the masters' SQNR (when measured) and a marker on the chosen expert."""
    check_choice("layer", layer, ef.layers)
    if isinstance(expert, bool) or not isinstance(expert, int) or not 0 <= expert < ef.E:
        raise ValueError(f"expert = {expert!r}: must be an integer in [0, {ef.E - 1}]")
    check_choice("matrix", matrix, MATRICES)
    c = ef.codes[layer, expert, matrix]
    vals = Q.e2m1_decode(torch.tensor(CODE_ORDER, dtype=torch.uint8)).tolist()
    xlab = [("−0" if code == 8 else f"{v:+g}") for code, v in zip(CODE_ORDER, vals)]
    counts = [int(c[k]) for k in CODE_ORDER]
    n = sum(counts)
    colors = ["#9e9e9e" if abs(v) == 0 else "#d62728" if abs(v) == Q.FP4_MAX else "#1f77b4" for v in vals]
    ex = ef.exps[layer, expert, matrix]
    lo, hi = int(ex.min()), int(ex.max())
    xs = list(range(lo, hi + 1))
    ecount = torch.bincount(ex - lo, minlength=hi - lo + 1).tolist()
    from v4lab.viz.moe import expert_colors
    cols = expert_colors(ef.E)
    sq = ef.coarse_db[layer]
    mdb = (masters or {}).get("sqnr_db", {}).get(str(layer))
    traces = [
        dict(type="bar", x=xlab, y=counts, marker=dict(color=colors), name="codes", showlegend=False,
             customdata=CODE_ORDER, hovertemplate="value %{x} (code %{customdata}): %{y} weights<extra></extra>",
             xaxis="x", yaxis="y"),
        dict(type="bar", x=xs, y=ecount, marker=dict(color="#7f7f7f"), name="scales", showlegend=False,
             hovertemplate="scale 2^%{x}: %{y} blocks of 32<extra></extra>", xaxis="x2", yaxis="y2"),
        dict(type="bar", x=list(range(ef.E)), y=sq, marker=dict(color=cols),
             name=f"SQNR of the stored FP4 weights re-rounded with one scale per {COARSE_BLOCK}", xaxis="x3",
             yaxis="y3"),
        dict(type="scatter", mode="markers", x=list(range(ef.E)) if mdb else [], y=mdb or [],
             name="fp32 masters → stored FP4: SQNR", marker=dict(symbol="diamond", size=10, color="#000"),
             xaxis="x3", yaxis="y3"),
        dict(type="scatter", mode="markers", x=[expert], y=[sq[expert]], showlegend=False, name="this expert",
             marker=dict(symbol="triangle-down", size=14, color="#000"), xaxis="x3", yaxis="y3"),
    ]
    zero = counts[7] + counts[8]
    sat = counts[0] + counts[-1]
    title = (f"{_block_label(ef.cfg, layer)}, expert {expert}, {MATRICES[matrix]}: {n:,} weights in 4 bits, "
             f"{100 * zero / n:.3g}% exactly 0, {100 * sat / n:.3g}% at ±6; {len(ex):,} scales from 2^{lo} to 2^{hi}"
             f"<br>right: each expert's error if its blocks of 32 shared one scale per {COARSE_BLOCK}"
             + ("" if mdb else " (no master weights stored for this checkpoint)"))
    return {"traces": traces, "layout": {"title": {"text": title, "font": {"size": 13}},
                                         "xaxis3": {"range": [-0.6, ef.E - 0.4]}}}


EXPERT_CODES_LAYOUT = dict(
    height=460, margin=dict(l=60, r=20, t=80, b=120), showlegend=True,
    legend=dict(orientation="h", yanchor="top", y=-0.2, xanchor="right", x=1),
    xaxis=dict(domain=[0, 0.34], title="E2M1 value (grey 0, red ±6)", type="category", tickfont=dict(size=9)),
    yaxis=dict(title="weights"),
    xaxis2=dict(domain=[0.41, 0.6], title="E8M0 scale exponent", anchor="y2", dtick=1),
    yaxis2=dict(title="blocks of 32", anchor="x2"),
    xaxis3=dict(domain=[0.68, 1], title="expert", anchor="y3", dtick=1, tickfont=dict(size=9)),
    yaxis3=dict(title="SQNR (dB)", anchor="x3", rangemode="tozero"),
)


def build_expert_codes(layer: int = 1, expert: int = 0, matrix: str = "w1"):
    ef = expert_fp4()
    return figure_from(expert_codes_data(ef, min(layer, ef.layers[-1]), expert, matrix, masters_result(ef.path)),
                       EXPERT_CODES_LAYOUT)


@register
class ExpertCodesWidget(Widget):
    """Block, expert and matrix → the stored E2M1 codes and E8M0 scales, and each expert's error."""

    name = "fp4.experts"
    defaults = {"layer": 1, "expert": 0, "matrix": "w1"}

    def __init__(self, static=None, ef: ExpertFP4 | None = None, **state):
        self.ef = expert_fp4() if ef is None else ef
        self.masters = masters_result(self.ef.path)
        super().__init__(static, **state)

    def validate(self, state):
        state["layer"] = min(state["layer"], self.ef.layers[-1])
        check_choice("layer", state["layer"], self.ef.layers)
        e = state["expert"]
        if isinstance(e, bool) or not isinstance(e, int) or not 0 <= e < self.ef.E:
            raise ValueError(f"expert = {e!r}: must be an integer in [0, {self.ef.E - 1}]")
        check_choice("matrix", state["matrix"], MATRICES)

    def data(self):
        return expert_codes_data(self.ef, masters=self.masters, **self.state)

    def layout(self):
        return EXPERT_CODES_LAYOUT

    def make_controls(self):
        import ipywidgets as W
        return {"layer": W.Dropdown(options=[(_block_label(self.ef.cfg, l), l) for l in self.ef.layers],
                                    value=self.state["layer"], description="block"),
                "expert": W.IntSlider(min=0, max=self.ef.E - 1, value=self.state["expert"], description="expert"),
                "matrix": W.ToggleButtons(options=[(v, k) for k, v in MATRICES.items()], value=self.state["matrix"],
                                          description="matrix")}

    def sweep_values(self, control):
        return {"layer": self.ef.layers, "expert": list(range(self.ef.E)), "matrix": list(MATRICES)}[control]

    def on_layer(self, value):
        self.set(layer=int(value))

    def on_expert(self, value):
        self.set(expert=int(value))

    def on_matrix(self, value):
        self.set(matrix=value)


# ------------------------------------------------------------------------------------ the FP4 model's loss
@contextlib.contextmanager
def coarser_experts(model, block: int = COARSE_BLOCK):
    """Temporarily round every routed expert's weights once more onto MXFP4 with one scale per ``block``
    weights (``quant.fp4_fake_quant``); the stored weights come back afterwards."""
    saved = []
    try:
        with torch.no_grad():
            for b in model.blocks():
                for ex in b.ffn.experts:
                    for lin in (ex.w1, ex.w2, ex.w3):
                        saved.append((lin, lin.weight.detach().clone()))
                        lin.weight.copy_(coarse_round(lin.weight, block))
        yield model
    finally:
        with torch.no_grad():
            for lin, w in saved:
                lin.weight.copy_(w)


@torch.no_grad()
def fp4_losses(model, tok, path, n_tokens: int = LOSS_TOKENS) -> dict:
    """Held-out loss (nats/token, ``v4lab.train.evaluate``) on the first ``n_tokens`` held-out tokens: the model
    as stored (FP4 experts), and with its experts re-rounded at one scale per COARSE_BLOCK; plus the stored
    master comparison of :func:`masters_result` when it belongs to these shards."""
    from v4lab.train import evaluate
    from v4lab.viz.moe import heldout_ids
    ids, where = heldout_ids(path, tok, n_tokens + 1)
    out = {"where": where, "tokens": int(ids.shape[1] - 1), "file": evaluate(model, ids)["loss"]}
    with coarser_experts(model):
        out["coarse"] = evaluate(model, ids)["loss"]
    out["masters"] = masters_result(path)
    return out


def fp4_loss_table(res: dict) -> str:
    lines = [f"held-out loss, nats/token ({res['where']}, {res['tokens']} predicted tokens):",
             f"  FP4 experts as stored in the file           {res['file']:.4f}",
             f"  the same, one scale per {COARSE_BLOCK} (re-rounded)      {res['coarse']:.4f}  "
             f"({res['coarse'] - res['file']:+.4f})"]
    m = res["masters"]
    if m is None:
        lines.append("  fp32 master weights: not in the file (the release keeps only the FP4 experts); no stored "
                     "comparison for this checkpoint")
    else:
        lines += [f"stored comparison on {m['windows']} windows of {m['seq_len']} tokens (measured by v4lab from the "
                  f"training run's masters):",
                  f"  file (FP4 experts)                          {m['losses']['file']:.4f}",
                  f"  masters, experts in fp32                    {m['losses']['masters_fp32_experts']:.4f}",
                  f"  masters, experts through FP4 (QAT forward)  {m['losses']['masters_fp4_qat_experts']:.4f}"]
    return "\n".join(lines)


def build_fp4_losses(res: dict) -> "object":
    """Bars: each loss minus the file's (static figure)."""
    names = ["FP4 as stored", f"one scale per {COARSE_BLOCK}"]
    vals = [0.0, res["coarse"] - res["file"]]
    m = res["masters"]
    if m is not None:
        f = m["losses"]["file"]
        names += ["fp32 masters", "masters via FP4 (QAT)"]
        vals += [m["losses"]["masters_fp32_experts"] - f, m["losses"]["masters_fp4_qat_experts"] - f]
    tr = dict(type="bar", x=names, y=vals, text=[f"{v:+.4f}" for v in vals], textposition="outside",
              marker=dict(color=["#d62728", "#ff9896", "#1f77b4", "#9467bd"][:len(vals)]), showlegend=False)
    span = max(0.01, 1.4 * max(abs(v) for v in vals))
    ann = [] if m is not None else [dict(text="no fp32 masters for this checkpoint:<br>the file holds only the FP4 experts",
                                          x=1, xref="paper", y=1, yref="paper", xanchor="right", yanchor="top",
                                          showarrow=False, font=dict(size=11, color="#555"))]
    layout = dict(height=380, margin=dict(l=70, r=20, t=80, b=50), annotations=ann,
                  title={"text": f"held-out loss minus the FP4 file's ({res['file']:.4f} nats/token)<br>"
                                 f"measured by v4lab on {res['where']}", "font": {"size": 13}},
                  yaxis=dict(title="Δ loss (nats/token)", range=[-span, span], zeroline=True))
    return figure_from({"traces": [tr]}, layout)


def measure_masters(path, ckpt, windows: int = 8, seq_len: int = 2048) -> dict:
    """``v4lab.labeval.masters_vs_file`` (the file vs the run's fp32 masters, same windows) and, per block and
    expert, the SQNR of the masters' rounding into the stored FP4; tagged with the shards' fingerprint."""
    from safetensors.torch import load_file

    from v4lab.checkpoint import CheckpointReader
    from v4lab.labeval import masters_vs_file
    if not (Path(ckpt) / "model.safetensors").is_file():
        raise ValueError(f"masters = {str(ckpt)!r}: holds no model.safetensors (give the run's ckpt/ folder)")
    r = CheckpointReader(path)
    cfg, sd = r.config, load_file(str(Path(ckpt) / "model.safetensors"))
    sq = {}
    for layer in range(cfg.num_hidden_layers + cfg.num_nextn_predict_layers):
        row = []
        for e in range(cfg.n_routed_experts):
            sig = err = 0.0
            for m in MATRICES:
                name = _expert_name(cfg, layer, e, m)
                w = sd[name + ".weight"].double()
                q = r.get_dequantized(name + ".weight").double()
                sig, err = sig + float(w.square().sum()), err + float((q - w).square().sum())
            row.append(10 * math.log10(sig / err) if err > 0 else float("inf"))
        sq[str(layer)] = row
    losses = masters_vs_file(path, ckpt, seq_len=seq_len, max_windows=windows)
    return {"fingerprint": shards_fingerprint(path), "windows": losses.pop("windows"), "seq_len": seq_len,
            "losses": losses, "sqnr_db": sq}


def main(argv=None) -> int:
    import argparse
    import json
    ap = argparse.ArgumentParser(prog="python -m v4lab.viz.fp4", description="Store the comparison of a release's "
                                 "FP4 experts with the training run's fp32 masters (notebook 05 shows it).")
    ap.add_argument("release", help="the model directory (official layout), e.g. data/lab-v4")
    ap.add_argument("--masters", required=True, help="the run's checkpoint folder holding model.safetensors")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--out", default=str(MASTERS_FILE))
    a = ap.parse_args(argv)
    try:
        res = measure_masters(a.release, a.masters, a.windows)
    except ValueError as e:
        import sys
        sys.stderr.write(f"v4lab: error: {e}\n")
        return 2
    Path(a.out).write_text(json.dumps(res) + "\n")
    print(fp4_loss_table({"where": "-", "tokens": 0, "file": res["losses"]["file"], "coarse": float("nan"),
                          "masters": res}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
