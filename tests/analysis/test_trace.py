"""flowkern.trace on tiny random-weight VLMs vs transformers' own eager attention weights (docs/reliability.md).

Every model is built from a config (no download), fp32, greedy. For each family:

- the tokens generated inside ``flowkern.trace`` equal the model's own sdpa and eager runs;
- ``step_shares`` / ``shares`` equal the same quantities computed here from ``generate(output_attentions=True)``
  (eager) with segment labels written by hand for each prompt (not by flowkern's labeller);
- ``image_attention`` equals the eager attention of the answer rows to each image token, placed on a grid written
  by hand from the config;
- batches are 2 samples, left padded, of different prompt lengths.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import flowkern
from flowkern.hf import compat
from flowkern.hf.attention import STATE_ATTR
from flowkern.hf.tiny import IMAGE_TOKEN as IMG
from flowkern.hf.tiny import VIDEO_TOKEN as VID
from flowkern.hf.tiny import text_config, tiny_vlm
from tests.fixtures import labelled_prompts as _prompts
from tests.fixtures import raster as _raster

NEW_TOKENS = 4
ATOL = 1e-4


class Case:
    """A tiny model, its generate kwargs, hand-written labels and image grids (sequence positions per cell)."""

    def __init__(self, model: torch.nn.Module, kwargs: dict, labels: torch.Tensor, grids: list[list[tuple]]) -> None:
        self.model, self.kwargs, self.labels, self.grids = model, kwargs, labels, grids


def _llava() -> Case:
    model = tiny_vlm("llava")
    n = 16  # (8 / 2) ** 2, CLS dropped
    ids, mask, labels = _prompts([
        [("sys", [5, 6, 7]), ("img", [IMG] * n), ("user", [8, 9]), ("img", [IMG] * n), ("user", [10, 11, 12])],
        [("sys", [5, 6]), ("img", [IMG] * n), ("user", [9, 10, 11, 12])],
    ])
    pad0 = 0
    pad1 = ids.shape[1] - (2 + n + 4)
    grids = [
        [(0, "image", _raster(pad0 + 3, 4, 4)), (1, "image", _raster(pad0 + 3 + n + 2, 4, 4))],
        [(0, "image", _raster(pad1 + 2, 4, 4))],
    ]
    kwargs = dict(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(3, 3, 8, 8))
    return Case(model, kwargs, labels, grids)


def _llava_next() -> Case:
    model = tiny_vlm("llava_next")
    # base 4x4; (6, 30) -> 1x2 crops of 4x4 = 4x8, unpadded to 2x8 rows; (20, 6) -> 2x1 = 8x4, unpadded to 8x2
    sizes = torch.tensor([[6, 30], [20, 6]])
    n0, n1 = 16 + 2 * (8 + 1), 16 + 8 * (2 + 1)
    with torch.no_grad():
        pv = torch.randn(2, 3, 3, 8, 8)
        feats = model.model.get_image_features(pixel_values=pv, image_sizes=sizes, return_dict=True).pooler_output
    assert [f.shape[0] for f in feats] == [n0, n1]  # the hand-derived layout matches the model's packing
    ids, mask, labels = _prompts([
        [("sys", [5, 6, 7]), ("img", [IMG] * n0), ("user", [8, 9, 10])],
        [("sys", [5]), ("img", [IMG] * n1), ("user", [8, 9, 10, 11])],
    ])
    pad0, pad1 = ids.shape[1] - (3 + n0 + 3), ids.shape[1] - (1 + n1 + 4)
    grids = [
        [(0, "base", _raster(pad0 + 3, 4, 4)), (0, "crops", _raster(pad0 + 3 + 16, 2, 8, row_stride=9))],
        [(0, "base", _raster(pad1 + 1, 4, 4)), (0, "crops", _raster(pad1 + 1 + 16, 8, 2, row_stride=3))],
    ]
    kwargs = dict(input_ids=ids, attention_mask=mask, pixel_values=pv, image_sizes=sizes)
    return Case(model, kwargs, labels, grids)


def _llava_onevision() -> Case:
    model = tiny_vlm("llava_onevision")
    # base 4x4 (SigLIP: no CLS); (6, 30) -> crops 2x8 (+ newlines); (30, 30) -> 2x2 crops = 8x8, shrunk to at most
    # 1 base image: 4x4 (+ newlines); video: 2 frames pooled to 2x2, then one newline
    sizes = torch.tensor([[6, 30], [30, 30]])
    n0, n1, nv = 16 + 2 * 9, 16 + 4 * 5, 2 * 4 + 1
    pv, pvv = torch.randn(2, 5, 3, 8, 8), torch.randn(1, 2, 3, 8, 8)
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=pv, image_sizes=sizes, return_dict=True).pooler_output
    assert [f.shape[0] for f in feats] == [n0, n1]  # (the model itself checks the video token count)
    ids, mask, labels = _prompts([
        [("sys", [5, 6]), ("img", [IMG] * n0), ("user", [8, 9, 10])],
        [("sys", [5]), ("img", [IMG] * n1), ("user", [8]), ("img", [VID] * nv), ("user", [9, 10])],
    ])
    pad0 = ids.shape[1] - (2 + n0 + 3)
    grids = [
        [(0, "base", _raster(pad0 + 2, 4, 4)), (0, "crops", _raster(pad0 + 2 + 16, 2, 8, row_stride=9))],
        [(0, "base", _raster(1, 4, 4)), (0, "crops", _raster(1 + 16, 4, 4, row_stride=5)),
         (1, "frame0", _raster(1 + n1 + 1, 2, 2)), (1, "frame1", _raster(1 + n1 + 1 + 4, 2, 2))],
    ]
    kwargs = dict(input_ids=ids, attention_mask=mask, pixel_values=pv, image_sizes=sizes, pixel_values_videos=pvv)
    return Case(model, kwargs, labels, grids)


def _qwen(family: str, video: bool) -> Case:
    model = tiny_vlm(family)
    # merge 2: image (1, 4, 6) -> 2x3 tokens, image (1, 4, 4) -> 2x2, video (2, 4, 4) -> 2 frames of 2x2
    s1 = [("sys", [5, 6, 102]), ("img", [IMG] * 4), ("user", [103, 8, 9])]
    if video:
        s1 += [("user", [102]), ("img", [VID] * 8), ("user", [103, 10])]
    ids, mask, labels = _prompts([[("sys", [5, 102]), ("img", [IMG] * 6), ("user", [103, 8, 9, 10])], s1])
    pad0, pad1 = ids.shape[1] - (2 + 6 + 4), ids.shape[1] - sum(len(t) for _, t in s1)
    grids = [[(0, "image", _raster(pad0 + 2, 2, 3))], [(0, "image", _raster(pad1 + 3, 2, 2))]]
    kwargs = dict(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(24 + 16, 24),
                  image_grid_thw=torch.tensor([[1, 4, 6], [1, 4, 4]]), mm_token_type_ids=(ids == IMG).int())
    if video:
        v0 = pad1 + 3 + 4 + 3 + 1
        grids[1] += [(1, "frame0", _raster(v0, 2, 2)), (1, "frame1", _raster(v0 + 4, 2, 2))]
        kwargs.update(pixel_values_videos=torch.randn(32, 24), video_grid_thw=torch.tensor([[2, 4, 4]]),
                      mm_token_type_ids=(ids == IMG).int() + 2 * (ids == VID).int())
    return Case(model, kwargs, labels, grids)


def _qwen2_vl() -> Case:
    return _qwen("qwen2_vl", video=True)


def _qwen2_5_vl() -> Case:
    return _qwen("qwen2_5_vl", video=False)


def _qwen3_vl() -> Case:
    return _qwen("qwen3_vl", video=False)


def _internvl() -> Case:
    model = tiny_vlm("internvl")
    # tiles of (8 / 2 * 0.5)^2 = 2x2 tokens; <img>=101, </img>=102
    ids, mask, labels = _prompts([
        [("sys", [5, 6, 101]), ("img", [IMG] * 8), ("user", [102, 8, 9, 10])],
        [("sys", [3, 5, 6, 101]), ("img", [IMG] * 4), ("user", [102, 7, 101]), ("img", [IMG] * 4), ("user", [102, 8])],
    ])
    pad0 = ids.shape[1] - (3 + 8 + 4)
    grids = [
        [(0, "tile0", _raster(pad0 + 3, 2, 2)), (0, "tile1", _raster(pad0 + 7, 2, 2))],
        [(0, "tile0", _raster(4, 2, 2)), (1, "tile0", _raster(11, 2, 2))],
    ]
    kwargs = dict(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(4, 3, 8, 8))
    return Case(model, kwargs, labels, grids)


def _instructblip() -> Case:
    model = tiny_vlm("instructblip")
    # the processor puts the query placeholders first: no system tokens
    ids, mask, labels = _prompts([[("img", [IMG] * 4), ("user", [1, 8, 9, 10])],
                                  [("img", [IMG] * 4), ("user", [1, 7, 8, 9, 10, 11])]])
    grids = [[(0, "queries", _raster(2, 1, 4))], [(0, "queries", _raster(0, 1, 4))]]
    q = torch.tensor([[3, 4, 5], [3, 4, 6]])
    kwargs = dict(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(2, 3, 8, 8), qformer_input_ids=q,
                  qformer_attention_mask=torch.ones_like(q))
    return Case(model, kwargs, labels, grids)


BUILDERS = {
    "llava": _llava,
    "llava_next": _llava_next,
    "llava_onevision": _llava_onevision,
    "qwen2_vl": _qwen2_vl,
    "qwen2_5_vl": _qwen2_5_vl,
    "qwen3_vl": _qwen3_vl,
    "internvl": _internvl,
    "instructblip": _instructblip,
}
_built: dict[str, Case] = {}


def case(name: str) -> Case:
    if name not in _built:
        _built[name] = BUILDERS[name]()
    return _built[name]


def _eager(c: Case, **extra: object) -> object:
    """generate with transformers' eager attention, returning attention weights; restores the implementation."""
    c.model.set_attn_implementation("eager")
    try:
        return c.model.generate(**c.kwargs, **extra, output_attentions=True, return_dict_in_generate=True)
    finally:
        c.model.set_attn_implementation("sdpa")


