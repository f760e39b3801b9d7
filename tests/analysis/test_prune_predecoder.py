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
from flowkern.hf.compat import output_cache
from flowkern.hf.tiny import IMAGE_TOKEN as IMG
from flowkern.hf.tiny import tiny_vlm
from flowkern.keymaps import cache_keymaps
from tests.fixtures import left_pad as _left_pad

N_LAYERS = 3
NEW = 4
ATOL = 1e-5

pytestmark = pytest.mark.usefixtures("one_thread")


def _llava():
    model = tiny_vlm("llava", layers=N_LAYERS)
    r0 = [5, 6, 7] + [IMG] * 16 + [8, 9] + [IMG] * 16 + [10, 11, 12]  # two images: 32 image tokens
    r1 = [5, 6] + [IMG] * 16 + [9, 10, 11, 12]
    pv = torch.randn(3, 3, 8, 8)
    ids, mask = _left_pad([r0, r1])
    b2 = dict(input_ids=ids, attention_mask=mask, pixel_values=pv)
    b1 = dict(input_ids=torch.tensor([r1]), attention_mask=torch.ones(1, len(r1), dtype=torch.long),
              pixel_values=pv[2:])
    return model, {1: b1, 2: b2}


def _llava_next():
    model = tiny_vlm("llava_next", layers=N_LAYERS)
    sizes = torch.tensor([[6, 30], [20, 6]])
    n0, n1 = 16 + 2 * (8 + 1), 16 + 8 * (2 + 1)
    pv = torch.randn(2, 3, 3, 8, 8)
    r0 = [5, 6, 7] + [IMG] * n0 + [8, 9, 10]
    r1 = [5] + [IMG] * n1 + [8, 9, 10, 11]
    ids, mask = _left_pad([r0, r1])
    b2 = dict(input_ids=ids, attention_mask=mask, pixel_values=pv, image_sizes=sizes)
    b1 = dict(input_ids=torch.tensor([r0]), attention_mask=torch.ones(1, len(r0), dtype=torch.long),
              pixel_values=pv[:1], image_sizes=sizes[:1])
    return model, {1: b1, 2: b2}


def _qwen2_vl():
    model = tiny_vlm("qwen2_vl", layers=N_LAYERS)
    r0 = [5, 102] + [IMG] * 16 + [103, 8, 9, 10]
    r1 = [5, 6, 102] + [IMG] * 8 + [103, 8, 9]
    pv = torch.randn(64 + 32, 24)
    thw = torch.tensor([[1, 8, 8], [1, 4, 8]])
    ids, mask = _left_pad([r0, r1])
    b2 = dict(input_ids=ids, attention_mask=mask, pixel_values=pv, image_grid_thw=thw,
              mm_token_type_ids=(ids == IMG).int())
    i1 = torch.tensor([r0])
    b1 = dict(input_ids=i1, attention_mask=torch.ones_like(i1), pixel_values=pv[:64], image_grid_thw=thw[:1],
              mm_token_type_ids=(i1 == IMG).int())
    return model, {1: b1, 2: b2}


BUILDERS = {"llava": _llava, "llava_next": _llava_next, "qwen2_vl": _qwen2_vl}
_built: dict = {}


def case(name):
    if name not in _built:
        torch.manual_seed(0)
        _built[name] = BUILDERS[name]()
    return _built[name]


def language_model_inputs(model, kwargs):
    """What the language model gets at the unpruned prefill of generate: (inputs_embeds, attention_mask,
    position_ids) -- the model's own merge of the image features into the embeddings, its own positions."""
    seen = {}

    def grab(module, args, kw):
        seen.setdefault("kw", {k: kw.get(k) for k in ("inputs_embeds", "attention_mask", "position_ids")})

    handle = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model.generate(**kwargs, max_new_tokens=1, do_sample=False)
    finally:
        handle.remove()
    kw = seen["kw"]
    assert kw["position_ids"] is not None  # generate passes the positions; the oracle passes them on
    return kw["inputs_embeds"], kw["attention_mask"], kw["position_ids"]


