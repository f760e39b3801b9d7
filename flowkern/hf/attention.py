"""The ``"flowkern"`` attention implementation for Hugging Face transformers (DESIGN.md §5).

Two functions are registered under the name :data:`ATTENTION_NAME`:

- :func:`flowkern_attention_forward` with ``AttentionInterface.register``: fused attention through
  :func:`flowkern.ops.segment_attention` (GQA without ``repeat_kv``, no ``Sq x Sk`` matrix), which also yields
  the per-segment softmax mass and the row LSE that :mod:`flowkern.trace` records;
- :func:`flowkern_attention_mask` with ``AttentionMaskInterface.register``: instead of a 4D mask it returns
  the 2D boolean *key padding mask* ``[B, Sk]`` (``None`` when nothing is padded), the same contract as
  transformers' flash-attention mask; causality is applied inside the kernel, bottom-right aligned, which
  is exactly what a KV cache needs (decode rows see every cached key).

Only plain causal decoder masks are supported: a sliding window, chunked attention, softcapping, attention
sinks, packed sequences or a custom mask overlay raise an error that says so, rather than computing
something else. A model opts in with ``model.set_attn_implementation({"text_config": "flowkern"})``; the
vision tower keeps its own implementation. :func:`flowkern.trace` does this for you.

Per-call context (segment labels of the keys, where to put the masses) comes from an :class:`AttentionObserver`
stored on each traced attention module under :data:`OBSERVER_ATTR`: no global state, so two models can be
traced at once. Without an observer the function is plain fused attention.

Two more per-module attributes serve :mod:`flowkern.prune` (and anything else that needs them):

- :data:`ROW_HOOKS_ATTR`: a list of callables that receive the last query row of every call (with its LSE), e.g.
  to rank keys by the attention they receive (:func:`flowkern.key_attention_mass`);
- :data:`KEYMAP_ATTR`: the *key map* of the call, int64 ``[B, Sk]``: for every key of this layer (its KV cache
  plus the new tokens) the original token position it holds, or -1 for a hidden filler. A layer whose cache
  holds only some of the tokens (pruned image tokens) has one; observers use it to label the keys, and this
  function checks that it covers exactly the keys it gets. Layers without one hold every token (fast path).

When autograd needs the output (inputs require grad) or dropout is active, the output comes from PyTorch SDPA
(differentiable) and only the observed masses are computed by flowkern, under ``torch.no_grad``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from flowkern import ops
from flowkern.hf import compat

__all__ = [
    "ATTENTION_NAME",
    "OBSERVER_ATTR",
    "ROW_HOOKS_ATTR",
    "KEYMAP_ATTR",
    "AttentionObserver",
    "RowHook",
    "flowkern_attention_forward",
    "flowkern_attention_mask",
    "register",
    "use_flowkern_attention",
    "restore_attention",
    "language_attention_modules",
]

ATTENTION_NAME = "flowkern"
"""Name under which both functions are registered (must not contain "flash": transformers treats those specially)."""

OBSERVER_ATTR = "_flowkern_observer"
"""Attribute of a traced attention module holding its :class:`AttentionObserver`."""

ROW_HOOKS_ATTR = "_flowkern_row_hooks"
"""Attribute of an attention module holding a list of :data:`RowHook` callables (called after each forward call)."""

KEYMAP_ATTR = "_flowkern_keymap"
"""Attribute of an attention module holding the key map (int64 ``[B, Sk]``) of the current call, or absent."""

RowHook = Callable[
    [torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None", float, bool], None
]
"""``hook(module, q_last [B,Hq,1,D], k [B,Hkv,Sk,D], lse_last f32 [B,Hq,1], key_padding_mask, scale, causal)``:
receives the last query row of a call, under ``torch.no_grad`` (the same arguments as
:meth:`AttentionObserver.observe` without the segment masses)."""

_UNSUPPORTED_KWARGS = {
    "softcap": "logit softcapping",
    "s_aux": "attention sinks",
    "sinks": "attention sinks",
    "cu_seq_lens_q": "packed (varlen) sequences",
    "cu_seq_lens_k": "packed (varlen) sequences",
}


class AttentionObserver:
    """What :func:`flowkern_attention_forward` asks of a tracer. Subclass and override both methods.

    Attributes:
        num_segments: number of key segments (1..8) the labels of :meth:`key_segments` range over.
    """

    num_segments: int = 1

    def key_segments(self, module: torch.nn.Module, batch: int, kv_len: int, device: torch.device) -> torch.Tensor:
        """Segment label of every key of this call.

        Returns:
            int32 ``[batch, kv_len]`` on ``device``, values in ``[0, num_segments)`` (padding keys may carry any
            valid label: they are hidden by the key padding mask).
        """
        raise NotImplementedError

    def observe(
        self,
        module: torch.nn.Module,
        q_last: torch.Tensor,
        k: torch.Tensor,
        lse_last: torch.Tensor,
        mass_last: torch.Tensor,
        key_padding_mask: torch.Tensor | None,
        scale: float,
        causal: bool,
    ) -> None:
        """Receive the last query row of this call (the row that produces the next token), under ``no_grad``.

        Args:
            module: the attention module (``module.layer_idx`` is its decoder layer).
            q_last: ``[B, Hq, 1, D]`` the last query row.
            k: ``[B, Hkv, Sk, D]`` all keys of this call (cache included).
            lse_last: float32 ``[B, Hq, 1]`` the row's log-sum-exp.
            mass_last: float32 ``[B, num_segments]`` head-mean softmax mass of the row per key segment.
            key_padding_mask: bool ``[B, Sk]`` (True = real key) or None.
            scale: softmax scale used.
            causal: whether the call was causal (bottom-right aligned).
        """
        raise NotImplementedError


def _key_padding_mask(attention_mask: torch.Tensor | None, sk: int) -> tuple[torch.Tensor | None, int]:
    """The 2D key padding mask and the number of keys it covers (``<= sk``; fewer for a static cache)."""
    if attention_mask is None:
        return None, sk
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        shape = tuple(attention_mask.shape) if hasattr(attention_mask, "shape") else type(attention_mask).__name__
        raise ValueError(
            f"flowkern attention needs the 2D key padding mask made by the '{ATTENTION_NAME}' mask function, got "
            f"{shape}. A custom 4D attention mask is not supported; pass the 2D attention_mask instead."
        )
    length = attention_mask.shape[-1]
    if length > sk:
        raise ValueError(f"attention mask covers {length} keys but the layer has only {sk}")
    return attention_mask.to(torch.bool), length


def _sdpa_output(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kpm: torch.Tensor | None, causal: bool, scale: float,
    dropout: float,
) -> torch.Tensor:
    """Differentiable attention output ``[B, Hq, Sq, D]`` through PyTorch SDPA (bottom-right causal)."""
    sq, sk = q.shape[2], k.shape[2]
    mask = None
    use_is_causal = False
    if kpm is None and (not causal or sq == 1):
        pass
    elif kpm is None and sq == sk:
        use_is_causal = True
    else:
        i = torch.arange(sq, device=q.device)[:, None]
        j = torch.arange(sk, device=q.device)[None, :]
        vis = (j <= i + (sk - sq)) if causal else torch.ones(sq, sk, dtype=torch.bool, device=q.device)
        mask = vis[None, None] if kpm is None else vis[None, None] & kpm[:, None, None, :]
        # A row that sees no key (a left-padding query) would be NaN on some backends: let it see every key.
        # Its output is never read by a real token, so this only keeps gradients finite.
        mask = mask | ~mask.any(dim=-1, keepdim=True)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=use_is_causal, scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )


def flowkern_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention function for ``AttentionInterface`` (same contract as transformers' ``sdpa_attention_forward``).

    Args:
        module: the calling attention module; may carry an :class:`AttentionObserver` in :data:`OBSERVER_ATTR`.
        query: ``[B, Hq, Sq, D]``.
        key, value: ``[B, Hkv, Sk, D]`` with ``Hq % Hkv == 0`` (never expanded).
        attention_mask: the 2D bool key padding mask ``[B, Sk']`` from :func:`flowkern_attention_mask` (or None).
            ``Sk' < Sk`` happens with a static cache: only the first ``Sk'`` keys exist and are used.
        dropout: attention dropout probability (0 in eval); when > 0 the output comes from SDPA.
        scaling: softmax scale (default ``D ** -0.5``).
        is_causal: overrides ``module.is_causal`` (default True). Causal is bottom-right aligned.

    Returns:
        ``(attn_output [B, Sq, Hq, D], None)``: no attention weights (use :func:`flowkern.trace` instead).

    Raises:
        NotImplementedError: for a sliding window, softcapping, sinks or packed sequences.
        ValueError: for a mask this function cannot interpret.
    """
    for name, what in _UNSUPPORTED_KWARGS.items():
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"flowkern attention does not support {what} (`{name}` was set)")
    if kwargs.get("sliding_window") is not None:
        raise NotImplementedError(
            f"flowkern attention does not support sliding-window layers (sliding_window={kwargs['sliding_window']})"
        )
    keymap = getattr(module, KEYMAP_ATTR, None)
    if keymap is not None and tuple(keymap.shape) != (query.shape[0], key.shape[2]):
        raise RuntimeError(
            f"layer {getattr(module, 'layer_idx', '?')}: its key map covers {tuple(keymap.shape)} tokens but the "
            f"attention got [B={query.shape[0]}, Sk={key.shape[2]}] keys: the KV cache was changed behind "
            "flowkern's back (cropped, or reused outside the flowkern.prune context that compacted it)"
        )
    kpm, n_keys = _key_padding_mask(attention_mask, key.shape[2])
    if n_keys < key.shape[2]:  # static cache: the slots past the mask are unwritten
        key, value = key[:, :, :n_keys], value[:, :, :n_keys]
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
    dropout = float(dropout or 0.0)
    observer: AttentionObserver | None = getattr(module, OBSERVER_ATTR, None)
    row_hooks: list[RowHook] = getattr(module, ROW_HOOKS_ATTR, None) or []
    B, sk = query.shape[0], key.shape[2]

    if observer is not None:
        segments = observer.key_segments(module, B, sk, query.device)
        nseg = observer.num_segments
    else:
        segments = torch.zeros(B, sk, dtype=torch.int32, device=query.device)
        nseg = 1

    needs_grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
    if needs_grad or dropout > 0.0:
        out = _sdpa_output(query, key, value, kpm, causal, scale, dropout)
        if observer is not None or row_hooks:
            with torch.no_grad():
                q_last, k_det = query[:, :, -1:].detach(), key.detach()
                _, lse_last, mass_last = ops.segment_attention(
                    q_last, k_det, value.detach(), segments, nseg, causal=causal, key_padding_mask=kpm, scale=scale,
                    validate=False,
                )
                if observer is not None:
                    observer.observe(module, q_last, k_det, lse_last, mass_last[:, -1], kpm, scale, causal)
                for hook in row_hooks:
                    hook(module, q_last, k_det, lse_last, kpm, scale, causal)
    else:
        out, lse, mass = ops.segment_attention(
            query, key, value, segments, nseg, causal=causal, key_padding_mask=kpm, scale=scale, validate=False
        )
        if observer is not None or row_hooks:
            with torch.no_grad():
                q_last, lse_last = query[:, :, -1:], lse[:, :, -1:]
                if observer is not None:
                    observer.observe(module, q_last, key, lse_last, mass[:, -1], kpm, scale, causal)
                for hook in row_hooks:
                    hook(module, q_last, key, lse_last, kpm, scale, causal)
    return out.transpose(1, 2).contiguous(), None


