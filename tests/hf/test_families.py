"""The 2026 families on tiny random-weight models (Gemma 3, PaliGemma: masks beyond causal; Gemma 4: those plus
KV-shared layers and images of any size; Mistral 3: image rows with separators; Idefics3 / SmolVLM: tiles + a global
image; LLaVA-OneVision-1.5: 5.25+; Qwen3.5 / Qwen3.5-MoE: hybrid linear attention), against oracles that use neither
flowkern's mask translation nor its layouts:

- the mask translation (:func:`flowkern.hf.attention.flowkern_attention_mask`): the visibility the kernel computes
  from a :class:`KeyMask` (``flowkern.reference.visible_mask``) equals transformers' own dense mask
  (``sdpa_mask``) of the same pattern, for sliding windows, image blocks, both, padding and a cache offset;
- trace: shares and per-key attention of the answer rows equal transformers' eager ``output_attentions`` (fp32,
  sliding-window layers and bidirectional image blocks included; the prompts are longer than the window), on the
  image grids written here by hand; Qwen3.5's linear-attention layers are NaN;
- prune: equals an attention-mask oracle whose visibility is transformers' own dense mask minus the removed keys
  (Qwen3.5: a run whose later layers are cut to the kept positions by hand); Gemma 3 (sliding-window layers), Gemma 4
  (KV-shared layers; also its ``segment_flow``) and Qwen3.5's ``when="decode"`` are refused with the reason;
- cam: runs and lands on the image grid (Gemma 4: its layers whose features reach the answer); ``flowkern eval``
  answers each family's prompts (its own processor) in batches as one by one, where the packages its processor
  needs import (torchvision, num2words; one-line refusal otherwise);
- ``flowkern info`` and docs/models.md show the one support table.
"""

from __future__ import annotations

import functools

import pytest
import torch
from transformers import AttentionInterface
from transformers import masking_utils as mu
from transformers.masking_utils import AttentionMaskInterface

import flowkern
from flowkern.hf import compat
from flowkern.hf.attention import KeyMask, flowkern_attention_mask
from flowkern.hf.models import get_adapter
from flowkern.hf.tiny import IMAGE_TOKEN as IMG
from flowkern.hf.tiny import tiny_vlm
from flowkern.hf.tiny_saved import NEEDS_PACKAGES, SAVED_FAMILIES
from flowkern.reference import visible_mask
from tests.fixtures import labelled_prompts

ATOL = 1e-5
NEW = 3
pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------------------
# the mask translation


def _dense(mask_function, b, sq, sk, q_offset, padding):
    return mu.sdpa_mask(batch_size=b, q_length=sq, kv_length=sk, q_offset=q_offset, kv_offset=0,
                        mask_function=mask_function, attention_mask=padding, allow_is_causal_skip=False)


def _kernel_view(mask, b, sq, sk):
    """What the kernel shows for flowkern's mask: the 2D padding mask or a KeyMask, through the oracle rule."""
    if isinstance(mask, KeyMask):
        return visible_mask(sq, sk, causal=True, key_padding_mask=mask.padding, device=torch.device("cpu"),
                            window=mask.window, group_ids=mask.group_ids).expand(b, 1, sq, sk)
    return visible_mask(sq, sk, causal=True, key_padding_mask=mask, device=torch.device("cpu")).expand(b, 1, sq, sk)


def _blocks(b, sk):
    ids = torch.full((b, sk), -1)
    ids[0, 3:6], ids[0, 8:11], ids[1, 5:9] = 0, 1, 0
    return ids


PATTERNS = {
    "causal": lambda ids: mu.causal_mask_function,
    "window": lambda ids: mu.sliding_window_causal_mask_function(4),
    "blocks": lambda ids: mu.or_masks(mu.causal_mask_function, mu.blockwise_overlay(ids)),
    "window-or-blocks": lambda ids: mu.or_masks(mu.sliding_window_causal_mask_function(3), mu.blockwise_overlay(ids)),
    "window-and-blocks": lambda ids: mu.and_masks(mu.or_masks(mu.causal_mask_function, mu.blockwise_overlay(ids)),
                                                  mu.sliding_window_overlay(4)),
}


