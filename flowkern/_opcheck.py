"""Argument checks and kernel-argument preparation for :mod:`flowkern.ops` (metadata only, or plain torch ops,
so everything here also runs while ``torch.compile`` traces).

Besides the shape / dtype / device checks this module turns the public visibility keywords into what the backends
read (the interface between ``flowkern/ops.py`` and the kernels):

- ``key_ids`` int32 ``[B, Sk]``: ``s`` for a real key of segment ``s``, ``-1 - s`` for a key hidden by
  ``key_padding_mask`` (``key_ids < 0`` <=> padded; the segment of a padded position survives, because a query row
  standing on it still needs its own segment for the ``allowed`` table);
- ``allowed`` int32 ``[nseg]``: bit ``t`` of ``allowed[s]`` set <=> query segment ``s`` sees key segment ``t``;
- ``window`` int, 0 = none;
- ``group_ids`` int32 ``[B, Sk]``: the groups relabelled densely (``1..#groups`` per row, 0 = none), so any
  integer labels survive the int32 cast;
- ``span`` int32 ``[B, 2, Sk]``: ``span[b, 0, p]`` / ``span[b, 1, p]`` = the lowest / one past the highest key that
  any rule can make visible to a row standing at key position ``p`` (causal, window, the row's group's first and
  last index); kernels visit only the key blocks inside a query block's span.
"""

from __future__ import annotations

import functools

import torch

MAX_SEGMENTS = 8
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_NON_INT_DTYPES = (torch.bool, torch.complex64, torch.complex128)


def check_float(name: str, t: torch.Tensor, ndim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if t.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def check_qk(q: torch.Tensor, k: torch.Tensor, causal: bool) -> None:
    check_float("q", q, 4)
    check_float("k", k, 4)
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


def check_key_padding_mask(key_padding_mask: torch.Tensor | None, q: torch.Tensor, sk: int) -> None:
    if key_padding_mask is None:
        return
    if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
        raise ValueError("key_padding_mask must be a bool tensor [B, Sk] (True = real token)")
    if tuple(key_padding_mask.shape) != (q.shape[0], sk):
        raise ValueError(f"key_padding_mask must be [B={q.shape[0]}, Sk={sk}], got {tuple(key_padding_mask.shape)}")
    if key_padding_mask.device != q.device:
        raise ValueError(f"key_padding_mask must be on q's device {q.device}, got {key_padding_mask.device}")


def resolve_scale(scale: float | None, d: int) -> float:
    if scale is None:
        return d**-0.5
    scale = float(scale)
    if not (scale > 0 and scale != float("inf")):
        raise ValueError(f"scale must be a positive finite number, got {scale}")
    return scale


def check_bool(name: str, value: object) -> None:
    numpy_bool = type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_")
    if not (isinstance(value, bool | torch.SymBool) or numpy_bool):
        raise ValueError(f"{name} must be a bool (True or False), got {value!r}")


def check_no_grad(op: str, **tensors: torch.Tensor) -> None:
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


def key_ids(segment_ids: torch.Tensor | None, key_padding_mask: torch.Tensor | None, b: int, sk: int,
            device: torch.device, num_segments: int = 1, needed: bool = False) -> torch.Tensor | None:
    """int32 ``[B, Sk]``: segment id ``s`` per key, ``-1 - s`` where ``key_padding_mask`` hides it (None when
    there is nothing to say and ``needed`` is False).

    Segment ids are clamped into ``[0, num_segments)`` first (in their own dtype, so a huge int64 id cannot wrap
    in the int32 cast): unchecked out-of-range ids count in the nearest segment and never hide a key, on every
    backend. Only ``key_padding_mask`` produces negative ids.
    """
    if segment_ids is None and key_padding_mask is None and not needed:
        return None
    if segment_ids is None:
        ids = torch.zeros(b, sk, dtype=torch.int32, device=device)
    else:
        ids = segment_ids.clamp(0, num_segments - 1).to(torch.int32)
    if key_padding_mask is not None:
        ids = torch.where(key_padding_mask, ids, -1 - ids)
    return ids.contiguous()


def check_segment_ids(segment_ids: object, num_segments: object, b: int, sk: int, device: torch.device,
                      validate: bool) -> None:
    """``num_segments`` an int in 1..MAX_SEGMENTS, ``segment_ids`` an integer ``[B, Sk]`` tensor on ``device``
    (values in ``[0, num_segments)`` when ``validate``: reads them, so skipped under ``torch.compile``)."""
    if isinstance(num_segments, bool) or not isinstance(num_segments, int) or not 1 <= num_segments <= MAX_SEGMENTS:
        raise ValueError(f"num_segments must be an int in 1..{MAX_SEGMENTS}, got {num_segments!r}")
    if not isinstance(segment_ids, torch.Tensor) or segment_ids.dtype.is_floating_point or (
        segment_ids.dtype in _NON_INT_DTYPES
    ):
        raise ValueError("segment_ids must be an integer tensor [B, Sk]")
    if tuple(segment_ids.shape) != (b, sk):
        raise ValueError(f"segment_ids must be [B={b}, Sk={sk}], got {tuple(segment_ids.shape)}")
    if segment_ids.device != device:
        raise ValueError(f"segment_ids must be on q's device {device}, got {segment_ids.device}")
    if validate and not torch.compiler.is_compiling() and segment_ids.numel() > 0:
        lo, hi = int(segment_ids.min()), int(segment_ids.max())
        if lo < 0 or hi >= num_segments:
            raise ValueError(f"segment_ids must lie in [0, {num_segments}), got values in [{lo}, {hi}]")


def check_visibility(q: torch.Tensor, sk: int, num_segments: int | None, allowed: object, window: object,
                     group_ids: object) -> None:
    """The visibility keywords: ``allowed`` bool ``[num_segments, num_segments]``, ``window`` an int >= 1,
    ``group_ids`` an integer ``[B, Sk]`` tensor, tensors on q's device; any of them needs ``Sq <= Sk``."""
    if allowed is not None:
        if num_segments is None:
            raise ValueError("allowed needs segment_ids and num_segments (the table is indexed by segment)")
        want = (num_segments, num_segments)
        if not isinstance(allowed, torch.Tensor) or allowed.dtype != torch.bool or tuple(allowed.shape) != want:
            got = f"{allowed.dtype} {tuple(allowed.shape)}" if isinstance(allowed, torch.Tensor) else type(
                allowed).__name__
            raise ValueError(f"allowed must be a bool tensor [num_segments, num_segments] = {list(want)} (row = the "
                             f"query's segment, column = the key's segment), got {got}")
        if allowed.device != q.device:
            raise ValueError(f"allowed must be on q's device {q.device}, got {allowed.device}")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int | torch.SymInt) or window < 1):
        raise ValueError(f"window must be a positive int (key slots a row sees behind it) or None, got {window!r}")
    if group_ids is not None:
        if not isinstance(group_ids, torch.Tensor) or group_ids.dtype.is_floating_point or (
            group_ids.dtype in _NON_INT_DTYPES
        ):
            raise ValueError("group_ids must be an integer tensor [B, Sk] (0 = no group)")
        if tuple(group_ids.shape) != (q.shape[0], sk):
            raise ValueError(f"group_ids must be [B={q.shape[0]}, Sk={sk}], got {tuple(group_ids.shape)}")
        if group_ids.device != q.device:
            raise ValueError(f"group_ids must be on q's device {q.device}, got {group_ids.device}")
    if (allowed is not None or window is not None or group_ids is not None) and q.shape[2] > sk:
        raise ValueError(f"allowed / window / group_ids need Sq <= Sk (row i stands at key i + Sk - Sq), got q "
                         f"length {q.shape[2]} > k length {sk}")


