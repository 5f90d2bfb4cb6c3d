"""SwiGLU clamping (docs/design/v4-moe-mhc-fp4.md §3) as a stability device.

``run``: the same micro V4 trained twice at a learning rate well above the comfortable one, with the clamp
(swiglu_limit = 10, V4's value) and without it (notebook 04's first, honest experiment: at toy size and a
whole-model high learning rate the clamp's effect depends on the seed).

``experiment`` (``v4lab experiment clamp``): the regime where the effect is robust (REGIME below): only the
routed experts train at a high learning rate, and their intermediate h = SiLU(g)·u goes through FP8 E4M3
with a fixed scale before W2. Without the clamp h outgrows the FP8 range and the run turns NaN; with V4's
clamp |h| <= SiLU(10)·10 ~ 100 fits; a clamp of 1 fits too but costs loss.

What is logged: the largest pre-activation an expert sees (|W1 x|, |W3 x| before the clamp), the largest
MoE output, loss spikes (a step whose loss exceeds the running minimum by ``spike_margin`` nats), the final
and held-out loss.
"""
from __future__ import annotations

import math
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


def _run_until_divergence(config: TrainConfig, data: TokenData, eval_windows: int = 16, pb: Any = None) -> dict:
    """Train ``config`` (its swiglu_limit; 0: no clamp); a non-finite value ends the run (divergence) and the
    steps logged so far are kept. Returns the per-step curves, diverged_at (step or None) and, for a run
    that finished, the held-out loss on ``eval_windows`` windows. ``pb``: a progress bar advanced by one per
    step (by the steps left when the run diverges)."""
    log = []
    diverged_at, err, heldout = None, None, None
    tick = (lambda n: None) if pb is None else pb.update
    try:
        r = fit(config, data, callback=lambda step, rec, model: (log.append(rec), tick(1)))
        heldout = evaluate(r["model"], data.heldout_windows(config.seq_len, eval_windows))["loss"]
    except (FloatingPointError, ValueError) as e:     # NaN/inf in the loss or in mHC's logits
        if isinstance(e, ValueError) and "inf or nan" not in str(e):
            raise                                     # a real input error, not a divergence
        diverged_at, err = len(log), str(e).splitlines()[0]
        tick(config.steps - len(log))
    lm = [x["lm_loss"] for x in log]
    return {"limit": config.swiglu_limit, "loss": lm, "grad_norm": [x["grad_norm"] for x in log],
            "preact_max": [max(x["swiglu_preact_max"]) for x in log],
            "moe_max": [max(v for v in x["moe_max_abs"] if v is not None) for x in log],
            "steps_survived": len(log), "diverged_at": diverged_at, "error": err,
            "final_loss": lm[-1] if lm and diverged_at is None else None, "heldout_loss": heldout,
            "late_loss": sum(lm[-10:]) / len(lm[-10:]) if lm and diverged_at is None else None,
            "min_loss": min(lm) if lm else None}


# The regime (see benchmarks/experiments/README.md for the search). Wortsman et al. (2023) provoke the
# instabilities of large runs in small models by raising the learning rate; raising it for the whole model
# opens every route to divergence (attention logits, mHC, the output head), and the clamp closes only one.
# So only the routed experts' w1/w2/w3 train at a high rate (expert_lr_mult × lr = 0.15); the rest keeps the
# stable recipe (lr 3e-3, warm-up, gradient clipping, weight decay). Their SwiGLU pre-activations then grow
# step after step, and the product SiLU(g)·u with them, like the late-training outliers of Fishman et al.
# (2024) that broke FP8 training. In fp32 the micro model shrugs such outliers off (every consumer of the
# MoE output normalises it: the loss barely moves, see the "fp32" runs); what breaks is low precision. So
# the intermediate h goes through FP8 E4M3 with a fixed unit scale before W2 (expert_h_fp8 = 1, a cast that
# turns |h| >= 464 into NaN): a regime chosen to provoke the failure, not V4's recipe (V4's FP8 activation
# scales follow the data). With the clamp |h| <= SiLU(10)·10 ~ 100 < 448 whatever the weights do.
REGIME = dict(lr=3e-3, expert_lr_mult=50.0, expert_h_fp8=1.0, warmup=5, grad_clip=1.0, weight_decay=0.1,
              batch_size=4, seq_len=64)
QUICK = dict(REGIME, steps=100, seeds=(0,), eval_windows=16, fp32_check=True)
FULL = dict(REGIME, steps=150, seeds=(0, 1, 2, 3, 4), eval_windows=32, fp32_check=True)


