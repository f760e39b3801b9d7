"""flowkern.prune(schedule=...): multi-stage pruning against a dense attention-mask oracle written here.

The oracle (a test-only attention function, eager softmax in float64) never removes a token: the decoder layers of
stage i's range (from its layer to the next stage's) hide from every query the image keys removed at stages <= i.
The removed sets come from prune's record (``stage_keep_masks``); for ``rank="attention"`` each stage's choice is
checked against the oracle's own last-row attention at the layer before it, among the survivors of the stages
before. Nothing here calls flowkern's pruning code to build the expected values.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

import flowkern
from flowkern.hf.compat import output_cache
from flowkern.hf.tiny import IMAGE_TOKEN as IMG
from flowkern.keymaps import cache_keymaps
from flowkern.plan import PruneSpec
from tests.fixtures import prune_batches

N_LAYERS = 4
NEW = 4
ATOL = 1e-4
ORACLE = "fk_test_schedule_oracle"

pytestmark = pytest.mark.usefixtures("one_thread")


class _Spec:
    def __init__(self) -> None:
        self.removed: dict[int, torch.Tensor] = {}  # layer -> bool [B, S] prompt positions it cannot see
        self.rows: list[dict[int, torch.Tensor]] = []  # per forward: {layer: last-row probs [B, Sk], head mean}


SPEC = _Spec()


def _oracle_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kw):
    B, Hq, Sq, D = query.shape
    Sk = key.shape[2]
    rep = Hq // key.shape[1]
    k = key.double().repeat_interleave(rep, dim=1)
    v = value.double().repeat_interleave(rep, dim=1)
    s = (query.double() @ k.transpose(-1, -2)) * (scaling if scaling is not None else D**-0.5)
    qpos, kpos = torch.arange(Sk - Sq, Sk), torch.arange(Sk)
    vis = (kpos[None, :] <= qpos[:, None])[None, None].expand(B, 1, Sq, Sk)
    if attention_mask is not None:
        vis = vis & attention_mask[:, None, None, :Sk].bool()
    removed = SPEC.removed.get(module.layer_idx)
    if removed is not None:
        hide = torch.zeros(B, Sk, dtype=torch.bool)
        n = min(Sk, removed.shape[1])
        hide[:, :n] = removed[:, :n]
        vis = vis & ~hide[:, None, None, :]
    p = torch.softmax(s.masked_fill(~vis, float("-inf")), dim=-1).nan_to_num(0.0)
    if module.layer_idx == 0:
        SPEC.rows.append({})
    SPEC.rows[-1][module.layer_idx] = p[:, :, -1].mean(dim=1)
    return (p @ v).to(query.dtype).transpose(1, 2).contiguous(), None


def _oracle_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None, attention_mask=None,
                 **kw):
    return None if attention_mask is None else attention_mask.bool()[:, kv_offset: kv_offset + kv_length]


AttentionInterface.register(ORACLE, _oracle_attention)
AttentionMaskInterface.register(ORACLE, _oracle_mask)


def run_oracle(model, kwargs, removed, hook=None, **extra):
    """greedy generate with the oracle attention; removed: {layer: bool [B, S]}."""
    SPEC.removed, SPEC.rows = removed, []
    model.set_attn_implementation({"text_config": ORACLE})
    try:
        with torch.no_grad():
            return model.generate(**kwargs, max_new_tokens=NEW, do_sample=False, output_logits=True,
                                  return_dict_in_generate=True, **extra)
    finally:
        model.set_attn_implementation({"text_config": "sdpa"})
        SPEC.removed = {}


def run_pruned(model, kwargs, **prune_kwargs):
    with torch.no_grad(), flowkern.prune(model, **prune_kwargs) as p:
        out = model.generate(**kwargs, max_new_tokens=NEW, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    return out, p


def assert_same_generation(got, expect):
    assert torch.equal(got.sequences, expect.sequences)
    for a, b in zip(got.logits, expect.logits, strict=True):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


_built: dict = {}


def case(name):
    if name not in _built:
        _built[name] = prune_batches(name, N_LAYERS)
    return _built[name]


def expected_k(keep, n_orig, survivors):
    k = n_orig.clamp(max=keep) if isinstance(keep, int) else torch.floor(n_orig * keep + 0.5).long()
    return torch.minimum(k, survivors)


THREE = ((1, 0.5), (2, 3), (3, 0.125))
BEFORE = ((0, 0.5), (2, 0.25))
CASES = [(THREE, r) for r in ("attention", "none", "random")] + [(BEFORE, r) for r in ("none", "random")]


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("schedule,rank", CASES, ids=[f"{len(s)}st{s[0][0]}-{r}" for s, r in CASES])
@pytest.mark.parametrize("name", ["llava", "qwen2_vl"])
def test_schedule_matches_mask_oracle(name, schedule, rank, batch):
    model, batches = case(name)
    kwargs = batches[batch]
    img = (kwargs["input_ids"] == IMG) & kwargs["attention_mask"].bool()
    got, p = run_pruned(model, kwargs, schedule=schedule, rank=rank, seed=2)
    assert p.stages == schedule and p.layer == schedule[0][0] and len(p.stage_keep_masks) == len(schedule)

    # nested choices with the stated counts: keep counts the sample's original image tokens
    n_orig = img.sum(dim=1)
    survivors = img
    removed: dict[int, torch.Tensor] = {}
    bounds = [layer for layer, _ in schedule] + [N_LAYERS]
    for i, (layer, keep) in enumerate(schedule):
        kept = p.stage_keep_masks[i] & img
        assert not (kept & ~survivors).any()
        assert torch.equal(kept.sum(dim=1), expected_k(keep, n_orig, survivors.sum(dim=1)))
        assert torch.equal(p.stage_keep_masks[i], kwargs["attention_mask"].bool() & (~img | kept))
        if rank == "none":
            for b in range(img.shape[0]):
                first = torch.nonzero(survivors[b]).flatten()[: int(kept[b].sum())]
                assert torch.equal(torch.nonzero(kept[b]).flatten(), first)
        for j in range(layer, bounds[i + 1]):
            removed[j] = img & ~kept
        survivors = kept
    assert torch.equal(p.keep_mask, p.stage_keep_masks[-1])
    assert torch.equal(p.num_kept_image_tokens, survivors.sum(dim=1))
    assert [s["num_kept_image_tokens"] for s in p.to_dict()["stages"]] == [
        (m & img).sum(dim=1).tolist() for m in p.stage_keep_masks]

    expect = run_oracle(model, kwargs, removed)
    assert_same_generation(got, expect)

    if rank == "attention":  # each stage: top-k of the oracle's last-row attention before it, among the survivors
        rows = SPEC.rows[0]
        before = img
        for i, (layer, _) in enumerate(schedule):
            kept = p.stage_keep_masks[i] & img
            for b in range(img.shape[0]):
                pos = torch.nonzero(before[b]).flatten()
                top = pos[torch.topk(rows[layer - 1][b, pos], int(kept[b].sum())).indices].sort().values
                assert torch.equal(torch.nonzero(kept[b]).flatten(), top)
            before = kept

    # the cache: each stage's layers hold that stage's tokens (+ fillers), one key-map group per stage
    cache = output_cache(got)
    maps = cache_keymaps(cache)
    S = kwargs["input_ids"].shape[1]
    assert sorted(maps) == list(range(schedule[0][0], N_LAYERS))
    for i, (layer, _) in enumerate(schedule):
        rows_i = int(p.stage_keep_masks[i].sum(dim=1).max())
        for j in range(layer, bounds[i + 1]):
            assert cache.layers[j].keys.shape[-2] == rows_i + NEW - 1
            held = torch.zeros(img.shape[0], S + NEW - 1, dtype=torch.bool)
            for b in range(img.shape[0]):
                held[b, maps[j][b][maps[j][b] >= 0]] = True
            assert torch.equal(held[:, :S], p.stage_keep_masks[i]) and held[:, S:].all()
    for j in range(schedule[0][0]):
        assert cache.layers[j].keys.shape[-2] == S + NEW - 1


def test_schedule_without_cache_and_as_spec():
    """generate(use_cache=False) replays the prompt's decisions; a PruneSpec with the schedule gives the same."""
    model, batches = case("qwen2_vl")
    kwargs = batches[2]
    spec = PruneSpec(schedule=((-3, 0.5), (-1, 2)), rank="random", seed=5)
    with torch.no_grad(), flowkern.prune(model, spec) as p:
        cached = model.generate(**kwargs, max_new_tokens=NEW, do_sample=False)
        nocache = model.generate(**kwargs, max_new_tokens=NEW, do_sample=False, use_cache=False)
    assert p.stages == ((1, 0.5), (3, 2))  # negative layers count from the end
    assert torch.equal(cached, nocache)
    with torch.no_grad(), flowkern.prune(model, schedule=[(1, 0.5), (3, 2)], rank="random", seed=5) as q:
        again = model.generate(**kwargs, max_new_tokens=NEW, do_sample=False)
    assert torch.equal(again, cached) and torch.equal(q.keep_mask, p.keep_mask)


