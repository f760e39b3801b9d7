"""Key maps: which original tokens each layer of a pruned forward, or of a KV cache, holds. Pure tensor bookkeeping
for :mod:`flowkern.prune` and :mod:`flowkern.hf.session`: no model, no hooks, no transformers
(``tests/analysis/test_keymaps.py`` checks every function on hand-made tensors).

Vocabulary:

- a *key map* long ``[B, L]``: for each slot of a layer's sequence (its KV cache), the original token position it
  holds, or -1 for a hidden filler; rows are equally long (``L = max_b kept_b``): shorter rows carry their
  earliest removed positions as fillers, hidden from attention (:func:`equalise`);
- a :class:`Narrowing`: which rows the layers of one stage (``>= L``) of a forward keep, over the rows entering
  that stage; stages compose (:func:`compose`) to original positions;
- a :class:`KeyMapGroup`: layers of one cache that hold the same tokens, with their key map. A cache's groups are
  recorded beside it (:func:`cache_groups`, keyed weakly by the cache object, which is never edited here); every
  forward on the cache extends them by its new tokens (:func:`track_forward`), and compacting some layers
  regroups them (:func:`compacted_groups`).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "equalise",
    "Narrowing",
    "narrowing",
    "compose",
    "StageRows",
    "gather_tokens",
    "KeyMapGroup",
    "extend_groups",
    "compact_keymap",
    "cache_groups",
    "set_cache_groups",
    "cache_keymaps",
    "original_length",
    "track_forward",
    "held_keymap",
    "compacted_groups",
]


# ----------------------------------------------------------------------------------------------------------
# one forward: rows of equal length, the narrowing of layers >= L


def equalise(keep_real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Make every row keep the same number of positions.

    Args:
        keep_real: bool ``[B, S]``, the positions to keep (real tokens).

    Returns:
        ``(keep_all, index, keymap)``: bool ``[B, S]`` with exactly ``Lmax = max_b keep_real[b].sum()`` True per
        row (the kept positions plus, in shorter rows, their earliest other positions as fillers); long
        ``[B, Lmax]`` the kept positions in order; long ``[B, Lmax]`` the same with -1 at fillers.
    """
    n = keep_real.sum(dim=1)
    lmax = int(n.max()) if n.numel() else 0
    other = ~keep_real
    filler = other & (other.long().cumsum(dim=1) <= (lmax - n)[:, None])
    keep_all = keep_real | filler
    index = torch.sort((~keep_all).to(torch.int8), dim=1, stable=True).indices[:, :lmax]
    keymap = torch.where(keep_real.gather(1, index), index, torch.full_like(index, -1))
    return keep_all, index, keymap


@dataclass
class Narrowing:
    """Which rows of a forward the layers from one stage on compute on (the planner's answer, over the rows entering
    that stage: ``S_cur`` of them).

    Attributes:
        keep_all: bool ``[B, S_cur]``: the rows those layers compute on (kept tokens + fillers).
        index: long ``[B, L]``: the row (of the ``S_cur``) each row of the narrowed sequence comes from.
        keymap: long ``[B, L]``: ``index`` with -1 at the rows hidden from attention (fillers).
        hidden: whether any row is hidden (else no key padding mask is needed: the fast path).
        update: float ``[B, S_cur, D]`` or None: hidden states that replace the ones entering the stage right before
            they are compacted (merging); None keeps them.
    """

    keep_all: torch.Tensor
    index: torch.Tensor
    keymap: torch.Tensor
    hidden: bool
    update: torch.Tensor | None = None


def narrowing(keep_real: torch.Tensor, *, update: torch.Tensor | None = None) -> Narrowing:
    """The :class:`Narrowing` that keeps the rows ``keep_real`` (bool ``[B, S_cur]``), rows equalised with hidden
    fillers (:func:`equalise`); ``update``: see :attr:`Narrowing.update`."""
    keep_all, index, keymap = equalise(keep_real)
    return Narrowing(keep_all, index, keymap, bool((keymap < 0).any()), update)


