"""flowkern.plan: pruning's policy as pure functions, and the control scorers (flowkern.scorers.controls), on
hand-made tensors (no model). Expected values are written out by hand from the definitions in the docstrings."""

from __future__ import annotations

import pytest
import torch

from flowkern import plan
from flowkern.scorers import ScoreInputs, get_scorer, select
from flowkern.scorers.controls import grid_cells, grid_scores

T, F = True, False


def check(layer, keep, rank, when, num_layers, deepstack=0, family="model"):
    """A spec's checks in the order prune runs them: construction, then :meth:`PruneSpec.resolve`."""
    return plan.PruneSpec(layer, keep, rank, 0, when).resolve(num_layers, deepstack, family)


def test_prune_spec_checks():
    assert check(None, 0, "attention", "prefill", 4) is None
    assert check(-1, 0, "attention", "prefill", 4) == 3
    assert check(0, 0, "attention", "prefill", 4) == 0  # keep=0 needs no ranking
    assert check(0, 3, "random", "prefill", 4) == 0
    for layer in (4, -5, True, 1.0):
        with pytest.raises(ValueError, match="layer must be"):
            check(layer, 0, "attention", "prefill", 4)
    for keep in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="keep must be"):
            check(1, keep, "attention", "prefill", 4)
    with pytest.raises(ValueError, match="rank must be"):
        check(1, 0, "topk", "prefill", 4)
    with pytest.raises(ValueError, match="when must be"):
        check(1, 0, "none", "later", 4)
    with pytest.raises(ValueError, match="layer >= 1"):
        check(0, 2, "attention", "prefill", 4)
    with pytest.raises(ValueError, match="when='decode'"):
        check(0, 0, "none", "decode", 4)
    with pytest.raises(NotImplementedError, match="DeepStack"):
        check(2, 0, "none", "prefill", 4, deepstack=3, family="qwen3_vl")
    assert check(3, 0, "none", "prefill", 4, deepstack=3) == 3
    assert check(2, 0, "none", "decode", 4, deepstack=3) == 2  # the prefill sees everything


def test_num_to_keep():
    n = torch.tensor([10, 3, 0, 5])
    assert plan.num_to_keep(4, n).tolist() == [4, 3, 0, 4]
    assert plan.num_to_keep(0, n).tolist() == [0, 0, 0, 0]
    assert plan.num_to_keep(0.25, n).tolist() == [3, 1, 0, 1]  # 2.5 -> 3, 0.75 -> 1, 1.25 -> 1 (half up)
    assert plan.num_to_keep(1.0, n).tolist() == [10, 3, 0, 5]


def _choose(image, k, rank, scores, seed):
    """The kept image tokens of a control / given scores, as flowkern.prune chooses them at one stage."""
    B, S = image.shape
    positions = torch.arange(S).expand(B, S)
    inputs = ScoreInputs(layer=1, image=image, real=torch.ones_like(image), k=k, positions=positions, seed=seed)
    s = scores if scores is not None else get_scorer(rank).score(inputs)
    return select(s, image, k)


def test_choose_by_rank():
    image = torch.tensor([[F, T, T, T, T, F], [T, T, F, T, F, F]])
    k = torch.tensor([2, 1])
    scores = torch.tensor([[9.0, 0.1, 0.5, 0.5, 0.3, 9.0], [0.2, 0.2, 9.0, 0.1, 0.0, 0.0]])
    # top 2 of row 0: 0.5, 0.5 (positions 2, 3; text positions never count); row 1: a tie -> the earlier token
    assert _choose(image, k, "attention", scores, 0).tolist() == [[F, F, T, T, F, F], [T, F, F, F, F, F]]
    assert _choose(image, k, "none", None, 0).tolist() == [[F, T, T, F, F, F], [T, F, F, F, F, F]]
    same = torch.tensor([[F, T, T, T, T, F], [F, T, T, T, T, F]])
    a = _choose(same, torch.tensor([2, 2]), "random", None, 7)
    assert torch.equal(a[0], a[1]) and int(a[0].sum()) == 2 and not (a & ~same).any()
    assert torch.equal(a, _choose(same, torch.tensor([2, 2]), "random", None, 7))
    draws = {tuple(_choose(same, torch.tensor([2, 2]), "random", None, s)[0].tolist()) for s in range(8)}
    assert len(draws) > 1  # the seed matters
    with pytest.raises(ValueError, match="NaN"):
        _choose(image, k, "attention", torch.full((2, 6), float("nan")), 0)


