import os

# Kernels are interpreted on CPU; this must be set before any @triton.jit is defined.
os.environ.setdefault("TRITON_INTERPRET", "1")
# ...and models stay on the CPU too, even on a GPU box (tests that need another choice monkeypatch it).
os.environ.setdefault("V4LAB_DEVICE", "cpu")

import torch  # noqa: E402

# Tests use tiny shapes: one thread avoids OpenMP hand-off costs that dominate small ops.
torch.set_num_threads(1)
