"""flowkern.knockout on the 2026 families (tiny random-weight models) vs transformers' eager attention with a dense
mask edited here.

The oracle runs the model with ``attn_implementation="eager"`` and a forward pre-hook on each language-model
attention module that edits the 4D additive mask transformers made for that layer, its own pattern included
(Gemma 3's sliding window and bidirectional image blocks, PaliGemma's prefix block): at the cut layers, a query at
position ``p`` gets the dtype's minimum at every key ``j`` with ``(label[j], label[p])`` a cut edge, so the cut
composes with the window and the groups exactly as transformers' own mask does. The labels are written by hand per
prompt piece (``tests.fixtures.labelled_prompts``; separator and marker tokens between image rows / tiles are text:
``user``, or ``system`` before the first image); ``last`` is the last prompt column (left padding), every position
past the prompt is ``generated``. A sliding-window cache layer holds the most recent keys only: its mask's key
column ``j`` is position ``T - Sk + j`` (``T`` tokens so far). Nothing here calls flowkern's segment or knockout
code to build the mask. Greedy ``generate`` with the KV cache, fp32, the tokens equal and the logits of every step
within 1e-4, on a left-padded batch of 2 (one sample has two images); the cut must change the logits.

Qwen3.5 (and Qwen3.5-MoE): its full-attention layer is cut like any other (its linear-attention layers are refused:
no attention edges; tests/hf/test_families.py). Gemma 4: the KV-shared layers attend to the keys / values of earlier
layers; the cut applies to their attention as to any other layer's (their queries are masked, the shared cache is
untouched).
"""

from __future__ import annotations

import functools

import pytest
import torch

import flowkern
from flowkern.hf import compat
from flowkern.hf.models import get_adapter
from flowkern.hf.tiny import IMAGE_TOKEN as IMG
from flowkern.hf.tiny import tiny_vlm
from tests.fixtures import labelled_prompts

N_LAYERS = 4
NEW = 3
ATOL = 1e-4
LAST, GEN = 4, 3
NAMES = {"system": 0, "image": 1, "user": 2, "generated": 3, "last": 4}

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------------------
# the oracle: eager attention, each layer's 4D mask edited by a hook


def _cut_block(labels: torch.Tensor, edges, total: int, sq: int, sk: int) -> torch.Tensor:
    """bool [B, 1, Sq, Sk]: True where a query (positions total - sq ..) may not read a key (positions total - sk ..)
    across a cut edge."""
    B, S = labels.shape
    lab = torch.full((B, total), GEN, dtype=torch.long)
    lab[:, :S] = labels
    lab[:, S - 1] = LAST
    qlab, klab = lab[:, total - sq:], lab[:, total - sk:]
    block = torch.zeros(B, sq, sk, dtype=torch.bool)
    for src, dst in edges:
        block |= (qlab[:, :, None] == NAMES[dst]) & (klab[:, None, :] == NAMES[src])
    return block[:, None]


