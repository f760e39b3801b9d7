"""One session between a model and every analysis that runs on it (trace, prune, cam, timers).

.. code-block:: python

    with flowkern.prune(model, layer=2) as p, flowkern.trace(model) as flow:   # two listeners, one session
        model.generate(**inputs)

An analysis is a small :class:`Listener`: its configuration, a record of results, and a few callbacks. It attaches
to the model's one :class:`Session` (:meth:`Session.of`) on enter and detaches on exit; the session owns everything
that touches the model, and undoes all of it when the last listener leaves (also on error):

- **attention**: the language model (only) switches to the ``"flowkern"`` attention when a listener needs its
  masses, or to a differentiable implementation (``sdpa``, or ``eager`` if it already was) for LLaVA-CAM; the
  previous implementation comes back afterwards;
- **structure**, found once per session through the family's adapter (:mod:`flowkern.hf.models`): the language
  model and where the forward enters it, its decoder layers and their attention modules, the vision tower (each a
  walk over the model's modules: a caller that attaches many short-lived listeners one after another, like a
  sweep's pruning per point, keeps the session and what it found by holding one listener across them with
  :func:`flowkern.listener.attached`; a model edited in between is seen afresh by the next session);
- **forward calls**: :class:`flowkern.hf.calls.ForwardWatcher` reports each outermost forward once, normalised into a
  :class:`flowkern.hf.calls.Call` through :mod:`flowkern.hf.compat` (cache, past length, 2D padding mask, the inputs
  an image layout needs, ``grid_thw`` of the vision tower's calls); the call's wall time is measured here, once,
  for every listener;
- **key maps**: a cache whose layers hold only some tokens (after :func:`flowkern.prune`) carries
  :class:`flowkern.keymaps.KeyMapGroup` s (:func:`flowkern.keymaps.cache_groups`); every forward on it extends
  them by its new tokens;
- **layer state, pushed down**: before the forward runs, each attention module gets its
  :class:`flowkern.hf.attention.LayerState` -- key segment ids (from the labelling listener, gathered through the
  layer's key map), key map, key padding, and whether a listener asked for this layer's row event; the attention
  function reads it and emits one :class:`flowkern.hf.attention.RowEvent`, which the session hands to the listeners
  that asked. A forward nobody listens to leaves every state empty, and attention takes its fastest path;
- **cut edges** (:func:`flowkern.knockout`, :meth:`flowkern.hf.calls.Call.block`): the layers' ``allowed`` tables
  go down with the key ids, in which the last prompt token has its own segment id (one past the labels'); the
  row events' masses are folded back into the labels before any listener sees them;
- **narrowing**: a listener may ask that the layers of one or more stages (``>= L``) of this forward run on fewer
  rows (:meth:`flowkern.hf.calls.Call.narrow`); the session then hooks those decoder layers for this forward only
  (:class:`flowkern.hf.narrowing.Narrowed`: compaction of the hidden states and per-token layer inputs at each
  stage, of the language model's inputs at its entry for a stage at layer 0), pushes the narrowed layers' key maps,
  and records one key-map group per stage on the cache when the forward returns. A forward on a cache whose layer
  0 holds only some tokens gets its 2D mask and positions translated at the entry;
- **parameters and hooks** a listener needs for the duration (LLaVA-CAM freezes the parameters and hooks layer
  sites): installed on attach, removed on detach.

Several listeners on one model (trace inside prune, a timer around both) share one forward hook, one layer state
and one row event per layer; attach and detach in any order. At most one listener of an ``exclusive`` kind (one
trace, one prune) per model. Where a new analysis goes: a :class:`Listener` subclass next to :mod:`flowkern.trace`;
a new model family: an entry in :mod:`flowkern.hf.models`.
"""

from __future__ import annotations

import functools
import time
import weakref
from typing import TYPE_CHECKING, Any

import torch

from flowkern.hf import compat
from flowkern.hf.attention import (
    ATTENTION_NAME,
    STATE_ATTR,
    LayerState,
    RowEvent,
    language_attention_modules,
    restore_attention,
    switch_attention,
)
from flowkern.hf.calls import Call, ForwardWatcher
from flowkern.hf.models import get_adapter
from flowkern.hf.narrowing import Narrowed, pruned_cache_entry
from flowkern.keymaps import KeyMapGroup, cache_groups, set_cache_groups, track_forward

if TYPE_CHECKING:
    from flowkern.listener import Listener

