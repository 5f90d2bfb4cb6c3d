"""Why mHC is stable where plain hyper-connections are not (docs/design/v4-moe-mhc-fp4.md §5.4), at toy scale.

Two measurements, both seeded and small enough for a notebook cell on 2 CPU cores:

* `random_surrogate`: no training. Draw 60 residual matrices H = I + 0.15·N(0, 1). HC uses them as they
  are; mHC uses the official Sinkhorn projection of the same logits, transposed as V4 uses it
  (H^res = combᵀ). The composite gain of H_l ⋯ H_0 wanders off (HC) or stays at 1 (mHC).
* `run`: train a deep stack of tiny MLP sublayers (each wrapped by one hyper-connection site, like one half
  of a V4 block) on a toy regression task, under "residual", "hc" and "mhc", and log the loss, the gradient
  norm and, per sublayer, the token-averaged H^res composed from the first sublayer on.

A 27B-scale 3000× blow-up should not be expected here; the point is the mechanism and the metric.
"""
from __future__ import annotations

import time
from functools import partial
from typing import Callable

import torch
from torch import nn

from v4lab import mhc
from v4lab.norm import RMSNorm


def _amax(g: dict) -> list[float]:
    """S5's "Amax gain magnitude" by depth: the larger of the forward and backward gains."""
    return [max(a, b) for a, b in zip(g["fwd_max"], g["bwd_max"])]


def random_surrogate(n_sublayers: int = 60, seed: int = 0, *, n: int = 4, noise: float = 0.15,
                     iters: int = 20, eps: float = 1e-6) -> dict:
    """Composite gains by depth of random H^res = I + noise·N(0, 1) (HC) vs their Sinkhorn projection (mHC).

    Returns {"depth", "hc": gains, "mhc": gains, "hc_peak", "mhc_peak", "mhc_min"} where gains are
    `v4lab.mhc.composite_gains` dicts plus "amax" (max of forward and backward gain) by depth.
    """
    if n_sublayers < 1:
        raise ValueError(f"n_sublayers = {n_sublayers}: must be >= 1")
    g = torch.Generator().manual_seed(seed)
    logits = torch.eye(n, dtype=torch.float64) + noise * torch.randn(n_sublayers, n, n, generator=g,
                                                                    dtype=torch.float64)
    out = {"depth": list(range(1, n_sublayers + 1))}
    for name, h in (("hc", logits), ("mhc", mhc.h_res(mhc.sinkhorn(logits, iters, eps)))):
        gains = mhc.composite_gains(h)
        gains["amax"] = _amax(gains)
        out[name] = gains
    out["hc_peak"] = max(out["hc"]["amax"])
    out["mhc_peak"] = max(out["mhc"]["amax"])
    out["mhc_min"] = min(out["mhc"]["fwd_min"] + out["mhc"]["bwd_min"])
    return out


class Surrogate(nn.Module):
    """embed → n copied streams → [hyper-connection around RMSNorm+MLP] × L → head collapse → norm → linear."""

    def __init__(self, d_in: int, d_out: int, d: int, n: int, n_sublayers: int, mode: str, hidden: int,
                 iters: int = 20, diag: float = 0.0):
        super().__init__()
        self.n = n
        self.embed = nn.Linear(d_in, d)
        self.hcs = nn.ModuleList(mhc.HyperConnection(d, n, mode=mode, iters=iters) for _ in range(n_sublayers))
        for hc in self.hcs:
            hc.init_(diag=diag if mode == "mhc" else 0.0)
        self.norms = nn.ModuleList(RMSNorm(d) for _ in range(n_sublayers))
        self.mlps = nn.ModuleList(nn.Sequential(nn.Linear(d, hidden), nn.SiLU(), nn.Linear(hidden, d))
                                  for _ in range(n_sublayers))
        self.head_hc = mhc.HyperConnection(d, n, mode=mode, head=True)
        self.norm = RMSNorm(d)
        self.out = nn.Linear(d, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:          # x: [B, S, d_in]
        X = mhc.init_streams(self.embed(x), self.n)               # [B, S, n, d]
        for hc, norm, mlp in zip(self.hcs, self.norms, self.mlps):
            u, post, comb = hc(X)
            X = mhc.hc_post(mlp(norm(u)), X, post, comb)
        return self.out(self.norm(self.head_hc(X)))

    def record(self, on: bool = True):
        for hc in self.hcs:
            hc.record = on


def _gains_by_depth(model: Surrogate, x: torch.Tensor) -> dict:
    model.record(True)
    with torch.no_grad():
        model(x)
    model.record(False)
    h = torch.stack([mhc.token_mean_h_res(hc.last_comb) for hc in model.hcs])   # [L, n, n] per sublayer
    gains = mhc.composite_gains(h)
    gains["amax"] = _amax(gains)
    return gains


def run(seed: int = 0, *, n_sublayers: int = 60, d: int = 16, n: int = 4, hidden: int = 32, steps: int = 12,
        batch: int = 64, lr: float = 1e-2, iters: int = 20, diag: float = 0.0,
        variants: tuple = ("residual", "hc", "mhc"), device=None, on_step: Callable | None = None) -> dict:
    """Train the surrogate under each variant from the same seed; return, per variant:

    loss [steps], grad_norm [steps] (total, before any clipping), grad_norm_by_depth [L] (last step, per
    sublayer MLP), gains (composite gains by depth, at init and at the end: {"init": ..., "final": ...}),
    seconds. The task: regress a fixed random tanh teacher from Gaussian inputs (d_in = d, d_out = 4).

    Defaults take ~13 s of one CPU core. Measured (seed 0): HC's composite Amax gain reaches ~1.2e3 after
    12 steps at lr 1e-2 (~12 at lr 3e-3) while mHC's stays 1.000 and the residual's is 1 by construction.
    With base_res = 0 (diag = 0) mHC mixes uniformly and copies of one stream stay copies, so at this
    scale mHC tracks the residual closely; diag > 0 starts it near the identity instead.
    ``on_step`` is called after every training step of every variant (the progress bar).
    """
    from v4lab.device import get_device
    dev = get_device(device)        # argument, else $V4LAB_DEVICE, else CUDA when present
    for v in variants:
        if v not in mhc.MODES:
            raise ValueError(f"variants: {v!r} is not one of {mhc.MODES}")
    if steps < 1 or n_sublayers < 1:
        raise ValueError(f"steps = {steps}, n_sublayers = {n_sublayers}: both must be >= 1")
    g = torch.Generator().manual_seed(seed)
    d_in, d_out = d, 4
    w1, w2 = torch.randn(d_in, 32, generator=g) / d_in ** 0.5, torch.randn(32, d_out, generator=g) / 32 ** 0.5
    xs = torch.randn(steps, batch, 1, d_in, generator=g)
    ys = torch.tanh(xs @ w1) @ w2
    x_eval = torch.randn(batch, 1, d_in, generator=g)
    xs, ys, x_eval = xs.to(dev), ys.to(dev), x_eval.to(dev)      # drawn on the CPU: same data on every device

    result = {"config": dict(seed=seed, n_sublayers=n_sublayers, d=d, n=n, hidden=hidden, steps=steps,
                             batch=batch, lr=lr, iters=iters, diag=diag), "depth": list(range(1, n_sublayers + 1))}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)          # thousands of tiny ops: one thread is faster (restored below)
    try:
        for variant in variants:
            result[variant] = _train(variant, seed, xs, ys, x_eval, d_in, d_out, d, n, n_sublayers, hidden,
                                     iters, diag, lr, on_step)
    finally:
        torch.set_num_threads(threads)
    return result


