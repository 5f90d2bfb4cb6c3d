"""FP4 quantisation-aware training of the routed experts (docs/design/v4-moe-mhc-fp4.md §6.8) vs BF16 experts.

The same micro V4 trained twice from the same seed on the same batches:

* "bf16": routed experts in full precision during training (what pre-training does);
* "qat":  routed experts pass through MXFP4 fake-quantisation in the forward, the gradient goes straight
  through to the fp32 master weights (``w + stopgrad(deq(q(w)) − w)``).

Then the question deployment asks: the released experts *are* FP4. Held-out loss of
(1) the bf16 model as trained, (2) the bf16 model with its experts rounded to FP4 after training
(post-training quantisation: QAT skipped), (3) the QAT model with FP4 experts (what it was trained for).
The QAT model is also evaluated with its experts unrounded, to show it did not need them.
"""
from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch

from v4lab.quant import fp4_fake_quant, sqnr_db
from v4lab.train import evaluate, fit, micro_config
from v4lab.trainconfig import TrainConfig

if TYPE_CHECKING:
    from v4lab.data import TokenData


def _expert_weights(model):
    return [w for b in model.blocks() for e in b.ffn.experts for w in (e.w1.weight, e.w2.weight, e.w3.weight)]


@torch.no_grad()
def _eval(model, windows, qat: bool) -> float:
    model.set_flags(qat=qat)
    return evaluate(model, windows)["loss"]


def run(seed: int = 0, *, steps: int = 30, lr: float = 1e-2, batch_size: int = 8, seq_len: int = 64,
        eval_windows: int = 16, data: TokenData | None = None,
        threads: int | None = None, device: str | torch.device | None = None) -> dict:
    """Returns {"config", "step", "bf16": {"loss": [...]}, "qat": {"loss": [...]}, "heldout": {
    "bf16": L, "bf16_rounded_after": L, "qat_fp4": L, "qat_unrounded": L}, "gap_ptq", "gap_qat",
    "weight_sqnr_db": {"bf16": dB, "qat": dB}}; gaps are held-out loss minus the bf16 model's."""
    # device: as v4lab.device.get_device (argument, else $V4LAB_DEVICE, else CUDA when present)
    from v4lab.data import load_data
    cfg = micro_config()
    data = data or load_data(cfg.vocab_size)
    windows = data.heldout_windows(seq_len, eval_windows)
    out = {"config": dict(seed=seed, steps=steps, lr=lr, batch_size=batch_size, seq_len=seq_len,
                          eval_windows=eval_windows), "step": list(range(steps))}
    models = {}
    base = TrainConfig(cfg, steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr, warmup=2, seed=seed,
                       progress=False, threads=threads, device=device)
    for name, qat in (("bf16", False), ("qat", True)):
        r = fit(replace(base, qat=qat), data)
        models[name] = r["model"]
        out[name] = {"loss": [x["lm_loss"] for x in r["log"]], "seconds": r["summary"]["seconds"]}
    bf, q = models["bf16"], models["qat"]
    out["heldout"] = {"bf16": _eval(bf, windows, False), "bf16_rounded_after": _eval(bf, windows, True),
                      "qat_fp4": _eval(q, windows, True), "qat_unrounded": _eval(q, windows, False)}
    h = out["heldout"]
    out["gap_ptq"] = h["bf16_rounded_after"] - h["bf16"]
    out["gap_qat"] = h["qat_fp4"] - h["bf16"]
    out["weight_sqnr_db"] = {
        name: sqnr_db(torch.cat([w.detach().flatten() for w in _expert_weights(m)]),
                      torch.cat([fp4_fake_quant(w.detach()).flatten() for w in _expert_weights(m)]))
        for name, m in models.items()}
    return out


QUICK = dict(steps=40, lr=1e-2, batch_size=8, seq_len=64, eval_windows=16)
FULL = dict(steps=120, lr=1e-2, batch_size=8, seq_len=64, eval_windows=32)


def experiment(quick: bool = False, device: str | torch.device | None = None, **changes: Any) -> dict:
    """`v4lab experiment qat`: the micro V4 trained in BF16 then rounded to FP4 (PTQ, baseline) vs trained
    with FP4 QAT (treatment), both evaluated with MXFP4 experts; effect = PTQ loss − QAT loss (> 0 when QAT
    recovers what rounding costs). The BF16 masters' loss is in ``details``."""
    settings = {**(QUICK if quick else FULL), **changes}
    r = run(device=device, threads=1, **settings)
    h = r["heldout"]
    base = {"label": "BF16 training, FP4 after (PTQ)", "heldout_loss": h["bf16_rounded_after"],
            "loss": r["bf16"]["loss"], "weight_sqnr_db": r["weight_sqnr_db"]["bf16"]}
    treat = {"label": "FP4 QAT", "heldout_loss": h["qat_fp4"], "loss": r["qat"]["loss"],
             "weight_sqnr_db": r["weight_sqnr_db"]["qat"]}
    return {"metric": "heldout_loss", "baseline": base, "treatment": treat,
            "effect": h["bf16_rounded_after"] - h["qat_fp4"], "settings": r["config"],
            "details": {"heldout": h, "gap_ptq": r["gap_ptq"], "gap_qat": r["gap_qat"]}}