def compose(index: torch.Tensor | None, keymap: torch.Tensor | None,
            narrowed: Narrowing) -> tuple[torch.Tensor, torch.Tensor]:
    """Original positions after one more stage.

    Args:
        index, keymap: long ``[B, S_cur]`` the original position of each current row, and the same with -1 at
            hidden rows; None: the current rows are the original positions ``0 .. S_cur-1``, none hidden.
        narrowed: the stage's :class:`Narrowing` over those rows.

    Returns:
        ``(index, keymap)`` long ``[B, L]`` of the narrowed rows: a row is hidden if the stage or an earlier one
        hides it.
    """
    if index is None:
        return narrowed.index, narrowed.keymap
    new_index = index.gather(1, narrowed.index.to(index.device))
    was = keymap.gather(1, narrowed.index.to(keymap.device)) >= 0
    return new_index, torch.where(was & (narrowed.keymap.to(index.device) >= 0), new_index, -1)


def gather_tokens(t: torch.Tensor, index: torch.Tensor, seq_dim: int) -> torch.Tensor:
    """Gather positions ``index [B, L]`` along ``seq_dim`` of a per-token tensor ``[..., B or 1, S, ...]`` (a
    ``[S]`` tensor is shared by the batch); returns ``[..., B, L, ...]``."""
    if t.dim() == 1:
        t = t.unsqueeze(0)
    nd = t.dim()
    sd = seq_dim % nd
    if sd == 0:
        raise ValueError(f"per-token tensor of shape {tuple(t.shape)} has no batch dim before its sequence dim")
    B, lmax = index.shape
    shape = list(t.shape)
    shape[sd - 1] = B
    t = t.expand(shape)
    view = [1] * nd
    view[sd - 1], view[sd] = B, lmax
    out_shape = list(shape)
    out_shape[sd] = lmax
    return t.gather(sd, index.view(view).expand(out_shape))


@dataclass
class StageRows:
    """The rows entering one stage of a prefill: what the stage chooses its kept image tokens among.

    Attributes:
        positions: long ``[B, S_cur]`` original prompt position of each row.
        image: bool ``[B, S_cur]`` the real image tokens among the rows (survivors of the earlier stages).
        real: bool ``[B, S_cur]`` the real tokens (False: padding, hidden fillers of an earlier stage).
        k: long ``[B]`` image tokens this stage keeps per sample (at most the surviving ones).
        layer: the stage's first decoder layer (0: before the decoder).
    """

    positions: torch.Tensor
    image: torch.Tensor
    real: torch.Tensor
    k: torch.Tensor
    layer: int


# ----------------------------------------------------------------------------------------------------------
# groups of layers that hold the same tokens


@dataclass
class KeyMapGroup:
    """Layers of one KV cache that hold the same tokens: their key map (long ``[B, Sk]``, -1 = hidden) and whether
    any slot is hidden (else no key padding mask is needed)."""

    layers: frozenset[int]
    keymap: torch.Tensor
    hidden: bool

    def mask(self) -> torch.Tensor | None:
        """bool ``[B, Sk]`` (True = a real key), or None when nothing is hidden."""
        return (self.keymap >= 0) if self.hidden else None


def extend_groups(groups: list[KeyMapGroup], past: int, n_new: int, real: torch.Tensor | None) -> None:
    """A forward of ``n_new`` tokens on a cache of ``past``: every group's key map gets their positions
    ``past .. past + n_new - 1`` (-1 where ``real`` bool ``[B, n_new]`` says padding), in place."""
    for g in groups:
        B = g.keymap.shape[0]
        pos = torch.arange(past, past + n_new, device=g.keymap.device).expand(B, n_new)
        if real is not None:
            r = real.to(g.keymap.device)
            pos = torch.where(r, pos, -1)
            g.hidden = g.hidden or not bool(r.all())
        g.keymap = torch.cat([g.keymap, pos], dim=1)


