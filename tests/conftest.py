"""Shared test setup.

Without a GPU, Triton kernels run through the interpreter on CPU tensors: TRITON_INTERPRET must be set before
triton is first imported, hence here, at collection start. With a GPU the Triton backend runs on CUDA tensors.
"""

from __future__ import annotations

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.pop("FLOWKERN_BACKEND", None)  # tests choose backends explicitly

torch.set_num_threads(min(2, os.cpu_count() or 1))
