"""``flowkern.knockout``: attention knockout, cutting segment -> segment edges in a window of decoder layers.

.. code-block:: python

    with torch.no_grad(), flowkern.knockout(model, block=[("image", "last")], layers=range(4, 8)):
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False)

**What it computes.** Every token has one segment: the labels of :mod:`flowkern.hf.segments` (``system``,
``image``, ``user``, ``generated``) plus ``last``, the last prompt position of each row (the row whose logits give
the first answer token; in a left-padded batch the last column, in any batch the last real prompt token). An edge
``(src, dst)`` is cut at a layer when, in that layer's attention, **the queries of segment ``dst`` can no longer
read the keys of segment ``src``**: ``("image", "last")`` hides every image token from the last prompt position,
``("image", "user")`` hides the image from the question's tokens, ``("last", "last")`` hides the last position from
itself. Every other query and key of the layer is unchanged; the softmax renormalises over the keys still visible
(a row that would see no key gets output 0). Decode steps are queries of segment ``generated`` reading the cache, so
``("image", "generated")`` hides the image from every decoded token; a cut never touches the KV cache itself.
The cuts apply to the listed ``layers`` (0-based decoder layers; default all) of every forward inside the block,
prefill and decode. This is the dense-mask knockout of "Cross-modal Information Flow in Multimodal Large Language
Models" (CVPR 2025), computed inside the fused kernel (the ``allowed`` segment table of
:func:`flowkern.segment_attention`): no ``S x S`` mask, KV cache and batches as usual.

**How.** A :class:`Knockout` is a listener on the model's session (:mod:`flowkern.hf.session`): the language model
runs the ``"flowkern"`` attention while it is attached. At each forward it labels the tokens the call adds (the
prompt at prefill, ``generated`` after) and asks the session to cut (:meth:`flowkern.hf.calls.Call.block`): the
session gives the last prompt token its own segment id in the key ids it pushes down and hands each listed layer its
table. The calls it cuts take flowkern's kernel (never the SDPA fast path); the other layers stay as fast as without.

**Composition.** Inside :func:`flowkern.trace`, the shares are those of the model under knockout, reported in the
trace's four labels (the last position's mass counts in its own label, ``user`` for a prompt ending in text).
Inside :func:`flowkern.prune` the pruned layers' keys carry the segments of the tokens they hold (the session
gathers them through the key maps), so an edge cut at a pruned layer cuts the kept tokens of that segment. Gradients
do not go through a cut (``NotImplementedError`` when autograd needs the attention, e.g. inside
:func:`flowkern.cam`): run under ``torch.no_grad()``.

Limits: left padding (the last prompt position must be real in every row, as for ``generate``); one knockout per
model at a time (put several edges in one ``block``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import torch

from flowkern.listener import Listener

if TYPE_CHECKING:
    from flowkern.hf.calls import Call

__all__ = ["knockout", "Knockout", "KNOCKOUT_SEGMENTS", "CVPR_EDGES", "parse_edge"]

KNOCKOUT_SEGMENTS: tuple[str, ...] = ("system", "image", "user", "generated", "last")
"""Segment names an edge may use: the trace's labels (ids 0-3) plus ``last`` (id 4)."""

CVPR_EDGES: tuple[tuple[str, str], ...] = (("image", "user"), ("image", "last"), ("user", "last"), ("last", "last"))
"""The four edges of the CVPR 2025 knockout study (its "question" is the ``user`` segment here)."""


def parse_edge(edge: str | Sequence[str], argument: str = "block") -> tuple[str, str]:
    """``(src, dst)`` from a pair or from ``"src->dst"``.

    Raises:
        ValueError: not a pair of :data:`KNOCKOUT_SEGMENTS` names (the message names ``argument``).
    """
    pair = tuple(p.strip() for p in edge.split("->")) if isinstance(edge, str) else tuple(edge)
    if len(pair) != 2 or not all(isinstance(p, str) and p in KNOCKOUT_SEGMENTS for p in pair):
        raise ValueError(f"{argument}: edge {edge!r} must be (src, dst) or 'src->dst' with segments from "
                         f"{', '.join(KNOCKOUT_SEGMENTS)}")
    return pair  # type: ignore[return-value]