def test_update_at_a_decoder_layer():
    """Narrowing.update at layer L > 0 replaces the hidden states entering L before compaction: the oracle scales the
    same rows in a pre-hook of layer L at the prefill."""
    from flowkern.prune import Pruning

    model, batches = case("llava")
    kwargs = batches[2]
    L = 2

    class Scaling(Pruning):
        def _narrowing(self, stage, hidden):
            narrowed = super()._narrowing(stage, hidden)
            narrowed.update = hidden * 1.5
            return narrowed

    with torch.no_grad(), Scaling(model, PruneSpec(layer=L, keep=3, rank="none")) as p:
        got = model.generate(**kwargs, max_new_tokens=NEW, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    img = (kwargs["input_ids"] == IMG) & kwargs["attention_mask"].bool()

    def scale(module, args, kw):
        hidden = args[0] if args else kw["hidden_states"]
        if hidden.shape[1] > 1:  # the prefill
            return (hidden * 1.5, *args[1:]), kw
        return None

    handle = model.model.language_model.layers[L].register_forward_pre_hook(scale, with_kwargs=True)
    try:
        expect = run_oracle(model, kwargs, {j: img & ~p.keep_mask for j in range(L, N_LAYERS)})
    finally:
        handle.remove()
    assert_same_generation(got, expect)


def test_schedule_errors():
    model, _ = case("llava")
    with pytest.raises(NotImplementedError, match="when='decode'"):
        flowkern.prune(model, schedule=[(1, 0.5), (2, 0.25)], when="decode")
    with pytest.raises(ValueError, match="layer >= 1"):
        flowkern.prune(model, schedule=[(0, 0.5), (2, 0.25)], rank="attention")
    flowkern.prune(model, schedule=[(0, 0), (2, 0.25)], rank="attention")  # keep=0 at layer 0 needs no ranking
    with pytest.raises(ValueError, match="schedule layer must be"):
        flowkern.prune(model, schedule=[(1, 0.5), (N_LAYERS, 0.25)])
    with pytest.raises(ValueError, match="not both"):
        flowkern.prune(model, layer=1, schedule=[(1, 0.5)])
    with pytest.raises(ValueError, match="strictly increasing"):
        flowkern.prune(model, schedule=[(2, 0.5), (1, 0.25)])
