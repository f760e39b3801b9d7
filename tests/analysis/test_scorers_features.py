"""The feature-family scorers (``diversity``, ``duplicates``) and the vision tower's ``cls`` scorer, each against a
brute-force oracle of its paper's definition (float64 loops over small inputs), plus their registry / JSON round
trip through PruneSpec."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flowkern.plan import PRUNE_OPTIONS, PruneSpec
from flowkern.scorers import ScoreInputs, get_scorer, scorer_from_json, scorer_names, scorer_to_json, select
from flowkern.scorers.features import Diversity, Duplicates
from flowkern.scorers.tower import CLS

# ----------------------------------------------------------------------------------------------------------
# oracles: the definitions, written as loops in float64


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    na, nb = float(a.norm()), float(b.norm())
    return 0.0 if na == 0 or nb == 0 else float(a @ b) / (na * nb)


def divprune_oracle(vectors: list[torch.Tensor], k: int) -> list[int]:
    """DivPrune's greedy max-min picks (indices into ``vectors``), first pick = farthest from its nearest other."""
    n = len(vectors)
    d = [[1.0 - _cos(vectors[i], vectors[j]) for j in range(n)] for i in range(n)]
    picked: list[int] = []
    for _ in range(min(k, n)):
        best, best_gap = None, -math.inf
        for i in range(n):
            if i in picked:
                continue
            others = [d[i][j] for j in (picked if picked else range(n)) if j != i]
            gap = min(others) if others else math.inf
            if gap > best_gap:  # strict: ties keep the earlier token
                best, best_gap = i, gap
        picked.append(best)
    return picked


def dart_oracle(vectors: list[torch.Tensor], text: list[torch.Tensor], k: int, pivots: int, text_pivots: int) -> set:
    """DART as documented: image pivots (largest L1 norm) kept first, then least max-similarity to any pivot."""
    def top(vs: list[torch.Tensor], m: int) -> list[int]:
        return sorted(range(len(vs)), key=lambda i: (-float(vs[i].abs().sum()), i))[:m]

    img_p = top(vectors, pivots)
    piv = [vectors[i] for i in img_p] + [text[i] for i in top(text, text_pivots)]
    rest = [i for i in range(len(vectors)) if i not in img_p]
    dup = {i: max((_cos(vectors[i], p) for p in piv), default=0.0) for i in rest}
    order = img_p + sorted(rest, key=lambda i: (dup[i], i))
    return set(order[:k])


def _batch(seed: int, counts: list[int], S: int = 14, D: int = 6, dtype=torch.float64):
    """Hidden states [B, S, D] with each row's image tokens at a different offset, left padding, text around."""
    g = torch.Generator().manual_seed(seed)
    B = len(counts)
    hidden = torch.randn(B, S, D, generator=g, dtype=dtype)
    image = torch.zeros(B, S, dtype=torch.bool)
    real = torch.zeros(B, S, dtype=torch.bool)
    for b, n in enumerate(counts):
        pad = b % 3
        real[b, pad:] = True
        start = pad + 1 + b % 2
        image[b, start:start + n] = True
        hidden[b, :pad] = 0.0
    return hidden, image, real


def _inputs(hidden, image, real, k=None) -> ScoreInputs:
    B, S = image.shape
    k = torch.full((B,), 1, dtype=torch.long) if k is None else k
    return ScoreInputs(layer=0, image=image, real=real, k=k, positions=torch.arange(S).expand(B, S), hidden=hidden)


# ----------------------------------------------------------------------------------------------------------
# diversity


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), counts=st.lists(st.integers(0, 8), min_size=1, max_size=3))
def test_diversity_is_the_greedy_set_for_every_k(seed, counts):
    hidden, image, real = _batch(seed, counts)
    B = len(counts)
    oracle = [divprune_oracle([hidden[b, r] for r in torch.nonzero(image[b]).flatten().tolist()], counts[b])
              for b in range(B)]
    whole = Diversity().score(_inputs(hidden, image, real, torch.tensor(counts)))   # the whole greedy order
    assert whole.dtype == torch.float32 and whole.shape == image.shape
    for kk in range(0, max(counts) + 2):
        k = torch.full((B,), kk)
        for scores in (whole, Diversity().score(_inputs(hidden, image, real, k))):   # ... and only k steps
            kept = select(scores, image, k)
            for b in range(B):
                rows = torch.nonzero(image[b]).flatten().tolist()
                want = {rows[i] for i in oracle[b][:kk]}
                assert set(torch.nonzero(kept[b]).flatten().tolist()) == want, (b, kk)


def test_diversity_ties_and_duplicates_go_to_the_earlier_token():
    # rows 0 and 2 identical, row 1 orthogonal, row 3 = -row 0 (distance 2 to rows 0 and 2)
    e = torch.eye(3, dtype=torch.float64)
    hidden = torch.stack([e[0], e[1], e[0], -e[0]])[None]
    image = torch.ones(1, 4, dtype=torch.bool)
    scores = Diversity().score(_inputs(hidden, image, image, torch.tensor([4])))
    # nearest-other distances 0, 1, 0, 1: pick 1 (tie with 3: the earlier); distances to {1}: 1, -, 1, 1: pick 0;
    # to {1, 0}: row 2 is 0, row 3 is 1: pick 3, then 2
    oracle = divprune_oracle(list(hidden[0]), 4)
    order = torch.argsort(-scores[0], stable=True).tolist()
    assert order == oracle == [1, 0, 3, 2]


