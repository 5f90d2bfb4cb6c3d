"""Small seeded experiments behind the notebooks: each module exposes `run(seed=0, ...) -> dict`."""
from __future__ import annotations

from pathlib import Path


def repo_path(path: str | Path) -> Path:
    """``path`` as given, or, when it is relative and not found from the working folder, relative to the
    repository (notebooks run with notebooks/ as the working folder, and name the models as data/...)."""
    p = Path(path)
    if not p.is_absolute() and not p.exists():
        p = Path(__file__).resolve().parents[2] / p
    return p
