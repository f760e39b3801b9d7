"""Small helpers shared by flowkern's Triton launchers (no kernels here)."""

from __future__ import annotations

import functools
import math
import os

import torch
import triton

LOG2E = math.log2(math.e)  # exp(x) = exp2(x * LOG2E)
MAX_GRID_Y = 65535  # CUDA limit on grid axes 1 and 2


def interpreting() -> bool:
    """True when Triton runs kernels in its numpy interpreter (``TRITON_INTERPRET=1``, CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def upcast_dot_operands(dtype: torch.dtype) -> bool:
    """Whether kernels must cast ``tl.dot`` operands to fp32.

    Triton's interpreter stores bfloat16 as raw uint16 and multiplies those integers in ``tl.dot``, so a bf16
    dot returns garbage there (fp16 and fp32 are fine). Only in that case do the kernels upcast; on a GPU the
    native bf16 tensor-core dot runs.
    """
    return interpreting() and dtype == torch.bfloat16


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` for the kernels' main dots: exact fp32 for fp32 inputs (tf32 would cost ~1e-3
    relative error on the scores); for 16-bit inputs the value is ignored by Triton."""
    return "ieee" if dtype == torch.float32 else "tf32"


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (1 for CPU tensors under the interpreter: never split there
    unless asked)."""
    if device.type != "cuda":
        return 1
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def block_d(head_dim: int) -> int:
    """Head-dim tile: the next power of two (>= 16, tl.dot's minimum); loads beyond ``head_dim`` are masked."""
    return max(16, triton.next_power_of_2(head_dim))

