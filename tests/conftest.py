"""Shared test setup.

Without a GPU, Triton kernels run through the interpreter on CPU tensors: TRITON_INTERPRET must be set before
triton is first imported, hence here, at collection start. With a GPU the Triton backend runs on CUDA tensors.
"""

from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.pop("FLOWKERN_BACKEND", None)  # tests choose backends explicitly

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-model tests (fastest for tiny matmuls, and immune to a loaded machine);
    use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
