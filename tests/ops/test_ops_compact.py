"""flowkern.compact_: every backend vs the reference (docs/ops.md, docs/reliability.md).

What is checked after each call: the returned views share storage with the inputs and have length
``L = max(lengths)``; ``lengths == keep.sum(1)``; in every row the first ``lengths[b]`` positions equal the
reference bit for bit (so the order is kept: the reference is stable, and a separate test checks stability
against a plain Python list); positions ``lengths[b] .. L-1`` are finite; positions ``>= L`` and every byte of
the underlying buffer outside the tensor (slices, strided views, a padded static cache) are unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import flowkern
from flowkern import reference
from tests.fixtures import CPP, INTERPRET, REFERENCE, TRITON, backend

BACKENDS = [CPP, TRITON, REFERENCE]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DEVICE_OF = {"cpp": "cpu", "reference": "cpu", "triton": "cuda" if torch.cuda.is_available() else "cpu"}


# ------------------------------------------------------------------------------------------------ builders


def make_keep(kind: str, b: int, s: int, gen: torch.Generator) -> torch.Tensor:
    """bool [B, S]: random / ragged (a different keep rate per row) / edge (all, none, one) / span (an image
    block dropped, as in pruning) / single / all_true / all_false."""
    r = torch.rand(b, s, generator=gen)
    if kind == "random":
        keep = r > 0.5
    elif kind == "ragged":
        keep = r < torch.linspace(0.2, 0.9, b)[:, None]
    elif kind == "edge":  # row 0 all kept, row 1 none, row 2 exactly one
        keep = r > 0.5
        keep[0] = True
        if b > 1:
            keep[1] = False
        if b > 2:
            keep[2] = False
            keep[2, int(torch.randint(0, s, (1,), generator=gen))] = True
    elif kind == "span":
        keep = torch.ones(b, s, dtype=torch.bool)
        for row in range(b):
            lo = int(torch.randint(1, s // 3, (1,), generator=gen))
            keep[row, lo : lo + s // 2 + row] = False
    elif kind == "single":
        keep = torch.zeros(b, s, dtype=torch.bool)
        keep[torch.arange(b), torch.randint(0, s, (b,), generator=gen)] = True
    elif kind == "all_true":
        keep = torch.ones(b, s, dtype=torch.bool)
    elif kind == "all_false":
        keep = torch.zeros(b, s, dtype=torch.bool)
    else:
        raise AssertionError(kind)
    return keep


def make_tensor(
    shape: tuple[int, ...], dim: int, layout: str, dtype: torch.dtype, device: str, gen: torch.Generator
) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """A random buffer and the view of it to compact (``view_of(buffer)``).

    contig: the buffer itself; transposed: [B, H, S, D] as a view of [B, S, H, D]; sliced: the last dim
    narrowed at an odd offset (misaligned rows); strided_inner: every other element of the last dim;
    padded_seq: the sequence dim narrowed inside a longer buffer (a static cache).
    """
    if layout == "transposed":
        assert len(shape) == 4 and dim == 2
        b, h, s, d = shape
        full, view_of = (b, s, h, d), (lambda x: x.transpose(1, 2))
    elif layout == "sliced":
        full, view_of = (*shape[:-1], shape[-1] + 3), (lambda x: x[..., 1 : 1 + shape[-1]])
    elif layout == "strided_inner":
        full, view_of = (*shape[:-1], 2 * shape[-1]), (lambda x: x[..., ::2])
    elif layout == "padded_seq":
        full = tuple(n + 5 if i == dim else n for i, n in enumerate(shape))
        view_of = lambda x: x.narrow(dim, 2, shape[dim])
    else:
        assert layout == "contig"
        full, view_of = shape, (lambda x: x)
    buf = (torch.randn(full, generator=gen) * 3 + 1).to(dtype=dtype, device=device)
    assert tuple(view_of(buf).shape) == shape
    return buf, view_of


def check_compacted(
    bufs: list[torch.Tensor], views_of: list[Callable], origs: list[torch.Tensor], dims: list[int],
    keep: torch.Tensor, out_views: list[torch.Tensor], lengths: torch.Tensor,
) -> None:
    """Compare the compacted buffers with the reference applied to copies of the originals."""
    expected = [o.clone() for o in origs]
    ref_views, ref_len = reference.compact_([v(e) for v, e in zip(views_of, expected, strict=True)],
                                            keep.cpu(), dims)
    assert lengths.dtype == torch.int64 and lengths.device == keep.device
    assert torch.equal(lengths.cpu(), keep.cpu().sum(1))
    assert torch.equal(lengths.cpu(), ref_len)
    L = int(ref_len.max()) if ref_len.numel() else 0
    for i, (buf, view_of, orig, d, out) in enumerate(zip(bufs, views_of, origs, dims, out_views, strict=True)):
        x = view_of(buf)
        assert out.untyped_storage().data_ptr() == x.untyped_storage().data_ptr(), f"tensors[{i}]: not a view"
        assert out.storage_offset() == x.storage_offset() and out.stride() == x.stride() and out.shape[d] == L
        assert tuple(out.shape) == tuple(ref_views[i].shape)
        xc, ec, oc = x.cpu(), view_of(expected[i]), view_of(orig)
        for b, n in enumerate(ref_len.tolist()):
            got, want = xc[b].narrow(d - 1, 0, n), ec[b].narrow(d - 1, 0, n)
            assert torch.equal(got, want), f"tensors[{i}] row {b}: kept prefix differs from the reference"
            assert torch.isfinite(xc[b].narrow(d - 1, n, L - n).float()).all()
        S = x.shape[d]
        assert torch.equal(xc.narrow(d, L, S - L), oc.narrow(d, L, S - L)), f"tensors[{i}]: touched beyond L"
        # every byte of the buffer outside the view is unchanged
        got_buf, want_buf = buf.cpu().clone(), orig.clone()
        view_of(got_buf).zero_()
        view_of(want_buf).zero_()
        assert torch.equal(got_buf, want_buf), f"tensors[{i}]: bytes outside the tensor changed"


def run_case(be: str, device: str, specs: list[tuple], keep: torch.Tensor, dim: int | list[int], seed: int) -> None:
    """specs: (shape, dim, layout, dtype) per tensor."""
    gen = torch.Generator().manual_seed(seed)
    made = [make_tensor(shape, d, layout, dtype, device, gen) for shape, d, layout, dtype in specs]
    bufs, views_of = [m[0] for m in made], [m[1] for m in made]
    origs = [b.cpu().clone() for b in bufs]
    tensors = [v(b) for v, b in zip(views_of, bufs, strict=True)]
    keep = keep.to(device)
    with backend(be):
        out_views, lengths = flowkern.compact_(tensors, keep, dim)
    check_compacted(bufs, views_of, origs, [s[1] for s in specs], keep, out_views, lengths)


# ------------------------------------------------------------------------------------------------ tests

# (name, B, shape without B, seq dim, layout, keep kind)
CASES = [
    ("kv-edge", 3, (2, 37, 16), 2, "contig", "edge"),
    ("kv-ragged-transposed", 3, (2, 131, 64), 2, "transposed", "ragged"),
    ("kv-span-sliced", 1, (3, 53, 8), 2, "sliced", "span"),
    ("kv-random-strided", 3, (2, 29, 12), 2, "strided_inner", "random"),
    ("kv-random-padded", 3, (2, 45, 32), 2, "padded_seq", "random"),
    ("hidden-span", 3, (131, 48), 1, "contig", "span"),
    ("hidden-single-sliced", 1, (37, 20), 1, "sliced", "single"),
    ("hidden-all-true", 3, (40, 24), 1, "contig", "all_true"),
    ("hidden-all-false", 3, (40, 24), 1, "padded_seq", "all_false"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("be_dev", BACKENDS)
def test_compact_matches_reference(be_dev, case, dtype):
    be, _ = be_dev
    name, b, rest, dim, layout, keep_kind = case
    seed = sum(map(ord, name)) + DTYPES.index(dtype)
    gen = torch.Generator().manual_seed(seed)
    keep = make_keep(keep_kind, b, rest[dim - 1], gen)
    run_case(be, DEVICE_OF[be], [((b, *rest), dim, layout, dtype)], keep, dim, seed)


@pytest.mark.parametrize("per_tensor_dims", [False, True], ids=["dim=-2", "dims-list"])
@pytest.mark.parametrize("be_dev", BACKENDS)
def test_compact_mixed_list(be_dev, per_tensor_dims):
    """Hidden states + two layers of K and V of different dtypes/layouts in one call (one launch on Triton)."""
    be, _ = be_dev
    B, H, S, D = 3, 4, 70, 32
    specs = [
        ((B, S, 96), 1, "contig", torch.float32),  # hidden
        ((B, H, S, D), 2, "contig", torch.float16),  # layer 0 K
        ((B, H, S, D), 2, "transposed", torch.float16),  # layer 0 V
        ((B, 2, S, D), 2, "contig", torch.bfloat16),  # layer 1 K (GQA: fewer heads)
        ((B, 2, S, 48), 2, "sliced", torch.float32),  # layer 1 V
        ((B, S, 5), 1, "contig", torch.float16),  # a small-row tensor (its own launch group on Triton)
    ]
    keep = make_keep("ragged", B, S, torch.Generator().manual_seed(7))
    keep[1, 3:40] = False
    dim = [s[1] for s in specs] if per_tensor_dims else -2
    run_case(be, DEVICE_OF[be], specs, keep, dim, seed=11)


@pytest.mark.parametrize("be_dev", BACKENDS)
def test_compact_is_stable(be_dev):
    """Row b of the result lists the kept positions in increasing order (checked against a Python list)."""
    be, _ = be_dev
    B, H, S = 3, 2, 300
    keep = make_keep("random", B, S, torch.Generator().manual_seed(3))
    x = torch.arange(S, dtype=torch.float32).repeat(B, H, 1)[..., None].expand(B, H, S, 4).contiguous()
    x = x.to(DEVICE_OF[be])
    with backend(be):
        view, lengths = flowkern.compact_(x, keep.to(x.device), 2)
    assert isinstance(view, torch.Tensor) and view.data_ptr() == x.data_ptr()
    for b in range(B):
        kept = [j for j in range(S) if keep[b, j]]
        assert int(lengths[b]) == len(kept)
        for h in range(H):
            assert x[b, h, : len(kept), 0].long().tolist() == kept
            assert x[b, h, : len(kept)].cpu().eq(x[b, h, : len(kept), :1].cpu()).all()


@pytest.mark.parametrize("be_dev", BACKENDS)
def test_compact_empty(be_dev):
    be, _ = be_dev
    dev = DEVICE_OF[be]
    with backend(be):
        views, lengths = flowkern.compact_([torch.randn(0, 5, 3, device=dev)], torch.zeros(0, 5, dtype=torch.bool,
                                                                                         device=dev), 1)
        assert lengths.shape == (0,) and views[0].shape == (0, 0, 3)
        x = torch.randn(2, 0, 3, device=dev)
        views, lengths = flowkern.compact_([x], torch.zeros(2, 0, dtype=torch.bool, device=dev), 1)
        assert lengths.tolist() == [0, 0] and views[0].shape == (2, 0, 3)


@pytest.mark.skipif(not (INTERPRET or torch.cuda.is_available()), reason="needs TRITON_INTERPRET=1 or a GPU")
@pytest.mark.parametrize("block_s,block_i", [(4, 2), (8, 1), (2, 8)])
def test_triton_small_tiles(block_s, block_i):
    """Many sequence blocks and row chunks per program: the carry across blocks and the chunking."""
    from flowkern.kernels.compact import compact_fwd

    dev = DEVICE_OF["triton"]
    gen = torch.Generator().manual_seed(block_s * 10 + block_i)
    B, H, S = 3, 2, 45
    keep = make_keep("ragged", B, S, gen)
    keep[0, :9] = True  # a kept prefix spanning several blocks (lead > BLOCK_S)
    xs = [(torch.randn(B, H, S, 24, generator=gen)).to(dev), torch.randn(B, S, 40, generator=gen).half().to(dev)]
    expected = [x.cpu().clone() for x in xs]
    reference.compact_(expected, keep, [2, 1])
    lengths = compact_fwd(xs, keep.to(dev), [2, 1], block_s=block_s, block_i=block_i)
    assert torch.equal(lengths.cpu(), keep.sum(1))
    for x, e in zip(xs, expected, strict=True):  # this kernel leaves rows >= lengths[b] untouched: exact
        assert torch.equal(x.cpu(), e)


@pytest.mark.skipif(not flowkern.ops.cpp_available(), reason="flowkern._C not built")
def test_cpp_large_streaming():
    """> 32 MiB moved: the C++ kernel switches to streaming stores for aligned rows (memmove for the rest)."""
    gen = torch.Generator().manual_seed(5)
    S = 2048
    keep = torch.ones(2, S, dtype=torch.bool)
    keep[0, 10:20] = False
    keep[1, 5] = False
    big = torch.randn(2, 8, S, 320, generator=gen)  # 40 MiB, ~40 MiB moved
    odd = torch.randn(2, S, 2, 67, generator=gen).half()[..., 1:66]  # rows not 16-byte aligned
    inner = torch.randn(2, 4, S, 40, generator=gen)[..., ::2]  # strided innermost dim
    tensors = [big, odd, inner]
    expected = [t.clone() for t in tensors]
    reference.compact_(expected, keep, [2, 1, 2])
    with backend("cpp"):
        _, lengths = flowkern.compact_(tensors, keep, [2, 1, 2])
    assert lengths.tolist() == [S - 10, S - 1]
    for t, e in zip(tensors, expected, strict=True):
        assert torch.equal(t, e)


@pytest.mark.skipif(not flowkern.ops.cpp_available(), reason="flowkern._C not built")
def test_opcheck_cpp():
    """The custom op's schema, fake impl and mutation annotations are consistent (torch.library.opcheck)."""
    x = [torch.randn(2, 3, 11, 4), torch.randn(2, 11, 6).half()]
    keep = make_keep("random", 2, 11, torch.Generator().manual_seed(0))
    with backend("cpp"):
        torch.library.opcheck(flowkern.ops._compact_op, (x, keep, [2, 1]),
                              test_utils=("test_schema", "test_faketensor"))


