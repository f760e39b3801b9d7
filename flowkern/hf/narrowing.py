"""Narrowing a forward: the decoder layers of each pruning stage run on fewer rows (used by :mod:`flowkern.hf.session`).

A listener asks for stages with :meth:`flowkern.hf.calls.Call.narrow` (``from_layer``, a planner). Right before a
stage's first layer runs, the planner gets the hidden states entering it ``[B, S_cur, D]`` and returns a
:class:`flowkern.keymaps.Narrowing` over those rows; then

- a stage at a decoder layer ``L > 0`` compacts the hidden states in place (:func:`flowkern.compact_`) and gathers
  the per-token layer inputs (rotary ``cos`` / ``sin``, position ids) that transformers hands every layer
  (:func:`compact_layer_inputs`); later layers of the stage get the same gathered inputs;
- a stage at layer 0 (before the decoder) narrows the language model's *inputs* at its entry: the input embeddings,
  the 2D padding mask and the position ids (gathered original positions: M-RoPE ``[3 or 4, B, S]`` on the last dim),
  so the language model builds its masks, rotary embeddings and KV cache on the shorter sequence from the start.

The stages compose (:func:`flowkern.keymaps.compose`): each keeps original positions, and each stage's layers get
one :class:`flowkern.keymaps.KeyMapGroup` on the cache. A later forward on a cache whose layer 0 holds only some
tokens (a decode step) is translated at the entry by :func:`pruned_cache_entry`: the 2D mask becomes the slots'
mask and positions stay original.

What the language model does with its inputs (transformers 5.17-5.25, every supported family): a VLM calls it with
keywords (``inputs_embeds`` [B, S, D], the 2D ``attention_mask``, ``position_ids``, the cache); it builds its masks
from the 2D mask and the cache's length (layer 0's), and its rotary embeddings from ``position_ids``, which it makes
itself when none are passed (:func:`flowkern.hf.compat.default_position_ids`). ``generate`` passes ``position_ids``
at every step (from the 2D mask, extended by one per decoded token; Qwen2-VL / Qwen2.5-VL: ``[4, B, S]`` text +
M-RoPE positions with its ``rope_deltas``), so decode steps carry original positions. A 2D mask is always passed on:
without one, transformers would read position ids that skip values as packed sequences.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from flowkern import keymaps
from flowkern.hf import compat
from flowkern.keymaps import KeyMapGroup, gather_tokens

if TYPE_CHECKING:
    from flowkern.hf.calls import Call
    from flowkern.keymaps import Narrowing

__all__ = ["Narrowed", "pruned_cache_entry", "compact_layer_inputs"]


class Narrowed:
    """The stages of one forward in flight: their planners, what has been narrowed so far, the gathered layer inputs.

    Attributes:
        stages: ``[(first layer, planner)]``, layers strictly increasing.
        index, keymap: long ``[B, S_cur]`` original position of each current row (-1 in ``keymap`` at hidden rows),
            None before the first stage ran.
        groups: one :class:`flowkern.keymaps.KeyMapGroup` per stage that ran (its layers, its key map).
        cache: the cache the decoder layers received (it may be created inside the language model).
    """

    def __init__(self, stages: list[tuple[int, Callable[[torch.Tensor], Narrowing]]], num_layers: int,
                 push: Callable[[range, KeyMapGroup], None]) -> None:
        self.stages = list(stages)
        self.num_layers = num_layers
        self._push = push
        self.index: torch.Tensor | None = None
        self.keymap: torch.Tensor | None = None
        self.groups: list[KeyMapGroup] = []
        self.cache: Any = None
        self._rel: torch.Tensor | None = None  # current rows as rows of the layer inputs transformers passes
        self._inputs: dict[str, Any] = {}
        self._done = 0

    @property
    def first(self) -> int:
        """The first narrowed layer."""
        return self.stages[0][0]

    def _plan(self, hidden: torch.Tensor) -> Narrowing:
        """Run the next stage's planner on ``hidden`` [B, S_cur, D]; compose and push its key map."""
        layer, plan_fn = self.stages[self._done]
        plan = plan_fn(hidden)
        B, S = hidden.shape[:2]
        if tuple(plan.keep_all.shape) != (B, S):
            raise RuntimeError(f"flowkern.prune: the plan of layer {layer} keeps {tuple(plan.keep_all.shape)} rows, "
                               f"expected [B={B}, S={S}] (the rows entering that layer)")
        if plan.update is not None and tuple(plan.update.shape) != tuple(hidden.shape):
            raise RuntimeError(f"flowkern.prune: Narrowing.update {tuple(plan.update.shape)} must have the shape "
                               f"of the hidden states entering layer {layer}, {tuple(hidden.shape)}")
        self.index, self.keymap = keymaps.compose(self.index, self.keymap, plan)
        self._done += 1
        end = self.stages[self._done][0] if self._done < len(self.stages) else self.num_layers
        layers = range(layer, end)
        group = KeyMapGroup(frozenset(layers), self.keymap, bool((self.keymap < 0).any()))
        self.groups.append(group)
        self._push(layers, group)
        return plan

    def enter(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """At the language model's entry, a stage at layer 0: narrow its inputs (embeddings, 2D mask, positions)."""
        embeds, mask, positions = _entry_inputs(module, args, kwargs)
        if positions is None:  # what the language model would compute for a forward on an empty cache
            positions = compat.default_position_ids(0, embeds.shape[1], embeds.device)
        plan = self._plan(embeds)
        if plan.update is not None:
            embeds = plan.update
        index = plan.index.to(embeds.device)
        embeds = embeds.gather(1, index[:, :, None].expand(-1, -1, embeds.shape[-1]))
        new_mask = (plan.keymap >= 0).to(embeds.device)
        if mask is not None:
            new_mask = new_mask.to(mask.dtype)
        positions = gather_tokens(positions, index.to(positions.device), -1)
        return _set_entry_inputs(args, kwargs, embeds, new_mask, positions)

    def layer_pre(self, idx: int, linear: bool, args: tuple, kwargs: dict,
                  capture_hidden: bool) -> tuple[tuple, dict] | None:
        """A decoder layer's pre-hook: plan and compact at a stage's first layer, else reuse the gathered inputs."""
        cache = compat.call_cache(kwargs)
        if cache is not None:
            self.cache = cache
        if self._done < len(self.stages) and idx == self.stages[self._done][0]:
            if idx == 0:
                raise RuntimeError("flowkern.prune: the language model's entry was not called before decoder layer 0, "
                                   "so its inputs could not be narrowed")
            hidden = compat.layer_hidden_states(args, kwargs)
            plan = self._plan(hidden)
            rel = plan.index if self._rel is None else self._rel.gather(1, plan.index.to(self._rel.device))
            self._rel = rel
            args, kwargs, self._inputs = compact_layer_inputs(plan, rel, args, kwargs, idx, capture_hidden)
        elif self._inputs:
            kwargs.update(self._inputs)
        elif not linear:
            return None
        if linear:  # a recurrent state must never absorb a removed token or a filler
            kwargs["attention_mask"] = self.keymap.to(compat.layer_hidden_states(args, kwargs).device) >= 0
        return args, kwargs


def pruned_cache_entry(call: Call, args: tuple, kwargs: dict, module: torch.nn.Module) -> tuple[tuple, dict] | None:
    """At the language model's entry, a forward on a cache whose layer 0 holds only some tokens (pruned before the
    decoder): the 2D mask ``[B, past + n]`` over original positions becomes the mask of the cache's slots plus the new
    tokens (from the key map, already extended by this forward), and the new tokens keep their original positions
    (``past ..``, as the unpruned model numbers them, unless the call passes its own). None if nothing to do.

    Raises:
        NotImplementedError: more than one new token, or a mask that does not cover the tokens the cache has seen
            plus this forward's (``generate`` continuing a conversation on such a cache reads its length from layer
            0, so it would feed the wrong tokens).
    """
    group = next((g for g in keymaps.cache_groups(call.cache) if 0 in g.layers), None)
    if group is None:
        return None
    embeds, mask, positions = _entry_inputs(module, args, kwargs)
    n = embeds.shape[1]
    if n > 1 or (mask is not None and mask.shape[-1] != call.past + n):
        raise NotImplementedError(
            f"flowkern.prune: this cache was pruned before the decoder (layer 0 holds {compat.cache_length(call.cache)}"
            f" of {call.past} tokens); continuing such a cache with several new tokens (a new turn: generate on a "
            "filled cache) is not supported, since transformers reads the cache length from layer 0 to slice the "
            "prompt: decode steps only; prune at layer >= 1 for multi-turn use"
        )
    new_mask = (group.keymap >= 0).to(embeds.device)
    if mask is not None:
        new_mask = new_mask.to(mask.dtype)
    if positions is None:
        positions = compat.default_position_ids(call.past, n, embeds.device)
    return _set_entry_inputs(args, kwargs, embeds, new_mask, positions)


_ENTRY_ARGS = ("input_ids", "attention_mask", "position_ids")


def _entry_inputs(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor | None,
                                                                              torch.Tensor | None]:
    """``(inputs_embeds [B, S, D], attention_mask [B, past + S] or None, position_ids or None)`` the language model's
    forward received (``input_ids`` are embedded with its input embeddings).

    Raises:
        NotImplementedError: a 4D or per-layer-type (dict) mask, or more positional arguments than expected.
    """
    if len(args) > len(_ENTRY_ARGS):
        raise NotImplementedError("flowkern.prune(layer=0): the language model was called with more positional "
                                  "arguments than input_ids, attention_mask, position_ids")
    given = {**dict(zip(_ENTRY_ARGS, args, strict=False)), **kwargs}
    embeds = given.get("inputs_embeds")
    if embeds is None:
        if given.get("input_ids") is None:
            raise ValueError("flowkern.prune: the language model got neither input_ids nor inputs_embeds")
        embeds = module.get_input_embeddings()(given["input_ids"])
    mask = given.get("attention_mask")
    if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dim() != 2):
        raise NotImplementedError(
            "flowkern.prune(layer=0): this model hands its language model precomputed attention masks (per layer type "
            "or 4D, e.g. PaliGemma's bidirectional prefix) instead of the 2D padding mask, and those are not narrowed "
            "before the decoder: prune at layer >= 1"
        )
    return embeds, mask, given.get("position_ids")