def _expected(attentions: tuple, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """From eager weights: step shares [T, L, B, 4] and per-key attention of the answer rows [T, L, B, Sk_prompt]."""
    shares, keys = [], []
    prompt_len = labels.shape[1]
    for t, step in enumerate(attentions):
        full = torch.cat([labels, torch.full((labels.shape[0], t), 3)], dim=1)  # generated tokens fed back
        rows = [layer[:, :, -1, :].double().mean(dim=1) for layer in step]  # answer row, head mean: [B, Sk]
        shares.append(torch.stack([torch.stack([(p * (full == c)).sum(-1) for c in range(4)], -1) for p in rows]))
        keys.append(torch.stack([p[:, :prompt_len] for p in rows]))
    return torch.stack(shares).float(), torch.stack(keys).float()


@pytest.mark.parametrize("name", list(BUILDERS))
def test_generate_matches_eager(name):
    c = case(name)
    model = c.model
    sdpa_tokens = model.generate(**c.kwargs, max_new_tokens=NEW_TOKENS, do_sample=False)
    eager = _eager(c, max_new_tokens=NEW_TOKENS, do_sample=False)
    with flowkern.trace(model, image_inputs=c.kwargs) as flow:
        assert compat.attn_implementation(model.config.get_text_config()) == "flowkern"
        assert compat.attn_implementation(model.config.vision_config) == "sdpa"
        tokens = model.generate(**c.kwargs, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert compat.attn_implementation(model.config.get_text_config()) == "sdpa"
    assert torch.equal(tokens, sdpa_tokens)
    assert torch.equal(tokens, eager.sequences)

    # labels: the hand-written prompt labels, then one "generated" per fed-back token
    B, S = c.labels.shape
    assert torch.equal(flow.segment_ids[:, :S], c.labels)
    assert torch.equal(flow.segment_ids[:, S:], torch.full((B, NEW_TOKENS - 1), 3))

    exp_shares, exp_keys = _expected(eager.attentions, c.labels)
    n_layers = model.config.get_text_config().num_hidden_layers
    assert flow.num_layers == n_layers and flow.num_steps == NEW_TOKENS and flow.batch_size == B
    assert flow.step_shares.shape == (NEW_TOKENS, n_layers, B, 4) and flow.step_shares.dtype == torch.float32
    torch.testing.assert_close(flow.step_shares, exp_shares, atol=ATOL, rtol=0)
    torch.testing.assert_close(flow.shares, exp_shares.mean(dim=(0, 2)), atol=ATOL, rtol=0)
    torch.testing.assert_close(flow.sample_shares, exp_shares.mean(dim=0), atol=ATOL, rtol=0)
    assert flow.valid.all()
    # the first answer row (last prompt position) sees no generated token; later rows do
    assert flow.step_shares[0, :, :, 3].abs().max() == 0
    assert (flow.step_shares[1:, :, :, 3] > 0).all()

    # Figure 2B: attention of the answer rows to each image token, on the hand-written grid
    for b, grids in enumerate(c.grids):
        got = [(g.image, g.name, g.shape) for g in flow.image_grids[b]]
        assert got == [(i, n, tuple(pos.shape)) for i, n, pos in grids]
        for image, view, pos in grids:
            for layer in (0, n_layers - 1):
                expect = exp_keys[:, layer, b][:, pos].mean(dim=0)
                torch.testing.assert_close(flow.image_attention(layer, sample=b, image=image, view=view), expect,
                                           atol=ATOL, rtol=0)
            expect_step = exp_keys[-1].mean(dim=0)[b][pos]
            torch.testing.assert_close(flow.image_attention(None, sample=b, image=image, view=view, step=-1),
                                       expect_step, atol=ATOL, rtol=0)
    json.dumps(flow.to_dict())


@pytest.mark.parametrize("name", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_forward_is_one_step(name, grad):
    """A plain forward is one step (its last row); with grad enabled, attention goes through differentiable SDPA."""
    c = case(name)
    model = c.model
    kwargs = c.kwargs
    model.set_attn_implementation("eager")
    with torch.no_grad():
        eager = model(**kwargs, output_attentions=True)
    model.set_attn_implementation("sdpa")
    with torch.set_grad_enabled(grad), flowkern.trace(model) as flow:
        out = model(**kwargs)
    real = kwargs["attention_mask"].bool()  # padding rows differ by design (flowkern: 0, eager: uniform)
    torch.testing.assert_close(out.logits[real], eager.logits[real], atol=1e-4, rtol=1e-4)
    if grad:
        out.logits[:, -1].sum().backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        model.zero_grad(set_to_none=True)
    exp_shares, _ = _expected((eager.attentions,), c.labels)
    assert flow.num_steps == 1
    torch.testing.assert_close(flow.step_shares, exp_shares, atol=ATOL, rtol=0)


def test_eos_rows_are_left_out():
    """A sample that finished early keeps running on padding in batched generate: its later rows are not averaged."""
    c = case("llava")
    model = c.model
    free = model.generate(**c.kwargs, max_new_tokens=NEW_TOKENS, do_sample=False)
    S = c.kwargs["input_ids"].shape[1]
    eos = int(free[0, S + 1])  # sample 0 emits it at step 1
    assert eos not in free[1, S:].tolist()
    try:
        model.generation_config.eos_token_id = eos
        with flowkern.trace(model) as flow:
            model.generate(**c.kwargs, max_new_tokens=NEW_TOKENS, do_sample=False)
    finally:
        model.generation_config.eos_token_id = None
    valid = flow.valid
    assert valid[:, 1].all()
    assert valid[:2, 0].all() and not valid[2:, 0].any()
    w = valid.float()
    expect = (flow.step_shares * w[:, None, :, None]).sum(dim=(0, 2)) / w.sum()
    torch.testing.assert_close(flow.shares, expect)
    torch.testing.assert_close(flow.sample_shares[:, 0], flow.step_shares[:2, :, 0].mean(dim=0))


@pytest.mark.parametrize("cache", [dict(use_cache=False), dict(cache_implementation="static")], ids=["none", "static"])
def test_other_caches_match_dynamic(cache):
    """Without a cache each step recomputes the whole sequence; a static cache has unwritten slots past the mask.
    Either way: same answer rows, same shares as with the default dynamic cache."""
    c = case("qwen2_vl")
    with flowkern.trace(c.model) as dynamic:
        a = c.model.generate(**c.kwargs, max_new_tokens=3, do_sample=False)
    with flowkern.trace(c.model) as other:
        b = c.model.generate(**c.kwargs, max_new_tokens=3, do_sample=False, **cache)
    assert torch.equal(a, b)
    torch.testing.assert_close(other.step_shares, dynamic.step_shares, atol=ATOL, rtol=0)


def test_two_models_traced_at_once():
    """Per-model state: nested traces of two models record independently."""
    x, y = case("llava"), case("qwen2_5_vl")
    with flowkern.trace(x.model) as fx:
        x.model.generate(**x.kwargs, max_new_tokens=2, do_sample=False)
    with flowkern.trace(y.model) as fy:
        y.model.generate(**y.kwargs, max_new_tokens=2, do_sample=False)
    with flowkern.trace(x.model) as gx, flowkern.trace(y.model) as gy:
        y.model.generate(**y.kwargs, max_new_tokens=2, do_sample=False)
        x.model.generate(**x.kwargs, max_new_tokens=2, do_sample=False)
    torch.testing.assert_close(gx.step_shares, fx.step_shares)
    torch.testing.assert_close(gy.step_shares, fy.step_shares)


@pytest.mark.parametrize("before", ["sdpa", "eager"])
def test_restores_attention_implementation(before):
    c = case("llava")
    model = c.model
    model.set_attn_implementation(before)

    def hooks() -> list:
        return [(n, len(m._forward_pre_hooks), len(m._forward_hooks)) for n, m in model.named_modules()]

    hooks_before = hooks()
    try:
        with pytest.raises(RuntimeError, match="boom"):
            with flowkern.trace(model):
                assert compat.attn_implementation(model.config.text_config) == "flowkern"
                assert compat.attn_implementation(model.config.vision_config) == before
                raise RuntimeError("boom")
        assert compat.attn_implementation(model.config.text_config) == before
        assert compat.attn_implementation(model.config.vision_config) == before
        assert not any(STATE_ATTR in vars(m) for m in model.modules())
        assert hooks() == hooks_before
    finally:
        model.set_attn_implementation("sdpa")


def test_one_prompt_per_trace():
    c = case("llava")
    with flowkern.trace(c.model):
        c.model.generate(**c.kwargs, max_new_tokens=1, do_sample=False)
        with pytest.raises(RuntimeError, match="one prompt"):
            c.model.generate(**c.kwargs, max_new_tokens=1, do_sample=False)
    with pytest.raises(RuntimeError, match="recorded nothing"):
        with flowkern.trace(c.model) as flow:
            pass
        flow.shares  # noqa: B018


def test_unsupported_model_lists_supported():
    model = LlamaForCausalLM(LlamaConfig(**text_config(None)))
    with pytest.raises(ValueError, match="llava.*qwen2_vl"):
        flowkern.trace(model)
