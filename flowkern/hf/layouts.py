"""Image layouts of the model families: where each image's tokens sit on a 2D grid (the ``layout`` of each
:class:`flowkern.hf.models.ModelAdapter`; only :mod:`flowkern.hf.models` uses them).

A layout function takes ``(config, placeholder ids per sample, their sequence positions per sample, inputs)`` --
``inputs`` being the forward inputs the adapter captures plus ``"prompt_ids"``, the whole prompt ``[B, S]`` -- and
returns, per sample, the :class:`flowkern.hf.segments.ImageGrid` views of its images (``ImageGrid.index`` =
ordinals into that sample's placeholder tokens). It raises ``ValueError`` when the tokens do not match the layout
the config and inputs describe.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from flowkern.hf.segments import ImageGrid

__all__ = [
    "gemma3_layout",
    "gemma4_layout",
    "idefics3_layout",
    "instructblip_layout",
    "internvl_layout",
    "llava_layout",
    "llava_next_layout",
    "llava_onevision_layout",
    "mistral3_layout",
    "paligemma_layout",
    "qwen_vl_layout",
]

# vision towers whose sequence starts with a CLS token (kept by vision_feature_select_strategy="full")
_TOWERS_WITH_CLS = ("clip_vision_model",)


# ----------------------------------------------------------------------------------------------------------
# helpers


def _side(value: int | Sequence[int]) -> tuple[int, int]:
    """(h, w) from an int or a pair."""
    if isinstance(value, (list, tuple)):
        return int(value[0]), int(value[1])
    return int(value), int(value)


def _patch_grid(vision_config: Any) -> tuple[int, int]:
    """Patch grid (rows, cols) of one vision-tower input: image_size // patch_size."""
    ih, iw = _side(vision_config.image_size)
    ph, pw = _side(vision_config.patch_size)
    return ih // ph, iw // pw


def _check_consumed(family: str, b: int, used: int, total: int) -> None:
    if used != total:
        raise ValueError(
            f"{family}: sample {b} has {total} image placeholder tokens but the image layout accounts for {used}; "
            "the prompt does not match the config / processor outputs"
        )


def _image_sizes(inputs: dict) -> list[tuple[int, int]] | None:
    """The ``image_sizes`` input as a list of (height, width), or None."""
    sizes = inputs.get("image_sizes")
    return None if sizes is None else [(int(h), int(w)) for h, w in torch.as_tensor(sizes).reshape(-1, 2).tolist()]


def _runs(positions: torch.Tensor) -> list[tuple[int, int]]:
    """(start ordinal, length) of each run of consecutive sequence positions."""
    if positions.numel() == 0:
        return []
    breaks = (torch.nonzero(positions[1:] != positions[:-1] + 1).flatten() + 1).tolist()
    starts = [0] + breaks
    ends = breaks + [positions.numel()]
    return [(s, e - s) for s, e in zip(starts, ends, strict=True)]


# ----------------------------------------------------------------------------------------------------------
# layouts


