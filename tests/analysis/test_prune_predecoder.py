"""flowkern.prune(layer=0): removal before the decoder, against an oracle written here.

The oracle never prunes: it takes the inputs the language model gets in an unpruned ``generate`` (the model's own
image merge: ``inputs_embeds``, the 2D mask, ``position_ids``, M-RoPE for Qwen2-VL), deletes the removed rows,
left-pads the rows to one length, and runs transformers' ``generate`` on those embeddings with the original positions
passed explicitly (sdpa attention, no flowkern attached). Pruning must give the same greedy tokens and logits
(<= 1e-5, fp32) and really run the language model on the shorter sequence.
"""

from __future__ import annotations

import pytest
import torch

import flowkern
from flowkern.hf.compat import cache_kwargs, output_cache
from flowkern.hf.tiny import IMAGE_TOKEN as IMG
from flowkern.keymaps import cache_keymaps
from tests.fixtures import (
    PRUNE_NEW_TOKENS,
    assert_same_generation,
    generate_on_deleted_rows,
    generate_pruned,
    lm_prompt_inputs,
    prune_batches,
    removed_image_tokens,
)

N_LAYERS = 3
NEW = PRUNE_NEW_TOKENS  # the oracle generates as many
ATOL = 1e-5

pytestmark = pytest.mark.usefixtures("one_thread")


_built: dict = {}


def case(name):
    if name not in _built:
        _built[name] = prune_batches(name, N_LAYERS)
    return _built[name]


CASES = [(0, "none"), (0.25, "none"), (0.25, "random"), (5, "grid")]


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("keep,rank", CASES, ids=[f"k{k}-{r}" for k, r in CASES])
@pytest.mark.parametrize("name", ["llava", "llava_next", "qwen2_vl"])
def test_layer0_matches_deleted_embeddings(name, keep, rank, batch):
    model, batches = case(name)
    kwargs = batches[batch]
    S = kwargs["input_ids"].shape[1]
    shapes: list = []
    got, p = generate_pruned(model, kwargs, shapes, layer=0, keep=keep, rank=rank, seed=1)
    img = (kwargs["input_ids"] == IMG) & kwargs["attention_mask"].bool()
    n = img.sum(dim=1)
    expect_k = n.clamp(max=keep) if isinstance(keep, int) else torch.floor(n * keep + 0.5).long()
    assert torch.equal(p.num_kept_image_tokens, expect_k)
    removed = removed_image_tokens(p, kwargs)
    if rank == "none":
        for b, pos in enumerate(p.kept_image_positions):
            assert torch.equal(pos, torch.nonzero(img[b]).flatten()[: pos.numel()])
    assert_same_generation(got, generate_on_deleted_rows(model, kwargs, removed), S)

    # the language model really ran on the shorter sequence, and every layer's cache holds the kept tokens only
    kept_rows = int((kwargs["attention_mask"].bool() & ~removed).sum(dim=1).max())
    assert shapes[0][:2] == (kwargs["input_ids"].shape[0], kept_rows) and kept_rows < S
    assert all(s[1] == 1 for s in shapes[1:])  # decode steps: one new token each
    cache = output_cache(got)
    maps = cache_keymaps(cache)
    assert sorted(maps) == list(range(N_LAYERS))
    for i in range(N_LAYERS):
        assert cache.layers[i].keys.shape[-2] == kept_rows + NEW - 1
    held = torch.zeros(img.shape[0], S + NEW - 1, dtype=torch.bool)
    for b in range(img.shape[0]):
        held[b, maps[0][b][maps[0][b] >= 0]] = True
    assert torch.equal(held[:, :S], p.keep_mask) and held[:, S:].all()


def test_layer0_beam_search_and_no_cache():
    """Beam search (the cache rows reordered between a sample's beams) and generate(use_cache=False) (the whole
    sequence again at every step, narrowed at the entry each time) give the oracle's answers."""
    model, batches = case("llava_next")
    kwargs = batches[2]
    S = kwargs["input_ids"].shape[1]
    beams = dict(num_beams=3, output_scores=True)
    with torch.no_grad(), flowkern.prune(model, layer=0, keep=0.25, rank="none") as p:
        got = model.generate(**kwargs, max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True, **beams)
    assert p.keep_mask.shape[0] == 6  # the prompt expanded to 3 beams per sample
    with torch.no_grad(), flowkern.prune(model, layer=0, keep=0.25, rank="none") as q:
        greedy = model.generate(**kwargs, max_new_tokens=NEW, do_sample=False)
        nocache = model.generate(**kwargs, max_new_tokens=NEW, do_sample=False, use_cache=False)
    removed = removed_image_tokens(q, kwargs)
    assert torch.equal(p.keep_mask[::3], q.keep_mask)
    expect = generate_on_deleted_rows(model, kwargs, removed, **beams)
    assert torch.equal(got.sequences[:, S:], expect.sequences)
    torch.testing.assert_close(got.sequences_scores, expect.sequences_scores, atol=1e-4, rtol=0)
    assert torch.equal(nocache, greedy)
    assert torch.equal(greedy[:, S:], generate_on_deleted_rows(model, kwargs, removed).sequences)