def run_oracle(model, kwargs, labels, edges, layers):
    """greedy generate under eager attention with the cut edges masked densely at ``layers``; a query row the cuts
    leave without any visible key has attention output 0 (knockout's rule; eager would average every key)."""
    decoder = get_adapter(model).decoder_layers(model)
    seen = {"total": 0}
    empty: dict = {}

    def count(module, args, kw):  # tokens so far: the key positions of a sliding-window cache layer
        hidden = args[0] if args else kw["hidden_states"]
        seen["total"] += int(hidden.shape[1])

    def pre(module, args, kw):
        mask = kw["attention_mask"]
        assert mask is not None and mask.dim() == 4
        sq, sk = kw["hidden_states"].shape[1], mask.shape[-1]
        empty.pop(module.layer_idx, None)
        if module.layer_idx in layers:
            low = torch.finfo(mask.dtype).min
            block = _cut_block(labels, edges, seen["total"], sq, sk)
            kw["attention_mask"] = mask = mask.masked_fill(block, low)
            empty[module.layer_idx] = (mask == low).all(-1).any(1)  # [B, Sq]
        return args, kw

    def zero_empty_rows(layer, module, args):
        rows = empty.get(layer)
        return None if rows is None else (args[0].masked_fill(rows[..., None], 0.0), *args[1:])

    model.set_attn_implementation({"text_config": "eager"})
    handles = [decoder[0].register_forward_pre_hook(count, with_kwargs=True)]
    for i, layer in enumerate(decoder):
        attn = getattr(layer, "self_attn", None)
        if attn is not None:
            handles.append(attn.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(attn.o_proj.register_forward_pre_hook(functools.partial(zero_empty_rows, i)))
    try:
        with torch.no_grad():
            return model.generate(**kwargs, max_new_tokens=NEW, do_sample=False, output_logits=True,
                                  return_dict_in_generate=True)
    finally:
        for h in handles:
            h.remove()
        model.set_attn_implementation({"text_config": "sdpa"})


def run_knockout(model, kwargs, edges, layers):
    with torch.no_grad(), flowkern.knockout(model, block=edges, layers=layers) as k:
        out = model.generate(**kwargs, max_new_tokens=NEW, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    assert k.forwards == NEW
    return out


# ----------------------------------------------------------------------------------------------------------
# tiny models: (model, generate kwargs, hand-written labels); prompts longer than Gemma's window (5)


def _gemma3():
    ids, mask, labels = labelled_prompts([
        [("sys", [5, 6, 102]), ("img", [IMG] * 4), ("user", [103, 8, 9, 102]), ("img", [IMG] * 4),
         ("user", [103, 10, 11, 12])],
        [("sys", [5, 102]), ("img", [IMG] * 4), ("user", [103, 9, 10])],
    ])
    return dict(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(3, 3, 8, 8),
                token_type_ids=(ids == IMG).long()), labels


def _paligemma():
    ids, mask, labels = labelled_prompts([
        [("img", [IMG] * 4), ("user", [1, 8, 9, 10, 11, 12])],
        [("img", [IMG] * 4), ("user", [1, 9, 10])],
    ])
    return dict(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(2, 3, 8, 8),
                token_type_ids=torch.zeros_like(ids)), labels


BREAK, END = 104, 105  # Pixtral's [IMG_BREAK] / [IMG_END]


def _pixtral_image(rows, cols):
    out = []
    for r in range(rows):
        out += [("img", [IMG] * cols), ("user", [BREAK if r < rows - 1 else END])]
    return out


def _mistral3():
    ids, mask, labels = labelled_prompts([
        [("sys", [5, 6]), *_pixtral_image(2, 3), ("user", [8, 9]), *_pixtral_image(3, 2), ("user", [10, 11])],
        [("sys", [5]), *_pixtral_image(2, 2), ("user", [9, 10])],
    ])
    return dict(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(3, 3, 12, 12),
                image_sizes=torch.tensor([[8, 12], [12, 8], [8, 8]])), labels


def _onevision1_5():
    if tuple(int(x) for x in compat.TRANSFORMERS_VERSION.split(".")[:2]) < (5, 25):
        pytest.skip(f"llava_onevision1_5 needs transformers >= 5.25 (installed {compat.TRANSFORMERS_VERSION})")
    ids, mask, labels = labelled_prompts([
        [("sys", [5, 6, 102]), ("img", [IMG] * 4), ("user", [103, 8, 9, 102]), ("img", [IMG] * 6), ("user", [103, 10])],
        [("sys", [5, 102]), ("img", [IMG] * 4), ("user", [103, 9, 10])],
    ])
    thw = torch.tensor([[1, 4, 4], [1, 4, 6], [1, 4, 4]])
    return dict(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(int(thw.prod(-1).sum()), 12),
                image_grid_thw=thw), labels


FAKE, GLOBAL, ROW1COL1, ROW1COL2 = 104, 105, 106, 107  # Idefics3's <fake_token_around_image>, <global-img>, ...


def _idefics3():
    tile = [IMG] * 4
    ids, mask, labels = labelled_prompts([
        [("sys", [5, 6, FAKE, ROW1COL1]), ("img", tile), ("user", [FAKE, ROW1COL2]), ("img", tile),
         ("user", [10, FAKE, GLOBAL]), ("img", tile), ("user", [FAKE, 8, FAKE, GLOBAL]), ("img", tile),
         ("user", [FAKE, 9])],
        [("sys", [5, FAKE, GLOBAL]), ("img", tile), ("user", [FAKE, 9, 10])],
    ])
    pv = torch.randn(2, 4, 3, 8, 8)
    pv[1, 1:] = 0  # sample 1 has one image: the rest is padding
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pv), labels


def _qwen3_5():  # also Qwen3.5-MoE
    ids, mask, labels = labelled_prompts([
        [("sys", [5, 6, 102]), ("img", [IMG] * 4), ("user", [103, 8, 9, 10])],
        [("sys", [5, 102]), ("img", [IMG] * 4), ("user", [103, 9])],
    ])
    return dict(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(32, 24),
                image_grid_thw=torch.tensor([[1, 4, 4], [1, 4, 4]]), mm_token_type_ids=(ids == IMG).int()), labels


def _patch_positions(rows, cols, length):
    ys, xs = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    pos = torch.stack([xs.flatten(), ys.flatten()], -1)
    return torch.cat([pos, torch.full((length - rows * cols, 2), -1)])


def _gemma4():
    ids, mask, labels = labelled_prompts([
        [("sys", [5, 6, 102]), ("img", [IMG] * 4), ("user", [103, 8, 9, 102]), ("img", [IMG] * 2),
         ("user", [103, 10, 11, 12])],
        [("sys", [5, 102]), ("img", [IMG] * 4), ("user", [103, 9, 10])],
    ])
    pos = torch.stack([_patch_positions(4, 4, 16), _patch_positions(2, 4, 16), _patch_positions(4, 4, 16)])
    pv = torch.randn(3, 16, 12) * (pos[..., :1] >= 0)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pv, image_position_ids=pos,
                mm_token_type_ids=(ids == IMG).long()), labels