def _variants(base: TrainConfig, data: TokenData, seed: int, limits: tuple[float, ...], eval_windows: int,
              spike_margin: float, cap: float, pb: Any = None) -> dict:
    """The runs of one seed, one per limit: label -> the run's curves and summary numbers (``pb``: the
    progress bar, advanced per step)."""
    runs = {}
    for lim in limits:
        r = _run_until_divergence(replace(base, seed=seed, swiglu_limit=lim), data, eval_windows, pb)
        r["spikes"] = count_spikes(r["loss"], spike_margin)
        r["max_preact"] = max(r["preact_max"], default=None)
        r["max_moe"] = max(r["moe_max"], default=None)
        r["label"] = _label(lim)
        r["scored_loss"] = score(r, cap)
        runs[r["label"]] = r
    return runs


def score(run: dict, cap: float) -> float:
    """The metric of one run: its held-out loss, or ``cap`` (the loss of a uniform guess, ln V) if it
    diverged: a run that produced NaN is scored as a model that knows nothing."""
    return cap if run["heldout_loss"] is None else float(run["heldout_loss"])


SUMMARY_KEYS = ("steps_survived", "diverged_at", "heldout_loss", "scored_loss", "final_loss", "spikes",
                "max_preact", "max_moe")


def experiment(quick: bool = False, device: str | torch.device | None = None, data: TokenData | None = None,
               limits: tuple[float, ...] = (0.0, 10.0, 1.0), spike_margin: float = 0.5, progress: bool = False,
               **changes: Any) -> dict:
    """`v4lab experiment clamp`: per seed, the same run (REGIME) with no clamp (baseline), V4's clamp 10
    (treatment) and a too-tight clamp (1); with ``fp32_check`` also the no-clamp and clamp-10 runs of the
    first seed without the FP8 cast. metric = scored_loss (held-out loss; ln V for a run that diverged);
    effect = mean over seeds of baseline − treatment (> 0: the clamp kept the run alive and trained);
    tight_cost = mean over seeds of clamp 1 − clamp 10 (> 0: the too-tight clamp costs loss).
    ``progress``: a bar over every run's training steps."""
    from v4lab.data import load_data
    from v4lab.progress import bar
    settings = {**(QUICK if quick else FULL), **changes}
    kw = {k: v for k, v in settings.items() if k not in ("seeds", "eval_windows", "fp32_check")}
    cfg = micro_config()
    data = data or load_data(cfg.vocab_size)
    cap = math.log(cfg.vocab_size)
    base = TrainConfig(cfg, progress=False, log_preact=True, threads=1, device=device, **kw)
    n_runs = len(settings["seeds"]) * len(limits) + (min(2, len(limits)) if settings["fp32_check"] else 0)
    with bar(n_runs * kw["steps"], "experiment clamp", progress) as pb:
        by_seed = {s: _variants(base, data, s, limits, settings["eval_windows"], spike_margin, cap, pb)
                   for s in settings["seeds"]}
        fp32 = (_variants(replace(base, expert_h_fp8=0.0), data, settings["seeds"][0], limits[:2],
                          settings["eval_windows"], spike_margin, cap, pb) if settings["fp32_check"] else {})
    first = by_seed[settings["seeds"][0]]
    base_l, treat_l = _label(limits[0]), _label(limits[1])

    def mean_gap(a: str, b: str) -> float | None:
        gaps = [runs[a]["scored_loss"] - runs[b]["scored_loss"] for runs in by_seed.values() if a in runs]
        return sum(gaps) / len(gaps) if gaps else None
    summary = {str(seed): {label: {k: r.get(k) for k in SUMMARY_KEYS} for label, r in runs.items()}
               for seed, runs in by_seed.items()}
    return {"metric": "scored_loss", "baseline": first[base_l], "treatment": first[treat_l],
            "effect": mean_gap(base_l, treat_l),
            "settings": {**settings, "seeds": list(settings["seeds"]), "limits": list(limits),
                         "spike_margin": spike_margin, "loss_cap": cap, "model": "micro_config()"},
            "details": {"runs": first, "by_seed": summary, "tight_cost": mean_gap("clamp 1", treat_l),
                        "survived": {label: sum(runs[label]["diverged_at"] is None for runs in by_seed.values())
                                     for label in first},
                        "fp32": {label: {k: r.get(k) for k in SUMMARY_KEYS} | {"moe_max": r["moe_max"]}
                                 for label, r in fp32.items()}}}


def _label(limit: float) -> str:
    return "no clamp" if limit == 0 else f"clamp {limit:g}"
