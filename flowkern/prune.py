"""``flowkern.prune``: remove image tokens from decoder layer L on, for real (hidden states and KV cache).

.. code-block:: python

    with flowkern.prune(model, layer=2, keep=0) as p:           # the paper's truncation with k = 0
        out = model.generate(**inputs, max_new_tokens=32, do_sample=False)
    p.num_kept_image_tokens, p.prefill_seconds, p.decode_tokens_per_second

    with flowkern.prune(model, layer=8, keep=64, rank="attention") as p:   # FastV-style: keep the top 64
        out = model.generate(**inputs, max_new_tokens=32)

**What it computes (paper §3.4, eq. 9-13).** ``layer=L`` is 0-based: decoder layers ``0 .. L-1`` see the whole
prompt; layers ``L ..`` compute on the prompt without the removed image tokens (the paper counts layers from 1:
its "truncation at layer l" is ``layer=l-1`` here, and its "layer 1, no image token passed to the LLM" is
``layer=0``). The kept set is every text token plus, per sample, ``k`` of its image tokens (``keep``: 0 = drop all,
an int = at most that many, a float in [0, 1] = that fraction of the sample's image tokens, rounded half up),
chosen by ``rank``:

- ``"attention"``: the eq. 10-12 ranking: the attention each image token receives from the last prompt row at layer
  ``L-1`` (softmax probability, mean over heads, eq. 9), via :func:`flowkern.key_attention_mass`: never an
  ``S x S`` matrix; ties go to the earlier token;
- ``"random"``: a control; a random score per sequence position from ``torch.Generator().manual_seed(seed)``
  (identical rows get identical choices);
- ``"none"``: the first ``k`` image tokens in sequence order;
- ``"grid"``: a control, plain spatial downsampling: on each image grid of the model's layout
  (:class:`flowkern.hf.segments.ImageGrid`, from :mod:`flowkern.hf.models`) every ``s``-th row and column, ``s`` the
  smallest stride whose sub-grid has at most ``k`` cells, centred (a 24 x 24 grid at ``k = 64`` keeps rows and
  columns 1, 4, ..., 22; at ``k = 1`` the cell (11, 11)); the ``k`` - (sub-grid) remaining tokens are every n-th other
  cell in raster order,
  so exactly ``k`` are kept. Several grids per sample (tiles, frames) share ``k`` in proportion to their sizes.

Removed tokens are never keys of layers ``>= L`` again: the first answer token and every decoded token see only
the kept ones there. Kept tokens keep their RoPE / M-RoPE positions (the layer inputs ``cos``/``sin`` and
``position_ids`` are gathered, cached keys are never re-rotated, later tokens are not renumbered), so the result
equals -- up to float rounding -- an attention-mask run in which layers ``>= L`` simply cannot see the removed keys
(FastV's / the paper's masking variant), which is what ``tests/test_prune.py`` checks.

**How.** Like :func:`flowkern.trace`: on enter the language model switches to the ``"flowkern"`` attention (the
vision tower keeps its own) and forward pre-hooks are installed; on exit (also on error) they are removed and the
implementation restored. At the prefill, a row hook on layer ``L-1``'s attention records the ranking; the pre-hook of
decoder layer ``L`` picks the kept positions and compacts the hidden states in place (:func:`flowkern.compact_`)
together with the per-token layer inputs; layers ``>= L`` run on the shorter sequence and fill their KV cache with
kept tokens only, while layers ``< L`` keep the full cache. Each pruned layer's cache is described by a *key map*:
int64 ``[B, Sk]``, the original position of the token in each cache slot (-1 = hidden filler). The key map is
stored with the cache (so it outlives the ``with`` block) and grows by one column per decoded token; from it the
hooks make the pruned layers' key padding mask and :func:`flowkern.trace` labels their keys.

**Batches.** Samples may have different numbers of image tokens and left padding. Rows are made equally long
(``Lmax = max_b kept_b``) by also carrying, in shorter rows, their earliest removed positions as *fillers* that are
hidden from attention (key map -1); compaction is stable, so every row's last prompt token stays at the last
position, where ``generate`` reads the logits. Text tokens and each row's last prompt token are always kept.

**After a full prefill.** ``when="decode"`` (or :func:`compact_cache_` by hand) runs the prefill on the whole
prompt, then compacts the KV cache of layers ``>= L`` to the kept tokens: the first answer token is the unpruned
model's, and decode steps skip the removed keys. Multi-turn chat: call :func:`compact_cache_` on the cache between
turns and go on generating inside ``flowkern.prune(model)``.

Limits (errors say so): a :class:`transformers.DynamicCache` (or none) only -- no static, offloaded or quantized
cache; ``layer=0`` removes by masking (transformers reads the sequence length from layer 0's cache, so its cache
stays whole; exact, but no speed-up) and cannot rank by attention; Qwen3-VL's DeepStack needs ``layer`` past its
DeepStack layers; chunked prefill and assisted decoding are not supported. Beam search works (the beams of a sample
hold identical key maps, so the cache reordering between them is harmless). Image tokens that arrive in a later
forward on a non-empty cache (a new image in a second chat turn) are kept. A plain forward inside the block returns
outputs for the compacted sequence only: row ``i`` is the token at original position
:attr:`Pruning.token_positions` ``[:, i]``.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch

if TYPE_CHECKING:
    from flowkern.hf.calls import ForwardCall

__all__ = ["prune", "Pruning", "compact_cache_", "cache_keymaps", "ForwardTimer"]

Rank = Literal["attention", "random", "none", "grid"]
When = Literal["prefill", "decode"]
_RANKS = ("attention", "random", "none", "grid")


# ----------------------------------------------------------------------------------------------------------
# key maps of a cache: which original tokens each layer's KV cache holds


@dataclass
class _Group:
    """Layers of one cache that hold the same tokens: their key map and its key padding mask."""

    layers: frozenset[int]
    keymap: torch.Tensor  # int64 [B, Sk]: original position per cache slot, -1 = hidden
    hidden: bool  # whether any slot is hidden (else the mask is None: fast path)
    _mask: torch.Tensor | None = None  # cached (keymap >= 0), dropped when the key map grows

    def mask(self) -> torch.Tensor | None:
        if not self.hidden:
            return None
        if self._mask is None or self._mask.shape != self.keymap.shape:
            self._mask = self.keymap >= 0
        return self._mask


_KEYMAPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # cache -> list[_Group]


def cache_keymaps(cache: Any) -> dict[int, torch.Tensor]:
    """The key maps of a cache's pruned layers: ``{layer: int64 [B, Sk]}`` (original token position held by each
    cache slot, -1 for a hidden filler). Layers not listed hold every token."""
    return {layer: g.keymap for g in _KEYMAPS.get(cache, ()) for layer in sorted(g.layers)}


def _group_of(cache: Any, layer: int) -> _Group | None:
    for g in _KEYMAPS.get(cache, ()):
        if layer in g.layers:
            return g
    return None


# ----------------------------------------------------------------------------------------------------------
# choosing and compacting


def _num_to_keep(keep: int | float, n_image: torch.Tensor) -> torch.Tensor:
    """Image tokens to keep per sample: long ``[B]`` from the ``keep`` spec and the image-token counts ``[B]``."""
    if isinstance(keep, float):
        return torch.floor(n_image.double() * keep + 0.5).long().clamp(max=n_image)
    return n_image.clamp(max=int(keep))


def _choose(
    is_image: torch.Tensor, k: torch.Tensor, rank: str, scores: torch.Tensor | None, seed: int
) -> torch.Tensor:
    """bool ``[B, S]``: the ``k[b]`` best image tokens of each row by ``rank`` (stable: ties -> earlier token).

    ``scores`` float ``[B, S]``: the attention received (``rank="attention"``) or :func:`_grid_scores` (``"grid"``).
    """
    B, S = is_image.shape
    dev = is_image.device
    if rank in ("attention", "grid"):
        assert scores is not None
        s = scores.float()
    elif rank == "random":
        s = torch.rand(S, generator=torch.Generator().manual_seed(int(seed))).to(dev).expand(B, S)
    else:
        s = -torch.arange(S, device=dev, dtype=torch.float32).expand(B, S)
    s = s.masked_fill(~is_image, float("-inf"))
    order = torch.sort(s, dim=1, descending=True, stable=True).indices
    place = torch.empty_like(order).scatter_(1, order, torch.arange(S, device=dev).expand(B, S))
    return is_image & (place < k.to(dev)[:, None])


def _grid_cells(index: torch.Tensor, q: int) -> torch.Tensor:
    """bool ``[rows, cols]``: the ``min(q, cells)`` cells of one grid the ``"grid"`` rank keeps.

    ``index`` long ``[rows, cols]`` (-1 = no token there). The cells at rows ``o, o+s, o+2s, ...`` (centred:
    ``o = ((rows-1) mod s) // 2``, columns alike) for the smallest stride ``s`` with at most ``q`` such cells, then
    every n-th remaining cell
    in raster order (``floor((i + 0.5) * remaining / rest)``) until ``q`` are chosen.
    """
    valid = index >= 0
    n = int(valid.sum())
    if q >= n:
        return valid
    chosen = torch.zeros_like(valid)
    if q <= 0:
        return chosen
    rows, cols = valid.shape
    r, c = torch.arange(rows)[:, None], torch.arange(cols)[None, :]
    for s in range(1, max(rows, cols) + 1):
        sub = valid & (r % s == ((rows - 1) % s) // 2) & (c % s == ((cols - 1) % s) // 2)
        if int(sub.sum()) <= q:
            chosen = sub
            break
    rest = q - int(chosen.sum())
    if rest > 0:
        others = torch.nonzero((valid & ~chosen).flatten()).flatten()
        pick = ((torch.arange(rest, dtype=torch.float64) + 0.5) * others.numel() / rest).long()
        flat = chosen.flatten().clone()
        flat[others[pick]] = True
        chosen = flat.view(rows, cols)
    return chosen


def _grid_scores(grids: list[list[torch.Tensor]], k: torch.Tensor, is_image: torch.Tensor) -> torch.Tensor:
    """float ``[B, S]`` for :func:`_choose` with ``rank="grid"``: 1 at the ``k[b]`` image tokens of a spatially
    uniform subsample of sample b's grids, 0 at its other image tokens (tokens on no grid, e.g. a CLS, come last).

    Args:
        grids: per sample, its image grids as long ``[rows, cols]`` *sequence positions* (-1 = no token).
        k: long ``[B]`` image tokens to keep per sample.
        is_image: bool ``[B, S]`` the image tokens.
    """
    B, S = is_image.shape
    scores = torch.zeros(B, S, dtype=torch.float32)
    on_grid = torch.zeros(B, S, dtype=torch.bool)
    for b, views in enumerate(grids):
        sizes = [int((g >= 0).sum()) for g in views]
        total, kb = sum(sizes), min(int(k[b]), sum(sizes))
        done = 0
        for g, n in zip(views, sizes, strict=True):  # k shared in proportion to grid size (rounded half up)
            q = (2 * kb * (done + n) + total) // (2 * total) - (2 * kb * done + total) // (2 * total)
            done += n
            cells = _grid_cells(g, q)
            scores[b, g[cells]] = 1.0
            on_grid[b, g[g >= 0]] = True
    scores[~on_grid] = -0.5
    return scores.to(is_image.device)


def _equalise(keep_real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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


def _gather_tokens(t: torch.Tensor, index: torch.Tensor, seq_dim: int) -> torch.Tensor:
    """Gather positions ``index [B, Lmax]`` along ``seq_dim`` of a per-token tensor ``[..., B or 1, S, ...]``."""
    if t.dim() == 1:  # [S], shared by the batch
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


def compact_cache_(
    cache: Any,
    keep: torch.Tensor,
    layers: Iterable[int],
    *,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Compact the KV cache of some layers in place so that they hold only the kept tokens.

    One :func:`flowkern.compact_` call moves the kept slots of every given layer's keys and values ``[B, H, S, D]``
    to the front; the layers' stored tensors become the narrowed views. Rows keep the same number of slots
    (shorter rows carry hidden fillers, see :mod:`flowkern.prune`). The cache's key maps record what each layer
    holds; decode on it inside ``flowkern.prune(model)`` (any ``layer``), which masks the fillers and tracks new
    tokens. Layers already compacted are compacted further (``keep`` is still indexed by original position).

    Args:
        cache: a ``transformers.DynamicCache`` filled by a forward / ``generate`` call.
        keep: bool ``[B, T]`` over original token positions (``T = cache.get_seq_length()``), True = keep.
        layers: decoder layers to compact (>= 1: transformers reads the sequence length from layer 0's cache).
            They must currently hold the same tokens (all full, or compacted together before).
        attention_mask: optional ``[B, T]`` padding mask (0 = padding): padding is never kept.

    Returns:
        int64 ``[B, S']`` the new key map of those layers: original position held by each slot, -1 = hidden.

    Raises:
        ValueError: bad ``keep`` / ``layers``; NotImplementedError: not a plain DynamicCache.
    """
    from flowkern import ops
    from flowkern.hf import compat

    compat.check_dynamic_cache(cache)
    if cache is None:
        raise ValueError("cache must be a transformers DynamicCache, got None")
    layers = sorted({int(i) for i in layers})
    if not layers:
        raise ValueError("layers must name at least one decoder layer")
    n_layers = compat.cache_num_layers(cache)
    if layers[0] < 1 or layers[-1] >= n_layers:
        raise ValueError(
            f"layers must be in 1..{n_layers - 1} (layer 0 keeps the whole sequence: transformers reads the cache "
            f"length from it), got {layers}"
        )
    total = compat.cache_length(cache)
    if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or keep.dim() != 2:
        raise ValueError(f"keep must be a bool tensor [B, T] (T = {total} cached tokens), got {keep!r:.80}")
    first = compat.layer_kv(cache, layers[0])
    if first is None:
        raise ValueError(f"layer {layers[0]} of the cache is empty: fill the cache (prefill) first")
    B = first[0].shape[0]
    if tuple(keep.shape) != (B, total):
        raise ValueError(f"keep must be [B={B}, T={total}] (original token positions), got {tuple(keep.shape)}")
    dev = first[0].device
    keep = keep.to(dev)
    if attention_mask is not None:
        if tuple(attention_mask.shape) != (B, total):
            raise ValueError(f"attention_mask must be [B={B}, T={total}], got {tuple(attention_mask.shape)}")
        keep = keep & attention_mask.to(dev).bool()
    groups = {id(g): g for i in layers if (g := _group_of(cache, i)) is not None}
    covered = {i for g in groups.values() for i in g.layers if i in layers}
    if len(groups) > 1 or (groups and covered != set(layers)):
        raise ValueError(
            f"layers {layers} hold different tokens (compacted separately): compact them one set at a time"
        )
    old = next(iter(groups.values()), None)
    if old is None:
        keymap = torch.arange(total, device=dev).expand(B, total)
    else:
        keymap = old.keymap
    slots = keymap.shape[1]
    stored = [compat.layer_kv(cache, i) for i in layers]
    for i, kv in zip(layers, stored, strict=True):
        if kv is None or tuple(kv[0].shape[:1]) != (B,) or kv[0].shape[-2] != slots:
            have = None if kv is None else tuple(kv[0].shape)
            raise ValueError(f"layer {i}'s cache holds {have}, expected [B={B}, H, {slots}, D]")
    held = keymap >= 0
    slot_keep = keep.gather(1, keymap.clamp(min=0)) & held
    keep_all, _, slot_map = _equalise(slot_keep)
    new_keymap = torch.where(slot_map >= 0, keymap.gather(1, slot_map.clamp(min=0)), -1)
    tensors = [t for kv in stored for t in kv]
    with torch.no_grad():
        views, _ = ops.compact_(tensors, keep_all, -2)
    for j, i in enumerate(layers):
        compat.set_layer_kv(cache, i, views[2 * j], views[2 * j + 1])
    groups_now = [g for g in _KEYMAPS.get(cache, []) if not (g.layers & set(layers))]
    if old is not None and old.layers - set(layers):
        groups_now.append(_Group(old.layers - set(layers), old.keymap, old.hidden))
    groups_now.append(_Group(frozenset(layers), new_keymap, bool((new_keymap < 0).any())))
    _KEYMAPS[cache] = groups_now
    return new_keymap


# ----------------------------------------------------------------------------------------------------------
# the context manager


@dataclass
class _Plan:
    """How the prefill of layers >= L differs: kept positions, key map and the gathered per-token inputs."""

    keep_all: torch.Tensor  # bool [B, S]
    index: torch.Tensor  # long [B, Lmax]
    keymap: torch.Tensor  # long [B, Lmax] (-1 = filler / padding)
    compact: bool  # False at layer 0: removal by masking only
    hidden: bool  # any slot hidden
    inputs: dict[str, Any] = field(default_factory=dict)  # gathered layer kwargs, filled at layer L

    def mask(self) -> torch.Tensor | None:
        return (self.keymap >= 0) if self.hidden else None


class _Forward:
    """State of one outermost forward call of the model."""

    def __init__(self, prefill: bool, cache: Any, n_new: int, capture_hidden: bool) -> None:
        self.prefill = prefill
        self.cache = cache
        self.n_new = n_new
        self.capture_hidden = capture_hidden
        self.scores: torch.Tensor | None = None  # float32 [B, S] attention received at layer L-1
        self.need_scores = False
        self.keep_real: torch.Tensor | None = None  # when already decided (no-cache continuation)
        self.plan: _Plan | None = None
        self.continuation = False  # a cache-free forward that repeats the prompt plus generated tokens
        self.device: torch.device | None = None
        self.start = 0.0


def _on(mask: torch.Tensor | None, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The mask on the device of the layer's hidden states (layers may sit on several devices)."""
    hidden = args[0] if args else kwargs.get("hidden_states")
    if mask is not None and isinstance(hidden, torch.Tensor) and mask.device != hidden.device:
        return mask.to(hidden.device)
    return mask


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


class Pruning:
    """Context manager that removes image tokens from decoder layer ``layer`` on, and its record.
    Create it with :func:`prune`.

    Attributes (filled at each prefill):
        keep_mask: bool ``[B, S]``: prompt tokens kept (text + kept image tokens; False for padding).
        image_mask: bool ``[B, S]``: the image (placeholder) tokens of the prompt.
        scores: float32 ``[B, S]`` or None: attention each prompt token received from the last prompt row at layer
            ``layer - 1`` (head mean; ``rank="attention"`` only).
        token_positions: long ``[B, Lmax]``: original position of each row of the compacted sequence (fillers
            included); ``keymap`` is the same with -1 at hidden fillers.
        prefill_seconds: wall time of the last prefill forward (the whole model, vision tower included).
        decode_seconds: wall time of each later forward (decode step) since that prefill.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        layer: int | None,
        keep: int | float = 0,
        rank: Rank = "attention",
        seed: int = 0,
        when: When = "prefill",
        timing: bool = True,
    ) -> None:
        from flowkern.hf.calls import ForwardWatcher
        from flowkern.hf.models import get_adapter

        self.model = model
        self.adapter = get_adapter(model)
        self.config = model.config
        self.text_config = self.adapter.text_config(model.config)
        self.num_layers = int(self.text_config.num_hidden_layers)
        if rank not in _RANKS:
            raise ValueError(f"rank must be one of {_RANKS}, got {rank!r}")
        if when not in ("prefill", "decode"):
            raise ValueError(f"when must be 'prefill' or 'decode', got {when!r}")
        if isinstance(keep, bool) or not isinstance(keep, int | float):
            raise ValueError(f"keep must be an int >= 0 or a float fraction in [0, 1], got {keep!r}")
        if isinstance(keep, float) and not 0.0 <= keep <= 1.0 or isinstance(keep, int) and keep < 0:
            raise ValueError(f"keep must be an int >= 0 or a float fraction in [0, 1], got {keep!r}")
        if layer is not None:
            if isinstance(layer, bool) or not isinstance(layer, int) or not -self.num_layers <= layer < self.num_layers:
                raise ValueError(
                    f"layer must be a decoder layer index in [0, {self.num_layers}) (negative counts from the end), "
                    f"got {layer!r}"
                )
            layer %= self.num_layers
            ranks_needed = rank == "attention" and keep != 0
            if layer == 0 and ranks_needed:
                raise ValueError(
                    "rank='attention' ranks image tokens by the attention they receive at layer L-1, so it needs "
                    "layer >= 1; at layer=0 use keep=0, rank='none' or rank='random'"
                )
            if layer == 0 and when == "decode":
                raise ValueError("when='decode' compacts the cache of layers >= 1: use layer >= 1")
            deepstack = getattr(getattr(self.config, "vision_config", None), "deepstack_visual_indexes", None) or []
            if deepstack and when == "prefill" and 0 < layer < len(deepstack):
                raise NotImplementedError(
                    f"{self.adapter.family}: DeepStack adds visual features to the image tokens after decoder layers "
                    f"0..{len(deepstack) - 1}; pruning before that (layer={layer}) is not supported: use layer >= "
                    f"{len(deepstack)}"
                )
        self.layer = layer
        self.keep = keep
        self.rank = rank
        self.seed = int(seed)
        self.when = when
        self.timing = bool(timing)

        self._installed = False
        self._handles: list[Any] = []
        self._row_hooked: list[torch.nn.Module] = []
        self._attn: dict[int, torch.nn.Module] = {}
        self._prev_impl: str | None = None
        self._calls = ForwardWatcher("flowkern.prune", self._on_call, self._on_return)
        self._fwd: _Forward | None = None
        self._prompt_ids: torch.Tensor | None = None
        self._prompt_keep: torch.Tensor | None = None
        self._real: torch.Tensor | None = None
        self._layout_inputs: dict[str, Any] = {}
        # the record
        self.keep_mask: torch.Tensor | None = None
        self.image_mask: torch.Tensor | None = None
        self.scores: torch.Tensor | None = None
        self.token_positions: torch.Tensor | None = None
        self.keymap: torch.Tensor | None = None
        self.prefill_seconds: float | None = None
        self.decode_seconds: list[float] = []
        self._batch = 0

    # ------------------------------------------------------------------------------------------------------
    # results

    @property
    def num_image_tokens(self) -> torch.Tensor:
        """long ``[B]``: image tokens per sample in the prompt."""
        return self._need(self.image_mask).sum(dim=1).cpu()

    @property
    def num_kept_image_tokens(self) -> torch.Tensor:
        """long ``[B]``: image tokens kept per sample (layers >= ``layer`` see only these)."""
        return (self._need(self.image_mask) & self._need(self.keep_mask)).sum(dim=1).cpu()

    @property
    def kept_image_positions(self) -> list[torch.Tensor]:
        """Per sample, long ``[k_b]``: prompt positions of the kept image tokens, ascending."""
        kept = (self._need(self.image_mask) & self._need(self.keep_mask)).cpu()
        return [torch.nonzero(row).flatten() for row in kept]

    @property
    def decode_tokens_per_second(self) -> float | None:
        """``B * steps / sum(decode_seconds)`` (forward time only), or None before any decode step."""
        total = sum(self.decode_seconds)
        return self._batch * len(self.decode_seconds) / total if total > 0 else None

    def _need(self, value: torch.Tensor | None) -> torch.Tensor:
        if value is None:
            raise RuntimeError("flowkern.prune recorded no prefill: run the model inside the `with` block")
        return value

    def to_dict(self) -> dict:
        """JSON-able summary: settings, per-sample image-token counts and kept positions, timing."""
        out: dict[str, Any] = dict(
            family=self.adapter.family, layer=self.layer, keep=self.keep, rank=self.rank, seed=self.seed,
            when=self.when, num_layers=self.num_layers, prefill_seconds=self.prefill_seconds,
            decode_steps=len(self.decode_seconds), decode_tokens_per_second=self.decode_tokens_per_second,
        )
        if self.image_mask is not None and self.keep_mask is not None:
            out.update(
                num_image_tokens=self.num_image_tokens.tolist(),
                num_kept_image_tokens=self.num_kept_image_tokens.tolist(),
                kept_image_positions=[p.tolist() for p in self.kept_image_positions],
                pruned_length=None if self.token_positions is None else int(self.token_positions.shape[1]),
                prompt_length=int(self.keep_mask.shape[1]),
            )
        return out

    # ------------------------------------------------------------------------------------------------------
    # install / uninstall

    def __enter__(self) -> Pruning:
        from flowkern.hf import compat
        from flowkern.hf.attention import ROW_HOOKS_ATTR, language_attention_modules, use_flowkern_attention

        if self._installed:
            raise RuntimeError("this flowkern.prune is already active")
        model, text_config = self.model, self.text_config
        attn_modules = language_attention_modules(model, text_config)
        if not attn_modules:
            raise ValueError(f"{self.adapter.family}: found no attention module of the language model")
        if any(getattr(m, "_flowkern_pruning", None) is not None for m in attn_modules):
            raise RuntimeError("this model is already inside a flowkern.prune")
        names = {id(m): n for n, m in model.named_modules()}
        self._prev_impl = compat.attn_implementation(text_config)
        try:
            use_flowkern_attention(model, self.adapter.text_config_key, text_config)
            for m in attn_modules:
                idx = int(m.layer_idx)
                self._attn[idx] = m
                m._flowkern_pruning = self
                parent = model.get_submodule(names[id(m)].rpartition(".")[0])
                self._handles.append(parent.register_forward_pre_hook(self._make_layer_hook(idx), with_kwargs=True))
            if self.layer is not None and self.layer >= 1 and self.rank == "attention" and self.keep != 0:
                ranker = self._attn[self.layer - 1]
                hooks = getattr(ranker, ROW_HOOKS_ATTR, None)
                if hooks is None:
                    hooks = []
                    setattr(ranker, ROW_HOOKS_ATTR, hooks)
                hooks.append(self._row_hook)
                self._row_hooked.append(ranker)
            self._calls.install(model, text_config)
        except BaseException:
            self._uninstall()
            raise
        self._installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        self._uninstall()

    def _uninstall(self) -> None:
        from flowkern.hf.attention import KEYMAP_ATTR, ROW_HOOKS_ATTR, restore_attention

        self._calls.remove()
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for m in self._row_hooked:
            hooks = getattr(m, ROW_HOOKS_ATTR, [])
            if self._row_hook in hooks:
                hooks.remove(self._row_hook)
            if not hooks and hasattr(m, ROW_HOOKS_ATTR):
                delattr(m, ROW_HOOKS_ATTR)
        self._row_hooked.clear()
        for m in self._attn.values():
            for attr in (KEYMAP_ATTR, "_flowkern_pruning"):
                if hasattr(m, attr):
                    delattr(m, attr)
        self._attn.clear()
        restore_attention(self.model, self.adapter.text_config_key, self.text_config, self._prev_impl)
        self._prev_impl = None
        self._installed = False
        self._fwd = None

    # ------------------------------------------------------------------------------------------------------
    # model-level hooks

    def _on_call(self, call: ForwardCall) -> None:
        from flowkern.hf import compat

        ids, kwargs, n_new, device = call.ids, call.kwargs, call.length, call.device
        cache = compat.call_cache(kwargs)
        compat.check_dynamic_cache(cache)
        past = compat.cache_length(cache)
        mask = compat.padding_mask_2d(kwargs.get("attention_mask"), "flowkern.prune")
        capture = bool(kwargs.get("output_hidden_states", getattr(self.config, "output_hidden_states", False)))
        fwd = _Forward(past == 0, cache, n_new, capture)
        self._batch = call.batch
        self._fwd = fwd
        if fwd.prefill:
            if cache is not None:
                _KEYMAPS.pop(cache, None)  # an empty cache: whatever it held before is gone
            continuation = (  # only generate(use_cache=False) re-feeds a prompt: a new call prunes afresh
                kwargs.get("use_cache") is False and cache is None
                and self._prompt_ids is not None and ids is not None and n_new > self._prompt_ids.shape[1]
                and ids.shape[0] == self._prompt_ids.shape[0]
                and torch.equal(ids[:, : self._prompt_ids.shape[1]], self._prompt_ids.to(ids.device))
            )
            if continuation:  # generate(use_cache=False): the whole sequence again; keep the prompt's decision
                if self.when == "decode":
                    raise NotImplementedError("flowkern.prune(when='decode') needs a KV cache (use_cache=True)")
                assert self._prompt_keep is not None
                new = mask[:, -(n_new - self._prompt_ids.shape[1]) :].bool() if mask is not None else torch.ones(
                    ids.shape[0], n_new - self._prompt_ids.shape[1], dtype=torch.bool, device=ids.device)
                fwd.keep_real = torch.cat([self._prompt_keep.to(ids.device), new.to(ids.device)], dim=1)
                fwd.prefill = True
            elif self.layer is not None:
                self._start_prompt(ids, mask, n_new)
                self._layout_inputs = {k: v for k in self.adapter.layout_inputs if (v := kwargs.get(k)) is not None}
                fwd.need_scores = self.rank == "attention" and self.keep != 0
            if not continuation:
                self.decode_seconds = []
            fwd.continuation = continuation
        else:
            self._extend_keymaps(cache, past, n_new, mask, device)
        if self.timing:
            _sync(device)
        fwd.device = device
        fwd.start = time.perf_counter()

    def _on_return(self) -> None:
        fwd, self._fwd = self._fwd, None
        if fwd is None:
            return
        if self.timing:
            _sync(fwd.device)
        elapsed = time.perf_counter() - fwd.start
        if fwd.prefill and not fwd.continuation:
            self.prefill_seconds = elapsed
            if self.layer is not None and self.when == "decode":
                keep_mask = self._decide(fwd)
                if fwd.cache is not None:
                    self.keymap = compact_cache_(fwd.cache, keep_mask, range(self.layer, self.num_layers))
        else:
            self.decode_seconds.append(elapsed)

    def _start_prompt(self, ids: torch.Tensor | None, mask: torch.Tensor | None, n_new: int) -> None:
        if ids is None:
            raise ValueError("flowkern.prune needs input_ids at the prefill to find the image tokens")
        if mask is not None:
            mask = mask[:, :n_new].bool()
            if not bool(mask[:, -1].all()):
                raise ValueError(
                    "flowkern.prune needs left padding (the last prompt position real in every row): set "
                    "tokenizer.padding_side = 'left'"
                )
        real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.to(ids.device)
        placeholders = torch.tensor(self.adapter.placeholder_token_ids(self.config), device=ids.device)
        self._prompt_ids = ids.detach().clone()
        self.image_mask = torch.isin(ids, placeholders) & real
        self._real = real
        self.keep_mask = None
        self.scores = None
        self.token_positions = None
        self.keymap = None
        self._prompt_keep = None

    def _extend_keymaps(
        self, cache: Any, past: int, n_new: int, mask: torch.Tensor | None, device: torch.device
    ) -> None:
        """A forward on a non-empty cache: every pruned layer of the cache also gets the new tokens."""
        groups = _KEYMAPS.get(cache) if cache is not None else None
        if not groups:
            return
        new = torch.arange(past, past + n_new, device=device)
        real = None
        if mask is not None and mask.shape[1] >= n_new:
            real = mask[:, -n_new:].to(device).bool()
        for g in groups:
            B = g.keymap.shape[0]
            pos = new.to(g.keymap.device).expand(B, n_new)
            if real is not None:
                pos = torch.where(real.to(g.keymap.device), pos, -1)
                g.hidden = g.hidden or not bool(real.all())
            g.keymap = torch.cat([g.keymap, pos], dim=1)

    # ------------------------------------------------------------------------------------------------------
    # attention / layer hooks

    def _row_hook(
        self, module: torch.nn.Module, q_last: torch.Tensor, k: torch.Tensor, lse_last: torch.Tensor,
        kpm: torch.Tensor | None, scale: float, causal: bool,
    ) -> None:
        fwd = self._fwd
        if fwd is None or not fwd.prefill or not fwd.need_scores or fwd.keep_real is not None:
            return
        from flowkern import ops

        fwd.scores = ops.key_attention_mass(q_last, k, lse_last, causal=causal, key_padding_mask=kpm, scale=scale)

    def _decide(self, fwd: _Forward) -> torch.Tensor:
        """Kept prompt positions (bool [B, S]) at this prefill; records them."""
        image, real = self._need(self.image_mask), self._need(self._real)
        if fwd.need_scores and fwd.scores is None:
            raise RuntimeError(
                f"flowkern.prune: layer {self.layer - 1}'s attention did not run through flowkern (was the attention "
                "implementation changed inside the block?)"
            )
        n_image = image.sum(dim=1)
        k = _num_to_keep(self.keep, n_image)
        scores = self._grid_scores(image, k) if self.rank == "grid" and self.keep != 0 else fwd.scores
        chosen = _choose(image, k, self.rank, scores, self.seed) if self.keep != 0 else torch.zeros_like(image)
        keep_real = real & (~image | chosen)
        keep_real[:, -1] = True  # the row that produces the next token
        self.keep_mask = keep_real
        self._prompt_keep = keep_real
        self.scores = None if fwd.scores is None else fwd.scores.float()
        return keep_real

    def _grid_scores(self, image: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """``rank="grid"``: the image grids of the adapter's layout at this prompt, as scores (:func:`_grid_scores`)."""
        from flowkern.hf.segments import IMAGE, USER

        ids = self._need(self._prompt_ids)
        segments = torch.where(image.to(ids.device), IMAGE, USER)
        inputs = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in self._layout_inputs.items()}
        try:
            grids = self.adapter.image_grids(self.config, ids.cpu(), segments.cpu(), inputs)
        except ValueError as exc:
            raise ValueError(f"flowkern.prune(rank='grid') needs the image grid layout: {exc}") from None
        positions = [torch.nonzero(row).flatten() for row in image.cpu()]
        as_positions = [[torch.where(g.index >= 0, pos[g.index.clamp(min=0)], -1) if pos.numel() else g.index
                         for g in views] for views, pos in zip(grids, positions, strict=True)]
        return _grid_scores(as_positions, k.cpu(), image)

    def _make_layer_hook(self, idx: int) -> Any:
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            return self._layer_pre(idx, args, kwargs)

        return hook

    def _layer_pre(self, idx: int, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        from flowkern.hf import compat
        from flowkern.hf.attention import KEYMAP_ATTR

        attn = self._attn.get(idx)
        fwd = self._fwd
        if attn is None:
            return None
        if fwd is None:  # a layer called on its own: no pruning
            if hasattr(attn, KEYMAP_ATTR):
                delattr(attn, KEYMAP_ATTR)
            return None
        cache = compat.call_cache(kwargs)
        if cache is None:
            cache = fwd.cache
        elif fwd.cache is None:
            fwd.cache = cache  # created inside the language model (a plain forward with use_cache)
        pruning_now = fwd.prefill and self.layer is not None and self.when == "prefill" and idx >= self.layer
        if fwd.prefill and fwd.keep_real is not None and self.layer is not None and idx >= self.layer:
            pruning_now = True  # no-cache continuation (also for when="decode": the cache-free run has no cache)
        if pruning_now:
            if fwd.plan is None:
                fwd.plan = self._make_plan(fwd, cache)
            plan = fwd.plan
            if idx == self.layer and plan.compact:
                args, kwargs = self._compact_inputs(plan, fwd, args, kwargs)
            elif plan.compact:
                kwargs.update(plan.inputs)
            kwargs["attention_mask"] = _on(plan.mask(), args, kwargs)
            setattr(attn, KEYMAP_ATTR, plan.keymap)
            return args, kwargs
        group = _group_of(cache, idx) if cache is not None else None
        if group is None:
            if hasattr(attn, KEYMAP_ATTR):
                delattr(attn, KEYMAP_ATTR)
            return None
        kwargs["attention_mask"] = _on(group.mask(), args, kwargs)
        setattr(attn, KEYMAP_ATTR, group.keymap)
        return args, kwargs

    def _make_plan(self, fwd: _Forward, cache: Any) -> _Plan:
        keep_real = fwd.keep_real if fwd.keep_real is not None else self._decide(fwd)
        assert self.layer is not None
        if self.layer == 0:  # remove by masking: layer 0's cache must stay whole
            S = keep_real.shape[1]
            index = torch.arange(S, device=keep_real.device).expand_as(keep_real)
            keymap = torch.where(keep_real, index, -1)
            plan = _Plan(torch.ones_like(keep_real), index, keymap, False, bool((~keep_real).any()))
        else:
            keep_all, index, keymap = _equalise(keep_real)
            plan = _Plan(keep_all, index, keymap, True, bool((keymap < 0).any()))
        if fwd.keep_real is None:
            self.token_positions = plan.index
            self.keymap = plan.keymap
        if cache is not None:
            layers = frozenset(range(self.layer, self.num_layers))
            _KEYMAPS[cache] = [_Group(layers, plan.keymap, plan.hidden)]
        return plan

    def _compact_inputs(self, plan: _Plan, fwd: _Forward, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """At layer L: compact the hidden states and gather the per-token layer inputs (kept for layers > L)."""
        from flowkern import ops
        from flowkern.hf import compat

        hidden = args[0] if args else kwargs["hidden_states"]
        B, S = plan.keep_all.shape
        if hidden.shape[:2] != (B, S):
            raise RuntimeError(f"flowkern.prune: layer {self.layer} got hidden states {tuple(hidden.shape)}, "
                               f"expected [B={B}, S={S}, D]")
        keep_all = plan.keep_all.to(hidden.device)
        index = plan.index.to(hidden.device)
        in_place = not fwd.capture_hidden and not (torch.is_grad_enabled() and hidden.requires_grad)
        if in_place:
            with torch.no_grad():
                hidden, _ = ops.compact_(hidden, keep_all, 1)
        else:
            hidden = hidden.gather(1, index[:, :, None].expand(-1, -1, hidden.shape[-1]))
        gathered: dict[str, Any] = {}
        pe = kwargs.get("position_embeddings")
        if isinstance(pe, tuple | list) and all(isinstance(t, torch.Tensor) for t in pe):
            gathered["position_embeddings"] = tuple(_gather_tokens(t, index.to(t.device), -2) for t in pe)
        for name in compat.LAYER_POSITION_INPUTS:
            t = kwargs.get(name)
            if isinstance(t, torch.Tensor) and t.shape[-1] == S:
                gathered[name] = _gather_tokens(t, index.to(t.device), -1)
        for name, value in kwargs.items():
            per_token = isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[-1] == S and S > 1
            if per_token and not compat.is_known_layer_input(name):
                raise NotImplementedError(
                    f"flowkern.prune: decoder layer input `{name}` {tuple(value.shape)} looks per-token; pruning this "
                    "model is not supported"
                )
        plan.inputs = gathered
        kwargs.update(gathered)
        if args:
            args = (hidden, *args[1:])
        else:
            kwargs["hidden_states"] = hidden
        return args, kwargs


class ForwardTimer:
    """Wall time of each outermost forward call of a model: the prefill and every decode step (context manager).

    For timing an *unpruned* model with its own attention (a :class:`Pruning` records the same for pruned runs).
    A forward on an empty (or no) cache is a prefill and starts a new record; with ``generate(use_cache=False)``
    every step counts as a prefill.

    Attributes:
        prefill_seconds: the last prefill forward, vision tower included.
        decode_seconds: each forward on a non-empty cache since then.
        batch_size: B of the last forward.
    """

    def __init__(self, model: torch.nn.Module, *, sync: bool = True) -> None:
        self.model = model
        self.sync = bool(sync)
        self.prefill_seconds: float | None = None
        self.decode_seconds: list[float] = []
        self.batch_size = 0
        self._handles: list[Any] = []
        self._depth = 0
        self._open: tuple[bool, torch.device, float] | None = None

    @property
    def decode_tokens_per_second(self) -> float | None:
        """``B * steps / sum(decode_seconds)``, or None before any decode step."""
        total = sum(self.decode_seconds)
        return self.batch_size * len(self.decode_seconds) / total if total > 0 else None

    def __enter__(self) -> ForwardTimer:
        self._handles = [
            self.model.register_forward_pre_hook(self._pre, with_kwargs=True),
            self.model.register_forward_hook(self._post, always_call=True),
        ]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._depth = 0

    def _pre(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        self._depth += 1
        if self._depth > 1:
            return
        x = kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        if x is None and args and isinstance(args[0], torch.Tensor):
            x = args[0]
        from flowkern.hf import compat

        past = compat.cache_length(compat.call_cache(kwargs))
        device = x.device if isinstance(x, torch.Tensor) else torch.device("cpu")
        self.batch_size = int(x.shape[0]) if isinstance(x, torch.Tensor) else self.batch_size
        if self.sync:
            _sync(device)
        self._open = (past == 0, device, time.perf_counter())

    def _post(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        self._depth = max(0, self._depth - 1)
        if self._depth > 0 or self._open is None:
            return
        prefill, device, start = self._open
        self._open = None
        if self.sync:
            _sync(device)
        elapsed = time.perf_counter() - start
        if prefill:
            self.prefill_seconds = elapsed
            self.decode_seconds = []
        else:
            self.decode_seconds.append(elapsed)


def prune(
    model: torch.nn.Module,
    layer: int | None = None,
    *,
    keep: int | float = 0,
    rank: Rank = "attention",
    seed: int = 0,
    when: When = "prefill",
    timing: bool = True,
) -> Pruning:
    """Remove image tokens from decoder layer ``layer`` on (hidden states and KV cache), as a context manager.

    Args:
        model: a supported Hugging Face VLM (``flowkern.hf.models.supported_model_types()``).
        layer: first decoder layer without the removed tokens, 0-based (the paper's layer ``layer + 1``); negative
            counts from the end. None: prune nothing at prefill, only serve caches compacted by
            :func:`compact_cache_`.
        keep: image tokens kept per sample: 0 (drop all, the paper's k = 0), an int ``k`` (at most ``k``) or a float
            fraction in [0, 1] of the sample's image tokens (rounded half up).
        rank: which to keep: ``"attention"`` (received from the last prompt row at layer ``layer - 1``, head mean:
            eq. 9-12), ``"random"`` (seeded control), ``"none"`` (the first ``k``) or ``"grid"`` (spatially uniform
            downsampling on the image grid: the plain-downsampling control).
        seed: seed of ``rank="random"``.
        when: ``"prefill"``: layers ``>= layer`` never see the removed tokens (the paper's truncation; faster
            prefill and decode). ``"decode"``: the prefill sees everything (the first answer token is the unpruned
            model's), then the cache of layers ``>= layer`` is compacted (:func:`compact_cache_`) for the decode steps.
        timing: synchronise CUDA around each forward so that ``prefill_seconds`` / ``decode_seconds`` are exact.

    Returns:
        a :class:`Pruning`, to use as ``with flowkern.prune(model, layer=L) as p: model.generate(...)``; it keeps its
        record after the block.

    Raises:
        ValueError: bad arguments (``rank="attention"`` with ``layer=0`` and ``keep != 0``); the model family is not
            supported. NotImplementedError: DeepStack layers at or after ``layer`` (Qwen3-VL).
    """
    return Pruning(model, layer=layer, keep=keep, rank=rank, seed=seed, when=when, timing=timing)

