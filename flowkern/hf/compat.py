"""The one place that knows transformers' version-dependent internals (docs/architecture.md).

Everything flowkern reads or writes that is not a stable public API of transformers goes through this module: the
keyword a forward call carries its KV cache under, the cache's length and per-layer layout, the shape masks arrive
in, the pre-encoded image features of ``generate``, the attention-implementation attribute, and the names of the
per-token decoder-layer inputs that pruning must gather. No other flowkern file reads these by name; a new
transformers release that moves one of them is mended here, and :data:`TESTED_TRANSFORMERS` says which releases
were tested (``flowkern info`` warns outside that range).

What changed in which release (transformers 5.x, as far as flowkern is concerned):

========  ======================================================================================================
release   change, and how this module handles it
========  ======================================================================================================
5.17      oldest supported. The cache reaches ``forward`` (model, language model, decoder layer, attention) as
          ``past_key_values=``; outputs carry ``.past_key_values``. ``cache_position`` is no longer passed to the
          decoder layers of any supported family (only remote-code models still get one from ``generate``), so
          pruning has no cache positions to rewrite: layers compute positions from ``position_ids`` / the cache.
          ``generate`` passes ``pixel_values`` / ``image_sizes`` / ``image_grid_thw`` to the prefill forward.
          Beam search expands a multi-image sample's ``pixel_values`` per image instead of per sample, so the
          beams of a two-image LLaVA sample see different images (a transformers bug, correct in 5.24; flowkern
          cannot mend it).
5.18      ``DynamicLayer.crop`` with a positive length and the ``device`` argument of rotary embeddings are gone
          (flowkern uses neither).
5.20      ``generate`` may encode the images *before* the first forward and pass the features as
          ``mm_encoder_outputs={modality: output}`` instead of pixels; the token count per image then comes from
          each output's ``pooler_output`` list (:func:`encoder_token_counts`).
5.23      ``generate`` no longer passes ``image_sizes`` on to the forward when the images were pre-encoded, so
          LLaVA-NeXT / OneVision crop layouts need the processor outputs (``flowkern.trace(image_inputs=...)``).
5.24      the cache keyword is renamed ``cache=`` everywhere (``past_key_values=`` is still accepted by the
          decorated ``forward`` methods with a deprecation warning, but forward hooks see the new name), outputs
          carry ``.cache`` (``.past_key_values`` is a deprecated alias), ``Cache.update`` takes ``kwargs=``,
          ``DynamicLayer.reset`` drops its tensors. :func:`call_cache` reads either keyword, :data:`CACHE_KWARG`
          is the name to pass, :func:`output_cache` reads either attribute.
5.25      ``from_pretrained`` defaults to ``use_kernels=True``: it swaps hub kernels (the ``kernels`` package) into
          the model's layers, and raises ``ValueError("Kernels are not available ...")`` when that package is not
          installed. Every load flowkern makes passes :func:`pretrained_kwargs` (``use_kernels=False``, accepted
          since 5.17), so the modules flowkern hooks and differentiates through (CAM) stay plain torch. The
          modeling files of every supported family are unchanged.
========  ======================================================================================================

Unchanged across 5.17-5.25 and relied on: the ``AttentionInterface`` / ``AttentionMaskInterface`` registries and
the mask function's signature ``(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function,
attention_mask, **kwargs)``; ``DynamicCache.layers[i].keys / .values / .is_initialized`` as ``[B, H, S, D]``
tensors; ``get_seq_length()`` reading layer 0; masks precomputed by ``generate`` as a dict keyed by layer type
(``"full_attention"``); ``set_attn_implementation({"text_config": name})``.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "TRANSFORMERS_VERSION",
    "TESTED_TRANSFORMERS",
    "CACHE_KWARG",
    "LAYER_POSITION_INPUTS",
    "version_report",
    "untested_message",
    "pretrained_kwargs",
    "warn_if_untested",
    "call_cache",
    "cache_kwargs",
    "output_cache",
    "cache_length",
    "check_dynamic_cache",
    "cache_num_layers",
    "layer_kv",
    "set_layer_kv",
    "padding_mask_2d",
    "kv_shared_layers",
    "slices_query_rows",
    "LAYER_TYPES",
    "MaskRules",
    "mask_rules",
    "check_blocks_fit",
    "encoder_token_counts",
    "name_special_tokens",
    "is_known_layer_input",
    "layer_hidden_states",
    "layer_output_hidden",
    "layer_output",
    "attn_implementation",
    "set_text_attn_implementation",
    "accepts_logits_to_keep",
    "image_encoder",
]


def _parse(version: str) -> tuple[int, int]:
    parts = version.split(".")
    return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)


def _installed_version() -> str:
    import transformers

    return str(transformers.__version__)


TRANSFORMERS_VERSION: str = _installed_version()
"""The installed transformers version string."""

TESTED_TRANSFORMERS: tuple[str, str] = ("5.17", "5.25")
"""Oldest and newest minor releases the test suite runs on (CI tests both ends); pyproject admits exactly these."""

_MINOR = _parse(TRANSFORMERS_VERSION)

CACHE_KWARG: str = "cache" if _MINOR >= (5, 24) else "past_key_values"
"""Keyword under which this transformers version passes (and accepts) the KV cache in ``forward`` calls."""

_CACHE_KWARGS = ("cache", "past_key_values")

LAYER_POSITION_INPUTS: tuple[str, ...] = ("position_ids", "text_position_ids")
"""Per-token position inputs of a decoder layer (``[..., B, S]``), gathered when tokens are pruned."""

_KNOWN_LAYER_INPUTS = frozenset(
    {"hidden_states", "attention_mask", "use_cache", "position_embeddings", *_CACHE_KWARGS, *LAYER_POSITION_INPUTS}
)


def version_report() -> tuple[str, bool]:
    """``(version, tested)``: the installed transformers version and whether its minor release is in
    :data:`TESTED_TRANSFORMERS`."""
    lo, hi = (_parse(v) for v in TESTED_TRANSFORMERS)
    return TRANSFORMERS_VERSION, lo <= _MINOR <= hi


def untested_message() -> str | None:
    """What to tell a user whose transformers is outside :data:`TESTED_TRANSFORMERS` (None inside it)."""
    version, tested = version_report()
    if tested:
        return None
    lo, hi = TESTED_TRANSFORMERS
    return (
        f"transformers {version} is outside the range flowkern was tested with ({lo} to {hi}.x); trace, prune and "
        f"cam may fail or be wrong. Install a tested release: pip install 'transformers>={lo},<{_next_minor(hi)}'"
    )


def warn_if_untested() -> str | None:
    """Warn (``UserWarning``) when the installed transformers is outside the tested range; returns the message."""
    msg = untested_message()
    if msg is not None:
        warnings.warn(msg, UserWarning, stacklevel=2)
    return msg


def _next_minor(version: str) -> str:
    major, minor = _parse(version)
    return f"{major}.{minor + 1}"


# ----------------------------------------------------------------------------------------------------------
# the KV cache


def pretrained_kwargs() -> dict[str, Any]:
    """Keywords every ``from_pretrained`` call of flowkern passes: no hub kernels swapped into the layers.

    From 5.25, ``from_pretrained`` replaces layers with hub kernels by default (and fails without the ``kernels``
    package); flowkern hooks those layers and differentiates through them, so it keeps transformers' own torch
    modules. ``use_kernels`` is accepted (default False) by every release flowkern supports.
    """
    return {"use_kernels": False}


def call_cache(kwargs: dict) -> Any:
    """The KV cache a forward call (model, language model or decoder layer) received, or None."""
    for name in _CACHE_KWARGS:
        cache = kwargs.get(name)
        if cache is not None:
            return cache
    return None


def cache_kwargs(cache: Any) -> dict[str, Any]:
    """``{CACHE_KWARG: cache}``: to pass a cache to ``forward`` / ``generate`` under this version's keyword."""
    return {CACHE_KWARG: cache}


