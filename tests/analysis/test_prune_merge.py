"""flowkern.prune(merge=True): each removed image token averaged into its most similar kept image token before the
decoder, against the deleted-embeddings oracle of tests/fixtures.py (test_prune_predecoder.py's) with the merge
written out here as loops (cosine similarity of the embeddings, ties to the earlier kept token, unweighted mean of the
kept token and the tokens assigned to it)."""

from __future__ import annotations

import pytest
import torch

import flowkern
from flowkern.hf.tiny import IMAGE_TOKEN as IMG
from tests.fixtures import (
    assert_same_generation,
    generate_on_deleted_rows,
    generate_pruned,
    prune_batches,
    removed_image_tokens,
)

pytestmark = pytest.mark.usefixtures("one_thread")
_built: dict = {}


def case(name):
    if name not in _built:
        _built[name] = prune_batches(name, 3)
    return _built[name]


def merged_by_hand(embeds, keep, image):
    """float64 loops: every removed image row joins the kept image row of its sample it is most cosine-similar to."""
    out = embeds.clone()
    for b in range(embeds.shape[0]):
        kept = [int(i) for i in torch.nonzero(keep[b] & image[b]).flatten()]
        gone = [int(i) for i in torch.nonzero(~keep[b] & image[b]).flatten()]
        if not kept:
            continue
        groups = {j: [j] for j in kept}
        for i in gone:
            sims = [float(torch.nn.functional.cosine_similarity(embeds[b, i].double(), embeds[b, j].double(), dim=0))
                    for j in kept]
            best = max(range(len(kept)), key=lambda t: (sims[t], -t))
            groups[kept[best]].append(i)
        for j, members in groups.items():
            out[b, j] = embeds[b, members].double().mean(dim=0).to(embeds.dtype)
    return out


@pytest.mark.parametrize("rank", ["none", "diversity"])
@pytest.mark.parametrize("name", ["llava", "qwen2_vl"])
def test_merge_before_the_decoder_matches_the_oracle(name, rank):
    model, batches = case(name)
    kwargs = batches[2]
    S = kwargs["input_ids"].shape[1]
    got, p = generate_pruned(model, kwargs, layer=0, keep=0.25, rank=rank, merge=True)
    removed = removed_image_tokens(p, kwargs)
    image = (kwargs["input_ids"] == IMG) & kwargs["attention_mask"].bool()
    keep = kwargs["attention_mask"].bool() & ~removed
    expect = generate_on_deleted_rows(model, kwargs, removed, update=lambda e: merged_by_hand(e, keep, image))
    assert_same_generation(got, expect, S)
    plain, q = generate_pruned(model, kwargs, layer=0, keep=0.25, rank=rank)
    assert torch.equal(q.keep_mask, p.keep_mask)  # merging changes what the kept tokens hold, not which are kept
    assert not torch.allclose(plain.logits[0], got.logits[0])
    assert p.to_dict()["merge"] is True


def test_merge_in_a_schedule_runs_and_changes_the_answer_logits():
    model, batches = case("llava")
    kwargs = batches[2]
    merged, p = generate_pruned(model, kwargs, schedule=[(0, 0.5), (2, 0.25)], rank="none", merge=True)
    plain, q = generate_pruned(model, kwargs, schedule=[(0, 0.5), (2, 0.25)], rank="none")
    assert torch.equal(p.keep_mask, q.keep_mask)
    assert not torch.allclose(plain.logits[0], merged.logits[0])


def test_merge_refusals():
    model, _ = case("llava")
    with pytest.raises(ValueError, match="when='prefill'"):
        flowkern.prune(model, layer=1, keep=4, rank="none", merge=True, when="decode")
    with pytest.raises(ValueError, match="no kept token to merge into"):
        flowkern.prune(model, layer=1, keep=0, merge=True)
