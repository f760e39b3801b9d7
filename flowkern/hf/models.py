"""Model-family adapters: every model-specific constant of flowkern lives here (docs/architecture.md, docs/models.md).

One :class:`ModelAdapter` per family says

- which ``config.model_type`` values it covers and which sub-config is the language model's (only that one
  switches to the ``"flowkern"`` attention; vision towers and Q-Formers keep theirs);
- which config attributes hold the image/video *placeholder* token ids (read from the config, never hard-coded);
- how a sample's image tokens are laid out on a 2D grid for heatmaps (paper Figure 2B), from the vision config
  and the processor outputs captured at prefill (``image_sizes``, ``image_grid_thw``, ``video_grid_thw``), and
  which view shows the whole image (InternVL: the thumbnail tile, last) or shows no picture at all (InstructBLIP's
  Q-Former queries);
- where the language model, its decoder layers, their attention / post-attention norm and the vision tower sit in
  the module tree (:meth:`ModelAdapter.language_model`, :meth:`ModelAdapter.decoder_layers`, ...), so that
  :mod:`flowkern.hf.session` finds them one way for every family;
- what else pruning, LLaVA-CAM and prompting must know: Qwen3-VL's DeepStack layers, the pixel layout SmoothGrad
  adds noise to (Qwen-VL's flattened patches), the plain prompt format of processors without a chat template.

A new family is one more entry in :data:`ADAPTERS` (plus a layout function in :mod:`flowkern.hf.layouts` when its
image tokens form a new pattern); nothing else needs to change.

Supported families: LLaVA-1.5 (``llava``), LLaVA-NeXT (``llava_next``), LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL,
Qwen3-VL, InternVL, InstructBLIP, Gemma 3, PaliGemma, Mistral 3, LLaVA-OneVision-1.5, Idefics3 / SmolVLM and
Qwen3.5 (decoder-only language models; Qwen3.5's linear-attention layers are not measured).
:func:`get_adapter` raises ``ValueError`` for anything else.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from flowkern.hf.layouts import (
    gemma3_layout,
    gemma4_layout,
    idefics3_layout,
    instructblip_layout,
    internvl_layout,
    llava_layout,
    llava_next_layout,
    llava_onevision_layout,
    mistral3_layout,
    paligemma_layout,
    qwen_vl_layout,
)
from flowkern.hf.segments import ImageGrid

__all__ = ["ModelAdapter", "ADAPTERS", "SITES", "get_adapter", "supported_model_types"]

# a layout function: (config, placeholder ids per sample, their sequence positions per sample, captured inputs plus
# "prompt_ids", the whole prompt [B, S])
# -> per sample, the grids of its images (ImageGrid.index = ordinals into that sample's placeholder tokens)
LayoutFn = Callable[[Any, list[torch.Tensor], list[torch.Tensor], dict[str, Any]], list[list[ImageGrid]]]

SITES: dict[str, str] = {"post_attention_layernorm": "post_attention_layernorm", "attention": "self_attn", "layer": ""}
"""Where LLaVA-CAM reads a decoder layer's features: site name -> attribute of the decoder layer ("" = the layer's own
output). Every supported family's decoder layer is Llama-shaped (``self_attn``, ``post_attention_layernorm``)."""


