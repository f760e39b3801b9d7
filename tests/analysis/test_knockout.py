"""flowkern.knockout on tiny random-weight VLMs vs transformers' eager attention with a dense mask built here.

The oracle runs the model with ``attn_implementation="eager"`` and a forward pre-hook on each language-model
attention module that edits the 4D additive mask transformers made: at the cut layers, a query at position ``p``
gets the dtype's minimum at every key ``j`` with ``(label[j], label[p])`` a cut edge. The labels are written out by
hand per prompt piece (``tests.fixtures.labelled_prompts``); ``last`` is the last prompt column (left padding), every
position past the prompt is ``generated``. Nothing here calls flowkern's segment or knockout code to build the mask.
Greedy ``generate`` with the KV cache, fp32, logits of every step within 1e-4, batch 1 and a left-padded batch 2.
"""

from __future__ import annotations

import pytest
import torch

import flowkern
from flowkern.hf.tiny import IMAGE_TOKEN as IMG
from flowkern.hf.tiny import tiny_vlm
from tests.fixtures import labelled_prompts

N_LAYERS = 4
NEW = 4
ATOL = 1e-4
LAST, GEN = 4, 3
NAMES = {"system": 0, "image": 1, "user": 2, "generated": 3, "last": 4}

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------------------
# the oracle: eager attention, its 4D mask edited by a hook


def _dense_block(labels: torch.Tensor, edges, sq: int, sk: int) -> torch.Tensor:
    """bool [B, 1, Sq, Sk]: True where the query at position sk - sq + i may not read key j."""
    B, S = labels.shape
    lab = torch.full((B, sk), GEN, dtype=torch.long)
    n = min(S, sk)
    lab[:, :n] = labels[:, :n]
    if S <= sk:
        lab[:, S - 1] = LAST
    qlab = lab[:, sk - sq:]
    block = torch.zeros(B, sq, sk, dtype=torch.bool)
    for src, dst in edges:
        block |= (qlab[:, :, None] == NAMES[dst]) & (lab[:, None, :] == NAMES[src])
    return block[:, None]


def run_oracle(model, kwargs, labels, edges, layers, new=NEW, hidden=None):
    """greedy generate under eager attention, the cut edges (and ``hidden``: (bool [B, S] keys, from layer) hidden
    from every query) masked densely."""
    handles = []

    def pre(module, args, kw):
        mask = kw["attention_mask"]
        assert mask is not None and mask.dim() == 4
        sq, sk = kw["hidden_states"].shape[1], mask.shape[-1]
        block = torch.zeros(mask.shape[0], 1, sq, sk, dtype=torch.bool)
        if module.layer_idx in layers:
            block |= _dense_block(labels, edges, sq, sk)
        if hidden is not None and module.layer_idx >= hidden[1]:
            keys = torch.zeros(mask.shape[0], sk, dtype=torch.bool)
            keys[:, :hidden[0].shape[1]] = hidden[0][:, :sk]
            block |= keys[:, None, None, :]
        kw["attention_mask"] = mask.masked_fill(block, torch.finfo(mask.dtype).min)
        return args, kw

    model.set_attn_implementation({"text_config": "eager"})
    for name, m in model.named_modules():
        if "language_model" in name and name.endswith("self_attn"):
            handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
    assert len(handles) == N_LAYERS
    try:
        with torch.no_grad():
            return model.generate(**kwargs, max_new_tokens=new, do_sample=False, output_logits=True,
                                  return_dict_in_generate=True)
    finally:
        for h in handles:
            h.remove()
        model.set_attn_implementation({"text_config": "sdpa"})