# ------------------------------------------------------------------------------------------------ errors


def _kv(b=2, s=9):
    return torch.randn(b, 3, s, 4)


BAD = {
    "empty list": (lambda: ([], torch.ones(2, 9, dtype=torch.bool), 2), "tensors must be a non-empty"),
    "not a tensor": (lambda: ([_kv(), "x"], torch.ones(2, 9, dtype=torch.bool), 2), r"tensors\[1\] must be a"),
    "tensors not a list": (lambda: ("x", torch.ones(2, 9, dtype=torch.bool), 2), "tensors must be a tensor or"),
    "keep float": (lambda: ([_kv()], torch.ones(2, 9), 2), "keep must be a bool tensor"),
    "keep 1-d": (lambda: ([_kv()], torch.ones(9, dtype=torch.bool), 2), "keep must be a bool tensor"),
    "keep B": (lambda: ([_kv()], torch.ones(3, 9, dtype=torch.bool), 2), r"keep is \[B=3, S=9\] but tensors\[0\]"),
    "keep S": (lambda: ([_kv(), _kv(s=8)], torch.ones(2, 9, dtype=torch.bool), 2), r"but tensors\[1\]"),
    "dim out of range": (lambda: ([_kv()], torch.ones(2, 9, dtype=torch.bool), 4), "dim must index"),
    "dim batch": (lambda: ([_kv()], torch.ones(2, 9, dtype=torch.bool), 0), "dim must index"),
    "dim -4 is batch": (lambda: ([_kv()], torch.ones(2, 9, dtype=torch.bool), -4), "dim must index"),
    "dim float": (lambda: ([_kv()], torch.ones(2, 9, dtype=torch.bool), 2.0), "dim must be an int"),
    "dims length": (lambda: ([_kv(), _kv()], torch.ones(2, 9, dtype=torch.bool), [2]), "one int per tensor"),
    "other device": (lambda: ([_kv(), _kv().to("meta")], torch.ones(2, 9, dtype=torch.bool), 2),
                     r"tensors\[1\] must be on keep's device"),
    "expanded": (lambda: ([torch.randn(2, 1, 4).expand(2, 9, 4)], torch.ones(2, 9, dtype=torch.bool), 1),
                 "may overlap itself"),
    "requires grad": (lambda: ([_kv().requires_grad_()], torch.ones(2, 9, dtype=torch.bool), 2), "requires grad"),
}


