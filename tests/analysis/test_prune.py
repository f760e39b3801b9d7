"""flowkern.prune / compact_cache_ on tiny random-weight VLMs vs an attention-mask oracle written here.

The oracle is a test-only attention function (registered with transformers' ``AttentionInterface``, eager softmax in
float64) that never removes a token: at decoder layers >= L it hides the *removed* image keys from the query rows at
positions >= ``q_from`` (``q_from = 0``: the paper's / FastV's masking variant of truncation; ``q_from = S``: only
decode-step queries, the semantics of compacting the cache after a full prefill). The removed positions come from
the prompt itself (``input_ids == IMG``) for ``keep=0``, and from prune's reported kept set for top-k, whose
ranking is checked separately against transformers' eager ``output_attentions`` (last prompt row, layer L-1, head
mean). Nothing here calls flowkern's pruning code to build the expected values.

Each family has 4 decoder layers (L in {1, mid=2, last=3}), fp32, greedy. Batch 2 is left padded with a different
number of image tokens per sample (ragged keep).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface, DynamicCache
from transformers.masking_utils import AttentionMaskInterface

import flowkern
from flowkern.hf import compat
from flowkern.hf.compat import cache_kwargs, output_cache
from flowkern.hf.tiny import IMAGE_TOKEN as IMG
from flowkern.hf.tiny import text_config, tiny_vlm
from flowkern.keymaps import cache_keymaps
from flowkern.plan import PruneSpec
from tests.fixtures import left_pad as _left_pad

N_LAYERS = 4
NEW = 4
ATOL = 1e-4
ORACLE = "fk_test_oracle"


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------------------
# the oracle


class _Spec:
    """What the oracle hides: removed [B, S] prompt positions, from layer ``layer`` on, for queries >= q_from."""

    def __init__(self) -> None:
        self.removed: torch.Tensor | None = None
        self.layer = 0
        self.q_from = 0
        self.rows: list[dict[int, torch.Tensor]] = []  # per call of layer 0: {layer: last-row probs [B, Sk]}


SPEC = _Spec()


def _oracle_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kw):
    B, Hq, Sq, D = query.shape
    Sk = key.shape[2]
    rep = Hq // key.shape[1]
    k = key.double().repeat_interleave(rep, dim=1)
    v = value.double().repeat_interleave(rep, dim=1)
    scale = scaling if scaling is not None else D**-0.5
    s = (query.double() @ k.transpose(-1, -2)) * scale
    qpos = torch.arange(Sk - Sq, Sk)
    kpos = torch.arange(Sk)
    vis = (kpos[None, :] <= qpos[:, None])[None, None].expand(B, 1, Sq, Sk)
    if attention_mask is not None:
        vis = vis & attention_mask[:, None, None, :Sk].bool()
    if SPEC.removed is not None and module.layer_idx >= SPEC.layer:
        removed = torch.zeros(B, Sk, dtype=torch.bool)
        n = min(Sk, SPEC.removed.shape[1])
        removed[:, :n] = SPEC.removed[:, :n]
        vis = vis & ~(removed[:, None, None, :] & (qpos >= SPEC.q_from)[None, None, :, None])
    p = torch.softmax(s.masked_fill(~vis, float("-inf")), dim=-1).nan_to_num(0.0)
    if module.layer_idx == 0:
        SPEC.rows.append({})
    SPEC.rows[-1][module.layer_idx] = p[:, :, -1].mean(dim=1).float()
    out = (p @ v).to(query.dtype)
    return out.transpose(1, 2).contiguous(), None


def _oracle_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None, attention_mask=None,
                 **kw):
    if attention_mask is None:
        return None
    return attention_mask.bool()[:, kv_offset : kv_offset + kv_length]


AttentionInterface.register(ORACLE, _oracle_attention)
AttentionMaskInterface.register(ORACLE, _oracle_mask)


def run_oracle(model, kwargs, removed, layer, q_from=0, new=NEW, **extra):
    """greedy generate with the oracle attention; removed: bool [B, S] or None (no pruning)."""
    SPEC.removed, SPEC.layer, SPEC.q_from, SPEC.rows = removed, layer, q_from, []
    model.set_attn_implementation({"text_config": ORACLE})
    try:
        with torch.no_grad():
            return model.generate(**kwargs, max_new_tokens=new, do_sample=False, output_logits=True,
                                  return_dict_in_generate=True, **extra)
    finally:
        model.set_attn_implementation({"text_config": "sdpa"})
        SPEC.removed = None


def run_pruned(model, kwargs, new=NEW, **prune_kwargs):
    with torch.no_grad(), flowkern.prune(model, **prune_kwargs) as p:
        out = model.generate(**kwargs, max_new_tokens=new, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    return out, p


def assert_same_generation(got, expect, atol=ATOL):
    assert torch.equal(got.sequences, expect.sequences)
    for a, b in zip(got.logits, expect.logits, strict=True):
        torch.testing.assert_close(a, b, atol=atol, rtol=0)


# ----------------------------------------------------------------------------------------------------------
# tiny models


class Case:
    def __init__(self, model, batches):
        self.model = model
        self.batches = batches  # {1: kwargs, 2: kwargs}


def _llava():
    model = tiny_vlm("llava", layers=N_LAYERS)
    r0 = [5, 6, 7] + [IMG] * 16 + [8, 9] + [IMG] * 16 + [10, 11, 12]  # two images: 32 image tokens
    r1 = [5, 6] + [IMG] * 16 + [9, 10, 11, 12]
    pv = torch.randn(3, 3, 8, 8)
    ids, mask = _left_pad([r0, r1])
    b2 = dict(input_ids=ids, attention_mask=mask, pixel_values=pv)
    b1 = dict(input_ids=torch.tensor([r1]), attention_mask=torch.ones(1, len(r1), dtype=torch.long),
              pixel_values=pv[2:])
    return Case(model, {1: b1, 2: b2})


def _llava_next():
    model = tiny_vlm("llava_next", layers=N_LAYERS)
    sizes = torch.tensor([[6, 30], [20, 6]])
    n0, n1 = 16 + 2 * (8 + 1), 16 + 8 * (2 + 1)  # base 4x4 + unpadded crops with one newline per row
    pv = torch.randn(2, 3, 3, 8, 8)
    r0 = [5, 6, 7] + [IMG] * n0 + [8, 9, 10]
    r1 = [5] + [IMG] * n1 + [8, 9, 10, 11]
    ids, mask = _left_pad([r0, r1])
    b2 = dict(input_ids=ids, attention_mask=mask, pixel_values=pv, image_sizes=sizes)
    b1 = dict(input_ids=torch.tensor([r0]), attention_mask=torch.ones(1, len(r0), dtype=torch.long),
              pixel_values=pv[:1], image_sizes=sizes[:1])
    return Case(model, {1: b1, 2: b2})


def _qwen(family):
    model = tiny_vlm(family, layers=N_LAYERS)
    # merge 2: image (1, 8, 8) -> 4x4 = 16 tokens, image (1, 4, 8) -> 2x4 = 8 tokens
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
    return Case(model, {1: b1, 2: b2})


def _qwen2_vl():
    return _qwen("qwen2_vl")


def _qwen2_5_vl():
    return _qwen("qwen2_5_vl")


BUILDERS = {"llava": _llava, "llava_next": _llava_next, "qwen2_vl": _qwen2_vl, "qwen2_5_vl": _qwen2_5_vl}
_built: dict = {}
_eager_rows: dict = {}


def case(name):
    if name not in _built:
        _built[name] = BUILDERS[name]()
    return _built[name]


def eager_last_row(name, batch):
    """transformers' eager attention of the last prompt row, head mean: float64 [layers, B, S]."""
    key = (name, batch)
    if key not in _eager_rows:
        c = case(name)
        c.model.set_attn_implementation({"text_config": "eager"})
        try:
            with torch.no_grad():
                out = c.model(**c.batches[batch], output_attentions=True)
        finally:
            c.model.set_attn_implementation({"text_config": "sdpa"})
        _eager_rows[key] = torch.stack([a[:, :, -1, :].double().mean(dim=1) for a in out.attentions])
    return _eager_rows[key]


