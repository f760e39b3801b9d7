"""``ForwardTimer``: wall time of each outermost forward call of a model, on the session's clock.

.. code-block:: python

    with flowkern.timer.ForwardTimer(model) as timer:
        model.generate(**inputs, max_new_tokens=32)
    timer.prefill_seconds, timer.decode_seconds, timer.decode_tokens_per_second

The session (:mod:`flowkern.hf.session`) measures each forward once, for every listener (``Call.seconds``); a
timer only files the numbers as a prefill or a decode step. :class:`flowkern.prune.Pruning` is a timer too: its
``prefill_seconds`` / ``decode_seconds`` are this record, from the same clock.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flowkern.listener import Listener

if TYPE_CHECKING:
    import torch

    from flowkern.hf.calls import Call

__all__ = ["ForwardTimer"]


class ForwardTimer(Listener):
    """Wall time of each outermost forward call of a model: the prefill and every decode step (context manager).

    It switches nothing (the model keeps whatever attention it runs). A forward on an empty (or no) cache is a
    prefill and starts a new record; with ``generate(use_cache=False)`` every step counts as a prefill. The model
    must be of a supported family (``flowkern.hf.models.supported_model_types()``).

    Attributes:
        prefill_seconds: the last prefill forward, vision tower included (None before one).
        decode_seconds: each forward on a non-empty cache since then.
        batch_size: B of the last forward.
    """

    owner = "flowkern.ForwardTimer"
    watches_calls = True

    def __init__(self, model: torch.nn.Module, *, sync: bool = True) -> None:
        """``sync``: synchronise CUDA around each forward so that the times are exact."""
        self.model = model
        self.sync = bool(sync)
        self.prefill_seconds: float | None = None
        self.decode_seconds: list[float] = []
        self.batch_size = 0

    @property
    def decode_tokens_per_second(self) -> float | None:
        """``B * steps / sum(decode_seconds)`` (forward time only), or None before any decode step."""
        total = sum(self.decode_seconds)
        return self.batch_size * len(self.decode_seconds) / total if total > 0 else None

    def record(self, seconds: float, *, prefill: bool) -> None:
        """File one forward's wall time: a prefill starts a new record, anything else is a decode step."""
        if prefill:
            self.prefill_seconds = seconds
            self.decode_seconds = []
        else:
            self.decode_seconds.append(seconds)

    def on_call(self, call: Call) -> None:
        self.batch_size = call.batch

    def on_return(self, call: Call) -> None:
        if call.seconds is not None:
            self.record(call.seconds, prefill=call.prefill)
