"""flowkern's custom ops: public wrappers, argument checks, fake impls and backend dispatch (docs/ops.md).

Each op is a ``torch.library`` custom op (``flowkern::segment_attention``, ``flowkern::key_attention_mass``,
``flowkern::compact_``) with a fake implementation, so it traces under ``torch.compile(fullgraph=True)``. The real
implementation picks a backend per call:

- ``cpp``: the C++ kernels in ``csrc/`` (``flowkern._C``) for CPU tensors (default on CPU);
- ``triton``: the kernels in ``flowkern/kernels/`` for CUDA tensors (default on CUDA), or for CPU tensors
  when ``TRITON_INTERPRET=1`` (how CI runs them);
- ``reference``: ``flowkern/reference.py``, materialises the score matrix (slow; the oracle).

``FLOWKERN_BACKEND=reference|cpp|triton`` forces one. Kernels receive one int32 ``key_ids [B, Sk]`` tensor:
the segment id of each key, or ``-1`` for a key hidden by ``key_padding_mask``.

Policies shared by every backend (tested in ``tests/ops/test_ops_policy.py``):

- **NaN/inf propagate, as in SDPA.** Let ``s[i, j] = scale * <q[i], k[j]>`` over the keys row ``i`` can see
  (causal and ``key_padding_mask``). If any of them is NaN or +inf (a NaN anywhere in ``q[i]``, a NaN/inf in
  ``k`` at a visible key), row ``i`` gets ``out``, ``lse`` and ``mass`` NaN, and in :func:`key_attention_mass`
  that row adds NaN to every key it sees. A ``-inf`` score weighs 0, like a masked key (a row whose visible
  scores are all ``-inf`` is a row with no visible key: out 0, lse -inf, mass 0, as SDPA's math backend gives).
  A NaN/inf in ``v`` at a visible key makes that row's ``out`` non-finite; ``lse`` and ``mass`` never depend on
  ``v``. Non-finite ``q``/``k`` values at keys a row cannot see are ignored on every backend. A non-finite ``v``
  at a key a row cannot see leaves its ``lse`` and ``mass`` alone but may still reach its ``out`` through
  ``0 * NaN`` (the reference multiplies the whole matrix, the C++ and Triton kernels the key blocks they visit,
  as SDPA and FlashAttention do) -- except a row with no visible key, whose ``out`` is always 0: keep padded /
  future ``v`` finite (e.g. zeros) if you read those rows' ``out``.
- **Unchecked segment ids are clamped** into ``[0, num_segments)`` (:func:`_key_ids`, before the padding fill):
  with ``validate=False`` or under ``torch.compile`` an id ``< 0`` counts in segment 0 and an id
  ``>= num_segments`` in the last segment. Attention itself never depends on segment ids (only
  ``key_padding_mask`` hides keys), and mass rows still sum to 1.
- **Forward only.** The ops have no backward: with grad enabled, an input that requires grad raises
  ``ValueError`` (call them under ``torch.no_grad()`` / ``torch.inference_mode()`` or on detached tensors, or use
  ``torch.nn.functional.scaled_dot_product_attention`` where a differentiable output is needed).
- ``causal``, ``per_head`` and ``validate`` must be bools (``causal="no"`` is an error, not "truthy").
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Literal

import torch

from flowkern import reference

__all__ = ["segment_attention", "key_attention_mass", "compact_", "backend_for", "MAX_SEGMENTS",
           "cpp_available"]

MAX_SEGMENTS = 8
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
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
# argument checks (metadata only, so they also run while torch.compile traces)


def _check_float(name: str, t: torch.Tensor, ndim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if t.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def _check_qk(q: torch.Tensor, k: torch.Tensor, causal: bool) -> None:
    _check_float("q", q, 4)
    _check_float("k", k, 4)
    if k.dtype != q.dtype:
        raise ValueError(f"k must have q's dtype {q.dtype}, got {k.dtype}")
    if k.device != q.device:
        raise ValueError(f"k must be on q's device {q.device}, got {k.device}")
    B, Hq, Sq, D = q.shape
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k must be [B={B}, Hkv, Sk, D={D}] to match q {tuple(q.shape)}, got {tuple(k.shape)}")
    if k.shape[1] == 0 or Hq % k.shape[1] != 0:
        raise ValueError(f"q heads ({Hq}) must be a multiple of k heads ({k.shape[1]})")
    if D == 0 or D > 256:
        raise ValueError(f"head dim D must be in 1..256, got {D}")
    if causal and Sq > k.shape[2]:
        raise ValueError(f"causal attention needs Sq <= Sk, got q length {Sq} > k length {k.shape[2]}")


def _check_key_padding_mask(key_padding_mask: torch.Tensor | None, q: torch.Tensor, sk: int) -> None:
    if key_padding_mask is None:
        return
    if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
        raise ValueError("key_padding_mask must be a bool tensor [B, Sk] (True = real token)")
    if tuple(key_padding_mask.shape) != (q.shape[0], sk):
        raise ValueError(f"key_padding_mask must be [B={q.shape[0]}, Sk={sk}], got {tuple(key_padding_mask.shape)}")
    if key_padding_mask.device != q.device:
        raise ValueError(f"key_padding_mask must be on q's device {q.device}, got {key_padding_mask.device}")


def _resolve_scale(scale: float | None, d: int) -> float:
    if scale is None:
        return d**-0.5
    scale = float(scale)
    if not (scale > 0 and scale != float("inf")):
        raise ValueError(f"scale must be a positive finite number, got {scale}")
    return scale


def _check_bool(name: str, value: object) -> None:
    numpy_bool = type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_")
    if not (isinstance(value, bool | torch.SymBool) or numpy_bool):
        raise ValueError(f"{name} must be a bool (True or False), got {value!r}")


def _check_no_grad(op: str, **tensors: torch.Tensor) -> None:
    """Forward-only ops: refuse inputs that would need a backward (metadata only; also runs under compile)."""
    if not torch.is_grad_enabled():
        return
    for name, t in tensors.items():
        if t.requires_grad:
            raise ValueError(
                f"{name} requires grad, but {op} is forward-only (no backward): call it under torch.no_grad() or "
                f"torch.inference_mode(), or pass {name}.detach(); for a differentiable attention output use "
                "torch.nn.functional.scaled_dot_product_attention"
            )


def _key_ids(segment_ids: torch.Tensor | None, key_padding_mask: torch.Tensor | None, b: int, sk: int,
             device: torch.device, num_segments: int = 1) -> torch.Tensor | None:
    """int32 ``[B, Sk]``: segment id per key, -1 where masked (None when there is nothing to say).

    Segment ids are clamped into ``[0, num_segments)`` first (in their own dtype, so a huge int64 id cannot wrap
    in the int32 cast): unchecked out-of-range ids count in the nearest segment and never hide a key, on every
    backend. Only ``key_padding_mask`` produces -1.
    """
    if segment_ids is None and key_padding_mask is None:
        return None
    if segment_ids is None:
        ids = torch.zeros(b, sk, dtype=torch.int32, device=device)
    else:
        ids = segment_ids.clamp(0, num_segments - 1).to(torch.int32)
    if key_padding_mask is not None:
        ids = ids.masked_fill(~key_padding_mask, -1)
    return ids.contiguous()


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


# ----------------------------------------------------------------------------------------------------------
# segment_attention


@torch.library.custom_op("flowkern::segment_attention", mutates_args=())
def _segment_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_ids: torch.Tensor, num_segments: int, causal: bool,
    scale: float, per_head: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    backend = backend_for(q.device)
    if backend == "reference":
        seg = key_ids.clamp(min=0)
        kpm = key_ids >= 0
        out, lse, mass = reference.segment_attention(
            q, k, v, seg, num_segments, causal=causal, key_padding_mask=kpm, scale=scale, per_head=True
        )
        lse, mass = lse.float(), mass.float()
    elif backend == "cpp":
        out, lse, mass = torch.ops.flowkern_cpu.segment_attention(q, k, v, key_ids, num_segments, causal, scale)
    else:
        from flowkern.kernels.segment_attention import segment_attention_fwd

        out, lse, mass = segment_attention_fwd(q, k, v, key_ids, num_segments, causal, scale)
    if not per_head:
        mass = mass.mean(dim=1)
    return out, lse, mass


@_segment_attention_op.register_fake
def _(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_ids: torch.Tensor, num_segments: int, causal: bool,
    scale: float, per_head: bool,
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused attention that also returns each query row's softmax mass per key segment.

    Never materialises the ``Sq x Sk`` matrix. GQA/MQA: k and v are not expanded in memory.

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
            ``[0, num_segments)``: an id < 0 counts in segment 0, an id >= num_segments in the last one; the
            attention output never depends on them (only ``key_padding_mask`` hides keys).

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
        _check_bool(name, flag)
    _check_qk(q, k, causal)
    _check_float("v", v, 4)
    if v.dtype != q.dtype or v.device != q.device:
        raise ValueError(f"v must have q's dtype and device ({q.dtype}, {q.device}), got ({v.dtype}, {v.device})")
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    B, Sk = q.shape[0], k.shape[2]
    if isinstance(num_segments, bool) or not isinstance(num_segments, int) or not 1 <= num_segments <= MAX_SEGMENTS:
        raise ValueError(f"num_segments must be an int in 1..{MAX_SEGMENTS}, got {num_segments!r}")
    if not isinstance(segment_ids, torch.Tensor) or segment_ids.dtype.is_floating_point or segment_ids.dtype in (
        torch.bool, torch.complex64, torch.complex128
    ):
        raise ValueError("segment_ids must be an integer tensor [B, Sk]")
    if tuple(segment_ids.shape) != (B, Sk):
        raise ValueError(f"segment_ids must be [B={B}, Sk={Sk}], got {tuple(segment_ids.shape)}")
    if segment_ids.device != q.device:
        raise ValueError(f"segment_ids must be on q's device {q.device}, got {segment_ids.device}")
    _check_key_padding_mask(key_padding_mask, q, Sk)
    _check_no_grad("segment_attention", q=q, k=k, v=v)
    if validate and not torch.compiler.is_compiling() and segment_ids.numel() > 0:
        lo, hi = int(segment_ids.min()), int(segment_ids.max())
        if lo < 0 or hi >= num_segments:
            raise ValueError(f"segment_ids must lie in [0, {num_segments}), got values in [{lo}, {hi}]")
    key_ids = _key_ids(segment_ids, key_padding_mask, B, Sk, q.device, num_segments)
    return _segment_attention_op(
        _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v), key_ids, num_segments,
        bool(causal), _resolve_scale(scale, q.shape[-1]), bool(per_head),
    )


# ----------------------------------------------------------------------------------------------------------
# key_attention_mass


@torch.library.custom_op("flowkern::key_attention_mass", mutates_args=())
def _key_attention_mass_op(
    q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, key_ids: torch.Tensor | None, causal: bool, scale: float,
    per_head: bool,
) -> torch.Tensor:
    backend = backend_for(q.device)
    if backend == "reference":
        kpm = None if key_ids is None else key_ids >= 0
        received = reference.key_attention_mass(
            q, k, lse, causal=causal, key_padding_mask=kpm, scale=scale, per_head=True
        ).float()
    elif backend == "cpp":
        received = torch.ops.flowkern_cpu.key_attention_mass(q, k, lse, key_ids, causal, scale)
    else:
        from flowkern.kernels.key_attention_mass import key_attention_mass_fwd

        received = key_attention_mass_fwd(q, k, lse, key_ids, causal, scale)
    return received if per_head else received.mean(dim=1)


@_key_attention_mass_op.register_fake
def _(
    q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, key_ids: torch.Tensor | None, causal: bool, scale: float,
    per_head: bool,
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
) -> torch.Tensor:
    """Softmax probability each key receives from the given query rows, in one pass using their LSE.

    Args:
        q: ``[B, Hq, Sq, D]``: the query rows of interest. With ``causal`` they are taken to be the *last* Sq
            rows of the sequence (bottom-right alignment), e.g. ``q[:, :, -1:]`` for the last prompt row.
        k: ``[B, Hkv, Sk, D]``, ``Hq % Hkv == 0``.
        lse: float32 ``[B, Hq, Sq]``, the row log-sum-exp returned by :func:`segment_attention` for those rows
            (slice it the same way as q).
        causal, key_padding_mask, scale: as in :func:`segment_attention`; use the same values.
        per_head: return ``[B, Hq, Sk]`` instead of the head mean.

    Returns:
        float32 ``[B, Sk]`` (or ``[B, Hq, Sk]``): ``exp(q_i.k_j * scale - lse_i)`` averaged over the Sq rows
        and the heads. Rows with ``lse = -inf`` contribute 0; masked keys receive 0. A row with ``lse = NaN``
        (a NaN row of :func:`segment_attention`) makes every key it sees NaN, and no other key.

    Raises:
        ValueError: naming the bad argument, before any kernel runs; also when grad is enabled and q, k or lse
            requires grad (the op has no backward: use ``torch.no_grad()`` or ``.detach()``).
    """
    _check_bool("causal", causal)
    _check_bool("per_head", per_head)
    _check_qk(q, k, causal)
    B, Hq, Sq, _ = q.shape
    if not isinstance(lse, torch.Tensor) or tuple(lse.shape) != (B, Hq, Sq):
        got = tuple(lse.shape) if isinstance(lse, torch.Tensor) else type(lse).__name__
        raise ValueError(f"lse must be a float32 tensor [B={B}, Hq={Hq}, Sq={Sq}], got {got}")
    if lse.dtype != torch.float32 or lse.device != q.device:
        raise ValueError(f"lse must be float32 on q's device {q.device}, got {lse.dtype} on {lse.device}")
    Sk = k.shape[2]
    _check_key_padding_mask(key_padding_mask, q, Sk)
    _check_no_grad("key_attention_mass", q=q, k=k, lse=lse)
    key_ids = _key_ids(None, key_padding_mask, B, Sk, q.device)
    return _key_attention_mass_op(
        _last_dim_contiguous(q), _last_dim_contiguous(k), lse.contiguous(), key_ids, bool(causal),
        _resolve_scale(scale, q.shape[-1]), bool(per_head),
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


@functools.lru_cache(maxsize=256)
def _strided_extent(shape: tuple[int, ...], stride: tuple[int, ...]) -> tuple[int, bool]:
    """``(extent, self_overlapping)`` of a non-empty strided layout, in elements: the largest offset + 1, and
    True unless the strides prove that distinct indices address distinct elements (dims of size > 1 sorted by
    stride, each stride exceeds the extent of the smaller ones). Dense, permuted and sliced tensors pass."""
    extent, overlapping = 0, False
    for st, size in sorted((st, sz) for sz, st in zip(shape, stride, strict=True) if sz > 1):
        overlapping |= st <= extent
        extent += (size - 1) * st
    return extent + 1, overlapping


def _check_compact(
    tensors: list[torch.Tensor], keep: torch.Tensor, dim: int | list[int] | tuple[int, ...]
) -> list[int]:
    """Validates compact_'s arguments (metadata only, plus addresses outside torch.compile); returns the
    non-negative sequence dim of each tensor."""
    if len(tensors) == 0:
        raise ValueError("tensors must be a non-empty list of tensors")
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"tensors[{i}] must be a torch.Tensor, got {type(t).__name__}")
    if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or keep.dim() != 2:
        got = f"{keep.dtype} {tuple(keep.shape)}" if isinstance(keep, torch.Tensor) else type(keep).__name__
        raise ValueError(f"keep must be a bool tensor [B, S] (True = keep), got {got}")
    B, S = keep.shape
    if isinstance(dim, bool) or not isinstance(dim, int | list | tuple):
        raise ValueError(f"dim must be an int or a list of ints (one per tensor), got {dim!r}")
    dims = [dim] * len(tensors) if isinstance(dim, int) else list(dim)
    if len(dims) != len(tensors):
        raise ValueError(f"dim must be an int or one int per tensor ({len(tensors)}), got {len(dims)} dims")
    out = []
    for i, (t, d) in enumerate(zip(tensors, dims, strict=True)):
        if isinstance(d, bool) or not isinstance(d, int) or not -t.dim() <= d < t.dim() or d % t.dim() == 0:
            raise ValueError(
                f"dim must index a sequence dim of tensors[{i}] (shape {tuple(t.shape)}): 1..{t.dim() - 1} or "
                f"negative, not the batch dim 0; got {d!r}"
            )
        d = d % t.dim()
        if t.shape[0] != B or t.shape[d] != S:
            raise ValueError(
                f"keep is [B={B}, S={S}] but tensors[{i}] has shape {tuple(t.shape)}: B={t.shape[0]}, "
                f"S={t.shape[d]} at dim {d}"
            )
        if t.device != keep.device:
            raise ValueError(f"tensors[{i}] must be on keep's device {keep.device}, got {t.device}")
        if t.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"tensors[{i}] requires grad: compact_ is not differentiable, call it under "
                             "torch.no_grad()")
        if t.numel() > 0 and _strided_extent(tuple(t.shape), t.stride())[1]:
            raise ValueError(f"tensors[{i}] may overlap itself in memory (shape {tuple(t.shape)}, strides "
                             f"{t.stride()}, e.g. an expand()ed view): it cannot be compacted in place")
        out.append(d)
    if not torch.compiler.is_compiling():
        spans = sorted(
            (t.data_ptr(), t.data_ptr() + _strided_extent(tuple(t.shape), t.stride())[0] * t.element_size(), i)
            for i, t in enumerate(tensors) if t.numel() > 0
        )
        for (_, hi, i), (lo, _, j) in zip(spans, spans[1:], strict=False):
            if lo < hi:
                raise ValueError(f"tensors[{min(i, j)}] and tensors[{max(i, j)}] overlap in memory (the same "
                                 "tensor twice, or views of one buffer): pass each buffer once")
    return out


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
    dims = _check_compact(tlist, keep, dim)
    lengths = _compact_op(tlist, keep.contiguous(), dims)
    L = int(lengths.max()) if lengths.numel() else 0
    views = [t.narrow(d, 0, L) for t, d in zip(tlist, dims, strict=True)]
    return (views[0] if single else views), lengths
