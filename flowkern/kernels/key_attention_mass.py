r"""Softmax probability each key receives from given query rows, in one pass from their LSE (Triton).

Math (per batch ``b``, query head ``h``, kv head ``h // (Hq // Hkv)``; the same as
:func:`flowkern.reference.key_attention_mass` with ``per_head=True``)::

    p_i           = i + (Sk - Sq)                    # q = the LAST Sq rows; row i stands at key position p_i
    seg(j)        = key_ids[b, j] if key_ids[b, j] >= 0 else -1 - key_ids[b, j]     # < 0: padded key
    visible[i, j] = key_ids[b, j] >= 0
                    and (allowed is None or bit seg(j) of allowed[seg(p_i)])                  # segment table
                    and ( ((not causal or j <= p_i) and (window == 0 or p_i - j < window))
                          or (group_ids given and g(p_i) != 0 and g(p_i) == g(j)) )          # groups
    p[i, j]       = exp(scale * <q[i], k[j]> - lse[i])   if visible[i, j] and lse[i] > -inf, else 0
    received[j]   = (1 / Sq) * sum_i p[i, j]             # rows with lse = -inf still count in Sq

A row with ``lse = NaN`` (a NaN row of segment_attention) gives ``p = NaN`` at the keys it sees and 0 elsewhere:
``lse`` is subtracted inside the visibility select, so invisible keys stay ``exp2(-inf) = 0``.

``lse`` is given (from :func:`flowkern.segment_attention` for the same rows), so no online softmax is needed:
one pass, no ``Sq x Sk`` buffer.

Algorithm: one program per (key block, batch * kv head). It loads its ``K [BLOCK_N, D]`` tile once and keeps
it resident while it loops over the ``Hq // Hkv`` query heads of the group and, for each, over the query
blocks (starting at the first block that can see the key block when causal), computing
``S^T = K @ Q^T [BLOCK_N, BLOCK_M]`` on the tensor cores (like the dK/dV loop of FlashAttention-2's
backward) and row-summing ``exp2(S^T * scale * log2(e) - lse * log2(e))``. K is therefore read from memory
once per kv head (GQA), Q once per key block.

Visibility features (constexpr flags; a launch without them compiles to the plain causal/padding kernel):
with a window or groups (``HAS_SPAN``) or a table (``HAS_ALLOWED``), a pre-pass over the query blocks' spans
(``span[b, :, p_i]``, given per position by the caller) and table entries finds the range of query blocks with
a row that can see this key block and a non-empty table entry; the main loop runs over that range only (the
block skip; with groups the causal start no longer bounds it). The element mask then applies the rule above.

Precision: fp32 inputs use ``input_precision="ieee"`` (no tf32); the probabilities and sums are fp32.

Interpreter note: under ``TRITON_INTERPRET=1`` Triton's numpy ``tl.dot`` multiplies bfloat16 operands as raw
uint16 integers (garbage); the launcher then sets ``UPCAST=True`` and the kernel casts the dot operands to
fp32. On a GPU it is always False and the native bf16 dot runs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flowkern.kernels._common import (
    LOG2E,
    MAX_GRID_Y,
    block_d,
    dot_precision,
    interpreting,
    num_sms,
    upcast_dot_operands,
)

__all__ = ["key_attention_mass_fwd"]



@triton.jit
def _key_attention_mass_kernel(
    Q, K, Lse, KeyIds, Out,
    Allowed,  # int32 [NSEG] bit table (HAS_ALLOWED; needs HAS_IDS)
    GroupIds,  # int32 [B, SK] (HAS_GROUPS)
    Span,  # int32 [B, 2, SK]: per key position p, [lowest, one past the highest] key any rule shows it (HAS_SPAN)
    Visits,  # int32 [grid]: query blocks each program visited per head (COUNT_VISITS, tests only)
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    H_Q, H_KV, SQ, SK,
    qk_scale,  # scale * log2(e)
    inv_sq,  # 1 / SQ
    WINDOW,  # a row at p sees keys j with p - j < WINDOW (HAS_WINDOW)
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_IDS: tl.constexpr,
    DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    HAS_ALLOWED: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_GROUPS: tl.constexpr,
    HAS_SPAN: tl.constexpr,
    COUNT_VISITS: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b64 = (pid_bh // H_KV).to(tl.int64)
    hk64 = (pid_bh % H_KV).to(tl.int64)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < SK
    d_ok = offs_d < HEAD_DIM

    k_ptrs = K + b64 * stride_kb + hk64 * stride_kh + offs_n.to(tl.int64)[:, None] * stride_kn + offs_d[None, :]
    k = tl.load(k_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_D], resident
    if UPCAST:
        k = k.to(tl.float32)
    if HAS_IDS:
        ids = tl.load(KeyIds + b64 * SK + offs_n, mask=n_ok, other=-1)
        key_ok = ids >= 0
    else:
        key_ok = n_ok

    if HAS_ALLOWED:
        kseg = tl.maximum(ids, 0)  # padded keys are invisible already: any shift in [0, 31] will do for them
    if HAS_GROUPS:
        kgrp = tl.load(GroupIds + b64 * SK + offs_n, mask=n_ok, other=0)

    # query blocks [m_lo, m_hi) whose rows can see this key block
    if CAUSAL and not HAS_SPAN:  # row i sees key j iff j <= i + (SK - SQ): skip blocks whose rows all precede it
        m_lo = tl.maximum(pid_n * BLOCK_N - (SK - SQ), 0) // BLOCK_M * BLOCK_M
    else:
        m_lo = pid_n * 0
    m_hi = pid_n * 0 + SQ
    if HAS_SPAN or HAS_ALLOWED:  # a pre-pass over the rows' spans and table rows narrows the range
        n_lo = pid_n * BLOCK_N
        n_hi = tl.minimum(n_lo + BLOCK_N, SK)
        first = pid_n * 0 + SQ
        last = pid_n * 0
        for start_m in range(m_lo, m_hi, BLOCK_M):
            offs_m = start_m + offs_m0
            live = offs_m < SQ
            pos = offs_m + (SK - SQ)
            if HAS_SPAN:
                span_lo = tl.load(Span + b64 * 2 * SK + pos, mask=live, other=SK)
                span_hi = tl.load(Span + b64 * 2 * SK + SK + pos, mask=live, other=0)
                live = live & (span_lo < n_hi) & (span_hi > n_lo)
            if HAS_ALLOWED:
                row_ids = tl.load(KeyIds + b64 * SK + pos, mask=live, other=0)
                bits = tl.load(Allowed + tl.where(row_ids >= 0, row_ids, -1 - row_ids), mask=live, other=0)
                live = live & (bits != 0)
            any_live = tl.max(live.to(tl.int32), 0) > 0
            first = tl.where(any_live, tl.minimum(first, start_m), first)
            last = tl.where(any_live, start_m + BLOCK_M, last)
        m_lo = first
        m_hi = last
    if COUNT_VISITS:
        tl.store(Visits + pid_bh * tl.num_programs(0) + pid_n, tl.maximum(m_hi - m_lo + BLOCK_M - 1, 0) // BLOCK_M)

    for g in range(0, GROUP):
        h64 = hk64 * GROUP + g
        qt_ptrs = Q + b64 * stride_qb + h64 * stride_qh + m_lo.to(tl.int64) * stride_qm \
            + offs_m0[None, :] * stride_qm + offs_d[:, None]  # Q^T tile [BLOCK_D, BLOCK_M]
        lse_ptrs = Lse + (b64 * H_Q + h64) * SQ + offs_m0
        received = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start_m in range(m_lo, SQ, BLOCK_M):
            offs_m = start_m + offs_m0
            m_ok = offs_m < SQ
            qt = tl.load(qt_ptrs, mask=d_ok[:, None] & m_ok[None, :], other=0.0)
            if UPCAST:
                qt = qt.to(tl.float32)
            st = tl.dot(k, qt, input_precision=DOT_PREC)  # [BLOCK_N, BLOCK_M] = scores^T
            lse = tl.load(lse_ptrs + start_m, mask=m_ok, other=float("-inf"))
            lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)  # dead row -> p = 0
            visible = key_ok[:, None] & m_ok[None, :]  # rows past SQ (loaded as 0) could give 0 * inf = NaN
            if HAS_ALLOWED or HAS_WINDOW or HAS_GROUPS:
                pos = offs_m + (SK - SQ)
            if HAS_ALLOWED:  # bit seg(j) of the row's table entry
                row_ids = tl.load(KeyIds + b64 * SK + pos, mask=m_ok, other=0)
                bits = tl.load(Allowed + tl.where(row_ids >= 0, row_ids, -1 - row_ids), mask=m_ok, other=0)
                visible = visible & (((bits[None, :] >> kseg[:, None]) & 1) != 0)
            if HAS_WINDOW or HAS_GROUPS:
                near = offs_n[:, None] > -1  # all true; narrowed by the causal and window rules
                if CAUSAL:
                    near = offs_n[:, None] <= pos[None, :]
                if HAS_WINDOW:
                    near = near & (pos[None, :] - offs_n[:, None] < WINDOW)
                if HAS_GROUPS:
                    row_grp = tl.load(GroupIds + b64 * SK + pos, mask=m_ok, other=0)
                    near = near | ((row_grp[None, :] != 0) & (row_grp[None, :] == kgrp[:, None]))
                visible = visible & near
            elif CAUSAL:
                visible = visible & (offs_n[:, None] <= offs_m[None, :] + (SK - SQ))
            # subtract lse inside the select: a NaN lse reaches only the keys its row sees (exp2(-inf) = 0)
            st = tl.where(visible, st * qk_scale - lse2[None, :], float("-inf"))
            received += tl.sum(tl.exp2(st), 1)
            qt_ptrs += BLOCK_M * stride_qm
        tl.store(Out + (b64 * H_Q + h64) * SK + offs_n, received * inv_sq, mask=n_ok)


def _config(dtype: torch.dtype, bd: int, sq: int, b_hkv: int, sk: int, sms: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for an H100/H200-class GPU.

    The K tile is the A operand (BLOCK_N rows, so BLOCK_N >= 64 gives wgmma); Q/lse tiles stream; the only
    accumulator is a [BLOCK_N] vector. Few rows (the usual Sq=1, "last prompt row"): BLOCK_M=16..64 to fit Sq,
    BLOCK_N=64, halved (down to 32; D=256: not below 64) while the grid has fewer programs than SMs. Many rows:
    64x128 tiles and 8 warps, so each Q tile is reused by 128 keys (16-bit: 48-141 registers, no spills).

    fp32 uses exact FMA dots (no tensor cores), whose operands live in registers: the earlier 32x32 tiles
    (4 warps, 2 stages) spilled 0.7-0.8 KB at D=80/128 (Triton 3.9) and 16x16 spilled 24 B at D=256 (3.6).
    Measured spill-free under Triton 3.6 and 3.9 over the sweep's grid: D <= 64: 16x32, 4 warps, 1 stage;
    D > 64: 16x16, 4 warps, 1 stage (<= ~76 registers); neighbouring choices spill 8-24 B in some shapes.
    Measured and re-measured with ``bash benchmarks/aot_check.sh`` (``benchmarks/aot_sm90.py`` on the
    installed Triton and on 3.6.0), which fails on any spill.
    """
    if dtype == torch.float32:  # see the docstring: measured spill-free, keep in step with the AOT sweep
        return (16, 32, 4, 1) if bd <= 64 else (16, 16, 4, 1)
    if sq > 64:
        bm, bn, num_warps = (64, 128, 8) if bd <= 128 else (64, 64, 4)
    else:
        bm, bn, num_warps = max(16, triton.next_power_of_2(sq)), 64, 4
        if bd > 128:
            bm = min(bm, 32)
    # D=256 keeps BLOCK_N=64: 32 spilled 8 B at Sq=1 under Triton 3.9 once the NaN-policy select went in
    while bn > (64 if bd > 128 else 32) and triton.cdiv(sk, bn) * b_hkv < sms:
        bn //= 2
    return bm, bn, num_warps, 3


