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

``experiment`` (``v4lab experiment ar``) is the 2×2 of AR × rollback in the regime where AR alone shows an
effect: the trained tiny-v4 (specialised experts), a spike made by one oversized update of the learned
routers only, Δt longer than AR's period so every AR step routes with parameters from before the spike.
"""
from __future__ import annotations

import time
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING, Any, Callable

import torch

from v4lab.train import fit, micro_config
from v4lab.trainconfig import TrainConfig

if TYPE_CHECKING:
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


# The 2×2 of the issue: (AR, rollback) on a detected spike. "spike" mode with one switch off; "no spike" is the
# same run without the provoked update, the reference the spike's cost is measured against.
GRID = {"neither": dict(anticipatory="off"),
        "rollback only": dict(anticipatory="spike", spike_ar=False),
        "AR only": dict(anticipatory="spike", spike_rollback=False),
        "AR + rollback": dict(anticipatory="spike")}
REFERENCE = "no spike"
# The regime (found by the search in the notebook's text): the trained tiny-v4, whose experts are specialised
# (scrambling its routers costs ~0.2 nats; in a micro V4 trained for 40 steps, re-routing 97 % of the tokens
# cost nothing), continued at a small learning rate; the provoked spike is one update of the learned routers
# at spike_lr_mult × lr (the backbone untouched), so routing is its mechanism. Δt = ar_duration + 1: every
# step AR is on routes with parameters from before the kick. The detector is armed from the kicked step on
# (the provoked update changes the losses from spike_at + 1 on; at ratio 1.06, armed earlier, ordinary
# batch-to-batch noise could fire it); the rollback is short (2 steps).
QUICK = dict(steps=11, lr=2e-4, warmup=4, spike_at=5, spike_lr_mult=5000.0, spike_scope="router", ar_lag=6,
             ar_duration=5, spike_ratio=1.06, rollback=2, batch_size=4, seq_len=64, contrast=False)
# full: a larger batch (less batch-to-batch noise), three more steps after AR goes off, and the contrast: the
# same spike given to every parameter (backbone damage, which AR does not touch).
FULL = {**QUICK, "steps": 14, "batch_size": 8, "contrast": True, "contrast_lr_mult": 100.0}
MODEL_DIR = "data/tiny-v4"

SETTINGS = ("steps", "lr", "warmup", "spike_at", "spike_lr_mult", "spike_scope", "ar_lag", "ar_duration",
            "spike_ratio", "rollback", "batch_size", "seq_len")


def _cell(config: TrainConfig, data, s: dict, model, on_step: Callable | None = None) -> dict:
    """One cell of the grid: the run of ``config`` from ``model``, summarised around the spike of settings
    ``s`` (post_spike_loss: mean lm loss over the ar_duration steps after spike_at); ``on_step`` is called
    after every step (the progress bar)."""
    r = fit(config, data, model=model, callback=on_step and (lambda *a: on_step()))
    log = r["log"]
    after = [x["lm_loss"] for x in log if s["spike_at"] < x["step"] <= s["spike_at"] + s["ar_duration"]]
    on = [x["seconds"] for x in log if x["ar_on"]]
    off = [x["seconds"] for x in log if not x["ar_on"]]
    # CPU seconds of each step (the first has no start to subtract): unlike wall time, not inflated while
    # other processes hold the core
    cpu = [(b["ar_on"], a["ar_on"], b["cpu_seconds"] - a["cpu_seconds"]) for a, b in zip(log, log[1:])]
    cpu_on, cpu_off = [v for f, _, v in cpu if f], [v for f, _, v in cpu if not f]
    # the first AR step of a period also pays AR's start: the routes of Δt steps from stored snapshots
    steady = [v for f, before, v in cpu if f and before]
    return {"loss": [x["lm_loss"] for x in log], "step": [x["step"] for x in log],
            "churn": [sum(x["churn"]) / max(1, len(x["churn"])) for x in log],
            "ar_on": [x["ar_on"] for x in log], "events": [(x["iter"], x["event"]) for x in log if "event" in x],
            "post_spike_loss": sum(after) / max(1, len(after)), "final_loss": log[-1]["lm_loss"],
            "seconds_per_step": sum(x["seconds"] for x in log) / len(log),
            "seconds_ar_on": sum(on) / len(on) if on else None, "seconds_ar_off": sum(off) / len(off) if off else None,
            "cpu_ar_on": sum(cpu_on) / len(cpu_on) if cpu_on else None,
            "cpu_ar_off": sum(cpu_off) / len(cpu_off) if cpu_off else None,
            "cpu_ar_on_steady": sum(steady) / len(steady) if steady else None}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b - 1 if a and b else None


def _source(model_dir: str, device):
    """The trained model's config and a function that returns a fresh copy of its weights (fp32)."""
    from v4lab.experiments import load_masters
    from v4lab.model import V4Model
    src = load_masters(model_dir, device)
    state = {k: v.detach().clone() for k, v in src.state_dict().items()}

    def fresh() -> V4Model:
        m = V4Model(src.cfg)
        m.load_state_dict(state)
        return m
    return src.cfg, fresh


@torch.no_grad()
def _forward_share(model, ids, step_seconds: float, repeats: int = 3) -> dict:
    """Seconds of one routing-only forward (AR's look-ahead) against a training step's: the overhead a
    serial implementation must pay."""
    model.route_only(ids[:, :-1], return_mtp=True)                  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        model.route_only(ids[:, :-1], return_mtp=True)
    fwd = (time.perf_counter() - t0) / repeats
    return {"route_only_seconds": fwd, "step_seconds": step_seconds, "share": fwd / step_seconds}


