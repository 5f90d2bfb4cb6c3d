"""One setting for where things run: an argument, else $V4LAB_DEVICE, else CUDA when present, else CPU.

Models, experiments, benchmarks and notebooks all call :func:`get_device`; notebooks print
:func:`describe` so a reader sees which path ran.

Triton kernels follow the same choice: compiled on CUDA, run by Triton's interpreter on CPU. The
interpreter must be switched on (TRITON_INTERPRET=1) before a kernel module is imported, because
``@triton.jit`` reads it when a kernel is defined; ``v4lab.kernels`` does that on import when there is
no CUDA or when $V4LAB_DEVICE says cpu. :func:`check_kernel_device` turns a mismatch (kernels compiled
for the GPU, tensors on the CPU) into a clear error instead of a driver message.
"""
from __future__ import annotations

import os

import torch

ENV = "V4LAB_DEVICE"
SUPPORTED = ("cpu", "cuda")


def get_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` (``cpu``, ``cuda``, ``cuda:N``, ``auto`` or a torch.device), else $V4LAB_DEVICE, else
    CUDA when available, else CPU. Bad values raise ValueError naming where the value came from."""
    source = "device"
    if device is None:
        device, source = os.environ.get(ENV, ""), f"${ENV}"
    if isinstance(device, torch.device):
        choice = str(device)
    elif isinstance(device, str):
        choice = device.strip().lower()
    else:
        raise ValueError(f"{source} = {device!r}: must be a string (cpu, cuda, cuda:N, auto) or a torch.device")
    if choice in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(choice)
    except RuntimeError:
        raise ValueError(f"{source} = {choice!r}: not a torch device (use cpu, cuda, cuda:N or auto)") from None
    if dev.type not in SUPPORTED:
        raise ValueError(f"{source} = {choice!r}: v4lab runs on {' or '.join(SUPPORTED)} (or auto)")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{source} = {choice!r}: CUDA is not available on this machine (use cpu or auto)")
        n = torch.cuda.device_count()
        if dev.index is not None and not 0 <= dev.index < n:
            raise ValueError(f"{source} = {choice!r}: this machine has {n} CUDA device(s), cuda:0..cuda:{n - 1}")
    return dev


def _wants_interpreter() -> bool:
    """No CUDA, or $V4LAB_DEVICE asks for the CPU: kernels must be interpreted."""
    return not torch.cuda.is_available() or os.environ.get(ENV, "").strip().lower().startswith("cpu")


def kernel_mode() -> str:
    """'interpreter' when Triton kernels run (or, once v4lab.kernels is imported, will run) under
    TRITON_INTERPRET=1, else 'compiled'. An explicit TRITON_INTERPRET wins."""
    v = os.environ.get("TRITON_INTERPRET")
    if v is not None:
        return "interpreter" if v == "1" else "compiled"
    return "interpreter" if _wants_interpreter() else "compiled"


def configure_triton() -> str:
    """Called by ``v4lab.kernels`` on import (before any ``@triton.jit``): set TRITON_INTERPRET=1 when
    there is no CUDA or $V4LAB_DEVICE says cpu, unless the user set TRITON_INTERPRET. Returns the mode."""
    if "TRITON_INTERPRET" not in os.environ and _wants_interpreter():
        os.environ["TRITON_INTERPRET"] = "1"
    return kernel_mode()


def check_kernel_device(device: str | torch.device | None = None) -> torch.device:
    """The device kernels will see, checked against the Triton mode fixed at import time.

    Compiled kernels cannot take CPU tensors; interpreted kernels on a GPU would run (copying through
    host memory) but measure nothing, so both mismatches raise with the fix."""
    dev = get_device(device)
    mode = kernel_mode()
    if dev.type == "cpu" and mode == "compiled":
        raise ValueError(f"device = 'cpu' but Triton kernels are compiled for CUDA (TRITON_INTERPRET is not 1): "
                         f"set {ENV}=cpu (or TRITON_INTERPRET=1) before importing v4lab.kernels")
    if dev.type == "cuda" and mode == "interpreter":
        raise ValueError(f"device = {str(dev)!r} but TRITON_INTERPRET=1 makes Triton interpret kernels on the CPU: "
                         f"unset TRITON_INTERPRET (and {ENV}) before importing v4lab.kernels to compile them")
    return dev


def gpu_name(device: str | torch.device | None = None) -> str | None:
    """``torch.cuda.get_device_name`` of the chosen device, None on CPU."""
    dev = get_device(device)
    if dev.type != "cuda":
        return None
    return torch.cuda.get_device_name(dev)


def device_info(device: str | torch.device | None = None) -> dict:
    """{device, type, gpu_name, gpu_key (hardware.json entry or None), kernel_mode, source}."""
    from v4lab import hardware

    explicit = device is not None
    dev = get_device(device)
    name = gpu_name(dev)
    source = "argument" if explicit else (f"${ENV}" if os.environ.get(ENV, "").strip().lower() not in ("", "auto")
                                          else "auto")
    return {"device": str(dev), "type": dev.type, "gpu_name": name,
            "gpu_key": hardware.identify_gpu(name) if name else None,
            "kernel_mode": kernel_mode(), "source": source, "torch": torch.__version__}


def describe(device: str | torch.device | None = None) -> str:
    """One line for notebooks: where tensors live and how Triton kernels run, e.g.
    ``device cpu (auto: no CUDA) · Triton kernels interpreted on the CPU (TRITON_INTERPRET=1): checks
    correctness, timings are not performance``."""
    info = device_info(device)
    why = {"argument": "chosen by argument", f"${ENV}": f"from ${ENV}",
           "auto": "auto: CUDA present" if torch.cuda.is_available() else "auto: no CUDA"}[info["source"]]
    where = f"device {info['device']}" + (f" = {info['gpu_name']}" if info["gpu_name"] else "") + f" ({why})"
    if info["kernel_mode"] == "interpreter":
        how = ("Triton kernels interpreted on the CPU (TRITON_INTERPRET=1): checks correctness, "
               "timings are not performance")
    else:
        import triton
        how = f"Triton {triton.__version__} kernels compiled for the GPU"
        if info["gpu_name"] and info["gpu_key"] is None:
            how += " (GPU not in hardware.json: no roofline fractions)"
    if info["type"] == "cpu" and info["kernel_mode"] == "compiled":
        how += f" — mismatch: set {ENV}=cpu before importing v4lab.kernels"
    return f"{where} · {how}"