@pytest.mark.parametrize("sq,q_offset", [(14, 0), (3, 11)], ids=["prefill", "chunk"])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("name", list(PATTERNS))
def test_translation_matches_transformers_dense_mask(name, padded, sq, q_offset):
    b, sk = 2, 14
    padding = torch.ones(b, sk, dtype=torch.bool)
    if padded:
        padding[1, :2] = False
    fn = PATTERNS[name](_blocks(b, sk))
    ours = flowkern_attention_mask(b, sq, sk, q_offset, 0, fn, padding)
    assert isinstance(ours, KeyMask) == (name != "causal")
    theirs = _dense(fn, b, sq, sk, q_offset, padding)
    # rows without any visible key differ by convention only (flowkern: none; transformers' sdpa: fully masked)
    assert torch.equal(_kernel_view(ours, b, sq, sk), theirs)


def test_kv_shared_models_get_masks_that_survive_the_query_row_slice():
    """Gemma 4's KV-shared layers slice every mask to its last query rows (mask[:, :, -n:, :]): on such a model
    even a padding-only mask is a KeyMask, and that slice of a KeyMask is the mask itself (it constrains keys only)."""
    from types import SimpleNamespace

    padding = torch.tensor([[False, True, True, True], [True, True, True, True]])
    shared = SimpleNamespace(model_type="gemma4_text", num_kv_shared_layers=2, num_hidden_layers=4)
    assert flowkern_attention_mask(2, 4, 4, attention_mask=padding) is not None
    assert not isinstance(flowkern_attention_mask(2, 4, 4, attention_mask=padding), KeyMask)
    mask = flowkern_attention_mask(2, 4, 4, attention_mask=padding, config=shared)
    assert isinstance(mask, KeyMask) and torch.equal(mask.padding, padding) and mask.window is None
    assert mask[:, :, -1:, :] is mask and mask[:, :, slice(-3, None), :] is mask
    assert not isinstance(mask[0], KeyMask) and flowkern_attention_mask(2, 4, 4, config=shared) is None


def test_refusals_name_the_layer_type_and_why():
    ids = torch.full((1, 12), -1)
    ids[0, 2:8] = 0  # a 6-token block
    cut = mu.and_masks(mu.or_masks(mu.causal_mask_function, mu.blockwise_overlay(ids)), mu.sliding_window_overlay(4))
    with pytest.raises(NotImplementedError, match="sliding-window layers.*6 tokens is longer than the sliding window"):
        flowkern_attention_mask(1, 12, 12, mask_function=cut, local_size=4)
    chunked = mu.chunked_causal_mask_function(4, torch.zeros(1, dtype=torch.long))
    with pytest.raises(NotImplementedError, match="full-attention layers.*chunked attention"):
        flowkern_attention_mask(1, 8, 8, mask_function=chunked)
    with pytest.raises(NotImplementedError, match="bidirectional"):
        flowkern_attention_mask(1, 8, 8, mask_function=mu.bidirectional_mask_function)


# ----------------------------------------------------------------------------------------------------------
# tiny models: prompts longer than Gemma 3's window (5), images of 2 x 2 tokens


def _gemma3_case():
    model = tiny_vlm("gemma3", layers=4)
    ids, mask, labels = labelled_prompts([
        [("sys", [5, 6, 102]), ("img", [IMG] * 4), ("user", [103, 8, 9, 102]), ("img", [IMG] * 4),
         ("user", [103, 10, 11, 12])],
        [("sys", [5, 102]), ("img", [IMG] * 4), ("user", [103, 9, 10])],
    ])
    kwargs = dict(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(3, 3, 8, 8),
                  token_type_ids=(ids == IMG).long())
    return model, kwargs, labels, [[(2, 2), (2, 2)], [(2, 2)]]


def _paligemma_case():
    model = tiny_vlm("paligemma", layers=4)
    ids, mask, labels = labelled_prompts([
        [("img", [IMG] * 4), ("user", [1, 8, 9, 10, 11, 12])],
        [("img", [IMG] * 4), ("user", [1, 9, 10])],
    ])
    kwargs = dict(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(2, 3, 8, 8),
                  token_type_ids=torch.zeros_like(ids))
    return model, kwargs, labels, [[(2, 2)], [(2, 2)]]


BREAK, END = 104, 105  # Pixtral's [IMG_BREAK] / [IMG_END]: text tokens of the tiny vocabulary


def _pixtral_image(rows, cols):
    out = []
    for r in range(rows):
        out += [("img", [IMG] * cols), ("user", [BREAK if r < rows - 1 else END])]
    return out


def _mistral3_case():
    model = tiny_vlm("mistral3", layers=4)
    ids, mask, labels = labelled_prompts([
        [("sys", [5, 6]), *_pixtral_image(2, 3), ("user", [8, 9]), *_pixtral_image(3, 2), ("user", [10, 11])],
        [("sys", [5]), *_pixtral_image(2, 2), ("user", [9, 10])],
    ])
    kwargs = dict(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(3, 3, 12, 12),
                  image_sizes=torch.tensor([[8, 12], [12, 8], [8, 8]]))  # patch 2, merge 2: 2x3, 3x2, 2x2 tokens
    return model, kwargs, labels, [[(2, 3), (3, 2)], [(2, 2)]]


