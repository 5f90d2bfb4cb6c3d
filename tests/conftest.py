import os

# Kernels are interpreted on CPU; this must be set before any @triton.jit is defined.
os.environ.setdefault("TRITON_INTERPRET", "1")
# ...and models stay on the CPU too, even on a GPU box (tests that need another choice monkeypatch it).
os.environ.setdefault("V4LAB_DEVICE", "cpu")

import torch  # noqa: E402

# Tests use tiny shapes: one thread avoids OpenMP hand-off costs that dominate small ops.
torch.set_num_threads(1)

# The test suite runs the fast trained model: data/tiny-v4, pinned by name through $V4LAB_WEIGHTS (without
# it, v4lab.viz.trained picks data/lab-v4 when present: what the notebooks use). Tests of lab-v4 figures
# ask for it explicitly with trained_model(name="lab-v4") and skip when it is absent.
_TINY_V4 = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "tiny-v4")
if os.path.isfile(os.path.join(_TINY_V4, "config.json")):
    os.environ.setdefault("V4LAB_WEIGHTS", _TINY_V4)
