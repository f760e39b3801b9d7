"""The feature-family scorers (``diversity``, ``duplicates``, ``cls``) through flowkern.prune: the kept set of a
padded batch equals the scorer's own definition applied to what the test captures independently -- the hidden
states entering layer L from ``output_hidden_states`` (a float64 greedy max-min written here for ``diversity``), and
the vision tower's [CLS] attention from its eager ``output_attentions`` for ``cls``. The definitions themselves are
checked against brute force in test_scorers_features.py; this file checks what the wiring hands them."""

from __future__ import annotations

import pytest
import torch

import flowkern
from flowkern.hf.tiny import IMAGE_TOKEN as IMG
from flowkern.hf.tiny import tiny_vlm
from flowkern.scorers import ScoreInputs, get_scorer, select
from tests.fixtures import left_pad

pytestmark = pytest.mark.usefixtures("one_thread")

L, K = 2, 5
_CASE: dict = {}


def case():
    if not _CASE:
        model = tiny_vlm("llava", layers=4)
        r0 = [5, 6, 7] + [IMG] * 16 + [8, 9] + [IMG] * 16 + [10, 11, 12]
        r1 = [5, 6] + [IMG] * 16 + [9, 10, 11, 12]
        ids, mask = left_pad([r0, r1])
        pixels = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
        kwargs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels)
        with torch.no_grad():
            out = model(**kwargs, output_hidden_states=True)
            tower = model.model.vision_tower
            tower.set_attn_implementation("eager")
            try:
                towers = tower(pixels, output_attentions=True, output_hidden_states=True)
            finally:
                tower.set_attn_implementation("sdpa")
        _CASE.update(model=model, kwargs=kwargs, hidden=out.hidden_states, tower_attentions=towers.attentions)
    return _CASE


def image_mask(kwargs):
    return (kwargs["input_ids"] == IMG) & kwargs["attention_mask"].bool()


def kept(rank, layer=L, keep=K):
    c = case()
    with torch.no_grad(), flowkern.prune(c["model"], layer=layer, keep=keep, rank=rank) as p:
        c["model"].generate(**c["kwargs"], max_new_tokens=2, do_sample=False)
    return p.keep_mask & p.image_mask


def greedy_max_min(x, candidates, k):
    """bool [S]: DivPrune's greedy max-min set of k candidates on cosine distance (float64 loops)."""
    pos = [int(i) for i in torch.nonzero(candidates).flatten()]
    v = torch.nn.functional.normalize(x.double(), dim=-1)
    d = {(i, j): 1.0 - float(v[i] @ v[j]) for i in pos for j in pos}
    first = max(pos, key=lambda i: (min(d[i, j] for j in pos if j != i), -i))
    picked = [first]
    while len(picked) < min(k, len(pos)):
        rest = [i for i in pos if i not in picked]
        picked.append(max(rest, key=lambda i: (min(d[i, j] for j in picked), -i)))
    out = torch.zeros_like(candidates)
    out[picked] = True
    return out


def test_diversity_keeps_the_greedy_max_min_set_of_the_hidden_states_entering_layer_L():
    c = case()
    image = image_mask(c["kwargs"])
    hidden = c["hidden"][L]  # the input of decoder layer L
    expected = torch.stack([greedy_max_min(hidden[b], image[b], K) for b in range(image.shape[0])])
    assert torch.equal(kept("diversity"), expected)


def test_duplicates_scores_the_hidden_states_entering_layer_L():
    c = case()
    image, real = image_mask(c["kwargs"]), c["kwargs"]["attention_mask"].bool()
    B, S = image.shape
    inputs = ScoreInputs(layer=L, image=image, real=real, k=torch.full((B,), K), positions=torch.arange(S).expand(B, S),
                         hidden=c["hidden"][L])
    expected = select(get_scorer("duplicates").score(inputs), image, inputs.k)
    assert torch.equal(kept("duplicates"), expected)


@pytest.mark.parametrize("layer", [1, 3])
def test_cls_keeps_the_patches_the_towers_cls_attends_to_most(layer):
    c = case()
    model, image = c["model"], image_mask(c["kwargs"])
    feature_layer = model.config.vision_feature_layer  # the tower layer whose output feeds the projector
    att = c["tower_attentions"][feature_layer].double().mean(dim=1)[:, 0, 1:]  # [images, patches]: [CLS] row
    scores = torch.zeros(image.shape, dtype=torch.float64)
    scores[image] = att.reshape(-1)  # images fill the placeholders sample after sample
    expected = torch.zeros_like(image)
    for b in range(image.shape[0]):
        pos = torch.nonzero(image[b]).flatten()
        expected[b, pos[torch.topk(scores[b, pos], K).indices]] = True
    assert torch.equal(kept("cls", layer=layer), expected)


def test_cls_is_refused_before_any_work_for_a_tower_without_cls():
    model = tiny_vlm("qwen2_vl", layers=2)
    with pytest.raises(ValueError, match="qwen2_vl|Qwen"):
        flowkern.prune(model, layer=1, keep=4, rank="cls")
