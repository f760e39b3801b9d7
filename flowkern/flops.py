"""Estimated floating-point operations of a decoder-only language model answering one prompt, from its config: the
cost model of ``flowkern compare``, where pruning changes how many tokens each decoder layer holds.

One multiply-add counts 2 FLOPs. With hidden size ``D``, MLP size ``I``, ``H`` query heads and ``G`` key/value
heads of size ``d``, ``N`` decoder layers and a vocabulary of ``V``:

- **linear**, per token per layer: ``c = 2 (D*H*d + 2*D*G*d + H*d*D + 3*D*I)`` (the q, k, v and o projections, and
  a gated MLP's gate, up and down projections; ``2*D*I`` with a plain two-matrix MLP);
- **attention**, per query: ``4*H*d`` per key it reads (``q k^T`` and ``p v``, every query head; grouped key/value
  heads save memory, not these products);
- **prefill** with ``T_l`` tokens present at layer ``l`` (causal: the ``i``-th present token reads ``i`` keys):
  ``sum_l (c * T_l + 4*H*d * T_l (T_l + 1) / 2) + 2*D*V`` (one row of logits: ``generate`` computes the last
  position's only);
- **decode**, ``n`` new tokens: ``n - 1`` forwards of one token after the prefill (the first new token comes from
  the prefill's logits); step ``j = 1 .. n-1`` reads ``T_l + j`` keys at layer ``l``:
  ``sum_j sum_l (c + 4*H*d (T_l + j)) + 2*D*V (n - 1) = (n-1) (N c + 2 D V) + 4 H d ((n-1) sum_l T_l + N (n-1) n / 2)``.

Not counted: the vision tower and projector (the same for every pruning of a prompt), embeddings, norms, rotary
embeddings, softmax, activations, biases, and the scoring of a pruning method itself. Removed tokens count as
absent from their layer on (real removal); mixture-of-experts layers are not modelled (a dense MLP of size ``I``).
``tests/analysis/test_flops.py`` checks the closed forms against a count of every product, token by token.

.. code-block:: python

    from flowkern.flops import DecoderShape, answer_flops

    shape = DecoderShape.from_config(model.config)           # a VLM config, or its language model's
    answer_flops(shape, [640] * 2 + [352] * 30, new_tokens=8)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["DecoderShape", "prefill_flops", "decode_flops", "answer_flops"]


@dataclass(frozen=True)
class DecoderShape:
    """The sizes of a decoder-only language model that set its FLOPs.

    Attributes:
        hidden, intermediate: ``D``, ``I``. heads, kv_heads, head_dim: ``H``, ``G``, ``d``. layers: ``N``.
        vocab: ``V``. gated_mlp: three MLP matrices (gate, up, down: Llama, Qwen, Gemma, Mistral) or two.
    """

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    vocab: int
    gated_mlp: bool = True

    def __post_init__(self) -> None:
        for name in ("hidden", "intermediate", "heads", "kv_heads", "head_dim", "layers", "vocab"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")

    @classmethod
    def from_config(cls, config: Any) -> DecoderShape:
        """The shape of the language model of a Hugging Face config: a VLM's (its language model's sub-config, as
        :mod:`flowkern.hf.models` names it), or a language model's own.

        Raises:
            ValueError: a config without ``hidden_size``, ``num_attention_heads``, ``num_hidden_layers``,
                ``intermediate_size`` or ``vocab_size``.
        """
        text = _text_config(config)

        def get(name: str, default: Any = None) -> Any:
            value = getattr(text, name, None)
            if value is None:
                value = default
            if value is None:
                raise ValueError(f"config: the language model's config has no {name}")
            return int(value)

        heads = get("num_attention_heads")
        hidden = get("hidden_size")
        vocab = getattr(text, "vocab_size", None) or getattr(config, "vocab_size", None)
        return cls(hidden=hidden, intermediate=get("intermediate_size"), heads=heads,
                   kv_heads=get("num_key_value_heads", heads), head_dim=get("head_dim", hidden // heads),
                   layers=get("num_hidden_layers"), vocab=get("vocab_size", vocab))

    @property
    def linear_per_token(self) -> int:
        """``c``: FLOPs of one token's projections and MLP in one layer."""
        D, M, H, G, d = self.hidden, self.intermediate, self.heads, self.kv_heads, self.head_dim
        return 2 * (D * H * d + 2 * D * G * d + H * d * D + (3 if self.gated_mlp else 2) * D * M)

    @property
    def attention_per_key(self) -> int:
        """FLOPs of one query reading one key (``q k^T`` and ``p v`` over every query head): ``4 H d``."""
        return 4 * self.heads * self.head_dim

    @property
    def head(self) -> int:
        """FLOPs of one row of logits: ``2 D V``."""
        return 2 * self.hidden * self.vocab


