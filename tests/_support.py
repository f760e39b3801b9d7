"""Test helpers: backends to run, op input builders, tolerance checks against the float64 reference, and the
prompt / grid builders of the Hugging Face tests (the tiny models themselves come from :mod:`flowkern.hf.tiny`)."""

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

TOL = {  # docs/reliability.md, tightened where the kernels allow
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


# ----------------------------------------------------------------------------------------------------------
# prompts and grids for the tiny-model tests


def left_pad(rows: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``input_ids`` and ``attention_mask`` ``[B, max len]`` from token lists."""
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


SEGMENT = {"sys": 0, "img": 1, "user": 2}
"""Hand-written segment labels (flowkern.hf.segments' ids, written out)."""


def labelled_prompts(samples: list[list[tuple[str, list[int]]]], pad: int = 0
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded ``input_ids``, ``attention_mask`` and hand-written labels (-1 = padding) from pieces
    ``(segment name, tokens)``."""
    rows, labels = [], []
    for pieces in samples:
        ids, lab = [], []
        for name, toks in pieces:
            ids += toks
            lab += [SEGMENT[name]] * len(toks)
        rows.append(ids)
        labels.append(lab)
    ids, mask = left_pad(rows, pad)
    width = ids.shape[1]
    lab = torch.tensor([[-1] * (width - len(r)) + r for r in labels])
    return ids, mask, lab


def raster(start: int, rows: int, cols: int, row_stride: int | None = None) -> torch.Tensor:
    """Sequence positions of a row-major token grid starting at ``start`` (``row_stride`` skips newline tokens)."""
    stride = cols if row_stride is None else row_stride
    return start + torch.arange(rows)[:, None] * stride + torch.arange(cols)[None, :]
