r"""Stable in-place compaction of kept positions along a sequence dimension, for a list of tensors (Triton).

Math (per tensor ``x`` with sequence dim ``d``, batch row ``b``, any index ``r`` of the other dims; the same
as :func:`flowkern.reference.compact_`)::

    keep      : bool [B, S]
    dest[j]   = #{ i < j : keep[b, i] }                  (for every kept j; stable: order preserved)
    x[b, .., dest[j], r] <- x[b, .., j, r]   for every j with keep[b, j]
    lengths[b] = #{ j : keep[b, j] }                      (positions >= lengths[b] keep old data)

The move is a pure byte copy, so the kernel never looks at dtypes: every tensor is described as a set of
*lines* (``b``, outer index ``o``) of ``S`` rows, each row ``n_inner`` contiguous *words* of ``w`` bytes
(``w`` = 8, 4, 2 or 1: the largest power of two dividing the tensor's address, strides and row bytes, so fp16
``D = 128`` rows move as 32 int64 words). A small int64 table ``desc [T, 8]`` holds per descriptor
``(offset, stride_b, stride_outer, stride_s, n_outer, n_inner)`` in words; offsets are relative to the table's
own address (the ``Anchor`` argument), so one launch serves tensors of any dtype at any addresses.
Layouts whose non-sequence dims do not collapse to ``outer x contiguous inner`` are split into several
descriptors (arbitrary strides are supported, no copies are made).

Launches: one per group of descriptors with the same (word size, 16-byte alignment, small-row class); the
usual call (all layers' K and V, or those plus hidden states, 16-byte-aligned rows of >= 128 bytes) is ONE
launch whatever the dtypes.

Algorithm: one program per (descriptor, batch row b, outer index o, chunk of ``BLOCK_I`` words of the row).
It walks the sequence left to right in blocks of ``BLOCK_S`` rows, keeping ``carry`` = number of kept rows
before the block::

    dest  = carry + cumsum(keep[block]) - 1
    move  = keep[block] & (dest != j)       # rows before the first dropped one stay put: no traffic
    vals  = load rows j (move)              # ALL loads of the block ...
    barrier                                 # ... complete before ANY store of the block
    store vals at rows dest (move)
    carry += sum(keep[block])

It starts at the block holding ``lead[b]`` (the number of leading kept rows: they do not move).

Why in-place is safe: ``dest[j] <= j``, so every store of block t lands at a row ``< (t+1) * BLOCK_S``, i.e.
before the first source row of block t+1 and of every later block: no store can clobber a row that a later
block still has to read. Inside a block, a store may hit a row that another thread of the same block reads
(``dest[j'] = j`` for some ``j' > j``); the barrier (``tl.debug_barrier``, i.e. ``__syncthreads``) orders all
of the block's loads before its stores. Rows that do not move (``dest = j``) are neither read nor written, and
no moved row lands on them (``dest`` is injective). Different programs touch disjoint rows (disjoint lines or
row chunks; tensors are checked not to overlap in memory), so programs need no synchronisation, and any
reordering of one program's blocks by the compiler (e.g. prefetching the next block's loads) is also safe:
block t+1 only reads rows that no store of block <= t writes.

Memory traffic: each moved row is read once and written once (the minimum); ``keep`` (1 byte per position)
is re-read by every program of a row (tiny, cached).
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

__all__ = ["compact_fwd", "describe"]

_WORD_DTYPE = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}
_DESC_COLS = 8  # offset, stride_b, stride_outer, stride_s, n_outer, n_inner, (2 unused: 64-byte rows)
_SMALL_ROW_WORDS = 16  # rows shorter than this go to their own launch, so they don't shrink everyone's tile
_MAX_BLOCK_I = 128  # words per row chunk (1 KiB of int64)
_TILE_WORDS = 4096  # BLOCK_S * BLOCK_I for 16-byte-aligned rows: 32 KiB per block (~120 registers on sm_90)
_TILE_WORDS_UNALIGNED = 2048  # scalar accesses need one 64-bit address per word: a smaller tile
_MAX_BLOCK_S = 1024


@triton.jit
def _compact_kernel(
    Anchor,  # the desc table viewed as words: desc offsets are relative to its address
    Desc,  # int64 [T, 8]
    Keep,  # uint8 [B, S] contiguous
    Lead,  # int32 [B]: number of leading kept positions of each row
    B, S, UNITS,  # UNITS = max over descriptors of n_outer * cdiv(n_inner, BLOCK_I)
    BLOCK_S: tl.constexpr,
    BLOCK_I: tl.constexpr,
    HINT: tl.constexpr,  # every offset / stride / n_inner is a multiple of HINT words (16 bytes when > 1)
):
    pid = tl.program_id(0)
    u = pid % UNITS
    tb = pid // UNITS
    t = tb // B
    b = tb % B
    d = Desc + t * 8
    n_outer = tl.load(d + 4)
    n_inner = tl.multiple_of(tl.load(d + 5), HINT)
    n_chunks = tl.cdiv(n_inner, BLOCK_I)
    o = u // n_chunks
    c = u % n_chunks
    if o < n_outer:
        off = tl.multiple_of(tl.load(d), HINT)
        stride_b = tl.multiple_of(tl.load(d + 1), HINT)
        stride_o = tl.multiple_of(tl.load(d + 2), HINT)
        stride_s = tl.multiple_of(tl.load(d + 3), HINT)
        base = Anchor + off + b.to(tl.int64) * stride_b + o.to(tl.int64) * stride_o
        offs_i = c * BLOCK_I + tl.arange(0, BLOCK_I)
        i_ok = offs_i < n_inner
        keep_row = Keep + b.to(tl.int64) * S

        lead = tl.load(Lead + b)
        s_lo = (lead // BLOCK_S) * BLOCK_S
        carry = s_lo  # every row before the first dropped one is kept
        for s0 in range(s_lo, S, BLOCK_S):
            offs_s = s0 + tl.arange(0, BLOCK_S)
            kept = tl.load(keep_row + offs_s, mask=offs_s < S, other=0).to(tl.int32)
            dest = carry + tl.cumsum(kept, 0) - 1
            move = (kept != 0) & (dest != offs_s)
            m = move[:, None] & i_ok[None, :]
            vals = tl.load(base + offs_s.to(tl.int64)[:, None] * stride_s + offs_i[None, :], mask=m)
            tl.debug_barrier()  # all loads of this block before any of its stores (see the module docstring)
            tl.store(base + dest.to(tl.int64)[:, None] * stride_s + offs_i[None, :], vals, mask=m)
            carry += tl.sum(kept, 0)


# ------------------------------------------------------------------------------------------------- launcher


def _pow2_divisor(x: int, cap: int) -> int:
    """Largest power of two <= cap dividing x (cap itself for x = 0)."""
    if x == 0:
        return cap
    return min(cap, x & -x)


@functools.lru_cache(maxsize=256)
def _layout(
    shape: tuple[int, ...], stride: tuple[int, ...], isz: int, dim: int
) -> tuple[int, tuple[int, ...], tuple[int, int, int, int, int]]:
    """Byte layout of a tensor compacted along ``dim``, independent of its address (cached: all layers of a
    cache share it). Returns ``(align, offsets, (stride_b, stride_outer, stride_s, n_outer, inner_bytes))``:
    one descriptor per entry of ``offsets`` (non-sequence dims that do not collapse into ``outer x inner`` are
    enumerated); ``align`` (<= 16) is the largest power of two dividing the strides, offsets and inner bytes.
    """
    stride_b = stride[0] * isz if shape[0] > 1 else 0  # size-1 dims: meaningless strides, ignored
    stride_s = stride[dim] * isz if shape[dim] > 1 else 0
    groups: list[list[int]] = []  # [size, stride_bytes], outermost first, collapsed where contiguous
    for i in range(1, len(shape)):
        size, st = shape[i], stride[i] * isz
        if i == dim or size == 1:
            continue
        if groups and groups[-1][1] == st * size:
            groups[-1] = [groups[-1][0] * size, st]
        else:
            groups.append([size, st])
    inner = isz
    if groups and groups[-1][1] == isz:
        inner = groups.pop()[0] * isz
    outer_size, outer_stride = groups.pop() if groups else (1, 0)
    offsets = [0]
    for size, st in groups:  # leftover dims: enumerate
        offsets = [a + i * st for a in offsets for i in range(size)]
    align = 16
    for v in (stride_b, stride_s, outer_stride, inner, *(st for _, st in groups)):
        align = _pow2_divisor(v, align)
    return align, tuple(offsets), (stride_b, outer_stride if outer_size > 1 else 0, stride_s, outer_size, inner)


def describe(t: torch.Tensor, dim: int) -> tuple[int, list[tuple[int, int, int, int, int, int]]]:
    """Line descriptors of ``t`` compacted along ``dim``, in bytes.

    Returns ``(align, descs)``: ``descs`` is a list of ``(address, stride_b, stride_outer, stride_s, n_outer,
    inner_bytes)``: rows of ``inner_bytes`` contiguous bytes at ``address + b * stride_b + o * stride_outer +
    s * stride_s`` for ``o < n_outer``; ``align`` is the largest power of two (<= 16) dividing every address,
    stride and ``inner_bytes``.
    """
    align, offsets, rest = _layout(tuple(t.shape), t.stride(), t.element_size(), dim)
    addr = t.data_ptr()
    return _pow2_divisor(addr, align), [(addr + off, *rest) for off in offsets]


def compact_fwd(
    tensors: list[torch.Tensor], keep: torch.Tensor, dims: list[int], *, block_s: int | None = None,
    block_i: int | None = None,
) -> torch.Tensor:
    """Compact every ``tensors[i]`` in place along ``dims[i]`` (Triton); returns ``lengths`` int64 ``[B]``.

    Args:
        tensors: CUDA tensors (CPU under ``TRITON_INTERPRET=1``), each ``[B, ..., S (at dims[i]), ...]`` with
            any strides and dtype, no two overlapping in memory (checked by :func:`flowkern.compact_`).
        keep: bool ``[B, S]`` on the same device, True = keep.
        dims: the non-negative sequence dim of each tensor (``>= 1``).
        block_s, block_i: override the tile (rows per block, words per row chunk; powers of two). For tests.
    """
    B, S = keep.shape
    lengths = keep.sum(1)
    if B == 0 or S == 0:
        return lengths
    keep_u8 = keep.contiguous().view(torch.uint8)
    lead = keep_u8.to(torch.int32).cumprod(1).sum(1, dtype=torch.int32)

    # descriptors, grouped into launches by (word size, 16-byte alignment, small rows)
    groups: dict[tuple[int, bool, bool], list[tuple[int, int, int, int, int, int]]] = {}
    for t, d in zip(tensors, dims, strict=True):
        if t.numel() == 0:
            continue
        align, descs = describe(t, d)
        w = min(align, 8)
        rows = [(a, sb, so, ss, no, inner // w) for a, sb, so, ss, no, inner in descs]
        small = rows[0][5] < _SMALL_ROW_WORDS
        groups.setdefault((w, align >= 16, small), []).extend(rows)
    if not groups:
        return lengths
    n_rows = sum(len(r) for r in groups.values())
    desc = torch.empty((n_rows, _DESC_COLS), dtype=torch.int64, device=keep.device)
    host = []
    launches = []
    row0 = 0
    for (w, aligned, _), rows in groups.items():
        anchor_addr = desc.data_ptr() + row0 * _DESC_COLS * 8
        for a, sb, so, ss, no, ni in rows:
            host.append([(a - anchor_addr) // w, sb // w, so // w, ss // w, no, ni, 0, 0])
        launches.append((w, aligned, row0, len(rows), min(r[5] for r in rows)))
        row0 += len(rows)
    host_t = torch.tensor(host, dtype=torch.int64)
    if desc.is_cuda:  # pinned + async: no wait for the GPU work queued before this call
        host_t = host_t.pin_memory()
    desc.copy_(host_t, non_blocking=desc.is_cuda)

    for w, aligned, r0, n, min_inner in launches:
        sub = desc[r0 : r0 + n]
        bi = block_i or min(_MAX_BLOCK_I, triton.next_power_of_2(min_inner))
        tile = _TILE_WORDS if aligned else _TILE_WORDS_UNALIGNED
        bs = block_s or max(1, min(tile // bi, _MAX_BLOCK_S, triton.next_power_of_2(S)))
        units = max(int(no) * math.ceil(ni / bi) for _, _, _, _, no, ni, _, _ in host[r0 : r0 + n])
        grid = (units * n * B,)
        _compact_kernel[grid](
            sub.view(_WORD_DTYPE[w]), sub, keep_u8, lead, B, S, units,
            BLOCK_S=bs, BLOCK_I=bi, HINT=16 // w if aligned else 1, num_warps=4,
        )
    return lengths