def image_mask(kwargs):
    return (kwargs["input_ids"] == IMG) & kwargs["attention_mask"].bool()


# ----------------------------------------------------------------------------------------------------------
# prune during prefill == the masking oracle


TOPK = 5
CONFIGS = [(layer, keep) for keep in (0, TOPK) for layer in (1, 2, 3)]


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("layer,keep", CONFIGS, ids=[f"L{a}-k{b}" for a, b in CONFIGS])
@pytest.mark.parametrize("name", list(BUILDERS))
def test_matches_mask_oracle(name, layer, keep, batch):
    c = case(name)
    kwargs = c.batches[batch]
    img = image_mask(kwargs)
    got, p = run_pruned(c.model, kwargs, layer=layer, keep=keep, rank="attention")
    assert compat.attn_implementation(c.model.config.get_text_config()) == "sdpa"  # restored

    n_img = img.sum(dim=1)
    assert torch.equal(p.num_image_tokens, n_img)
    assert torch.equal(p.num_kept_image_tokens, n_img.clamp(max=keep))
    if keep == 0:
        removed = img
    else:
        # the ranking: eager attention of the last prompt row at layer L-1, head mean; top-k image tokens
        row = eager_last_row(name, batch)[layer - 1]
        torch.testing.assert_close(p.scores.double()[img], row[img], atol=1e-5, rtol=0)
        for b in range(img.shape[0]):
            pos = torch.nonzero(img[b]).flatten()
            top = pos[torch.topk(row[b, pos], TOPK).indices].sort().values
            assert torch.equal(p.kept_image_positions[b], top)
        kept = torch.zeros_like(img)
        for b, pos in enumerate(p.kept_image_positions):
            kept[b, pos] = True
        removed = img & ~kept
    assert torch.equal(p.keep_mask, kwargs["attention_mask"].bool() & ~removed)

    expect = run_oracle(c.model, kwargs, removed, layer)
    assert_same_generation(got, expect)

    # the cache: layers < L hold every token, layers >= L only the kept ones (+ fillers in shorter rows)
    cache = output_cache(got)
    S = kwargs["input_ids"].shape[1]
    total = S + NEW - 1
    real_kept = p.keep_mask.sum(dim=1)
    for i in range(N_LAYERS):
        length = cache.layers[i].keys.shape[-2]
        assert length == (total if i < layer else int(real_kept.max()) + NEW - 1)
    keymap = cache_keymaps(cache)[layer]
    assert sorted(cache_keymaps(cache)) == list(range(layer, N_LAYERS))
    assert torch.equal((keymap >= 0).sum(dim=1), real_kept + NEW - 1)
    assert torch.equal(keymap[:, -(NEW - 1) :], torch.arange(S, total).expand(img.shape[0], -1))
    held = torch.zeros(img.shape[0], total, dtype=torch.bool)
    for b in range(img.shape[0]):
        held[b, keymap[b][keymap[b] >= 0]] = True
    assert torch.equal(held[:, :S], p.keep_mask)


