"""Reusing one computation across several generate calls on the same inputs: the layers below a pruning layer
(:class:`PrefixShare`), the image encoding (:class:`ImageCache`), and the model's session kept on the ``flowkern``
attention between them (:func:`hold_attention`). What :mod:`flowkern.eval.sweep` runs a batch's points on.

.. code-block:: python

    share, images = PrefixShare(model), ImageCache(model)
    with hold_attention(model), images.active():
        with share.capture(kv_layers=range(6), out_layers={2, 5}):   # the point with the largest L
            generate(...)
        with share.replay(depth=3):                                    # a point L = 3: layers 0..2 skipped
            generate(...)

Each is a listener on the model's :class:`flowkern.hf.session.Session` (it hears each outermost forward, whose
``prefill`` is the session's notion of "the cache was empty"), with the layer hooks it needs installed on attach
and removed on detach; the decoder layers' calling convention is read through :mod:`flowkern.hf.compat`.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch

from flowkern.hf import compat
from flowkern.hf.attention import ATTENTION_NAME
from flowkern.listener import Listener, attached

if TYPE_CHECKING:
    from flowkern.hf.calls import Call
    from flowkern.hf.session import Session

__all__ = ["PrefixShare", "ImageCache", "hold_attention"]

OWNER = "flowkern.sweep"


class _AttentionHold(Listener):
    """Asks only for the ``flowkern`` attention: held across several short-lived listeners, it keeps the language
    model switched and the model's session (and the structure it found) alive."""

    owner = OWNER
    attention = ATTENTION_NAME


@contextlib.contextmanager
def hold_attention(model: torch.nn.Module) -> Iterator[None]:
    """The language model on the ``flowkern`` attention inside the block (what :func:`flowkern.prune` selects), held
    by one listener on the model's session: the session, and the decoder layers and attention modules it found, last
    across the block's :func:`flowkern.prune` enters instead of being found again at each one."""
    with attached(model, _AttentionHold()):
        yield


class _Prefill(Listener):
    """Hears each outermost forward: :attr:`prefill` is True while a forward on an empty cache runs."""

    owner = OWNER
    watches_calls = True

    def __init__(self) -> None:
        self.prefill = False

    def on_call(self, call: Call) -> None:
        self.prefill = call.prefill

    def on_return(self, call: Call) -> None:
        self.prefill = False


