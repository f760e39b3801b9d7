"""The base class of an analysis that runs on a model: a *listener* on the model's session, and the one bracket
that attaches it for a block.

The session (:mod:`flowkern.hf.session`) owns everything that touches the model -- attention implementation,
hooks, call normalisation, per-layer state, restoring it all -- and a listener only says what it needs (class
attributes) and records what it is told (callbacks). :func:`flowkern.trace`, :func:`flowkern.prune`,
:func:`flowkern.cam` and :class:`flowkern.timer.ForwardTimer` are listeners; a new analysis is one more.

Attaching is written once, here: :meth:`Listener.attach` / :meth:`Listener.detach`, which make every listener a
context manager on its ``model`` (``with flowkern.trace(model) as flow: ...``), and :func:`attached` for a
listener used on a model it does not hold. This module imports neither transformers nor the session at import
time (the session is imported when a listener attaches), so that ``import flowkern`` stays light.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from typing import Self

    import torch

    from flowkern.hf.attention import RowEvent
    from flowkern.hf.calls import Call
    from flowkern.hf.session import Session

__all__ = ["Listener", "attached"]

ListenerT = TypeVar("ListenerT", bound="Listener")


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

    Attributes:
        model: the model ``with listener:`` attaches to (None: use :func:`attached`).
    """

    owner = "flowkern"
    exclusive = False
    attention: str | None = None
    watches_calls = False
    tower_inputs = False
    freezes_parameters = False
    sync = False
    model: torch.nn.Module | None = None
    _session: Session | None = None

    # ------------------------------------------------------------------------------------------------------
    # the attach / detach bracket

    def attach(self, model: torch.nn.Module | None = None) -> Session:
        """Attach to the session of ``model`` (default: :attr:`model`); returns the session.

        Raises:
            RuntimeError: already attached, or the session refused it (:meth:`Session.add`).
            ValueError: no model, or the model family is not supported.
        """
        from flowkern.hf.session import Session

        if self._session is not None:
            raise RuntimeError(f"this {self.owner} is already active")
        model = self.model if model is None else model
        if model is None:
            raise ValueError(f"{self.owner}: no model to attach to")
        session = Session.of(model)
        session.add(self)
        self._session = session
        return session

    def detach(self) -> None:
        """Detach from the session (no-op when not attached); the last listener to leave restores the model."""
        session, self._session = self._session, None
        if session is not None:
            session.remove(self)

    def __enter__(self) -> Self:
        self.attach()
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    # ------------------------------------------------------------------------------------------------------
    # callbacks

    def install(self, session: Session, handles: list[Any]) -> None:
        """Register hooks this listener needs for as long as it is attached; append their handles."""

    def on_call(self, call: Call) -> None:
        """Before an outermost forward runs: update the record, ask for row events (:meth:`Call.observe`) or a
        narrowing (:meth:`Call.narrow`), set :attr:`Call.labels`."""

    def on_row(self, event: RowEvent) -> None:
        """A row event of a layer this listener asked for (under ``torch.no_grad``)."""

    def on_return(self, call: Call) -> None:
        """After the forward (also when it raised: then ``call.seconds`` is None)."""


@contextlib.contextmanager
def attached(model: torch.nn.Module, listener: ListenerT) -> Iterator[ListenerT]:
    """``with attached(model, listener):``: ``listener`` on the session of ``model`` for the block, detached on exit
    (also on error). For a listener that does not hold its model; one that does is itself the context manager."""
    listener.attach(model)
    try:
        yield listener
    finally:
        listener.detach()