@pytest.mark.parametrize("rank", ["none", "random"])
def test_layer0_and_other_ranks_match_oracle(rank):
    """layer=0 (removal before the decoder: tests/analysis/test_prune_predecoder.py) equals the mask oracle too;
    rank none = first k, random = seeded."""
    c = case("llava")
    kwargs = c.batches[2]
    img = image_mask(kwargs)
    for layer in (0, 2):
        got, p = run_pruned(c.model, kwargs, layer=layer, keep=0.25, rank=rank, seed=3)
        n = img.sum(dim=1)
        assert torch.equal(p.num_kept_image_tokens, torch.floor(n * 0.25 + 0.5).long())
        kept = torch.zeros_like(img)
        for b, pos in enumerate(p.kept_image_positions):
            kept[b, pos] = True
            if rank == "none":
                assert torch.equal(pos, torch.nonzero(img[b]).flatten()[: pos.numel()])
        assert not (kept & ~img).any()
        assert_same_generation(got, run_oracle(c.model, kwargs, img & ~kept, layer))
    if rank == "random":
        _, again = run_pruned(c.model, kwargs, layer=2, keep=0.25, rank=rank, seed=3, new=1)
        _, other = run_pruned(c.model, kwargs, layer=2, keep=0.25, rank=rank, seed=4, new=1)
        assert torch.equal(again.keep_mask, p.keep_mask)
        assert not torch.equal(other.keep_mask, p.keep_mask)
        # the same setting as one PruneSpec value
        spec = PruneSpec(layer=2, keep=0.25, rank=rank, seed=3)
        with torch.no_grad(), flowkern.prune(c.model, spec) as q:
            c.model.generate(**kwargs, max_new_tokens=1, do_sample=False)
        assert q.spec == spec and q.layer == 2 and torch.equal(q.keep_mask, p.keep_mask)


