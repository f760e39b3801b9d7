"""flowkern.trace's segment x segment flow and per-head shares vs transformers' eager attention weights.

The oracle: ``generate(output_attentions=True)`` with the eager attention of a tiny random-weight LLaVA and Qwen2-VL
(fp32), summed here per key segment with labels written by hand, at batch 1 and in a left-padded batch of 2.
"""

from __future__ import annotations

import pytest
import torch

import flowkern
from flowkern.hf.tiny import IMAGE_TOKEN as IMG
from flowkern.hf.tiny import tiny_vlm
from flowkern.trace import Flow
from tests.fixtures import labelled_prompts

NEW_TOKENS = 3
ATOL = 1e-5
_models: dict[str, torch.nn.Module] = {}


def _model(family: str) -> torch.nn.Module:
    if family not in _models:
        _models[family] = tiny_vlm(family)
    return _models[family]


def _inputs(family: str, batch: int) -> tuple[dict, torch.Tensor]:
    """generate kwargs and hand-written labels [B, S] (-1 = padding)."""
    if family == "llava":
        n = 16
        samples = [[("sys", [5, 6, 7]), ("img", [IMG] * n), ("user", [8, 9, 10, 11])],
                   [("sys", [5, 6]), ("img", [IMG] * n), ("user", [9, 10])]][:batch]
        ids, mask, labels = labelled_prompts(samples)
        return dict(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(batch, 3, 8, 8)), labels
    samples = [[("sys", [5, 102]), ("img", [IMG] * 6), ("user", [103, 8, 9, 10])],
               [("sys", [5, 6, 102]), ("img", [IMG] * 4), ("user", [103, 9])]][:batch]
    ids, mask, labels = labelled_prompts(samples)
    grid = torch.tensor([[1, 4, 6], [1, 4, 4]])[:batch]
    pixels = torch.randn(int(grid.prod(dim=1).sum()), 24)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grid,
                mm_token_type_ids=(ids == IMG).int()), labels


def _eager(model: torch.nn.Module, kwargs: dict) -> object:
    model.set_attn_implementation("eager")
    try:
        return model.generate(**kwargs, max_new_tokens=NEW_TOKENS, do_sample=False, output_attentions=True,
                              return_dict_in_generate=True)
    finally:
        model.set_attn_implementation("sdpa")


def _expected(attentions: tuple, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From eager weights: the answer rows' per-head shares [T, L, B, H, 4], and the segment x segment flow [L, 4, 4]
    pooled over the batch, with its per-sample form [L, B, 4, 4]."""
    B = labels.shape[0]
    heads, sums, rows = [], 0, 0
    for t, step in enumerate(attentions):
        keys = torch.cat([labels, torch.full((B, t), 3)], dim=1)  # [B, Sk]
        onehot_k = torch.stack([(keys == c) for c in range(4)], -1).double()  # [B, Sk, 4]
        per_layer = [torch.einsum("bhqk,bkc->bhqc", a.double(), onehot_k) for a in step]  # [B, H, Sq, 4]
        heads.append(torch.stack([m[:, :, -1] for m in per_layer]))
        q_labels = keys[:, -per_layer[0].shape[2]:]  # the rows of this step: the whole prompt, then one token
        onehot_q = torch.stack([(q_labels == c) for c in range(4)], -1).double()  # [B, Sq, 4]
        sums = sums + torch.stack([torch.einsum("bqs,bqc->bsc", onehot_q, m.mean(dim=1)) for m in per_layer])
        rows = rows + onehot_q.sum(dim=1)
    flow = sums.sum(dim=1) / rows.sum(dim=0)[None, :, None]
    per_sample = sums / rows[None, :, :, None]
    return torch.stack(heads).float(), flow.float(), per_sample.float()


@pytest.mark.parametrize("batch", [1, 2], ids=["batch1", "left_padded"])
@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_flow_and_heads_match_eager(family, batch):
    model = _model(family)
    kwargs, labels = _inputs(family, batch)
    eager = _eager(model, kwargs)
    with flowkern.trace(model, image_inputs=kwargs, per_head=True, segment_flow=True) as flow:
        tokens = model.generate(**kwargs, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert torch.equal(tokens, eager.sequences)
    exp_heads, exp_flow, exp_sample = _expected(eager.attentions, labels)
    n_layers, n_heads = model.config.text_config.num_hidden_layers, model.config.text_config.num_attention_heads
    assert flow.step_head_shares.shape == (NEW_TOKENS, n_layers, batch, n_heads, 4)
    torch.testing.assert_close(flow.step_head_shares, exp_heads, atol=ATOL, rtol=0)
    torch.testing.assert_close(flow.head_shares, exp_heads.mean(dim=(0, 2)), atol=ATOL, rtol=0)
    torch.testing.assert_close(flow.head_shares.mean(dim=1), flow.shares, atol=ATOL, rtol=0)
    assert flow.segment_flow.shape == (n_layers, 4, 4)
    torch.testing.assert_close(flow.segment_flow, exp_flow, atol=ATOL, rtol=0, equal_nan=True)
    torch.testing.assert_close(flow.sample_segment_flow, exp_sample, atol=ATOL, rtol=0, equal_nan=True)
    # every query segment has rows here; each row of the table sums to 1; system rows see only system keys
    torch.testing.assert_close(flow.segment_flow.sum(dim=-1), torch.ones(n_layers, 4), atol=ATOL, rtol=0)
    assert float(flow.segment_flow[:, 0, 1:].abs().max()) == 0.0
    d = flow.to_dict()
    assert len(d["segment_flow"]) == n_layers and len(d["head_shares"][0]) == n_heads


def test_nothing_extra_when_not_asked(monkeypatch):
    """Without per_head / segment_flow the row events carry neither (the kernel call is the same as before)."""
    model = _model("llava")
    kwargs, _ = _inputs("llava", 2)
    seen = []
    original = Flow.on_row
    monkeypatch.setattr(Flow, "on_row", lambda self, event: (seen.append(event), original(self, event)))
    with flowkern.trace(model) as flow:
        model(**kwargs)
    assert seen and all(e.rows is None and e.head_mass is None for e in seen)
    for name in ("head_shares", "segment_flow"):
        with pytest.raises(RuntimeError, match=name.split("_")[0]):
            getattr(flow, name)


def test_segment_flow_without_rows_is_nan():
    """One forward (no decode step): the generated segment has no query row, so its row of the table is NaN."""
    model = _model("llava")
    kwargs, _ = _inputs("llava", 1)
    with torch.inference_mode(), flowkern.trace(model, segment_flow=True) as flow:
        model(**kwargs)
    table = flow.segment_flow
    assert torch.isnan(table[:, 3]).all() and torch.isfinite(table[:, :3]).all()


def test_segment_flow_under_prune():
    """Inside flowkern.prune the pruned layers' rows are the kept tokens: image rows vanish from layer L on."""
    model = _model("llava")
    kwargs, _ = _inputs("llava", 2)
    with torch.inference_mode(), flowkern.prune(model, layer=1), flowkern.trace(model, segment_flow=True) as flow:
        model.generate(**kwargs, max_new_tokens=2, do_sample=False)
    table = flow.segment_flow
    assert torch.isfinite(table[0]).all()
    assert torch.isnan(table[1:, 1]).all()  # no image row is left from layer 1 on
    assert float(table[1:, :, 1].nan_to_num().abs().max()) == 0.0  # nor any image key
    torch.testing.assert_close(table[1:, [0, 2, 3]].sum(dim=-1), torch.ones(2, 3), atol=ATOL, rtol=0)
