"""Below FP4: how much held-out loss a trained V4 loses when its weights go to 3 and 2 bits (the report's
open question, docs/design/v4-moe-mhc-fp4.md §6).

The trained ``data/tiny-v4`` (its routed experts were released in MXFP4, like V4's) is quantised, weight
by weight, with the MX formats of ``v4lab.quant`` (E2M1 = FP4, E1M1 / E2M0 = FP3, ternary = FP2), each
with one E8M0 scale per ``block`` values along K:

* post-training (PTQ): round the routed experts, then the attention projections, then every matrix;
* short QAT: fine-tune ``qat_steps`` steps with the routed experts passing through the format's
  straight-through fake-quant (everything else trains in full precision, as in V4's expert QAT), then
  evaluate with rounded experts. The same fine-tune without quantisation ("none") is the control, so the
  fine-tune's own effect is not credited to QAT.

Bits per weight count the element bits plus 8/block for the shared E8M0 scale (4.25 for MXFP4 at 32).
"""
from __future__ import annotations

import time
from functools import partial
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn
from torch.nn.utils import parametrize

from v4lab.experiments import load_masters
from v4lab.quant import SUBFP4_FORMATS, bits_per_weight, mx_fake_quant, mx_fake_quant_ste
from v4lab.train import evaluate, lm_losses

SCOPES = ("experts", "attention", "all")
if TYPE_CHECKING:
    from v4lab.data import TokenData
    from v4lab.model import V4Model

THREE_BIT = tuple(f for f, (bits, _) in SUBFP4_FORMATS.items() if bits == 3)


def scope_weights(model: V4Model, scope: str, block: int) -> list[nn.Parameter]:
    """The weight matrices a scope quantises: routed experts (w1, w2, w3 of every MoE block, MTP included),
    attention projections (``.attn.`` matrices, compressor and indexer included) or every 2-D weight
    (embedding and head too) whose input dim K is a multiple of ``block``."""
    if scope not in SCOPES:
        raise ValueError(f"scope = {scope!r}: must be one of {SCOPES}")
    out = []
    for name, p in model.named_parameters():
        if p.dim() != 2 or p.shape[-1] % block or name.endswith("_fn"):      # hc_*_fn are mHC mixers (fp32)
            continue
        if ((scope == "experts" and ".ffn.experts." in name) or (scope == "attention" and ".attn." in name)
                or scope == "all"):
            out.append(p)
    return out


@torch.no_grad()
def ptq_loss(model: V4Model, windows: torch.Tensor, scope: str, fmt: str, block: int) -> dict:
    """Held-out loss with the scope's weights rounded to (fmt, block); the weights are restored after."""
    ws = scope_weights(model, scope, block)
    saved = [w.detach().clone() for w in ws]
    try:
        for w in ws:
            w.copy_(mx_fake_quant(w, fmt, block))
        loss = evaluate(model, windows)["loss"]
    finally:
        for w, s in zip(ws, saved):
            w.copy_(s)
    return {"loss": loss, "params": sum(w.numel() for w in ws)}


class _STE(nn.Module):
    def __init__(self, fmt: str, block: int):
        super().__init__()
        self.fmt, self.block = fmt, block

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return mx_fake_quant_ste(w, self.fmt, self.block)


def qat_finetune(model: V4Model, data: TokenData, fmt: str | None, block: int, *, steps: int, lr: float,
                 batch_size: int, seq_len: int, seed: int, mtp_weight: float = 0.3,
                 on_step: Callable | None = None) -> list[float]:
    """Fine-tune in place for ``steps`` AdamW steps, routed experts through fmt's STE (fmt None: no
    quantisation, the control). Returns the training lm loss per step."""
    experts = [m for name, m in model.named_modules() if ".ffn.experts." in name and isinstance(m, nn.Linear)]
    if fmt is not None:
        for m in experts:
            parametrize.register_parametrization(m, "weight", _STE(fmt, block))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    losses = []
    model.train()
    try:
        for t in range(steps):
            lm, mt = lm_losses(model, data.batch(t, batch_size, seq_len, seed + 1))   # batches unseen as such
            loss = lm + (mtp_weight * mt if mt is not None else 0.0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(float(lm.detach()))
            if on_step is not None:
                on_step()
    finally:
        if fmt is not None:
            for m in experts:                    # keep the fp32 masters (the rounding is applied at eval)
                parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)
    model.eval()
    return losses