def llava_layout(config: Any, ids: list[torch.Tensor], positions: list[torch.Tensor], inputs: dict) -> list:
    """LLaVA-1.5: each image is a (image_size/patch_size)^2 raster (plus a leading CLS token with strategy "full")."""
    rows, cols = _patch_grid(config.vision_config)
    has_cls = config.vision_feature_select_strategy == "full" and config.vision_config.model_type in _TOWERS_WITH_CLS
    per_image = rows * cols + int(has_cls)
    out = []
    for b, tok in enumerate(ids):
        n = tok.numel()
        if n % per_image:
            _check_consumed("llava", b, n - n % per_image, n)
        grids = []
        for i in range(n // per_image):
            start = i * per_image + int(has_cls)
            grids.append(ImageGrid(i, "image", torch.arange(start, start + rows * cols).view(rows, cols), whole=True))
        out.append(grids)
    return out


def _anyres_crops_shape(config: Any, image_size: Sequence[int], base: tuple[int, int]) -> tuple[int, int]:
    """LLaVA-NeXT: (rows, cols) of the unpadded high-resolution crop grid of one image (before newline tokens)."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

    n_h, n_w = get_anyres_image_grid_shape(
        [int(s) for s in image_size], config.image_grid_pinpoints, config.vision_config.image_size
    )
    dummy = torch.empty(0, n_h * base[0], n_w * base[1])  # shape-only: transformers' own unpadding rule
    unpadded = unpad_image(dummy, [int(s) for s in image_size])
    return int(unpadded.shape[1]), int(unpadded.shape[2])


def llava_next_layout(config: Any, ids: list[torch.Tensor], positions: list[torch.Tensor], inputs: dict) -> list:
    """LLaVA-NeXT anyres: per image, the base image raster, then the unpadded crops with one newline token per row.

    Views: ``"base"`` (image_size/patch_size square) and ``"crops"`` (newline tokens left out). The crops need the
    ``image_sizes`` processor output; without it (``generate`` may encode the images before the first forward and
    not pass it on) only the ``"base"`` view is given, each image delimited by its token count (from the encoder
    outputs) or by its run of consecutive placeholder tokens.
    """
    if config.vision_feature_select_strategy != "default":
        raise ValueError("llava_next: image layout is known for vision_feature_select_strategy='default' only")
    base = _patch_grid(config.vision_config)
    n_base = base[0] * base[1]
    sizes = _image_sizes(inputs)
    counts = list(inputs.get("image_token_counts") or [])
    out = []
    for b, (tok, pos) in enumerate(zip(ids, positions, strict=True)):
        grids, used, i = [], 0, 0
        runs = _runs(pos)
        while used < tok.numel():
            if sizes is not None:
                if not sizes:
                    _check_consumed("llava_next", b, used, tok.numel())
                hu, wu = _anyres_crops_shape(config, sizes.pop(0), base)
                length = n_base + hu * (wu + 1)
                crops = torch.arange(used + n_base, used + length).view(hu, wu + 1)[:, :wu]
            else:
                length = counts.pop(0) if counts else runs[i][1] if i < len(runs) else tok.numel() - used
                crops = None
            if length < n_base or used + length > tok.numel():
                _check_consumed("llava_next", b, used + length, tok.numel())
            grids.append(ImageGrid(i, "base", torch.arange(used, used + n_base).view(base), whole=True))
            if crops is not None:
                grids.append(ImageGrid(i, "crops", crops))
            used += length
            i += 1
        out.append(grids)
    return out


def _image_spans(tok: torch.Tensor, pos: torch.Tensor, counts: list[int]) -> list[tuple[int, int]]:
    """(start ordinal, length) of each image of a sample: from per-image token counts (consumed) or else runs."""
    spans, used = [], 0
    runs = iter(_runs(pos))
    while used < tok.numel():
        length = counts.pop(0) if counts else next(runs, (used, tok.numel() - used))[1]
        spans.append((used, length))
        used += length
    return spans


def llava_onevision_layout(config: Any, ids: list[torch.Tensor], positions: list[torch.Tensor], inputs: dict) -> list:
    """LLaVA-OneVision: images as LLaVA-NeXT (base raster, then crops with newlines, shrunk to at most
    ``anyres_max_N`` base images; a multi-image prompt has base + one newline per image); a video is a run of
    frames of pooled ceil(g/2)^2 rasters plus one newline. Views: ``"base"``, ``"crops"`` (when ``image_sizes`` is
    known), ``"frame{k}"``."""

    base = _patch_grid(config.vision_config)
    n_base = base[0] * base[1]
    pooled = (math.ceil(base[0] / 2), math.ceil(base[1] / 2))
    sizes = _image_sizes(inputs) or []
    max_crops = int(str(getattr(config, "vision_aspect_ratio", "anyres_max_9")).removeprefix("anyres_max_"))
    counts = list(inputs.get("image_token_counts") or [])
    out = []
    for b, (tok, pos) in enumerate(zip(ids, positions, strict=True)):
        found = []
        image_ords = torch.nonzero(tok == int(config.image_token_id)).flatten()
        for start, length in _image_spans(image_ords, pos[image_ords], counts):
            ords = image_ords[start : start + length]
            if length < n_base:
                _check_consumed("llava_onevision", b, start + n_base, image_ords.numel())
            views = [("base", ords[:n_base].view(base))]
            size = sizes.pop(0) if sizes else None
            if size is not None and length != n_base + 1:
                hu, wu = _anyres_crops_shape(config, size, base)
                ratio = math.sqrt(hu * wu / (max_crops * n_base))
                if ratio > 1.1:
                    hu, wu = int(hu // ratio), int(wu // ratio)
                if n_base + hu * (wu + 1) != length:
                    _check_consumed("llava_onevision", b, start + n_base + hu * (wu + 1), start + length)
                views.append(("crops", ords[n_base:].view(hu, wu + 1)[:, :wu]))
            found.append((int(ords[0]), views))
        video_id = getattr(config, "video_token_id", None)
        video_ords = torch.nonzero(tok == int(video_id)).flatten() if video_id is not None else tok[:0]
        per_frame = pooled[0] * pooled[1]
        for start, length in _image_spans(video_ords, pos[video_ords], []):
            if (length - 1) % per_frame:
                _check_consumed("llava_onevision", b, start + length - (length - 1) % per_frame, start + length)
            ords = video_ords[start : start + length - 1].view(-1, *pooled)
            found.append((int(ords.flatten()[0]), [(f"frame{f}", ords[f]) for f in range(ords.shape[0])]))
        grids = []
        for i, (_, views) in enumerate(sorted(found, key=lambda x: x[0])):
            grids.extend(ImageGrid(i, name, index, whole=name in ("image", "base")) for name, index in views)
        out.append(grids)
    return out


def _split_tower_grids(calls: list[torch.Tensor], n_image_tokens: int, merge: int) -> tuple:
    """Assign the ``grid_thw`` of each vision-tower call to images or videos by the number of tokens it makes."""
    image_thw = video_thw = None
    for thw in calls:
        n = int((torch.as_tensor(thw).reshape(-1, 3).prod(dim=-1) // (merge * merge)).sum())
        if image_thw is None and n == n_image_tokens:
            image_thw = thw
        elif video_thw is None:
            video_thw = thw
    return image_thw, video_thw


def qwen_vl_layout(config: Any, ids: list[torch.Tensor], positions: list[torch.Tensor], inputs: dict) -> list:
    """Qwen2-VL / Qwen2.5-VL / Qwen3-VL: each image (video) is a (t, h/m, w/m) raster of merged patches.

    ``image_grid_thw`` / ``video_grid_thw`` list the items in prompt order over the batch (from the forward inputs,
    or else from the ``grid_thw`` the vision tower was called with); m is the vision config's ``spatial_merge_size``.
    Views: ``"image"`` for t = 1, else ``"frame{k}"`` per temporal slice.
    """
    m = int(config.vision_config.spatial_merge_size)
    grids_thw = {"image": inputs.get("image_grid_thw"), "video": inputs.get("video_grid_thw")}
    if grids_thw["image"] is None and grids_thw["video"] is None and inputs.get("tower_grid_thw"):
        n_image = sum(int((tok == int(config.image_token_id)).sum()) for tok in ids)
        grids_thw["image"], grids_thw["video"] = _split_tower_grids(inputs["tower_grid_thw"], n_image, m)
    streams = []
    for attr, key in (("image_token_id", "image"), ("video_token_id", "video")):
        token_id = getattr(config, attr, None)
        thw = grids_thw[key]
        items = [] if thw is None else [tuple(int(v) for v in row) for row in torch.as_tensor(thw).reshape(-1, 3)]
        streams.append((token_id, items))
    out = []
    for b, tok in enumerate(ids):
        found = []  # (first ordinal, views)
        used = 0
        for token_id, items in streams:
            if token_id is None:
                continue
            ords = torch.nonzero(tok == int(token_id)).flatten()
            k = 0
            while k < ords.numel():
                if not items:
                    _check_consumed("qwen_vl", b, used + k, tok.numel())
                t, h, w = items.pop(0)
                rows, cols = h // m, w // m
                n = t * rows * cols
                if k + n > ords.numel():
                    _check_consumed("qwen_vl", b, used + k + n, tok.numel())
                cell = ords[k : k + n].view(t, rows, cols)
                views = [("image", cell[0])] if t == 1 else [(f"frame{f}", cell[f]) for f in range(t)]
                found.append((int(ords[k]), views))
                k += n
            used += k
        _check_consumed("qwen_vl", b, used, tok.numel())
        grids = []
        for i, (_, views) in enumerate(sorted(found, key=lambda x: x[0])):
            grids.extend(ImageGrid(i, name, index, whole=name in ("image", "base")) for name, index in views)
        out.append(grids)
    return out


def internvl_layout(config: Any, ids: list[torch.Tensor], positions: list[torch.Tensor], inputs: dict) -> list:
    """InternVL: each image is a run of tiles (the thumbnail last when there are several), each tile a raster of
    (image_size/patch_size * downsample_ratio)^2 tokens. Views: ``"tile{k}"``."""
    rows, cols = _patch_grid(config.vision_config)
    rows, cols = int(rows * config.downsample_ratio), int(cols * config.downsample_ratio)
    per_tile = rows * cols
    out = []
    for b, pos in enumerate(positions):
        grids = []
        for i, (start, length) in enumerate(_runs(pos)):
            if length % per_tile:
                _check_consumed("internvl", b, length - length % per_tile, length)
            tiles = length // per_tile
            for t in range(tiles):  # the last tile shows the whole image (the thumbnail, or the only tile)
                s = start + t * per_tile
                grids.append(ImageGrid(i, f"tile{t}", torch.arange(s, s + per_tile).view(rows, cols),
                                       whole=t == tiles - 1))
        out.append(grids)
    return out


def instructblip_layout(config: Any, ids: list[torch.Tensor], positions: list[torch.Tensor], inputs: dict) -> list:
    """InstructBLIP: the Q-Former's num_query_tokens outputs have no spatial layout: one ``"queries"`` row."""
    n = int(config.num_query_tokens)
    out = []
    for b, tok in enumerate(ids):
        if tok.numel() % n:
            _check_consumed("instructblip", b, tok.numel() - tok.numel() % n, tok.numel())
        count = tok.numel() // n
        out.append([ImageGrid(i, "queries", torch.arange(i * n, (i + 1) * n).view(1, n)) for i in range(count)])
    return out


def _rasters(family: str, ids: list[torch.Tensor], rows: int, cols: int) -> list:
    """Every image is ``rows * cols`` consecutive placeholder tokens in raster order (views ``"image"``)."""
    per_image = rows * cols
    out = []
    for b, tok in enumerate(ids):
        n = tok.numel()
        if n % per_image:
            _check_consumed(family, b, n - n % per_image, n)
        out.append([ImageGrid(i, "image", torch.arange(i * per_image, (i + 1) * per_image).view(rows, cols),
                              whole=True) for i in range(n // per_image)])
    return out


def gemma3_layout(config: Any, ids: list[torch.Tensor], positions: list[torch.Tensor], inputs: dict) -> list:
    """Gemma 3: each image is ``mm_tokens_per_image`` tokens, the pooled square raster of the SigLIP patches (the
    ``<start_of_image>`` / ``<end_of_image>`` markers around it are text tokens)."""
    side = math.isqrt(int(config.mm_tokens_per_image))
    return _rasters("gemma3", ids, side, side)


def gemma4_layout(config: Any, ids: list[torch.Tensor], positions: list[torch.Tensor], inputs: dict) -> list:
    """Gemma 4: each image is its patch raster (``image_position_ids``: (x, y) per patch, (-1, -1) = padding)
    average-pooled ``k x k`` (``vision_config.pooling_kernel_size``), written row by row; images in prompt order
    over the batch, each its own size. The ``<start_of_image>`` / ``<end_of_image>`` markers are text tokens."""
    if inputs.get("image_position_ids") is None:
        raise ValueError("gemma4: the image layout needs the image_position_ids input")
    k = int(config.vision_config.pooling_kernel_size)
    shapes = []
    for pos in torch.as_tensor(inputs["image_position_ids"]).reshape(-1, *inputs["image_position_ids"].shape[-2:]):
        extent = pos[(pos >= 0).all(dim=-1)].amax(dim=0) + 1  # (x, y) patches
        shapes.append((int(extent[1]) // k, int(extent[0]) // k))
    out = []
    for b, tok in enumerate(ids):
        grids, used = [], 0
        while used < tok.numel():
            if not shapes:
                _check_consumed("gemma4", b, used, tok.numel())
            rows, cols = shapes.pop(0)
            index = torch.arange(used, used + rows * cols).view(rows, cols)
            grids.append(ImageGrid(len(grids), "image", index, whole=True))
            used += rows * cols
        _check_consumed("gemma4", b, used, tok.numel())
        out.append(grids)
    return out


def paligemma_layout(config: Any, ids: list[torch.Tensor], positions: list[torch.Tensor], inputs: dict) -> list:
    """PaliGemma: each image is the (image_size/patch_size)^2 SigLIP patch raster."""
    return _rasters("paligemma", ids, *_patch_grid(config.vision_config))


def mistral3_layout(config: Any, ids: list[torch.Tensor], positions: list[torch.Tensor], inputs: dict) -> list:
    """Mistral 3 (Pixtral): each image is an (h / (patch * merge)) x (w / (patch * merge)) raster of ``[IMG]`` tokens,
    written row by row with an ``[IMG_BREAK]`` after each row and ``[IMG_END]`` after the last; the separators are
    text tokens, not grid cells. Sizes from ``image_sizes`` (prompt order over the batch); without it each image is
    the run of equally long rows one separator apart."""
    step = _side(config.vision_config.patch_size)[0] * int(config.spatial_merge_size)
    sizes = _image_sizes(inputs)
    out = []
    for b, pos in enumerate(positions):
        shapes = []
        if sizes is not None:
            used = 0
            while used < pos.numel():
                if not sizes:
                    _check_consumed("mistral3", b, used, pos.numel())
                h, w = sizes.pop(0)
                shapes.append((h // step, w // step))
                used += shapes[-1][0] * shapes[-1][1]
            _check_consumed("mistral3", b, used, pos.numel())
        else:
            for start, length in _runs(pos):  # rows: runs of [IMG]; a new image where the row length or gap changes
                gap = int(pos[start]) - int(pos[start - 1]) if start else 0
                if shapes and shapes[-1][1] == length and gap == 2:
                    shapes[-1] = (shapes[-1][0] + 1, length)
                else:
                    shapes.append((1, length))
        grids, k = [], 0
        for i, (rows, cols) in enumerate(shapes):
            grids.append(ImageGrid(i, "image", torch.arange(k, k + rows * cols).view(rows, cols), whole=True))
            k += rows * cols
        out.append(grids)
    return out


def idefics3_layout(config: Any, ids: list[torch.Tensor], positions: list[torch.Tensor], inputs: dict) -> list:
    """Idefics3 / SmolVLM: each image is its tiles (``<fake><row_i_col_j>`` then a square raster, row by row) and
    then the global image (``<fake><global-img>`` then the raster); an image that is not split is the global image
    alone. The marker tokens are text. Which run is a global image: the one after the token that precedes the
    sample's last run (always a global image). Views ``"tile{k}"`` and ``"global"`` (the whole image)."""
    side = _patch_grid(config.vision_config)[0] // int(config.scale_factor)
    prompt = inputs["prompt_ids"]
    out = []
    for b, pos in enumerate(positions):
        runs = _runs(pos)
        if any(length != side * side for _, length in runs):
            _check_consumed("idefics3", b, sum(side * side for _ in runs), pos.numel())
        marks = [int(prompt[b, int(pos[start]) - 1]) if int(pos[start]) > 0 else -1 for start, _ in runs]
        grids, image, tile = [], 0, 0
        for (start, _), mark in zip(runs, marks, strict=True):
            index = torch.arange(start, start + side * side).view(side, side)
            if mark == marks[-1]:
                grids.append(ImageGrid(image, "global", index, whole=True))
                image, tile = image + 1, 0
            else:
                grids.append(ImageGrid(image, f"tile{tile}", index))
                tile += 1
        out.append(grids)
    return out
