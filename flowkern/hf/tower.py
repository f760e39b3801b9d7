"""The vision tower's [CLS] -> patch attention, captured during the model's own forward (the ``cls`` scorer).

FasterVLM (Zhang et al. 2024) and VisionZip's dominant tokens (Yang et al. CVPR 2025) rank image tokens by the
attention the vision encoder's [CLS] token pays to each patch in the layer whose output feeds the projector (LLaVA-1.5:
the penultimate layer). :class:`TowerCLS` computes, for each image the tower encodes,

    a[j] = mean_h softmax_j(scale * <q_h[CLS], k_h[j]>)        over the tower tokens j ([CLS] and the patches)

with ``q``, ``k`` from :func:`flowkern.hf.compat.project_qk` applied to that layer's attention input (captured by a
forward pre-hook while the tower runs; the tower keeps its own attention implementation), the [CLS] row's
log-sum-exp from :func:`flowkern.segment_attention` and the mass from :func:`flowkern.key_attention_mass` (both
non-causal, on the same ``q`` / ``k``): no attention matrix, no eager attention, no ``output_attentions``. The
scores are then laid on the prompt's image tokens (:meth:`TowerCLS.scores_for`): the family's adapter
(:meth:`flowkern.hf.models.ModelAdapter.tower_cls`) says which layer, whether the [CLS] token is itself an image
token, and refuses families whose tower has no [CLS] token or whose image tokens are not the tower's tokens.
"""

from __future__ import annotations

from typing import Any

import torch

from flowkern.hf.compat import project_qk
from flowkern.hf.models import get_adapter

__all__ = ["TowerCLS", "cls_attention"]


def cls_attention(attention: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Head-mean softmax attention of token 0 ([CLS]) to every token, for one vision-tower attention module.

    Args:
        attention: the tower layer's attention module (``q_proj`` / ``k_proj``, see
            :func:`flowkern.hf.compat.project_qk`).
        hidden: ``[N, T, D]`` its input (after the layer's input norm), N images of T tokens, token 0 the [CLS].

    Returns:
        float32 ``[N, T]``: rows sum to 1.
    """
    from flowkern.ops import key_attention_mass, segment_attention

    with torch.no_grad():
        q, k, scale = project_qk(attention, hidden.detach())
        if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            q, k = q.float(), k.float()
        q0 = q[:, :, :1]
        segments = torch.zeros(k.shape[0], k.shape[2], dtype=torch.long, device=k.device)
        _, lse, _ = segment_attention(q0, k, k, segments, 1, causal=False, scale=scale, validate=False)
        return key_attention_mass(q0, k, lse, causal=False, scale=scale, validate=False)


class TowerCLS:
    """Captures the vision tower's [CLS] -> token attention while the model runs; a context manager.

    .. code-block:: python

        with TowerCLS(model) as tower:
            model(**inputs)
        scores = tower.scores_for(inputs["input_ids"] == model.config.image_token_id)   # float32 [B, S]

    The capture of a forward replaces the previous forward's, so a prefill's scores stay readable during the decode
    steps after it (which do not run the tower).

    Args:
        model: a VLM of a family whose adapter allows it (:meth:`flowkern.hf.models.ModelAdapter.tower_cls`).

    Raises:
        ValueError: the family's tower has no [CLS] token, or its image tokens are not the tower's tokens (the
            message names the family and why), or no tower is found.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        adapter = get_adapter(model)
        self.layer, self.first = adapter.tower_cls(model.config)
        tower = adapter.vision_tower(model)
        layers = None if tower is None else next(
            (m.layers for m in tower.modules() if isinstance(getattr(m, "layers", None), torch.nn.ModuleList)), None)
        attention = None if layers is None or self.layer >= len(layers) else getattr(layers[self.layer], "self_attn",
                                                                                      None)
        if not isinstance(attention, torch.nn.Module):
            raise ValueError(f"rank='cls': found no attention module of vision-tower layer {self.layer} in "
                             f"{adapter.family}")
        self.model, self.attention = model, attention
        self._captured: list[torch.Tensor] = []
        self._fresh = True
        self._handles: list[Any] = []

    def install(self) -> TowerCLS:
        """Register the hooks (idempotent); returns self."""
        if not self._handles:
            self._handles = [
                self.model.register_forward_pre_hook(self._on_model),
                self.attention.register_forward_pre_hook(self._on_attention, with_kwargs=True),
            ]
        return self

    def remove(self) -> None:
        """Remove the hooks (the last capture stays readable)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> TowerCLS:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def _on_model(self, module: torch.nn.Module, args: tuple) -> None:
        self._fresh = True

    def _on_attention(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.get("hidden_states")
        if self._fresh:  # the first tower call of this forward: a new capture
            self._captured, self._fresh = [], False
        self._captured.append(cls_attention(module, hidden))

    @property
    def attention_rows(self) -> torch.Tensor | None:
        """float32 ``[N, T]``: the last capture, one row per image the tower encoded (token 0 = [CLS]), or None."""
        return torch.cat(self._captured) if self._captured else None

    def scores_for(self, image_mask: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """The captured [CLS] attention at the prompt's image tokens.

        Args:
            image_mask: bool ``[B, S]``: every image placeholder token of the prompt (as the model's forward
                filled them with image features: sample after sample, image after image).
            positions: optional long ``[B, R]``: the original prompt position of each row of a later stage
                (:attr:`flowkern.scorers.ScoreInputs.positions`); the scores are then given for those rows
                (a negative position, a filler, gets 0).

        Returns:
            float32 ``[B, S]`` (``[B, R]`` with ``positions``): at each image token the [CLS] attention to the tower
            token it came from, 0 elsewhere.

        Raises:
            ValueError: nothing captured yet, or the image tokens do not match the captured images' tokens, or
                ``positions`` of another batch size.
        """
        rows = self.attention_rows
        if rows is None:
            raise ValueError("rank='cls': no vision-tower forward was captured (run the model with images inside "
                             "the TowerCLS context)")
        if not isinstance(image_mask, torch.Tensor) or image_mask.dtype != torch.bool or image_mask.dim() != 2:
            raise ValueError(f"image_mask must be a bool tensor [B, S], got {image_mask!r:.80}")
        values = rows[:, self.first:].reshape(-1)
        count = int(image_mask.sum())
        if count != values.numel():
            raise ValueError(f"image_mask marks {count} image tokens, but the vision tower encoded "
                             f"{rows.shape[0]} image(s) of {rows.shape[1] - self.first} tokens ({values.numel()})")
        out = torch.zeros(image_mask.shape, dtype=torch.float32, device=image_mask.device)
        out[image_mask] = values.to(out.device)
        if positions is None:
            return out
        if not isinstance(positions, torch.Tensor) or positions.dim() != 2 or positions.shape[0] != out.shape[0]:
            raise ValueError(f"positions must be a long tensor [B={out.shape[0]}, R], got {positions!r:.80}")
        pos = positions.to(out.device).long()
        picked = torch.gather(out, 1, pos.clamp(0, out.shape[1] - 1))
        return picked.masked_fill(pos < 0, 0.0)
