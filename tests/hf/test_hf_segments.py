"""Token labels (system / image / user / padding), image-token positions and the model adapters' grid rules."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    InstructBlipConfig,
    LlavaConfig,
    LlavaNextConfig,
    Qwen2VLConfig,
)

from flowkern.hf.models import ADAPTERS, get_adapter, supported_model_types
from flowkern.hf.segments import SEGMENT_NAMES, image_token_index, label_prompt

I = 9  # noqa: E741 - an image placeholder id in these tests


def test_segment_names():
    assert SEGMENT_NAMES == ("system", "image", "user", "generated")


def test_labels_left_padded_multi_image():
    ids = torch.tensor([[0, 0, 5, 6, I, I, 7, I, I, 8],
                        [5, I, I, I, 6, 7, 8, 9, 9, 4]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1, 1], [1] * 10])
    got = label_prompt(ids, [I], mask)
    assert got.tolist() == [[-1, -1, 0, 0, 1, 1, 2, 1, 1, 2],
                            [0, 1, 1, 1, 2, 2, 2, 1, 1, 2]]


def test_labels_several_placeholder_ids_and_no_image():
    ids = torch.tensor([[5, 3, 3, 6, 4, 4, 7], [5, 6, 7, 8, 9, 10, 11]])
    got = label_prompt(ids, [3, 4])
    assert got.tolist() == [[0, 1, 1, 2, 1, 1, 2], [2] * 7]  # no image: nothing comes "before the image"


def test_padding_placeholder_is_not_an_image():
    ids = torch.tensor([[I, 5, I, 6]])
    got = label_prompt(ids, [I], torch.tensor([[0, 1, 1, 1]]))
    assert got.tolist() == [[-1, 0, 1, 2]]


def test_image_token_index():
    seg = torch.tensor([[-1, 0, 1, 1, 2, 1], [0, 2, 2, 2, 2, 2]])
    index, valid = image_token_index(seg)
    assert index.tolist() == [[2, 3, 5], [0, 0, 0]] and valid.tolist() == [[True] * 3, [False] * 3]
    index, valid = image_token_index(torch.tensor([[0, 2]]))
    assert index.shape == (1, 0)


def test_unknown_family_lists_supported():
    with pytest.raises(ValueError) as err:
        get_adapter(LlavaConfig().text_config)
    for model_type in ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "internvl", "instructblip"):
        assert model_type in str(err.value)
    assert set(supported_model_types()) >= {"llava", "qwen3_vl"}


def test_encoder_decoder_language_model_is_refused():
    cfg = InstructBlipConfig(text_config={"model_type": "t5"})
    with pytest.raises(ValueError, match="encoder-decoder"):
        get_adapter(cfg)


def _grids(config, ids: torch.Tensor, inputs: dict | None = None):
    adapter = get_adapter(config)
    seg = label_prompt(ids, adapter.placeholder_token_ids(config))
    return adapter.image_grids(config, ids, seg, inputs or {})


def _llava(strategy: str, vision: str = "clip_vision_model") -> LlavaConfig:
    return LlavaConfig(vision_config={"model_type": vision, "image_size": 12, "patch_size": 4},
                       image_token_index=I, vision_feature_select_strategy=strategy)


def test_llava_grid_from_config():
    grids = _grids(_llava("default"), torch.tensor([[5] + [I] * 18 + [6]]))
    assert [(g.image, g.name, g.shape) for g in grids[0]] == [(0, "image", (3, 3)), (1, "image", (3, 3))]
    assert grids[0][1].index.tolist() == [[9, 10, 11], [12, 13, 14], [15, 16, 17]]
    # strategy "full" keeps CLIP's CLS token in front of each image: not on the grid
    grids = _grids(_llava("full"), torch.tensor([[5] + [I] * 20]))
    assert grids[0][1].index[0].tolist() == [11, 12, 13]
    with pytest.raises(ValueError, match="placeholder tokens"):
        _grids(_llava("default"), torch.tensor([[5] + [I] * 10]))


def test_llava_next_base_view_without_image_sizes():
    """Without image_sizes (generate may not pass them to forward) each image still has its base view."""
    cfg = LlavaNextConfig(vision_config={"model_type": "clip_vision_model", "image_size": 8, "patch_size": 2},
                          image_token_index=I, image_grid_pinpoints=[[16, 16], [8, 16], [16, 8]])
    ids = torch.tensor([[5] + [I] * 30 + [6] + [I] * 20])
    grids = _grids(cfg, ids)
    assert [(g.image, g.name, g.shape) for g in grids[0]] == [(0, "base", (4, 4)), (1, "base", (4, 4))]
    assert grids[0][1].index[0].tolist() == [30, 31, 32, 33]
    grids = _grids(cfg, torch.tensor([[5] + [I] * 50]), {"image_token_counts": [30, 20]})  # adjacent images
    assert grids[0][1].index[0, 0] == 30
    # with image_sizes: (6, 30) -> 2x8 crops after unpadding, one newline token per row
    grids = _grids(cfg, torch.tensor([[5] + [I] * 34]), {"image_sizes": torch.tensor([[6, 30]])})
    assert grids[0][1].name == "crops" and grids[0][1].index.tolist()[1][:2] == [16 + 9, 16 + 10]


def test_qwen_grid_from_vision_tower_inputs():
    """When forward only sees encoded features, the grids come from the vision tower's grid_thw (image vs video
    told apart by token count)."""
    cfg = Qwen2VLConfig(vision_config={"spatial_merge_size": 2}, image_token_id=I, video_token_id=8)
    ids = torch.tensor([[5] + [I] * 6 + [6] + [8] * 8])
    inputs = {"tower_grid_thw": [torch.tensor([[2, 4, 4]]), torch.tensor([[1, 4, 6]])]}  # video first here
    grids = _grids(cfg, ids, inputs)
    assert [(g.image, g.name, g.shape) for g in grids[0]] == [
        (0, "image", (2, 3)), (1, "frame0", (2, 2)), (1, "frame1", (2, 2))]
    assert grids[0][2].index.tolist() == [[10, 11], [12, 13]]


def test_model_constants_live_in_models_py():
    """docs/architecture.md: image token ids / counts are read from configs in hf/models.py, never hard-coded."""
    import pathlib
    import re

    import flowkern

    root = pathlib.Path(flowkern.__file__).parent
    pattern = re.compile(r"\b(576|32000|151655|151656)\b|35\s*:\s*611")
    offenders = [
        f"{path.relative_to(root)}:{n}"
        for path in root.rglob("*.py")
        if path.name != "models.py"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not offenders
    for adapter in ADAPTERS.values():
        assert adapter.model_types and adapter.placeholder_attrs