@dataclass(frozen=True)
class ModelAdapter:
    """How flowkern reads one model family.

    Attributes:
        family: short name (``"llava"``, ``"qwen2_vl"``, ...).
        model_types: the ``config.model_type`` values this adapter covers.
        placeholder_attrs: top-level config attributes holding image/video placeholder token ids.
        layout: builds the image grids (see ``LayoutFn`` above).
        layout_inputs: forward kwargs the layout needs, captured at prefill.
        tower_grid_kwarg: argument of the vision tower's forward to capture for the layout (``"grid_thw"``).
        text_config_key: the sub-config of the language model.
        prompt_format: the prompt for a processor without a chat template: ``{images}`` is one placeholder per image
            (the processor's ``image_token``), ``{prompt}`` the user's text.
        pixel_layout: ``"channels"`` (``pixel_values [..., C, H, W]``), ``"patches"`` (Qwen-VL's flattened
            patches ``[N, C * T * P * P]``, ``T = vision_config.temporal_patch_size``) or ``"patches_last"`` (Gemma
            4's ``[N, patches, P * P * C]``): where SmoothGrad adds noise.
        spatial_grids: False when the image tokens have no spatial layout (InstructBLIP's Q-Former queries): their
            "grid" is one row, not a picture to draw on.
        deepstack: the vision tower adds features to the image tokens after the first decoder layers
            (Qwen3-VL's ``vision_config.deepstack_visual_indexes``); pruning must start after them.
        sites: decoder-layer attribute of each LLaVA-CAM site (:data:`SITES`).
        nested_images: the processor takes a batch's images as one list per prompt (Gemma 3 / 4, SmolVLM), not one
            flat list.
        tower_patches: the image tokens are the vision tower's output tokens one to one, image after image
            (LLaVA-1.5: the ``vision_feature_layer`` tokens, [CLS] dropped or kept by
            ``vision_feature_select_strategy``): what :meth:`tower_cls` maps the tower's [CLS] attention through.
    """

    family: str
    model_types: tuple[str, ...]
    placeholder_attrs: tuple[str, ...]
    layout: LayoutFn
    layout_inputs: tuple[str, ...] = ()
    tower_grid_kwarg: str | None = None
    text_config_key: str = "text_config"
    prompt_format: str = "{images}\n{prompt}"
    pixel_layout: str = "channels"
    spatial_grids: bool = True
    deepstack: bool = False
    sites: Mapping[str, str] = field(default_factory=lambda: dict(SITES))
    nested_images: bool = False
    tower_patches: bool = False

    def text_config(self, config: Any) -> Any:
        """The language model's config object (``config.<text_config_key>``)."""
        sub = getattr(config, self.text_config_key, None)
        if sub is None:
            raise ValueError(f"{self.family}: config has no `{self.text_config_key}`")
        return sub

    def placeholder_token_ids(self, config: Any) -> tuple[int, ...]:
        """Image/video placeholder token ids, read from the config."""
        ids = []
        for attr in self.placeholder_attrs:
            value = getattr(config, attr, None)
            if value is not None:
                ids.append(int(value))
        if not ids:
            raise ValueError(f"{self.family}: config sets none of {self.placeholder_attrs}")
        return tuple(ids)

    def image_grids(
        self, config: Any, input_ids: torch.Tensor, segment_ids: torch.Tensor, inputs: dict[str, Any]
    ) -> list[list[ImageGrid]]:
        """Image grids of every sample.

        Args:
            config: the model's top-level config.
            input_ids: long ``[B, S]`` prompt ids.
            segment_ids: long ``[B, S]`` labels (``flowkern.hf.segments.IMAGE`` marks placeholder tokens).
            inputs: the captured ``layout_inputs`` (CPU tensors or None).

        Returns:
            per sample, a list of :class:`ImageGrid` (several per image for multi-view layouts; the one that shows
            the whole image has ``whole=True``).

        Raises:
            ValueError: when the placeholder tokens do not match the layout the config and inputs describe.
        """
        from flowkern.hf.segments import IMAGE

        ids, positions = [], []
        for b in range(input_ids.shape[0]):
            is_image = segment_ids[b] == IMAGE
            ids.append(input_ids[b][is_image].cpu())
            positions.append(torch.nonzero(is_image).flatten().cpu())
        return self.layout(config, ids, positions, {**inputs, "prompt_ids": input_ids.cpu()})

    # ------------------------------------------------------------------------------------------------------
    # where things sit in the module tree

    def language_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """The language model's decoder stack: the first module owning the text config that holds the decoder
        layers (``.layers``), e.g. ``LlamaModel``.

        Raises:
            ValueError: none found.
        """
        text_config = self.text_config(model.config)
        for m in model.modules():
            layers = getattr(m, "layers", None)
            if getattr(m, "config", None) is text_config and isinstance(layers, torch.nn.ModuleList):
                return m
        raise ValueError(f"{self.family}: found no language model with a `layers` list in {type(model).__name__}")

    def language_model_entry(self, model: torch.nn.Module) -> torch.nn.Module | None:
        """The outermost module owning the text config with input embeddings: what a VLM's forward (or an
        InstructBLIP ``generate``, which calls its causal LM directly) enters the language model through."""
        text_config = self.text_config(model.config)
        return next((m for m in model.modules()
                     if getattr(m, "config", None) is text_config and hasattr(m, "get_input_embeddings")), None)

    def decoder_layers(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        """The decoder layers of the language model, in order (index = ``layer_idx``)."""
        return list(self.language_model(model).layers)

    def output_head(self, model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
        """``(final norm, LM head)``: what turns the last decoder layer's output into logits (the logit lens applies
        them to every layer's output). The norm is the language model's ``norm`` (``final_layer_norm`` in OPT-style
        decoders), the head ``model.get_output_embeddings()``.

        Raises:
            ValueError: either is missing.
        """
        lm = self.language_model(model)
        norm = next((m for name in ("norm", "final_layer_norm") if isinstance(m := getattr(lm, name, None),
                                                                              torch.nn.Module)), None)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if norm is None or not isinstance(head, torch.nn.Module):
            raise ValueError(f"{self.family}: found no final norm or LM head in {type(model).__name__}")
        return norm, head

    def vision_tower(self, model: torch.nn.Module) -> torch.nn.Module | None:
        """The module owning the vision config (the vision tower), or None."""
        vision_config = getattr(model.config, "vision_config", None)
        if vision_config is None:
            return None
        return next((m for m in model.modules() if getattr(m, "config", None) is vision_config), None)

    def site_module(self, layer: torch.nn.Module, site: str) -> torch.nn.Module:
        """The module of one decoder layer whose output LLaVA-CAM reads at ``site`` (a key of :attr:`sites`).

        Raises:
            ValueError: an unknown site, or a layer without that submodule.
        """
        if site not in self.sites:
            raise ValueError(f"site must be one of {tuple(self.sites)}, got {site!r}")
        name = self.sites[site]
        if not name:
            return layer
        module = getattr(layer, name, None)
        if not isinstance(module, torch.nn.Module):
            raise ValueError(f"decoder layer {type(layer).__name__} has no `{name}` for site={site!r}")
        return module

    # ------------------------------------------------------------------------------------------------------
    # what pruning and LLaVA-CAM must know

    def deepstack_layers(self, config: Any) -> int:
        """Decoder layers ``0 .. n-1`` after which the vision tower adds features to the image tokens (Qwen3-VL's
        DeepStack), 0 for other families."""
        if not self.deepstack:
            return 0
        return len(getattr(getattr(config, "vision_config", None), "deepstack_visual_indexes", None) or [])

    def linear_layers(self, config: Any) -> frozenset[int]:
        """Decoder layers with linear attention (a recurrent state, no softmax: Qwen3.5's Gated DeltaNet), from
        the text config's ``layer_types``; empty for other families."""
        from flowkern.hf.compat import LAYER_TYPES

        types = getattr(self.text_config(config), "layer_types", None) or ()
        return frozenset(i for i, t in enumerate(types) if t == LAYER_TYPES["linear"])

    def tower_cls(self, config: Any) -> tuple[int, int]:
        """``(layer, first)`` for the ``cls`` scorer: the vision tower's encoder layer (0-based) whose output feeds
        the projector (``config.vision_feature_layer``: LLaVA-1.5's -2 is the penultimate layer), whose [CLS] row
        attention ranks the patches, and the first tower token that is an image token (1: the [CLS] token is dropped,
        ``vision_feature_select_strategy="default"``; 0: it is an image token too, ``"full"``).

        Raises:
            ValueError: the family's tower has no [CLS] token (SigLIP, Qwen-VL's ViT, Pixtral, ...), or its image
                tokens are not the tower's tokens one to one (anyres tiles, pixel shuffle, Q-Former queries), or the
                features come from several layers or from the embeddings.
        """
        vision = getattr(config, "vision_config", None)
        tower = getattr(vision, "model_type", None)
        if tower not in _CLS_TOWERS:
            raise ValueError(f"rank='cls': {self.family}'s vision tower ({tower}) has no [CLS] token, so there is no "
                             "[CLS] -> patch attention to rank image tokens by (FasterVLM / VisionZip need one)")
        if not self.tower_patches:
            raise ValueError(f"rank='cls': {self.family}'s image tokens are not its vision tower's patch tokens one to "
                             "one (tiles, newline tokens, merged or resampled patches), so the tower's [CLS] "
                             "attention cannot be mapped to them")
        feature = getattr(config, "vision_feature_layer", -1)
        n = int(vision.num_hidden_layers)
        if isinstance(feature, bool) or not isinstance(feature, int) or not -n <= feature <= n or feature == 0:
            raise ValueError(f"rank='cls': {self.family}'s vision_feature_layer={feature!r} is not one encoder layer "
                             f"of the vision tower's {n}")
        layer = n + feature if feature < 0 else feature - 1  # hidden_states[f] is the output of layer f - 1
        return layer, int(getattr(config, "vision_feature_select_strategy", "default") == "default")

    def temporal_patch_size(self, config: Any) -> int:
        """Frames per flattened patch row for ``pixel_layout="patches"`` (1 otherwise)."""
        if self.pixel_layout != "patches":
            return 1
        return int(getattr(getattr(config, "vision_config", None), "temporal_patch_size", 1) or 1)


_CLS_TOWERS = ("clip_vision_model", "internvl_vision", "instructblip_vision_model")
"""Vision towers (``vision_config.model_type``) whose sequence starts with a [CLS] token
(:meth:`ModelAdapter.tower_cls`)."""

_QWEN_PLACEHOLDERS = ("image_token_id", "video_token_id")
_QWEN_INPUTS = ("image_grid_thw", "video_grid_thw")

ADAPTERS: dict[str, ModelAdapter] = {
    a.family: a
    for a in (
        # LLaVA-1.5 (vicuna v1 format) for exports without a chat template
        ModelAdapter("llava", ("llava",), ("image_token_id",), llava_layout,
                     prompt_format="USER: {images}\n{prompt} ASSISTANT:", tower_patches=True),
        ModelAdapter("llava_next", ("llava_next",), ("image_token_id",), llava_next_layout, ("image_sizes",)),
        ModelAdapter(
            "llava_onevision", ("llava_onevision",), ("image_token_id", "video_token_id"), llava_onevision_layout,
            ("image_sizes",),
        ),
        ModelAdapter("qwen2_vl", ("qwen2_vl",), _QWEN_PLACEHOLDERS, qwen_vl_layout, _QWEN_INPUTS, "grid_thw",
                     pixel_layout="patches"),
        ModelAdapter("qwen2_5_vl", ("qwen2_5_vl",), _QWEN_PLACEHOLDERS, qwen_vl_layout, _QWEN_INPUTS, "grid_thw",
                     pixel_layout="patches"),
        ModelAdapter("qwen3_vl", ("qwen3_vl",), _QWEN_PLACEHOLDERS, qwen_vl_layout, _QWEN_INPUTS, "grid_thw",
                     pixel_layout="patches", deepstack=True),
        ModelAdapter("internvl", ("internvl",), ("image_token_id",), internvl_layout),
        # transformers 5.25+: RICE-ViT patches merged m x m, laid out like Qwen-VL's (image_grid_thw)
        ModelAdapter("llava_onevision1_5", ("llava_onevision1_5",), _QWEN_PLACEHOLDERS, qwen_vl_layout, _QWEN_INPUTS,
                     "grid_thw", pixel_layout="patches"),
        # bidirectional attention inside each image (token_type_ids), sliding-window layers: docs/masks.md
        ModelAdapter("gemma3", ("gemma3",), ("image_token_id",), gemma3_layout,
                     prompt_format="<start_of_turn>user\n{images}{prompt}<end_of_turn>\n<start_of_turn>model\n",
                     nested_images=True),
        # bidirectional attention inside each image (mm_token_type_ids) on the sliding-window layers; images of any
        # size (image_position_ids); the KV-shared last layers reuse earlier layers' keys / values
        ModelAdapter("gemma4", ("gemma4",), ("image_token_id",), gemma4_layout, ("image_position_ids",),
                     prompt_format="<|turn>user\n{images}{prompt}<turn|>\n<|turn>model\n",
                     pixel_layout="patches_last", nested_images=True),
        # the image tokens and the text prefix form one bidirectional block (token_type_ids == 0)
        ModelAdapter("paligemma", ("paligemma",), ("image_token_id",), paligemma_layout,
                     prompt_format="{images}{prompt}"),
        # [IMG] tokens only: the [IMG_BREAK] / [IMG_END] separators between rows are text tokens
        ModelAdapter("mistral3", ("mistral3",), ("image_token_id",), mistral3_layout, ("image_sizes",),
                     prompt_format="[INST]{images}{prompt}[/INST]"),
        # tiles + a global image per image, marker tokens between them (text)
        ModelAdapter("idefics3", ("idefics3", "smolvlm"), ("image_token_id",), idefics3_layout,
                     prompt_format="User:{images}{prompt}<end_of_utterance>\nAssistant:", nested_images=True),
        # hybrid: 3 of 4 layers are linear attention (ModelAdapter.linear_layers); Qwen3-VL-style image rasters; the
        # MoE variant differs in its MLPs only
        ModelAdapter("qwen3_5", ("qwen3_5", "qwen3_5_moe"), _QWEN_PLACEHOLDERS, qwen_vl_layout, _QWEN_INPUTS,
                     "grid_thw", pixel_layout="patches"),
        # the processor inserts the Q-Former query placeholders itself; they have no spatial layout
        ModelAdapter("instructblip", ("instructblip",), ("image_token_id",), instructblip_layout,
                     prompt_format="{prompt}", spatial_grids=False),
    )
}


def supported_model_types() -> list[str]:
    """Every ``config.model_type`` flowkern has an adapter for."""
    return sorted(t for a in ADAPTERS.values() for t in a.model_types)


def get_adapter(model_or_config: Any) -> ModelAdapter:
    """The adapter for a model (or its config), chosen by ``config.model_type``.

    Raises:
        ValueError: the family is not supported (the message lists the supported model types), or it is a
            supported family in a configuration flowkern cannot trace (an encoder-decoder language model).
    """
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    for adapter in ADAPTERS.values():
        if model_type in adapter.model_types:
            text_config = adapter.text_config(config)
            if getattr(text_config, "is_encoder_decoder", False):
                raise ValueError(
                    f"{adapter.family} with an encoder-decoder language model ({text_config.model_type}) is not "
                    "supported: flowkern traces decoder-only language models"
                )
            return adapter
    raise ValueError(
        f"flowkern does not know the model type {model_type!r}; supported: {', '.join(supported_model_types())}"
    )