def test_plain_forward_and_no_cache_generate():
    """A plain forward returns the compacted rows (last = last prompt token); hidden-state capture (out-of-place
    path) gives the same; generate(use_cache=False) recomputes the sequence and gives the cached result."""
    c = case("qwen2_vl")
    kwargs = c.batches[2]
    removed = image_mask(kwargs)
    expect = run_oracle(c.model, kwargs, removed, 2)
    with torch.no_grad(), flowkern.prune(c.model, layer=2, keep=0) as p:
        out = c.model(**kwargs)
        hid = c.model(**kwargs, output_hidden_states=True)
        nocache = c.model.generate(**kwargs, max_new_tokens=NEW, do_sample=False, use_cache=False)
    assert out.logits.shape[1] == p.token_positions.shape[1] == p.keymap.shape[1] < kwargs["input_ids"].shape[1]
    torch.testing.assert_close(out.logits[:, -1], expect.logits[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(hid.logits[:, -1], expect.logits[0], atol=ATOL, rtol=0)
    assert torch.equal(nocache, expect.sequences)


def test_beam_search_matches_oracle():
    """Beam search reorders the cache rows within each sample's beams; their key maps are identical, so it works.

    One image per sample: transformers 5.17 expands a multi-image sample's pixel_values per image, not per sample, for
    beam search, so the beams of a two-image LLaVA sample see different images (a transformers bug; 5.24 is right)."""
    c = case("llava_next")
    kwargs = c.batches[2]
    beams = dict(num_beams=3, output_scores=True)
    with torch.no_grad(), flowkern.prune(c.model, layer=2, keep=TOPK) as p:
        got = c.model.generate(**kwargs, max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True, **beams)
    assert p.keep_mask.shape[0] == 6  # the prompt expanded to 3 beams per sample
    kept = torch.zeros_like(p.keep_mask)
    for b, pos in enumerate(p.kept_image_positions):
        kept[b, pos] = True
    removed = (kwargs["input_ids"].repeat_interleave(3, dim=0) == IMG) & ~kept
    expect = run_oracle(c.model, kwargs, removed, 2, **beams)
    assert torch.equal(got.sequences, expect.sequences)
    torch.testing.assert_close(got.sequences_scores, expect.sequences_scores, atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------------------------------------
# compacting the cache after a full prefill


@pytest.mark.parametrize("name", ["llava", "qwen2_vl"])
def test_compact_after_prefill(name):
    """What matches when the cache is compacted after an unpruned prefill (when="decode" / compact_cache_):

    1. the first answer token and its logits are the unpruned model's;
    2. layers <= L: the same cache as pruning during the prefill (bitwise; layer L's keys/values are computed from
       layer L-1's output, which pruning does not change);
    3. layers >= L: exactly the full-prefill cache at the kept slots (bitwise); for layers > L that differs from the
       prefill-pruned cache (there the kept tokens were computed without the removed ones);
    4. every decode step equals the oracle in which only the decode queries (positions >= S) at layers >= L ignore
       the removed keys (logits <= 1e-4, same tokens);
    5. compact_cache_ by hand after a forward gives the same continuation as when="decode".
    """
    c = case(name)
    model = c.model
    kwargs = c.batches[2]
    L, S = 2, kwargs["input_ids"].shape[1]
    got, p = run_pruned(model, kwargs, layer=L, keep=3, rank="attention", when="decode")
    kept = p.keep_mask
    removed = image_mask(kwargs) & ~kept
    assert p.num_kept_image_tokens.tolist() == [3, 3]

    full = run_oracle(model, kwargs, None, L, new=1)
    torch.testing.assert_close(got.logits[0], full.logits[0], atol=ATOL, rtol=0)  # 1.
    expect = run_oracle(model, kwargs, removed, L, q_from=S)
    assert_same_generation(got, expect)  # 4.

    # caches right after the prefill: new=1 stops before any decode step
    during, _ = run_pruned(model, kwargs, new=1, layer=L, keep=3, rank="attention", when="prefill")
    after, _ = run_pruned(model, kwargs, new=1, layer=L, keep=3, rank="attention", when="decode")
    unpruned, _ = run_pruned(model, kwargs, new=1, layer=None)  # flowkern attention, nothing removed
    keymap = cache_keymaps(output_cache(after))[L]
    held = (keymap >= 0)[:, None, :, None]
    for i in range(N_LAYERS):
        a, d = output_cache(after).layers[i], output_cache(during).layers[i]
        u = output_cache(unpruned).layers[i]
        if i < L:
            assert torch.equal(a.keys, d.keys) and torch.equal(a.values, d.values)  # 2.
            assert torch.equal(a.keys, u.keys)
        else:
            assert a.keys.shape == d.keys.shape
            for mine, whole in ((a.keys, u.keys), (a.values, u.values)):
                gathered = whole.gather(2, keymap.clamp(min=0)[:, None, :, None].expand_as(mine))
                assert torch.equal(mine[held.expand_as(mine)], gathered[held.expand_as(mine)])  # 3.
            # layer L's keys/values come from layer L-1's output (whole in both); later layers' do not
            assert torch.equal(a.keys, d.keys) if i == L else not torch.allclose(a.keys, d.keys)

    # 5. by hand: a full prefill with any attention (here sdpa), compact_cache_, continue on the compacted cache
    with torch.no_grad():
        first = model.generate(**kwargs, max_new_tokens=1, do_sample=False, return_dict_in_generate=True)
    cache = output_cache(first)
    km = flowkern.compact_cache_(cache, kept, range(L, N_LAYERS), attention_mask=kwargs["attention_mask"])
    assert torch.equal(km, keymap)
    more = dict(input_ids=first.sequences, attention_mask=torch.cat([kwargs["attention_mask"],
                                                                      torch.ones(2, 1, dtype=torch.long)], dim=1))
    with torch.no_grad(), flowkern.prune(model) as serve:
        rest = model.generate(**more, **cache_kwargs(cache), max_new_tokens=NEW - 1, do_sample=False,
                              output_logits=True, return_dict_in_generate=True)
    assert len(serve.decode_seconds) == NEW - 1 and serve.decode_tokens_per_second > 0
    assert torch.equal(rest.sequences, got.sequences)
    for a, b in zip(rest.logits, got.logits[1:], strict=True):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def test_multi_turn_continuation():
    """Turn 2 appends several text tokens to a compacted cache (a multi-token forward on a non-empty cache): it and
    its decode steps equal the oracle where queries from turn 1's first decode step on ignore the removed keys."""
    c = case("llava")
    model = c.model
    kwargs = c.batches[2]
    L, S = 1, kwargs["input_ids"].shape[1]
    removed = image_mask(kwargs)
    first, _ = run_pruned(model, kwargs, layer=L, keep=0, when="decode", new=3)
    assert torch.equal(run_oracle(model, kwargs, removed, L, q_from=S, new=3).sequences, first.sequences)
    turn2 = torch.tensor([[20, 21, 22]] * 2)
    ids = torch.cat([first.sequences, turn2], dim=1)
    mask = torch.cat([kwargs["attention_mask"], torch.ones(2, ids.shape[1] - S, dtype=torch.long)], dim=1)
    with torch.no_grad(), flowkern.prune(model):
        got = model.generate(input_ids=ids, attention_mask=mask, **cache_kwargs(output_cache(first)),
                             max_new_tokens=NEW, do_sample=False, output_logits=True, return_dict_in_generate=True)
    # the oracle: the whole conversation from scratch, queries from position S on ignore the removed keys
    both = dict(input_ids=ids, attention_mask=mask, pixel_values=kwargs["pixel_values"])
    wider = torch.cat([removed, torch.zeros(2, ids.shape[1] - S, dtype=torch.bool)], dim=1)
    assert_same_generation(got, run_oracle(model, both, wider, L, q_from=S))
    assert len(cache_keymaps(output_cache(got))) == N_LAYERS - L


# ----------------------------------------------------------------------------------------------------------
# trace inside prune, errors, restore


def test_trace_inside_prune_matches_oracle_shares():
    """flowkern.trace labels a pruned layer's keys through its key map: shares equal the oracle's softmax mass."""
    c = case("llava")
    kwargs = c.batches[2]
    L = 2
    with torch.no_grad(), flowkern.prune(c.model, layer=L, keep=TOPK) as p, flowkern.trace(c.model) as flow:
        c.model.generate(**kwargs, max_new_tokens=NEW, do_sample=False)
    kept = torch.zeros_like(p.keep_mask)
    for b, pos in enumerate(p.kept_image_positions):
        kept[b, pos] = True
    removed = image_mask(kwargs) & ~kept
    run_oracle(c.model, kwargs, removed, L)
    labels = flow.segment_ids  # [B, S + NEW - 1]: hand-checked in test_hf_trace; here the keys are what matters
    for t, rows in enumerate(SPEC.rows):
        lab = labels[:, : rows[0].shape[1]]
        for layer in range(N_LAYERS):
            expect = torch.stack([(rows[layer] * (lab == s)).sum(-1) for s in range(4)], dim=-1)
            torch.testing.assert_close(flow.step_shares[t, layer], expect, atol=1e-5, rtol=0)
            img_att = flow.image_token_attention[t, layer]
            pos = flow.image_token_positions
            valid = torch.arange(pos.shape[1])[None, :] < image_mask(kwargs).sum(dim=1)[:, None]
            torch.testing.assert_close(img_att[valid], rows[layer].gather(1, pos)[valid], atol=1e-5, rtol=0)
    assert flow.step_shares[:, L:, :, 1].sum() > 0  # kept image tokens still get attention


def test_errors_and_restore():
    c = case("llava")
    model = c.model
    kwargs = c.batches[2]
    with pytest.raises(ValueError, match="layer >= 1"):
        flowkern.prune(model, layer=0, keep=4, rank="attention")
    with pytest.raises(ValueError, match="layer must be"):
        flowkern.prune(model, layer=N_LAYERS)
    for bad in (-1, True, 1.5, "4"):
        with pytest.raises(ValueError, match="keep must be"):
            flowkern.prune(model, layer=1, keep=bad)
    with pytest.raises(ValueError, match="rank must be"):
        flowkern.prune(model, layer=1, rank="topk")
    with pytest.raises(ValueError, match="either a PruneSpec"):
        flowkern.prune(model, PruneSpec(layer=1), keep=3)
    with pytest.raises(NotImplementedError, match="DynamicCache"):
        with torch.no_grad(), flowkern.prune(model, layer=1):
            model.generate(**kwargs, max_new_tokens=2, do_sample=False, cache_implementation="static")
    right = dict(kwargs, input_ids=kwargs["input_ids"].flip(1), attention_mask=kwargs["attention_mask"].flip(1))
    with pytest.raises(ValueError, match="left padding"):
        with torch.no_grad(), flowkern.prune(model, layer=1):
            model(**right)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(**kwargs, **cache_kwargs(cache), use_cache=True)
    kept = torch.ones_like(kwargs["input_ids"], dtype=torch.bool)
    with pytest.raises(ValueError, match="layers must be in 1"):
        flowkern.compact_cache_(cache, kept, [0, 1])
    with pytest.raises(ValueError, match="kept must be"):
        flowkern.compact_cache_(cache, kept[:, 1:], [1])

    # a compacted cache changed behind flowkern's back (cropped): the key map no longer fits, and that is said
    out, _ = run_pruned(model, kwargs, new=2, layer=2, keep=0)
    output_cache(out).crop(-1)
    with pytest.raises(RuntimeError, match="key map covers"):
        with torch.no_grad(), flowkern.prune(model):
            model(input_ids=out.sequences[:, -1:], **cache_kwargs(output_cache(out)),
                  attention_mask=torch.cat([kwargs["attention_mask"], torch.ones(2, 1, dtype=torch.long)], 1))

    def hooks():
        return [(n, len(m._forward_pre_hooks), len(m._forward_hooks)) for n, m in model.named_modules()]

    before = hooks()
    with pytest.raises(RuntimeError, match="boom"):
        with flowkern.prune(model, layer=2, keep=3):
            assert compat.attn_implementation(model.config.text_config) == "flowkern"
            assert compat.attn_implementation(model.config.vision_config) == "sdpa"
            raise RuntimeError("boom")
    assert compat.attn_implementation(model.config.text_config) == "sdpa"
    assert hooks() == before
    assert not any(k.startswith("_flowkern") for m in model.modules() for k in vars(m))


def test_deepstack_layers_refused():
    from transformers import Qwen3VLConfig

    vision = dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, patch_size=2, spatial_merge_size=2,
                  temporal_patch_size=2, in_channels=3, out_hidden_size=32, num_position_embeddings=16,
                  deepstack_visual_indexes=[0, 1])
    cfg = Qwen3VLConfig(vision_config=vision, text_config=text_config(None, num_hidden_layers=N_LAYERS, head_dim=8),
                        image_token_id=IMG)

    class Stub(torch.nn.Module):
        config = cfg

    for layer in (0, 1):  # before the decoder too: the removed tokens' DeepStack features would have to go as well
        with pytest.raises(NotImplementedError, match="DeepStack"):
            flowkern.prune(Stub(), layer=layer, keep=0)
    with pytest.raises(NotImplementedError, match="DeepStack"):
        flowkern.prune(Stub(), schedule=[(1, 0.5), (3, 0.25)])  # a stage before it
    flowkern.prune(Stub(), layer=2, keep=0)  # past the DeepStack layers: fine
