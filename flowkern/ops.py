"""flowkern's custom ops: public wrappers, argument checks, fake impls and backend dispatch (docs/ops.md).

Each op is a ``torch.library`` custom op (``flowkern::segment_attention``, ``flowkern::key_attention_mass``,
``flowkern::compact_``) with a fake implementation, so it traces under ``torch.compile(fullgraph=True)``. The real
implementation picks a backend per call:

- ``cpp``: the C++ kernels in ``csrc/`` (``flowkern._C``) for CPU tensors (default on CPU);
- ``triton``: the kernels in ``flowkern/kernels/`` for CUDA tensors (default on CUDA), or for CPU tensors
  when ``TRITON_INTERPRET=1`` (how CI runs them);
- ``reference``: ``flowkern/reference.py``, materialises the score matrix (slow; the oracle).

``FLOWKERN_BACKEND=reference|cpp|triton`` forces one. Kernels receive one int32 ``key_ids [B, Sk]`` tensor (the
segment id ``s`` of each key, ``-1 - s`` for a key hidden by ``key_padding_mask``) and, for the visibility keywords
``allowed`` / ``window`` / ``group_ids``, a segment-table bitmask, the window, dense group labels and a per-position
key span that bounds the key blocks a query block visits (:mod:`flowkern._opcheck` builds them).

Policies shared by every backend (tested in ``tests/ops/test_ops_policy.py``):

- **NaN/inf propagate, as in SDPA.** Let ``s[i, j] = scale * <q[i], k[j]>`` over the keys row ``i`` can see
  (every visibility rule, see :func:`segment_attention`). If any of them is NaN or +inf (a NaN anywhere in
  ``q[i]``, a NaN/inf in ``k`` at a visible key), row ``i`` gets ``out``, ``lse`` and ``mass`` NaN, and in
  :func:`key_attention_mass` that row adds NaN to every key it sees. A ``-inf`` score weighs 0, like a masked
  key (a row whose visible scores are all ``-inf`` is a row with no visible key: out 0, lse -inf, mass 0, as
  SDPA's math backend gives). A NaN/inf in ``v`` at a visible key makes that row's ``out`` non-finite; ``lse``
  and ``mass`` never depend on ``v``. Non-finite ``q``/``k`` values at keys a row cannot see are ignored on
  every backend. A non-finite ``v`` at a key a row cannot see leaves its ``lse`` and ``mass`` alone but may
  still reach its ``out`` through ``0 * NaN`` (the reference multiplies the whole matrix, the C++ and Triton
  kernels the key blocks they visit, as SDPA and FlashAttention do) -- except a row with no visible key, whose
  ``out`` is always 0: keep padded / future ``v`` finite (e.g. zeros) if you read those rows' ``out``.
- **Unchecked segment ids are clamped** into ``[0, num_segments)`` (:func:`flowkern._opcheck.key_ids`, before
  the padding encoding): with ``validate=False`` or under ``torch.compile`` an id ``< 0`` counts in segment 0
  and an id ``>= num_segments`` in the last segment. Without ``allowed`` attention never depends on segment ids
  (only ``key_padding_mask`` hides keys), and mass rows still sum to 1.
- **Forward only.** The ops have no backward: with grad enabled, an input that requires grad raises
  ``ValueError`` (call them under ``torch.no_grad()`` / ``torch.inference_mode()`` or on detached tensors, or use
  ``torch.nn.functional.scaled_dot_product_attention`` where a differentiable output is needed).
- ``causal``, ``per_head`` and ``validate`` must be bools (``causal="no"`` is an error, not "truthy").
"""

from __future__ import annotations

import os
import warnings
from typing import Literal

import torch

from flowkern import _opcheck as _c
from flowkern import reference
from flowkern._opcheck import MAX_SEGMENTS

__all__ = ["segment_attention", "key_attention_mass", "compact_", "backend_for", "MAX_SEGMENTS",
           "cpp_available"]

Backend = Literal["reference", "cpp", "triton"]

