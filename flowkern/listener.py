"""The base class of an analysis that runs on a model: a *listener* on the model's session.

The session (:mod:`flowkern.hf.session`) owns everything that touches the model -- attention implementation,
hooks, call normalisation, per-layer state, restoring it all -- and a listener only says what it needs (class
attributes) and records what it is told (callbacks). :func:`flowkern.trace`, :func:`flowkern.prune`,
:func:`flowkern.cam` and :class:`flowkern.prune.ForwardTimer` are listeners; a new analysis is one more. This
module imports neither transformers nor the session, so that ``import flowkern`` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flowkern.hf.attention import RowEvent
    from flowkern.hf.calls import Call
    from flowkern.hf.session import Session

__all__ = ["Listener"]


class Listener:
    """Base class of an analysis attached to a :class:`Session`. Override what you need.

    Class attributes:
        owner: name in error messages (``"flowkern.trace"``).
        exclusive: at most one listener of this class per model.
        attention: ``"flowkern"`` (the language model runs flowkern's attention: row events, key maps),
            ``"differentiable"`` (autograd must go through it) or None (no preference).
        watches_calls: receive :meth:`on_call` / :meth:`on_return` for each outermost forward.
        tower_inputs: capture the vision tower's layout input (``grid_thw``) into :attr:`Call.layout_inputs`.
        freezes_parameters: no parameter requires grad while attached (restored on detach).
        sync: synchronise CUDA around each forward so that :attr:`Call.seconds` is exact.
    """

    owner = "flowkern"
    exclusive = False
    attention: str | None = None
    watches_calls = False
    tower_inputs = False
    freezes_parameters = False
    sync = False

    def install(self, session: Session, handles: list[Any]) -> None:
        """Register hooks this listener needs for as long as it is attached; append their handles."""

    def on_call(self, call: Call) -> None:
        """Before an outermost forward runs: update the record, ask for row events (:meth:`Call.observe`) or a
        narrowing (:meth:`Call.narrow`), set :attr:`Call.labels`."""

    def on_row(self, event: RowEvent) -> None:
        """A row event of a layer this listener asked for (under ``torch.no_grad``)."""

    def on_return(self, call: Call) -> None:
        """After the forward (also when it raised: then ``call.seconds`` is None)."""