def _needs_5_25():
    if tuple(int(x) for x in compat.TRANSFORMERS_VERSION.split(".")[:2]) < (5, 25):
        pytest.skip(f"llava_onevision1_5 needs transformers >= 5.25 (installed {compat.TRANSFORMERS_VERSION})")


def _onevision1_5_case():
    _needs_5_25()
    model = tiny_vlm("llava_onevision1_5", layers=4)
    ids, mask, labels = labelled_prompts([
        [("sys", [5, 6, 102]), ("img", [IMG] * 4), ("user", [103, 8, 9, 102]), ("img", [IMG] * 6), ("user", [103, 10])],
        [("sys", [5, 102]), ("img", [IMG] * 4), ("user", [103, 9, 10])],
    ])
    thw = torch.tensor([[1, 4, 4], [1, 4, 6], [1, 4, 4]])  # patch 2, merge 2: 2x2, 2x3, 2x2 tokens
    kwargs = dict(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(int(thw.prod(-1).sum()), 12),
                  image_grid_thw=thw)
    return model, kwargs, labels, [[(2, 2), (2, 3)], [(2, 2)]]


def _patch_positions(rows, cols, length):
    """Gemma 4's image_position_ids of one image: (x, y) of each 2 x 2 patch row by row, (-1, -1) padding."""
    ys, xs = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    pos = torch.stack([xs.flatten(), ys.flatten()], -1)
    return torch.cat([pos, torch.full((length - rows * cols, 2), -1)])


def _gemma4_case():
    model = tiny_vlm("gemma4", layers=4)  # layers 2, 3 reuse the keys / values of layers 0, 1
    ids, mask, labels = labelled_prompts([
        [("sys", [5, 6, 102]), ("img", [IMG] * 4), ("user", [103, 8, 9, 102]), ("img", [IMG] * 2),
         ("user", [103, 10, 11, 12])],
        [("sys", [5, 102]), ("img", [IMG] * 4), ("user", [103, 9, 10])],
    ])
    # 2 x 2 px patches pooled 2 x 2: 8 x 8 px -> 2 x 2 tokens, 4 x 8 px -> 1 x 2 (an image block is shorter than
    # the sliding window, 5: transformers would cut a longer one, which flowkern refuses)
    pos = torch.stack([_patch_positions(4, 4, 16), _patch_positions(2, 4, 16), _patch_positions(4, 4, 16)])
    pv = torch.randn(3, 16, 12) * (pos[..., :1] >= 0)
    kwargs = dict(input_ids=ids, attention_mask=mask, pixel_values=pv, image_position_ids=pos,
                  mm_token_type_ids=(ids == IMG).long())
    return model, kwargs, labels, [[(2, 2), (1, 2)], [(2, 2)]]


FAKE, GLOBAL, ROW1COL1, ROW1COL2 = 104, 105, 106, 107  # Idefics3's <fake_token_around_image>, <global-img>, ...


def _idefics3_case(family):
    model = tiny_vlm(family, layers=4)
    tile = [IMG] * 4  # 8 px, patch 2, pixel shuffle 2: 2 x 2 tokens
    ids, mask, labels = labelled_prompts([  # a split image (2 tiles + global), then one that is not split
        [("sys", [5, 6, FAKE, ROW1COL1]), ("img", tile), ("user", [FAKE, ROW1COL2]), ("img", tile),
         ("user", [10, FAKE, GLOBAL]), ("img", tile), ("user", [FAKE, 8, FAKE, GLOBAL]), ("img", tile),
         ("user", [FAKE, 9])],
        [("sys", [5, FAKE, GLOBAL]), ("img", tile), ("user", [FAKE, 9, 10])],
    ])
    pv = torch.randn(2, 4, 3, 8, 8)
    pv[1, 1:] = 0  # sample 1 has one image: the rest is padding (all zeros)
    views = [[(0, "tile0", (2, 2)), (0, "tile1", (2, 2)), (0, "global", (2, 2)), (1, "global", (2, 2))],
             [(0, "global", (2, 2))]]
    return model, dict(input_ids=ids, attention_mask=mask, pixel_values=pv), labels, views


