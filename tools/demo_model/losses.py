"""The demo model's training losses and aids: the dense patch loss (each image token points, by cosine similarity with
the language model's input embeddings, to the words of what lies under its patch, or to a learned "nothing"), the
2-D position code and the column / row read-outs, the attention-guide loss and the learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from flowkern import shapes as world

__all__ = ["PATCH_WORDS", "patch_classes", "patch_loss", "grid_positions", "position_loss", "cell_loss",
           "attention_loss", "learning_rate"]


PATCH_WORDS: dict[str, tuple[str, ...]] = {
    "color": tuple(world.COLORS), "shape": tuple(world.SHAPES),
    "char": tuple(world.LABEL_CHARS) + tuple(f"##{c}" for c in world.LABEL_CHARS),
}
"""The candidate words of the patch loss, per kind: class ``k > 0`` of :func:`patch_classes` is word ``k - 1``
(a label's second character is its ``##`` word, after the characters); class 0 is "nothing"."""


def patch_classes(targets: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    """The class of each patch for one kind of :data:`PATCH_WORDS`, flat ``[B * grid * grid]``, from the
    ``targets`` of :func:`tools.demo_model.data.patch_batch`: 0 for nothing, ``k`` for ``PATCH_WORDS[key][k - 1]`` (for
    ``char``, the second character of a two-character label is shifted to its ``##`` word)."""
    classes = targets[key].reshape(-1)
    if key != "char":
        return classes
    second = targets["char_second"].reshape(-1).bool() & (classes > 0)
    return torch.where(second, classes + len(world.LABEL_CHARS), classes)


def patch_loss(feats: torch.Tensor, targets: dict[str, torch.Tensor], cands: dict[str, list[int]],
               nothing: torch.nn.ParameterDict, embeddings: torch.Tensor, scale: float = 10.0) -> torch.Tensor:
    """Mean over colour / shape / character of the patch-wise cross-entropy of ``scale * cos(image token, word)``
    over ["nothing", candidate words]; the second character of a two-character label is the ``##`` word. Patches
    on something and empty patches weigh half each (most patches are empty)."""
    f = torch.nn.functional.normalize(feats.reshape(-1, feats.shape[-1]), dim=-1)
    total = feats.new_zeros(())
    for key, ids in cands.items():
        words = torch.cat([nothing[key][None], embeddings[ids]], dim=0)
        logits = scale * f @ torch.nn.functional.normalize(words, dim=-1).T
        target = patch_classes(targets, key)
        ce = torch.nn.functional.cross_entropy(logits, target, reduction="none")
        on = target > 0
        total = total + 0.5 * ce[~on].mean() + (0.5 * ce[on].mean() if on.any() else 0.0)
    return total / len(cands)


def grid_positions(grid: int, width: int, dims: int | None = None) -> torch.Tensor:
    """The vision tower's initial position embeddings, ``[1 + grid * grid, width]`` (CLS first, zero; then the
    patches row-major): a 2-D sine / cosine code in the first ``dims`` channels (default: all ``width``; the rest
    zero), the first half of them for the column, the second for the row, ``sin(w_k * c), cos(w_k * c)`` at
    frequencies ``w_k`` from pi / (2 grid) (one monotone quarter period across the image) to pi. Each patch's
    vector has norm ``sqrt(dims / 2)``: so the image tokens start out knowing where they are (a random init of
    CLIP's scale is drowned by the patch content and the tokens never learn their column).

    Raises:
        ValueError: ``dims`` not a positive multiple of 4 or larger than ``width``.
    """
    dims = width if dims is None else dims
    if dims <= 0 or dims % 4 or dims > width:
        raise ValueError(f"grid_positions: dims must be a positive multiple of 4 and <= width={width}, got {dims}")
    k = dims // 4
    freqs = (math.pi / (2 * grid)) * (2 * grid) ** (torch.arange(k, dtype=torch.float64) / max(1, k - 1))
    cells = torch.arange(grid * grid)

    def code(coord: torch.Tensor) -> torch.Tensor:
        angles = coord[:, None].double() * freqs[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    table = torch.zeros(1 + grid * grid, width, dtype=torch.float64)
    table[1:, :dims] = torch.cat([code(cells % grid), code(cells // grid)], dim=1)
    return table.float()


def position_loss(feats: torch.Tensor, head: torch.nn.Linear, grid: int) -> torch.Tensor:
    """Cross-entropy of a linear read-out (``head``: width -> 2 x grid) of each image token's column and row
    (``feats`` ``[B, grid * grid, width]``, row-major): the image tokens must carry where they are, so that a
    word that looks at an object can read off where it lies."""
    index = torch.arange(grid * grid, device=feats.device).repeat(feats.shape[0])
    return cell_loss(head(feats.reshape(-1, feats.shape[-1])), index % grid, index // grid)


def cell_loss(logits: torch.Tensor, columns: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of a column / row read-out: ``logits`` ``[N, 2 * grid]`` (columns first), ``columns`` and
    ``rows`` ``[N]``."""
    grid = logits.shape[1] // 2
    return 0.5 * (torch.nn.functional.cross_entropy(logits[:, :grid], columns)
                  + torch.nn.functional.cross_entropy(logits[:, grid:], rows))


def attention_loss(attentions: Sequence[torch.Tensor], rows: torch.Tensor, keys: torch.Tensor,
                    layers: Sequence[int], heads: tuple[int, int]) -> torch.Tensor:
    """``-log`` of the attention mass heads ``heads[0]:heads[1]`` of ``layers`` put (on average over the heads) on
    each guided row's targets (``rows`` ``[T, 2]``, ``keys`` ``[T, S]`` from :func:`tools.demo_model.data.encode`),
    averaged."""
    if rows.numel() == 0:
        return attentions[0].new_zeros(())
    losses = []
    for layer in layers:
        probs = attentions[layer][rows[:, 0], heads[0]:heads[1], rows[:, 1]].float().mean(1)  # [T, S]
        losses.append(-torch.log((probs * keys).sum(-1) + 1e-4))
    return torch.stack(losses).mean()


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    """The learning rate at ``step`` of ``steps``: a linear warm-up over ``warmup`` steps to ``peak``, then a cosine
    decay to 5 % of it."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))

