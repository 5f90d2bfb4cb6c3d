"""SwiGLU clamping (docs/design/v4-moe-mhc-fp4.md §3) as a stability device: the same micro V4 trained twice at a
learning rate well above the comfortable one, with the clamp (swiglu_limit = 10, V4's value) and without it.

What to look at: the largest pre-activation an expert sees (|W1 x|, |W3 x| before the clamp), the largest
MoE output, loss spikes (a step whose loss exceeds the running minimum by ``spike_margin`` nats) and the
final loss. Toy scale: whether the clamp *wins* at this size depends on the seed and the learning rate;
the mechanism (pre-activations beyond the limit are cut, the product stays bounded) is what is shown.
"""
from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from v4lab.train import evaluate, fit, micro_config
from v4lab.trainconfig import TrainConfig

if TYPE_CHECKING:
    import torch

    from v4lab.data import TokenData


def count_spikes(losses: list[float], margin: float) -> int:
    """Steps whose loss exceeds the lowest loss seen so far by more than ``margin``."""
    best, n = float("inf"), 0
    for x in losses:
        if x > best + margin:
            n += 1
        best = min(best, x)
    return n


def run(seed: int = 0, *, steps: int = 30, lr: float = 5e-2, limit: float = 10.0, batch_size: int = 8,
        seq_len: int = 64, spike_margin: float = 0.5, data: TokenData | None = None,
        threads: int | None = None, device: str | torch.device | None = None) -> dict:
    """Returns {"config", "step", "clamp": {...}, "no_clamp": {...}} with, per variant, lists over steps:
    loss, lm_loss, grad_norm, preact_max (max over layers of pre-clamp |W1 x|, |W3 x|), moe_max (max |MoE
    output|), and scalars spikes, final_loss, seconds."""
    # device: as v4lab.device.get_device (argument, else $V4LAB_DEVICE, else CUDA when present)
    from v4lab.data import load_data
    cfg = micro_config()
    data = data or load_data(cfg.vocab_size)
    out = {"config": dict(seed=seed, steps=steps, lr=lr, limit=limit, batch_size=batch_size, seq_len=seq_len,
                          spike_margin=spike_margin), "step": list(range(steps))}
    base = TrainConfig(cfg, steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr, warmup=2, seed=seed,
                       progress=False, log_preact=True, threads=threads, device=device)
    for name, lim in (("clamp", limit), ("no_clamp", 0.0)):
        r = fit(replace(base, swiglu_limit=lim), data)
        log = r["log"]
        out[name] = {"loss": [x["loss"] for x in log], "lm_loss": [x["lm_loss"] for x in log],
                     "grad_norm": [x["grad_norm"] for x in log],
                     "preact_max": [max(x["swiglu_preact_max"]) for x in log],
                     "moe_max": [max(v for v in x["moe_max_abs"] if v is not None) for x in log],
                     "spikes": count_spikes([x["lm_loss"] for x in log], spike_margin),
                     "final_loss": log[-1]["lm_loss"], "seconds": r["summary"]["seconds"], "limit": lim}
    return out


def _run_until_divergence(config: TrainConfig, data, eval_windows: int = 16, pb: Any = None) -> dict:
    """Train ``config`` (its swiglu_limit; 0: no clamp); a non-finite value ends the run (divergence) and the
    steps logged so far are kept. Returns the per-step curves, diverged_at (step or None) and, for a run
    that finished, the held-out loss on ``eval_windows`` windows."""
    log = []
    diverged_at, err, heldout = None, None, None
    try:
        r = fit(config, data, callback=lambda step, rec, model: (log.append(rec), pb is not None and pb.update(1)))
        heldout = evaluate(r["model"], data.heldout_windows(config.seq_len, eval_windows))["loss"]
    except (FloatingPointError, ValueError) as e:     # NaN/inf in the loss or in mHC's logits
        if isinstance(e, ValueError) and "inf or nan" not in str(e):
            raise                                     # a real input error, not a divergence
        diverged_at, err = len(log), str(e).splitlines()[0]
    lm = [x["lm_loss"] for x in log]
    return {"limit": config.swiglu_limit, "loss": lm, "grad_norm": [x["grad_norm"] for x in log],
            "preact_max": [max(x["swiglu_preact_max"]) for x in log],
            "moe_max": [max(v for v in x["moe_max_abs"] if v is not None) for x in log],
            "steps_survived": len(log), "diverged_at": diverged_at, "error": err,
            "final_loss": lm[-1] if lm and diverged_at is None else None, "heldout_loss": heldout,
            "late_loss": sum(lm[-10:]) / len(lm[-10:]) if lm and diverged_at is None else None,
            "min_loss": min(lm) if lm else None}


