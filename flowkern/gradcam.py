"""The pieces of :func:`flowkern.cam` that need no session: which image tokens and views a prompt has, the
SmoothGrad pixel noise, the reduction of gradients to Grad-CAM heat, and the teacher-forced copies of the
prompt. The method itself is described in :mod:`flowkern.cam`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["ImagePlan", "plan_images", "norm_stats", "PixelNoise", "GradCamRecorder", "expand_copies"]


# ----------------------------------------------------------------------------------------------------------
# the prompt's image tokens and their views


@dataclass
class ImagePlan:
    """What one LLaVA-CAM computes, from the prompt alone: the image tokens, their views and the alpha weights.

    Attributes:
        positions: long ``[K]`` sequence positions of the prompt's image tokens.
        grids: the views of every image (:class:`flowkern.hf.segments.ImageGrid`, ordinals into ``positions``).
        owner: long ``[K]`` image of each token (0 where in no view).
        weights: float32 ``[I, K]``: ``1 / count`` on the tokens of image i's views (alpha is their mean), else 0.
    """

    positions: torch.Tensor
    grids: list
    owner: torch.Tensor
    weights: torch.Tensor


def plan_images(adapter: Any, config: Any, ids: torch.Tensor, inputs: Mapping[str, Any]) -> ImagePlan:
    """The :class:`ImagePlan` of one prompt ``ids`` ``[1, S]`` (``inputs``: the processor outputs the model's
    image layout reads, e.g. ``image_sizes`` / ``image_grid_thw``), through the family ``adapter``.

    Raises:
        ValueError: the prompt has no image placeholder tokens.
    """
    from flowkern.hf.segments import IMAGE, label_prompt

    segments = label_prompt(ids.cpu(), adapter.placeholder_token_ids(config))
    positions = torch.nonzero(segments[0] == IMAGE).flatten()
    if positions.numel() == 0:
        raise ValueError(
            f"the prompt has no image placeholder tokens (ids {adapter.placeholder_token_ids(config)}); "
            "build inputs with the processor from an image and a prompt"
        )
    layout_inputs = {k: v.cpu() if isinstance(v, torch.Tensor) else v
                     for k in adapter.layout_inputs if (v := inputs.get(k)) is not None}
    grids = adapter.image_grids(config, ids.cpu(), segments, layout_inputs)[0]
    K = positions.numel()
    num_images = 1 + max(g.image for g in grids)
    weights = torch.zeros(num_images, K)
    for g in grids:
        cells = g.index.flatten()
        weights[g.image, cells[cells >= 0]] = 1.0
    owner = weights.argmax(dim=0)
    weights = weights / weights.sum(dim=1, keepdim=True).clamp(min=1)
    return ImagePlan(positions, grids, owner, weights)


# ----------------------------------------------------------------------------------------------------------
# SmoothGrad pixel noise


def norm_stats(
    processor: Any, pixel_mean: Sequence[float] | None, pixel_std: Sequence[float] | None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per-channel mean / std of the processor's normalisation, or None when unknown."""
    if pixel_mean is not None or pixel_std is not None:
        if pixel_mean is None or pixel_std is None:
            raise ValueError("pass both pixel_mean and pixel_std (or processor=)")
        mean, std = torch.as_tensor(pixel_mean, dtype=torch.float32), torch.as_tensor(pixel_std, dtype=torch.float32)
    elif processor is not None:
        ip = getattr(processor, "image_processor", processor)
        mean, std = getattr(ip, "image_mean", None), getattr(ip, "image_std", None)
        if mean is None or std is None:
            raise ValueError(f"{type(ip).__name__} has no image_mean / image_std; pass pixel_mean= and pixel_std=")
        mean, std = torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32)
        if getattr(ip, "do_normalize", True) is False:
            mean, std = torch.zeros_like(mean), torch.ones_like(std)
    else:
        return None
    if mean.dim() != 1 or mean.shape != std.shape or bool((std <= 0).any()):
        raise ValueError(f"pixel_mean / pixel_std must be per-channel 1D of equal length, std > 0; got {mean}, {std}")
    return mean, std