def _set_entry_inputs(args: tuple, kwargs: dict, embeds: torch.Tensor, mask: torch.Tensor,
                      positions: torch.Tensor) -> tuple[tuple, dict]:
    """The language model's forward arguments with narrowed inputs: ``inputs_embeds`` ``[B, L, D]``, the 2D mask of
    the cache slots and new rows, ``position_ids`` (original positions, any ``[..., B, L]``)."""
    kwargs = {**dict(zip(_ENTRY_ARGS, args, strict=False)), **kwargs}
    kwargs.update(input_ids=None, inputs_embeds=embeds, attention_mask=mask, position_ids=positions)
    return (), kwargs


def compact_layer_inputs(
    plan: Narrowing, rel: torch.Tensor, args: tuple, kwargs: dict, layer: int, capture_hidden: bool
) -> tuple[tuple, dict, dict[str, Any]]:
    """At a stage's first decoder layer: compact its hidden states ``[B, S_cur, D]`` to ``plan.index`` and gather the
    per-token layer inputs (rotary ``position_embeddings``, :data:`flowkern.hf.compat.LAYER_POSITION_INPUTS`).

    Args:
        plan: the stage's narrowing over the ``S_cur`` rows entering ``layer``.
        rel: long ``[B, L]``: each narrowed row as a row of the per-token inputs transformers passes the layers
            (``S_base`` long: the sequence the language model runs on).
        args, kwargs: the layer's arguments; layer: its index (for messages).
        capture_hidden: every layer's hidden states are returned, so they are gathered into a new tensor instead of
            compacted in place (also when autograd needs them).

    Returns:
        ``(args, kwargs, gathered)``: the layer's new arguments and the gathered inputs, which later layers reuse.

    Raises:
        RuntimeError: hidden states of another shape than the plan's ``[B, S_cur]``.
        NotImplementedError: a per-token layer input flowkern does not know how to gather.
    """
    from flowkern import ops

    hidden = compat.layer_hidden_states(args, kwargs)
    B, S = plan.keep_all.shape
    if hidden.shape[:2] != (B, S):
        raise RuntimeError(f"flowkern.prune: layer {layer} got hidden states {tuple(hidden.shape)}, "
                           f"expected [B={B}, S={S}, D]")
    if plan.update is not None:
        hidden = plan.update.to(hidden.device, hidden.dtype)
    keep_all = plan.keep_all.to(hidden.device)
    index = plan.index.to(hidden.device)
    if not capture_hidden and not (torch.is_grad_enabled() and hidden.requires_grad):
        with torch.no_grad():
            hidden, _ = ops.compact_(hidden, keep_all, 1)
    else:
        hidden = hidden.gather(1, index[:, :, None].expand(-1, -1, hidden.shape[-1]))
    gathered: dict[str, Any] = {}
    base = None
    pe = kwargs.get("position_embeddings")
    if isinstance(pe, tuple | list) and all(isinstance(t, torch.Tensor) for t in pe):
        base = pe[0].shape[-2]
        gathered["position_embeddings"] = tuple(gather_tokens(t, rel.to(t.device), -2) for t in pe)
    for name in compat.LAYER_POSITION_INPUTS:
        t = kwargs.get(name)
        if isinstance(t, torch.Tensor) and t.dim() >= 1:
            base = t.shape[-1] if base is None else base
            if t.shape[-1] == base:
                gathered[name] = gather_tokens(t, rel.to(t.device), -1)
    base = S if base is None else base
    for name, value in kwargs.items():
        per_token = isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[-1] == base and base > 1
        if per_token and not compat.is_known_layer_input(name):
            raise NotImplementedError(
                f"flowkern.prune: decoder layer input `{name}` {tuple(value.shape)} looks per-token; pruning this "
                "model is not supported"
            )
    kwargs.update(gathered)
    if args:
        args = (hidden, *args[1:])
    else:
        kwargs["hidden_states"] = hidden
    return args, kwargs, gathered