def deleted(model, kwargs, removed, update=None):
    """The oracle's inputs: the language model's prompt inputs with the ``removed`` rows deleted (bool [B, S]),
    left-padded (zero embeddings, mask 0), positions gathered; ``update(embeds)`` edits the embeddings first."""
    embeds, mask, pos = language_model_inputs(model, kwargs)
    if mask is None:  # generate drops an all-ones mask
        mask = kwargs["attention_mask"]
    if update is not None:
        embeds = update(embeds)
    keep = mask.bool() & ~removed
    n = int(keep.sum(dim=1).max())
    B, _, D = embeds.shape
    e = torch.zeros(B, n, D)
    m = torch.zeros(B, n, dtype=torch.long)
    p = torch.zeros(*pos.shape[:-1], n, dtype=pos.dtype) if pos.dim() == 3 else torch.zeros(B, n, dtype=pos.dtype)
    for b in range(B):
        idx = torch.nonzero(keep[b]).flatten()
        e[b, n - idx.numel():] = embeds[b, idx]
        m[b, n - idx.numel():] = 1
        if pos.dim() == 3:
            p[:, b, n - idx.numel():] = pos[:, b, idx]
        else:
            p[b, n - idx.numel():] = pos[b if pos.shape[0] == B else 0, idx]
    return dict(inputs_embeds=e, attention_mask=m, position_ids=p)


def run_oracle(model, kwargs, removed, update=None, **extra):
    with torch.no_grad():
        return model.generate(**deleted(model, kwargs, removed, update), max_new_tokens=NEW, do_sample=False,
                              output_logits=True, return_dict_in_generate=True, **extra)