CASES = {"gemma3": _gemma3_case, "gemma4": _gemma4_case, "paligemma": _paligemma_case, "mistral3": _mistral3_case,
         "llava_onevision1_5": _onevision1_5_case, "idefics3": lambda: _idefics3_case("idefics3"),
         "smolvlm": lambda: _idefics3_case("smolvlm")}
_built: dict = {}


def case(name):
    if name not in _built:
        _built[name] = CASES[name]()
    return _built[name]


def views_of(sample):
    """A case's views of one sample as (image, name, shape): a bare shape is the view "image" of the next image."""
    return [v if len(v) == 3 else (i, "image", v) for i, v in enumerate(sample)]


def first_sample(kwargs, shapes):
    """Sample 0 of a case alone (its padding removed, its images only): what cam takes."""
    real = kwargs["attention_mask"][0].bool()
    n = len({v[0] for v in views_of(shapes[0])})
    one = {k: v[:1, real] for k, v in kwargs.items() if k in ("input_ids", "attention_mask", "token_type_ids",
                                                                 "mm_token_type_ids")}
    one["pixel_values"] = kwargs["pixel_values"][:n]
    if "image_grid_thw" in kwargs:  # flattened patches: the first n images' rows
        one["image_grid_thw"] = kwargs["image_grid_thw"][:n]
        one["pixel_values"] = kwargs["pixel_values"][: int(one["image_grid_thw"].prod(-1).sum())]
    for key in ("image_sizes", "image_position_ids"):
        if key in kwargs:
            one[key] = kwargs[key][:n]
    if kwargs["pixel_values"].dim() == 5:  # [B, tiles, C, H, W]: the sample's own tiles
        one["pixel_values"] = kwargs["pixel_values"][:1]
    return one


def _eager(model, kwargs, **extra):
    model.set_attn_implementation({"text_config": "eager"})
    try:
        with torch.no_grad():
            return model.generate(**kwargs, max_new_tokens=NEW, do_sample=False, output_attentions=True,
                                  return_dict_in_generate=True, **extra)
    finally:
        model.set_attn_implementation({"text_config": "sdpa"})


def _expected(attentions, labels):
    """Step shares [T, L, B, 4] and the answer rows' attention to each prompt key [T, L, B, S] from eager weights;
    a sliding-window cache layer holds the most recent keys only (its weights cover the last Sk positions)."""
    shares, keys = [], []
    B, S = labels.shape
    for t, step in enumerate(attentions):
        full = torch.cat([labels, torch.full((B, t), 3)], dim=1)
        rows = [layer[:, :, -1, :].double().mean(dim=1) for layer in step]
        shares.append(torch.stack([torch.stack([(p * (full[:, -p.shape[1]:] == c)).sum(-1) for c in range(4)], -1)
                                   for p in rows]))
        padded = [torch.cat([torch.zeros(B, full.shape[1] - p.shape[1], dtype=p.dtype), p], 1) for p in rows]
        keys.append(torch.stack([p[:, :S] for p in padded]))
    return torch.stack(shares).float(), torch.stack(keys).float()


@pytest.mark.parametrize("name", list(CASES))
def test_trace_matches_eager(name):
    model, kwargs, labels, shapes = case(name)
    eager = _eager(model, kwargs)
    with flowkern.trace(model, image_inputs=kwargs) as flow:
        tokens = model.generate(**kwargs, max_new_tokens=NEW, do_sample=False)
    assert torch.equal(tokens, eager.sequences)
    exp_shares, exp_keys = _expected(eager.attentions, labels)
    assert torch.equal(flow.segment_ids[:, : labels.shape[1]], labels)
    torch.testing.assert_close(flow.step_shares, exp_shares, atol=ATOL, rtol=0)
    blocks = next((k for k in ("token_type_ids", "mm_token_type_ids") if k in kwargs), None)
    if blocks:  # the image blocks matter: without them transformers' own attention differs
        plain = _eager(model, {k: v for k, v in kwargs.items() if k != blocks})
        assert (_expected(plain.attentions, labels)[0] - exp_shares).abs().max() > 1e-3
    # heat maps: the answer rows' attention to each image token (separators are no cells), on each image's raster
    n_layers = flow.num_layers
    for b in range(labels.shape[0]):
        pos = torch.nonzero(labels[b] == 1).flatten()
        grids = flow.image_grids[b]
        assert [(g.image, g.name, g.shape) for g in grids] == views_of(shapes[b])
        for g in grids:
            cells = pos[g.index]
            for layer in (0, n_layers - 1):
                expect = exp_keys[:, layer, b][:, cells].mean(dim=0)
                torch.testing.assert_close(flow.image_attention(layer, sample=b, image=g.image, view=g.name), expect,
                                           atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------------------------------------
# pruning vs a mask oracle: transformers' own dense mask, minus the removed keys at layers >= L

ORACLE = "fk_families_oracle"
_SPEC: dict = {}


def _oracle_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None, attention_mask=None,
                 **kw):
    return mu.sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                        kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                        allow_is_causal_skip=False)


