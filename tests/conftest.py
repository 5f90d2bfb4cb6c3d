import os

# Kernels are interpreted on CPU; this must be set before any @triton.jit is defined.
os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