def _train(variant, seed, xs, ys, x_eval, d_in, d_out, d, n, n_sublayers, hidden, iters, diag, lr,
           on_step=None) -> dict:
    """Train one variant; see `run` for what comes back."""
    t0 = time.perf_counter()
    torch.manual_seed(seed)                                   # same weights for the shared parts
    model = Surrogate(d_in, d_out, d, n, n_sublayers, variant, hidden, iters, diag).to(xs.device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    gains_init = _gains_by_depth(model, x_eval)
    losses, gnorms = [], []
    for step in range(xs.shape[0]):
        loss = torch.nn.functional.mse_loss(model(xs[step]), ys[step])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorms.append(float(torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters()
                                           if p.grad is not None))))
        losses.append(float(loss.detach()))
        opt.step()
        if on_step is not None:
            on_step()
    by_depth = [float(torch.sqrt(sum(p.grad.pow(2).sum() for p in mlp.parameters()))) for mlp in model.mlps]
    return {"loss": losses, "grad_norm": gnorms, "grad_norm_by_depth": by_depth,
            "gains": {"init": gains_init, "final": _gains_by_depth(model, x_eval)},
            "seconds": time.perf_counter() - t0}


QUICK = dict(steps=12, n_sublayers=60, lr=1e-2)
FULL = dict(steps=40, n_sublayers=60, lr=1e-2)


def experiment(quick: bool = False, device=None, progress: bool = False, **changes) -> dict:
    """`v4lab experiment mhc`: the trained surrogate three ways from one seed. Baseline = plain HC,
    treatment = mHC; metric = peak composite Amax gain through depth after training (1 is neutral);
    effect = log10(HC's peak / mHC's peak), > 0 when mHC keeps the gain closer to 1. ``progress``: a bar
    over the three variants' training steps."""
    import math

    from v4lab.progress import bar
    settings = {**(QUICK if quick else FULL), **changes}
    n_variants = len(settings.get("variants", ("residual", "hc", "mhc")))
    with bar(n_variants * settings["steps"], "experiment mhc", progress) as pb:
        r = run(device=device, on_step=partial(pb.update, 1), **settings)

    def side(v):
        g = r[v]["gains"]["final"]
        return {"label": v, "peak_gain": max(g["amax"]), "gain_by_depth": g["amax"],
                "gain_by_depth_init": r[v]["gains"]["init"]["amax"], "loss": r[v]["loss"],
                "final_loss": r[v]["loss"][-1], "grad_norm": r[v]["grad_norm"],
                "grad_norm_by_depth": r[v]["grad_norm_by_depth"]}
    base, treat = side("hc"), side("mhc")
    return {"metric": "peak_gain", "baseline": base, "treatment": treat,
            "effect": math.log10(base["peak_gain"] / treat["peak_gain"]), "settings": r["config"],
            "details": {"residual": side("residual"), "depth": r["depth"]}}