def key_attention_mass_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    key_ids: torch.Tensor | None,
    causal: bool,
    scale: float,
    allowed: torch.Tensor | None = None,
    window: int = 0,
    group_ids: torch.Tensor | None = None,
    span: torch.Tensor | None = None,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    visits: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch the kernel. Returns float32 ``[B, Hq, Sk]``.

    q ``[B,Hq,Sq,D]`` (the last Sq rows: row i stands at key position ``p = i + (Sk - Sq)``), k ``[B,Hkv,Sk,D]``
    with unit last-dim stride (other strides arbitrary); lse float32 contiguous ``[B,Hq,Sq]``; key_ids int32
    ``[B,Sk]`` (segment s of a real key, ``-1 - s`` for a padded one) or None (no padding, no table).
    Visibility features, as in :func:`flowkern.kernels.segment_attention.segment_attention_fwd`: ``allowed``
    int32 ``[nseg]`` bit table (needs key_ids), ``window`` (0 = none), ``group_ids`` int32 ``[B,Sk]``, and
    ``span`` int32 ``[B,2,Sk]`` (required with ``window`` or ``group_ids``). Arguments are validated by
    :mod:`flowkern.ops`; the keywords override the tile heuristics (tests); ``visits``, an int32 tensor of
    ``n_key_blocks * B * Hkv`` elements (one batch chunk), receives the number of query blocks each program
    visited per query head (tests of the block skip).
    """
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    window = int(window)
    dev = q.device
    out = torch.empty((B, Hq, Sk), dtype=torch.float32, device=dev)
    if out.numel() == 0:
        return out
    if Sq == 0:
        return out.zero_()
    for name, t in (("q", q), ("k", k)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a unit stride in its last dim")
    has_span = window > 0 or group_ids is not None
    if has_span and span is None:
        raise ValueError("span is required with window or group_ids")
    if allowed is not None and key_ids is None:
        raise ValueError("allowed needs key_ids (the segment of every key)")
    lse = lse.to(device=dev, dtype=torch.float32).contiguous()
    has_ids = key_ids is not None
    ids = key_ids.to(device=dev, dtype=torch.int32).contiguous() if has_ids else None
    allowed = None if allowed is None else allowed.to(device=dev, dtype=torch.int32).contiguous()
    group_ids = None if group_ids is None else group_ids.to(device=dev, dtype=torch.int32).contiguous()
    span = None if not has_span else span.to(device=dev, dtype=torch.int32).contiguous()

    bd = block_d(D)
    bm, bn, num_warps, num_stages = _config(q.dtype, bd, Sq, B * Hkv, Sk, num_sms(dev))
    if interpreting():  # same kernel; small tiles so that tiny test shapes cross several blocks
        bm, bn = 16, 16
    bm, bn = block_m or bm, block_n or bn

    chunk = max(1, MAX_GRID_Y // Hkv)  # grid axis 1 is limited to 65535: batch chunks (views) beyond that
    if visits is not None and (chunk < B or visits.numel() != triton.cdiv(Sk, bn) * B * Hkv):
        raise ValueError(f"visits must have {triton.cdiv(Sk, bn) * B * Hkv} elements (one batch chunk)")
    for b0 in range(0, B, chunk):
        b1 = min(B, b0 + chunk)
        qc, kc, lc, oc = q[b0:b1], k[b0:b1], lse[b0:b1], out[b0:b1]
        idc = ids[b0:b1] if has_ids else lc
        _key_attention_mass_kernel[(triton.cdiv(Sk, bn), (b1 - b0) * Hkv)](
            qc, kc, lc, idc, oc,
            idc if allowed is None else allowed, idc if group_ids is None else group_ids[b0:b1],
            idc if span is None else span[b0:b1], idc if visits is None else visits,
            qc.stride(0), qc.stride(1), qc.stride(2),
            kc.stride(0), kc.stride(1), kc.stride(2),
            Hq, Hkv, Sq, Sk,
            float(scale) * LOG2E, 1.0 / Sq, window,
            GROUP=Hq // Hkv, HEAD_DIM=D, BLOCK_D=bd, BLOCK_M=bm, BLOCK_N=bn, CAUSAL=bool(causal),
            HAS_IDS=has_ids, DOT_PREC=dot_precision(q.dtype), UPCAST=upcast_dot_operands(q.dtype),
            HAS_ALLOWED=allowed is not None, HAS_WINDOW=window > 0, HAS_GROUPS=group_ids is not None,
            HAS_SPAN=has_span, COUNT_VISITS=visits is not None,
            num_warps=num_warps, num_stages=num_stages,
        )
    return out
