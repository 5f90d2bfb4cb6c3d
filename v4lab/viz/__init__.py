"""Figures and widgets for the notebooks: one module per notebook topic, all on the pattern of
:mod:`v4lab.viz.common` (a pure ``build_x`` figure builder + a ``Widget`` subclass updated in place).

:func:`load_all` imports every topic module so :data:`REGISTRY` lists every widget (the
``v4lab bench widgets`` benchmark and the tests iterate over it). A new notebook's module is added to
``TOPICS``.
"""
from __future__ import annotations

import importlib

from v4lab.viz.common import REGISTRY, Widget, register, static_mode, sweep

TOPICS = ["tour", "moe", "attention", "cost", "mhc", "fp4", "kernels", "clamp", "stability", "tiny", "real", "ep", "decode", "deploy"]
# The widgets that run the notebooks' trained model (the others read configs, stored results or a download).
MODEL_WIDGETS = ("attention.inspect", "attention.compression", "attention.compare",
                 "tiny.routing", "tiny.attention_maps", "tiny.mtp", "moe.bias", "clamp.preacts",
                 "decode.steps", "moe.specialisation", "moe.load", "mhc.model", "clamp.overview", "fp4.experts")


def load_all() -> dict:
    """Import every topic module (registering its widgets) and return the registry."""
    for t in TOPICS:
        importlib.import_module(f"v4lab.viz.{t}")
    return REGISTRY


__all__ = ["REGISTRY", "Widget", "register", "static_mode", "sweep", "load_all", "TOPICS", "MODEL_WIDGETS"]