try:  # the C++ extension registers torch.ops.flowkern_cpu.*
    from flowkern import _C  # noqa: F401

    _CPP_ERROR: str | None = None
except ImportError as exc:  # pragma: no cover - depends on the build
    _CPP_ERROR = str(exc)


def cpp_available() -> bool:
    """True when the compiled CPU kernels (``flowkern._C``) are importable."""
    return _CPP_ERROR is None


_warned_no_cpp = False


def backend_for(device: torch.device) -> Backend:
    """The backend a call on ``device`` uses: ``FLOWKERN_BACKEND`` if set, else cpp on CPU, triton on CUDA."""
    global _warned_no_cpp
    forced = os.environ.get("FLOWKERN_BACKEND", "").strip().lower()
    if forced:
        if forced not in ("reference", "cpp", "triton"):
            raise ValueError(f"FLOWKERN_BACKEND must be one of reference, cpp, triton; got {forced!r}")
        if forced == "cpp" and device.type != "cpu":
            raise ValueError(f"FLOWKERN_BACKEND=cpp needs CPU tensors, got tensors on {device}")
        if forced == "cpp" and not cpp_available():
            raise ValueError(f"FLOWKERN_BACKEND=cpp but flowkern._C failed to import: {_CPP_ERROR}")
        if forced == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("FLOWKERN_BACKEND=triton with CPU tensors needs TRITON_INTERPRET=1 (set before import)")
        return forced  # type: ignore[return-value]
    if device.type == "cuda":
        return "triton"
    if device.type == "cpu":
        if cpp_available():
            return "cpp"
        if not _warned_no_cpp:
            warnings.warn(
                f"flowkern._C is not built ({_CPP_ERROR}); using the slow reference backend on CPU. "
                "Rebuild with `pip install --no-build-isolation -e .`.",
                stacklevel=3,
            )
            _warned_no_cpp = True
        return "reference"
    raise ValueError(f"flowkern supports CPU and CUDA tensors, got device {device}")


# ----------------------------------------------------------------------------------------------------------
# visibility keywords shared by both attention ops


def _reference_rules(key_ids: torch.Tensor | None, allowed: torch.Tensor | None, window: int,
                     group_ids: torch.Tensor | None) -> dict:
    """The kernel arguments turned back into :mod:`flowkern.reference` keywords (the reference backend)."""
    rules: dict = dict(key_padding_mask=None if key_ids is None else key_ids >= 0, window=window or None,
                       group_ids=group_ids)
    if key_ids is not None:
        rules["segment_ids"] = torch.where(key_ids >= 0, key_ids, -1 - key_ids).long()
    if allowed is not None:
        bits = torch.arange(allowed.shape[0], dtype=torch.int32, device=allowed.device)
        rules["allowed"] = ((allowed[:, None] >> bits) & 1).bool()
    return rules


def _visibility(q: torch.Tensor, sk: int, causal: bool, allowed: torch.Tensor | None, window: int | None,
                group_ids: torch.Tensor | None) -> tuple[torch.Tensor | None, int, torch.Tensor | None,
                                                         torch.Tensor | None]:
    """Checked keywords -> the backends' ``(allowed bitmask, window or 0, group_ids int32, span)``."""
    groups, span = _c.kernel_visibility(q.shape[0], sk, q.device, causal, window, group_ids)
    bits = None if allowed is None else _c.allowed_bits(allowed)
    return bits, 0 if window is None else int(window), groups, span


# ----------------------------------------------------------------------------------------------------------
# segment_attention


