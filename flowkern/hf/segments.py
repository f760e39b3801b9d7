"""Token -> segment labels and image-grid metadata (paper eq. 6: G = S + I + U, plus generated tokens).

Every key token gets one of four labels:

==========  =====  ===========================================================================================
name        id     which tokens
==========  =====  ===========================================================================================
system      0      prompt tokens before the first image placeholder token (chat template, system prompt, ...)
image       1      image and video placeholder tokens (every image of a multi-image prompt, LLaVA-NeXT's
                   newline tokens included: they stand in the image token run)
user        2      every other prompt token: text between and after images, the question, the answer cue
generated   3      tokens produced by ``generate`` (fed back during decoding)
==========  =====  ===========================================================================================

Padding tokens (``attention_mask == 0``) are labelled :data:`PADDING` (-1) and hidden from attention. A prompt
without any image token has no "before the first image": all its tokens are *user*.
Which token ids are placeholders is model-specific and lives in :mod:`flowkern.hf.models`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "SEGMENT_NAMES",
    "NUM_SEGMENTS",
    "SYSTEM",
    "IMAGE",
    "USER",
    "GENERATED",
    "PADDING",
    "ImageGrid",
    "label_prompt",
    "image_token_index",
]

SEGMENT_NAMES: tuple[str, ...] = ("system", "image", "user", "generated")
NUM_SEGMENTS = len(SEGMENT_NAMES)
SYSTEM, IMAGE, USER, GENERATED = range(NUM_SEGMENTS)
PADDING = -1


@dataclass(frozen=True)
class ImageGrid:
    """One 2D view of an image's tokens, to lay per-token values out as a heatmap.

    Attributes:
        image: index of the image (or video) within its sample, in prompt order.
        name: which view: ``"image"``, ``"base"`` / ``"crops"`` (LLaVA-NeXT anyres), ``"frame{t}"`` (video),
            ``"tile{i}"`` (InternVL), ``"queries"`` (InstructBLIP: no spatial layout).
        index: long ``[rows, cols]``: for each grid cell, the ordinal of its token among the sample's image
            tokens (in sequence order, i.e. the columns of :func:`image_token_index`), -1 where no token.
        whole: this view shows the whole image (``"image"``, ``"base"``, InternVL's thumbnail tile): the one to
            draw when a single view is wanted (set by the family's layout in :mod:`flowkern.hf.models`).
    """

    image: int
    name: str
    index: torch.Tensor
    whole: bool = False

    @property
    def shape(self) -> tuple[int, int]:
        """``(rows, cols)`` of the grid."""
        return int(self.index.shape[0]), int(self.index.shape[1])

    def to_dict(self) -> dict:
        """JSON-able description (without the index tensor)."""
        return {"image": self.image, "name": self.name, "shape": list(self.shape)}


def label_prompt(
    input_ids: torch.Tensor, image_token_ids: Sequence[int], attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Segment label of every prompt token.

    Args:
        input_ids: long ``[B, S]`` prompt token ids (left or right padded).
        image_token_ids: the model's image/video placeholder token ids.
        attention_mask: optional ``[B, S]`` (1/True = real token); None = all real.

    Returns:
        long ``[B, S]``: :data:`SYSTEM`, :data:`IMAGE` or :data:`USER` per token, :data:`PADDING` for padding.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, S], got shape {tuple(input_ids.shape)}")
    real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.to(torch.bool)
    if real.shape != input_ids.shape:
        raise ValueError(f"attention_mask must match input_ids {tuple(input_ids.shape)}, got {tuple(real.shape)}")
    ids = torch.tensor(list(image_token_ids), dtype=input_ids.dtype, device=input_ids.device)
    is_image = torch.isin(input_ids, ids) & real
    # tokens before the first image token: cumulative count of image tokens is still 0, and a row has an image
    seen_image = is_image.long().cumsum(dim=1) > 0
    has_image = is_image.any(dim=1, keepdim=True)
    labels = torch.full_like(input_ids, USER, dtype=torch.long)
    labels = torch.where(has_image & ~seen_image, torch.full_like(labels, SYSTEM), labels)
    labels = torch.where(is_image, torch.full_like(labels, IMAGE), labels)
    return torch.where(real, labels, torch.full_like(labels, PADDING))


def image_token_index(segment_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of each sample's image tokens, padded to the longest sample.

    Args:
        segment_ids: long ``[B, S]`` labels from :func:`label_prompt`.

    Returns:
        ``(index, valid)``: long ``[B, K]`` sequence positions of the image tokens in order (0 where invalid) and
        bool ``[B, K]``; ``K`` is the largest image-token count of a sample (0 without images).
    """
    is_image = segment_ids == IMAGE
    counts = is_image.sum(dim=1)
    k = int(counts.max()) if counts.numel() else 0
    B, S = segment_ids.shape
    pos = torch.arange(S, device=segment_ids.device).expand(B, S)
    # stable sort puts image positions first, in order
    order = torch.sort((~is_image).to(torch.int8), dim=1, stable=True).indices
    index = torch.gather(pos, 1, order)[:, :k]
    valid = torch.arange(k, device=segment_ids.device)[None, :] < counts[:, None]
    return torch.where(valid, index, torch.zeros_like(index)), valid