def flowkern_attention_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function: Any = None,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor | None:
    """Mask function for ``AttentionMaskInterface``: the 2D key padding mask, never a 4D mask.

    Args:
        batch_size, q_length, kv_length, q_offset, kv_offset: as in ``transformers.masking_utils.sdpa_mask``.
        mask_function: the mask pattern; only transformers' plain ``causal_mask_function`` is accepted.
        attention_mask: bool ``[B, past + q_length]`` padding mask (True = real token) or None.

    Returns:
        bool ``[B, Sk']`` (True = real key; ``Sk' = kv_length`` unless a static cache holds fewer real slots), or
        None when no key is padded.

    Raises:
        NotImplementedError: for a sliding-window, chunked, bidirectional, packed or overlaid mask pattern.
    """
    from transformers.masking_utils import causal_mask_function

    if mask_function is not None and mask_function is not causal_mask_function:
        name = getattr(mask_function, "__name__", type(mask_function).__name__)
        raise NotImplementedError(
            f"flowkern attention supports plain causal decoder masks only, got mask pattern `{name}` (sliding "
            "window, chunked, bidirectional, packed sequences or a model-specific overlay)"
        )
    if attention_mask is None:
        return None
    mask = attention_mask.to(torch.bool)
    mask = mask[:, kv_offset : kv_offset + kv_length]
    if mask.shape[-1] == kv_length and bool(mask.all()):
        return None
    return mask