def test_diversity_float32_and_fp16_inputs_give_finite_scores():
    hidden, image, real = _batch(3, [5, 0, 7])
    for dtype in (torch.float32, torch.float16):
        scores = Diversity().score(_inputs(hidden.to(dtype), image, real))
        assert torch.isfinite(scores).all() and (scores[~image] == 0).all()
        assert (scores[image] > 0).all()


# ----------------------------------------------------------------------------------------------------------
# duplicates


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), counts=st.lists(st.integers(0, 8), min_size=1, max_size=3),
       pivots=st.integers(0, 3), text_pivots=st.integers(0, 3))
def test_duplicates_is_the_documented_dart_set(seed, counts, pivots, text_pivots):
    hidden, image, real = _batch(seed, counts)
    scorer = Duplicates(pivots=pivots, text_pivots=text_pivots)
    scores = scorer.score(_inputs(hidden, image, real))
    assert torch.isfinite(scores).all()
    for kk in range(0, max(counts) + 2):
        kept = select(scores, image, torch.full((len(counts),), kk))
        for b in range(len(counts)):
            rows = torch.nonzero(image[b]).flatten().tolist()
            text_rows = [r for r in range(image.shape[1]) if real[b, r] and not image[b, r]
                         and rows and r > rows[0]]
            want = dart_oracle([hidden[b, r] for r in rows], [hidden[b, r] for r in text_rows], kk, pivots,
                               text_pivots)
            assert set(torch.nonzero(kept[b]).flatten().tolist()) == {rows[i] for i in want}, (b, kk)


def test_duplicates_removes_the_copies_of_a_pivot_first():
    e = torch.eye(4, dtype=torch.float64)
    pivot = 3 * e[0]                                        # largest L1 norm: the pivot
    hidden = torch.stack([e[0] + 0.01 * e[1], pivot, e[2], e[0], e[3]])[None]
    image = torch.ones(1, 5, dtype=torch.bool)
    scores = Duplicates(pivots=1, text_pivots=0).score(_inputs(hidden, image, image))
    kept = select(scores, image, torch.tensor([3]))
    assert kept[0].tolist() == [False, True, True, False, True]   # the two near-copies of the pivot go


def test_duplicates_rejects_bad_parameters():
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="pivots"):
            Duplicates(pivots=bad)
        with pytest.raises(ValueError, match="text_pivots"):
            Duplicates(text_pivots=bad)


def test_feature_scorers_refuse_missing_hidden():
    hidden, image, real = _batch(0, [3])
    bad = ScoreInputs(layer=0, image=image, real=real, k=torch.tensor([1]), positions=torch.zeros_like(image).long())
    for scorer in (Diversity(), Duplicates()):
        with pytest.raises(ValueError, match="inputs.hidden"):
            scorer.score(bad)


# ----------------------------------------------------------------------------------------------------------
# registry and JSON


def test_registered_with_their_needs():
    assert {"diversity", "duplicates", "cls"} <= set(scorer_names())
    assert get_scorer("diversity") == Diversity() and Diversity.needs == frozenset({"hidden"})
    assert get_scorer("duplicates", pivots=2) == Duplicates(pivots=2)
    assert CLS.needs == frozenset({"cls_attention"}) and CLS.before_decoder
    with pytest.raises(ValueError, match="duplicates"):
        get_scorer("duplicates", pivot=2)


@pytest.mark.parametrize("rank", ["diversity", "duplicates", "cls", Diversity(), Duplicates(),
                                  Duplicates(pivots=2, text_pivots=0), CLS()])
def test_prune_spec_json_round_trip(rank):
    spec = PruneSpec(layer=0, keep=0.25, rank=rank, merge=True)
    for options in (False, True):
        data = spec.to_dict(options=options)
        back = PruneSpec.from_dict(data, options=options)
        assert scorer_to_json(back.rank) == scorer_to_json(rank)
        if isinstance(rank, Duplicates) and rank != Duplicates():
            assert back.rank == rank and data[PRUNE_OPTIONS["rank"] if options else "rank"] == {
                "name": "duplicates", "pivots": 2, "text_pivots": 0}
    assert scorer_from_json({"name": "duplicates", "pivots": 3}) == Duplicates(pivots=3)


# ----------------------------------------------------------------------------------------------------------
# cls: the vision tower's [CLS] attention


