"""One setting for where things run: an argument, else $V4LAB_DEVICE, else CUDA when present, else CPU.

Triton kernels follow the same choice: compiled on CUDA, run by Triton's interpreter on CPU
(TRITON_INTERPRET=1 must be set before a kernel module is imported; v4lab.kernels does it).
"""
from __future__ import annotations

import os

import torch


def get_device(device: str | torch.device | None = None) -> torch.device:
    choice = device if device is not None else os.environ.get("V4LAB_DEVICE", "")
    choice = str(choice).strip()
    if choice in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(choice)
    except RuntimeError:
        raise ValueError(f"device {choice!r}: not a torch device (use cpu, cuda, cuda:N or auto)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {choice!r}: CUDA is not available on this machine (use cpu or auto)")
    return dev


def kernel_mode() -> str:
    """'interpreter' when Triton kernels run under TRITON_INTERPRET=1, else 'compiled'."""
    return "interpreter" if os.environ.get("TRITON_INTERPRET", "0") == "1" else "compiled"