class PixelNoise:
    """Draws and applies the SmoothGrad noise for one ``pixel_values`` tensor (the "Pixel noise" section of
    :mod:`flowkern.cam`): un-normalise with ``stats`` (per-channel mean, std), add ``std`` x N(0, 1) from
    ``torch.Generator().manual_seed(seed)``, optionally clamp to [0, 1], normalise again.

    ``layout`` is the adapter's ``pixel_layout``: ``"patches"`` (Qwen-VL ``[N, C * temporal * P * P]``, one draw
    per ``(patch, channel)`` shared by the ``temporal`` copies), ``"patches_last"`` (Gemma 4 ``[..., P * P * C]``,
    channel last; padding patches get noise too, which the model masks) or ``"channels"`` (channel at dim -3).
    """

    def __init__(self, pixel_values: torch.Tensor, stats: tuple[torch.Tensor, torch.Tensor], layout: str,
                 temporal: int, std: float, clamp: bool, seed: int) -> None:
        self.pv = pixel_values
        mean, pstd = stats
        c = mean.numel()
        if layout == "patches":
            if pixel_values.dim() != 2:
                raise ValueError(f"pixel_values {tuple(pixel_values.shape)}: expected flattened patches [N, C*T*P*P]")
            n, feat = pixel_values.shape
            t = max(1, int(temporal))
            if feat % (c * t):
                raise ValueError(f"pixel_values rows of {feat} values do not split into {c} channels x {t} frames")
            self.view = (n, c, t, feat // (c * t))
            self.noise_shape = (n, c, 1, feat // (c * t))
            self.mean, self.pstd = mean.view(1, c, 1, 1), pstd.view(1, c, 1, 1)
        elif layout == "patches_last":
            if pixel_values.shape[-1] % c:
                raise ValueError(f"pixel_values rows of {pixel_values.shape[-1]} values do not split into {c} channels")
            self.view = (*pixel_values.shape[:-1], pixel_values.shape[-1] // c, c)
            self.noise_shape = self.view
            self.mean, self.pstd = mean.view(c), pstd.view(c)
        else:
            if pixel_values.dim() < 3 or pixel_values.shape[-3] != c:
                raise ValueError(
                    f"pixel_values {tuple(pixel_values.shape)}: expected the channel dim -3 to have {c} channels "
                    "(the length of pixel_mean / pixel_std)"
                )
            self.view = tuple(pixel_values.shape)
            self.noise_shape = self.view
            self.mean, self.pstd = mean.view(c, 1, 1), pstd.view(c, 1, 1)
        self.std, self.clamp = float(std), clamp
        self.gen = torch.Generator().manual_seed(int(seed))
        self.x01 = pixel_values.detach().float().cpu().reshape(self.view) * self.pstd + self.mean

    def next(self) -> torch.Tensor:
        """The next noisy copy, normalised, in the dtype / device / shape of ``pixel_values``."""
        noise = torch.randn(self.noise_shape, generator=self.gen)
        x = self.x01 + self.std * noise
        if self.clamp:
            x = x.clamp(0.0, 1.0)
        x = (x - self.mean) / self.pstd
        return x.reshape(self.pv.shape).to(device=self.pv.device, dtype=self.pv.dtype)


# ----------------------------------------------------------------------------------------------------------
# Grad-CAM heat and the teacher-forced copies


class GradCamRecorder:
    """Keeps the image-token rows of ``A`` and reduces the gradient to the heat as it arrives (its :meth:`start`
    and :meth:`site` are put on the model by :func:`flowkern.hf.sites.hook_layer_sites`).

    Args:
        layers: the chosen decoder layers (row ``i`` of :attr:`total` is ``layers[i]``).
        positions: long ``[K]`` sequence positions of the image tokens; owner: long ``[K]`` image of each token;
        weights: float32 ``[I, K]`` (:class:`ImagePlan`), all on the model's device.

    Attributes:
        total: float32 ``[len(layers), K]``: heat summed over the copies run so far.
    """

    def __init__(self, layers: list[int], positions: torch.Tensor, owner: torch.Tensor, weights: torch.Tensor) -> None:
        self.row = {layer: i for i, layer in enumerate(layers)}
        self.positions = positions  # long [K] on the model device
        self.owner = owner  # long [K]: image of each token (0 where none)
        self.weights = weights  # float32 [I, K]: 1/count of the image's view tokens, 0 elsewhere
        self.in_view = weights.sum(dim=0) > 0  # bool [K]
        self.feats: dict[int, tuple[torch.Tensor, int]] = {}
        self.total = torch.zeros(len(layers), positions.numel(), dtype=torch.float32, device=positions.device)
        self.seen: set[int] = set()
        self.leaf: torch.Tensor | None = None

    def start(self, hidden: torch.Tensor) -> torch.Tensor:
        """The hidden states ``[n, S, D]`` entering the first chosen layer, as a leaf that requires grad: the
        graph starts there (parameters do not require grad, so nothing before it is recorded)."""
        self.leaf = hidden.detach().requires_grad_(True)
        return self.leaf

    def site(self, layer: int, a: torch.Tensor) -> None:
        """The output ``a`` ``[n, S, D]`` of ``layer``'s site: keep it and hook its gradient (reduced to heat by
        :meth:`_reduce` the moment autograd computes it)."""
        if not a.requires_grad:
            raise RuntimeError(f"flowkern.cam: the features of layer {layer} are not part of the autograd graph")
        # a reference, not a copy: autograd keeps this tensor for the next op's backward anyway (the MLP for the
        # post-attention norm, the next layer's norm for a layer output), and the hook below fires right then
        self.feats[layer] = (a.detach(), a._version)
        a.register_hook(lambda grad: self._reduce(layer, grad))

    def _reduce(self, layer: int, grad: torch.Tensor) -> None:
        a, version = self.feats.pop(layer)
        if a._version != version:
            raise RuntimeError(f"flowkern.cam: the model modified the site output of layer {layer} in place; "
                               "choose another site")
        feats = a[:, self.positions].float()  # [n, K, D]
        g = grad[:, self.positions].float()
        alpha = torch.einsum("ik,nkd->nid", self.weights, g)  # per image: mean gradient over its tokens
        heat = torch.relu((feats * alpha[:, self.owner]).sum(dim=-1)) * self.in_view  # [n, K]
        self.total[self.row[layer]] += heat.sum(dim=0)
        self.seen.add(layer)


def expand_copies(inputs: Mapping[str, Any], n: int, answer: torch.Tensor, pixel_values: torch.Tensor | None) -> dict:
    """n copies of the prompt + answer: per-token tensors get the answer appended, every tensor is repeated n times
    along dim 0 (for one prompt, per-image tensors like ``pixel_values`` / ``image_grid_thw`` are concatenations of
    the copies' images, in order)."""
    ids = inputs["input_ids"]
    S, T = ids.shape[1], answer.numel()
    out = {}
    for key, value in inputs.items():
        if key == "pixel_values" and pixel_values is not None:
            out[key] = pixel_values
            continue
        if not isinstance(value, torch.Tensor) or value.dim() == 0:
            out[key] = value
            continue
        if value.dim() == 2 and value.shape == ids.shape:  # per-token
            fill = answer.to(ids.device, ids.dtype)[None] if key == "input_ids" else torch.full(
                (1, T), 1 if key == "attention_mask" else 0, dtype=value.dtype, device=value.device)
            value = torch.cat([value, fill], dim=1)
        out[key] = value.repeat(n, *([1] * (value.dim() - 1)))
    assert out["input_ids"].shape == (n, S + T)
    return out