def _text_config(config: Any) -> Any:
    """The language model's sub-config of a VLM config (the family adapter's ``text_config_key``, else
    ``text_config``), or ``config`` itself."""
    from flowkern.hf.models import ADAPTERS

    model_type = getattr(config, "model_type", None)
    for adapter in ADAPTERS.values():
        if model_type in adapter.model_types:
            sub = getattr(config, adapter.text_config_key, None)
            if sub is not None:
                return sub
    return getattr(config, "text_config", None) or config


def _check_tokens(shape: DecoderShape, tokens_per_layer: Sequence[int]) -> list[int]:
    tokens = [int(t) for t in tokens_per_layer]
    if len(tokens) != shape.layers:
        raise ValueError(f"tokens_per_layer must give one count per decoder layer ({shape.layers}), got {len(tokens)}")
    if any(t < 0 for t in tokens):
        raise ValueError(f"tokens_per_layer must be counts >= 0, got {tokens}")
    return tokens


def prefill_flops(shape: DecoderShape, tokens_per_layer: Sequence[int]) -> int:
    """FLOPs of the prefill: ``sum_l (c T_l + 4 H d T_l (T_l + 1) / 2) + 2 D V`` (see the module docstring).

    Args:
        shape: the language model's :class:`DecoderShape`.
        tokens_per_layer: ``N`` counts, ``T_l``: the prompt tokens present at decoder layer ``l``.

    Raises:
        ValueError: not one count >= 0 per layer.
    """
    tokens = _check_tokens(shape, tokens_per_layer)
    return sum(shape.linear_per_token * t + shape.attention_per_key * t * (t + 1) // 2 for t in tokens) + shape.head


def decode_flops(shape: DecoderShape, tokens_per_layer: Sequence[int], steps: int) -> int:
    """FLOPs of ``steps`` decode forwards of one token each after a prefill that left ``T_l`` tokens in layer
    ``l``'s cache: step ``j`` reads ``T_l + j`` keys there (see the module docstring).

    Raises:
        ValueError: not one count >= 0 per layer, or ``steps < 0``.
    """
    tokens = _check_tokens(shape, tokens_per_layer)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    keys = steps * sum(tokens) + shape.layers * steps * (steps + 1) // 2
    return steps * (shape.layers * shape.linear_per_token + shape.head) + shape.attention_per_key * keys


def answer_flops(shape: DecoderShape, tokens_per_layer: Sequence[int], new_tokens: int) -> int:
    """FLOPs of answering one prompt with ``new_tokens`` generated tokens: the prefill and ``new_tokens - 1``
    decode forwards (:func:`prefill_flops` + :func:`decode_flops`).

    Raises:
        ValueError: bad counts, or ``new_tokens < 0``.
    """
    if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or new_tokens < 0:
        raise ValueError(f"new_tokens must be an int >= 0, got {new_tokens!r}")
    return prefill_flops(shape, tokens_per_layer) + decode_flops(shape, tokens_per_layer, max(new_tokens - 1, 0))
