"""Watching a VLM's forward calls: which tokens each outermost call feeds (shared by trace and prune).

A VLM's forward calls its language model's forward, and some ``generate`` implementations (InstructBLIP) embed
the prompt themselves and call the language model with ``inputs_embeds`` only. :class:`ForwardWatcher` hooks the
model, its language model and the input embeddings, and reports each *outermost* call once, with the prompt's
token ids recovered from the embedding layer when the call itself carries only embeddings.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["ForwardCall", "ForwardWatcher"]


@dataclass
class ForwardCall:
    """The inputs of one outermost forward call.

    Attributes:
        ids: int ``[B, S_new]`` token ids of the call, or None when only embeddings are known.
        embeds: float ``[B, S_new, hidden]`` input embeddings when the call passed them, else None.
        kwargs: the call's keyword arguments (read them through :mod:`flowkern.hf.compat`).
    """

    ids: torch.Tensor | None
    embeds: torch.Tensor | None
    kwargs: dict

    @property
    def _tokens(self) -> torch.Tensor:
        return self.ids if self.ids is not None else self.embeds  # type: ignore[return-value]

    @property
    def length(self) -> int:
        """``S_new``: tokens this call adds."""
        return int(self._tokens.shape[1])

    @property
    def batch(self) -> int:
        """``B``."""
        return int(self._tokens.shape[0])

    @property
    def device(self) -> torch.device:
        return self._tokens.device


class ForwardWatcher:
    """Calls ``on_call(ForwardCall)`` before, and ``on_return()`` after, each outermost forward of a model.

    Args:
        owner: name used in error messages (``"flowkern.trace"``).
        on_call: called before the outermost forward runs.
        on_return: called after it, also when it raised (optional).

    Raises (from the hook): ValueError when a call carries neither ``input_ids`` nor ``inputs_embeds``.
    """

    def __init__(
        self, owner: str, on_call: Callable[[ForwardCall], None], on_return: Callable[[], None] | None = None
    ) -> None:
        self.owner = owner
        self.on_call = on_call
        self.on_return = on_return
        self._handles: list[Any] = []
        self._depth = 0
        self._last_ids: torch.Tensor | None = None

    def install(self, model: torch.nn.Module, text_config: Any) -> None:
        """Hook ``model``, its language model (the module owning ``text_config`` with input embeddings) and the
        input embedding layer."""
        language_model = next(
            (m for m in model.modules() if getattr(m, "config", None) is text_config
             and hasattr(m, "get_input_embeddings")),
            None,
        )
        for m in dict.fromkeys([model, language_model]):
            if m is None:
                continue
            self._handles.append(m.register_forward_pre_hook(self._pre_forward, with_kwargs=True))
            self._handles.append(m.register_forward_hook(self._post_forward, always_call=True))
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
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
        if self.on_return is not None:
            self.on_return()
