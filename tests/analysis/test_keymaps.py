"""flowkern.keymaps: which tokens each layer holds, as pure tensor bookkeeping on hand-made tensors (no model)."""

from __future__ import annotations

import pytest
import torch

from flowkern import keymaps

T, F = True, False


def test_equalise_fills_short_rows_with_their_earliest_removed_positions():
    keep = torch.tensor([[T, F, T, F, T], [F, T, F, F, T]])
    keep_all, index, keymap = keymaps.equalise(keep)
    assert keep_all.tolist() == [[T, F, T, F, T], [T, T, F, F, T]]
    assert index.tolist() == [[0, 2, 4], [0, 1, 4]]
    assert keymap.tolist() == [[0, 2, 4], [-1, 1, 4]]


def test_narrowing_equalises_rows():
    keep = torch.tensor([[T, F, T, T], [F, T, F, T]])
    n = keymaps.narrowing(keep)
    assert n.hidden and n.update is None and n.keep_all.tolist() == [[T, F, T, T], [T, T, F, T]]
    assert n.index.tolist() == [[0, 2, 3], [0, 1, 3]] and n.keymap.tolist() == [[0, 2, 3], [-1, 1, 3]]
    assert not keymaps.narrowing(torch.tensor([[T, F, T], [F, T, T]])).hidden  # equal rows: no filler
    update = torch.zeros(2, 4, 3)
    assert keymaps.narrowing(keep, update=update).update is update


def test_compose_stages_to_original_positions():
    first = keymaps.narrowing(torch.tensor([[T, F, T, T, T], [F, T, F, T, T]]))  # rows [0 2 3 4], [(0) 1 3 4]
    index, keymap = keymaps.compose(None, None, first)
    assert index.tolist() == [[0, 2, 3, 4], [0, 1, 3, 4]] and keymap.tolist() == [[0, 2, 3, 4], [-1, 1, 3, 4]]
    # over the current rows: row 0 keeps rows 1, 3 (positions 2, 4); row 1 keeps rows 2, 3, and its filler row 0
    # (already hidden) comes back as a filler, hidden still
    second = keymaps.narrowing(torch.tensor([[F, T, F, T], [F, F, T, T]]))
    index, keymap = keymaps.compose(index, keymap, second)
    assert index.tolist() == [[2, 4], [3, 4]] and keymap.tolist() == [[2, 4], [3, 4]]
    third = keymaps.Narrowing(torch.ones(2, 2, dtype=torch.bool), torch.tensor([[0, 1], [0, 1]]),
                              torch.tensor([[0, 1], [-1, 1]]), True)
    assert keymaps.compose(index, keymap, third)[1].tolist() == [[2, 4], [-1, 4]]
    held = keymaps.compose(torch.tensor([[0, 1, 2]]), torch.tensor([[-1, 1, 2]]),
                           keymaps.narrowing(torch.tensor([[T, T, T]])))[1]
    assert held.tolist() == [[-1, 1, 2]]  # a row hidden by an earlier stage stays hidden


def test_original_length_of_a_cache_pruned_before_the_decoder():
    cache = type("Cache", (), {})()
    assert keymaps.original_length(cache) is None
    keymaps.set_cache_groups(cache, [keymaps.KeyMapGroup(frozenset({0, 1}), torch.tensor([[0, 3, 5], [-1, 4, 5]]),
                                                         True)])
    assert keymaps.original_length(cache) == 6
    keymaps.set_cache_groups(cache, [keymaps.KeyMapGroup(frozenset({2}), torch.tensor([[0, 3]]), False)])
    assert keymaps.original_length(cache) is None


def test_gather_tokens_per_token_inputs():
    index = torch.tensor([[0, 2], [1, 3]])
    pos = torch.arange(4)  # [S], shared by the batch
    assert keymaps.gather_tokens(pos, index, -1).tolist() == [[0, 2], [1, 3]]
    mrope = torch.arange(24).view(3, 2, 4)  # [3, B, S]
    assert keymaps.gather_tokens(mrope, index, -1)[:, 1].tolist() == [[5, 7], [13, 15], [21, 23]]
    cos = torch.arange(8.0).view(1, 4, 2)  # [1, S, D]: expanded to the batch
    assert keymaps.gather_tokens(cos, index, -2).tolist() == [[[0, 1], [4, 5]], [[2, 3], [6, 7]]]
    with pytest.raises(ValueError, match="no batch dim"):
        keymaps.gather_tokens(torch.zeros(4, 3), index, 0)


