"""Vision-tower scorers: image tokens ranked by what the vision encoder itself says about its patches.

- ``cls`` (:class:`CLS`): the [CLS] -> patch attention of the tower's feature layer (FasterVLM; VisionZip's
  dominant tokens), captured by :class:`flowkern.hf.tower.TowerCLS`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flowkern.scorers.base import ScoreInputs, Scorer, register

__all__ = ["CLS"]


@register
@dataclass(frozen=True)
class CLS(Scorer):
    """FasterVLM (Zhang et al. 2024, "[CLS] Attention is All You Need for Training-Free Visual Token Pruning") and
    VisionZip's dominant tokens (Yang et al., CVPR 2025): keep the image tokens whose patch receives the most
    attention from the vision encoder's [CLS] token.

    Definition: in the tower layer whose output feeds the projector (LLaVA-1.5: the penultimate layer, as both
    papers use), the softmax attention of the [CLS] query to each patch key, averaged over heads (the whole softmax
    over [CLS] and every patch); ties go to the earlier token. It depends on the image only, so it ranks the same
    way at every stage (``before_decoder``: it can prune before the decoder). Only for towers with a [CLS] token
    whose patches are the image tokens one to one (:meth:`flowkern.hf.models.ModelAdapter.tower_cls`).
    """

    name = "cls"
    needs = frozenset({"cls_attention"})

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        """float32 ``[B, S]``: ``inputs.cls_attention``.

        Raises:
            ValueError: ``cls_attention`` is not a ``[B, S]`` tensor.
        """
        scores = inputs.cls_attention
        if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != tuple(inputs.image.shape):
            got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
            raise ValueError(f"inputs.cls_attention must be a float tensor {tuple(inputs.image.shape)}, got {got}")
        return scores.float()