def allowed_bits(allowed: torch.Tensor) -> torch.Tensor:
    """int32 ``[nseg]``: bit ``t`` of entry ``s`` set <=> ``allowed[s, t]``."""
    n = allowed.shape[0]
    weights = torch.ones(n, dtype=torch.int32, device=allowed.device) << torch.arange(
        n, dtype=torch.int32, device=allowed.device)
    return (allowed.to(torch.int32) * weights).sum(1, dtype=torch.int32).contiguous()


def _groups(group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per key: its group relabelled ``1..#groups`` in its row (0 stays 0), and the first and last index of that
    group in the row. A stable sort puts each group's keys in a run, in index order; no loop over tokens."""
    b, sk = group_ids.shape
    dev = group_ids.device
    sorted_g, order = torch.sort(group_ids, dim=1, stable=True)
    pos = torch.arange(sk, device=dev).expand(b, sk)
    edge = sorted_g[:, 1:] != sorted_g[:, :-1]
    true = torch.ones(b, 1, dtype=torch.bool, device=dev)
    starts, ends = torch.cat([true, edge], 1), torch.cat([edge, true], 1)
    run_first = torch.where(starts, pos, 0).cummax(1).values
    run_last = torch.where(ends, pos, sk).flip(1).cummin(1).values.flip(1)
    label = torch.where(sorted_g == 0, 0, starts.cumsum(1))
    first, last, dense = (torch.empty_like(order).scatter_(1, order, x) for x in (
        order.gather(1, run_first), order.gather(1, run_last), label))
    return dense, first, last


def kernel_visibility(
    b: int, sk: int, device: torch.device, causal: bool, window: int | None, group_ids: torch.Tensor | None
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(group_ids int32 [B, Sk] relabelled, span int32 [B, 2, Sk])`` for the backends; ``(None, None)`` when
    neither a window nor groups are given."""
    if window is None and group_ids is None:
        return None, None
    p = torch.arange(sk, device=device)
    lo = (p - window + 1).clamp(min=0) if window is not None else torch.zeros_like(p)
    hi = p + 1 if causal else torch.full_like(p, sk)
    lo, hi = lo.expand(b, sk), hi.expand(b, sk)
    groups = None
    if group_ids is not None:
        dense, first, last = _groups(group_ids)
        member = dense != 0
        lo = torch.where(member, torch.minimum(lo, first), lo)
        hi = torch.where(member, torch.maximum(hi, last + 1), hi)
        groups = dense.to(torch.int32).contiguous()
    return groups, torch.stack([lo, hi], 1).to(torch.int32).contiguous()


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


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


def check_compact(
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

