"""FP4 quantisation-aware training of the routed experts (docs/design/v4-moe-mhc-fp4.md §6.8) vs BF16 experts.

Two settings. ``run_lab`` (what ``v4lab experiment qat`` runs): the lab model ``data/lab-v4`` fine-tuned
twice from its released FP4 experts, rounded after training (PTQ) vs QAT; it is where PTQ visibly costs
held-out loss (see the block above ``run_lab``). ``run`` (notebook 05's first QAT figure): the micro V4
from scratch, where neither costs anything measurable.

In ``run``, the same micro V4 trained twice from the same seed on the same batches:

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
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from v4lab.experiments import load_masters, repo_path
from v4lab.quant import fp4_fake_quant, sqnr_db
from v4lab.train import evaluate, fit, micro_config
from v4lab.trainconfig import TrainConfig

if TYPE_CHECKING:
    from v4lab.data import TokenData
    from v4lab.model import V4Model


def _expert_weights(model: V4Model) -> list[torch.Tensor]:
    """Every routed expert's w1, w2, w3, in `expert_matrices` order."""
    return [w for _, _, ws in expert_matrices(model) for w in ws]


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


# ---------------------------------------------------------------------------------------- on the lab model
# `v4lab experiment qat`: the setting where the choice shows. data/lab-v4 was trained with FP4 QAT, so its
# experts sit on the MXFP4 grid. Fine-tune it to a new text (CPython's pydoc topics, not its training HTML)
# twice from the same weights on the same batches: with full-precision experts, rounded to MXFP4 at the end
# (PTQ, what a fine-tune in BF16 followed by re-quantisation does), or with the experts trained through the
# rounding (QAT). A master that moved less than half a grid cell rounds back to the released value, so PTQ
# throws away much of what a gentle fine-tune taught the experts; QAT's gradient, taken at the rounded
# weights, keeps pushing a master until it crosses a cell. The regime that shows it (FULL): only the experts
# train, at lr 1e-3. With every parameter training, or at lr 3e-3, PTQ costs little and QAT ends worse
# (notebook 05 lists the search with its numbers).
LAB_DIR = "data/lab-v4"
TRAINABLE = ("all", "experts")


def _lab_path(model_dir: str | Path) -> Path:
    path = repo_path(model_dir)
    if not (path / "config.json").is_file() or not (path / "tokenizer.json").is_file():
        raise ValueError(f"model_dir = {str(model_dir)!r}: needs config.json, the weights and tokenizer.json "
                         "(data/lab-v4 is written by `v4lab labrun`, see data/README.md)")
    return path


def lab_data(model_dir: str | Path = LAB_DIR) -> TokenData:
    """CPython's pydoc topics tokenised with the lab model's tokenizer: the fine-tuning text (training
    topics) and its held-out topics (``v4lab.data.split_topics``)."""
    from v4lab.data import load_data, load_tokenizer
    path = _lab_path(model_dir)
    tok = load_tokenizer(path / "tokenizer.json")
    return load_data(tok.get_vocab_size(), tokenizer=tok)


def expert_matrices(model: V4Model) -> list[tuple[int, int, list[torch.Tensor]]]:
    """[(layer, expert, [w1, w2, w3])] of every routed expert (MTP blocks count as the last layers)."""
    return [(i, e, [x.w1.weight, x.w2.weight, x.w3.weight])
            for i, b in enumerate(model.blocks()) for e, x in enumerate(b.ffn.experts)]


@torch.no_grad()
def per_expert_error(model: V4Model, start: list[list[torch.Tensor]] | None = None) -> list[dict]:
    """Per routed expert: ``rel_error`` = ‖deq(q(w)) − w‖ / ‖w‖ over its three matrices (MXFP4, block 32);
    with ``start`` (the same experts' weights before training, on the grid): ``drift`` = ‖w − w₀‖ / ‖w₀‖
    and ``reverted`` = the share of weights that moved but round back to exactly their start value."""
    rows = []
    for k, (layer, e, ws) in enumerate(expert_matrices(model)):
        w = torch.cat([x.detach().float().flatten() for x in ws])
        q = torch.cat([fp4_fake_quant(x.detach().float()).flatten() for x in ws])
        row = {"layer": layer, "expert": e, "rel_error": float((q - w).norm() / w.norm())}
        if start is not None:
            w0 = torch.cat([x.float().flatten() for x in start[k]])
            moved = w != w0
            row["drift"] = float((w - w0).norm() / w0.norm())
            row["reverted"] = float((moved & (q == w0)).sum() / moved.sum().clamp(min=1))
        rows.append(row)
    return rows


def _eval_both(model, windows) -> dict:
    return {"masters": _eval(model, windows, False), "fp4": _eval(model, windows, True)}