# The regime (Wortsman et al. 2023: raise the learning rate of a small model until it shows the instabilities
# of large ones): lr 0.3 (the micro model trains stably at ~5e-3) with the usual warm-up + cosine decay, no
# gradient clipping, no weight decay. With a constant lr 0.3 every variant diverges sooner or later (the
# clamped one too, at step 28 for seed 0): the clamp removes one route to divergence, not all of them.
QUICK = dict(steps=50, lr=0.3, batch_size=4, seq_len=64, grad_clip=0.0, weight_decay=0.0, warmup=2, seeds=(0,))
FULL = dict(steps=50, lr=0.3, batch_size=4, seq_len=64, grad_clip=0.0, weight_decay=0.0, warmup=2, seeds=(0, 1, 2))


def experiment(quick: bool = False, device: str | torch.device | None = None, data: TokenData | None = None,
               limits: tuple[float, ...] = (0.0, 10.0, 1.0), spike_margin: float = 0.5, progress: bool = False,
               **changes: Any) -> dict:
    """`v4lab experiment clamp`: the same high-LR run with no clamp (baseline), V4's clamp 10 (treatment)
    and a too-tight clamp (1), for each seed. metric = steps_survived (optimiser steps before a non-finite
    value); effect = mean over seeds of (treatment − baseline) / steps, the fraction of the run the clamp
    adds before divergence. Baseline/treatment curves are those of the first seed. ``progress``: a bar over
    the runs' training steps."""
    from v4lab.data import load_data
    from v4lab.progress import bar
    settings = {**(QUICK if quick else FULL), **changes}
    kw = {k: v for k, v in settings.items() if k != "seeds"}
    cfg = micro_config()
    data = data or load_data(cfg.vocab_size)
    eval_windows = kw.pop("eval_windows", 16)     # the held-out windows of a finished run, not a train setting
    base = TrainConfig(cfg, progress=False, log_preact=True, threads=1, device=device, **kw)
    by_seed = {}
    pb = bar(len(settings["seeds"]) * len(limits) * kw["steps"], "experiment clamp", progress)
    for seed in settings["seeds"]:
        runs = {}
        for lim in limits:
            r = _run_until_divergence(replace(base, seed=seed, swiglu_limit=lim), data, eval_windows, pb)
            r["spikes"] = count_spikes(r["loss"], spike_margin)
            r["max_preact"] = max(r["preact_max"], default=None)
            r["max_moe"] = max(r["moe_max"], default=None)
            r["label"] = "no clamp" if lim == 0 else f"clamp {lim:g}"
            runs[r["label"]] = r
        by_seed[seed] = runs
    pb.close()
    gains = [(runs["clamp 10"]["steps_survived"] - runs["no clamp"]["steps_survived"]) / kw["steps"]
             for runs in by_seed.values()]
    first = by_seed[settings["seeds"][0]]
    summary = {str(seed): {label: {k: r[k] for k in ("steps_survived", "diverged_at", "heldout_loss", "late_loss",
                                                      "spikes", "max_preact", "max_moe")}
                           for label, r in runs.items()} for seed, runs in by_seed.items()}
    return {"metric": "steps_survived", "baseline": first["no clamp"], "treatment": first["clamp 10"],
            "effect": sum(gains) / len(gains),
            "settings": {**settings, "seeds": list(settings["seeds"]), "limits": list(limits),
                         "spike_margin": spike_margin, "model": "micro_config()"},
            "details": {"runs": first, "by_seed": summary}}
