r"""Fused attention forward that also returns each row's softmax mass per key segment (Triton).

Math (per batch ``b``, query head ``h``, kv head ``h // (Hq // Hkv)``, query row ``i``, key ``j``; the same
as :func:`flowkern.reference.segment_attention`)::

    p_i           = i + (Sk - Sq)                     # the key position row i stands at (bottom-right)
    seg(j)        = key_ids[b, j] if key_ids[b, j] >= 0 else -1 - key_ids[b, j]     # < 0: padded key
    visible[i, j] = key_ids[b, j] >= 0
                    and (allowed is None or bit seg(j) of allowed[seg(p_i)])                  # segment table
                    and ( ((not causal or j <= p_i) and (window == 0 or p_i - j < window))
                          or (group_ids given and g(p_i) != 0 and g(p_i) == g(j)) )          # groups
    s[i, j]       = scale * <q[i], k[j]>        if visible[i, j] else -inf
    lse[i]        = log sum_j exp(s[i, j])                    (-inf for a row with no visible key)
    p[i, j]       = exp(s[i, j] - lse[i])                     (0 for such a row)
    out[i]        = sum_j p[i, j] v[j]                        (0 for such a row)
    mass[i, c]    = sum_{j : key_ids[b, j] = c} p[i, j]       (0 for such a row)

Non-finite values propagate (the policy in :mod:`flowkern.ops`, as in SDPA): a NaN or +inf score at a visible
key makes ``l_i`` NaN (``exp2(NaN)``, or ``exp2(inf - inf)`` once the max is +inf), whether or not the GPU's
``max`` keeps the NaN, and the epilogue treats only ``l_i == 0`` as "no visible key", so that row gets out, lse
and mass NaN. A -inf score weighs 0. Scores at invisible keys are replaced by -inf before the max. A non-finite
``v`` enters through ``P @ V``: at a visible key the row's out becomes non-finite; at a key it cannot see (in a
key block the program visits) the zero weight still multiplies it, so that row's out is unspecified -- except
for rows with no visible key, whose out is stored as 0 whatever ``acc`` holds.

Algorithm: the FlashAttention-2 forward (Dao, 2023; the Triton tutorial "Fused Attention") -- one program per
(query block, batch*head), one loop over key blocks with the online softmax: running max ``m_i``, running
sum ``l_i``, output accumulator ``acc``. The extra state is ``seg_acc [BLOCK_M, NSEG_PAD]``, the unnormalised
per-segment sums of ``p``; it is rescaled by the same ``alpha = exp(m_old - m_new)`` as ``acc`` and ``l_i``
and accumulated on the tensor cores as ``tl.dot(p, onehot)``, with ``onehot[j, c] = (key_ids[j] == c)``
(``NSEG_PAD = 16``, tl.dot's minimum width). At the end ``out = acc / l_i``, ``mass = seg_acc / l_i``,
``lse = m_i + log(l_i)``. Scores are kept in the log2 domain (``scale * log2(e)`` folded into one multiply,
``exp2`` instead of ``exp``). Key blocks entirely above the causal diagonal are skipped (except with
``PACK_GQA``, where the per-element mask alone applies: such launches have few rows).

Visibility features (constexpr flags, so a launch without them compiles to the plain causal/padding kernel):
``HAS_ALLOWED`` loads each row's table entry ``allowed[seg(p_i)]`` (an int32 bit set) once and tests bit
``seg(j)`` per element; ``HAS_WINDOW`` / ``HAS_GROUPS`` add the window and group terms. With a window or groups
(``HAS_SPAN``) the key loop runs over ``[min_i span[b, 0, p_i], max_i span[b, 1, p_i])`` (the block-aligned
union of the rows' spans, given per position by the caller) instead of the causal range: that is the block
skip, so a window's work scales with ``window``, not with ``Sk``. A query block whose rows all have an empty
table entry visits no key block (``l_i = 0``: out 0, mass 0, lse -inf).

Precision: the main dots run in the input dtype with fp32 accumulation (fp32 inputs: ``input_precision="ieee"``,
no tf32). The segment dot is exact for fp32 inputs (fp32 ``p`` and one-hot, ieee); for fp16/bf16 inputs ``p``
goes to the tensor cores in fp16 (one-hot is exact in fp16; ``p`` in [0, 1] keeps 11 bits, better than the
bf16 ``p`` that FlashAttention already feeds to the P@V dot).

Split-K (decode, or any launch with fewer programs than SMs): a third grid axis splits the key range into
``num_splits`` contiguous chunks of whole key blocks; each program stores its partial ``m_i, l_i, acc,
seg_acc`` (fp32) and ``_combine_kernel`` merges the splits of a row with the usual log-sum-exp rescaling
(Flash-Decoding). With ``HAS_SPAN`` the chunks start at the block-aligned start of the span (the host bounds its
width from the window; the last split runs to the span's end whatever the bound), and a split past the span
stores an empty state (``m = -inf, l = 0``). For GQA with few query rows the group's query heads are packed
into the M dimension (``PACK_GQA``), so each K/V block is loaded once per kv head instead of once per query head.

Interpreter note: under ``TRITON_INTERPRET=1`` Triton's numpy ``tl.dot`` multiplies bfloat16 operands as raw
uint16 integers (garbage); the launcher then sets ``UPCAST=True`` and the kernel casts dot operands to fp32
(after rounding ``p`` to the input dtype, so the arithmetic matches the GPU path). On a GPU it is always False.
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

__all__ = ["segment_attention_fwd", "choose_num_splits"]

NSEG_PAD = 16  # one-hot width: tl.dot needs N >= 16


@triton.jit
def _segment_attention_fwd_kernel(
    Q, K, V, KeyIds,
    Allowed,  # int32 [NSEG] bit table (HAS_ALLOWED)
    GroupIds,  # int32 [B, SK] (HAS_GROUPS)
    Span,  # int32 [B, 2, SK]: per key position p, [lowest, one past the highest] key any rule shows it (HAS_SPAN)
    Visits,  # int32 [grid]: key blocks each program visited (COUNT_VISITS, tests only)
    Out, Lse, Mass,  # final outputs (SPLIT=False)
    MPart, LPart, AccPart, SegPart,  # per-split partial state (SPLIT=True)
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    H_Q, H_KV, SQ, SK,
    ROWS,  # query rows per program-row: SQ, or GROUP * SQ when PACK_GQA
    TOTAL_ROWS,  # B * H_Q * SQ (stride between splits in the partial buffers)
    KEYS_PER_SPLIT,  # a multiple of BLOCK_N (>= SK when not splitting)
    qk_scale,  # scale * log2(e)
    WINDOW,  # a row at p sees keys j with p - j < WINDOW (HAS_WINDOW)
    NSEG: tl.constexpr,
    NSEG_PAD: tl.constexpr,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    PACK_GQA: tl.constexpr,
    SPLIT: tl.constexpr,
    SEG_FP32: tl.constexpr,
    DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    HAS_ALLOWED: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_GROUPS: tl.constexpr,
    HAS_SPAN: tl.constexpr,
    COUNT_VISITS: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_c = tl.arange(0, NSEG_PAD)
    d_ok = offs_d < HEAD_DIM
    row_ok = offs_m < ROWS

    if PACK_GQA:  # program-row r of kv head hk is query head hk*GROUP + r // SQ, query row r % SQ
        b = pid_bh // H_KV
        hk = pid_bh % H_KV
        h = hk * GROUP + offs_m // SQ
        i = offs_m % SQ
    else:
        b = pid_bh // H_Q
        h = pid_bh % H_Q
        hk = h // GROUP
        i = offs_m
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    hk64 = hk.to(tl.int64)

    q_rows = h64 * stride_qh + i.to(tl.int64) * stride_qm  # [BLOCK_M] (h is a scalar unless PACK_GQA)
    q_ptrs = Q + b64 * stride_qb + q_rows[:, None] + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    pos = i + (SK - SQ)  # the key position each row stands at (in [0, SK) for real rows when features are on)
    if HAS_ALLOWED or HAS_GROUPS:
        row_ids = tl.load(KeyIds + b64 * SK + pos, mask=row_ok, other=0)
    if HAS_ALLOWED:  # bit t of row_bits: this row sees key segment t (padded row key: seg = -1 - id)
        row_bits = tl.load(Allowed + tl.where(row_ids >= 0, row_ids, -1 - row_ids), mask=row_ok, other=0)
    if HAS_GROUPS:
        row_grp = tl.load(GroupIds + b64 * SK + pos, mask=row_ok, other=0)

    # key range of this program: [lo, hi)
    if HAS_SPAN:  # the union of the rows' spans, split into chunks of KEYS_PER_SPLIT from its block-aligned start
        span_lo = tl.min(tl.load(Span + b64 * 2 * SK + pos, mask=row_ok, other=SK), 0)
        span_hi = tl.max(tl.load(Span + b64 * 2 * SK + SK + pos, mask=row_ok, other=0), 0)
        lo = span_lo // BLOCK_N * BLOCK_N + pid_s * KEYS_PER_SPLIT
        # the last split takes the rest of the span, whatever the host's bound on its width was
        hi = tl.where(pid_s == tl.num_programs(2) - 1, span_hi, tl.minimum(span_hi, lo + KEYS_PER_SPLIT))
    else:
        lo = pid_s * KEYS_PER_SPLIT
        hi = tl.minimum(SK, lo + KEYS_PER_SPLIT)
        if CAUSAL and not PACK_GQA:  # last row of the block sees keys j <= row + SK - SQ
            hi = tl.minimum(hi, (pid_m + 1) * BLOCK_M + (SK - SQ))
    if HAS_ALLOWED:  # no row of the block sees any segment: visit nothing
        hi = tl.where(tl.max(row_bits, 0) == 0, lo, hi)
    if COUNT_VISITS:
        pid = (pid_s * tl.num_programs(1) + pid_bh) * tl.num_programs(0) + pid_m
        tl.store(Visits + pid, tl.maximum(hi - lo + BLOCK_N - 1, 0) // BLOCK_N)

    k_ptrs = K + b64 * stride_kb + hk64 * stride_kh + lo.to(tl.int64) * stride_kn \
        + offs_n0[None, :] * stride_kn + offs_d[:, None]  # K^T tile [BLOCK_D, BLOCK_N]
    v_ptrs = V + b64 * stride_vb + hk64 * stride_vh + lo.to(tl.int64) * stride_vn \
        + offs_n0[:, None] * stride_vn + offs_d[None, :]  # [BLOCK_N, BLOCK_D]
    ids_ptrs = KeyIds + b64 * SK + offs_n0

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    seg_acc = tl.zeros([BLOCK_M, NSEG_PAD], dtype=tl.float32)

    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n < SK
        ids = tl.load(ids_ptrs + start_n, mask=n_ok, other=-1)
        kt = tl.load(k_ptrs, mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
        qk = tl.dot(q, kt, input_precision=DOT_PREC)

        visible = (ids >= 0)[None, :]
        if HAS_ALLOWED:  # padded keys are invisible already: any shift in [0, 31] will do for them
            visible = visible & (((row_bits[:, None] >> tl.maximum(ids, 0)[None, :]) & 1) != 0)
        if HAS_WINDOW or HAS_GROUPS:
            near = offs_n[None, :] > -1  # all true; narrowed by the causal and window rules
            if CAUSAL:
                near = offs_n[None, :] <= pos[:, None]
            if HAS_WINDOW:
                near = near & (pos[:, None] - offs_n[None, :] < WINDOW)
            if HAS_GROUPS:
                grp = tl.load(GroupIds + b64 * SK + offs_n, mask=n_ok, other=0)
                near = near | ((row_grp[:, None] != 0) & (row_grp[:, None] == grp[None, :]))
            visible = visible & near
        elif CAUSAL:
            visible = visible & (offs_n[None, :] <= i[:, None] + (SK - SQ))
        qk = tl.where(visible, qk * qk_scale, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet: no NaN
        alpha = tl.exp2(m_i - m_sub)
        p = tl.exp2(qk - m_sub[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)

        v = tl.load(v_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        pv = p.to(v.dtype)
        if UPCAST:
            pv = pv.to(tl.float32)
            v = v.to(tl.float32)
        acc = tl.dot(pv, v, acc=acc * alpha[:, None], input_precision=DOT_PREC)

        onehot = ids[:, None] == offs_c[None, :]  # [BLOCK_N, NSEG_PAD]; masked keys (-1) hit no column
        if SEG_FP32:
            seg_acc = tl.dot(p, onehot.to(tl.float32), acc=seg_acc * alpha[:, None], input_precision="ieee")
        else:
            seg_acc = tl.dot(p.to(tl.float16), onehot.to(tl.float16), acc=seg_acc * alpha[:, None])
        m_i = m_new

        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn

    row = (b64 * H_Q + h64) * SQ + i  # row of the contiguous [B, H_Q, SQ] outputs
    c_ok = offs_c < NSEG
    if SPLIT:
        prow = pid_s.to(tl.int64) * TOTAL_ROWS + row
        tl.store(MPart + prow, m_i, mask=row_ok)
        tl.store(LPart + prow, l_i, mask=row_ok)
        tl.store(AccPart + prow[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=row_ok[:, None] & d_ok[None, :])
        tl.store(SegPart + prow[:, None] * NSEG + offs_c[None, :], seg_acc, mask=row_ok[:, None] & c_ok[None, :])
    else:
        alive = l_i != 0.0  # l = 0: no visible key; l = NaN (a NaN/+inf score): stays NaN in out, lse, mass
        inv_l = 1.0 / tl.where(alive, l_i, 1.0)  # dead rows: acc and seg_acc are 0 -> out 0, mass 0
        lse = tl.where(alive, (m_i + tl.log2(tl.where(alive, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
        out = tl.where(alive[:, None], acc * inv_l[:, None], 0.0)  # dead rows: 0 even if v held NaN (0 * NaN)
        tl.store(Out + row[:, None] * HEAD_DIM + offs_d[None, :], out.to(Out.dtype.element_ty),
                 mask=row_ok[:, None] & d_ok[None, :])
        tl.store(Lse + row, lse, mask=row_ok)
        tl.store(Mass + row[:, None] * NSEG + offs_c[None, :], seg_acc * inv_l[:, None],
                 mask=row_ok[:, None] & c_ok[None, :])


@triton.jit
def _combine_kernel(
    MPart, LPart, AccPart, SegPart, Out, Lse, Mass,
    TOTAL_ROWS, NUM_SPLITS,
    NSEG: tl.constexpr,
    NSEG_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """Merge the per-split (m, l, acc, seg_acc) of BLOCK_R rows: m in the log2 domain, rescale by exp2."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    offs_c = tl.arange(0, NSEG_PAD)
    r_ok = rows < TOTAL_ROWS
    ad_mask = r_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    sc_mask = r_ok[:, None] & (offs_c < NSEG)[None, :]

    m = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    seg = tl.zeros([BLOCK_R, NSEG_PAD], dtype=tl.float32)
    prow = rows  # int64 index of (split s, row) in the [NUM_SPLITS, TOTAL_ROWS] partial buffers
    for _ in range(0, NUM_SPLITS):
        m_s = tl.load(MPart + prow, mask=r_ok, other=float("-inf"))
        l_s = tl.load(LPart + prow, mask=r_ok, other=0.0)
        acc_s = tl.load(AccPart + prow[:, None] * HEAD_DIM + offs_d[None, :], mask=ad_mask, other=0.0)
        seg_s = tl.load(SegPart + prow[:, None] * NSEG + offs_c[None, :], mask=sc_mask, other=0.0)
        m_new = tl.maximum(m, m_s)
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        a = tl.exp2(m - m_sub)
        b = tl.exp2(m_s - m_sub)
        l = l * a + l_s * b
        acc = acc * a[:, None] + acc_s * b[:, None]
        seg = seg * a[:, None] + seg_s * b[:, None]
        m = m_new
        prow += TOTAL_ROWS

    alive = l != 0.0  # as in the main kernel: NaN rows stay NaN
    inv_l = 1.0 / tl.where(alive, l, 1.0)
    lse = tl.where(alive, (m + tl.log2(tl.where(alive, l, 1.0))) * 0.6931471805599453, float("-inf"))
    out = tl.where(alive[:, None], acc * inv_l[:, None], 0.0)
    tl.store(Out + rows[:, None] * HEAD_DIM + offs_d[None, :], out.to(Out.dtype.element_ty), mask=ad_mask)
    tl.store(Lse + rows, lse, mask=r_ok)
    tl.store(Mass + rows[:, None] * NSEG + offs_c[None, :], seg * inv_l[:, None], mask=sc_mask)