@pytest.mark.parametrize("make,message", BAD.values(), ids=BAD.keys())
def test_compact_rejects(make, message):
    tensors, keep, dim = make()
    before = [t.clone() for t in tensors if isinstance(t, torch.Tensor) and t.device.type == "cpu"]
    with pytest.raises(ValueError, match=message):
        flowkern.compact_(tensors, keep, dim)
    after = [t for t in tensors if isinstance(t, torch.Tensor) and t.device.type == "cpu"]
    assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True)), "nothing may run before the check"


def test_compact_rejects_overlapping_tensors():
    keep = torch.rand(2, 9, generator=torch.Generator().manual_seed(0)) > 0.5
    x = _kv()
    with pytest.raises(ValueError, match=r"tensors\[0\] and tensors\[1\] overlap"):
        flowkern.compact_([x, x], keep, 2)
    buf = torch.randn(2, 3, 9, 8)
    with pytest.raises(ValueError, match="overlap in memory"):
        flowkern.compact_([buf[..., :5], buf[..., 3:]], keep, 2)
    # interleaved views (disjoint elements, overlapping byte ranges) are conservatively rejected too
    with pytest.raises(ValueError, match="overlap in memory"):
        flowkern.compact_([buf[:, :1], buf[:, 1:]], keep, 2)
    # views of one buffer in separate byte ranges are fine
    fused = torch.randn(2, 2, 3, 9, 8)  # [K|V, B, H, S, D]
    k_view, v_view = fused[0], fused[1]
    expected = [k_view.clone(), v_view.clone()]
    reference.compact_(expected, keep, 2)
    flowkern.compact_([k_view, v_view], keep, 2)
    assert torch.equal(fused[0], expected[0]) and torch.equal(fused[1], expected[1])


def test_requires_grad_ok_under_no_grad():
    x = _kv().requires_grad_()
    keep = torch.ones(2, 9, dtype=torch.bool)
    keep[:, 2] = False
    with torch.no_grad():
        view, lengths = flowkern.compact_(x, keep, 2)
    assert lengths.tolist() == [8, 8] and view.shape == (2, 3, 8, 4)