__all__ = ["Session", "Call", "RowEvent"]

DIFFERENTIABLE = ("eager", "sdpa")
"""Attention implementations autograd can go through (what ``attention="differentiable"`` keeps or picks)."""


# ----------------------------------------------------------------------------------------------------------
# the session


_SESSIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> Session
_UNSET = object()


class Session:
    """The one session of a model: see the module docstring. Get it with :meth:`Session.of`.

    Attributes:
        model, adapter, config, text_config: the model, its family adapter and configs.
        num_layers: decoder layers of the language model.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.adapter = get_adapter(model)
        self.config = model.config
        self.text_config = self.adapter.text_config(model.config)
        self.num_layers = int(self.text_config.num_hidden_layers)
        self._listeners: list[Listener] = []
        self._handles: dict[int, list[Any]] = {}
        self._watcher: ForwardWatcher | None = None
        self._states: dict[int, LayerState] = {}
        self._devices: dict[int, torch.device] = {}
        self._orig_attention: Any = _UNSET
        self._frozen: list[tuple[torch.nn.Parameter, bool]] | None = None
        self._tower_handle: Any = None
        self._pending_tower: list[torch.Tensor] = []
        self._call: Call | None = None
        self._forward_handles: list[Any] = []
        self._entry_handle: Any = None
        self._linear_handles: list[Any] = []
        self._dirty = False

    @classmethod
    def of(cls, model: torch.nn.Module) -> Session:
        """The session of ``model`` (created on first use; forgotten when its last listener detaches).

        Raises:
            ValueError: the model family is not supported (the message lists the supported ones).
        """
        session = _SESSIONS.get(model)
        if session is None:
            session = cls(model)
            _SESSIONS[model] = session
        return session

    # ------------------------------------------------------------------------------------------------------
    # structure, found through the adapter

    @functools.cached_property
    def layers(self) -> list[torch.nn.Module]:
        """The decoder layers of the language model (index = layer)."""
        return self.adapter.decoder_layers(self.model)

    @functools.cached_property
    def attention_modules(self) -> dict[int, torch.nn.Module]:
        """``{layer: attention module}`` of the language model.

        Raises:
            ValueError: none found.
        """
        found = {int(m.layer_idx): m for m in language_attention_modules(self.model, self.text_config)}
        if not found:
            raise ValueError(f"{self.adapter.family}: found no attention module of the language model")
        return found

    @functools.cached_property
    def linear_layers(self) -> frozenset[int]:
        """Decoder layers with linear attention (no softmax to measure: their row events are NaN)."""
        return self.adapter.linear_layers(self.config)

    @functools.cached_property
    def language_model_entry(self) -> torch.nn.Module | None:
        """The module the model's forward enters the language model through (the adapter's
        ``language_model_entry``), or None."""
        return self.adapter.language_model_entry(self.model)

    @functools.cached_property
    def vision_tower(self) -> torch.nn.Module | None:
        """The vision tower (the module owning the vision config), or None."""
        return self.adapter.vision_tower(self.model)

    @property
    def listeners(self) -> tuple[Listener, ...]:
        """The attached listeners, in attach order."""
        return tuple(self._listeners)

    # ------------------------------------------------------------------------------------------------------
    # attach / detach

    def add(self, listener: Listener) -> None:
        """Attach ``listener``: install what it needs (attention, hooks, frozen parameters).

        Raises:
            RuntimeError: it is already attached, another listener of an ``exclusive`` kind is, or the model refused
                the attention implementation (nothing is left changed).
        """
        if any(x is listener for x in self._listeners):
            raise RuntimeError(f"this {listener.owner} is already active")
        if listener.exclusive and any(type(x) is type(listener) for x in self._listeners):
            raise RuntimeError(f"this model is already inside a {listener.owner}")
        self._listeners.append(listener)
        handles: list[Any] = []
        self._handles[id(listener)] = handles
        try:
            self._sync()
            listener.install(self, handles)
        except BaseException:
            self.remove(listener)
            raise

    def remove(self, listener: Listener) -> None:
        """Detach ``listener`` (no-op if it is not attached); when it was the last one, the model is restored."""
        if not any(x is listener for x in self._listeners):
            return
        self._listeners = [x for x in self._listeners if x is not listener]
        for h in self._handles.pop(id(listener), []):
            h.remove()
        try:
            self._sync()
        finally:
            if not self._listeners and _SESSIONS.get(self.model) is self:
                del _SESSIONS[self.model]

    def _sync(self) -> None:
        """Install or remove each part so that it matches what the attached listeners need."""
        need_calls = any(x.watches_calls for x in self._listeners)
        need_states = need_calls and any(x.attention == ATTENTION_NAME for x in self._listeners)
        need_tower = need_calls and any(x.tower_inputs for x in self._listeners)
        need_frozen = any(x.freezes_parameters for x in self._listeners)
        errors: list[BaseException] = []
        for step in (
            lambda: self._set_watcher(need_calls),
            lambda: self._set_states(need_states),
            lambda: self._set_tower(need_tower and self.adapter.tower_grid_kwarg is not None),
            lambda: self._set_frozen(need_frozen),
            self._set_attention,
        ):
            try:
                step()
            except BaseException as exc:  # keep restoring the other parts, then raise the first error
                errors.append(exc)
        if errors:
            raise errors[0]

    def _set_watcher(self, on: bool) -> None:
        if on and self._watcher is None:
            owner = next(x.owner for x in self._listeners if x.watches_calls)
            watcher = ForwardWatcher(owner, self._on_call, self._on_return)
            entry = self.language_model_entry
            modules = [self.model] + ([entry] if entry is not None else [])
            embeddings = self.model.get_input_embeddings() if hasattr(self.model, "get_input_embeddings") else None
            self._watcher = watcher
            watcher.install(modules, embeddings)
            if entry is not None:  # after the watcher's: an outermost call to the entry is reported first
                self._entry_handle = entry.register_forward_pre_hook(self._pre_entry, with_kwargs=True)
        elif not on and self._watcher is not None:
            self._watcher.remove()
            self._watcher = None
            if self._entry_handle is not None:
                self._entry_handle.remove()
                self._entry_handle = None
            self._end_forward()
            self._call = None
            self._pending_tower = []

    def _set_states(self, on: bool) -> None:
        if on and not self._states:
            for layer, m in self.attention_modules.items():
                state = LayerState(layer, sink=self._dispatch)
                setattr(m, STATE_ATTR, state)
                self._states[layer] = state
                param = next(m.parameters(), None)
                self._devices[layer] = param.device if param is not None else torch.device("cpu")
            for layer in sorted(self.linear_layers):
                hook = functools.partial(self._not_measured, layer)
                self._linear_handles.append(self.layers[layer].register_forward_hook(hook))
            self._dirty = False
        elif not on and self._states:
            for m in self.attention_modules.values():
                if STATE_ATTR in vars(m):
                    delattr(m, STATE_ATTR)
            self._states.clear()
            self._devices.clear()
            for h in self._linear_handles:
                h.remove()
            self._linear_handles.clear()

    def _set_tower(self, on: bool) -> None:
        if on and self._tower_handle is None and self.vision_tower is not None:
            self._tower_handle = self.vision_tower.register_forward_pre_hook(self._pre_tower, with_kwargs=True)
        elif not on and self._tower_handle is not None:
            self._tower_handle.remove()
            self._tower_handle = None

    def _set_frozen(self, on: bool) -> None:
        if on and self._frozen is None:
            self._frozen = [(p, p.requires_grad) for p in self.model.parameters()]
            for p, _ in self._frozen:
                p.requires_grad_(False)
        elif not on and self._frozen is not None:
            frozen, self._frozen = self._frozen, None
            for p, flag in frozen:
                p.requires_grad_(flag)

    def _set_attention(self) -> None:
        wanted = [x.attention for x in self._listeners if x.attention is not None]
        if not wanted:
            if self._orig_attention is not _UNSET:
                orig, self._orig_attention = self._orig_attention, _UNSET
                restore_attention(self.model, self.adapter.text_config_key, self.text_config, orig)
            return
        current = compat.attn_implementation(self.text_config)
        if self._orig_attention is _UNSET:
            self._orig_attention = current
        target = self._orig_attention
        for want in wanted:  # in attach order: the last listener's need wins, "differentiable" keeps eager / sdpa
            target = want if want != "differentiable" else (target if target in DIFFERENTIABLE else "sdpa")
        if target != current:
            switch_attention(self.model, self.adapter.text_config_key, self.text_config, target)

    # ------------------------------------------------------------------------------------------------------
    # forward calls

    def _pre_tower(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        grid = kwargs.get(self.adapter.tower_grid_kwarg)
        if grid is None and len(args) > 1 and isinstance(args[1], torch.Tensor):
            grid = args[1]
        if isinstance(grid, torch.Tensor):
            target = self._call.tower_grids if self._call is not None else self._pending_tower
            target.append(grid.detach().cpu().clone())

    def _on_call(self, raw: Any) -> None:
        watching = [x for x in self._listeners if x.watches_calls]
        call = Call(raw, self.config, self.adapter.layout_inputs, watching[0].owner if watching else "flowkern")
        call.tower_grids, self._pending_tower = self._pending_tower, []
        self._call = call
        if call.cache is not None:
            n = call.length
            real = call.mask[:, -n:].bool() if call.mask is not None and call.mask.shape[1] >= n else None
            track_forward(call.cache, prefill=call.prefill, past=call.past, n_new=n, real=real)
        for listener in watching:
            listener.on_call(call)
            call.entered.append(listener)
        self._push(call)
        if call.narrowings:
            self._install_narrowing(call)
        if any(x.sync for x in watching):
            _cuda_sync(call.device)
        call.start = time.perf_counter()

    def _on_return(self, output: Any) -> None:
        call, self._call = self._call, None
        if call is None:
            return
        try:
            if output is not None and call.start is not None:
                if any(x.sync for x in call.entered):
                    _cuda_sync(call.device)
                call.seconds = time.perf_counter() - call.start
            self._end_forward()
            if output is not None:
                call.output_cache = compat.output_cache(output)
                narrowed = call.narrowed
                if narrowed is not None and narrowed.groups:
                    cache = next((c for c in (call.cache, narrowed.cache, call.output_cache) if c is not None), None)
                    if cache is not None:
                        set_cache_groups(cache, narrowed.groups)
        finally:
            for listener in call.entered:
                listener.on_return(call)

    def _end_forward(self) -> None:
        for h in self._forward_handles:
            h.remove()
        self._forward_handles.clear()
        if self._dirty:
            for state in self._states.values():
                state.clear()
            self._dirty = False

    # ------------------------------------------------------------------------------------------------------
    # the state pushed down to each attention module

    def _push(self, call: Call, layers: range | None = None, narrowing: KeyMapGroup | None = None) -> None:
        """Write every layer's state for this forward (or, with ``narrowing``, the key map the narrowed ``layers``
        hold, the state of those layers)."""
        if not self._states:
            return
        labels, num_segments, cuts = call.labels, call.num_segments, call.cuts if call.labels is not None else None
        if cuts is not None:  # the last prompt token gets its own segment id, num_segments, for the cut tables
            last = call.last.to(labels.device)[:, None]
            labels = labels.scatter(1, last, torch.full_like(last, num_segments))
            num_segments += 1
        groups = cache_groups(call.cache) if call.cache is not None and not call.prefill else []
        observers = call.observers
        if narrowing is None and labels is None and not groups and not observers and not self._dirty:
            return  # nothing to say: every layer stays plain (the fast path)
        by_layer: dict[int, tuple[torch.Tensor, bool] | None] = {}
        for g in groups:
            for i in g.layers:
                by_layer[i] = (g.keymap, g.hidden)
        if narrowing is not None:
            for i in layers or ():
                by_layer[i] = (narrowing.keymap, narrowing.hidden)
        entries: dict[tuple[int, torch.device], tuple] = {}
        labels_on: dict[torch.device, torch.Tensor] = {}
        for i in (layers if layers is not None else self._states):
            state = self._states.get(i)
            if state is None:
                continue
            held = by_layer.get(i)
            dev = self._devices[i]
            key = (id(held[0]) if held is not None else 0, dev)
            entry = entries.get(key)
            if entry is None:
                entry = entries[key] = self._layer_entry(labels, held, dev, labels_on)
            state.key_ids, state.keymap, state.key_padding = entry
            state.num_segments = num_segments if labels is not None else 1
            table = cuts.get(i) if cuts is not None else None
            state.allowed = None if table is None else table.to(dev)
            state.observe = bool(wants := observers.get(i))
            state.key_mass = any(w.key_mass for _, w in wants) if wants else False
            state.per_head = any(w.per_head for _, w in wants) if wants else False
            state.rows = any(w.rows for _, w in wants) if wants else False
            state.key_rows = next((w.key_rows for _, w in wants if w.key_rows is not None), None) if wants else None
        self._dirty = True

    @staticmethod
    def _layer_entry(
        labels: torch.Tensor | None, held: tuple[torch.Tensor, bool] | None, dev: torch.device,
        labels_on: dict[torch.device, torch.Tensor],
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """``(key_ids int32, keymap, key_padding)`` of the layers holding ``held`` (key map, any hidden) on ``dev``."""
        keymap = padding = ids = None
        if held is not None:
            keymap = held[0] if held[0].device == dev else held[0].to(dev)
            padding = (keymap >= 0) if held[1] else None
        if labels is not None:
            lab = labels_on.get(dev)
            if lab is None:
                lab = labels_on[dev] = labels.to(dev).clamp(min=0).to(torch.int32)
            ids = lab.gather(1, keymap.clamp(min=0)) if keymap is not None and keymap.shape[0] == lab.shape[0] \
                else lab
        return ids, keymap, padding

    def _not_measured(self, layer: int, module: torch.nn.Module, args: tuple, output: Any) -> None:
        """A linear-attention layer has no softmax: a listener that asked for its row gets NaN (not measured),
        never numbers that look like data."""
        call = self._call
        wants = call.observers.get(layer) if call is not None else None
        if not wants:
            return
        hidden, _ = compat.layer_output_hidden(output)
        nan = float("nan")
        mass = torch.full((hidden.shape[0], call.num_segments if call.labels is not None else 1), nan,
                          device=hidden.device)
        key_mass = None
        if any(k for _, k in wants) and call.labels is not None:
            key_mass = torch.full(tuple(call.labels.shape), nan, device=hidden.device)
        self._dispatch(RowEvent(layer, mass, key_mass, None))

    def _dispatch(self, event: RowEvent) -> None:
        call = self._call
        if call is None:
            return
        if call.cuts is not None and event.mass.shape[-1] > call.num_segments:
            # back to the listeners' labels: the last prompt token's mass goes to the segment it is labelled with
            own = call.labels.gather(1, call.last.to(call.labels.device)[:, None]).clamp(min=0).to(event.mass.device)
            n = call.num_segments

            def fold(t: torch.Tensor | None) -> torch.Tensor | None:
                # t [B, ..., n + 1] -> [B, ..., n]: the extra segment's mass added to the last token's own label
                if t is None:
                    return None
                idx = own.view(own.shape[0], *([1] * (t.dim() - 1))).expand(*t.shape[:-1], 1)
                return t[..., :n].scatter_add(-1, idx, t[..., n:])

            event = RowEvent(event.layer, fold(event.mass), event.key_mass, event.keymap, fold(event.head_mass),
                             fold(event.rows), event.chosen_key_mass)
        for listener, _ in call.observers.get(event.layer, ()):
            listener.on_row(event)

    # ------------------------------------------------------------------------------------------------------
    # narrowing the stages of one forward (flowkern.hf.narrowing)

    def _install_narrowing(self, call: Call) -> None:
        push = functools.partial(self._push, call)
        narrowed = Narrowed(call.narrowings, self.num_layers, lambda layers, group: push(layers, group))
        call.narrowed = narrowed
        if narrowed.first == 0 and self.language_model_entry is None:
            raise NotImplementedError(f"flowkern.prune(layer=0): found no language-model entry in "
                                      f"{self.adapter.family} to narrow the inputs at")
        for i in range(narrowed.first, self.num_layers):
            hook = functools.partial(self._narrow_pre, call, narrowed, i)
            self._forward_handles.append(self.layers[i].register_forward_pre_hook(hook, with_kwargs=True))

    def _narrow_pre(self, call: Call, narrowed: Narrowed, idx: int, module: torch.nn.Module, args: tuple,
                    kwargs: dict) -> tuple[tuple, dict] | None:
        return narrowed.layer_pre(idx, idx in self.linear_layers, args, kwargs, call.capture_hidden)

    def _pre_entry(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """The language model's entry: narrow its inputs (a stage at layer 0), or translate the mask and positions
        of a forward on a cache whose layer 0 was pruned."""
        call = self._call
        if call is None:
            return None
        narrowed = call.narrowed
        if narrowed is not None and narrowed.first == 0 and not narrowed.groups:
            return narrowed.enter(module, args, kwargs)
        if not call.prefill and call.cache is not None:
            return pruned_cache_entry(call, args, kwargs, module)
        return None


def _cuda_sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
