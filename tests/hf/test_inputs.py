"""flowkern.hf.inputs.build_inputs: one builder for one prompt and for a batch of B prompts. A batch of one equals
the single prompt; each row of a batch, its left padding removed, equals that prompt built alone."""

from __future__ import annotations

import pytest
import torch

from flowkern.hf.inputs import build_inputs, prompt_text
from flowkern.hf.loading import load_model
from flowkern.hf.models import get_adapter
from tests.fixtures import save_eval_llava, save_image

PROMPTS = ["Is there a dog?", "Please describe this image in detail.", "Is there a cat in the image? Answer yes no"]


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    model, processor = load_model(save_eval_llava(root / "llava"), device="cpu")
    images = [save_image(root / f"{i}.png", i) for i in range(3)]
    return model, processor, images


def _same(a, b) -> None:
    assert set(a) == set(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def test_one_prompt_is_a_batch_of_one(llava):
    model, processor, images = llava
    single = build_inputs(processor, model, images[0], PROMPTS[0])
    assert single["input_ids"].shape[0] == 1 and bool(single["attention_mask"].all())
    _same(single, build_inputs(processor, model, [images[0]], [PROMPTS[0]]))
    two = build_inputs(processor, model, [images[0], images[1]], PROMPTS[0])  # two images in one prompt
    _same(two, build_inputs(processor, model, [[images[0], images[1]]], [PROMPTS[0]]))
    assert two["pixel_values"].shape[0] == 2


def test_batch_rows_are_the_single_prompts_left_padded(llava):
    model, processor, images = llava
    entries = [images[0], [images[1], images[2]], images[2]]
    batch = build_inputs(processor, model, entries, PROMPTS)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape[0] == 3 and mask.shape == ids.shape
    first = 0
    for b, (entry, prompt) in enumerate(zip(entries, PROMPTS, strict=True)):
        alone = build_inputs(processor, model, entry, prompt)
        n = alone["input_ids"].shape[1]
        assert mask[b, : ids.shape[1] - n].sum() == 0 and bool(mask[b, -n:].all())  # padding on the left only
        assert torch.equal(ids[b, -n:], alone["input_ids"][0])
        views = alone["pixel_values"].shape[0]
        assert torch.equal(batch["pixel_values"][first: first + views], alone["pixel_values"])
        first += views
    assert first == batch["pixel_values"].shape[0]
    assert processor.tokenizer.padding_side == "left"


def test_templating_and_placement(llava):
    model, processor, images = llava
    family = get_adapter(model).family
    text = prompt_text(processor, family, PROMPTS[0], 2)
    assert text.count(processor.image_token) == 2 and PROMPTS[0] in text
    verbatim = f"USER: {processor.image_token}\n{PROMPTS[0]} ASSISTANT:"
    assert prompt_text(processor, family, verbatim, 1) == verbatim
    param = next(model.parameters())
    inputs = build_inputs(processor, model, images[0], PROMPTS[0])
    assert inputs["pixel_values"].dtype == param.dtype and inputs["input_ids"].device == param.device


def test_bad_batches(llava):
    model, processor, images = llava
    with pytest.raises(ValueError, match="one image entry per prompt"):
        build_inputs(processor, model, [images[0]], PROMPTS[:2])
    with pytest.raises(ValueError, match="one image entry per prompt"):
        build_inputs(processor, model, [], [])
    with pytest.raises(ValueError, match="at least one image"):
        build_inputs(processor, model, [[], images[0]], PROMPTS[:2])
    with pytest.raises(ValueError, match="--image: no image given"):
        build_inputs(processor, model, [], PROMPTS[0])
    with pytest.raises(FileNotFoundError, match="no such file"):
        build_inputs(processor, model, [images[0], images[0].parent / "missing.png"], PROMPTS[:2])