CASES = {"gemma3": _gemma3, "paligemma": _paligemma, "mistral3": _mistral3, "llava_onevision1_5": _onevision1_5,
         "idefics3": _idefics3, "smolvlm": _idefics3, "qwen3_5": _qwen3_5, "qwen3_5_moe": _qwen3_5,
         "gemma4": _gemma4}
_built: dict = {}


def case(name):
    if name not in _built:
        inputs = CASES[name]()  # skips before building a model transformers lacks
        _built[name] = (tiny_vlm(name, layers=N_LAYERS), *inputs)
    return _built[name]


CVPR = [("image", "user"), ("image", "last"), ("user", "last"), ("last", "last")]
EDGE_SETS = {
    "cvpr-window": (CVPR, [1, 2]),
    "image-everywhere": ([("image", "last"), ("image", "user"), ("image", "generated")], range(N_LAYERS)),
    "text-decode": ([("user", "generated"), ("system", "user"), ("generated", "generated")], [0, 3]),
}
ATTENTION_LAYERS = {"qwen3_5": [3], "qwen3_5_moe": [3]}  # layers 0-2 are linear attention


@pytest.mark.parametrize("edges", list(EDGE_SETS))
@pytest.mark.parametrize("family", list(CASES))
def test_knockout_matches_eager_dense_mask(family, edges):
    model, kwargs, labels = case(family)
    block, layers = EDGE_SETS[edges]
    if family in ATTENTION_LAYERS:
        layers = ATTENTION_LAYERS[family]
    expect = run_oracle(model, kwargs, labels, block, set(layers))
    got = run_knockout(model, kwargs, block, layers)
    assert torch.equal(got.sequences, expect.sequences)
    for a, b in zip(got.logits, expect.logits, strict=True):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    plain = run_oracle(model, kwargs, labels, [], set())
    change = max(float((a - b).abs().max()) for a, b in zip(got.logits, plain.logits, strict=True))
    assert change > 1e-3  # the cuts matter


@pytest.mark.parametrize("family,layers", [("gemma4", [2, 3]), ("gemma3", [0, 2])], ids=["gemma4-kv-shared",
                                                                                        "gemma3-sliding"])
def test_knockout_on_layers_of_one_kind(family, layers):
    """Gemma 4's KV-shared layers alone (their queries read the cache of layers 0 / 1, which the cut leaves as it
    is) and Gemma 3's sliding-window layers alone: cut like any layer, within 1e-4 of the oracle."""
    model, kwargs, labels = case(family)
    block = [("image", "last"), ("image", "generated"), ("system", "user")]
    expect = run_oracle(model, kwargs, labels, block, set(layers))
    got = run_knockout(model, kwargs, block, layers)
    assert torch.equal(got.sequences, expect.sequences)
    for a, b in zip(got.logits, expect.logits, strict=True):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    plain = run_oracle(model, kwargs, labels, [], set())
    assert max(float((a - b).abs().max()) for a, b in zip(got.logits, plain.logits, strict=True)) > 1e-3
