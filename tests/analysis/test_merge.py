"""flowkern.merge.merge_into_kept against a loop oracle of its definition (float64): each removed image token is
averaged into its most similar kept image token of the same sample (cosine similarity, ties -> the earlier kept
token), unweighted; everything else unchanged; a sample with no kept image token merges nothing."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flowkern.merge import merge_into_kept


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    na, nb = float(a.norm()), float(b.norm())
    return 0.0 if na == 0 or nb == 0 else float(a @ b) / (na * nb)


def merge_oracle(hidden: torch.Tensor, keep: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    out = hidden.clone()
    B, S, _ = hidden.shape
    for b in range(B):
        kept = [s for s in range(S) if image[b, s] and keep[b, s]]
        removed = [s for s in range(S) if image[b, s] and not keep[b, s]]
        if not kept:
            continue
        groups: dict[int, list[int]] = {t: [t] for t in kept}
        for r in removed:
            best, best_sim = None, -math.inf
            for t in kept:
                sim = _cos(hidden[b, r], hidden[b, t])
                if sim > best_sim:  # strict: ties keep the earlier kept token
                    best, best_sim = t, sim
            groups[best].append(r)
        for t, members in groups.items():
            out[b, t] = sum(hidden[b, m] for m in members) / len(members)
    return out


def _case(seed: int, counts: list[int], kept: list[int], S: int = 12, D: int = 5):
    """Rows with left padding (zeros, never image), ``counts[b]`` image tokens of which a random ``kept[b]`` are
    kept, text around them (always kept)."""
    g = torch.Generator().manual_seed(seed)
    B = len(counts)
    hidden = torch.randn(B, S, D, generator=g, dtype=torch.float64)
    image = torch.zeros(B, S, dtype=torch.bool)
    keep = torch.zeros(B, S, dtype=torch.bool)
    for b, (n, k) in enumerate(zip(counts, kept, strict=True)):
        pad = b % 3
        hidden[b, :pad] = 0.0
        keep[b, pad:] = True
        start = pad + 1
        image[b, start:start + n] = True
        drop = torch.randperm(n, generator=g)[:n - min(k, n)] + start
        keep[b, drop] = False
    return hidden, keep, image


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), counts=st.lists(st.integers(0, 9), min_size=1, max_size=4),
       kept=st.lists(st.integers(0, 9), min_size=4, max_size=4))
def test_merge_matches_the_loop_oracle(seed, counts, kept):
    hidden, keep, image = _case(seed, counts, kept[:len(counts)])
    got = merge_into_kept(hidden, keep, image)
    want = merge_oracle(hidden, keep, image)
    assert got.dtype == hidden.dtype
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    # text rows, padding rows and removed rows are untouched
    assert torch.equal(got[~(image & keep)], hidden[~(image & keep)])


def test_a_sample_without_kept_image_tokens_merges_nothing():
    hidden, keep, image = _case(1, [4, 5], [0, 2])
    got = merge_into_kept(hidden, keep, image)
    assert torch.equal(got[0], hidden[0])
    assert not torch.equal(got[1], hidden[1])
    torch.testing.assert_close(got, merge_oracle(hidden, keep, image), rtol=0, atol=1e-12)


def test_hand_made_merge_and_ties():
    e = torch.eye(3, dtype=torch.float64)
    # kept: rows 0 (e0) and 2 (e1); removed: row 1 (2*e0: goes to row 0), row 3 (e0+e1: a tie -> row 0), row 4 (e2:
    # similarity 0 to both -> row 0); text row 5 unchanged
    hidden = torch.stack([e[0], 2 * e[0], e[1], e[0] + e[1], e[2], e[2]])[None]
    image = torch.tensor([[True, True, True, True, True, False]])
    keep = torch.tensor([[True, False, True, False, False, True]])
    got = merge_into_kept(hidden, keep, image)[0]
    torch.testing.assert_close(got[0], (e[0] + 2 * e[0] + e[0] + e[1] + e[2]) / 4)
    assert torch.equal(got[2], e[1]) and torch.equal(got[5], e[2])


def test_float32_and_bfloat16_keep_their_dtype():
    hidden, keep, image = _case(2, [6, 3], [2, 1])
    for dtype in (torch.float32, torch.bfloat16):
        got = merge_into_kept(hidden.to(dtype), keep, image)
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), merge_oracle(hidden.to(dtype).double(), keep, image),
                                   rtol=0.02, atol=0.02)


def test_bad_arguments_are_named():
    hidden, keep, image = _case(0, [3], [1])
    with pytest.raises(ValueError, match="hidden"):
        merge_into_kept(hidden[0], keep, image)
    with pytest.raises(ValueError, match="hidden"):
        merge_into_kept(hidden.long(), keep, image)
    with pytest.raises(ValueError, match="keep"):
        merge_into_kept(hidden, keep.long(), image)
    with pytest.raises(ValueError, match="image"):
        merge_into_kept(hidden, keep, image[:, :-1])
