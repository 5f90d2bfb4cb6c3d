"""Small seeded experiments behind the notebooks: each module exposes `run(seed=0, ...) -> dict`."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from v4lab.model import V4Model


def repo_path(path: str | Path) -> Path:
    """``path`` as given, or, when it is relative and not found from the working folder, relative to the
    repository (notebooks run with notebooks/ as the working folder, and name the models as data/...)."""
    p = Path(path)
    if not p.is_absolute() and not p.exists():
        p = Path(__file__).resolve().parents[2] / p
    return p


def load_masters(model_dir: str | Path, device: str | torch.device | None = None) -> V4Model:
    """A saved model (``repo_path`` of ``model_dir``) with its FP8/FP4 weights dequantised into fp32
    parameters, the starting point of an experiment that trains or re-rounds them."""
    from v4lab import model as model_mod
    return model_mod.load(repo_path(model_dir), keep_quantized=False, device=device)
