"""Triton kernels for V4's hot ops, importable as ``v4lab.kernels``.

Each kernel module sits beside the v4lab function it must equal and has the same signature.
Without CUDA (or with V4LAB_DEVICE=cpu), kernels run under Triton's interpreter: we set
TRITON_INTERPRET=1 here, before any ``@triton.jit`` is defined, unless the user chose otherwise
(``v4lab.device.configure_triton``).
"""
import os

from v4lab.device import configure_triton

configure_triton()


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