@torch.library.custom_op("flowkern::segment_attention", mutates_args=())
def _segment_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_ids: torch.Tensor, num_segments: int, causal: bool,
    scale: float, per_head: bool, allowed: torch.Tensor | None, window: int, group_ids: torch.Tensor | None,
    span: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    backend = backend_for(q.device)
    if backend == "reference":
        rules = _reference_rules(key_ids, allowed, window, group_ids)
        out, lse, mass = reference.segment_attention(
            q, k, v, rules.pop("segment_ids"), num_segments, causal=causal, scale=scale, per_head=True, **rules
        )
        lse, mass = lse.float(), mass.float()
    elif backend == "cpp":
        out, lse, mass = torch.ops.flowkern_cpu.segment_attention(
            q, k, v, key_ids, num_segments, causal, scale, allowed, window, group_ids, span
        )
    else:
        from flowkern.kernels.segment_attention import segment_attention_fwd

        out, lse, mass = segment_attention_fwd(q, k, v, key_ids, num_segments, causal, scale, allowed=allowed,
                                               window=window, group_ids=group_ids, span=span)
    if not per_head:
        mass = mass.mean(dim=1)
    return out, lse, mass


@_segment_attention_op.register_fake
def _(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_ids: torch.Tensor, num_segments: int, causal: bool,
    scale: float, per_head: bool, allowed: torch.Tensor | None, window: int, group_ids: torch.Tensor | None,
    span: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, Hq, Sq, _ = q.shape
    out = q.new_empty(q.shape[:3] + (v.shape[-1],))
    lse = q.new_empty((B, Hq, Sq), dtype=torch.float32)
    mass_shape = (B, Hq, Sq, num_segments) if per_head else (B, Sq, num_segments)
    return out, lse, q.new_empty(mass_shape, dtype=torch.float32)


def segment_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_ids: torch.Tensor,
    num_segments: int,
    *,
    causal: bool = True,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    per_head: bool = False,
    validate: bool = True,
    allowed: torch.Tensor | None = None,
    window: int | None = None,
    group_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused attention that also returns each query row's softmax mass per key segment.

    Never materialises the ``Sq x Sk`` matrix. GQA/MQA: k and v are not expanded in memory.

    Visibility. Row ``i`` stands at key position ``p = i + (Sk - Sq)`` (bottom-right), so its own segment and
    group are those of key ``p``. Key ``j`` is visible to row ``i`` iff::

        key_padding_mask[b, j]
        and allowed[seg(p), seg(j)]                                             (if allowed is given)
        and ( ((not causal or j <= p) and (window is None or p - j < window))
              or (group_ids[b, p] != 0 and group_ids[b, p] == group_ids[b, j]) )

    Softmax, lse, out and mass are over the visible keys. ``allowed``, ``window`` and ``group_ids`` are off by
    default and need ``Sq <= Sk``. The kernels skip key blocks that no row of a query block can see (outside the
    window and the rows' groups) and query blocks whose table rows are all False, so their work scales with the
    visible keys.

    Args:
        q: ``[B, Hq, Sq, D]`` float32/float16/bfloat16.
        k, v: ``[B, Hkv, Sk, D]``, same dtype and device, ``Hq % Hkv == 0``.
        segment_ids: ``[B, Sk]`` integer segment label of every key, in ``[0, num_segments)``.
        num_segments: 1..8.
        causal: bottom-right aligned: row i sees key j iff ``j <= i + (Sk - Sq)`` (decode Sq=1 sees all).
        key_padding_mask: optional bool ``[B, Sk]``, True = real token.
        scale: softmax scale, default ``D ** -0.5``.
        per_head: return the mass per head instead of the head mean.
        validate: check that ``segment_ids`` lie in ``[0, num_segments)``. The check reads the values (a device
            sync on CUDA) and is skipped under ``torch.compile``; callers that build the labels themselves (the
            HF attention hook, once per layer and decode step) pass False. Unchecked labels are clamped into
            ``[0, num_segments)``: an id < 0 counts in segment 0, an id >= num_segments in the last one.
        allowed: optional bool ``[num_segments, num_segments]`` on q's device: row = the query's segment, column
            = the key's segment; False hides every key of that segment from those rows (attention knockout). A
            row whose table row is all False sees nothing (out 0, lse -inf, mass 0).
        window: optional int >= 1: a row at ``p`` sees only keys fewer than ``window`` key slots behind it
            (``p - j < window``; keys ahead of ``p`` are left to ``causal``). It counts key *slots* (indices into
            k): on an uncompacted cache these are positions (left padding shifts every real token alike); on a
            compacted (pruned) cache they are not, so callers must not prune a cache that a window reads.
        group_ids: optional integer ``[B, Sk]`` on q's device, 0 = no group: a key in the row's own nonzero group
            is visible even where causal or the window hides it (bidirectional image blocks). Groups compare by
            value within a batch row; they need not be contiguous.

    Returns:
        ``(out, lse, mass)``: out ``[B, Hq, Sq, D]`` in q's dtype; lse float32 ``[B, Hq, Sq]`` (natural log);
        mass float32 ``[B, Sq, num_segments]`` head mean, or ``[B, Hq, Sq, num_segments]`` if ``per_head``.
        Each row with a visible key has mass summing to 1; a row with none gets out 0, mass 0, lse -inf.
        Non-finite inputs propagate as in SDPA (see the module docstring): a row with a NaN or +inf score at a
        visible key gets out, lse and mass NaN; a NaN/inf in v at a visible key makes the row's out non-finite.

    Raises:
        ValueError: naming the bad argument, before any kernel runs; also when grad is enabled and q, k or v
            requires grad (the op has no backward: use ``torch.no_grad()``, ``.detach()`` or SDPA).
    """
    for name, flag in (("causal", causal), ("per_head", per_head), ("validate", validate)):
        _c.check_bool(name, flag)
    _c.check_qk(q, k, causal)
    _c.check_float("v", v, 4)
    if v.dtype != q.dtype or v.device != q.device:
        raise ValueError(f"v must have q's dtype and device ({q.dtype}, {q.device}), got ({v.dtype}, {v.device})")
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    B, Sk = q.shape[0], k.shape[2]
    _c.check_segment_ids(segment_ids, num_segments, B, Sk, q.device, False)
    _c.check_key_padding_mask(key_padding_mask, q, Sk)
    _c.check_visibility(q, Sk, num_segments, allowed, window, group_ids)
    _c.check_no_grad("segment_attention", q=q, k=k, v=v)
    _c.check_segment_ids(segment_ids, num_segments, B, Sk, q.device, validate)
    key_ids = _c.key_ids(segment_ids, key_padding_mask, B, Sk, q.device, num_segments)
    return _segment_attention_op(
        _c.last_dim_contiguous(q), _c.last_dim_contiguous(k), _c.last_dim_contiguous(v), key_ids, num_segments,
        bool(causal), _c.resolve_scale(scale, q.shape[-1]), bool(per_head),
        *_visibility(q, Sk, bool(causal), allowed, window, group_ids),
    )


# ----------------------------------------------------------------------------------------------------------
# key_attention_mass


@torch.library.custom_op("flowkern::key_attention_mass", mutates_args=())
def _key_attention_mass_op(
    q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, key_ids: torch.Tensor | None, causal: bool, scale: float,
    per_head: bool, allowed: torch.Tensor | None, window: int, group_ids: torch.Tensor | None,
    span: torch.Tensor | None,
) -> torch.Tensor:
    backend = backend_for(q.device)
    if backend == "reference":
        rules = _reference_rules(key_ids, allowed, window, group_ids)
        received = reference.key_attention_mass(q, k, lse, causal=causal, scale=scale, per_head=True, **rules).float()
    elif backend == "cpp":
        received = torch.ops.flowkern_cpu.key_attention_mass(
            q, k, lse, key_ids, causal, scale, allowed, window, group_ids, span
        )
    else:
        from flowkern.kernels.key_attention_mass import key_attention_mass_fwd

        received = key_attention_mass_fwd(q, k, lse, key_ids, causal, scale, allowed=allowed, window=window,
                                          group_ids=group_ids, span=span)
    return received if per_head else received.mean(dim=1)


@_key_attention_mass_op.register_fake
def _(
    q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, key_ids: torch.Tensor | None, causal: bool, scale: float,
    per_head: bool, allowed: torch.Tensor | None, window: int, group_ids: torch.Tensor | None,
    span: torch.Tensor | None,
) -> torch.Tensor:
    B, Hq, _, _ = q.shape
    shape = (B, Hq, k.shape[2]) if per_head else (B, k.shape[2])
    return q.new_empty(shape, dtype=torch.float32)


def key_attention_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    *,
    causal: bool = True,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    per_head: bool = False,
    segment_ids: torch.Tensor | None = None,
    num_segments: int | None = None,
    allowed: torch.Tensor | None = None,
    window: int | None = None,
    group_ids: torch.Tensor | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """Softmax probability each key receives from the given query rows, in one pass using their LSE.

    Args:
        q: ``[B, Hq, Sq, D]``: the query rows of interest, taken to be the *last* Sq rows of the sequence (row i
            stands at key position ``i + (Sk - Sq)``), e.g. ``q[:, :, -1:]`` for the last prompt row.
        k: ``[B, Hkv, Sk, D]``, ``Hq % Hkv == 0``.
        lse: float32 ``[B, Hq, Sq]``, the row log-sum-exp returned by :func:`segment_attention` for those rows
            (slice it the same way as q).
        causal, key_padding_mask, scale: as in :func:`segment_attention`; use the same values.
        per_head: return ``[B, Hq, Sk]`` instead of the head mean.
        segment_ids, num_segments: the key segments ``[B, Sk]`` and their count, as in :func:`segment_attention`;
            needed only with ``allowed`` (checked to lie in ``[0, num_segments)`` when ``validate``).
        allowed, window, group_ids: the visibility rules of :func:`segment_attention` (same contract, including
            ``window`` counting key slots); pass the values that produced ``lse``.
        validate: as in :func:`segment_attention`.

    Returns:
        float32 ``[B, Sk]`` (or ``[B, Hq, Sk]``): ``exp(q_i.k_j * scale - lse_i)`` over the keys row i sees,
        averaged over the Sq rows and the heads. Rows with ``lse = -inf`` contribute 0; keys no row sees receive
        0. A row with ``lse = NaN`` (a NaN row of :func:`segment_attention`) makes every key it sees NaN, and no
        other key.

    Raises:
        ValueError: naming the bad argument, before any kernel runs; also when grad is enabled and q, k or lse
            requires grad (the op has no backward: use ``torch.no_grad()`` or ``.detach()``).
    """
    for name, flag in (("causal", causal), ("per_head", per_head), ("validate", validate)):
        _c.check_bool(name, flag)
    _c.check_qk(q, k, causal)
    B, Hq, Sq, _ = q.shape
    if not isinstance(lse, torch.Tensor) or tuple(lse.shape) != (B, Hq, Sq):
        got = tuple(lse.shape) if isinstance(lse, torch.Tensor) else type(lse).__name__
        raise ValueError(f"lse must be a float32 tensor [B={B}, Hq={Hq}, Sq={Sq}], got {got}")
    if lse.dtype != torch.float32 or lse.device != q.device:
        raise ValueError(f"lse must be float32 on q's device {q.device}, got {lse.dtype} on {lse.device}")
    Sk = k.shape[2]
    if (segment_ids is None) != (num_segments is None):
        raise ValueError("segment_ids and num_segments go together: pass both or neither")
    if segment_ids is not None:
        _c.check_segment_ids(segment_ids, num_segments, B, Sk, q.device, False)
    _c.check_key_padding_mask(key_padding_mask, q, Sk)
    _c.check_visibility(q, Sk, num_segments, allowed, window, group_ids)
    _c.check_no_grad("key_attention_mass", q=q, k=k, lse=lse)
    if segment_ids is not None:
        _c.check_segment_ids(segment_ids, num_segments, B, Sk, q.device, validate)
    features = allowed is not None or window is not None or group_ids is not None
    key_ids = _c.key_ids(segment_ids if allowed is not None else None, key_padding_mask, B, Sk, q.device,
                         num_segments or 1, needed=features)
    return _key_attention_mass_op(
        _c.last_dim_contiguous(q), _c.last_dim_contiguous(k), lse.contiguous(), key_ids, bool(causal),
        _c.resolve_scale(scale, q.shape[-1]), bool(per_head), *_visibility(q, Sk, bool(causal), allowed, window,
                                                                            group_ids),
    )


# ----------------------------------------------------------------------------------------------------------
# compact_


@torch.library.custom_op("flowkern::compact_", mutates_args=("tensors",))
def _compact_op(tensors: list[torch.Tensor], keep: torch.Tensor, dims: list[int]) -> torch.Tensor:
    backend = backend_for(keep.device)
    if backend == "reference":
        return reference.compact_(tensors, keep, dims)[1]
    if backend == "cpp":
        return torch.ops.flowkern_cpu.compact_(tensors, keep, dims)
    from flowkern.kernels.compact import compact_fwd

    return compact_fwd(tensors, keep, dims)


@_compact_op.register_fake
def _(tensors: list[torch.Tensor], keep: torch.Tensor, dims: list[int]) -> torch.Tensor:
    return keep.new_empty((keep.shape[0],), dtype=torch.int64)



def compact_(
    tensors: list[torch.Tensor] | tuple[torch.Tensor, ...] | torch.Tensor,
    keep: torch.Tensor,
    dim: int | list[int] | tuple[int, ...],
) -> tuple[list[torch.Tensor] | torch.Tensor, torch.Tensor]:
    """Stable in-place move of the kept positions to the front of each tensor's sequence dim.

    For every tensor ``x``, batch row ``b`` and kept position ``j`` (``keep[b, j]``), ``x[b, .., j, ..]`` moves
    to position ``dest = #{i < j : keep[b, i]}`` of the same row: order is preserved. Nothing new of full
    size is allocated; all tensors are done in one kernel launch on CUDA (Triton; one per group of tensors
    with different word size / alignment, normally one), by ``at::parallel_for`` on CPU (C++).

    Args:
        tensors: a list of tensors (or one tensor), e.g. all layers' K and V ``[B, H, S, D]`` and hidden states
            ``[B, S, D]``. Each must have ``B`` at dim 0 and ``S`` at its sequence dim; other dims, dtypes and
            strides are free (non-contiguous views are fine, no copies). They must not overlap in memory
            (each buffer once) and must not require grad (unless under ``torch.no_grad()``).
        keep: bool ``[B, S]`` on the tensors' device, True = keep.
        dim: the sequence dim: one int for all tensors (``-2`` fits both ``[B, S, D]`` and ``[B, H, S, D]``)
            or one per tensor. Never 0 (the batch dim).

    Returns:
        ``(views, lengths)``: ``views[i] = tensors[i].narrow(dim_i, 0, L)`` (same storage, ``L =
        max(lengths)``; a single view when ``tensors`` was one tensor) and ``lengths`` int64 ``[B]`` =
        ``keep.sum(1)``. In row ``b``, positions ``lengths[b] .. L-1`` hold unspecified old data of that row
        (finite if the input was): callers must mask them, e.g. with the key padding mask
        ``arange(L) < lengths[:, None]``. Positions ``>= L`` are untouched. ``L`` is read on the host (one
        device sync).

    Raises:
        ValueError: naming the bad argument, before any kernel runs.
    """
    single = isinstance(tensors, torch.Tensor)
    if not single and not isinstance(tensors, list | tuple):
        raise ValueError(f"tensors must be a tensor or a list of tensors, got {type(tensors).__name__}")
    tlist = [tensors] if single else list(tensors)
    dims = _c.check_compact(tlist, keep, dim)
    lengths = _compact_op(tlist, keep.contiguous(), dims)
    L = int(lengths.max()) if lengths.numel() else 0
    views = [t.narrow(d, 0, L) for t, d in zip(tlist, dims, strict=True)]
    return (views[0] if single else views), lengths
