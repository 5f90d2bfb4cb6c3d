import os

# Kernels are interpreted on CPU; this must be set before any @triton.jit is defined.
os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

# Tests use tiny shapes: one thread avoids OpenMP hand-off costs that dominate small ops.
torch.set_num_threads(1)