def compact_keymap(keymap: torch.Tensor, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Compact slots that already hold ``keymap`` (long ``[B, Sk]``) to the original positions ``kept`` (bool
    ``[B, T]``, True = keep) marks.

    Returns:
        ``(keep_slots, new_keymap)``: bool ``[B, Sk]`` the slots to move to the front (:func:`flowkern.compact_`),
        and long ``[B, L]`` the key map of the compacted slots (-1 = filler).
    """
    held = keymap >= 0
    slot_keep = kept.gather(1, keymap.clamp(min=0)) & held
    keep_all, _, slot_map = equalise(slot_keep)
    new_keymap = torch.where(slot_map >= 0, keymap.gather(1, slot_map.clamp(min=0)), -1)
    return keep_all, new_keymap


# ----------------------------------------------------------------------------------------------------------
# the groups recorded beside a cache


_GROUPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # cache -> list[KeyMapGroup]


def cache_groups(cache: Any) -> list[KeyMapGroup]:
    """The key-map groups of a cache's pruned layers (empty: every layer holds every token). The list is the one
    stored: extending a group's key map in place is seen by every later forward."""
    return _GROUPS.get(cache, []) if cache is not None else []


def set_cache_groups(cache: Any, groups: list[KeyMapGroup]) -> None:
    """Record what the layers of ``cache`` hold (an empty list forgets it)."""
    if groups:
        _GROUPS[cache] = list(groups)
    else:
        _GROUPS.pop(cache, None)


def cache_keymaps(cache: Any) -> dict[int, torch.Tensor]:
    """The key maps of a cache's pruned layers: ``{layer: int64 [B, Sk]}`` (original token position held by each
    cache slot, -1 for a hidden filler). Layers not listed hold every token."""
    return {layer: g.keymap for g in cache_groups(cache) for layer in sorted(g.layers)}


def original_length(cache: Any) -> int | None:
    """Tokens a cache has seen when its layer 0 holds only some of them (pruning before the decoder): one more than
    the last original position that layer holds; None when layer 0 holds every token (its length is the cache's)."""
    for g in cache_groups(cache):
        if 0 in g.layers:
            return int(g.keymap.max()) + 1 if g.keymap.numel() else 0
    return None


def track_forward(cache: Any, *, prefill: bool, past: int, n_new: int, real: torch.Tensor | None) -> None:
    """Before a forward of ``n_new`` tokens on ``cache`` (holding ``past``): a prefill starts an empty cache, so
    whatever it held before is forgotten; any other forward extends every group by its tokens
    (:func:`extend_groups`; ``real`` bool ``[B, n_new]``, False = padding)."""
    if prefill:
        set_cache_groups(cache, [])
        return
    groups = cache_groups(cache)
    if groups:
        extend_groups(groups, past, n_new, real)


def held_keymap(groups: list[KeyMapGroup], layers: Iterable[int], batch: int, total: int,
                device: torch.device) -> tuple[KeyMapGroup | None, torch.Tensor]:
    """What ``layers`` of a cache of ``total`` tokens hold now: ``(group, keymap)``, the group they belong to
    (None: they hold every token, and the key map is ``arange(total)`` per row of ``batch``).

    Raises:
        ValueError: the layers hold different tokens (compacted separately).
    """
    wanted = set(layers)
    touched = [g for g in groups if g.layers & wanted]
    if len(touched) > 1 or (touched and not wanted <= touched[0].layers):
        raise ValueError(
            f"layers {sorted(wanted)} hold different tokens (compacted separately): compact them one set at a time"
        )
    if not touched:
        return None, torch.arange(total, device=device).expand(batch, total)
    return touched[0], touched[0].keymap


def compacted_groups(groups: list[KeyMapGroup], old: KeyMapGroup | None, layers: Iterable[int],
                     keymap: torch.Tensor) -> list[KeyMapGroup]:
    """The groups after ``layers`` (all of group ``old``'s, or of no group) were compacted to ``keymap``: the other
    groups, what is left of ``old``, and one group of ``layers``."""
    wanted = frozenset(layers)
    now = [g for g in groups if not (g.layers & wanted)]
    if old is not None and old.layers - wanted:
        now.append(KeyMapGroup(old.layers - wanted, old.keymap, old.hidden))
    now.append(KeyMapGroup(wanted, keymap, bool((keymap < 0).any())))
    return now