class Knockout(Listener):
    """Context manager that cuts attention edges in a Hugging Face VLM; create it with :func:`knockout`.

    Attributes:
        block: the cut edges ``(src, dst)``: ``dst`` can no longer read ``src``.
        layers: the decoder layers they are cut at (sorted).
        allowed: bool ``[5, 5]`` the segment table of those layers (row = query segment, column = key segment, in
            :data:`KNOCKOUT_SEGMENTS` order; False = cut).
        forwards: forward calls cut so far.
    """

    owner = "flowkern.knockout"
    exclusive = True
    attention = "flowkern"
    watches_calls = True

    def __init__(self, model: torch.nn.Module, block: Iterable[tuple[str, str] | str],
                 layers: Iterable[int] | None = None) -> None:
        from flowkern.hf.models import get_adapter

        self.model = model
        self.adapter = get_adapter(model)
        num_layers = int(self.adapter.text_config(model.config).num_hidden_layers)
        if isinstance(block, str) or (isinstance(block, tuple) and len(block) == 2 and isinstance(block[0], str)):
            block = [block]  # type: ignore[list-item]
        self.block: tuple[tuple[str, str], ...] = tuple(dict.fromkeys(parse_edge(e) for e in block))
        if not self.block:
            raise ValueError("block: no edge given")
        chosen = range(num_layers) if layers is None else layers
        if isinstance(chosen, int) or not isinstance(chosen, Iterable):
            raise ValueError(f"layers: expected an iterable of decoder layers such as range(4, 8), got {layers!r}")
        self.layers: tuple[int, ...] = tuple(sorted({int(x) for x in chosen}))
        bad = [x for x in self.layers if not 0 <= x < num_layers]
        if bad or not self.layers:
            raise ValueError(f"layers: expected decoder layers in 0..{num_layers - 1}, got {list(chosen)!r}")
        linear = sorted(self.adapter.linear_layers(model.config).intersection(self.layers))
        if linear:  # a recurrent state mixes every token: no edge can be cut there, and leaving it open would mislead
            raise ValueError(f"layers: {linear} are linear-attention layers (a recurrent state, no attention edges to "
                             "cut); pass only the model's attention layers")
        index = {name: i for i, name in enumerate(KNOCKOUT_SEGMENTS)}
        self.allowed = torch.ones(len(KNOCKOUT_SEGMENTS), len(KNOCKOUT_SEGMENTS), dtype=torch.bool)
        for src, dst in self.block:
            self.allowed[index[dst], index[src]] = False
        self.forwards = 0
        self._tables = dict.fromkeys(self.layers, self.allowed)
        self._ids: torch.Tensor | None = None
        self._labels: torch.Tensor | None = None
        self._last: torch.Tensor | None = None

    def on_call(self, call: Call) -> None:
        from flowkern.hf import compat
        from flowkern.hf.attention import ATTENTION_NAME
        from flowkern.hf.segments import NUM_SEGMENTS

        current = compat.attn_implementation(self._session.text_config)
        if current != ATTENTION_NAME:
            raise RuntimeError(f"{self.owner}: the language model runs {current!r} attention (another analysis inside "
                               "the block needs it); cut edges need flowkern's")
        self._label(call)
        if call.labels is None:
            call.labels, call.num_segments = self._labels, NUM_SEGMENTS
        elif call.labels.shape != self._labels.shape or call.num_segments != NUM_SEGMENTS:
            raise RuntimeError(f"{self.owner}: another listener labels this forward's tokens differently")
        call.block(self._tables, self._last)
        self.forwards += 1

    def _label(self, call: Call) -> None:
        """Extend the labels by the call's tokens: a new prompt at prefill (or the same sequence grown, as
        ``generate(use_cache=False)`` feeds it), ``generated`` after."""
        from flowkern.hf.segments import GENERATED, label_prompt

        ids, n_new = call.ids, call.length
        total = 0 if self._labels is None else self._labels.shape[1]
        grown = (call.prefill and self._ids is not None and ids is not None and n_new > total
                 and ids.shape[0] == self._ids.shape[0] and torch.equal(ids[:, :total].to(self._ids.device), self._ids))
        if call.prefill and not grown:
            if ids is None:
                raise ValueError(f"{self.owner} needs input_ids at prefill to label system/image/user tokens")
            mask = call.mask[:, :n_new].bool() if call.mask is not None else torch.ones_like(ids, dtype=torch.bool)
            if not bool(mask[:, -1].all()):
                raise ValueError(f"{self.owner} needs left padding (the last prompt position real in every row): set "
                                 "tokenizer.padding_side = 'left'")
            self._ids = ids.detach().clone()
            self._labels = label_prompt(self._ids, self.adapter.placeholder_token_ids(self.model.config), mask)
            self._last = torch.full((ids.shape[0],), n_new - 1, dtype=torch.long, device=ids.device)
            return
        if not call.prefill and (self._labels is None or call.past != total):
            raise RuntimeError(f"{self.owner}: the KV cache holds {call.past} tokens but the knockout labelled "
                               f"{total}; open the knockout before the prompt's forward")
        added = n_new - total if grown else n_new
        B = self._labels.shape[0]
        new_ids = ids[:, -added:] if ids is not None else torch.full((B, added), -1, dtype=self._ids.dtype)
        self._ids = torch.cat([self._ids, new_ids.to(self._ids.device)], dim=1)
        new = torch.full((B, added), GENERATED, dtype=self._labels.dtype, device=self._labels.device)
        self._labels = torch.cat([self._labels, new], dim=1)


def knockout(model: torch.nn.Module, block: Iterable[tuple[str, str] | str],
             layers: Iterable[int] | None = None) -> Knockout:
    """Cut attention edges ``(src, dst)`` at decoder ``layers`` for every forward inside the ``with`` block.

    Args:
        model: a Hugging Face VLM of a supported family (:mod:`flowkern.hf.models`).
        block: edges ``(src, dst)`` or ``"src->dst"`` over :data:`KNOCKOUT_SEGMENTS`; ``(src, dst)`` means the query
            tokens of segment ``dst`` can no longer read the key tokens of segment ``src`` (``("image", "last")``:
            the last prompt position cannot see the image).
        layers: 0-based decoder layers to cut at (``range(a, b)``); None = every layer.

    Returns:
        a :class:`Knockout` (the context manager).

    Raises:
        ValueError: an unknown segment or malformed edge (``block``), a layer out of range (``layers``), an
            unsupported model family.
    """
    return Knockout(model, block, layers)
