"""Anticipatory Routing and the loss-spike detector that turns it on (docs/design/v4-moe-mhc-fp4.md §4).

θ_t are the parameters (router biases included) *before* step t's update. While Anticipatory Routing (AR)
is on, the routes of the batch of step t+Δt are computed at step t with θ_t and kept, so step t uses the
top-k choice of θ_{t−Δt}; the gate weights still come from θ_t at those ids, so the router keeps its
gradient. When AR turns on at step t0 the routes of steps t0..t0+Δt−1 come from older snapshots where the
caller has them, else from θ_{t0} (there is nothing older).

Δt, the detector, the rollback depth and AR's duration are not given in the report, so they are settings
(``v4lab.trainconfig.TrainConfig``). The three parts here hold no model: the trainer passes the functions
that route a batch, and the snapshots it takes.

* ``AnticipatoryRouting``: the scheduler: which routes step t uses, and the look-ahead.
* ``SpikeDetector``: ``loss > ratio · EMA`` of the losses before it, from ``min_step`` on, then quiet.
* ``RollbackBuffer``: the last ``keep + 1`` snapshots, the oldest of which a rollback restores.
"""
from __future__ import annotations

from typing import Any, Callable

Routes = Any                      # what V4Model.route_only returns: forced routes per MoE layer


class AnticipatoryRouting:
    """Routes chosen ``lag`` steps ahead. ``routes_now(t)``: the routes of step t's batch under the current
    parameters; ``routes_then(snapshot, t)``: under a snapshot's."""

    def __init__(self, lag: int, routes_now: Callable[[int], Routes],
                 routes_then: Callable[[dict, int], Routes]):
        self.lag = lag
        self.routes_now, self.routes_then = routes_now, routes_then
        self.on = False
        self.until = -1               # spike mode: AR goes off after step until − 1
        self.pending: dict[int, Routes] = {}

    def start(self, t: int, older: dict[int, dict] | None = None, until: int = -1) -> None:
        """Turn AR on at step ``t``: the routes of steps t..t+Δt−1 with θ_{t+j−Δt} where ``older`` (snapshots
        by step) holds it, else with the current θ."""
        self.on, self.until = True, until
        self.pending.clear()
        for j in range(self.lag):
            snap = (older or {}).get(t + j - self.lag)
            self.pending[t + j] = self.routes_now(t + j) if snap is None else self.routes_then(snap, t + j)

    def routes(self, step: int) -> Routes | None:
        """The routes step ``step`` must use (None: route with the current parameters)."""
        return self.pending.pop(step) if self.on else None

    def look_ahead(self, step: int) -> None:
        """At step t, before the update: route the batch of step t+Δt with θ_t."""
        if step + self.lag not in self.pending:
            self.pending[step + self.lag] = self.routes_now(step + self.lag)

    def expired(self, step: int) -> bool:
        return self.on and step + 1 >= self.until

    def stop(self) -> None:
        self.on = False
        self.pending.clear()


class SpikeDetector:
    """A loss spike: ``loss > ratio · EMA`` where the EMA (decay ``beta``) has not yet seen this loss, from
    step ``min_step`` on, and not before the step given to ``quiet`` after a detection."""

    def __init__(self, ratio: float, beta: float, min_step: int):
        self.ratio, self.beta, self.min_step = ratio, beta, min_step
        self.ema: float | None = None
        self.quiet_until = -1

    def fires(self, step: int, loss: float) -> bool:
        return (step >= self.quiet_until and self.ema is not None and step >= self.min_step
                and loss > self.ratio * self.ema)

    def quiet(self, until: int) -> None:
        self.quiet_until = until

    def absorb(self, loss: float) -> None:
        """Fold a loss that was not a spike into the EMA."""
        self.ema = loss if self.ema is None else self.beta * self.ema + (1 - self.beta) * loss


class RollbackBuffer:
    """The snapshots of the last ``keep + 1`` steps (``{"step", ...}`` dicts); a rollback goes to the oldest."""

    def __init__(self, keep: int):
        self.keep = keep
        self.snaps: list[dict] = []

    def push(self, snap: dict) -> None:
        self.snaps.append(snap)
        self.snaps = self.snaps[-(self.keep + 1):]

    @property
    def ready(self) -> bool:
        """There is an older snapshot than this step's to go back to."""
        return len(self.snaps) > 1

    @property
    def oldest(self) -> dict:
        return self.snaps[0]

    def take(self) -> list[dict]:
        """Empty the buffer, returning what it held."""
        snaps, self.snaps = self.snaps, []
        return snaps
