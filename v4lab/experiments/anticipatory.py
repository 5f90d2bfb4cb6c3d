"""Anticipatory Routing (docs/design/v4-moe-mhc-fp4.md §4) around an induced loss spike.

The same micro V4, same seed and batches, three ways; at step ``spike_at`` one optimiser step runs with the
learning rate multiplied by ``spike_lr_mult`` (a one-off glitch, not repeated after a rollback):

* "off":    synchronous routing (routes from θ_t);
* "always": routes for step t chosen with θ_{t−Δt}, gate weights from θ_t (one extra forward per step);
* "spike":  off until an EMA detector sees a spike, then a short rollback and AR for ``ar_duration`` steps.

Per variant: loss per iteration, routing churn (fraction of tokens whose expert set the updated router
would change, averaged over learned-router layers), AR on/off, events, and wall-clock seconds per step,
from which the overhead of AR is measured (the report quotes ~20 % with overlap; a naive extra forward
is ~1/3 of a training step's compute). Toy scale: the point is the mechanism and its cost, not a claim that
AR prevents this particular spike.
"""
from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from v4lab.train import fit, micro_config
from v4lab.trainconfig import TrainConfig

if TYPE_CHECKING:
    import torch

    from v4lab.data import TokenData


def run(seed: int = 0, *, steps: int = 30, lr: float = 5e-3, spike_at: int = 15, spike_lr_mult: float = 100.0,
        ar_lag: int = 2, ar_duration: int = 10, spike_ratio: float = 1.1, batch_size: int = 8, seq_len: int = 64,
        variants: tuple = ("off", "always", "spike"), data: TokenData | None = None,
        threads: int | None = None, device: str | torch.device | None = None) -> dict:
    """Returns {"config", variant: {"iter", "step", "loss", "churn", "max_moe", "ar_on", "events",
    "seconds_per_step", "post_spike_loss" (mean lm loss over the ar_duration steps after spike_at),
    "peak_loss" (max lm loss after spike_at)}, "overhead": {variant: seconds_per_step / off's − 1}}."""
    # device: as v4lab.device.get_device (argument, else $V4LAB_DEVICE, else CUDA when present)
    from v4lab.data import load_data
    cfg = micro_config()
    data = data or load_data(cfg.vocab_size)
    out = {"config": dict(seed=seed, steps=steps, lr=lr, spike_at=spike_at, spike_lr_mult=spike_lr_mult,
                          ar_lag=ar_lag, ar_duration=ar_duration, spike_ratio=spike_ratio,
                          batch_size=batch_size, seq_len=seq_len)}
    base = TrainConfig(cfg, steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr, warmup=2, seed=seed,
                       ar_lag=ar_lag, ar_duration=ar_duration, spike_ratio=spike_ratio, spike_at=spike_at,
                       spike_lr_mult=spike_lr_mult, progress=False, threads=threads, device=device)
    for v in variants:
        r = fit(replace(base, anticipatory=v), data)
        log = r["log"]
        after = [x["lm_loss"] for x in log if spike_at < x["step"] <= spike_at + ar_duration]
        out[v] = {"iter": [x["iter"] for x in log], "step": [x["step"] for x in log],
                  "loss": [x["lm_loss"] for x in log],
                  "churn": [sum(x["churn"]) / len(x["churn"]) for x in log],
                  "max_moe": [max(m for m in x["moe_max_abs"] if m is not None) for x in log],
                  "ar_on": [x["ar_on"] for x in log],
                  "events": [(x["iter"], x["event"]) for x in log if "event" in x],
                  "seconds_per_step": sum(x["seconds"] for x in log) / len(log),
                  "post_spike_loss": sum(after) / max(1, len(after)),
                  "peak_loss": max([x["lm_loss"] for x in log if x["step"] > spike_at], default=None)}
    if "off" in out:
        base = out["off"]["seconds_per_step"]
        out["overhead"] = {v: out[v]["seconds_per_step"] / base - 1 for v in variants if v in out}
    return out


# The 2×2 of the issue: (AR, rollback) on a detected spike. "spike" mode with one switch off.
GRID = {"neither": dict(anticipatory="off"),
        "rollback only": dict(anticipatory="spike", spike_ar=False),
        "AR only": dict(anticipatory="spike", spike_rollback=False),
        "AR + rollback": dict(anticipatory="spike")}
QUICK = dict(steps=24, lr=5e-3, spike_at=12, spike_lr_mult=100.0, ar_lag=2, ar_duration=8, spike_ratio=1.1,
             batch_size=4, seq_len=64)
# The full run is the quick one: with batch 8, 48 steps and the spike at step 24 (cosine lr lower there) the
# detector never fired and all four cells were identical, so the stored result uses these settings.
FULL = QUICK


SETTINGS = ("steps", "lr", "spike_at", "spike_lr_mult", "ar_lag", "ar_duration", "spike_ratio", "batch_size",
            "seq_len")


def _cell(config: TrainConfig, data, s: dict) -> dict:
    """One cell of the grid: the run of ``config``, summarised around the spike of settings ``s``."""
    r = fit(config, data)
    log = r["log"]
    after = [x["lm_loss"] for x in log if s["spike_at"] < x["step"] <= s["spike_at"] + s["ar_duration"]]
    on = [x["seconds"] for x in log if x["ar_on"]]
    off = [x["seconds"] for x in log if not x["ar_on"]]
    return {"loss": [x["lm_loss"] for x in log], "step": [x["step"] for x in log],
            "ar_on": [x["ar_on"] for x in log], "events": [(x["iter"], x["event"]) for x in log if "event" in x],
            "post_spike_loss": sum(after) / max(1, len(after)), "final_loss": log[-1]["lm_loss"],
            "seconds_per_step": sum(x["seconds"] for x in log) / len(log),
            "seconds_ar_on": sum(on) / len(on) if on else None, "seconds_ar_off": sum(off) / len(off) if off else None}


def experiment(quick: bool = False, device: str | torch.device | None = None, data: TokenData | None = None,
               **changes: Any) -> dict:
    """`v4lab experiment ar`: the same provoked spike (one step at spike_lr_mult × lr) four ways, AR on/off ×
    rollback on/off. Baseline = neither, treatment = AR alone; metric = post_spike_loss (mean lm loss over
    the ar_duration steps after the spike); effect = baseline − treatment (> 0 when AR alone helps).
    overhead = AR-on step time / AR-off step time − 1, measured inside the AR-only run."""
    from v4lab.data import load_data
    s = {**(QUICK if quick else FULL), **changes}
    cfg = micro_config()
    data = data or load_data(cfg.vocab_size)
    base = TrainConfig(cfg, warmup=2, seed=0, progress=False, threads=1, device=device,
                       **{k: s[k] for k in SETTINGS})
    cells = {name: _cell(replace(base, **sw), data, s) for name, sw in GRID.items()}
    ar = cells["AR only"]
    overhead = ar["seconds_ar_on"] / ar["seconds_ar_off"] - 1 if ar["seconds_ar_on"] and ar["seconds_ar_off"] else None
    base, treat = cells["neither"], ar
    return {"metric": "post_spike_loss", "baseline": {"label": "neither", **base},
            "treatment": {"label": "AR only", **treat},
            "effect": base["post_spike_loss"] - treat["post_spike_loss"], "settings": s,
            "details": {"cells": cells, "overhead": overhead,
                        "rollback_effect": base["post_spike_loss"] - cells["rollback only"]["post_spike_loss"],
                        "both_effect": base["post_spike_loss"] - cells["AR + rollback"]["post_spike_loss"]}}
