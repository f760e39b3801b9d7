"""The ``"flowkern"`` attention implementation for Hugging Face transformers (docs/architecture.md).

Two functions are registered under the name :data:`ATTENTION_NAME`:

- :func:`flowkern_attention_forward` with ``AttentionInterface.register``: fused attention through
  :func:`flowkern.ops.segment_attention` (GQA without ``repeat_kv``, no ``Sq x Sk`` matrix), which also yields
  the per-segment softmax mass and the row LSE that the analyses record;
- :func:`flowkern_attention_mask` with ``AttentionMaskInterface.register``: instead of a 4D mask it returns
  the 2D boolean *key padding mask* ``[B, Sk]`` (``None`` when nothing is padded), the same contract as
  transformers' flash-attention mask; causality is applied inside the kernel, bottom-right aligned, which
  is exactly what a KV cache needs (decode rows see every cached key).

**Masks are translated, not materialised.** The mask pattern transformers builds for a layer type is read by
:func:`flowkern.hf.compat.mask_rules`: plain causal gives the 2D key padding mask as above; a sliding-window overlay
or a bidirectional image / prefix block overlay (Gemma 3, PaliGemma) gives a :class:`KeyMask`, the padding mask plus
the kernel's ``window`` and ``group_ids`` (docs/masks.md), which the attention function passes to the kernel (no
SDPA fast path then). A language model with KV-shared layers (Gemma 4) slices its masks' query rows at a
``generate`` prefill; there the padding mask is a ``KeyMask`` too, and a ``KeyMask`` sliced to its last rows is
itself (it constrains keys only; the kernel aligns query rows to the last keys). Anything else -- chunked attention,
packed sequences, bidirectional text, an unknown overlay; softcapping and attention sinks in the attention call --
raises ``NotImplementedError`` naming the layer type and why, rather than computing something else.

A model opts in with ``model.set_attn_implementation({"text_config": "flowkern"})``; the vision tower keeps its
own implementation. :mod:`flowkern.hf.session` does this for every analysis.

**The data path runs one way.** The session (:mod:`flowkern.hf.session`) pushes a :class:`LayerState` down to
each attention module of the language model once per forward call (attribute :data:`STATE_ATTR`): the segment id
of every key, the layer's *key map* (int64 ``[B, Sk]``: the original token position each key holds, -1 for a hidden
filler, when the layer's cache holds only some of the tokens, as after :func:`flowkern.prune`) with its key padding
mask, and whether anyone listens to this layer. This function reads that state, computes, and -- only where
asked -- emits one :class:`RowEvent` for the last query row (its per-segment mass and, on request, the
attention each key receives, computed from the row's LSE, its mass per head, every query row's mass, and the key
mass of chosen query rows) to the session, which hands it to its listeners. It never calls back for labels and never
knows who listens; without a state it is plain fused attention.

**Fast path.** A call nobody listens to needs only the attention output, from whichever kernel is faster for it:
PyTorch's ``scaled_dot_product_attention`` (the same bottom-right causal softmax, GQA through ``enable_gqa``) where
it needs no materialised mask (no key padding and ``Sq == 1`` or ``Sq == Sk``, or a ``[B, 1, 1, Sk]`` padding mask
at ``Sq == 1``) and the call is on CUDA or small (:data:`SMALL_CALL`: per-call overhead dominates), else flowkern's
kernel with one segment (on CPU it beats SDPA at every larger size measured). When autograd needs the output
(inputs require grad) or dropout is active, the output comes from SDPA (differentiable) and the observed statistics
are computed by flowkern under ``torch.no_grad``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from flowkern import ops
from flowkern.hf import compat
from flowkern.hf.keymass import chosen_key_mass

__all__ = [
    "ATTENTION_NAME",
    "STATE_ATTR",
    "SMALL_CALL",
    "LayerState",
    "KeyMask",
    "RowEvent",
    "flowkern_attention_forward",
    "flowkern_attention_mask",
    "register",
    "switch_attention",
    "restore_attention",
    "language_attention_modules",
]

ATTENTION_NAME = "flowkern"
"""Name under which both functions are registered (must not contain "flash": transformers treats those specially)."""

STATE_ATTR = "_flowkern_state"
"""Attribute of a language-model attention module holding its :class:`LayerState` while a session is attached."""


@dataclass(slots=True)
class RowEvent:
    """The last query row of one attention call (the row that produces the next token), as the listeners get it.

    Attributes:
        layer: decoder layer (``module.layer_idx``).
        mass: float32 ``[B, num_segments]`` head-mean softmax mass of the row per key segment.
        key_mass: float32 ``[B, Sk]`` head-mean softmax probability each key receives from the row
            (:func:`flowkern.key_attention_mass`), or None when no listener asked for it.
        keymap: int64 ``[B, Sk]`` original token position of each key (-1 = hidden), or None when the layer holds
            every token in order.
        head_mass: float32 ``[B, Hq, num_segments]``: ``mass`` per head, or None when no listener asked for it.
        rows: float32 ``[B, Sq, num_segments]``: the head-mean mass of *every* query row of the call (row ``i``
            stands at key position ``i + Sk - Sq``), or None when no listener asked for it.
        chosen_key_mass: float32 ``[B, Sk]``: ``key_mass`` averaged over the query rows :attr:`LayerState.key_rows`
            chooses (:func:`flowkern.hf.keymass.chosen_key_mass`), or None when no listener chose rows.
    """

    layer: int
    mass: torch.Tensor
    key_mass: torch.Tensor | None
    keymap: torch.Tensor | None
    head_mass: torch.Tensor | None = None
    rows: torch.Tensor | None = None
    chosen_key_mass: torch.Tensor | None = None


@dataclass(slots=True)
class LayerState:
    """What the session pushes down to one attention module for the current forward call.

    Attributes:
        layer: decoder layer index.
        key_ids: int32 ``[B, Sk]`` segment id of every key (None: all 0, one segment).
        num_segments: range of ``key_ids`` (1..8).
        keymap: int64 ``[B, Sk]`` original token position of each key, -1 = hidden (None: every token, in order);
            when set, the keys must be exactly these and ``key_padding`` replaces the mask transformers passes.
        key_padding: bool ``[B, Sk]`` (True = real key) or None, used with ``keymap``.
        allowed: bool ``[num_segments, num_segments]`` segment table of :func:`flowkern.ops.segment_attention` (row =
            the query's segment, column = the key's; False = cut, :func:`flowkern.knockout`), or None (no cut). When
            set the call runs flowkern's kernel with it, never the fast path.
        observe: emit a :class:`RowEvent` to ``sink`` after this layer's attention.
        key_mass: include ``key_mass`` in the event.
        per_head: include ``head_mass`` in the event.
        rows: include every query row's mass (``rows``) in the event.
        key_rows: bool ``[B, T]`` over token positions: the query rows of the event's ``chosen_key_mass``, or None.
        sink: receives the event.
    """

    layer: int
    key_ids: torch.Tensor | None = None
    num_segments: int = 1
    keymap: torch.Tensor | None = None
    key_padding: torch.Tensor | None = None
    allowed: torch.Tensor | None = None
    observe: bool = False
    key_mass: bool = False
    per_head: bool = False
    rows: bool = False
    key_rows: torch.Tensor | None = None
    sink: Callable[[RowEvent], None] | None = None

    def clear(self) -> None:
        """Back to plain attention (nothing pushed)."""
        self.key_ids, self.num_segments, self.keymap, self.key_padding = None, 1, None, None
        self.allowed = self.key_rows = None
        self.observe, self.key_mass, self.per_head, self.rows = False, False, False, False


class KeyMask(torch.Tensor):
    """What :func:`flowkern_attention_mask` returns for a layer type whose mask is more than causal + padding.

    The tensor itself is the key padding mask as bool ``[B, 1, 1, Sk']`` (True = real key): transformers passes a
    4D mask on unchanged (a language model re-creating the mask its multimodal wrapper made, as PaliGemma's Gemma
    does, keeps it). Torch operations on it give plain tensors. What the attention function reads:

    Attributes:
        padding: bool ``[B, Sk']`` key padding mask, or None when nothing is padded.
        window: the layer's sliding window in key positions (docs/masks.md), or None.
        group_ids: int32 ``[B, Sk']``, 0 = no group: keys of the row's own nonzero group are visible whatever the
            causal and window rules say (one group per image, or PaliGemma's prefix), or None.
    """

    __torch_function__ = torch._C._disabled_torch_function_impl
    padding: torch.Tensor | None
    window: int | None
    group_ids: torch.Tensor | None

    @staticmethod
    def make(padding: torch.Tensor | None, window: int | None, group_ids: torch.Tensor | None, batch: int,
             length: int, device: torch.device) -> KeyMask:
        """A KeyMask over ``length`` keys of ``batch`` rows."""
        full = padding if padding is not None else torch.ones(batch, length, dtype=torch.bool, device=device)
        mask = torch.Tensor._make_subclass(KeyMask, full[:, None, None, :])
        mask.padding, mask.window, mask.group_ids = padding, window, group_ids
        return mask

    def __getitem__(self, index: Any) -> Any:
        """``mask[:, :, rows, :]`` with ``rows`` a slice ending at the last row (Gemma 4's KV-shared layers
        computing the last query rows only) is the mask itself: it constrains keys only, and the kernel aligns the
        query rows to the last keys, so the last rows see exactly what they saw before. Any other index gives the
        plain tensor's result."""
        if (isinstance(index, tuple) and len(index) == 4 and isinstance(index[2], slice) and index[2].stop is None
                and index[2].step in (None, 1) and all(i == slice(None) for i in (index[0], index[1], index[3]))):
            return self
        return torch.Tensor.__getitem__(self.as_subclass(torch.Tensor), index)


_UNSUPPORTED_KWARGS = {
    "softcap": "logit softcapping",
    "s_aux": "attention sinks",
    "sinks": "attention sinks",
    "cu_seq_lens_q": "packed (varlen) sequences",
    "cu_seq_lens_k": "packed (varlen) sequences",
}


def _key_padding_mask(attention_mask: torch.Tensor | None, sk: int) -> tuple[torch.Tensor | None, int]:
    """The 2D key padding mask and the number of keys it covers (``<= sk``; fewer for a static cache)."""
    if isinstance(attention_mask, KeyMask):
        attention_mask = attention_mask.padding
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
    dropout: float, rules: dict | None = None,
) -> torch.Tensor:
    """Differentiable attention output ``[B, Hq, Sq, D]`` through PyTorch SDPA (bottom-right causal); ``rules``
    (``window`` / ``group_ids``, docs/masks.md) are applied through a materialised mask."""
    sq, sk = q.shape[2], k.shape[2]
    mask = None
    use_is_causal = False
    if rules:
        from flowkern.reference import visible_mask

        mask = visible_mask(sq, sk, causal=causal, key_padding_mask=kpm, device=q.device, **rules)
        mask = mask | ~mask.any(dim=-1, keepdim=True)  # a row without keys: finite (its output is never read)
    elif kpm is None and (not causal or sq == 1):
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


SMALL_CALL = 2**20
"""``B * Hq * Sq * Sk * D`` up to which a CPU call nobody listens to runs on SDPA: below it the per-call overhead
dominates and SDPA's is lower; above it flowkern's C++ kernel is faster. Measured on the project's 2-core CPU, one
thread, fp32 (flowkern time / SDPA time): decode B=1, Hq=4, D=64, Sk=640 (0.16 M): 1.32; a 64-token prefill at
Hq=4, D=64 (1 M): 1.39; a 128-token one (4 M): 0.96; decode Hq=8, Sk=1280 (0.6 M): 0.85; decode B=32, Hq=4, D=64,
Sk=640: 0.53; decode Hq=32, D=128, Sk=640: 0.44; a 640-token prefill at Hq=4, D=64: 0.80."""


def _fast_output(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kpm: torch.Tensor | None, causal: bool, scale: float,
    rules: dict | None = None,
) -> torch.Tensor:
    """The attention output ``[B, Hq, Sq, D]`` alone (nobody listens), from the faster kernel for this call:
    PyTorch SDPA where it needs no materialised mask and either the tensors are on CUDA (its flash / cuDNN
    kernels) or the call is small (:data:`SMALL_CALL`), else flowkern's kernel with one segment. Bottom-right
    causal either way; a window or image groups (``rules``) always take flowkern's kernel."""
    sq, sk = q.shape[2], k.shape[2]
    rules = rules or {}
    if not rules and (q.device.type == "cuda" or q.shape[0] * q.shape[1] * sq * sk * q.shape[3] <= SMALL_CALL):
        gqa = q.shape[1] != k.shape[1]
        if kpm is None and (sq == 1 or not causal):
            return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)
        if kpm is None and sq == sk:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
        if kpm is not None and sq == 1:
            mask = kpm[:, None, None, :]
            mask = mask | ~mask.any(dim=-1, keepdim=True)  # a row without keys: finite (its output is never read)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    ids = torch.zeros(q.shape[0], sk, dtype=torch.int32, device=q.device)
    return ops.segment_attention(q, k, v, ids, 1, causal=causal, key_padding_mask=kpm, scale=scale,
                                 validate=False, **rules)[0]


def _layer_rules(
    attention_mask: Any, state: LayerState | None, keymap: torch.Tensor | None, sk: int, layer: Any
) -> dict[str, Any]:
    """The kernel's ``window`` / ``group_ids`` for this call (only those set), from a :class:`KeyMask`.

    Group ids are per original token position; on a layer holding only some tokens (a key map) they are gathered
    through the key map. A window counts key slots, which after pruning are no longer positions: refused.
    """
    if not isinstance(attention_mask, KeyMask):
        return {}
    rules: dict[str, Any] = {}
    groups = attention_mask.group_ids
    if keymap is not None:
        if attention_mask.window is not None:
            raise NotImplementedError(
                f"layer {layer} is a sliding-window layer (window {attention_mask.window}) and its cache holds pruned "
                "tokens: the kernel's window counts key slots, not token positions (docs/masks.md), so pruning "
                "cannot reach sliding-window layers"
            )
        if groups is not None:
            idx = keymap.clamp(min=0).clamp(max=groups.shape[1] - 1)
            groups = torch.where(keymap >= 0, groups.gather(1, idx.to(groups.device)), 0)
    elif groups is not None:
        groups = groups[:, :sk]
    if attention_mask.window is not None:
        rules["window"] = attention_mask.window
    if groups is not None:
        rules["group_ids"] = groups
    return rules


def _check_kwargs(module: torch.nn.Module, attention_mask: Any, kwargs: dict[str, Any]) -> None:
    """Refuse what the kernel cannot compute (softcapping, sinks, packed sequences), and a sliding-window layer
    whose mask does not carry its window."""
    where = f"{type(module).__name__} layer {getattr(module, 'layer_idx', '?')}"
    for name, what in _UNSUPPORTED_KWARGS.items():
        if kwargs.get(name) is not None:
            raise NotImplementedError(
                f"flowkern attention does not support {what} (`{name}` was set by {where}): the kernel's softmax has "
                "no such term"
            )
    window = kwargs.get("sliding_window")
    if window is not None and (not isinstance(attention_mask, KeyMask) or attention_mask.window != window):
        raise NotImplementedError(
            f"{where} is a sliding-window layer (sliding_window={window}) but its mask carries no such window: "
            "flowkern takes the window from the mask transformers builds for the layer type (flowkern_attention_mask)"
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
        module: the calling attention module; may carry a :class:`LayerState` in :data:`STATE_ATTR`.
        query: ``[B, Hq, Sq, D]``.
        key, value: ``[B, Hkv, Sk, D]`` with ``Hq % Hkv == 0`` (never expanded).
        attention_mask: the 2D bool key padding mask ``[B, Sk']`` from :func:`flowkern_attention_mask` (or None).
            ``Sk' < Sk`` happens with a static cache: only the first ``Sk'`` keys exist and are used. Ignored when
            the layer state carries a key map (its own mask applies).
        dropout: attention dropout probability (0 in eval); when > 0 the output comes from SDPA.
        scaling: softmax scale (default ``D ** -0.5``).
        is_causal: overrides ``module.is_causal`` (default True). Causal is bottom-right aligned.

    Returns:
        ``(attn_output [B, Sq, Hq, D], None)``: no attention weights (use :func:`flowkern.trace` instead).

    Raises:
        NotImplementedError: for a sliding window, softcapping, sinks or packed sequences.
        ValueError: for a mask this function cannot interpret.
        RuntimeError: the keys do not match the layer's key map or key labels (a cache changed behind flowkern's
            back).
    """
    if kwargs:
        _check_kwargs(module, attention_mask, kwargs)
    state: LayerState | None = getattr(module, STATE_ATTR, None)
    B = query.shape[0]
    keymap = None if state is None else state.keymap
    if keymap is not None:
        if keymap.shape[0] != B or keymap.shape[1] != key.shape[2]:
            raise RuntimeError(
                f"layer {getattr(module, 'layer_idx', '?')}: its key map covers {tuple(keymap.shape)} tokens but the "
                f"attention got [B={B}, Sk={key.shape[2]}] keys: the KV cache was changed behind flowkern's back "
                "(cropped, or reused outside the flowkern.prune context that compacted it)"
            )
        kpm = state.key_padding
    else:
        kpm, n_keys = _key_padding_mask(attention_mask, key.shape[2])
        if n_keys < key.shape[2]:  # static cache: the slots past the mask are unwritten
            key, value = key[:, :, :n_keys], value[:, :, :n_keys]
    rules = _layer_rules(attention_mask, state, keymap, key.shape[2], getattr(module, "layer_idx", "?"))
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
    dropout = float(dropout or 0.0)
    needs_grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
    allowed = None if state is None else state.allowed
    if state is None or (not state.observe and allowed is None):
        if needs_grad or dropout > 0.0:
            out = _sdpa_output(query, key, value, kpm, causal, scale, dropout, rules)
        else:
            out = _fast_output(query, key, value, kpm, causal, scale, rules)
        return out.transpose(1, 2).contiguous(), None

    sk = key.shape[2]
    segments = state.key_ids
    if segments is not None and keymap is None and "window" in rules and segments.shape[1] > sk:
        # a sliding-window cache layer keeps the most recent keys only: label those, and say which they are
        first = segments.shape[1] - sk
        segments = segments[:, first:]
        keymap = torch.arange(first, first + sk, device=segments.device).expand(B, sk)
    if segments is None:
        segments = torch.zeros(B, sk, dtype=torch.int32, device=query.device)
    elif segments.shape[0] != B or segments.shape[1] != sk:
        raise RuntimeError(
            f"layer {state.layer}: attention got [B={B}, Sk={sk}] keys but the trace labelled "
            f"{list(segments.shape)} tokens (was the model called outside the traced module, or does it change the "
            "sequence length?)"
        )
    nseg = state.num_segments
    if allowed is not None and (needs_grad or dropout > 0.0):
        raise NotImplementedError(
            f"layer {state.layer}: flowkern.knockout cuts edges inside flowkern's forward-only kernel; run it under "
            "torch.no_grad() and in eval mode (no autograd, no attention dropout)"
        )
    # the kernel computes every head's mass anyway: per_head only skips its head mean
    per_head = state.per_head
    if needs_grad or dropout > 0.0:
        out = _sdpa_output(query, key, value, kpm, causal, scale, dropout, rules)
        with torch.no_grad():
            q_obs, k_obs = query.detach()[:, :, 0 if state.rows or state.key_rows is not None else -1:], key.detach()
            _, lse_obs, mass = ops.segment_attention(
                q_obs, k_obs, value.detach(), segments, nseg, causal=causal, key_padding_mask=kpm, scale=scale,
                validate=False, per_head=per_head, **rules,
            )
            q_all, lse_all = q_obs, lse_obs
    else:
        out, lse, mass = ops.segment_attention(
            query, key, value, segments, nseg, causal=causal, key_padding_mask=kpm, scale=scale, validate=False,
            allowed=allowed, per_head=per_head, **rules,
        )
        q_all, k_obs, lse_all = query, key, lse
    if not state.observe:
        return out.transpose(1, 2).contiguous(), None
    with torch.no_grad():
        # the rows' own segments and table: the rules that produced their lse
        vis = dict(causal=causal, key_padding_mask=kpm, scale=scale, **rules) | ({} if allowed is None else dict(
            segment_ids=segments, num_segments=nseg, allowed=allowed, validate=False))
        key_mass = ops.key_attention_mass(q_all[:, :, -1:], k_obs, lse_all[:, :, -1:], **vis) if state.key_mass \
            else None
        chosen = None if state.key_rows is None else chosen_key_mass(q_all, k_obs, lse_all, state.key_rows, keymap,
                                                                     **vis)
        if state.sink is not None:
            head_mass = mass[:, :, -1] if per_head else None
            mass = mass.mean(dim=1) if per_head else mass  # [B, Sq, nseg]
            state.sink(RowEvent(state.layer, mass[:, -1], key_mass, keymap, head_mass,
                                mass if state.rows else None, chosen))
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
    """Mask function for ``AttentionMaskInterface``: the 2D key padding mask, or a :class:`KeyMask`; never a 4D mask.

    Args:
        batch_size, q_length, kv_length, q_offset, kv_offset: as in ``transformers.masking_utils.sdpa_mask``.
        mask_function: the mask pattern, translated by :func:`flowkern.hf.compat.mask_rules` (causal, a sliding
            window, bidirectional image / prefix blocks).
        attention_mask: bool ``[B, past + q_length]`` padding mask (True = real token) or None.
        kwargs: what transformers passes besides (``config``, ``local_size`` for sliding-window layers, ...).

    Returns:
        plain causal: bool ``[B, Sk']`` (True = real key; ``Sk' = kv_length`` unless a static cache holds fewer real
        slots), or None when no key is padded; a window or image blocks: a :class:`KeyMask`.

    Raises:
        NotImplementedError: a pattern the kernel cannot compute (chunked, packed, bidirectional text, an unknown
            overlay; an image block at least as long as a sliding window that cuts it), naming the layer type.
    """
    config = kwargs.get("config")
    kind = "sliding-window" if kwargs.get("local_size") is not None else "full-attention"
    where = f"{getattr(config, 'model_type', 'model')} {kind} layers"
    try:
        rules = compat.MaskRules() if mask_function is None else compat.mask_rules(mask_function)
    except NotImplementedError as exc:
        raise NotImplementedError(f"{where}: {exc}") from None
    if rules.window is not None:  # a window overlay passed as a mask function (Gemma 4's image masks)
        where = f"{getattr(config, 'model_type', 'model')} sliding-window layers"
    padding = None
    if attention_mask is not None:
        mask = attention_mask.to(torch.bool)[:, kv_offset : kv_offset + kv_length]
        padding = None if mask.shape[-1] == kv_length and bool(mask.all()) else mask
    groups = None
    if rules.block_ids is not None:
        ids = rules.block_ids[:, kv_offset : kv_offset + kv_length]
        if bool((ids >= 0).any()):
            groups = torch.where(ids >= 0, ids + 1, 0).to(torch.int32)
            if rules.windowed_blocks and rules.window is not None:
                compat.check_blocks_fit(groups, rules.window, where)
    # a model that slices its masks' query rows (KV-shared layers) needs a KeyMask, which survives mask[:, :, -n:, :]
    if rules.window is None and groups is None and (padding is None or not compat.slices_query_rows(config)):
        return padding
    device = attention_mask.device if attention_mask is not None else kwargs.get("device", "cpu")
    return KeyMask.make(padding, rules.window, groups, batch_size, kv_length, torch.device(device))


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
# switching a model's language model to "flowkern" and back (used by flowkern.hf.session)


def language_attention_modules(model: torch.nn.Module, text_config: Any) -> list[torch.nn.Module]:
    """The language model's attention modules (those whose ``config`` is ``text_config`` and that have a
    ``layer_idx``), in module order."""
    return [m for m in model.modules() if getattr(m, "config", None) is text_config and hasattr(m, "layer_idx")]


def switch_attention(model: torch.nn.Module, text_config_key: str, text_config: Any, name: str) -> None:
    """Switch the language model (only) to the attention implementation ``name`` (``"flowkern"`` is registered
    first); vision towers keep theirs.

    Raises:
        RuntimeError: the model refused the implementation (its language model stays as it was).
    """
    if name == ATTENTION_NAME:
        register()
    current = compat.attn_implementation(text_config)
    if current == name:
        return
    try:
        model.set_attn_implementation({text_config_key: name})
    except ValueError as exc:
        raise RuntimeError(f"{type(model).__name__} refused attn_implementation={name!r} for its language model "
                           f"({exc})") from exc
    if compat.attn_implementation(text_config) != name:
        raise RuntimeError(
            f"{type(model).__name__} refused attn_implementation={name!r} for its language model "
            f"(it stays {compat.attn_implementation(text_config)!r})"
        )


def restore_attention(model: torch.nn.Module, text_config_key: str, text_config: Any, prev: str | None) -> None:
    """Give the language model back the implementation ``prev`` it had before :func:`switch_attention` (set
    directly when transformers refuses the name, so that the model is left exactly as it was found)."""
    compat.set_text_attn_implementation(model, text_config_key, text_config, prev)