def test_prompt_keep_keeps_text_and_the_last_row():
    image = torch.tensor([[F, T, T, T, F], [F, F, T, T, T]])
    real = torch.tensor([[T, T, T, T, T], [F, F, T, T, T]])
    got = plan.prompt_keep(image, real, torch.zeros_like(image))
    assert got.tolist() == [[T, F, F, F, T], [F, F, F, F, T]]  # row 1: its last position is an image token: kept
    got = plan.prompt_keep(image, real, _choose(image, torch.tensor([1, 1]), "none", None, 0))
    assert got.tolist() == [[T, T, F, F, T], [F, F, T, F, T]]


def test_is_continuation():
    prompt = torch.tensor([[5, 6, 7], [5, 8, 9]])
    assert plan.is_continuation(torch.tensor([[5, 6, 7, 1], [5, 8, 9, 2]]), prompt)
    assert not plan.is_continuation(prompt, prompt)  # the same prompt again: a new prompt
    assert not plan.is_continuation(torch.tensor([[5, 6, 0, 1], [5, 8, 9, 2]]), prompt)
    assert not plan.is_continuation(torch.tensor([[5, 6, 7, 1]]), prompt)
    assert not plan.is_continuation(None, prompt) and not plan.is_continuation(prompt, None)


def test_grid_cells_on_a_24x24_grid():
    grid = torch.arange(576).view(24, 24)
    rows = lambda m: sorted({int(i) // 24 for i in grid[m]})  # noqa: E731
    m = grid_cells(grid, 64)
    assert int(m.sum()) == 64 and rows(m) == list(range(1, 24, 3))
    assert sorted({int(i) % 24 for i in grid[m]}) == list(range(1, 24, 3))
    assert int(grid_cells(grid, 144).sum()) == 144 and rows(grid_cells(grid, 144)) == list(range(0, 24, 2))
    m100 = grid_cells(grid, 100)
    assert int(m100.sum()) == 100 and bool((m100 & m).sum() == 64)  # the 8 x 8 sub-grid plus 36 spread others
    assert bool(grid_cells(grid, 1)[11, 11]) and int(grid_cells(grid, 1).sum()) == 1
    assert bool(grid_cells(grid, 576).all()) and int(grid_cells(grid, 0).sum()) == 0
    holes = grid.clone()
    holes[:, 23] = -1  # a column without tokens (e.g. a newline column) is never chosen
    assert not bool(grid_cells(holes, 200)[:, 23].any()) and int(grid_cells(holes, 200).sum()) == 200
    # two grids in one sample share k in proportion to their sizes; tokens on no grid come last
    is_image = torch.zeros(1, 30, dtype=torch.bool)
    is_image[0, 2:27] = True
    g1 = torch.arange(3, 19).view(4, 4)  # 16 cells
    g2 = torch.arange(19, 27).view(2, 4)  # 8 cells; position 2 is an image token on no grid
    s = grid_scores([[g1, g2]], torch.tensor([6]), is_image)
    assert int((s[0, 3:19] == 1).sum()) == 4 and int((s[0, 19:27] == 1).sum()) == 2 and s[0, 2] == -0.5


def test_grid_scores_share_k_between_grids():
    """Two grids of 4 and 2 cells share k = 3 in proportion (2 + 1); tokens on no grid score below the rest."""
    g1 = torch.tensor([[1, 2], [3, 4]])
    g2 = torch.tensor([[6, 7]])
    is_image = torch.tensor([[F, T, T, T, T, T, T, T]])  # position 5 is on no grid
    s = grid_scores([[g1, g2]], torch.tensor([3]), is_image)
    assert int((s[0, 1:5] == 1).sum()) == 2 and int((s[0, 6:8] == 1).sum()) == 1
    assert float(s[0, 5]) == -0.5