def run_knockout(model, kwargs, edges, layers, new=NEW):
    with torch.no_grad(), flowkern.knockout(model, block=edges, layers=layers) as k:
        out = model.generate(**kwargs, max_new_tokens=new, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    assert k.forwards == new
    return out


def assert_same_generation(got, expect):
    assert torch.equal(got.sequences, expect.sequences)
    for a, b in zip(got.logits, expect.logits, strict=True):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------------------------------------
# tiny models: {batch: (generate kwargs, hand-written labels)}


def _llava():
    model = tiny_vlm("llava", layers=N_LAYERS)
    p0 = [("sys", [5, 6, 7]), ("img", [IMG] * 16), ("user", [8, 9]), ("img", [IMG] * 16), ("user", [10, 11, 12])]
    p1 = [("sys", [5, 6]), ("img", [IMG] * 16), ("user", [9, 10, 11, 12])]
    pv = torch.randn(3, 3, 8, 8)
    ids, mask, lab = labelled_prompts([p0, p1])
    i1, m1, l1 = labelled_prompts([p1])
    return model, {2: (dict(input_ids=ids, attention_mask=mask, pixel_values=pv), lab),
                   1: (dict(input_ids=i1, attention_mask=m1, pixel_values=pv[2:]), l1)}


def _llava_next():
    model = tiny_vlm("llava_next", layers=N_LAYERS)
    sizes = torch.tensor([[6, 30], [20, 6]])
    n0, n1 = 16 + 2 * (8 + 1), 16 + 8 * (2 + 1)
    pv = torch.randn(2, 3, 3, 8, 8)
    p0 = [("sys", [5, 6, 7]), ("img", [IMG] * n0), ("user", [8, 9, 10])]
    p1 = [("sys", [5]), ("img", [IMG] * n1), ("user", [8, 9, 10, 11])]
    ids, mask, lab = labelled_prompts([p0, p1])
    i1, m1, l1 = labelled_prompts([p0])
    return model, {2: (dict(input_ids=ids, attention_mask=mask, pixel_values=pv, image_sizes=sizes), lab),
                   1: (dict(input_ids=i1, attention_mask=m1, pixel_values=pv[:1], image_sizes=sizes[:1]), l1)}


def _qwen2_vl():
    model = tiny_vlm("qwen2_vl", layers=N_LAYERS)
    p0 = [("sys", [5, 102]), ("img", [IMG] * 16), ("user", [103, 8, 9, 10])]
    p1 = [("sys", [5, 6, 102]), ("img", [IMG] * 8), ("user", [103, 8, 9])]
    pv = torch.randn(64 + 32, 24)
    thw = torch.tensor([[1, 8, 8], [1, 4, 8]])
    ids, mask, lab = labelled_prompts([p0, p1])
    i1, m1, l1 = labelled_prompts([p0])
    return model, {
        2: (dict(input_ids=ids, attention_mask=mask, pixel_values=pv, image_grid_thw=thw,
                 mm_token_type_ids=(ids == IMG).int()), lab),
        1: (dict(input_ids=i1, attention_mask=m1, pixel_values=pv[:64], image_grid_thw=thw[:1],
                 mm_token_type_ids=(i1 == IMG).int()), l1)}


BUILDERS = {"llava": _llava, "llava_next": _llava_next, "qwen2_vl": _qwen2_vl}
_built: dict = {}


def case(name):
    if name not in _built:
        torch.manual_seed(0)
        _built[name] = BUILDERS[name]()
    return _built[name]


CVPR = [("image", "user"), ("image", "last"), ("user", "last"), ("last", "last")]
EDGE_SETS = {
    "cvpr-window": (CVPR, range(1, 3)),
    "image-everywhere": ([("image", "last"), ("image", "user"), ("image", "generated")], range(N_LAYERS)),
    "text-decode": ([("user", "generated"), ("system", "user"), ("generated", "generated")], [0, 3]),
}


# ----------------------------------------------------------------------------------------------------------
# the oracle tests


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("edges", list(EDGE_SETS))
@pytest.mark.parametrize("family", list(BUILDERS))
def test_knockout_matches_eager_dense_mask(family, edges, batch):
    model, batches = case(family)
    kwargs, labels = batches[batch]
    block, layers = EDGE_SETS[edges]
    expect = run_oracle(model, kwargs, labels, block, set(layers))
    got = run_knockout(model, kwargs, block, layers)
    assert_same_generation(got, expect)
    plain = run_oracle(model, kwargs, labels, [], set())
    change = max(float((a - b).abs().max()) for a, b in zip(got.logits, plain.logits, strict=True))
    assert change > 1e-3  # the cuts matter


def test_knockout_changes_the_answer_and_leaves_the_model_as_it_was():
    model, batches = case("llava")
    kwargs, labels = batches[2]
    plain = run_oracle(model, kwargs, labels, [], set())
    cut = run_knockout(model, kwargs, [("image", "last"), ("image", "user"), ("image", "generated")],
                       range(N_LAYERS))
    assert (cut.logits[0] - plain.logits[0]).abs().max() > 1e-2  # the cut matters on this model
    with torch.no_grad():
        after = model.generate(**kwargs, max_new_tokens=NEW, do_sample=False, output_logits=True,
                               return_dict_in_generate=True)
    assert_same_generation(after, plain)
    assert not any(hasattr(m, "_flowkern_state") for m in model.modules())


def test_knockout_inside_prune_matches_eager():
    """prune(layer=2, keep=0) is the masking variant (image keys hidden from every query at layers >= 2); the cuts
    apply on top, through the pruned layers' key maps."""
    model, batches = case("llava")
    kwargs, labels = batches[2]
    edges, layers = [("user", "last"), ("system", "generated")], range(1, N_LAYERS)
    expect = run_oracle(model, kwargs, labels, edges, set(layers), hidden=(labels == 1, 2))
    with torch.no_grad(), flowkern.prune(model, layer=2, keep=0), flowkern.knockout(model, edges, layers):
        got = model.generate(**kwargs, max_new_tokens=NEW, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    assert_same_generation(got, expect)


def test_trace_under_knockout_reports_the_trace_labels():
    model, batches = case("llava")
    kwargs, _ = batches[2]
    with torch.no_grad(), flowkern.knockout(model, [("image", "last"), ("image", "generated")]), \
            flowkern.trace(model) as flow:
        model.generate(**kwargs, max_new_tokens=NEW, do_sample=False)
    steps = flow.step_shares
    assert steps.shape[-1] == 4
    torch.testing.assert_close(steps.sum(-1), torch.ones(steps.shape[:-1]), atol=1e-5, rtol=0)
    assert float(steps[..., 1].abs().max()) == 0.0  # the answer rows read no image
    with torch.no_grad(), flowkern.trace(model) as plain:
        model.generate(**kwargs, max_new_tokens=NEW, do_sample=False)
    assert float(plain.step_shares[..., 1].min()) > 0.0


def test_knockout_bad_arguments():
    model, _ = case("llava")
    with pytest.raises(ValueError, match="block"):
        flowkern.knockout(model, [("image", "answer")])
    with pytest.raises(ValueError, match="block"):
        flowkern.knockout(model, [])
    with pytest.raises(ValueError, match="layers"):
        flowkern.knockout(model, "image->last", layers=range(2, 9))
    k = flowkern.knockout(model, "image->last", layers=[3, 1])
    assert k.block == (("image", "last"),) and k.layers == (1, 3)
    assert not bool(k.allowed[4, 1]) and int(k.allowed.sum()) == 24


def test_knockout_refuses_autograd():
    model, batches = case("llava")
    kwargs, _ = batches[1]
    with flowkern.knockout(model, "image->last"), pytest.raises(NotImplementedError, match="no_grad"):
        model(**kwargs)
