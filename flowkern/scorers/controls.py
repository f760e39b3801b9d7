"""The control scorers of :func:`flowkern.prune`: criteria that read nothing the model computes.

- ``random``: a seeded random score per original prompt position, ``torch.rand(T, generator=torch.Generator().
  manual_seed(seed))[position]`` with ``T`` the prompt length (identical prompts get identical choices; a row keeps its
  score across the stages of a schedule);
- ``none``: the first ``k`` image tokens in sequence order (score = minus the original position);
- ``grid``: plain spatial downsampling. On each image grid of the model's layout (:class:`flowkern.hf.segments.
  ImageGrid`, from :mod:`flowkern.hf.models`) every ``s``-th row and column, ``s`` the smallest stride whose sub-grid
  has at most ``q`` cells, centred (a 24 x 24 grid at ``q = 64`` keeps rows and columns 1, 4, ..., 22; at ``q = 1``
  the cell (11, 11)); the ``q`` - (sub-grid) remaining tokens are every n-th other cell in raster order, so exactly
  ``q`` are kept. Several grids per sample (tiles, frames) share ``k`` in proportion to their sizes
  (:func:`grid_scores`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flowkern.scorers.base import ScoreInputs, Scorer, register

__all__ = ["Random", "First", "Grid", "grid_cells", "grid_scores"]


@register
@dataclass(frozen=True)
class Random(Scorer):
    """A control: a seeded random score per prompt position (the pruning seed, ``PruneSpec.seed``)."""

    name = "random"
    needs = frozenset()

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        """float32 ``[B, S]``."""
        positions = inputs.positions
        length = int(positions.max()) + 1 if positions.numel() else 0  # each row's last position is always kept
        draws = torch.rand(length, generator=torch.Generator().manual_seed(int(inputs.seed)))
        return draws.to(positions.device)[positions]


@register
@dataclass(frozen=True)
class First(Scorer):
    """A control: the first ``k`` image tokens in sequence order."""

    name = "none"
    needs = frozenset()

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        """float32 ``[B, S]``: minus the original position."""
        return -inputs.positions.to(torch.float32)


@register
@dataclass(frozen=True)
class Grid(Scorer):
    """A control: spatially uniform downsampling of each image grid (:func:`grid_scores`)."""

    name = "grid"
    needs = frozenset({"grids"})

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        """float32 ``[B, S]``: 1 at the chosen cells, 0 at other grid cells, -0.5 at image tokens on no grid."""
        return grid_scores(inputs.grids, inputs.k.cpu(), inputs.image)


def grid_cells(index: torch.Tensor, q: int) -> torch.Tensor:
    """bool ``[rows, cols]``: the ``min(q, cells)`` cells of one grid the ``"grid"`` scorer keeps.

    ``index`` long ``[rows, cols]`` (-1 = no token there). The cells at rows ``o, o+s, o+2s, ...`` (centred:
    ``o = ((rows-1) mod s) // 2``, columns alike) for the smallest stride ``s`` with at most ``q`` such cells, then
    every n-th remaining cell in raster order (``floor((i + 0.5) * remaining / rest)``) until ``q`` are chosen.
    """
    valid = index >= 0
    n = int(valid.sum())
    if q >= n:
        return valid
    chosen = torch.zeros_like(valid)
    if q <= 0:
        return chosen
    rows, cols = valid.shape
    r, c = torch.arange(rows)[:, None], torch.arange(cols)[None, :]
    for s in range(1, max(rows, cols) + 1):
        sub = valid & (r % s == ((rows - 1) % s) // 2) & (c % s == ((cols - 1) % s) // 2)
        if int(sub.sum()) <= q:
            chosen = sub
            break
    rest = q - int(chosen.sum())
    if rest > 0:
        others = torch.nonzero((valid & ~chosen).flatten()).flatten()
        pick = ((torch.arange(rest, dtype=torch.float64) + 0.5) * others.numel() / rest).long()
        flat = chosen.flatten().clone()
        flat[others[pick]] = True
        chosen = flat.view(rows, cols)
    return chosen


def grid_scores(grids: list[list[torch.Tensor]], k: torch.Tensor, is_image: torch.Tensor) -> torch.Tensor:
    """float ``[B, S]``: 1 at the ``k[b]`` image tokens of a spatially uniform subsample of sample b's grids, 0 at
    its other image tokens (tokens on no grid, e.g. a CLS, -0.5: they come last).

    Args:
        grids: per sample, its image grids as long ``[rows, cols]`` row indices into the ``S`` rows (-1 = no token).
        k: long ``[B]`` image tokens to keep per sample; several grids share it in proportion to their sizes.
        is_image: bool ``[B, S]`` the image tokens.
    """
    B, S = is_image.shape
    scores = torch.zeros(B, S, dtype=torch.float32)
    on_grid = torch.zeros(B, S, dtype=torch.bool)
    for b, views in enumerate(grids):
        sizes = [int((g >= 0).sum()) for g in views]
        total, kb = sum(sizes), min(int(k[b]), sum(sizes))
        done = 0
        for g, n in zip(views, sizes, strict=True):  # k shared in proportion to grid size (rounded half up)
            q = (2 * kb * (done + n) + total) // (2 * total) - (2 * kb * done + total) // (2 * total)
            done += n
            cells = grid_cells(g, q)
            scores[b, g[cells]] = 1.0
            on_grid[b, g[g >= 0]] = True
    scores[~on_grid] = -0.5
    return scores.to(is_image.device)
