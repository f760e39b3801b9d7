"""The attention scorers of :func:`flowkern.prune`: how much attention each image token receives at layer ``L-1``.

With ``A = softmax(q_i . k_j * scale)`` the causal attention of layer ``L-1`` (padding never a key), head ``h``
of ``H``, the score of image token ``j`` is

- ``attention`` (FastV; the paper's eq. 9-12): ``mean_h A_h[last, j]``, the attention from the last prompt row;
- ``text-attention`` (SparseVLM-style relevance): ``mean_h mean_{i in T} A_h[i, j]`` over the text rows ``T``
  after the sample's first image token (the question and the chat template's tail, last row included);
- ``prerope-attention`` (FEATHER's stage-1 criterion): FastV's score with the queries and keys taken *before* the
  rotary embedding, ``q = q_proj(x)``, ``k = k_proj(x)`` (with the model's per-head q/k norms) from the layer's
  attention input ``x``, and the softmax normalised over those pre-rotary scores (its own LSE): without RoPE's
  decay the score no longer favours the image tokens nearest the question;
- :class:`Union` (FEATHER's fix for the spatial bias): ``round(share * k)`` tokens chosen by one scorer (e.g. the
  ``grid`` control: uniform coverage), the other ``k - round(share * k)`` by another among the rest; registered as
  ``union`` (any two scorers) and ``grid+attention`` (grid, then FastV's attention, half each).

All are computed with :func:`flowkern.key_attention_mass` (never an ``S x S`` matrix), by :mod:`flowkern.hf.scoring`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from flowkern.scorers.base import (
    ScoreInputs,
    Scorer,
    check_scorer,
    get_scorer,
    register,
    scorer_from_json,
    scorer_to_json,
    select,
)
from flowkern.scorers.controls import Grid

__all__ = ["Attention", "TextAttention", "PreRopeAttention", "Union", "GridAttention"]

_ATTENTION_NEEDS = frozenset({"attention", "prerope_attention"})


@register
@dataclass(frozen=True)
class Attention(Scorer):
    """FastV: attention received from the last prompt row at layer ``L-1`` (head mean)."""

    name = "attention"
    needs = frozenset({"attention"})
    before_decoder = False

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        """float32 ``[B, S]``."""
        return inputs.attention


@register
@dataclass(frozen=True)
class TextAttention(Scorer):
    """SparseVLM-style: attention received at layer ``L-1`` from the text rows after the first image (mean).

    Averaged over those query rows and the heads."""

    name = "text-attention"
    needs = frozenset({"attention"})
    attention_rows = "text"
    before_decoder = False

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        """float32 ``[B, S]``."""
        return inputs.attention


@register
@dataclass(frozen=True)
class PreRopeAttention(Scorer):
    """FEATHER stage 1: FastV's score with queries and keys taken before the rotary embedding."""

    name = "prerope-attention"
    needs = frozenset({"prerope_attention"})
    before_decoder = False

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        """float32 ``[B, S]``."""
        return inputs.prerope_attention


@register
@dataclass(frozen=True)
class Union(Scorer):
    """``round(share * k)`` image tokens chosen by ``first``, the rest by ``then`` among the others.

    Attributes:
        first, then: scorers (or their names / JSON, :func:`flowkern.scorers.scorer_from_json`).
        share: fraction in [0, 1] of each sample's ``k`` that ``first`` chooses (rounded half up).

    Raises:
        ValueError: a bad ``share``; ``first`` and ``then`` both reading layer ``L-1``'s attention from different
            query rows.
    """

    name = "union"
    first: Any
    then: Any
    share: float = 0.5

    def __post_init__(self) -> None:
        for part in ("first", "then"):
            value = getattr(self, part)
            if not isinstance(value, Scorer):
                value = get_scorer(scorer_from_json(value))
            object.__setattr__(self, part, check_scorer(value))
        if isinstance(self.share, bool) or not isinstance(self.share, int | float) or not 0 <= self.share <= 1:
            raise ValueError(f"union: share must be a fraction in [0, 1], got {self.share!r}")
        rows = {p.attention_rows for p in (self.first, self.then) if p.needs & _ATTENTION_NEEDS}
        if len(rows) > 1:
            raise ValueError(f"union: {self.first.name} and {self.then.name} read attention from different query "
                             f"rows {sorted(rows)}")

    @property
    def needs(self) -> frozenset[str]:  # type: ignore[override]
        """What either part reads."""
        return frozenset(self.first.needs) | frozenset(self.then.needs)

    @property
    def attention_rows(self) -> str:  # type: ignore[override]
        """The query rows of the part that reads attention (``"last"`` when none does)."""
        part = next((p for p in (self.first, self.then) if p.needs & _ATTENTION_NEEDS), None)
        return part.attention_rows if part is not None else "last"

    @property
    def before_decoder(self) -> bool:  # type: ignore[override]
        """Whether both parts can rank before the decoder."""
        return bool(self.first.before_decoder and self.then.before_decoder)

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        """float32 ``[B, S]``: ``S + 1`` at the tokens ``first`` chooses, then ``S - rank`` by ``then``'s scores, so
        that the top ``k`` are the union."""
        image = inputs.image
        B, S = image.shape
        k_first = torch.floor(inputs.k.double() * float(self.share) + 0.5).long()
        chosen = select(self.first.score(replace(inputs, k=k_first)), image, k_first.to(image.device))
        rest = image & ~chosen
        place = _place(_candidate_scores(self.then.score(inputs), rest))
        return torch.where(chosen, float(S + 1), (S - place).to(torch.float32))

    def to_json(self) -> dict[str, Any]:
        """``{"name": ..., "first": <JSON of first>, "then": <JSON of then>, "share": ...}``."""
        return {"name": self.name, "first": scorer_to_json(self.first), "then": scorer_to_json(self.then),
                "share": self.share}


@register
@dataclass(frozen=True)
class GridAttention(Union):
    """FEATHER's fix: half of ``k`` by ``grid``, the other half by ``attention`` among the rest."""

    name = "grid+attention"
    first: Any = field(default_factory=Grid)
    then: Any = field(default_factory=Attention)
    share: float = 0.5


def _candidate_scores(scores: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """float32 ``[B, S]``: ``scores`` at ``candidates``, -inf elsewhere.

    Raises:
        ValueError: NaN at a candidate.
    """
    s = scores.float().to(candidates.device)
    if bool(torch.isnan(s[candidates]).any()):
        raise ValueError("scores are NaN at some image tokens: a scorer must give every candidate a number")
    return s.masked_fill(~candidates, float("-inf"))


def _place(scores: torch.Tensor) -> torch.Tensor:
    """long ``[B, S]``: each entry's place in its row sorted by descending score (stable: ties -> earlier)."""
    B, S = scores.shape
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    return torch.empty_like(order).scatter_(1, order, torch.arange(S, device=scores.device).expand(B, S))