def output_cache(output: Any) -> Any:
    """The cache a model output or ``generate`` output carries (``.cache`` from 5.24, ``.past_key_values`` before)."""
    for name in _CACHE_KWARGS:  # the new name first: reading the old one on 5.24+ warns
        value = getattr(output, name, None)
        if value is not None:
            return value
    return None


def cache_length(cache: Any) -> int:
    """Tokens a cache holds (``get_seq_length()``, read from layer 0); 0 for None.

    Raises:
        NotImplementedError: not a transformers ``Cache`` (legacy tuple caches are not supported).
    """
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    raise NotImplementedError(f"flowkern needs a transformers Cache object, got {type(cache).__name__}")


def _is_linear_layer(layer: Any) -> bool:
    """A linear-attention (recurrent) cache layer: conv / recurrent states instead of keys and values."""
    return hasattr(layer, "recurrent_states") or hasattr(layer, "conv_states")


def check_dynamic_cache(cache: Any, owner: str = "flowkern.prune", compacts: bool = True) -> None:
    """Accept None or a ``DynamicCache`` of plain full-attention ``DynamicLayer`` s (not offloaded), plus linear
    attention layers when nothing is to be compacted (``compacts=False``: pruning at the prefill, where those layers
    run on the narrowed sequence from the start).

    Raises:
        NotImplementedError: any other cache (static, offloaded, quantized, sliding-window layers; linear-attention
            layers of a cache to compact).
    """
    from transformers.cache_utils import DynamicCache, DynamicLayer

    if cache is None:
        return
    offloaded = bool(getattr(cache, "offloading", False))
    if not isinstance(cache, DynamicCache) or offloaded:
        kind = type(cache).__name__ + (" (offloaded)" if offloaded else "")
        raise NotImplementedError(
            f"{owner} supports transformers' DynamicCache (the generate default) only, got {kind}; a static, "
            "offloaded or quantized cache cannot hold a different number of tokens per layer"
        )
    linear = [_is_linear_layer(layer) for layer in cache.layers]
    bad = sorted({type(layer).__name__ for layer, lin in zip(cache.layers, linear, strict=True)
                  if type(layer) is not DynamicLayer and not lin})
    if any(getattr(cache, "is_sliding", ())) or any("Sliding" in name for name in bad):
        raise NotImplementedError(
            f"{owner}: this model has sliding-window layers; their cache keeps the most recent keys by slot and "
            "the kernel's window counts key slots, not token positions (docs/masks.md), so compacting them would "
            "change which tokens the window covers: pruning is not supported for sliding-window models"
        )
    if any(linear) and compacts:
        raise NotImplementedError(
            f"{owner}: this model has linear-attention layers; their recurrent state has absorbed every token and "
            "cannot give one back, so a filled cache cannot be compacted (prune at the prefill: when='prefill')"
        )
    if bad:
        raise NotImplementedError(f"{owner}: cache layers of type {bad} are not supported")


