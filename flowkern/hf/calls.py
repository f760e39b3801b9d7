"""Watching a VLM's forward calls: which tokens each outermost call feeds, normalised (used by the session).

A VLM's forward calls its language model's forward, and some ``generate`` implementations (InstructBLIP) embed
the prompt themselves and call the language model with ``inputs_embeds`` only. :class:`ForwardWatcher` hooks the
model, its language model and the input embeddings, and reports each *outermost* call once, with the prompt's
token ids recovered from the embedding layer when the call itself carries only embeddings.

:class:`Call` is what every listener of :mod:`flowkern.hf.session` receives: the call's tokens and its inputs
read once through :mod:`flowkern.hf.compat` (the cache, how many tokens it already holds, the 2D padding mask,
whether hidden states are captured, the inputs an image layout needs), plus what the listeners ask the session to
do during this forward (:meth:`Call.observe`, :meth:`Call.narrow`) and its wall time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from flowkern import keymaps
from flowkern.hf import compat

if TYPE_CHECKING:
    from flowkern.keymaps import Narrowing

__all__ = ["ForwardCall", "ForwardWatcher", "Call", "Observe"]


class ForwardCall:
    """The raw inputs of one outermost forward call: ``ids`` (int ``[B, S_new]`` or None when only embeddings
    are known), ``embeds`` (float ``[B, S_new, hidden]`` or None) and the keyword arguments."""

    __slots__ = ("ids", "embeds", "kwargs")

    def __init__(self, ids: torch.Tensor | None, embeds: torch.Tensor | None, kwargs: dict) -> None:
        self.ids, self.embeds, self.kwargs = ids, embeds, kwargs


class ForwardWatcher:
    """Calls ``on_call(ForwardCall)`` before, and ``on_return(output)`` after, each outermost forward of a model
    (``output`` is None when the forward raised).

    Raises (from the hook): ValueError when a call carries neither ``input_ids`` nor ``inputs_embeds``.
    """

    def __init__(self, owner: str, on_call: Callable[[ForwardCall], None], on_return: Callable[[Any], None]) -> None:
        self.owner = owner
        self.on_call = on_call
        self.on_return = on_return
        self._handles: list[Any] = []
        self._depth = 0
        self._last_ids: torch.Tensor | None = None

    def install(self, modules: list[torch.nn.Module], embeddings: torch.nn.Module | None) -> None:
        """Hook ``modules`` (the model and its language model's entry) and the input embedding layer."""
        for m in dict.fromkeys(modules):
            self._handles.append(m.register_forward_pre_hook(self._pre_forward, with_kwargs=True))
            self._handles.append(m.register_forward_hook(self._post_forward, always_call=True))
        if embeddings is not None:
            self._handles.append(embeddings.register_forward_pre_hook(self._pre_embed))

    def remove(self) -> None:
        """Remove every hook and forget any call in flight."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._depth = 0
        self._last_ids = None

    def _pre_embed(self, module: torch.nn.Module, args: tuple) -> None:
        if args and isinstance(args[0], torch.Tensor) and args[0].dim() == 2 and not args[0].is_floating_point():
            self._last_ids = args[0]

    def _pre_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        self._depth += 1
        if self._depth > 1:  # a nested call (the language model inside the VLM): reported by the outer one
            return
        ids = kwargs.get("input_ids")
        if ids is None and args and isinstance(args[0], torch.Tensor) and not args[0].is_floating_point():
            ids = args[0]
        embeds = kwargs.get("inputs_embeds")
        last_ids, self._last_ids = self._last_ids, None
        if ids is None and embeds is not None and last_ids is not None and last_ids.shape == embeds.shape[:2]:
            ids = last_ids  # e.g. InstructBLIP.generate embeds the prompt itself, then calls the LM with embeddings
        if ids is None and embeds is None:
            raise ValueError(f"{self.owner}: the forward got neither input_ids nor inputs_embeds")
        self.on_call(ForwardCall(ids, embeds, kwargs))

    def _post_forward(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        self._depth = max(0, self._depth - 1)
        if self._depth > 0:
            return
        self._last_ids = None
        self.on_return(output)


class Observe(NamedTuple):
    """What one listener asked a layer's row event to carry (:meth:`Call.observe`)."""

    key_mass: bool = False
    per_head: bool = False
    rows: bool = False
    key_rows: torch.Tensor | None = None


class Call:
    """One outermost forward call as the session's listeners see it.

    Attributes:
        ids: int ``[B, S_new]`` token ids of the call, or None when only embeddings are known.
        batch, length, device: ``B``, ``S_new`` and the tokens' device.
        cache: the KV cache the call received (None: none, or one the language model creates itself).
        past: tokens that cache has seen (0 for none; more than its layer 0 holds when that layer was pruned
            before the decoder); ``prefill`` is ``past == 0``.
        mask: the 2D padding mask ``[B, past + S_new]`` (1/True = real token) or None.
        use_cache: the call's ``use_cache`` argument (None when not given).
        capture_hidden: whether the call returns every layer's hidden states (``output_hidden_states``).
        labels: long ``[B, past + S_new]`` segment label of every token seen so far (-1 = padding), set by the
            listener that labels tokens (:func:`flowkern.trace`, :func:`flowkern.knockout`), with ``num_segments``;
            None otherwise.
        cuts: ``{layer: bool [num_segments + 1, num_segments + 1]}`` segment tables of the layers whose edges are
            cut in this forward (:meth:`block`), or None; ``last``: long ``[B]``, the position of each row's last
            prompt token, which the session gives its own segment id ``num_segments`` in this forward's key ids.
        seconds: wall time of the forward (set before ``on_return``; None if it raised).
        output_cache: the cache the forward returned (set before ``on_return``), else None.
    """

    def __init__(self, raw: ForwardCall, config: Any, layout_names: tuple[str, ...], owner: str) -> None:
        self.ids, self.kwargs = raw.ids, raw.kwargs
        tokens = raw.ids if raw.ids is not None else raw.embeds
        self.batch, self.length, self.device = int(tokens.shape[0]), int(tokens.shape[1]), tokens.device
        kwargs = raw.kwargs
        self.cache = compat.call_cache(kwargs)
        self.past = compat.cache_length(self.cache)
        if self.past:  # a cache pruned before the decoder: its layer 0 holds fewer slots than tokens seen
            self.past = keymaps.original_length(self.cache) or self.past
        self.prefill = self.past == 0
        self.mask = compat.padding_mask_2d(kwargs.get("attention_mask"), owner)
        self.use_cache = kwargs.get("use_cache")
        self.capture_hidden = bool(kwargs.get("output_hidden_states", getattr(config, "output_hidden_states", False)))
        self.labels: torch.Tensor | None = None
        self.num_segments = 1
        self.seconds: float | None = None
        self.output_cache: Any = None
        self._layout_names = layout_names
        self._layout: dict[str, Any] | None = None
        self.tower_grids: list[torch.Tensor] = []
        # requests for this forward (read by the session)
        self.observers: dict[int, list[tuple[Any, Observe]]] = {}
        self.narrowings: list[tuple[int, Callable[[torch.Tensor], Narrowing]]] = []
        self.cuts: dict[int, torch.Tensor] | None = None
        self.last: torch.Tensor | None = None
        # the session's bookkeeping
        self.entered: list[Any] = []  # listeners whose on_call ran (they get on_return)
        self.start: float | None = None
        self.narrowed: Any = None

    @property
    def layout_inputs(self) -> dict[str, Any]:
        """The forward inputs the model's image layout needs (``image_sizes``, ``image_grid_thw``, ...; CPU
        copies), the per-image token counts of images encoded before the forward, and ``tower_grid_thw``: the
        ``grid_thw`` of each vision-tower call during this forward (filled while it runs)."""
        if self._layout is None:
            out = {k: _to_cpu(v) for k in self._layout_names if (v := self.kwargs.get(k)) is not None}
            out.update(compat.encoder_token_counts(self.kwargs))
            self._layout = out
        out = dict(self._layout)
        if self.tower_grids:
            out["tower_grid_thw"] = list(self.tower_grids)
        return out

    def check_dynamic_cache(self, owner: str, compacts: bool = True) -> None:
        """Raise ``NotImplementedError`` (naming ``owner``) unless the call's cache is None or a plain
        ``DynamicCache`` (with linear-attention layers too when ``compacts`` is False: nothing will be taken out of
        a filled cache)."""
        compat.check_dynamic_cache(self.cache, owner, compacts)

    def observe(self, listener: Any, layers: range | list[int], *, key_mass: bool = False, per_head: bool = False,
                rows: bool = False, key_rows: torch.Tensor | None = None) -> None:
        """Ask for a row event (:class:`flowkern.hf.attention.RowEvent`) of each of ``layers`` in this forward,
        delivered to ``listener.on_row``; ``key_mass``: with the attention each key receives from the last row;
        ``per_head``: with the row's mass per head; ``rows``: with the mass of every query row of the call;
        ``key_rows``: bool ``[B, past + S_new]`` over token positions, with the attention each key receives on
        average from those query rows (``chosen_key_mass``).

        Raises:
            RuntimeError: another listener chose other ``key_rows`` at one of these layers (one choice per layer).
        """
        if key_rows is not None:
            if key_rows.dtype != torch.bool or key_rows.dim() != 2 or key_rows.shape[0] != self.batch:
                raise ValueError(f"key_rows must be a bool tensor [B={self.batch}, T], got {key_rows!r:.60}")
            for layer in layers:
                for _, other in self.observers.get(int(layer), ()):
                    if other.key_rows is not None and other.key_rows is not key_rows and not (
                            other.key_rows.shape == key_rows.shape and torch.equal(other.key_rows, key_rows)):
                        raise RuntimeError(f"layer {layer}: two listeners chose different query rows (key_rows)")
        wants = Observe(bool(key_mass), bool(per_head), bool(rows), key_rows)
        for layer in layers:
            self.observers.setdefault(int(layer), []).append((listener, wants))

    def block(self, cuts: dict[int, torch.Tensor], last: torch.Tensor) -> None:
        """Cut segment -> segment edges in this forward: ``cuts[layer]`` is the ``allowed`` table (bool ``[n + 1,
        n + 1]``, ``n = num_segments``; row = query segment, column = key segment) of ``layer``, where segment ``n``
        is the last prompt token, at position ``last[b]`` (long ``[B]``) of row ``b``. Needs :attr:`labels`.
        One set of cuts per forward."""
        if self.cuts is not None:
            raise RuntimeError("only one flowkern.knockout can cut a forward's edges")
        self.cuts, self.last = cuts, last

    def narrow(self, from_layer: int, plan: Callable[[torch.Tensor], Narrowing]) -> None:
        """From decoder layer ``from_layer`` on (0: before the first decoder layer), run this forward on the rows of
        the :class:`flowkern.keymaps.Narrowing` that ``plan(hidden)`` returns. ``plan`` is called right before that
        layer runs (so it may use the row event of an earlier layer) with the hidden states entering it, float
        ``[B, S_cur, D]`` (the rows that survived earlier stages; at layer 0 the input embeddings); its keep mask is
        over those rows. One call per stage, layers strictly increasing (one listener narrows a forward)."""
        if self.narrowings and int(from_layer) <= self.narrowings[-1][0]:
            raise RuntimeError(f"Call.narrow: stages must come in strictly increasing layer order, got {from_layer} "
                               f"after {self.narrowings[-1][0]} (only one flowkern.prune can narrow a forward)")
        self.narrowings.append((int(from_layer), plan))


def _to_cpu(value: Any) -> Any:
    return value.detach().cpu().clone() if isinstance(value, torch.Tensor) else value
