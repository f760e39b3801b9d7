"""flowkern.lens vs an oracle written here: ``output_hidden_states=True`` and the model's own final norm and LM head
applied in the test (tiny random-weight LLaVA and Qwen2-VL, fp32, batch 1 and left-padded)."""

from __future__ import annotations

import importlib

import pytest
import torch

import flowkern
from flowkern.hf.tiny import IMAGE_TOKEN as IMG
from flowkern.hf.tiny import tiny_vlm
from tests.fixtures import labelled_prompts, raster

ATOL = 1e-5
_models: dict[str, torch.nn.Module] = {}


def _model(family: str) -> torch.nn.Module:
    if family not in _models:
        _models[family] = tiny_vlm(family, layers=3)
    return _models[family]


def _inputs(family: str, batch: int) -> dict:
    if family == "llava":
        samples = [[("sys", [5, 6, 7]), ("img", [IMG] * 16), ("user", [8, 9, 10, 11])],
                   [("sys", [5, 6]), ("img", [IMG] * 16), ("user", [9, 10])]][:batch]
        ids, mask, _ = labelled_prompts(samples)
        return dict(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(batch, 3, 8, 8))
    samples = [[("sys", [5, 102]), ("img", [IMG] * 6), ("user", [103, 8, 9, 10])],
               [("sys", [5, 6, 102]), ("img", [IMG] * 4), ("user", [103, 9])]][:batch]
    ids, mask, _ = labelled_prompts(samples)
    grid = torch.tensor([[1, 4, 6], [1, 4, 4]])[:batch]
    return dict(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(int(grid.prod(dim=1).sum()), 24),
                image_grid_thw=grid, mm_token_type_ids=(ids == IMG).int())


def _oracle(model: torch.nn.Module, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per layer the lens probabilities at every position [L, B, S, V] (fine for a tiny vocabulary), and the logits."""
    with torch.no_grad():
        out = model(**kwargs, output_hidden_states=True)
        lm = model.model.language_model
        layers = len(lm.layers)
        hidden = list(out.hidden_states[1:layers + 1])
        # transformers returns the last entry after the final norm; the layer's own output is what the lens reads
        hidden[-1] = None
        captured = {}
        handle = lm.layers[-1].register_forward_hook(lambda m, a, o: captured.setdefault("h", o[0] if isinstance(
            o, tuple) else o))
        try:
            model(**kwargs)
        finally:
            handle.remove()
        hidden[-1] = captured["h"]
        probs = torch.stack([torch.softmax(model.lm_head(lm.norm(h)).float(), dim=-1) for h in hidden])
    return probs, out.logits


@pytest.mark.parametrize("batch", [1, 2], ids=["batch1", "left_padded"])
@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_lens_matches_hidden_states(family, batch):
    model = _model(family)
    kwargs = _inputs(family, batch)
    probs, logits = _oracle(model, kwargs)
    L, B, S, V = probs.shape
    tokens = torch.tensor([3, 8, 11])
    with torch.inference_mode(), flowkern.lens(model, positions="last", top_k=4, token_ids=tokens) as lens:
        model(**kwargs)
    assert lens.top_ids.shape == (L, B, 1, 4) and lens.token_probs.shape == (L, B, 1, 3)
    last = probs[:, :, -1]  # [L, B, V]
    expect_p, expect_i = last.topk(4, dim=-1)
    torch.testing.assert_close(lens.top_probs[:, :, 0], expect_p, atol=ATOL, rtol=0)
    assert torch.equal(lens.top_ids[:, :, 0], expect_i)
    torch.testing.assert_close(lens.token_probs[:, :, 0], last[..., tokens], atol=ATOL, rtol=0)
    # the last layer's lens is the model's own next-token distribution
    torch.testing.assert_close(lens.top_probs[-1, :, 0], torch.softmax(logits[:, -1].float(), -1).topk(4).values,
                               atol=ATOL, rtol=0)

    # every image token, in chunks of one position (CHUNK_LOGITS forced down)
    is_image = kwargs["input_ids"] == IMG
    with torch.inference_mode(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(importlib.import_module("flowkern.lens"), "CHUNK_LOGITS", 1)
        with flowkern.lens(model, positions="image", top_k=2, image_inputs=kwargs) as lens:
            model(**kwargs)
    for b in range(B):
        pos = torch.nonzero(is_image[b]).flatten()
        k = pos.numel()
        assert torch.equal(lens.positions[b, :k], pos) and lens.valid[b, :k].all() and not lens.valid[b, k:].any()
        exp = probs[:, b, pos].topk(2, dim=-1)
        torch.testing.assert_close(lens.top_probs[:, b, :k], exp.values, atol=ATOL, rtol=0)
        assert torch.equal(lens.top_ids[:, b, :k], exp.indices)


def test_image_map_on_the_grid():
    model = _model("llava")
    kwargs = _inputs("llava", 2)
    with torch.inference_mode(), flowkern.lens(model, positions="image", top_k=1, token_ids=[7],
                                               image_inputs=kwargs) as lens:
        model.generate(**kwargs, max_new_tokens=2, do_sample=False)  # decode steps are not read
    pad = kwargs["input_ids"].shape[1] - (2 + 16 + 2)
    pos = raster(pad + 2, 4, 4)  # sample 1's image tokens on their 4x4 grid, by hand
    k = lens.positions[1].tolist()
    ordinal = torch.tensor([[k.index(int(p)) for p in row] for row in pos])
    got = lens.image_map(1, sample=1)
    assert got.shape == (4, 4) and torch.equal(got, lens.top_ids[1, 1, :, 0][ordinal])
    torch.testing.assert_close(lens.image_map(-1, sample=1, token=0), lens.token_probs[-1, 1, :, 0][ordinal])


def test_explicit_positions_and_errors():
    model = _model("llava")
    kwargs = _inputs("llava", 1)
    with torch.inference_mode(), flowkern.lens(model, positions=[0, -1], top_k=1) as lens:
        model(**kwargs)
    S = kwargs["input_ids"].shape[1]
    assert lens.positions.tolist() == [[0, S - 1]]
    for bad in (dict(positions="middle"), dict(positions=[]), dict(top_k=-1), dict(top_k=0),
                dict(token_ids=[0.5])):
        with pytest.raises(ValueError, match=next(iter(bad))):
            flowkern.lens(model, **bad)
    with pytest.raises(ValueError, match=r"token_ids must lie in \[0, "):
        flowkern.lens(model, token_ids=[10**6])
    with pytest.raises(ValueError, match="token_ids has 3 rows"), torch.inference_mode(), \
            flowkern.lens(model, token_ids=torch.zeros(3, 1, dtype=torch.long)):
        model(**kwargs)
    with pytest.raises(ValueError, match="outside"), torch.inference_mode(), \
            flowkern.lens(model, positions=[S + 3]):
        model(**kwargs)
    with pytest.raises(NotImplementedError, match="prune"), torch.inference_mode(), \
            flowkern.prune(model, layer=1), flowkern.lens(model):
        model(**kwargs)
    with pytest.raises(RuntimeError, match="recorded nothing"):
        flowkern.lens(model).top_ids  # noqa: B018
