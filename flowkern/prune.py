"""``flowkern.prune``: remove image tokens from decoder layer L on (or before the decoder, or in stages), for real:
hidden states and KV cache.

.. code-block:: python

    with flowkern.prune(model, layer=2, keep=0) as p:           # the paper's truncation with k = 0
        out = model.generate(**inputs, max_new_tokens=32, do_sample=False)
    p.num_kept_image_tokens, p.prefill_seconds, p.decode_tokens_per_second

    flowkern.prune(model, layer=8, keep=64, rank="attention")         # FastV-style: keep the top 64
    flowkern.prune(model, layer=0, keep=0.25, rank="random")          # before the decoder: 1/4 of the image
    flowkern.prune(model, schedule=[(2, 0.5), (8, 0.25), (16, 0.125)])  # three stages (PyramidDrop-style)

**What it computes (paper §3.4, eq. 9-13).** ``layer=L`` is 0-based: decoder layers ``0 .. L-1`` see the whole
prompt; layers ``L ..`` compute on the prompt without the removed image tokens (the paper's 1-based "truncation at
layer l" is ``layer=l-1``; ``layer=0``: the language model never sees them). The kept set is every text token plus,
per sample, ``k`` of its image tokens (``keep``: 0 = drop all, an int = at most that many, a float in [0, 1] = that
fraction of the sample's image tokens, rounded half up), chosen by ``rank``:

- ``"attention"``: the eq. 10-12 ranking: the attention each image token receives from the last prompt row at layer
  ``L-1`` (softmax probability, mean over heads, eq. 9), via :func:`flowkern.key_attention_mass`: never an
  ``S x S`` matrix; ties go to the earlier token (needs ``L >= 1``);
- ``"random"``: a control; a random score per prompt position from ``torch.Generator().manual_seed(seed)``
  (identical rows get identical choices);
- ``"none"``: the first ``k`` image tokens in sequence order;
- ``"grid"``: a control, plain spatial downsampling: every ``s``-th row and column of each image grid of the model's
  layout, topped up to exactly ``k`` (:mod:`flowkern.scorers.controls`);
- any other registered scorer (``"text-attention"``, ``"prerope-attention"``, ``"grid+attention"``,
  ``"diversity"``, ``"duplicates"``, ``"cls"``: :func:`flowkern.scorers.scorer_names`) or a
  :class:`flowkern.scorers.Scorer` object: the ``k`` image tokens it scores highest (:mod:`flowkern.hf.scoring` gathers
  what it reads, per stage).

``merge=True`` averages, at each stage, every removed image token's hidden state into its most similar kept image
token (:func:`flowkern.merge.merge_into_kept`) before the stage's layer runs; at ``layer=0`` these are the projected
image features (VisionZip's contextual tokens, PruMerge).

A **schedule** ``[(L_1, keep_1), (L_2, keep_2), ...]`` (layers strictly increasing) runs one such stage per entry:
stage i ranks, at its layer, among the image tokens that survived stages ``< i`` and keeps ``keep_i`` of them (an
int = at most that many, a float = that fraction of the sample's *original* image tokens); layers
``L_i .. L_{i+1}-1`` compute on its survivors. ``Pruning._choose`` is where a stage decides (through its
:class:`flowkern.hf.scoring.StageScoring`).

Removed tokens are never keys of the later layers again (nor for decoded tokens). Kept tokens keep their RoPE /
M-RoPE positions (``cos``/``sin`` and ``position_ids`` are gathered; cached keys are never re-rotated), so the result
equals -- up to float rounding -- an attention-mask run in which those layers cannot see the removed keys (FastV's /
the paper's masking variant: ``tests/analysis/test_prune.py``, ``test_prune_schedule.py``). At ``layer=0`` the
language model's inputs are narrowed at its entry (embeddings, 2D mask, original position ids): equal to running it
on the embeddings with those rows deleted (``test_prune_predecoder.py``).

**How.** A :class:`Pruning` is a listener on the model's session (:mod:`flowkern.hf.session`) and a record. At a
prefill it asks for what each stage's scorer reads (:meth:`Pruning._request`) and for a *narrowing*
per stage (:meth:`flowkern.hf.calls.Call.narrow`); right before a stage's layer runs, the session hands the plan the
hidden states entering it and compacts what it keeps (:mod:`flowkern.hf.narrowing`). Each stage's layers fill
their KV cache with its tokens only, described by a *key map* (int64 ``[B, Sk]``: the original position in each
cache slot, -1 = hidden filler; one :class:`flowkern.keymaps.KeyMapGroup` per stage, stored with the cache, grown by
one column per decoded token), from which the session masks fillers and labels keys for :func:`flowkern.trace`.

**Batches** may mix image-token counts and left padding: shorter rows carry their earliest removed positions as
hidden *fillers* (key map -1) up to ``Lmax = max_b kept_b``; compaction is stable, so each row's last prompt token
(always kept, like every text token) stays last, where ``generate`` reads the logits.

**After a full prefill.** ``when="decode"`` (or :func:`compact_cache_` by hand, e.g. between chat turns) prefills
the whole prompt, then compacts the KV cache of layers ``>= L``: decode steps skip the removed keys.

Limits (errors say so): a :class:`transformers.DynamicCache` (or none) only; ``when="decode"`` takes one stage at a
layer >= 1 (transformers reads the cache length from layer 0); a cache pruned before the decoder serves decode steps
only (no second chat turn: ``generate`` would slice the new prompt by layer 0's length); Qwen3-VL's DeepStack needs
every stage past its DeepStack layers; chunked prefill and assisted decoding are not supported. Beam search works
(the beams of a sample hold identical key maps). Image tokens that arrive in a later forward on a non-empty cache
are kept. A plain forward inside the block returns outputs for the compacted sequence only: row ``i`` is the token
at original position :attr:`Pruning.token_positions` ``[:, i]``.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Literal

import torch

from flowkern import keymaps, plan
from flowkern.keymaps import StageRows
from flowkern.plan import PruneSpec
from flowkern.scorers import scorer_to_json
from flowkern.timer import ForwardTimer

if TYPE_CHECKING:
    from flowkern.hf.attention import RowEvent
    from flowkern.hf.calls import Call
    from flowkern.hf.scoring import StageScoring
    from flowkern.scorers import Scorer

__all__ = ["prune", "Pruning", "StageRows", "compact_cache_"]

Rank = Literal["attention", "random", "none", "grid"] | str
When = Literal["prefill", "decode"]


# ----------------------------------------------------------------------------------------------------------
# compacting a filled cache


def compact_cache_(
    cache: Any,
    kept: torch.Tensor,
    layers: Iterable[int],
    *,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Compact the KV cache of some layers in place so that they hold only the kept tokens.

    One :func:`flowkern.compact_` call moves the kept slots of every given layer's keys and values ``[B, H, S, D]``
    to the front; the layers' stored tensors become the narrowed views. Rows keep the same number of slots
    (shorter rows carry hidden fillers, see :mod:`flowkern.prune`). The cache's key maps
    (:func:`flowkern.keymaps.cache_keymaps`) record what each layer holds; decode on it inside
    ``flowkern.prune(model)`` (any ``layer``), which masks the fillers and tracks new tokens. Layers already
    compacted are compacted further (``kept`` is still indexed by original position).

    Args:
        cache: a ``transformers.DynamicCache`` filled by a forward / ``generate`` call.
        kept: bool ``[B, T]`` over original token positions (``T`` tokens seen), True = keep.
        layers: decoder layers to compact (>= 1: transformers reads the sequence length from layer 0's cache).
            They must currently hold the same tokens (all full, or compacted together before).
        attention_mask: optional ``[B, T]`` padding mask (0 = padding): padding is never kept.

    Returns:
        int64 ``[B, S']`` the new key map of those layers: original position held by each slot, -1 = hidden.

    Raises:
        ValueError: bad ``kept`` / ``layers``; NotImplementedError: not a plain DynamicCache.
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
    total = keymaps.original_length(cache) or compat.cache_length(cache)  # tokens seen, also if layer 0 was pruned
    if not isinstance(kept, torch.Tensor) or kept.dtype != torch.bool or kept.dim() != 2:
        raise ValueError(f"kept must be a bool tensor [B, T] (T = {total} cached tokens), got {kept!r:.80}")
    first = compat.layer_kv(cache, layers[0])
    if first is None:
        raise ValueError(f"layer {layers[0]} of the cache is empty: fill the cache (prefill) first")
    B = first[0].shape[0]
    if tuple(kept.shape) != (B, total):
        raise ValueError(f"kept must be [B={B}, T={total}] (original token positions), got {tuple(kept.shape)}")
    dev = first[0].device
    kept = kept.to(dev)
    if attention_mask is not None:
        if tuple(attention_mask.shape) != (B, total):
            raise ValueError(f"attention_mask must be [B={B}, T={total}], got {tuple(attention_mask.shape)}")
        kept = kept & attention_mask.to(dev).bool()
    groups = keymaps.cache_groups(cache)
    old, keymap = keymaps.held_keymap(groups, layers, B, total, dev)
    slots = keymap.shape[1]
    stored = [compat.layer_kv(cache, i) for i in layers]
    for i, kv in zip(layers, stored, strict=True):
        if kv is None or tuple(kv[0].shape[:1]) != (B,) or kv[0].shape[-2] != slots:
            have = None if kv is None else tuple(kv[0].shape)
            raise ValueError(f"layer {i}'s cache holds {have}, expected [B={B}, H, {slots}, D]")
    kept_slots, new_keymap = keymaps.compact_keymap(keymap, kept)
    tensors = [t for kv in stored for t in kv]
    with torch.no_grad():
        views, _ = ops.compact_(tensors, kept_slots, -2)
    for j, i in enumerate(layers):
        compat.set_layer_kv(cache, i, views[2 * j], views[2 * j + 1])
    keymaps.set_cache_groups(cache, keymaps.compacted_groups(groups, old, layers, new_keymap))
    return new_keymap


# ----------------------------------------------------------------------------------------------------------
# the listener

class _Forward:
    """What pruning remembers of the outermost forward in flight."""

    __slots__ = ("call", "prefill", "continuation")

    def __init__(self, call: Call) -> None:
        self.call = call
        self.prefill = call.prefill
        self.continuation = False  # a cache-free forward that repeats the prompt plus generated tokens


class Pruning(ForwardTimer):
    """Context manager that removes image tokens from decoder layer ``layer`` on (or at each stage of a schedule),
    and its record. Create it with :func:`prune`.

    Attributes:
        spec: the setting (:class:`flowkern.plan.PruneSpec`); ``stages`` its resolved stages ``((layer, keep), ...)``
            with layers in ``[0, num_layers)``; ``layer`` the first stage's layer, and ``keep``, ``rank``, ``seed``,
            ``when`` the spec's fields.

    Filled at each prefill:
        keep_mask: bool ``[B, S]``: prompt tokens kept after the last stage (text + kept image tokens; False for
            padding); ``stage_keep_masks``: the same after each stage.
        image_mask: bool ``[B, S]``: the image (placeholder) tokens of the prompt.
        scores: float32 ``[B, S]`` or None: the first stage's scores of each prompt token (``rank="attention"``: the
            attention it received from the last prompt row at layer ``layer - 1``, head mean); NaN at rows the stage
            did not see; None when it kept no image token.
        stage_inputs: one :class:`StageRows` per stage that ran: the rows it chose among.
        token_positions: long ``[B, Lmax]``: original position of each row of the compacted sequence after the last
            stage (fillers included); ``keymap`` is the same with -1 at hidden fillers.
        prefill_seconds, decode_seconds, batch_size: a :class:`flowkern.timer.ForwardTimer`'s record (the whole
            model; the steps of ``generate(use_cache=False)`` after the prompt count as decode steps).
    """

    owner = "flowkern.prune"
    exclusive = True
    attention = "flowkern"
    watches_calls = True
    tower_inputs = True  # rank="grid" needs the vision tower's grid_thw when generate pre-encodes the images

    def __init__(self, model: torch.nn.Module, spec: PruneSpec, *, timing: bool = True) -> None:
        from flowkern.hf import compat
        from flowkern.hf.models import get_adapter

        super().__init__(model, sync=timing)
        self.adapter = get_adapter(model)
        self.config = model.config
        self.text_config = self.adapter.text_config(model.config)
        self.num_layers = int(self.text_config.num_hidden_layers)
        shared = compat.kv_shared_layers(self.text_config)
        if shared:
            raise NotImplementedError(
                f"flowkern.prune does not support {self.adapter.family}: its layers {shared} reuse the keys / values "
                "of earlier layers (KV sharing), which a pruned layer range would narrow inconsistently, and its "
                "sliding-window layers count key slots, not token positions"
            )
        if spec.merge and spec.when == "decode":
            raise ValueError("merge: merging changes the hidden states entering a stage, which when='decode' has "
                             "already computed; use when='prefill'")
        self.spec = spec
        self.stages = spec.resolve_stages(self.num_layers, self.adapter.deepstack_layers(self.config),
                                          self.adapter.family)
        from flowkern.hf.scoring import StageScoring  # flowkern.hf (transformers) only once a model is pruned

        self.scorings: list[StageScoring] = [StageScoring(model, spec.rank, layer=layer, keep=keep, seed=spec.seed)
                                             for layer, keep in self.stages]
        self.layer = self.stages[0][0] if self.stages else None
        self.keep, self.rank, self.seed, self.when = spec.keep, spec.rank, spec.seed, spec.when
        self._fwd: _Forward | None = None
        self._prompt_ids: torch.Tensor | None = None
        self._real: torch.Tensor | None = None
        self._rows: tuple[torch.Tensor, torch.Tensor] | None = None  # (positions, keymap) of the current rows
        self._last_keep: torch.Tensor | None = None  # the last stage's decision over its rows
        # the record
        self.keep_mask: torch.Tensor | None = None
        self.stage_keep_masks: list[torch.Tensor] = []
        self.stage_inputs: list[StageRows] = []
        self.image_mask: torch.Tensor | None = None
        self.scores: torch.Tensor | None = None
        self.token_positions: torch.Tensor | None = None
        self.keymap: torch.Tensor | None = None

    # ------------------------------------------------------------------------------------------------------
    # results

    @property
    def num_image_tokens(self) -> torch.Tensor:
        """long ``[B]``: image tokens per sample in the prompt."""
        return self._need(self.image_mask).sum(dim=1).cpu()

    @property
    def num_kept_image_tokens(self) -> torch.Tensor:
        """long ``[B]``: image tokens kept per sample after the last stage (the last layers see only these)."""
        return (self._need(self.image_mask) & self._need(self.keep_mask)).sum(dim=1).cpu()

    @property
    def kept_image_positions(self) -> list[torch.Tensor]:
        """Per sample, long ``[k_b]``: prompt positions of the image tokens kept after the last stage, ascending."""
        kept = (self._need(self.image_mask) & self._need(self.keep_mask)).cpu()
        return [torch.nonzero(row).flatten() for row in kept]

    def _need(self, value: torch.Tensor | None) -> torch.Tensor:
        if value is None:
            raise RuntimeError("flowkern.prune recorded no prefill: run the model inside the `with` block")
        return value

    def to_dict(self) -> dict:
        """JSON-able summary: settings, per-sample image-token counts and kept positions (after the last stage), per
        stage its layer, keep and kept image-token counts, timing."""
        out: dict[str, Any] = dict(
            family=self.adapter.family, layer=self.layer, keep=self.keep, rank=scorer_to_json(self.rank),
            seed=self.seed, when=self.when, merge=self.spec.merge, num_layers=self.num_layers,
            prefill_seconds=self.prefill_seconds, decode_steps=len(self.decode_seconds),
            decode_tokens_per_second=self.decode_tokens_per_second,
        )
        image = self.image_mask
        out["stages"] = [
            dict(layer=layer, keep=keep, num_kept_image_tokens=None if image is None or i >= len(self.stage_keep_masks)
                 else (image & self.stage_keep_masks[i]).sum(dim=1).cpu().tolist())
            for i, (layer, keep) in enumerate(self.stages)
        ]
        if image is not None and self.keep_mask is not None:
            out.update(
                num_image_tokens=self.num_image_tokens.tolist(),
                num_kept_image_tokens=self.num_kept_image_tokens.tolist(),
                kept_image_positions=[p.tolist() for p in self.kept_image_positions],
                pruned_length=None if self.token_positions is None else int(self.token_positions.shape[1]),
                prompt_length=int(self.keep_mask.shape[1]),
            )
        return out

    def install(self, session: Any, handles: list[Any]) -> None:
        for scoring in self.scorings:
            scoring.install(handles)

    def detach(self) -> None:
        self._fwd = None
        self._release()
        super().detach()

    def _release(self) -> None:
        for scoring in self.scorings:
            scoring.release()

    # ------------------------------------------------------------------------------------------------------
    # listener callbacks

    def on_call(self, call: Call) -> None:
        call.check_dynamic_cache(self.owner, compacts=self.when == "decode")
        super().on_call(call)
        fwd = _Forward(call)
        self._fwd = fwd
        if not call.prefill or not self.stages:
            return  # a decode step: the session extends the cache's key maps and pushes them down
        continuation = (call.use_cache is False and call.cache is None
                        and plan.is_continuation(call.ids, self._prompt_ids))
        fwd.continuation = continuation
        if continuation:  # generate(use_cache=False): the whole sequence again; keep the prompt's decisions
            if self.when == "decode":
                raise NotImplementedError("flowkern.prune(when='decode') needs a KV cache (use_cache=True)")
            n_prompt = self._prompt_ids.shape[1]
            ids, mask = call.ids, call.mask
            new = mask[:, n_prompt:].bool() if mask is not None else torch.ones(
                ids.shape[0], ids.shape[1] - n_prompt, dtype=torch.bool, device=ids.device)
            real = torch.cat([self._need(self._real), new.to(ids.device)], dim=1)
            self._start_rows(real)
            for i, (layer, _) in enumerate(self.stages):
                keep = torch.cat([self.stage_keep_masks[i].to(ids.device), new.to(ids.device)], dim=1)
                call.narrow(layer, functools.partial(self._replay, keep))
            return
        self._start_prompt(call)
        self._request(call)
        if self.when == "prefill":
            for i, (layer, _) in enumerate(self.stages):
                call.narrow(layer, functools.partial(self._narrowing, i))

    def _request(self, call: Call) -> None:
        """Ask, per stage, for what its scorer reads (:meth:`flowkern.hf.scoring.StageScoring.request`: e.g. layer
        ``L-1``'s attention received for ``rank="attention"``)."""
        for scoring in self.scorings:
            scoring.request(call, self)

    def on_row(self, event: RowEvent) -> None:
        for scoring in self.scorings:
            scoring.on_row(event)

    def on_return(self, call: Call) -> None:
        fwd = self._fwd
        try:
            if fwd is None or call.seconds is None:  # the forward raised
                return
            prefill = fwd.prefill and not fwd.continuation
            self.record(call.seconds, prefill=prefill)
            if prefill and self.stages and self.when == "decode":
                keep_mask = self._stage_keep(0, None)
                cache = call.cache if call.cache is not None else call.output_cache
                if cache is not None:
                    self.keymap = compact_cache_(cache, keep_mask, range(self.layer, self.num_layers))
        finally:
            self._fwd = None
            if fwd is not None and fwd.prefill and not fwd.continuation:
                self._release()

    # ------------------------------------------------------------------------------------------------------
    # planning: which rows each stage keeps

    def _start_prompt(self, call: Call) -> None:
        ids, mask, n_new = call.ids, call.mask, call.length
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
        self.stage_keep_masks = []
        self.stage_inputs = []
        self.scores = None
        self.token_positions = None
        self.keymap = None
        self._start_rows(real)

    def _start_rows(self, real: torch.Tensor) -> None:
        B, S = real.shape
        positions = torch.arange(S, device=real.device).expand(B, S)
        self._rows = positions, torch.where(real, positions, -1)

    def _stage_rows(self, stage: int) -> StageRows:
        """The rows entering stage ``stage``: what survived the earlier ones."""
        positions, keymap = self._need_rows()
        real = keymap >= 0
        image = self._need(self.image_mask).to(positions.device).gather(1, positions) & real
        layer, keep = self.stages[stage]
        k = plan.num_to_keep(keep, self._need(self.image_mask).sum(dim=1)).to(positions.device)
        return StageRows(positions, image, real, torch.minimum(k, image.sum(dim=1)), layer)

    def _need_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._rows is None:
            raise RuntimeError("flowkern.prune: a stage ran before the prompt was seen")
        return self._rows

    def _narrowing(self, stage: int, hidden: torch.Tensor) -> keymaps.Narrowing:
        """Called by the session right before stage ``stage``'s first layer runs at the prefill: what it keeps."""
        self._stage_keep(stage, hidden)
        return self._narrow(self._need(self._last_keep), hidden)

    def _replay(self, keep: torch.Tensor, hidden: torch.Tensor) -> keymaps.Narrowing:
        """A cache-free continuation: the stage keeps what it kept at the prompt (``keep`` bool ``[B, S']`` over
        original positions, new tokens True)."""
        positions, keymap = self._need_rows()
        return self._narrow(keep.to(positions.device).gather(1, positions) & (keymap >= 0), hidden)

    def _narrow(self, keep: torch.Tensor, hidden: torch.Tensor) -> keymaps.Narrowing:
        """The narrowing that keeps the current rows ``keep`` (bool ``[B, S_cur]``) of ``hidden`` ``[B, S_cur, D]``
        (merged into the kept image rows with ``merge``); moves on to its rows."""
        update = None
        if self.spec.merge:
            from flowkern.merge import merge_into_kept

            positions, keymap = self._need_rows()
            image = self._need(self.image_mask).to(positions.device).gather(1, positions) & (keymap >= 0)
            with torch.no_grad():
                update = merge_into_kept(hidden, keep.to(hidden.device), image.to(hidden.device))
        narrowed = keymaps.narrowing(keep, update=update)
        positions, keymap = keymaps.compose(*self._need_rows(), narrowed)
        self._rows = positions, keymap
        if self._fwd is not None and not self._fwd.continuation:
            self.token_positions, self.keymap = positions, keymap
        return narrowed

    def _stage_keep(self, stage: int, hidden: torch.Tensor | None) -> torch.Tensor:
        """Decide stage ``stage`` over its rows; records it. Returns the prompt positions kept after it, bool
        ``[B, S]`` (the rows' decision is left in ``_last_keep``)."""
        rows = self._stage_rows(stage)
        self.stage_inputs.append(rows)
        keep = plan.prompt_keep(rows.image, rows.real, self._choose(stage, hidden, rows))
        self._last_keep = keep
        kept = torch.zeros_like(self._need(self._real), dtype=torch.bool)
        kept = kept.to(keep.device).scatter(1, rows.positions, keep)
        self.stage_keep_masks.append(kept)
        self.keep_mask = kept
        return kept

    def _choose(self, stage: int, hidden: torch.Tensor | None, rows: StageRows) -> torch.Tensor:
        """Which image rows stage ``stage`` keeps: bool ``[B, S_cur]`` over the rows entering it (``rows``), at most
        ``rows.k[b]`` True per row, only at ``rows.image``: the ones its scorer ranks highest
        (:meth:`flowkern.hf.scoring.StageScoring.choose`).

        ``hidden``: float ``[B, S_cur, D]`` the hidden states entering the stage's layer (the input embeddings at
        layer 0); None when deciding after a full prefill (``when="decode"``: the scorer's own capture).
        """
        scoring = self.scorings[stage]
        chosen = scoring.choose(hidden, rows.positions, rows.image, rows.real, rows.k)
        if stage == 0:
            scores = scoring.scores
            self.scores = None if scores is None else torch.full(
                tuple(self._need(self._real).shape), float("nan"), device=scores.device).scatter(
                    1, rows.positions.to(scores.device), scores)
        return chosen


def prune(
    model: torch.nn.Module,
    layer: int | PruneSpec | None = None,
    *,
    keep: int | float = 0,
    rank: Rank | Scorer = "attention",
    seed: int = 0,
    when: When = "prefill",
    schedule: Iterable[tuple[int, int | float]] | None = None,
    merge: bool = False,
    timing: bool = True,
    scorer: Rank | Scorer | None = None,
) -> Pruning:
    """Remove image tokens from decoder layer ``layer`` on (hidden states and KV cache), as a context manager.

    Args:
        model: a supported Hugging Face VLM (``flowkern.hf.models.supported_model_types()``).
        layer: first decoder layer without the removed tokens, 0-based (the paper's layer ``layer + 1``; 0 = before
            the decoder: the language model runs on the shorter sequence); negative counts from the end. None: prune
            nothing at prefill, only serve caches compacted by :func:`compact_cache_`. Or a whole setting, a
            :class:`flowkern.plan.PruneSpec` (then leave the other settings at their defaults).
        keep: image tokens kept per sample: 0 (drop all, the paper's k = 0), an int ``k`` (at most ``k``) or a float
            fraction in [0, 1] of the sample's image tokens (rounded half up).
        rank: which to keep: ``"attention"`` (received from the last prompt row at layer ``layer - 1``, head mean:
            eq. 9-12), ``"random"`` (seeded control), ``"none"`` (the first ``k``), ``"grid"`` (spatially uniform
            downsampling on the image grid: the plain-downsampling control), another registered scorer name
            (:func:`flowkern.scorers.scorer_names`: ``"text-attention"``, ``"prerope-attention"``,
            ``"grid+attention"``, ``"diversity"``, ``"duplicates"``, ``"cls"``, ...) or a
            :class:`flowkern.scorers.Scorer` object.
        seed: seed of ``rank="random"``.
        when: ``"prefill"``: layers ``>= layer`` never see the removed tokens (the paper's truncation; faster
            prefill and decode). ``"decode"``: the prefill sees everything (the first answer token is the unpruned
            model's), then the cache of layers ``>= layer`` is compacted (:func:`compact_cache_`) for the decode steps.
        schedule: instead of ``layer`` / ``keep``: stages ``[(layer, keep), ...]``, layers strictly increasing; each
            stage keeps, among the image tokens that survived the earlier ones, ``keep`` (an int = at most that many,
            a float = that fraction of the sample's image tokens in the prompt) ranked at its layer.
        merge: at each stage, average every removed image token's hidden state into its most similar kept image
            token (:func:`flowkern.merge.merge_into_kept`; ``when="prefill"`` only, ``keep != 0``).
        timing: synchronise CUDA around each forward so that ``prefill_seconds`` / ``decode_seconds`` are exact.
        scorer: another name for ``rank`` (give one of them).

    Returns:
        a :class:`Pruning`, to use as ``with flowkern.prune(model, layer=L) as p: model.generate(...)``; it keeps its
        record after the block.

    Raises:
        ValueError: bad arguments (``rank="attention"`` with ``layer=0`` and ``keep != 0``; ``when="decode"`` with
            ``layer=0``; a PruneSpec together with other settings); the model family is not supported.
        NotImplementedError: a schedule with ``when="decode"``; DeepStack layers at or after a pruned layer
            (Qwen3-VL); KV-shared layers (Gemma 4).
    """
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"model: expected a loaded Hugging Face VLM (a torch.nn.Module, e.g. from "
                         f"flowkern.hf.loading.load_model), got {type(model).__name__}")
    if scorer is not None:
        if not (isinstance(rank, str) and rank == "attention"):
            raise ValueError("scorer: another name for rank; give one of them, not both")
        rank = scorer
    if isinstance(layer, PruneSpec):
        if not isinstance(rank, str) or (keep, rank, seed, when, schedule, merge) != (
                0, "attention", 0, "prefill", None, False):
            raise ValueError("layer: pass either a PruneSpec or keep / rank / seed / when / schedule / merge, not both")
        spec = layer
    else:
        spec = PruneSpec(layer, keep, rank, seed, when, None if schedule is None else tuple(schedule), merge)
    return Pruning(model, spec, timing=timing)