def _llava(tower_layers: int, feature_layer: int, strategy: str):
    """A tiny LLaVA-1.5 (CLIP 8 px, patch 2: 16 patches + [CLS]) with a tower of ``tower_layers`` layers."""
    from transformers import LlavaConfig

    from flowkern.hf.tiny import IMAGE_TOKEN, build_model, clip_config, text_config

    vision = dict(clip_config(8), num_hidden_layers=tower_layers)
    return build_model(LlavaConfig(vision_config=vision, text_config=text_config(num_hidden_layers=1),
                                   image_token_index=IMAGE_TOKEN, vision_feature_layer=feature_layer,
                                   vision_feature_select_strategy=strategy))


@pytest.mark.parametrize("tower_layers, feature_layer, strategy, layer",
                         [(1, -1, "default", 0), (3, -2, "default", 1), (3, 2, "full", 1)])
def test_cls_scores_match_the_towers_eager_attention(tower_layers, feature_layer, strategy, layer):
    from flowkern.hf.tiny import IMAGE_TOKEN
    from flowkern.hf.tower import TowerCLS

    model = _llava(tower_layers, feature_layer, strategy)
    n = 16 + (strategy == "full")                 # image tokens per image: the patches (and the [CLS] with "full")
    ids = torch.tensor([[0, 0, 1, 5] + [IMAGE_TOKEN] * n + [6, 7],
                        [1, 5, 6] + [IMAGE_TOKEN] * n + [8, 9, 10]])
    pixels = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    image = ids == IMAGE_TOKEN
    with TowerCLS(model) as tower, torch.no_grad():
        model(input_ids=ids, pixel_values=pixels, attention_mask=ids != 0)
        model(input_ids=ids[:, -1:], attention_mask=torch.ones(2, 1, dtype=torch.long))   # a text-only forward
    scores = tower.scores_for(image)
    assert (tower.layer, tower.first) == (layer, int(strategy == "default"))

    model.set_attn_implementation({"vision_config": "eager"})
    with torch.no_grad():
        out = model.model.vision_tower(pixels, output_attentions=True)
    # FasterVLM / VisionZip read attentions[vision_feature_layer] for a negative index: the same layer
    want = out.attentions[layer].double().mean(dim=1)[:, 0, 17 - n:]            # [images, image tokens]
    got = scores[image].double().view(2, n)
    assert (got - want).abs().max() <= 1e-5
    assert (scores[~image] == 0).all()
    survivors = torch.tensor([[2, 3, 5, 9, 21], [-1, 0, 4, 18, 21]])      # a later stage's rows, a filler (-1)
    later = tower.scores_for(image, survivors)
    assert torch.equal(later[0], scores[0, survivors[0]])
    assert later[1, 0] == 0 and torch.equal(later[1, 1:], scores[1, survivors[1, 1:]])
    inputs = dataclasses.replace(_inputs(None, image, ids != 0), cls_attention=scores)
    kept = select(CLS().score(inputs), image, torch.tensor([4, 4]))
    for b in range(2):
        top = torch.topk(want[b], 4).indices.sort().values
        assert torch.equal(torch.nonzero(kept[b]).flatten(), torch.nonzero(image[b]).flatten()[top])


def test_cls_tower_layer_and_strategy_come_from_the_adapter():
    from flowkern.hf.models import get_adapter
    from flowkern.hf.tiny import tiny_vlm

    config = tiny_vlm("llava").config
    adapter = get_adapter(config)
    config.vision_config.num_hidden_layers = 24
    config.vision_feature_layer = -2
    assert adapter.tower_cls(config) == (22, 1)          # LLaVA-1.5: the penultimate layer, [CLS] dropped
    config.vision_feature_select_strategy = "full"
    config.vision_feature_layer = 5
    assert adapter.tower_cls(config) == (4, 0)
    for bad in (0, [-2, -1], 25):
        config.vision_feature_layer = bad
        with pytest.raises(ValueError, match="vision_feature_layer"):
            adapter.tower_cls(config)


@pytest.mark.parametrize("family, why", [("qwen2_vl", "no \\[CLS\\] token"), ("llava_onevision", "no \\[CLS\\] token"),
                                         ("gemma3", "no \\[CLS\\] token"), ("llava_next", "one to one"),
                                         ("mistral3", "no \\[CLS\\] token"), ("internvl", "one to one"),
                                         ("instructblip", "one to one")])
def test_cls_refuses_towers_without_a_cls_token(family, why):
    from flowkern.hf.tiny import tiny_vlm
    from flowkern.hf.tower import TowerCLS

    with pytest.raises(ValueError, match=f"rank='cls': {family}.*({why})"):
        TowerCLS(tiny_vlm(family))


def test_cls_scores_for_refuses_a_mismatched_mask():
    from flowkern.hf.tiny import IMAGE_TOKEN, tiny_vlm
    from flowkern.hf.tower import TowerCLS

    model = tiny_vlm("llava")
    tower = TowerCLS(model)
    ids = torch.tensor([[1] + [IMAGE_TOKEN] * 16 + [5]])
    with pytest.raises(ValueError, match="no vision-tower forward"):
        tower.scores_for(ids == IMAGE_TOKEN)
    with tower, torch.no_grad():
        model(input_ids=ids, pixel_values=torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="15 image tokens"):
        tower.scores_for((ids == IMAGE_TOKEN) & (torch.arange(18) > 1))
