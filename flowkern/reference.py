"""Plain-PyTorch oracles for flowkern's ops (docs/ops.md, docs/reliability.md).

These materialise the full ``[B, Hq, Sq, Sk]`` score matrix, so they are slow and memory-hungry by design:
they exist to be obviously correct. They compute in ``float64`` when given ``float64`` inputs (the test
oracle) and in ``float32`` otherwise. Unlike the registered ops they return ``lse``/``mass`` in the
compute dtype, so a float64 oracle keeps all its precision.

Math (per batch ``b``, query head ``h``, kv head ``h // (Hq // Hkv)``, query row ``i``, key ``j``)::

    s[i, j]    = scale * <q[i], k[j]>                 if key j is visible to row i, else -inf
    p          = i + (Sk - Sq)                        (the key position row i stands at; bottom-right)
    visible    = key_padding_mask[b, j]
                 and allowed[seg[b, p], seg[b, j]]                              (if a table is given)
                 and ( ((not causal or j <= p) and (window is None or p - j < window))
                       or (group[b, p] != 0 and group[b, p] == group[b, j]) )   (if group_ids are given)
    lse[i]     = log sum_j exp(s[i, j])               (-inf for a row with no visible key)
    p[i, j]    = exp(s[i, j] - lse[i])                (0 for a row with no visible key, and where j is not visible)
    out[i]     = sum_j p[i, j] v[j]
    mass[i, c] = sum_{j : segment_ids[b, j] = c} p[i, j]
    key_mass[j] = mean over heads and over the Sq given rows of p[i, j]

Non-finite values (the policy of :mod:`flowkern.ops`, as in SDPA): a row with a NaN or +inf score at a visible
key gets ``lse = NaN``, hence ``p = NaN`` at every key it sees (out, mass and key_mass NaN there); a ``-inf``
score weighs 0; scores at keys a row cannot see are replaced by ``-inf`` before anything reads them. ``out`` is
the plain matmul ``p @ v``, so a non-finite ``v`` at a key a row cannot see still reaches that row through
``0 * NaN`` (like SDPA's math backend), except in a row with no visible key (out 0); lse and mass never
depend on v.
"""

from __future__ import annotations

import torch