class _Record(_Prefill):
    """At each prefill: the outputs of ``out_layers`` and, when the forward returns, the keys/values of
    ``kv_layers``, into ``share``."""

    def __init__(self, share: PrefixShare, kv_layers: list[int], out_layers: set[int]) -> None:
        super().__init__()
        self.share, self.kv_layers, self.out_layers = share, kv_layers, out_layers

    def install(self, session: Session, handles: list[Any]) -> None:
        for i in sorted(set(self.kv_layers) | self.out_layers):
            hook = functools.partial(self._layer_returned, i)
            handles.append(session.layers[i].register_forward_hook(hook, with_kwargs=True))

    def _layer_returned(self, i: int, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if not self.prefill:
            return
        hidden = compat.layer_hidden_states(args, kwargs)
        self.share.shape = (int(hidden.shape[0]), int(hidden.shape[1]))
        if i in self.out_layers:
            out, self.share.tuple_output = compat.layer_output_hidden(output)
            self.share.outputs[i] = out.clone()

    def on_return(self, call: Call) -> None:
        if self.prefill and call.seconds is not None:
            cache = call.output_cache or call.cache
            for i in self.kv_layers:
                kv = compat.layer_kv(cache, i) if cache is not None else None
                if kv is None:
                    raise RuntimeError(f"{OWNER}: layer {i}'s cache is empty after the prefill")
                self.share.kv[i] = kv
        super().on_return(call)


class _Restore:
    """The handle of a replaced ``forward``: :meth:`remove` puts back what the layer had."""

    def __init__(self, layer: torch.nn.Module) -> None:
        self.layer, self.had, self.prev = layer, "forward" in layer.__dict__, layer.__dict__.get("forward")

    def remove(self) -> None:
        if self.had:
            self.layer.forward = self.prev
        elif "forward" in self.layer.__dict__:
            del self.layer.forward


class _Replay(_Prefill):
    """At each prefill, decoder layers ``0 .. depth-1`` do not compute: each appends its recorded keys and values to
    the cache, and layer ``depth-1`` returns its recorded output. Other forwards run every layer."""

    def __init__(self, share: PrefixShare, depth: int) -> None:
        super().__init__()
        self.share, self.depth = share, depth

    def install(self, session: Session, handles: list[Any]) -> None:
        # a forward hook cannot skip the computation, so the layer's forward is replaced for the attachment
        for i in range(self.depth):
            layer = session.layers[i]
            handle = _Restore(layer)
            handles.append(handle)
            layer.forward = functools.partial(self._layer, i, layer.forward)

    def _layer(self, i: int, orig: Any, *args: Any, **kwargs: Any) -> Any:
        if not self.prefill:
            return orig(*args, **kwargs)
        share = self.share
        hidden = compat.layer_hidden_states(args, kwargs)
        if share.shape is not None and (int(hidden.shape[0]), int(hidden.shape[1])) != share.shape:
            raise RuntimeError(f"{OWNER}: replayed layer {i} got hidden states {tuple(hidden.shape)}, recorded "
                               f"{share.shape}")
        cache = compat.call_cache(kwargs)
        if cache is not None:
            compat.append_layer_kv(cache, i, *share.kv[i])
        out = share.outputs[i].clone() if i == self.depth - 1 else hidden
        return compat.layer_output(out, share.tuple_output)


class PrefixShare:
    """Record the unpruned prefill's per-layer keys/values and hidden states once; let later generate calls skip
    those layers at their prefill.

    At the prefill (the outermost forward on an empty cache) of a :meth:`replay`, decoder layers ``0 .. depth-1`` do
    not compute: each appends its recorded keys and values ``[B, Hkv, S, D]`` to the cache, and layer ``depth-1``
    returns (a copy of) its recorded output ``[B, S, D]``. Decode steps run every layer. The recorded prefill must be
    of the same inputs (same batch) and the same attention implementation; shapes are checked.

    Attributes:
        kv: layer -> recorded ``(keys, values)`` ``[B, Hkv, S, D]``.
        outputs: layer -> recorded output hidden states ``[B, S, D]``.
        shape: the recorded ``(B, S)``, or None.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.tuple_output = False
        self.shape: tuple[int, int] | None = None

    def clear(self) -> None:
        """Drop the recording."""
        self.kv, self.outputs, self.shape = {}, {}, None

    @contextlib.contextmanager
    def capture(self, kv_layers: Sequence[int] | range, out_layers: set[int]) -> Iterator[None]:
        """Record, at the next prefill, the keys/values of ``kv_layers`` and the outputs of ``out_layers``."""
        self.clear()
        with attached(self.model, _Record(self, list(kv_layers), set(out_layers))):
            yield

    @contextlib.contextmanager
    def replay(self, depth: int) -> Iterator[None]:
        """Skip decoder layers ``0 .. depth-1`` at the next prefills, from the recording.

        Raises:
            RuntimeError: nothing recorded for those layers.
        """
        if depth <= 0:
            yield
            return
        missing = [i for i in range(depth) if i not in self.kv] + ([] if depth - 1 in self.outputs else ["out"])
        if missing:
            raise RuntimeError(f"{OWNER}: nothing recorded to replay layers 0..{depth - 1} ({missing})")
        with attached(self.model, _Replay(self, depth)):
            yield


class ImageCache:
    """Encode a batch's images once for all the generate calls that answer it.

    .. code-block:: python

        images = ImageCache(model)
        with images.active():       # every point of one batch: the vision tower + projector run at the first only
            for p in points:
                generate(...)
        images.clear()

    Inside :meth:`active`, the model's image encoder (:func:`flowkern.hf.compat.image_encoder`: the vision tower and
    the projector as one call) is memoised: a call whose arguments equal an earlier one's (tensors compared by
    value: dtype, shape, device and every element) returns that call's output object instead of computing it
    again. Pruning and the baseline change only the language model's attention, so the encoder's output is the same
    at every point; the memo only saves the computation. The arguments are kept as copies, so an input changed in
    place later is not mistaken for the one recorded. Holds one batch's image features (and whatever else the
    encoder returns) until :meth:`clear`.

    A generate call that must see the encoder run (a pruning criterion hooked inside the vision tower, such as the
    ``cls`` scorer's [CLS] attention) runs inside :meth:`paused`: the encoder then computes, and the memo is neither
    read nor written.

    Attributes:
        computed, reused: encoder calls that ran (through the memo), and calls answered from the memo.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.where = compat.image_encoder(model)
        self.entries: list[tuple[Any, Any]] = []
        self.computed = 0
        self.reused = 0
        self._paused = False

    def clear(self) -> None:
        """Drop the memo."""
        self.entries = []

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Inside the block the image encoder runs at every call, as without the memo (which stays for later)."""
        was, self._paused = self._paused, True
        try:
            yield
        finally:
            self._paused = was

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Memoise the image encoder inside the block (a no-op when the model has none)."""
        if self.where is None:
            yield
            return
        owner, name = self.where
        had = name in owner.__dict__
        prev = owner.__dict__.get(name)
        orig = getattr(owner, name)
        try:
            signature = inspect.signature(orig)
        except (TypeError, ValueError):
            yield
            return

        @functools.wraps(orig)
        def memo(*args: Any, **kwargs: Any) -> Any:
            if self._paused:
                return orig(*args, **kwargs)
            try:
                key = dict(signature.bind(*args, **kwargs).arguments)
            except TypeError:
                return orig(*args, **kwargs)
            for old, output in self.entries:
                if _same_value(old, key):
                    self.reused += 1
                    return output
            output = orig(*args, **kwargs)
            self.computed += 1
            self.entries.append((_copy_value(key), output))
            return output

        # the encoder is looked up by attribute on its owner (compat.image_encoder), so an instance attribute sees
        # every call
        setattr(owner, name, memo)
        try:
            yield
        finally:
            if had:
                setattr(owner, name, prev)
            else:
                delattr(owner, name)


def _copy_value(x: Any) -> Any:
    """``x`` with its tensors cloned (through dicts, lists and tuples)."""
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, dict):
        return {k: _copy_value(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return type(x)(_copy_value(v) for v in x) if type(x) in (list, tuple) else x
    return x


def _same_value(a: Any, b: Any) -> bool:
    """Whether two call arguments are equal: tensors by dtype, shape, device and value, containers item by item."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and a.device == b.device and bool(torch.equal(a, b)))
    if isinstance(a, dict) or isinstance(b, dict):
        return (isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys()
                and all(_same_value(a[k], b[k]) for k in a))
    if isinstance(a, list | tuple) or isinstance(b, list | tuple):
        return (type(a) is type(b) and len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b, strict=True)))
    try:
        return bool(type(a) is type(b) and a == b)
    except Exception:  # an argument whose == is not a plain bool
        return a is b