def run(seed: int = 0, *, model_dir: str = "data/tiny-v4", formats: tuple = tuple(SUBFP4_FORMATS),
        blocks: tuple = (32, 16, 8), scopes: tuple = SCOPES, qat_steps: int = 8, qat_formats: tuple | None = None,
        qat_lr: float = 1e-4, batch_size: int = 4, seq_len: int = 128, eval_windows: int = 8,
        data: TokenData | None = None, device: str | torch.device | None = None,
        on_unit: Callable | None = None) -> dict:
    """Returns {"config", "bf16": loss, "ptq": [{scope, fmt, block, bits, bytes_per_param, loss, params}],
    "qat": [{fmt, block, bits, loss_before, loss_after, train_loss}], "seconds"}.
    ``qat_formats`` (default: all formats, plus the unquantised control "none") use block 32. ``on_unit`` is
    called after each evaluation of a rounded model and each QAT step (the progress bar; `work_units`)."""
    tick = on_unit or (lambda: None)
    from v4lab.data import load_data
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    model = load_masters(model_dir, device).eval()
    data = data or load_data(model.cfg.vocab_size)
    windows = data.heldout_windows(seq_len, eval_windows)
    out = {"config": dict(seed=seed, model_dir=str(model_dir), formats=list(formats), blocks=list(blocks),
                          scopes=list(scopes), qat_steps=qat_steps, qat_lr=qat_lr, batch_size=batch_size,
                          seq_len=seq_len, eval_windows=eval_windows),
           "bf16": evaluate(model, windows)["loss"], "ptq": [], "qat": []}
    for scope in scopes:
        for fmt in formats:
            for block in (blocks if scope == "experts" else blocks[:1]):
                r = ptq_loss(model, windows, scope, fmt, block)
                tick()
                b = bits_per_weight(fmt, block)
                out["ptq"].append(dict(scope=scope, fmt=fmt, block=block, bits=b, bytes_per_param=b / 8, **r))
    for fmt in (("none",) + tuple(formats)) if qat_formats is None else qat_formats:
        m = load_masters(model_dir, device)
        q = None if fmt == "none" else fmt
        train_loss = qat_finetune(m, data, q, 32, steps=qat_steps, lr=qat_lr, batch_size=batch_size,
                                  seq_len=seq_len, seed=seed, on_step=tick) if qat_steps else []
        after = evaluate(m, windows)["loss"] if q is None else ptq_loss(m, windows, "experts", q, 32)["loss"]
        before = out["bf16"] if q is None else _find(out["ptq"], "experts", q, 32)
        if before is None:
            before = ptq_loss(model, windows, "experts", q, 32)["loss"]
        out["qat"].append(dict(fmt=fmt, block=32, bits=16.0 if q is None else bits_per_weight(q, 32),
                               loss_before=before, loss_after=after, train_loss=train_loss))
    out["seconds"] = time.perf_counter() - t0
    return out


def _find(rows: list[dict], scope: str, fmt: str, block: int) -> float | None:
    return next((r["loss"] for r in rows if (r["scope"], r["fmt"], r["block"]) == (scope, fmt, block)), None)


QUICK = dict(blocks=(32, 8), qat_steps=6, qat_formats=("none", "e2m0", "ternary"), eval_windows=6)
FULL = dict(blocks=(32, 16, 8), qat_steps=16, qat_formats=None, eval_windows=16)


def work_units(formats: tuple = tuple(SUBFP4_FORMATS), blocks: tuple = (32, 16, 8), scopes: tuple = SCOPES,
               qat_steps: int = 8, qat_formats: tuple | None = None, **_: Any) -> int:
    """How many times `run` with these settings calls ``on_unit``."""
    ptq = sum(len(formats) * (len(blocks) if s == "experts" else 1) for s in scopes)
    n_qat = len(formats) + 1 if qat_formats is None else len(qat_formats)
    return ptq + n_qat * qat_steps


def experiment(quick: bool = False, device: str | torch.device | None = None, progress: bool = False,
               **changes: Any) -> dict:
    """`v4lab experiment subfp4`: baseline = MXFP4 experts (as released), treatment = the best 3-bit
    format at block 32; effect = treatment loss − baseline loss (the price of dropping to 3 bits).
    ``progress``: a bar over the evaluations and QAT steps."""
    from v4lab.progress import bar
    settings = {**(QUICK if quick else FULL), **changes}
    with bar(work_units(**settings), "experiment subfp4", progress) as pb:
        r = run(device=device, on_unit=partial(pb.update, 1), **settings)
    ptq = [x for x in r["ptq"] if x["scope"] == "experts" and x["block"] == 32]
    fp4 = next(x for x in ptq if x["fmt"] == "e2m1")
    best3 = min((x for x in ptq if x["fmt"] in THREE_BIT), key=lambda x: x["loss"])
    curve = {}
    for s in r["config"]["scopes"]:
        rows = [x for x in r["ptq"] if x["scope"] == s]
        curve[s] = {"bits": [x["bits"] for x in rows], "loss": [x["loss"] for x in rows],
                    "label": [f"{x['fmt']}/{x['block']}" for x in rows]}
    return {"metric": "heldout_loss",
            "baseline": {"label": "FP4 (E2M1) experts, block 32", "heldout_loss": fp4["loss"],
                         "bits_per_weight": fp4["bits"], "curves": curve},
            "treatment": {"label": f"{best3['fmt'].upper()} (FP3) experts, block 32", "heldout_loss": best3["loss"],
                          "bits_per_weight": best3["bits"], "format": best3["fmt"]},
            "effect": best3["loss"] - fp4["loss"], "settings": r["config"], "details": r}