def test_layer0_update_replaces_the_embeddings():
    """A planner's Narrowing.update replaces the hidden states before compaction: at layer 0 the embeddings (here:
    every image row scaled by 1.5, by hand); the oracle scales the same rows before deleting."""
    from flowkern.prune import Pruning

    model, batches = case("llava")
    kwargs = batches[2]
    S = kwargs["input_ids"].shape[1]
    img = (kwargs["input_ids"] == IMG) & kwargs["attention_mask"].bool()

    def scaled(embeds):
        return torch.where(img[:, :, None], embeds * 1.5, embeds)

    class Scaling(Pruning):
        def _narrowing(self, stage, hidden):
            narrowed = super()._narrowing(stage, hidden)
            narrowed.update = scaled(hidden)
            return narrowed

    with torch.no_grad(), Scaling(model, flowkern.plan.PruneSpec(layer=0, keep=0.5, rank="none")) as p:
        got = model.generate(**kwargs, max_new_tokens=NEW, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    removed = removed_image_tokens(p, kwargs)
    assert_same_generation(got, generate_on_deleted_rows(model, kwargs, removed, update=scaled), S)
    plain, _ = generate_pruned(model, kwargs, layer=0, keep=0.5, rank="none")
    assert not torch.allclose(plain.logits[0], got.logits[0])


def test_layer0_refusals():
    model, batches = case("llava")
    with pytest.raises(ValueError, match="layer >= 1"):
        flowkern.prune(model, layer=0, keep=4, rank="attention")
    with pytest.raises(ValueError, match="when='decode'"):
        flowkern.prune(model, layer=0, keep=0, when="decode")
    # a cache pruned before the decoder cannot be continued by generate with a new prompt (layer 0's length)
    kwargs = batches[1]
    got, _ = generate_pruned(model, kwargs, layer=0, keep=0)
    more = torch.cat([got.sequences, torch.tensor([[20, 21]])], dim=1)
    with pytest.raises(NotImplementedError, match="continuing such a cache with several new tokens"):
        with torch.no_grad(), flowkern.prune(model):
            model.generate(input_ids=more, attention_mask=torch.ones_like(more), **cache_kwargs(output_cache(got)),
                           max_new_tokens=1, do_sample=False)


def test_layer0_plain_forwards_without_positions():
    """A plain forward (no position_ids: the language model would number the tokens 0..S-1) and a decode step by
    hand on its cache (numbered S: the tokens seen, not the slots layer 0 holds) equal the language model run on the
    deleted rows with those positions."""
    from transformers import DynamicCache

    model, batches = case("llava")
    kwargs = batches[1]
    S = kwargs["input_ids"].shape[1]
    cache = DynamicCache(config=model.config)
    nxt = torch.tensor([[7]])
    with torch.no_grad(), flowkern.prune(model, layer=0, keep=0.5, rank="none") as p:
        first = model(**kwargs, **cache_kwargs(cache), use_cache=True)
        step = model(input_ids=nxt, attention_mask=torch.ones(1, S + 1, dtype=torch.long), **cache_kwargs(cache),
                     use_cache=True)
    removed = removed_image_tokens(p, kwargs)
    embeds, _, _ = lm_prompt_inputs(model, kwargs)
    keep = torch.nonzero(~removed[0]).flatten()
    lm = model.model.language_model
    ref_cache = DynamicCache(config=model.config)
    with torch.no_grad():
        a = lm(inputs_embeds=embeds[:, keep], position_ids=keep[None], **cache_kwargs(ref_cache), use_cache=True)
        b = lm(inputs_embeds=model.get_input_embeddings()(nxt), position_ids=torch.tensor([[S]]),
               **cache_kwargs(ref_cache), use_cache=True)
    torch.testing.assert_close(first.logits[:, -1], model.lm_head(a.last_hidden_state[:, -1]), atol=ATOL, rtol=0)
    torch.testing.assert_close(step.logits[:, -1], model.lm_head(b.last_hidden_state[:, -1]), atol=ATOL, rtol=0)
    assert first.logits.shape[1] == keep.numel() < S  # the plain forward returns the compacted rows