@torch.no_grad()
def _forward_cpu_share(model, ids, step_cpu: float, repeats: int = 3) -> dict:
    """The same in CPU seconds (``time.process_time``)."""
    model.route_only(ids[:, :-1], return_mtp=True)
    t0 = time.process_time()
    for _ in range(repeats):
        model.route_only(ids[:, :-1], return_mtp=True)
    fwd = (time.process_time() - t0) / repeats
    return {"route_only_cpu": fwd, "step_cpu": step_cpu, "share": fwd / step_cpu}


def experiment(quick: bool = False, device: str | torch.device | None = None, data: TokenData | None = None,
               cells: tuple = tuple(GRID), model_dir: str = MODEL_DIR, progress: bool = False,
               **changes: Any) -> dict:
    """`v4lab experiment ar`: the same provoked spike (one update of the learned routers at spike_lr_mult × lr,
    on the trained tiny-v4) four ways, AR on/off × rollback on/off, plus the run without the spike. Baseline =
    neither, treatment = AR only; metric = post_spike_loss; effect = baseline − treatment (> 0 when AR alone
    helps). overhead = AR-on step time / AR-off step time − 1 inside the AR-only run (wall; overhead_cpu: the
    same in CPU seconds; overhead_cpu_steady: without each AR period's first step, which also routes Δt
    steps from snapshots); forward_share: one routing-only forward / one training step of "neither".
    ``cells``: a subset of GRID (must hold "neither" and "AR only"); with ``contrast`` the two also run with
    a spike given to every parameter (lr × ``contrast_lr_mult`` for one step: × spike_lr_mult would turn
    the model to NaN). ``progress``: a bar over the cells' training steps."""
    from v4lab.data import load_data
    from v4lab.progress import bar
    s = {**(QUICK if quick else FULL), **changes}
    for need in ("neither", "AR only"):
        if need not in cells:
            raise ValueError(f"cells = {cells!r}: must contain {need!r} (the baseline and the treatment)")
    cfg, fresh = _source(model_dir, device)
    if data is None:
        data = load_data(cfg.vocab_size)          # the same BPE tiny-v4 was trained with (data/tiny-v4/tokenizer.json)
    base = TrainConfig(cfg, seed=0, progress=False, threads=1, device=device, min_lr_ratio=1.0,
                       spike_min_step=s["spike_at"] + 1, **{k: s[k] for k in SETTINGS})
    n_runs = len(cells) + 1 + (2 if s.get("contrast") else 0)
    with bar(n_runs * s["steps"], "experiment ar", progress) as pb:    # (a rollback's replayed steps count too)
        tick = partial(pb.update, 1)
        out = {name: _cell(replace(base, **GRID[name]), data, s, fresh(), tick) for name in cells}
        out[REFERENCE] = _cell(replace(base, spike_at=None), data, s, fresh(), tick)
        contrast = _contrast(base, data, s, fresh, tick) if s.get("contrast") else None
    ar, neither = out["AR only"], out["neither"]
    ids = data.batch(0, s["batch_size"], s["seq_len"], 0)
    details = {"cells": out, "overhead": _ratio(ar["seconds_ar_on"], ar["seconds_ar_off"]),
               "overhead_cpu": _ratio(ar["cpu_ar_on"], ar["cpu_ar_off"]),
               "overhead_cpu_steady": _ratio(ar["cpu_ar_on_steady"], ar["cpu_ar_off"]),
               "forward_share": _forward_share(fresh(), ids, neither["seconds_per_step"]),
               "forward_share_cpu": _forward_cpu_share(fresh(), ids, neither["cpu_ar_off"]),
               "ar_on_fraction": sum(ar["ar_on"]) / len(ar["ar_on"]),
               "excess": {n: _excess(c, out[REFERENCE], s) for n, c in out.items() if n != REFERENCE}}
    details.update({f"{k}_effect": neither["post_spike_loss"] - out[n]["post_spike_loss"]
                    for k, n in (("rollback", "rollback only"), ("both", "AR + rollback")) if n in out})
    if contrast is not None:
        details["contrast_all_params"] = contrast
    return {"metric": "post_spike_loss", "baseline": {"label": "neither", **neither},
            "treatment": {"label": "AR only", **ar},
            "effect": neither["post_spike_loss"] - ar["post_spike_loss"], "settings": s, "details": details}


def _contrast(base: TrainConfig, data, s: dict, fresh: Callable, tick: Callable) -> dict:
    """"neither" and "AR only" with the spike given to every parameter (lr × contrast_lr_mult, one step)."""
    allp = replace(base, spike_scope="all", spike_lr_mult=s["contrast_lr_mult"])
    c = {n: _cell(replace(allp, **GRID[n]), data, s, fresh(), tick) for n in ("neither", "AR only")}
    return {"cells": c, "effect": c["neither"]["post_spike_loss"] - c["AR only"]["post_spike_loss"]}


def _excess(cell: dict, ref: dict, s: dict) -> list:
    """Per step from spike_at on: the loss of the run training kept (after a rollback, the replay) − the
    no-spike run's at that step."""
    kept = dict(zip(cell["step"], cell["loss"]))              # a replayed step overwrites its first run
    ref_loss = dict(zip(ref["step"], ref["loss"]))
    return [[st, kept[st] - ref_loss[st]] for st in sorted(kept) if st >= s["spike_at"]]