def _oracle_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kw):
    B, Hq, Sq, D = query.shape
    Sk = key.shape[2]
    rep = Hq // key.shape[1]
    k, v = (t.double().repeat_interleave(rep, dim=1) for t in (key, value))
    s = (query.double() @ k.transpose(-1, -2)) * (scaling if scaling is not None else D**-0.5)
    vis = attention_mask[..., :Sk].bool().expand(B, 1, Sq, Sk)
    removed = _SPEC.get("removed")
    if removed is not None and module.layer_idx >= _SPEC["layer"]:
        hide = torch.zeros(B, Sk, dtype=torch.bool)
        n = min(Sk, removed.shape[1])
        hide[:, :n] = removed[:, :n]
        vis = vis & ~hide[:, None, None, :]
    p = torch.softmax(s.masked_fill(~vis, float("-inf")), dim=-1).nan_to_num(0.0)
    return (p @ v).to(query.dtype).transpose(1, 2).contiguous(), None


AttentionInterface.register(ORACLE, _oracle_attention)
AttentionMaskInterface.register(ORACLE, _oracle_mask)


def _run_oracle(model, kwargs, removed, layer):
    _SPEC.update(removed=removed, layer=layer)
    model.set_attn_implementation({"text_config": ORACLE})
    try:
        with torch.no_grad():
            return model.generate(**kwargs, max_new_tokens=NEW, do_sample=False, output_logits=True,
                                  return_dict_in_generate=True)
    finally:
        model.set_attn_implementation({"text_config": "sdpa"})
        _SPEC.clear()


@pytest.mark.parametrize("name,layer,keep", [("paligemma", 1, 0), ("paligemma", 2, 2), ("paligemma", 3, 0),
                                             ("mistral3", 1, 3), ("mistral3", 2, 0), ("llava_onevision1_5", 2, 3),
                                             ("idefics3", 2, 5), ("smolvlm", 1, 0)])