def run_lab(seed: int = 0, *, model_dir: str | Path = LAB_DIR, steps: int = 20, lr: float = 3e-3,
            batch_size: int = 4, seq_len: int = 256, eval_windows: int = 16, trainable: str = "all",
            data: TokenData | None = None, threads: int | None = None,
            device: str | torch.device | None = None, on_step: Callable | None = None) -> dict:
    """Fine-tune the lab model twice from its released weights on the same batches (``lab_data``):
    "ptq" with full-precision experts, "qat" through the FP4 straight-through estimator. ``trainable``:
    "all" parameters, or only the routed "experts" (the rest frozen, so whatever is learnt lives in the
    weights that get rounded). Returns
    {"config", "step", "start": held-out loss of the released model, "ptq"/"qat": {"loss": [...],
    "seconds", "heldout": {"masters", "fp4"}, "experts": per_expert_error rows}}; "fp4" of "ptq" is the
    PTQ model (masters rounded after training). ``on_step`` is called after every training step."""
    from v4lab.device import get_device
    from v4lab.train import torch_settings
    if trainable not in TRAINABLE:
        raise ValueError(f"trainable = {trainable!r}: must be one of {TRAINABLE}")
    path = _lab_path(model_dir)
    data = data or lab_data(path)
    windows = data.heldout_windows(seq_len, eval_windows)
    out = {"config": dict(seed=seed, model_dir=str(model_dir), steps=steps, lr=lr, batch_size=batch_size,
                          seq_len=seq_len, eval_windows=eval_windows, trainable=trainable), "step": list(range(steps))}
    with torch_settings(threads, True, get_device(device)):
        for arm, qat in (("ptq", False), ("qat", True)):
            model = load_masters(path, device)
            if arm == "ptq":
                out["start"] = _eval(model, windows, False)
                start = [[w.detach().clone() for w in ws] for _, _, ws in expert_matrices(model)]
            if trainable == "experts":          # the optimiser takes only parameters that require a gradient
                experts = {id(w) for _, _, ws in expert_matrices(model) for w in ws}
                for p in model.parameters():
                    p.requires_grad_(id(p) in experts)
            cfg = TrainConfig(model.cfg, steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr,
                              warmup=max(1, steps // 10), seed=seed, qat=qat, progress=False, threads=threads,
                              device=device)
            r = fit(cfg, data, model=model, callback=on_step and (lambda *a: on_step()))
            out[arm] = {"loss": [x["lm_loss"] for x in r["log"]], "seconds": r["summary"]["seconds"],
                        "heldout": _eval_both(r["model"], windows), "experts": per_expert_error(r["model"], start)}
    return out


# Only the routed experts train, gently (lr 1e-3: most masters move less than half a grid cell), so the
# fine-tune lives in the weights that get rounded; see benchmarks/experiments/README.md for the search.
QUICK = dict(steps=20, lr=1e-3, batch_size=4, seq_len=256, eval_windows=8, trainable="experts")
FULL = dict(steps=60, lr=1e-3, batch_size=4, seq_len=256, eval_windows=16, trainable="experts")


def _side(label: str, arm: dict, loss: float) -> dict:
    ex = arm["experts"]
    return {"label": label, "heldout_loss": loss, "loss": arm["loss"],
            "mean_expert_rel_error": sum(x["rel_error"] for x in ex) / len(ex),
            "mean_expert_drift": sum(x["drift"] for x in ex) / len(ex)}


def experiment(quick: bool = False, device: str | torch.device | None = None, progress: bool = False,
               **changes: Any) -> dict:
    """`v4lab experiment qat`: data/lab-v4 fine-tuned with full-precision experts then rounded to MXFP4
    (PTQ, baseline) vs fine-tuned with FP4 QAT (treatment), both evaluated with MXFP4 experts;
    effect = PTQ loss − QAT loss (> 0 when QAT keeps what rounding throws away). The full-precision
    masters' loss, the released model's and the per-expert errors are in ``details``. ``progress``: a bar
    over both arms' training steps."""
    from v4lab.progress import bar
    settings = {**(QUICK if quick else FULL), **changes}
    with bar(2 * settings["steps"], "experiment qat", progress) as pb:
        r = run_lab(device=device, threads=1, on_step=partial(pb.update, 1), **settings)
    p, q = r["ptq"], r["qat"]
    base = _side("fine-tuned in full precision, rounded to FP4 after (PTQ)", p, p["heldout"]["fp4"])
    treat = _side("fine-tuned with FP4 QAT", q, q["heldout"]["fp4"])
    return {"metric": "heldout_loss", "baseline": base, "treatment": treat,
            "effect": p["heldout"]["fp4"] - q["heldout"]["fp4"], "settings": r["config"],
            "details": {"released": r["start"], "ptq_masters": p["heldout"]["masters"],
                        "qat_masters": q["heldout"]["masters"],
                        "gap_ptq": p["heldout"]["fp4"] - p["heldout"]["masters"],
                        "experts": {"ptq": p["experts"], "qat": q["experts"]}}}