def cache_num_layers(cache: Any) -> int:
    """Number of decoder layers a (dynamic) cache has slots for."""
    return len(cache.layers)


def layer_kv(cache: Any, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(keys, values)`` ``[B, Hkv, S, D]`` stored for one layer, or None when that layer holds nothing yet.

    Raises:
        NotImplementedError: a linear-attention layer (a recurrent state, no keys to take tokens out of).
    """
    entry = cache.layers[layer]
    if _is_linear_layer(entry):
        raise NotImplementedError(
            f"cache layer {layer} is a linear-attention layer: its recurrent state has absorbed every token and "
            "cannot give one back"
        )
    if not getattr(entry, "is_initialized", False) or entry.keys is None or entry.keys.numel() == 0:
        return None
    return entry.keys, entry.values


def set_layer_kv(cache: Any, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Replace the stored keys and values of one layer (e.g. by narrowed views after compaction)."""
    entry = cache.layers[layer]
    entry.keys, entry.values = keys, values


def append_layer_kv(cache: Any, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Append keys and values ``[B, Hkv, S, D]`` to one layer of a cache, as that layer's attention would
    (``Cache.update``; an empty layer is initialised by it)."""
    cache.update(keys, values, layer)


# ----------------------------------------------------------------------------------------------------------
# masks, pre-encoded images, layer inputs


LAYER_TYPES: dict[str, str] = {"full": "full_attention", "sliding": "sliding_attention",
                               "linear": "linear_attention"}
"""The ``config.layer_types`` entries flowkern reads: softmax attention over every key, over a sliding window, and
linear attention (a recurrent state: no softmax to measure)."""


@dataclass(frozen=True)
class MaskRules:
    """What a transformers mask pattern asks of flowkern's kernel (docs/masks.md), translated by :func:`mask_rules`.

    Attributes:
        window: sliding window in key positions (a row sees keys fewer than ``window`` behind it), or None.
        block_ids: transformers' ``block_sequence_ids`` ``[B, kv_offset + kv_length']`` (-1 = no block; tokens of
            one block see each other bidirectionally), or None.
        windowed_blocks: the block rule is cut by the window too (``AND(window, OR(causal, block))``); the kernel's
            groups are not, so the two agree only while no block is ``window`` or more tokens long
            (:func:`mask_rules` checks).
    """

    window: int | None = None
    block_ids: torch.Tensor | None = None
    windowed_blocks: bool = False


def _closure(fn: Any) -> dict[str, Any]:
    cells = getattr(fn, "__closure__", None) or ()
    return {name: cell.cell_contents for name, cell in zip(fn.__code__.co_freevars, cells, strict=True)}


def _mask_terms(fn: Any) -> list[frozenset]:
    """The mask pattern ``fn`` (transformers' ``and_masks`` / ``or_masks`` tree of overlays) as a disjunction of
    conjunctions of atoms ``("causal",)``, ``("window", w)``, ``("block", block_sequence_ids)``.

    Raises:
        NotImplementedError: a pattern piece flowkern's kernel cannot express, named with the reason.
    """
    from transformers import masking_utils as mu

    if fn is mu.causal_mask_function:
        return [frozenset({("causal",)})]
    name = getattr(fn, "__qualname__", type(fn).__name__)
    free = _closure(fn) if hasattr(fn, "__code__") else {}
    if name.startswith(("and_masks.", "or_masks.")):
        parts = [_mask_terms(f) for f in free["mask_functions"]]
        if name.startswith("or_masks."):
            return [t for p in parts for t in p]
        terms = [frozenset()]
        for p in parts:
            terms = [a | b for a in terms for b in p]
        return terms
    if name.startswith("sliding_window_overlay.") and isinstance(free.get("sliding_window"), int):
        return [frozenset({("window", int(free["sliding_window"]))})]
    if name.startswith("blockwise_overlay.") and isinstance(free.get("block_sequence_ids"), torch.Tensor):
        return [frozenset({("block", free["block_sequence_ids"])})]  # a tensor hashes by identity
    reasons = {
        "chunked_overlay.": "chunked attention (keys limited to the row's chunk, which the kernel has no rule for)",
        "packed_sequence_mask_function.": "packed sequences (several sequences in one row)",
        "remap_positions_for_packed_sequence.": "packed sequences (several sequences in one row)",
        "sliding_window_bidirectional_overlay.": "bidirectional sliding windows (keys ahead of the row limited too)",
        "bidirectional_mask_function": "bidirectional (non-causal) text attention",
        "padding_mask_function.": "a padding mask inside the pattern (pass the 2D attention_mask instead)",
    }
    why = next((r for prefix, r in reasons.items() if name.startswith(prefix)), None)
    if why is None:
        why = "a model-specific overlay the kernel's causal / window / image-block rules do not express"
    raise NotImplementedError(f"flowkern attention cannot compute the mask pattern `{name}`: {why}")


def mask_rules(mask_function: Any) -> MaskRules:
    """Translate a transformers mask pattern into the kernel's visibility rules (docs/masks.md).

    Accepted: causal (``causal_mask_function``), ANDed with a ``sliding_window_overlay`` (sliding-window layers),
    ORed with a ``blockwise_overlay`` (bidirectional image / prefix blocks: Gemma 3, PaliGemma), the window either
    outside the block rule or inside it (``AND(window, OR(causal, block))``, Gemma 3's sliding layers). Anything
    else raises.

    Raises:
        NotImplementedError: a pattern piece the kernel has no rule for (chunked attention, packed sequences,
            bidirectional text, an unknown overlay), naming it and why.
    """
    terms = set(_mask_terms(mask_function))
    stream = [t for t in terms if ("causal",) in t]
    blocks = [t for t in terms if ("causal",) not in t]
    windows = {a[1] for t in terms for a in t if a[0] == "window"}
    window = next(iter(windows), None)
    ok = len(stream) == 1 and len(windows) <= 1 and all(a[0] != "block" for a in stream[0])
    ok = ok and len(blocks) <= 1 and all(sum(a[0] == "block" for a in t) == 1 for t in blocks)
    ok = ok and (not blocks or window is None or ("window", window) in stream[0])
    if not ok:
        shown = " or ".join("(" + " and ".join(sorted(a[0] if a[0] != "window" else f"window {a[1]}" for a in t))
                            + ")" for t in terms)
        raise NotImplementedError(
            f"flowkern attention cannot compute the mask pattern {shown}: the kernel shows a key by (causal and "
            "window) or a shared image block, nothing else"
        )
    if not blocks:
        return MaskRules(window)
    block = next(a[1] for a in blocks[0] if a[0] == "block")
    return MaskRules(window, block, ("window", window) in blocks[0])


def check_blocks_fit(groups: torch.Tensor, window: int, where: str) -> None:
    """Raise NotImplementedError (starting with ``where``) unless every image group of ``groups`` (int ``[B, S]``,
    0 = none) spans at most ``window`` positions: then transformers' ``AND(window, OR(causal, block))`` equals the
    kernel's ``(causal and window) or group``."""
    B, S = groups.shape
    n = int(groups.max()) + 1
    pos = torch.arange(S, device=groups.device).expand(B, S)
    first = torch.full((B, n), S, device=groups.device, dtype=pos.dtype).scatter_reduce(1, groups.long(), pos, "amin")
    last = torch.full((B, n), -1, device=groups.device, dtype=pos.dtype).scatter_reduce(1, groups.long(), pos, "amax")
    span = (last - first + 1)[:, 1:]
    if bool((span > window).any()):
        raise NotImplementedError(
            f"{where}: an image block of {int(span.max())} tokens is longer than the sliding window ({window}); "
            "transformers cuts the block by the window there, the kernel's image groups are not cut"
        )


def padding_mask_2d(mask: Any, owner: str) -> torch.Tensor | None:
    """The 2D padding mask ``[B, S]`` of a forward call's ``attention_mask`` (or None).

    ``generate`` with a static cache precomputes the masks as a dict keyed by layer type; with flowkern's mask
    function each entry is already the 2D key padding mask (or a ``KeyMask`` holding it), and the full-attention
    one is taken.

    Raises:
        ValueError: a 4D (or otherwise shaped) mask, naming ``owner``.
    """
    if isinstance(mask, dict):
        mask = mask.get("full_attention", next(iter(mask.values()), None))
    if hasattr(mask, "group_ids") and hasattr(mask, "padding"):  # flowkern's KeyMask (a window or image blocks)
        mask = mask.padding
    if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dim() != 2):
        raise ValueError(f"{owner} needs a 2D attention_mask [B, S] (or none); a 4D mask is not supported")
    return mask


def kv_shared_layers(config: Any) -> list[int]:
    """The decoder layers of the language model (text ``config``) that reuse an earlier layer's keys / values
    instead of computing their own (Gemma 4's last ``num_kv_shared_layers``); empty for every other family."""
    shared = int(getattr(config, "num_kv_shared_layers", 0) or 0)
    n = int(getattr(config, "num_hidden_layers", 0) or 0)
    return list(range(n - shared, n)) if shared else []


def slices_query_rows(config: Any) -> bool:
    """Whether the language model (text ``config``) may index its masks' query rows: KV-shared layers
    (:func:`kv_shared_layers`) need no keys of their own, so at a prefill with ``logits_to_keep`` (``generate``)
    they compute the last query rows only and slice every layer type's mask ``mask[:, :, -n:, :]``."""
    return bool(kv_shared_layers(config))


def name_special_tokens(tokenizer: Any, named: dict[str, str]) -> None:
    """Expose special tokens of ``tokenizer`` as attributes (``{"boi_token": "<boi>"}``: ``tokenizer.boi_token`` /
    ``boi_token_id``, saved with it), keeping its other special tokens: passed to the constructor as
    ``extra_special_tokens``, such a mapping replaces ``additional_special_tokens`` instead."""
    tokenizer._set_model_specific_special_tokens(dict(named))


def encoder_token_counts(kwargs: dict) -> dict[str, list[int]]:
    """Tokens per image / video of images that ``generate`` encoded before the forward (5.20+:
    ``mm_encoder_outputs``): ``{"image_token_counts": [...], "video_token_counts": [...]}`` for what is present."""
    out: dict[str, list[int]] = {}
    for modality, output in (kwargs.get("mm_encoder_outputs") or {}).items():
        pooled = getattr(output, "pooler_output", None)
        if isinstance(pooled, list | tuple) and all(isinstance(p, torch.Tensor) for p in pooled):
            out[f"{modality}_token_counts"] = [int(p.shape[0]) for p in pooled]
    return out


def is_known_layer_input(name: str) -> bool:
    """Whether ``name`` is a decoder-layer keyword flowkern's pruning knows how to treat (hidden states, masks,
    the cache, rotary embeddings, :data:`LAYER_POSITION_INPUTS`); an unknown per-token input makes pruning refuse."""
    return name in _KNOWN_LAYER_INPUTS


def layer_hidden_states(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states ``[B, S, D]`` a decoder layer's forward received (first positional, or ``hidden_states=``)."""
    return args[0] if args else kwargs["hidden_states"]


def layer_output_hidden(output: Any) -> tuple[torch.Tensor, bool]:
    """``(hidden states [B, S, D], as_tuple)`` of what a decoder layer's forward returned: a tensor, or a tuple whose
    first item is the hidden states (``as_tuple``; :func:`layer_output` builds the same form back)."""
    return (output[0], True) if isinstance(output, tuple) else (output, False)


def layer_output(hidden: torch.Tensor, as_tuple: bool) -> Any:
    """What a decoder layer's forward returns for ``hidden`` ``[B, S, D]``: the tensor, or ``(hidden,)``."""
    return (hidden,) if as_tuple else hidden


# ----------------------------------------------------------------------------------------------------------
# attention implementation, generation details


def attn_implementation(config: Any) -> str | None:
    """The attention implementation a (sub-)config currently selects."""
    return config._attn_implementation


def set_text_attn_implementation(model: torch.nn.Module, config_key: str, config: Any, name: str | None) -> None:
    """Switch the sub-model owning ``config`` (``config_key``, e.g. ``"text_config"``) to implementation ``name``.

    When transformers refuses to switch back (e.g. a name registered by a context that has ended), the config's
    internal attribute is set directly so that the model is left exactly as it was found.
    """
    if name is None or config._attn_implementation == name:
        return
    try:
        model.set_attn_implementation({config_key: name})
    finally:
        if config._attn_implementation != name:
            config._attn_implementation_internal = name


def accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether ``model.forward`` takes ``logits_to_keep`` (compute logits for the last rows only)."""
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def image_encoder(model: torch.nn.Module) -> tuple[torch.nn.Module, str] | None:
    """Where the images are encoded: ``(module, method name)``, the vision tower plus projector as one call.

    ``model.base_model.get_image_features``: ``generate`` calls it before the first forward (5.20+) and the
    multimodal forward calls it when it gets pixels (5.17+), both by attribute lookup on that module, so an instance
    attribute of that name sees every image encoding. None when the model has no such method.
    """
    owner = getattr(model, "base_model", model)
    name = "get_image_features"
    return (owner, name) if callable(getattr(owner, name, None)) else None


def project_qk(attention: torch.nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The queries and keys an attention module makes from its input, *before* any rotary embedding.

    Works for the attention modules of the supported language models (``q_proj`` / ``k_proj``, optional
    ``q_norm`` / ``k_norm`` per head) and of CLIP / SigLIP-style vision towers.

    Args:
        attention: the attention module (e.g. ``layer.self_attn``).
        hidden: ``[B, S, D]`` its input hidden states (after the layer's input norm).

    Returns:
        ``(q [B, Hq, S, Dh], k [B, Hkv, S, Dh], scale)``: ``scale`` is the module's softmax scale.

    Raises:
        NotImplementedError: a module without ``q_proj`` / ``k_proj`` / ``head_dim``.
    """
    q_proj, k_proj = getattr(attention, "q_proj", None), getattr(attention, "k_proj", None)
    head_dim = getattr(attention, "head_dim", None)
    if q_proj is None or k_proj is None or not isinstance(head_dim, int):
        raise NotImplementedError(f"{type(attention).__name__}: no q_proj / k_proj / head_dim to project queries and "
                                  "keys with")
    shape = (*hidden.shape[:-1], -1, head_dim)
    q, k = q_proj(hidden).view(shape), k_proj(hidden).view(shape)
    q_norm, k_norm = getattr(attention, "q_norm", None), getattr(attention, "k_norm", None)
    if q_norm is not None:
        q = q_norm(q)
    if k_norm is not None:
        k = k_norm(k)
    scale = getattr(attention, "scaling", None)
    if scale is None:
        scale = getattr(attention, "scale", None)
    return q.transpose(1, 2), k.transpose(1, 2), float(scale if scale is not None else head_dim ** -0.5)



def default_position_ids(past: int, n: int, device: torch.device) -> torch.Tensor:
    """long ``[1, n]``: positions a language model gives ``n`` new tokens after ``past`` when a call passes none."""
    return (torch.arange(n, device=device) + past)[None]
