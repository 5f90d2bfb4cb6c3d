"""v4lab: readable reference code, kernels and explainers for the DeepSeek-V4 architecture."""
from v4lab.config import PRESETS, V4Config, get_config

__version__ = "0.1.0"
__all__ = ["V4Config", "get_config", "PRESETS", "load", "save"]


def load(path, **kwargs):
    """Load a model directory in the official release layout (see v4lab.model.load)."""
    from v4lab.model import load as _load
    return _load(path, **kwargs)


def save(model, path, **kwargs):
    """Write a model in the official release layout (see v4lab.model.save)."""
    from v4lab.model import save as _save
    return _save(model, path, **kwargs)