def test_extend_groups_appends_the_new_positions():
    g = keymaps.KeyMapGroup(frozenset({2, 3}), torch.tensor([[0, 2], [-1, 1]]), hidden=True)
    h = keymaps.KeyMapGroup(frozenset({1}), torch.tensor([[0, 1, 2], [0, 1, 2]]), hidden=False)
    keymaps.extend_groups([g, h], past=3, n_new=2, real=torch.tensor([[T, T], [T, F]]))
    assert g.keymap.tolist() == [[0, 2, 3, 4], [-1, 1, 3, -1]]
    assert h.keymap.tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 3, -1]] and h.hidden  # a padded new token hides
    assert h.mask().tolist() == [[T] * 5, [T, T, T, T, F]]
    keymaps.extend_groups([g], past=5, n_new=1, real=None)
    assert g.keymap[:, -1].tolist() == [5, 5]


def test_compact_keymap_of_a_compacted_cache():
    keymap = torch.tensor([[0, 2, 4], [-1, 1, 4]])
    keep = torch.tensor([[T, T, F, T, T], [T, T, T, T, T]])  # over original positions
    slots, new = keymaps.compact_keymap(keymap, keep)
    assert slots.tolist() == [[T, F, T], [F, T, T]]
    assert new.tolist() == [[0, 4], [1, 4]]
    slots, new = keymaps.compact_keymap(torch.arange(4).expand(2, 4), torch.tensor([[T, F, F, T], [T, T, F, T]]))
    assert slots.tolist() == [[T, T, F, T], [T, T, F, T]] and new.tolist() == [[0, -1, 3], [0, 1, 3]]


def test_cache_groups_track_forwards_and_compaction():
    cache = type("Cache", (), {})()  # any object: the groups are kept beside it, the cache itself is not touched
    assert keymaps.cache_groups(cache) == [] and keymaps.cache_keymaps(cache) == {}
    old, keymap = keymaps.held_keymap([], [2, 3], 2, 4, torch.device("cpu"))
    assert old is None and keymap.tolist() == [[0, 1, 2, 3]] * 2  # nothing compacted yet: every token
    _, new = keymaps.compact_keymap(keymap, torch.tensor([[T, F, T, T], [T, T, F, T]]))
    groups = keymaps.compacted_groups([], old, [2, 3], new)
    keymaps.set_cache_groups(cache, groups)
    assert sorted(keymaps.cache_keymaps(cache)) == [2, 3] and keymaps.cache_keymaps(cache)[2].tolist() == new.tolist()
    keymaps.track_forward(cache, prefill=False, past=4, n_new=1, real=None)  # a decode step appends position 4
    assert keymaps.cache_keymaps(cache)[3][:, -1].tolist() == [4, 4]
    # compacting layer 3 alone splits the group; compacting 2 and 3 together now refuses
    g, km = keymaps.held_keymap(keymaps.cache_groups(cache), [3], 2, 5, torch.device("cpu"))
    assert g is groups[0] and km.shape == (2, 4)
    _, newer = keymaps.compact_keymap(km, torch.tensor([[T, T, F, T, T]] * 2))
    keymaps.set_cache_groups(cache, keymaps.compacted_groups(keymaps.cache_groups(cache), g, [3], newer))
    held = keymaps.cache_keymaps(cache)
    assert held[3].tolist() == newer.tolist() and held[2].shape == (2, 4)
    with pytest.raises(ValueError, match="hold different tokens"):
        keymaps.held_keymap(keymaps.cache_groups(cache), [2, 3], 2, 5, torch.device("cpu"))
    keymaps.track_forward(cache, prefill=True, past=0, n_new=3, real=None)  # a new prompt: forgotten
    assert keymaps.cache_groups(cache) == []
