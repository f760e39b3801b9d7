"""Feature-family scorers: which image tokens to keep, judged by how their vectors relate to each other (no attention).

Both read the hidden states entering the stage (``needs = {"hidden"}``: at ``layer=0`` the input embeddings, whose
image rows are the projected image features before the decoder; at layer ``L`` the hidden states entering ``L``)
and compare image tokens by cosine similarity ``cos(a, b) = <a, b> / (|a| |b|)`` (a zero vector has similarity 0
with everything). Each sample is ranked among its own candidates (``ScoreInputs.image``); padding and text rows
are never candidates. The similarity is computed in the hidden states' dtype promoted to at least float32.

- ``diversity`` (:class:`Diversity`, DivPrune, Alvar et al., CVPR 2025): the greedy max-min diversity selection;
- ``duplicates`` (:class:`Duplicates`, DART, Wen et al. 2025, "Stop Looking for Important Tokens in Multimodal
  Language Models: Duplication Matters More"): pivots, then the tokens least duplicated by them.

Both return scores whose order is the method's selection order, so :func:`flowkern.scorers.select` with any ``k``
returns the method's set for that budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flowkern.scorers.base import ScoreInputs, Scorer, register

__all__ = ["Diversity", "Duplicates", "cosine_similarity_matrix", "greedy_max_min_order"]


def cosine_similarity_matrix(hidden: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every pair of rows of each sample.

    Args:
        hidden: ``[B, S, D]`` float.

    Returns:
        ``[B, S, S]`` in ``hidden``'s dtype promoted to at least float32; a zero row has similarity 0 with every
        row (itself included).
    """
    h = hidden.to(torch.promote_types(hidden.dtype, torch.float32))
    unit = torch.nn.functional.normalize(h, dim=-1, eps=1e-12)
    return unit @ unit.transpose(1, 2)


