"""Hooks at decoder-layer sites, for an analysis that reads the language model's activations and their gradients
(LLaVA-CAM): it gives plain functions on tensors, and this module puts them on the model.

- ``on_input(hidden) -> hidden``: the hidden states ``[B, S, D]`` entering decoder layer ``min(layers)``, replaced
  by what it returns (LLaVA-CAM makes them an autograd leaf, so that the graph starts there);
- ``on_output(layer, a)``: the output ``a`` of each chosen layer's *site* (the module the family adapter names,
  :meth:`flowkern.hf.models.ModelAdapter.site_module`; its first tensor when it returns a tuple).

:func:`hook_layer_outputs` reads only: ``on_output(layer, hidden)`` gets each decoder layer's output hidden states
(the logit lens).

The handles go to the listener's list, so its session removes the hooks when it detaches.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from flowkern.hf.session import Session

__all__ = ["hook_layer_sites", "hook_layer_outputs"]


def hook_layer_sites(
    session: Session,
    layers: Sequence[int],
    site: str,
    on_input: Callable[[torch.Tensor], torch.Tensor],
    on_output: Callable[[int, torch.Tensor], None],
    handles: list[Any],
    *,
    owner: str = "flowkern",
) -> None:
    """Hook the input of decoder layer ``min(layers)`` and the ``site`` output of every layer of ``layers``
    (see the module docstring); the hook handles are appended to ``handles``.

    Raises:
        ValueError: an unknown site, or a layer without it. RuntimeError (when the model runs): no hidden states
            enter the first layer (the message names ``owner``).
    """
    decoder = session.layers
    pre = functools.partial(_replace_input, on_input, owner)
    handles.append(decoder[min(layers)].register_forward_pre_hook(pre, with_kwargs=True))
    for layer in layers:
        module = session.adapter.site_module(decoder[layer], site)
        handles.append(module.register_forward_hook(functools.partial(_site_output, on_output, layer)))


def hook_layer_outputs(session: Session, on_output: Callable[[int, torch.Tensor], None], handles: list[Any]) -> None:
    """Call ``on_output(layer, hidden)`` with the output hidden states ``[B, S, D]`` of every decoder layer (its first
    tensor when a layer returns a tuple); the hook handles are appended to ``handles``."""
    for layer, module in enumerate(session.layers):
        handles.append(module.register_forward_hook(functools.partial(_site_output, on_output, layer)))


def _replace_input(on_input: Callable[[torch.Tensor], torch.Tensor], owner: str, module: torch.nn.Module,
                   args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    if args and isinstance(args[0], torch.Tensor):
        return (on_input(args[0]), *args[1:]), kwargs
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return args, dict(kwargs, hidden_states=on_input(kwargs["hidden_states"]))
    raise RuntimeError(f"{owner}: found no hidden states entering the first chosen decoder layer")


def _site_output(on_output: Callable[[int, torch.Tensor], None], layer: int, module: torch.nn.Module, args: tuple,
                 output: Any) -> None:
    on_output(layer, output[0] if isinstance(output, tuple | list) else output)
