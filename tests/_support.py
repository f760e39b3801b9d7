"""Helpers for op tests: backends to run, input builders, tolerance checks against the float64 reference."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import pytest
import torch

from flowkern import ops

HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _triton_param() -> object:
    if HAS_CUDA:
        return pytest.param(("triton", "cuda"), id="triton-cuda")
    if INTERPRET:
        return pytest.param(("triton", "cpu"), id="triton-interp")
    return pytest.param(("triton", "cpu"), id="triton-interp", marks=pytest.mark.skip("needs TRITON_INTERPRET=1"))


CPP = pytest.param(
    ("cpp", "cpu"), id="cpp", marks=pytest.mark.skipif(not ops.cpp_available(), reason="flowkern._C not built")
)
TRITON = _triton_param()
REFERENCE = pytest.param(("reference", "cpu"), id="reference")
ALL_BACKENDS = [CPP, TRITON, REFERENCE]

TOL = {  # DESIGN.md §6, tightened where the kernels allow
    torch.float32: dict(out=2e-5, mass=1e-5, lse=1e-5),
    torch.float16: dict(out=1e-2, mass=5e-3, lse=5e-3),
    torch.bfloat16: dict(out=1e-2, mass=5e-3, lse=1e-2),
}


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    old = os.environ.get("FLOWKERN_BACKEND")
    os.environ["FLOWKERN_BACKEND"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("FLOWKERN_BACKEND", None)
        else:
            os.environ["FLOWKERN_BACKEND"] = old


def poison_allocator(device: str, numel: int) -> None:
    """Allocate, NaN-fill and free a buffer so that memory handed out next is likely to hold NaNs.

    Outputs that a kernel forgets to write then show up as NaN / mismatches instead of lucky zeros.
    """
    buf = torch.full((numel,), float("nan"), device=device)
    del buf


def padding_mask(kind: str, b: int, sk: int, gen: torch.Generator) -> torch.Tensor | None:
    """None, or a bool [B, Sk] mask with left or right padding of random length per row (row 0 unpadded)."""
    if kind == "none":
        return None
    mask = torch.ones(b, sk, dtype=torch.bool)
    for row in range(1, b):
        n = int(torch.randint(1, max(2, sk // 2), (1,), generator=gen))
        if kind == "left":
            mask[row, :n] = False
        elif kind == "right":
            mask[row, sk - n :] = False
        elif kind == "all":
            mask[row] = False
        else:
            raise AssertionError(kind)
    return mask


def make_qkv(
    b: int, hq: int, hkv: int, sq: int, sk: int, d: int, dtype: torch.dtype, device: str, seed: int,
    noncontiguous: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fresh random q [B,Hq,Sq,D], k/v [B,Hkv,Sk,D]; optionally as transposed views of [B,S,H,D] storage."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(h: int, s: int) -> torch.Tensor:
        if noncontiguous:
            t = torch.randn(b, s, h, d, generator=gen).transpose(1, 2)
        else:
            t = torch.randn(b, h, s, d, generator=gen)
        return t.to(device=device, dtype=dtype)

    return rnd(hq, sq), rnd(hkv, sk), rnd(hkv, sk)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x - ref| / max(|ref|, tiny), in float64."""
    x, ref = x.double().cpu(), ref.double().cpu()
    return float((x - ref).abs().max() / ref.abs().max().clamp_min(1e-30)) if ref.numel() else 0.0


def max_abs(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double().cpu(), ref.double().cpu()
    both_inf = torch.isinf(x) & torch.isinf(ref) & (torch.sign(x) == torch.sign(ref))
    diff = torch.where(both_inf, 0.0, (x - ref).abs())
    return float(diff.max()) if diff.numel() else 0.0