def greedy_max_min_order(hidden: torch.Tensor, candidates: torch.Tensor,
                         picks: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """DivPrune's greedy max-min selection order of each sample's candidates.

    With the cosine distance ``d(i, j) = 1 - cos(h_i, h_j)``: the first pick is the candidate farthest from its
    nearest other candidate (``argmax_i min_{j != i} d(i, j)``; a lone candidate is picked); each next pick is the
    unpicked candidate farthest from the picked set (``argmax_i min_{s in picked} d(i, s)``); ties go to the
    earlier row.

    Args:
        hidden: ``[B, S, D]`` float.
        candidates: bool ``[B, S]``.
        picks: stop after this many picks per sample (None: pick every candidate).

    Returns:
        ``(order, gap)``: long ``[B, S]`` the step at which each candidate is picked (0 = first), -1 for
        non-candidates and candidates not picked within ``picks``; and ``[B, S]`` the criterion of the next step at
        each unpicked candidate (its distance to the nearest pick; with no pick yet, to its nearest other
        candidate), ``-inf`` elsewhere.
    """
    B, S = candidates.shape
    dist = 1.0 - cosine_similarity_matrix(hidden)                          # [B, S, S]
    inf = float("inf")
    col_ok = candidates[:, None, :] & ~torch.eye(S, dtype=torch.bool, device=dist.device)
    nearest = torch.where(col_ok, dist, inf).amin(dim=2)                  # nearest other candidate (+inf: none)
    # gap[b, i]: the criterion of candidate i at this step; -inf marks non-candidates and picked tokens for good
    gap = nearest.masked_fill(~candidates, -inf)
    unpicked = torch.full_like(gap, inf).masked_fill(~candidates, -inf)
    counts = candidates.sum(dim=1)
    steps = int(counts.max()) if B else 0
    steps = steps if picks is None else min(steps, max(int(picks), 0))
    log = torch.empty(B, steps, dtype=torch.long, device=dist.device)
    for step in range(steps):
        pick = gap.argmax(dim=1, keepdim=True)                             # first maximum: the earlier row on ties
        log[:, step:step + 1] = pick
        from_pick = torch.gather(dist, 1, pick[..., None].expand(B, 1, S)).squeeze(1)
        gap = torch.minimum(unpicked if step == 0 else gap, from_pick)    # distance to the nearest pick
        gap.scatter_(1, pick, -inf)
    order = torch.full((B, S + 1), -1, dtype=torch.long, device=dist.device)
    valid = torch.arange(steps, device=dist.device) < counts[:, None]      # rows with fewer candidates stop early
    order.scatter_(1, log.masked_fill(~valid, S), torch.arange(steps, device=dist.device).expand(B, steps))
    return order[:, :S].to(candidates.device), gap.to(candidates.device)


@register
@dataclass(frozen=True)
class Diversity(Scorer):
    """DivPrune (Alvar et al., CVPR 2025): keep the image tokens that solve the max-min diversity problem greedily.

    Definition: on the cosine distance ``d = 1 - cos`` of the image tokens' vectors (the hidden states entering the
    stage: before the decoder, the projected image features), pick first the token farthest from its nearest
    neighbour, then repeatedly the token whose distance to the nearest already-picked token is largest (ties: the
    earlier token); keep the first ``k`` picks. The paper's first step is "farthest from the nearest other token";
    picks never repeat (a duplicate of a picked token has distance 0 and is picked only when nothing else is left).

    Scores: the greedy runs ``max(inputs.k)`` steps (each a pass over the batch, the selection being sequential);
    the candidate picked at ``step`` scores ``3 + max(k) - step``, every other candidate its next-step criterion
    (distance to the nearest pick, in ``[0, 2]``), so :func:`flowkern.scorers.select` with any ``k <= max(inputs.k)``
    returns exactly the first ``k`` greedy picks (pass ``k`` = the candidate counts for the whole order); 0 at
    non-candidates.
    """

    name = "diversity"
    needs = frozenset({"hidden"})

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        """float32 ``[B, S]``: higher = picked earlier by the greedy max-min selection (see the class)."""
        hidden = _hidden(inputs)
        image = inputs.image.to(hidden.device)
        picks = int(inputs.k.max()) if inputs.k.numel() else 0
        order, gap = greedy_max_min_order(hidden, image, picks)
        rest = torch.where(image, gap.clamp(0.0, 2.0), 0.0)
        return torch.where(order >= 0, 3.0 + picks - order, rest).float()


@register
@dataclass(frozen=True)
class Duplicates(Scorer):
    """DART (Wen et al. 2025, "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters
    More"): choose a few pivot tokens, keep them and the image tokens least duplicated by them.

    Definition: the duplication of a token with a pivot is their cosine similarity (hidden states entering the
    stage). Pivots: the ``pivots`` image tokens and the ``text_pivots`` text tokens after the sample's first image
    token (the question; DART uses both kinds) with the largest L1 norm of their vector. Every image pivot is kept
    first (larger norm first); then image tokens are kept in increasing order of their duplication with the pivots,
    ``max_p cos(h_i, h_p)`` (ties: the earlier token).

    Choices: DART ranks pivot candidates by the L1 norm of the layer's *key* states (its "K-norm"; it reports other
    pivot rules, norms of other states or random pivots, to perform alike); keys are not among the stage's inputs,
    so the norm here is that of the hidden state the similarity is measured on. DART's reference code splits the
    budget equally among pivots, each taking its least similar remaining tokens in turn; here a token's duplication
    is its similarity to its *closest* pivot, one order for every budget, so that the kept set grows with ``k``
    (a token kept at budget ``k`` is kept at every larger budget). DART's defaults: 4 image and 4 text pivots.

    Attributes:
        pivots: image pivots per sample (>= 0; fewer when the sample has fewer image tokens).
        text_pivots: text pivots per sample (>= 0).
    """

    name = "duplicates"
    needs = frozenset({"hidden"})
    pivots: int = 4
    text_pivots: int = 4

    def __post_init__(self) -> None:
        for field_name in ("pivots", "text_pivots"):
            value = getattr(self, field_name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{field_name} must be an int >= 0, got {value!r}")

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        """float32 ``[B, S]``: image pivots highest (by norm), then ``1 - max_p cos(h_i, h_p)`` (see the class)."""
        hidden = _hidden(inputs)
        image = inputs.image.to(hidden.device)
        real = inputs.real.to(hidden.device)
        S = image.shape[1]
        after_first = torch.cumsum(image.long(), dim=1) > 0
        text = real & ~image & after_first
        h = hidden.to(torch.promote_types(hidden.dtype, torch.float32))
        norm = h.abs().sum(dim=-1)                                         # [B, S] L1 norm
        image_rank = _rank_desc(norm, image)
        image_pivot = image & (image_rank < self.pivots)
        pivot = image_pivot | (text & (_rank_desc(norm, text) < self.text_pivots))
        # the pivots' rows, gathered (at most pivots + text_pivots per sample; unused slots masked)
        slots = min(self.pivots + self.text_pivots, S)
        piv_rows = torch.sort((~pivot).to(torch.uint8), dim=1, stable=True).indices[:, :slots]   # pivots first
        piv_ok = torch.gather(pivot, 1, piv_rows)                          # [B, P]
        unit = torch.nn.functional.normalize(h, dim=-1, eps=1e-12)
        piv = torch.gather(unit, 1, piv_rows[..., None].expand(-1, -1, unit.shape[-1]))
        sim = unit @ piv.transpose(1, 2)                                   # [B, S, P]
        dup = sim.masked_fill(~piv_ok[:, None, :], float("-inf")).amax(dim=2) if slots else sim.new_zeros(h.shape[:2])
        dup = torch.where(torch.isfinite(dup), dup, torch.zeros_like(dup))  # closest pivot; no pivot: 0
        out = torch.where(image, 1.0 - dup, torch.zeros_like(dup))        # in [0, 2]
        out = torch.where(image_pivot, 3.0 + (S - image_rank).to(out.dtype), out)
        return out.float()


def _rank_desc(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """long ``[B, S]``: each masked entry's place when the row's masked values are sorted in decreasing order
    (stable: ties by position); unmasked entries get places after every masked one."""
    B, S = values.shape
    v = values.masked_fill(~mask, float("-inf"))
    order = torch.sort(v, dim=1, descending=True, stable=True).indices
    place = torch.empty_like(order)
    place.scatter_(1, order, torch.arange(S, device=values.device).expand(B, S))
    return place


def _hidden(inputs: ScoreInputs) -> torch.Tensor:
    """``inputs.hidden`` checked to be ``[B, S, D]`` for the inputs' image mask."""
    hidden = inputs.hidden
    B, S = inputs.image.shape
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or tuple(hidden.shape[:2]) != (B, S):
        got = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
        raise ValueError(f"inputs.hidden must be a float tensor [B={B}, S={S}, D], got {got}")
    return hidden
