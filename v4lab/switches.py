"""The run-time switches of a forward, in one object, and the record a forward fills for its caller.

A ``V4Model`` holds one :class:`Switches` (``model.switches``) and hands that same object to every layer
it builds, so one assignment changes every layer and nothing else is swapped: the layers read the object
on each call. A layer built on its own (``Attention(cfg, i)``) has a fresh one.

* ``kernels`` — the hot ops run through the Triton kernels (``v4lab.kernels``) instead of the torch
  references beside them (same signatures, same results; ``V4Model.use_kernels`` sets it after checking
  the device);
* ``check_finite`` — mHC raises on inf/nan mixing logits (a host sync per site; off in hot loops);
* ``inspect`` / ``distill`` — the layer ids whose attention records what each query read
  (``Attention.last_inspect``) / computes the indexer's warm-up loss (``Attention.last_distill``);
* ``record`` — a :class:`ForwardRecord` owned by the caller (``with model.recording() as rec``): every MoE
  layer adds its routing, every mHC site its token-mean H^res, so a training step reads the statistics
  of *its* forward from an object it holds.
"""
from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field


class ForwardRecord:
    """What the forwards run while it is installed report: ``routing`` {MoE module: {"idx" [T, K],
    "weights" [T, K], "scores" [T, E] (with its graph, for the balance loss), "load" [E]}} (the latest call
    of each layer), and with ``h_res=True`` the token-mean H^res [n, n] of every mHC site in call order."""

    def __init__(self, h_res: bool = False):
        # weak keys: a record held by a layer's switches must not keep that layer alive (or form a cycle)
        self.routing: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.h_res: list | None = [] if h_res else None

    def add_routing(self, moe: object, routing: dict) -> None:
        self.routing[moe] = routing

    def routing_of(self, moe: object) -> dict | None:
        """The routing ``moe`` (an MoE module) recorded, None if it did not run."""
        return self.routing.get(moe)


@dataclass
class Switches:
    kernels: bool = False
    check_finite: bool = True
    inspect: set[int] = field(default_factory=set)
    distill: set[int] = field(default_factory=set)
    record: ForwardRecord | None = None


def share_switches(module: object, switches: Switches) -> None:
    """Point every submodule of ``module`` that reads switches at the one object ``switches`` (done once,
    when a model is built or a block is put into it)."""
    for m in module.modules():
        if hasattr(m, "switches"):
            m.switches = switches


@contextlib.contextmanager
def recording(switches: Switches, h_res: bool = False) -> Iterator[ForwardRecord]:
    """Install a fresh ForwardRecord on ``switches`` for the ``with`` block (the previous one, if any, is
    put back after it) and yield it."""
    rec, old = ForwardRecord(h_res), switches.record
    switches.record = rec
    try:
        yield rec
    finally:
        switches.record = old