def run_pruned(model, kwargs, shapes=None, **prune_kwargs):
    """Greedy generate under flowkern.prune; ``shapes`` collects the hidden-state shape entering decoder layer 0."""
    hook = None
    if shapes is not None:
        layer0 = model.model.language_model.layers[0]
        hook = layer0.register_forward_pre_hook(lambda m, a, kw: shapes.append(
            tuple((a[0] if a else kw["hidden_states"]).shape)), with_kwargs=True)
    try:
        with torch.no_grad(), flowkern.prune(model, **prune_kwargs) as p:
            out = model.generate(**kwargs, max_new_tokens=NEW, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
    finally:
        if hook is not None:
            hook.remove()
    return out, p


def assert_same(got, expect, S):
    assert torch.equal(got.sequences[:, S:], expect.sequences)
    for a, b in zip(got.logits, expect.logits, strict=True):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def removed_of(p, kwargs):
    img = (kwargs["input_ids"] == IMG) & kwargs["attention_mask"].bool()
    kept = torch.zeros_like(img)
    for b, pos in enumerate(p.kept_image_positions):
        kept[b, pos] = True
    assert not (kept & ~img).any()
    return img & ~kept


CASES = [(0, "none"), (0.25, "none"), (0.25, "random"), (5, "grid")]


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("keep,rank", CASES, ids=[f"k{k}-{r}" for k, r in CASES])
@pytest.mark.parametrize("name", list(BUILDERS))
def test_layer0_matches_deleted_embeddings(name, keep, rank, batch):
    model, batches = case(name)
    kwargs = batches[batch]
    S = kwargs["input_ids"].shape[1]
    shapes: list = []
    got, p = run_pruned(model, kwargs, shapes, layer=0, keep=keep, rank=rank, seed=1)
    img = (kwargs["input_ids"] == IMG) & kwargs["attention_mask"].bool()
    n = img.sum(dim=1)
    expect_k = n.clamp(max=keep) if isinstance(keep, int) else torch.floor(n * keep + 0.5).long()
    assert torch.equal(p.num_kept_image_tokens, expect_k)
    removed = removed_of(p, kwargs)
    if rank == "none":
        for b, pos in enumerate(p.kept_image_positions):
            assert torch.equal(pos, torch.nonzero(img[b]).flatten()[: pos.numel()])
    assert_same(got, run_oracle(model, kwargs, removed), S)

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
    removed = removed_of(q, kwargs)
    assert torch.equal(p.keep_mask[::3], q.keep_mask)
    expect = run_oracle(model, kwargs, removed, **beams)
    assert torch.equal(got.sequences[:, S:], expect.sequences)
    torch.testing.assert_close(got.sequences_scores, expect.sequences_scores, atol=1e-4, rtol=0)
    assert torch.equal(nocache, greedy)
    assert torch.equal(greedy[:, S:], run_oracle(model, kwargs, removed).sequences)


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
    removed = removed_of(p, kwargs)
    assert_same(got, run_oracle(model, kwargs, removed, update=scaled), S)
    plain, _ = run_pruned(model, kwargs, layer=0, keep=0.5, rank="none")
    assert not torch.allclose(plain.logits[0], got.logits[0])


def test_layer0_refusals():
    model, batches = case("llava")
    with pytest.raises(ValueError, match="layer >= 1"):
        flowkern.prune(model, layer=0, keep=4, rank="attention")
    with pytest.raises(ValueError, match="when='decode'"):
        flowkern.prune(model, layer=0, keep=0, when="decode")
    # a cache pruned before the decoder cannot be continued by generate with a new prompt (layer 0's length)
    kwargs = batches[1]
    got, _ = run_pruned(model, kwargs, layer=0, keep=0)
    more = torch.cat([got.sequences, torch.tensor([[20, 21]])], dim=1)
    with pytest.raises(NotImplementedError, match="continuing such a cache with several new tokens"):
        with torch.no_grad(), flowkern.prune(model):
            model.generate(input_ids=more, attention_mask=torch.ones_like(more), cache=output_cache(got),
                           max_new_tokens=1, do_sample=False)


def test_layer0_plain_forwards_without_positions():
    """A plain forward (no position_ids: the language model would number the tokens 0..S-1) and a decode step by
    hand on its cache (numbered S: the tokens seen, not the slots layer 0 holds) equal the language model run on the
    deleted rows with those positions."""
    from transformers import DynamicCache

    from flowkern.hf.compat import cache_kwargs

    model, batches = case("llava")
    kwargs = batches[1]
    S = kwargs["input_ids"].shape[1]
    cache = DynamicCache(config=model.config)
    nxt = torch.tensor([[7]])
    with torch.no_grad(), flowkern.prune(model, layer=0, keep=0.5, rank="none") as p:
        first = model(**kwargs, **cache_kwargs(cache), use_cache=True)
        step = model(input_ids=nxt, attention_mask=torch.ones(1, S + 1, dtype=torch.long), **cache_kwargs(cache),
                     use_cache=True)
    removed = removed_of(p, kwargs)
    embeds, _, _ = language_model_inputs(model, kwargs)
    keep = torch.nonzero(~removed[0]).flatten()
    lm = model.model.language_model
    ref_cache = DynamicCache(config=model.config)
    with torch.no_grad():
        a = lm(inputs_embeds=embeds[:, keep], position_ids=keep[None], cache=ref_cache, use_cache=True)
        b = lm(inputs_embeds=model.get_input_embeddings()(nxt), position_ids=torch.tensor([[S]]), cache=ref_cache,
               use_cache=True)
    torch.testing.assert_close(first.logits[:, -1], model.lm_head(a.last_hidden_state[:, -1]), atol=ATOL, rtol=0)
    torch.testing.assert_close(step.logits[:, -1], model.lm_head(b.last_hidden_state[:, -1]), atol=ATOL, rtol=0)
    assert first.logits.shape[1] == keep.numel() < S  # the plain forward returns the compacted rows