__all__ = ["visible_mask", "segment_attention", "key_attention_mass", "compact_"]


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def visible_mask(
    sq: int,
    sk: int,
    *,
    causal: bool,
    key_padding_mask: torch.Tensor | None,
    device: torch.device,
    segment_ids: torch.Tensor | None = None,
    allowed: torch.Tensor | None = None,
    window: int | None = None,
    group_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bool ``[B or 1, 1, Sq, Sk]``: True where query row i may attend to key j, built densely from the rule.

    Row i stands at key position ``p = i + (Sk - Sq)`` (bottom-right alignment); its segment and group are those
    of key p. Causal: row i sees key j iff ``j <= p``. ``window``: only keys with ``p - j < window`` (keys ahead
    of p are not limited). ``group_ids`` ``[B, Sk]`` (0 = none): a key in the row's nonzero group is visible even
    where the causal / window rule hides it. ``allowed`` bool ``[nseg, nseg]`` (row = the query's segment,
    column = the key's segment, ``segment_ids [B, Sk]`` required) and ``key_padding_mask`` ``[B, Sk]`` hide keys
    whatever the other rules say. ``allowed``, ``window`` and ``group_ids`` need ``Sq <= Sk``.
    """
    i = torch.arange(sq, device=device)[:, None]
    j = torch.arange(sk, device=device)[None, :]
    pos = i + (sk - sq)  # [Sq, 1]
    vis = torch.ones(sq, sk, dtype=torch.bool, device=device)
    if causal:
        vis = j <= pos
    if window is not None:
        vis = vis & (pos - j < window)
    vis = vis[None, None]
    features = allowed is not None or window is not None or group_ids is not None
    if features and sq > sk:
        raise ValueError(f"allowed / window / group_ids need Sq <= Sk, got Sq={sq} > Sk={sk}")
    rows = pos[:, 0].clamp(min=0)  # the key position of each row
    if group_ids is not None:
        gq = group_ids[:, rows]  # [B, Sq]
        same = (gq[:, :, None] == group_ids[:, None, :]) & (gq != 0)[:, :, None]
        vis = vis | same[:, None]
    if allowed is not None:
        if segment_ids is None:
            raise ValueError("allowed needs segment_ids")
        seg = segment_ids.long()
        table = allowed.to(device=device, dtype=torch.bool)
        vis = vis & table[seg[:, rows][:, :, None], seg[:, None, :]][:, None]  # [B, 1, Sq, Sk]
    if key_padding_mask is not None:
        vis = vis & key_padding_mask.to(torch.bool)[:, None, None, :]
    return vis


def _probs(
    q: torch.Tensor, k: torch.Tensor, *, causal: bool, key_padding_mask: torch.Tensor | None, scale: float,
    lse: torch.Tensor | None = None, **rules: object,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax probabilities ``[B, Hq, Sq, Sk]`` and row lse ``[B, Hq, Sq]`` (given lse is used if passed);
    ``rules``: the visibility keywords of :func:`visible_mask`."""
    cd = _compute_dtype(q)
    group = q.shape[1] // k.shape[1]
    kf = k.to(cd).repeat_interleave(group, dim=1)
    s = torch.matmul(q.to(cd), kf.transpose(-1, -2)) * scale
    vis = visible_mask(q.shape[2], k.shape[2], causal=causal, key_padding_mask=key_padding_mask, device=q.device,
                       **rules)
    s = s.masked_fill(~vis, float("-inf"))
    if lse is None:
        lse = torch.logsumexp(s, dim=-1)  # NaN if a score is NaN, +inf if one is +inf: both mean NaN here
        lse = torch.where(lse == float("inf"), float("nan"), lse)
    lse = lse.to(cd)
    dead = lse == float("-inf")  # no visible key (or only -inf scores); NaN rows stay alive and give NaN
    p = torch.where(vis & ~dead[..., None], torch.exp(s - torch.where(dead, 0, lse)[..., None]), 0)
    return p, lse


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
    allowed: torch.Tensor | None = None,
    window: int | None = None,
    group_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference fused attention + per-segment softmax mass.

    Args:
        q: ``[B, Hq, Sq, D]``; k, v: ``[B, Hkv, Sk, D]`` with ``Hq % Hkv == 0``.
        segment_ids: ``[B, Sk]`` integers in ``[0, num_segments)``.
        key_padding_mask: optional bool ``[B, Sk]``, True = real token.
        allowed, window, group_ids: the visibility rules of :func:`visible_mask` (bool ``[nseg, nseg]``, int
            >= 1, integer ``[B, Sk]`` with 0 = no group); None = off.
    Returns:
        out ``[B, Hq, Sq, D]`` (q's dtype), lse ``[B, Hq, Sq]`` and mass ``[B, Sq, nseg]``
        (``[B, Hq, Sq, nseg]`` if ``per_head``), both in the compute dtype (float64 for float64 input).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    cd = _compute_dtype(q)
    p, lse = _probs(q, k, causal=causal, key_padding_mask=key_padding_mask, scale=scale, segment_ids=segment_ids,
                    allowed=allowed, window=window, group_ids=group_ids)
    group = q.shape[1] // k.shape[1]
    out = torch.matmul(p, v.to(cd).repeat_interleave(group, dim=1))
    out = torch.where((lse == float("-inf"))[..., None], 0, out)  # no visible key: 0, even if v held NaN
    onehot = torch.nn.functional.one_hot(segment_ids.long(), num_segments).to(cd)  # [B, Sk, nseg]
    mass = torch.matmul(p, onehot[:, None])  # [B, Hq, Sq, nseg]
    if not per_head:
        mass = mass.mean(dim=1)
    return out.to(q.dtype), lse, mass


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
    allowed: torch.Tensor | None = None,
    window: int | None = None,
    group_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference attention received by each key from the given query rows.

    Args:
        q: ``[B, Hq, Sq, D]`` — the rows of interest (the last Sq query positions: row i stands at key position
            ``i + (Sk - Sq)``);
        k: ``[B, Hkv, Sk, D]``; lse: ``[B, Hq, Sq]`` from :func:`segment_attention` for the same rows.
        segment_ids, allowed, window, group_ids: the visibility rules of :func:`visible_mask` (``segment_ids``
            only matters with ``allowed``); use the values given to :func:`segment_attention`.
    Returns:
        ``[B, Sk]`` (``[B, Hq, Sk]`` if ``per_head``): ``p[i, j]`` averaged over the Sq rows (and heads).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    p, _ = _probs(q, k, causal=causal, key_padding_mask=key_padding_mask, scale=scale, lse=lse,
                  segment_ids=segment_ids, allowed=allowed, window=window, group_ids=group_ids)
    received = p.mean(dim=2)  # [B, Hq, Sk]
    return received if per_head else received.mean(dim=1)


# ----------------------------------------------------------------------------------------------------------
# compact_


def compact_(
    tensors: list[torch.Tensor], keep: torch.Tensor, dims: int | list[int]
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Reference stable in-place compaction: per batch row, gather the kept positions and copy them to the front.

    Math (per tensor ``x`` with sequence dim ``d`` and batch row ``b``)::

        idx        = positions j with keep[b, j], increasing        (stable)
        x[b, .., :len(idx), ..] <- x[b, .., idx, ..]                 (index_select makes a copy first)
        lengths[b] = len(idx)

    Positions ``lengths[b] ..`` of row ``b`` are left untouched (old data).

    Args:
        tensors: each ``[B, ..., S (at its dim), ...]``, any dtype/strides, modified in place.
        keep: bool ``[B, S]``, True = keep.
        dims: the sequence dim of each tensor (one int for all, or one per tensor; negative allowed).
    Returns:
        ``(views, lengths)``: ``views[i] = tensors[i].narrow(dim, 0, L)`` with ``L = max(lengths)``, and
        ``lengths`` int64 ``[B]``.
    """
    if isinstance(dims, int):
        dims = [dims] * len(tensors)
    lengths = keep.sum(1, dtype=torch.int64)
    L = int(lengths.max()) if lengths.numel() else 0
    views = []
    for x, d in zip(tensors, dims, strict=True):
        d = d % x.dim()
        for b in range(keep.shape[0]):
            idx = keep[b].nonzero().squeeze(1)
            row = x[b]
            row.narrow(d - 1, 0, idx.numel()).copy_(row.index_select(d - 1, idx))
        views.append(x.narrow(d, 0, L))
    return views, lengths
