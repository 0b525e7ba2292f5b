"""Kernel tests run the Triton kernels on CPU through the interpreter when there is no GPU.

``triton.jit`` reads TRITON_INTERPRET when it decorates a kernel (when a kernels/ module is imported), so it is
set here, before any test module imports kernels/.
It is only set when CUDA is absent (on a GPU the same tests run the compiled kernels) and only for this
directory: pytest loads this conftest when it collects tests/kernels.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
