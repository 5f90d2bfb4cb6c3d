"""Triton kernels for V4's hot ops, importable as ``v4lab.kernels``.

Each kernel module sits beside the v4lab function it must equal and has the same signature.
Without CUDA, kernels run under Triton's interpreter: we set TRITON_INTERPRET=1 here, before any
``@triton.jit`` is defined, unless the user chose otherwise.
"""
import os

if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