_registered = False


def register() -> str:
    """Register the attention and mask functions with transformers under :data:`ATTENTION_NAME` (idempotent).

    Returns:
        The implementation name, for ``model.set_attn_implementation({"text_config": name})``.
    """
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        AttentionInterface.register(ATTENTION_NAME, flowkern_attention_forward)
        AttentionMaskInterface.register(ATTENTION_NAME, flowkern_attention_mask)
        _registered = True
    return ATTENTION_NAME


# ----------------------------------------------------------------------------------------------------------
# switching a model's language model to "flowkern" and back (shared by flowkern.trace and flowkern.prune)


def language_attention_modules(model: torch.nn.Module, text_config: Any) -> list[torch.nn.Module]:
    """The language model's attention modules (those whose ``config`` is ``text_config`` and that have a
    ``layer_idx``), in module order."""
    return [m for m in model.modules() if getattr(m, "config", None) is text_config and hasattr(m, "layer_idx")]


def use_flowkern_attention(model: torch.nn.Module, text_config_key: str, text_config: Any) -> str:
    """Switch the language model (only) to the ``"flowkern"`` attention; returns the previous implementation name
    for :func:`restore_attention`.

    Raises:
        RuntimeError: the model refused the implementation (its language model stays as it was).
    """
    name = register()
    prev = compat.attn_implementation(text_config)
    if prev != name:
        model.set_attn_implementation({text_config_key: name})
    if compat.attn_implementation(text_config) != name:
        raise RuntimeError(
            f"{type(model).__name__} refused attn_implementation={name!r} for its language model "
            f"(it stays {compat.attn_implementation(text_config)!r})"
        )
    return prev


def restore_attention(model: torch.nn.Module, text_config_key: str, text_config: Any, prev: str | None) -> None:
    """Give the language model back the implementation ``prev`` returned by :func:`use_flowkern_attention`."""
    compat.set_text_attn_implementation(model, text_config_key, text_config, prev)