def _config(dtype: torch.dtype, head_dim: int, bd: int, rows: int, features: bool = False,
            packed: bool = False) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for an H100/H200-class GPU, for ``rows`` query rows per head
    (``packed``: GQA-packed rows; ``features``: a segment table, window or groups is on).

    Chosen by compiling for sm_90 and reading register/spill/shared-memory usage from ptxas, since no GPU was
    available to time them. Measured with ``bash benchmarks/aot_check.sh`` (``benchmarks/aot_sm90.py``: every
    config these launchers pick over its shape grid, under the installed Triton and Triton 3.6.0): no choice
    below spills under either Triton; re-measure with that command after touching a kernel or a tile.

    - 16-bit, many rows (prefill): BLOCK_M=128, BLOCK_N=64, 8 warps (two warpgroups of wgmma), 3 stages
      (~190-250 registers, 67-134 KB shared) for D <= 128, like the FlashAttention Triton tutorial's Hopper
      setting; D=256: 64x32 tiles, 8 warps, 2 stages.
    - 16-bit, <= 64 rows (decode, GQA-packed decode, short chunks): still BLOCK_M=64, the smallest wgmma tile
      (BLOCK_M=16 falls back to mma.sync and spills at D=128); these launches are bandwidth-bound, so the
      wasted rows cost nothing and deeper pipelines keep loads in flight (64x32 tiles, 4 stages at D=128).
    - fp32 (exact "ieee" FMA dots, no tensor cores): small tiles, the same for every row count. The FMA dot
      keeps both operands and the accumulator in registers; the earlier 64x16 / 32x16 tiles with 8 warps spilled
      (up to ~27 KB per thread at D=256 with GQA packing, 0.5-2 KB at D=80/128, under both Tritons), and even
      16x16 spills a few bytes in some shapes depending on warps/stages. Measured spill-free under Triton 3.6 and
      3.9: D <= 64: 32x16, 8 warps, 1 stage (<= ~130 registers); D <= 128: 16x16, 8 warps, 2 stages (<= ~90);
      D = 256: 16x16, 4 warps, 2 stages (<= ~210). The margins are small (a neighbouring choice spills 8-56 B),
      so keep the sweep in CI.
    - With a visibility feature the masks' extra registers made some of these choices spill (Triton 3.6: the
      GQA-packed 16-bit 128x64 launches 40-68 B at 255 registers; fp32 at 8 warps 4-20 B; Triton 3.9: fp32
      packed split launches 8-12 B), so feature launches take: 16-bit packed, > 64 rows, D <= 128: 128x32,
      8 warps, 3 stages (<= ~240 registers); fp32: 16x16, 4 warps, 2 stages for <= 64 rows and D <= 128, else
      1 stage (each of the two spilled 4-8 B in the other's launches under Triton 3.6). Launches without
      features keep the choices above (and compile to the same code as before the features existed).
    """
    if dtype == torch.float32:  # see the docstring: measured spill-free, keep in step with the AOT sweep
        if features:
            return (16, 16, 4, 2) if rows <= 64 and bd <= 128 else (16, 16, 4, 1)
        if bd <= 64:
            return (32, 16, 8, 1)
        return (16, 16, 8, 2) if bd <= 128 else (16, 16, 4, 2)
    if rows <= 64:
        if bd <= 64:
            return (64, 64, 4, 3)
        return (64, 32, 4, 4) if bd <= 128 else (64, 32, 8, 3)
    if bd <= 128:
        return (128, 32, 8, 3) if features and packed else (128, 64, 8, 3)
    return (64, 32, 8, 2)


def choose_num_splits(n_programs: int, sk: int, block_n: int, sms: int) -> int:
    """Key splits for a launch of ``n_programs`` (query block x batch*head) programs on ``sms`` SMs.

    No split when the launch already fills the GPU (>= one program per SM) or the key range is short.
    Otherwise aim at about two programs per SM, with at least four key blocks per split (so the
    ``num_stages``-deep load pipeline fills), at most 128 splits.
    """
    n_blocks = triton.cdiv(sk, block_n)
    if n_programs >= sms or n_blocks < 8:
        return 1
    return max(1, min(triton.cdiv(2 * sms, n_programs), n_blocks // 4, 128))


def _split_width(sk: int, sq: int, rows_per_block: int, bn: int, causal: bool, window: int,
                 has_groups: bool) -> int:
    """Upper bound on the keys one query block visits, from its block-aligned span start (what split-K divides).

    Causal with a window and no groups: the rows of a block stand at <= ``rows_per_block`` consecutive positions,
    so their span is at most ``window + rows_per_block - 1`` keys, plus up to ``bn - 1`` for the alignment.
    Otherwise all ``sk`` keys. (The kernel's last split runs to the span's end, so a loose bound costs balance,
    never correctness.)
    """
    if causal and window > 0 and not has_groups:
        return min(sk, window + min(rows_per_block, sq) - 1 + bn - 1)
    return sk


def segment_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_ids: torch.Tensor,
    num_segments: int,
    causal: bool,
    scale: float,
    allowed: torch.Tensor | None = None,
    window: int = 0,
    group_ids: torch.Tensor | None = None,
    span: torch.Tensor | None = None,
    *,
    num_splits: int | None = None,
    pack_gqa: bool | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    visits: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the kernel(s). Returns ``(out [B,Hq,Sq,D] q.dtype, lse [B,Hq,Sq] fp32, mass [B,Hq,Sq,nseg] fp32)``.

    q ``[B,Hq,Sq,D]``, k/v ``[B,Hkv,Sk,D]`` with unit last-dim stride (other strides arbitrary, no copies);
    key_ids int32 ``[B,Sk]``: segment s of a real key, ``-1 - s`` for a padded one (``< 0`` = padded).
    Visibility features (off by default; any of them needs ``Sq <= Sk``): ``allowed`` int32 ``[nseg]`` (bit t of
    ``allowed[s]``: query segment s sees key segment t), ``window`` (0 = none; else a row at p sees key j only if
    ``p - j < window``), ``group_ids`` int32 ``[B,Sk]`` (0 = none), and ``span`` int32 ``[B,2,Sk]`` (lowest and
    one past the highest key that any rule shows a row at p), required with ``window`` or ``group_ids``.
    Arguments are validated by :mod:`flowkern.ops`. The keywords override the heuristics (tests use them to
    force the split-K path, GQA packing and small tiles); ``visits``, an int32 tensor of
    ``grid = n_query_blocks * B * heads * num_splits`` elements (one batch chunk), receives the number of key
    blocks each program visited (tests of the block skip).
    """
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    group = Hq // Hkv
    nseg = int(num_segments)
    window = int(window)
    dev = q.device
    out = torch.empty((B, Hq, Sq, D), dtype=q.dtype, device=dev)
    lse = torch.empty((B, Hq, Sq), dtype=torch.float32, device=dev)
    mass = torch.empty((B, Hq, Sq, nseg), dtype=torch.float32, device=dev)
    if out.numel() == 0:
        return out, lse, mass
    if Sk == 0:
        return out.zero_(), lse.fill_(float("-inf")), mass.zero_()
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a unit stride in its last dim")
    has_span = window > 0 or group_ids is not None
    if has_span and span is None:
        raise ValueError("span is required with window or group_ids")
    key_ids = key_ids.to(device=dev, dtype=torch.int32).contiguous()
    allowed = None if allowed is None else allowed.to(device=dev, dtype=torch.int32).contiguous()
    group_ids = None if group_ids is None else group_ids.to(device=dev, dtype=torch.int32).contiguous()
    span = None if not has_span else span.to(device=dev, dtype=torch.int32).contiguous()

    pack = (group > 1 and Sq <= 32) if pack_gqa is None else (bool(pack_gqa) and group > 1)
    rows = group * Sq if pack else Sq
    heads = Hkv if pack else Hq
    bd = block_d(D)
    bm, bn, num_warps, num_stages = _config(q.dtype, D, bd, rows, has_span or allowed is not None, pack)
    if interpreting():  # same kernel; small tiles so that tiny test shapes cross several blocks
        bm, bn = 16, 16
    bm, bn = block_m or bm, block_n or bn
    n_m = triton.cdiv(rows, bm)
    width = Sk if not has_span else _split_width(Sk, Sq, Sq if pack else bm, bn, causal, window,
                                                 group_ids is not None)
    if num_splits is None:
        num_splits = choose_num_splits(n_m * B * heads, width, bn, num_sms(dev))
    keys_per_split = triton.cdiv(triton.cdiv(width, max(1, int(num_splits))), bn) * bn
    num_splits = triton.cdiv(width, keys_per_split)  # no empty trailing splits
    split = num_splits > 1

    # grid axis 1 (batch * heads) is limited to 65535: launch batch chunks (views, no copies) beyond that
    chunk = max(1, MAX_GRID_Y // heads)
    if visits is not None and (chunk < B or visits.numel() != n_m * B * heads * num_splits):
        raise ValueError(f"visits must have {n_m * B * heads * num_splits} elements (one batch chunk)")
    for b0 in range(0, B, chunk):
        b1 = min(B, b0 + chunk)
        qc, kc, vc, idc = q[b0:b1], k[b0:b1], v[b0:b1], key_ids[b0:b1]
        oc, lc, mc = out[b0:b1], lse[b0:b1], mass[b0:b1]
        gc = idc if group_ids is None else group_ids[b0:b1]
        sc = idc if span is None else span[b0:b1]
        total_rows = (b1 - b0) * Hq * Sq
        if split:
            m_part = torch.empty((num_splits, total_rows), dtype=torch.float32, device=dev)
            l_part = torch.empty_like(m_part)
            acc_part = torch.empty((num_splits, total_rows, D), dtype=torch.float32, device=dev)
            seg_part = torch.empty((num_splits, total_rows, nseg), dtype=torch.float32, device=dev)
        else:
            m_part = l_part = acc_part = seg_part = lc  # unused

        _segment_attention_fwd_kernel[(n_m, (b1 - b0) * heads, num_splits)](
            qc, kc, vc, idc,
            idc if allowed is None else allowed, gc, sc, idc if visits is None else visits,
            oc, lc, mc,
            m_part, l_part, acc_part, seg_part,
            qc.stride(0), qc.stride(1), qc.stride(2),
            kc.stride(0), kc.stride(1), kc.stride(2),
            vc.stride(0), vc.stride(1), vc.stride(2),
            Hq, Hkv, Sq, Sk, rows, total_rows, keys_per_split,
            float(scale) * LOG2E, window,
            NSEG=nseg, NSEG_PAD=NSEG_PAD, GROUP=group, HEAD_DIM=D, BLOCK_D=bd, BLOCK_M=bm, BLOCK_N=bn,
            CAUSAL=bool(causal), PACK_GQA=pack, SPLIT=split, SEG_FP32=q.dtype == torch.float32,
            DOT_PREC=dot_precision(q.dtype), UPCAST=upcast_dot_operands(q.dtype),
            HAS_ALLOWED=allowed is not None, HAS_WINDOW=window > 0, HAS_GROUPS=group_ids is not None,
            HAS_SPAN=has_span, COUNT_VISITS=visits is not None,
            num_warps=num_warps, num_stages=num_stages,
        )
        if split:
            block_r = 1  # rows per combine program: keep >= ~8 programs per SM
            while block_r < 16 and total_rows >= 16 * block_r * num_sms(dev):
                block_r *= 2
            _combine_kernel[(triton.cdiv(total_rows, block_r),)](
                m_part, l_part, acc_part, seg_part, oc, lc, mc, total_rows, num_splits,
                NSEG=nseg, NSEG_PAD=NSEG_PAD, HEAD_DIM=D, BLOCK_D=bd, BLOCK_R=block_r,
                num_warps=4 if bd <= 128 else 8, num_stages=2,
            )
    return out, lse, mass