def test_prune_matches_mask_oracle(name, layer, keep):
    model, kwargs, _, _ = case(name)
    img = (kwargs["input_ids"] == IMG) & kwargs["attention_mask"].bool()
    with torch.no_grad(), flowkern.prune(model, layer=layer, keep=keep, rank="attention") as p:
        got = model.generate(**kwargs, max_new_tokens=NEW, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    kept = torch.zeros_like(img)
    for b, pos in enumerate(p.kept_image_positions):
        kept[b, pos] = True
    assert torch.equal(p.num_kept_image_tokens, img.sum(1).clamp(max=keep))
    expect = _run_oracle(model, kwargs, img & ~kept, layer)
    assert torch.equal(got.sequences, expect.sequences)
    for a, b in zip(got.logits, expect.logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


@pytest.mark.parametrize("when", ["prefill", "decode"])
def test_gemma3_prune_refused_with_reason(when):
    model, kwargs, _, _ = case("gemma3")
    with pytest.raises(NotImplementedError, match="sliding-window"):
        with flowkern.prune(model, layer=1, when=when):
            model.generate(**kwargs, max_new_tokens=NEW, do_sample=False)
    with pytest.raises(NotImplementedError, match="window counts key slots"):
        with torch.no_grad(), flowkern.prune(model, layer=1):
            model(**kwargs, use_cache=False)


# ----------------------------------------------------------------------------------------------------------
# cam


@pytest.mark.parametrize("name", [name for name in CASES if name != "gemma4"])  # gemma4: its own test below
def test_cam_lands_on_the_grid(name):
    model, kwargs, _, shapes = case(name)
    one = first_sample(kwargs, shapes)
    result = flowkern.cam(model, one, torch.tensor([7, 8]), layers=[0, 1], samples=1, noise_std=0.0)
    assert [(v.image, v.name, v.shape) for v in result.views] == views_of(shapes[0])
    assert all(bool(torch.isfinite(v.raw).all()) and float(v.raw.abs().max()) > 0 for v in result.views)


def test_gemma4_cam_layers_before_the_kv_shared_ones():
    """Layers 2, 3 reuse the keys / values of layers 0, 1: the prompt's features at layers >= 1 never reach the
    answer, so those layers are refused (before any work) and the default is layer 0."""
    model, kwargs, _, shapes = case("gemma4")
    one = first_sample(kwargs, shapes)
    with pytest.raises(ValueError, match=r"layers \[1, 3\]: the KV-shared layers"):
        flowkern.cam(model, one, torch.tensor([20, 30]), layers=[0, 1, 3], samples=1, noise_std=0.0)
    result = flowkern.cam(model, one, torch.tensor([20, 30]), samples=1, noise_std=0.0)
    assert result.layers == [0]
    assert [(v.image, v.name, v.shape) for v in result.views] == views_of(shapes[0])
    assert all(float(v.raw.abs().max()) > 0 for v in result.views)  # an answer whose ReLU maps are not all zero
    noisy = flowkern.cam(model, one, torch.tensor([20, 30]), samples=2, noise_std=0.1, pixel_mean=[0.0] * 3,
                         pixel_std=[1.0] * 3)  # SmoothGrad on patches with the channel last
    assert all(bool(torch.isfinite(v.raw).all()) for v in noisy.views) and not torch.equal(noisy.target[0],
                                                                                          noisy.target[1])


def test_gemma4_prune_and_segment_flow_refused_with_reason():
    model, kwargs, _, _ = case("gemma4")
    with pytest.raises(NotImplementedError, match=r"layers \[2, 3\] reuse the keys / values"):
        flowkern.prune(model, layer=1)
    with pytest.raises(ValueError, match="segment_flow: gemma4's KV-shared layers"):
        flowkern.trace(model, segment_flow=True)


def test_mistral3_layout_without_image_sizes():
    """Without the processor's image_sizes, each image is the run of equally long [IMG] rows one separator apart."""
    model, kwargs, labels, shapes = case("mistral3")
    adapter = get_adapter(model)
    for inputs in ({"image_sizes": kwargs["image_sizes"]}, {}):
        grids = adapter.image_grids(model.config, kwargs["input_ids"], labels, inputs)
        assert [[g.shape for g in views] for views in grids] == shapes
        assert torch.equal(grids[0][1].index, torch.arange(6, 12).view(3, 2))


# ----------------------------------------------------------------------------------------------------------
# the support table


def test_info_and_docs_show_the_one_support_table(capsys):
    from pathlib import Path

    from flowkern.cli import main
    from flowkern.hf.models import supported_model_types
    from flowkern.hf.support import SUPPORT, support_table

    assert main(["info"]) == 0
    assert support_table() in capsys.readouterr().out
    page = (Path(__file__).resolve().parents[2] / "docs" / "models.md").read_text(encoding="utf-8")
    assert support_table() in page
    listed = {r.model_type for r in SUPPORT if not r.trace.startswith("refused")}
    assert listed == set(supported_model_types())


# ----------------------------------------------------------------------------------------------------------
# flowkern eval: the family's prompt, answered in batches


def _missing(packages):
    """The first of ``packages`` that does not import, with the reason, or None."""
    import importlib

    for name in packages:
        try:
            importlib.import_module(name)
        except Exception as exc:  # not installed, or a build that does not load with this torch
            return f"{name} does not import ({type(exc).__name__}: {str(exc).splitlines()[0]})"
    return None


@pytest.mark.parametrize("family", SAVED_FAMILIES)
def test_eval_cli_answers_in_a_batch(family, tmp_path, capsys):
    """``flowkern eval`` on a saved tiny model with the family's own processor: the adapter's prompt, the
    processor's placeholders, batches of 4 with left padding answer as one by one. Families whose processors need
    packages flowkern does not depend on (``NEEDS_PACKAGES``: torchvision, num2words) are skipped where those do
    not import (a failure when FLOWKERN_REQUIRE_TORCHVISION=1, as in CI)."""
    import json
    import os

    from flowkern.cli import main
    from flowkern.hf.tiny_saved import save_tiny
    from tests.fixtures import EVAL_WORDS, save_image, write_pope

    if family == "llava_onevision1_5":
        _needs_5_25()
    missing = _missing(NEEDS_PACKAGES.get(family, ()))
    if missing is not None:
        if os.environ.get("FLOWKERN_REQUIRE_TORCHVISION") == "1":
            pytest.fail(f"FLOWKERN_REQUIRE_TORCHVISION=1 but {missing}: {family}'s processor requires it")
        needs = " and ".join(NEEDS_PACKAGES[family])
        pytest.skip(f"{family}'s processor requires {needs}, which flowkern does not depend on: {missing}")
    try:
        save_tiny(family, tmp_path / "m", words=EVAL_WORDS)
    except ImportError:  # Idefics3ImageProcessorPil on 5.17
        pytest.skip(f"{family}'s processor requires torchvision on transformers {compat.TRANSFORMERS_VERSION}")
    for i in range(3):
        save_image(tmp_path / "img" / f"{i}.jpg", i)
    write_pope(tmp_path / "pope", "random", [(q, f"{q % 3}.jpg", ("dog", "cat car")[q % 2], "yes") for q in range(5)])
    answers = {}
    for batch in ("1", "4"):
        out = tmp_path / f"out{batch}"
        code = main(["eval", "--model", str(tmp_path / "m"), "--task", "pope", "--data", str(tmp_path / "pope"),
                     "--images", str(tmp_path / "img"), "--batch-size", batch, "--max-new-tokens", "3",
                     "--device", "cpu", "--out", str(out)])
        stdout, err = capsys.readouterr()
        assert code == 0, err
        assert "answered 5 questions" in stdout
        rows = [json.loads(line) for line in next(out.glob("*.jsonl")).read_text().splitlines()]
        answers[batch] = {r["question_id"]: r["text"] for r in rows}
    assert answers["1"] == answers["4"] and len(answers["1"]) == 5  # left padding changes no answer
    assert any(answers["1"].values())


# ----------------------------------------------------------------------------------------------------------
# Qwen3.5: linear-attention layers are not measured; pruning at the prefill narrows them too


QWEN3_5 = ["qwen3_5", "qwen3_5_moe"]  # the MoE variant: the same layers with expert MLPs


def _qwen3_5(family="qwen3_5"):
    if family not in _built:
        model = tiny_vlm(family, layers=4)  # layers 0-2 linear attention, 3 full
        ids, mask, labels = labelled_prompts([
            [("sys", [5, 6, 102]), ("img", [IMG] * 4), ("user", [103, 8, 9, 10])],
            [("sys", [5, 102]), ("img", [IMG] * 4), ("user", [103, 9])],
        ])
        thw = torch.tensor([[1, 4, 4], [1, 4, 4]])
        kwargs = dict(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(32, 24), image_grid_thw=thw,
                      mm_token_type_ids=(ids == IMG).int())  # 1 = image: the M-RoPE positions need them
        _built[family] = model, kwargs, labels
    return _built[family]


@pytest.mark.parametrize("family", QWEN3_5)
def test_qwen3_5_trace_marks_linear_layers_not_measured(family):
    model, kwargs, labels = _qwen3_5(family)
    eager = _eager(model, kwargs)
    with flowkern.trace(model, image_inputs=kwargs) as flow:
        tokens = model.generate(**kwargs, max_new_tokens=NEW, do_sample=False)
    assert torch.equal(tokens, eager.sequences)
    linear = sorted(get_adapter(model).linear_layers(model.config))
    assert linear == [0, 1, 2]
    assert flow.step_shares[:, linear].isnan().all() and flow.shares[linear].isnan().all()  # never zeros
    exp_shares, exp_keys = _expected(eager.attentions, labels)  # eager reports the full-attention layer only
    torch.testing.assert_close(flow.step_shares[:, [3]], exp_shares, atol=ATOL, rtol=0)
    assert flow.image_attention(0, sample=0).isnan().all()
    assert not flow.image_attention(3, sample=0).isnan().any()


def _narrowed_reference(model, kwargs, keep, layer):
    """Logits of the last row when decoder layers >= ``layer`` run on the kept positions only (batch 1): hidden
    states and every per-token layer input cut here by hand, with transformers' own sdpa attention."""
    idx = torch.nonzero(keep[0]).flatten()
    layers = get_adapter(model).decoder_layers(model)

    def cut(i, module, args, kw):
        if i == layer:
            args = (args[0][:, idx], *args[1:]) if args else args
            if not args:
                kw["hidden_states"] = kw["hidden_states"][:, idx]
        kw["position_embeddings"] = tuple(t[:, idx] for t in kw["position_embeddings"])
        for name in ("position_ids", "attention_mask"):
            if isinstance(kw.get(name), torch.Tensor) and kw[name].shape[-1] == keep.shape[1]:
                kw[name] = kw[name][..., idx]
        return args, kw

    handles = [m.register_forward_pre_hook(functools.partial(cut, i), with_kwargs=True)
               for i, m in enumerate(layers) if i >= layer]
    try:
        with torch.no_grad():
            return model(**kwargs, use_cache=False).logits[:, -1]
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("family", QWEN3_5)
@pytest.mark.parametrize("layer", [1, 3], ids=["linear", "full"])
def test_qwen3_5_prune_at_prefill_narrows_every_later_layer(layer, family):
    model, kwargs, _ = _qwen3_5(family)
    one = {k: v[:1] for k, v in kwargs.items() if k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    real = one["attention_mask"][0].bool()
    one = {k: v[:, real] for k, v in one.items()}
    one.update(pixel_values=kwargs["pixel_values"][:16], image_grid_thw=kwargs["image_grid_thw"][:1])
    keep = one["input_ids"] != IMG
    with torch.no_grad(), flowkern.prune(model, layer=layer, keep=0) as p:
        got = model(**one).logits[:, -1]
    assert torch.equal(p.keep_mask, keep)
    torch.testing.assert_close(got, _narrowed_reference(model, one, keep, layer), atol=1e-4, rtol=0)
    with torch.no_grad():
        assert (model(**one).logits[:, -1] - got).abs().max() > 1e-3  # the removal matters
    with torch.no_grad(), flowkern.prune(model, layer=layer, keep=0):  # a padded batch generates
        model.generate(**kwargs, max_new_tokens=NEW, do_sample=False)
    with pytest.raises(NotImplementedError, match="recurrent state .* cannot give one back"):
        with flowkern.prune(model, layer=layer, when="decode"):
            model.generate(**kwargs, max_new_tokens=NEW, do_sample=False)


@pytest.mark.parametrize("family", QWEN3_5)
def test_qwen3_5_knockout_refuses_linear_attention_layers(family):
    """A linear-attention layer has no attention edge to cut: knockout there is refused naming the layers, and a
    window of attention layers only is accepted."""
    model, _, _ = _qwen3_5(family)
    with pytest.raises(ValueError, match=r"layers: \[1, 2\] are linear-attention layers"):
        flowkern.knockout(model, "image->last", layers=range(1, 4))
    assert flowkern.knockout(model, "image->last", layers=[3]).layers == (3,)


@pytest.mark.parametrize("family", QWEN3_5)
def test_qwen3_5_cam_lands_on_the_grid(family):
    """CAM reads the layers' outputs, linear-attention layers included; the attention site does not exist there."""
    model, kwargs, _ = _qwen3_5(family)
    one = first_sample(kwargs, [[(2, 2)], [(2, 2)]])
    result = flowkern.cam(model, one, torch.tensor([7, 8]), layers=[0, 1, 3], samples=1, noise_std=0.0)
    assert [(v.image, v.name, v.shape) for v in result.views] == [(0, "image", (2, 2))]
    assert all(bool(torch.isfinite(v.raw).all()) and float(v.raw.abs().max()) > 0 for v in result.views)
    with pytest.raises(ValueError, match="no `self_attn` for site='attention'"):
        flowkern.cam(model, one, torch.tensor([7, 8]), layers=[0], site="attention", samples=1, noise_std=0.0)


def test_processor_needing_torchvision_is_refused_in_one_line(tmp_path, capsys):
    """Where torchvision does not import, a Qwen3.5 checkpoint (its processor class requires torchvision through
    its video processor) stops with one line naming it (the CLI: exit code 2)."""
    import json

    from flowkern.cli import main
    from flowkern.hf.loading import load_model
    from flowkern.hf.tiny import word_tokenizer
    from tests.fixtures import save_image

    if _missing(["torchvision"]) is None:
        pytest.skip("torchvision imports here: the eval test runs these processors")
    tokenizer = word_tokenizer(["hi"], named={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"})
    tiny_vlm("qwen3_5", layers=4, vocab_size=len(tokenizer)).save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    sizes = dict(patch_size=2, merge_size=2, temporal_patch_size=2)
    (tmp_path / "m" / "processor_config.json").write_text(json.dumps({
        "processor_class": "Qwen3VLProcessor",
        "image_processor": dict(image_processor_type="Qwen2VLImageProcessor", **sizes),
        "video_processor": dict(video_processor_type="Qwen3VLVideoProcessor", **sizes)}))
    with pytest.raises(ImportError, match="its processor needs a package that is not installed: .*Torchvision") as e:
        load_model(tmp_path / "m", device="cpu")
    assert "\n" not in str(e.value)
    code = main(["generate", "--model", str(tmp_path / "m"), "--image", str(save_image(tmp_path / "a.jpg", 0)),
                 "--prompt", "hi", "--device", "cpu"])
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]  # besides progress bars
    assert code == 2 and len(errors) == 1 and "Torchvision" in errors[0] and "not installed" in errors[0]
