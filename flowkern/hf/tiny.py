"""Tiny offline models: the one builder the tests, the benchmarks and the demo share.

- :func:`build_model`: a random-weight model of any supported family from its config (seeded, eval mode,
  optionally decoding every step): what every tiny model in this project is made with;
- :func:`tiny_vlm`: a tiny model of each supported family (width 32, a few layers, image placeholder id
  :data:`IMAGE_TOKEN`), from :func:`text_config` / :func:`clip_config` and the family's vision config: the test
  suite's models;
- :func:`save_tiny_llava`: a LLaVA-1.5-layout model with a real processor (a word-level tokenizer built in memory,
  a CLIP image processor, a chat template with an image slot), saved in the official format so that
  :func:`flowkern.hf.loading.load_model` and the CLIs load it like any checkpoint (the demo model, the CLI and
  evaluation tests).

Nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from typing import Any

import torch

__all__ = [
    "CHAT_TEMPLATE", "SPECIAL_TOKENS", "PAD_TOKEN", "IMAGE_TOKEN", "VIDEO_TOKEN", "FAMILIES", "text_config",
    "clip_config", "build_model", "tiny_vlm", "word_tokenizer", "save_tiny_llava",
]

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<image>")
"""Ids 0..4 of every tiny tokenizer: pad, bos, eos, unk, the image placeholder."""

CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER : "
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image> "
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% else %}ASSISTANT : {{ message['content'][0]['text'] }} {% endif %}{% endfor %}"
    "{% if add_generation_prompt %} ASSISTANT :{% endif %}"
)
"""LLaVA-1.5's ``USER : <image> text ASSISTANT :`` format, spelled with the tiny tokenizer's words."""


def word_tokenizer(words: Sequence[str], *, filler: int = 40, extra_special: Sequence[str] = (),
                   named: dict[str, str] | None = None) -> Any:
    """A whitespace word-level ``PreTrainedTokenizerFast`` built without files.

    Vocabulary: :data:`SPECIAL_TOKENS`, then ``extra_special``, then the tokens of ``named``, then ``words``, then
    ``filler`` words ``w0 .. w{filler-1}`` (what a random-weight model tends to generate); a word given twice keeps
    its first id. ``named``: special tokens the tokenizer exposes as attributes (``{"boi_token": "<boi>"}`` gives
    ``tokenizer.boi_token`` / ``boi_token_id``), as some processors read them.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = [*SPECIAL_TOKENS, *extra_special, *(named or {}).values()]
    names = dict.fromkeys(special + list(words) + [f"w{i}" for i in range(filler)])  # a repeated word: one id, no gap
    vocab = {w: i for i, w in enumerate(names)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        additional_special_tokens=special[4:],
    )
    if named:
        from flowkern.hf.compat import name_special_tokens

        name_special_tokens(tokenizer, named)
    return tokenizer


def save_tiny_llava(
    path: str | os.PathLike,
    *,
    vision: dict,
    text: dict,
    words: Sequence[str],
    filler: int = 40,
    vision_feature_layer: int = -1,
    image_mean: Sequence[float] | None = None,
    image_std: Sequence[float] | None = None,
    chat_template: str | None = CHAT_TEMPLATE,
    seed: int = 0,
) -> None:
    """Write a random-weight LLaVA-1.5-layout model and its processor to ``path``.

    Args:
        vision: ``CLIPVisionConfig`` fields (``image_size``, ``patch_size``, sizes); the image grid is
            ``(image_size / patch_size)^2`` tokens (the CLS token is dropped, as in LLaVA-1.5).
        text: Llama ``text_config`` fields; ``vocab_size`` is always the tokenizer's; ``model_type``,
            ``pad_token_id`` and ``bos_token_id`` default to ``"llama"`` and the tokenizer's ids.
        words, filler: the tokenizer's vocabulary (see :func:`word_tokenizer`).
        vision_feature_layer: the CLIP layer whose features feed the projector.
        image_mean, image_std: the image processor's normalisation (CLIP's defaults when None).
        chat_template: the processor's chat template (None: no template).
        seed: ``torch.manual_seed`` before the weights are drawn.
    """
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaProcessor

    tokenizer = word_tokenizer(words, filler=filler)
    text = dict(text, vocab_size=len(tokenizer))
    text.setdefault("model_type", "llama")
    text.setdefault("pad_token_id", tokenizer.pad_token_id)
    text.setdefault("bos_token_id", tokenizer.bos_token_id)
    vision = dict(vision, model_type="clip_vision_model")
    cfg = LlavaConfig(vision_config=vision, text_config=text,
                      image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                      vision_feature_layer=vision_feature_layer, vision_feature_select_strategy="default")
    os.makedirs(path, exist_ok=True)
    build_model(cfg, seed=seed).save_pretrained(path)
    size = int(vision["image_size"])
    norm = {} if image_mean is None else dict(image_mean=list(image_mean), image_std=list(image_std or ()))
    ip = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}, **norm)
    LlavaProcessor(image_processor=ip, tokenizer=tokenizer, patch_size=int(vision["patch_size"]),
                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                   chat_template=chat_template).save_pretrained(path)


# ----------------------------------------------------------------------------------------------------------
# in-memory tiny models of every family

PAD_TOKEN, IMAGE_TOKEN, VIDEO_TOKEN = 0, 100, 101
"""Token ids of :func:`tiny_vlm` models: padding, the image placeholder, the video placeholder (Qwen-VL: the vision
start / end markers are 102 / 103)."""

FAMILIES = ("llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "internvl", "instructblip",
            "gemma3", "paligemma", "mistral3", "llava_onevision1_5", "qwen3_5", "qwen3_5_moe", "idefics3", "smolvlm",
            "gemma4")
"""The families :func:`tiny_vlm` builds."""


def text_config(model_type: str | None = "llama", **overrides: Any) -> dict:
    """A tiny language-model config (width 32, 3 layers, 4 query / 2 key-value heads, vocabulary 128, peaky
    attention: ``initializer_range=0.3``), ``overrides`` applied last; ``model_type=None`` leaves it out (for
    families whose text config has its own class)."""
    cfg: dict[str, Any] = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, max_position_embeddings=256, pad_token_id=PAD_TOKEN, bos_token_id=1, eos_token_id=None,
        initializer_range=0.3,
    )
    if model_type is not None:
        cfg["model_type"] = model_type
    cfg.update(overrides)
    return cfg


def clip_config(image_size: int = 8, patch_size: int = 2) -> dict:
    """A one-layer CLIP vision tower of width 32: ``(image_size / patch_size)^2`` patch tokens."""
    return dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, image_size=image_size, patch_size=patch_size, projection_dim=32)


def build_model(
    config: Any,
    *,
    seed: int = 0,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    attn_implementation: str | None = None,
    decode_all: bool = False,
) -> Any:
    """A model with random weights from ``config``, in eval mode: ``torch.manual_seed(seed)``, then the family's
    image-text-to-text class (transformers' auto mapping) built on ``device`` in ``dtype``.

    Args:
        attn_implementation: every sub-model's attention (None: transformers' default).
        decode_all: no end-of-sequence token (``generate`` always decodes ``max_new_tokens`` steps) and the text
            config's pad token for ``generate``.

    Raises:
        ValueError: transformers has no image-text-to-text class for the config.
    """
    from flowkern.hf.loading import auto_model_class

    cls = auto_model_class(config)._model_mapping[type(config)]
    torch.manual_seed(seed)
    extra = {} if attn_implementation is None else dict(attn_implementation=attn_implementation)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = cls._from_config(config, **({"dtype": dtype} if dtype is not None else {}), **extra)
    model.eval()
    if decode_all:
        model.generation_config.eos_token_id = None
        pad = getattr(config, "pad_token_id", None)
        model.generation_config.pad_token_id = pad if pad is not None else config.get_text_config().pad_token_id
    return model


def tiny_vlm(family: str, *, layers: int = 3, image_size: int = 8, seed: int = 0, deepstack: Sequence[int] = (0,),
             **text: Any) -> Any:
    """A tiny random-weight VLM of ``family`` (one of :data:`FAMILIES`), fp32, eval mode, decoding every step.

    Image placeholder :data:`IMAGE_TOKEN`, video :data:`VIDEO_TOKEN`. Towers: LLaVA / LLaVA-NeXT: CLIP
    ``image_size`` px, patch 2 (NeXT: pinpoints 16x16, 8x16, 16x8); OneVision: SigLIP 8 px, ``anyres_max_1``;
    Qwen-VL: patch 2, spatial merge 2, temporal patch 2 (Qwen3-VL: DeepStack after the ``deepstack`` tower
    layers, head dim 8, interleaved M-RoPE); InternVL: 8 px tiles, patch 2, downsample 0.5 (2x2 tokens per tile);
    InstructBLIP: 4 Q-Former queries; Gemma 3: SigLIP 8 px, patch 2, pooled to 2x2 tokens per image, layers
    alternating sliding window (5) and full attention, head dim 8; PaliGemma: SigLIP 8 px, patch 4 (2x2 tokens),
    Gemma text model, head dim 8; Mistral 3: Pixtral 16 px, patch 2, spatial merge 2 (an image of h x w px is
    h/4 x w/4 tokens), Mistral text model; LLaVA-OneVision-1.5 (transformers 5.25+): RICE-ViT patch 2, spatial
    merge 2 (flattened patches, like Qwen-VL), Qwen3 text model, head dim 8; Qwen3.5: Qwen3-VL-style tower, text
    layers linear attention (Gated DeltaNet) except every 4th, head dim 16 with a quarter rotary (M-RoPE; Qwen3.5-MoE:
    the same with 4 experts, 2 per token, and a shared expert);
    Idefics3 / SmolVLM: 8 px tiles, patch 2, pixel shuffle 2 (2x2 tokens per tile or global image), Llama text;
    Gemma 4: patches of 2 x 2 px (``pixel_values [N, patches, 12]`` with ``image_position_ids``) pooled 2 x 2, layers
    alternating sliding window (5) and full attention up to a full last layer, the second half KV-shared (from 4
    layers), bidirectional image blocks (``mm_token_type_ids``).

    Args:
        layers: decoder layers of the language model.
        text: more :func:`text_config` fields (e.g. ``max_position_embeddings``).
    """
    from transformers import (
        InstructBlipConfig,
        InternVLConfig,
        LlavaConfig,
        LlavaNextConfig,
        LlavaOnevisionConfig,
        Qwen2_5_VLConfig,
        Qwen2VLConfig,
        Qwen3VLConfig,
    )

    text = dict(text, num_hidden_layers=layers)
    pinpoints = [[16, 16], [8, 16], [16, 8]]
    rope = {"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0}
    qwen_ids = dict(image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN, vision_start_token_id=102,
                    vision_end_token_id=103)
    if family == "llava":
        cfg = LlavaConfig(vision_config=clip_config(image_size), text_config=text_config(**text),
                          image_token_index=IMAGE_TOKEN, vision_feature_layer=-1)
    elif family == "llava_next":
        cfg = LlavaNextConfig(vision_config=clip_config(image_size), text_config=text_config(**text),
                              image_token_index=IMAGE_TOKEN, vision_feature_layer=-1, image_grid_pinpoints=pinpoints)
    elif family == "llava_onevision":
        vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, image_size=8, patch_size=2)
        cfg = LlavaOnevisionConfig(vision_config=vision, text_config=text_config("qwen2", **text),
                                   image_token_index=IMAGE_TOKEN, video_token_index=VIDEO_TOKEN,
                                   vision_feature_layer=-1, vision_aspect_ratio="anyres_max_1",
                                   image_grid_pinpoints=pinpoints)
    elif family == "qwen2_vl":
        vision = dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, patch_size=2, spatial_merge_size=2,
                      temporal_patch_size=2, in_channels=3)
        cfg = Qwen2VLConfig(vision_config=vision, text_config=text_config(None, rope_parameters=rope, **text),
                            **qwen_ids)
    elif family == "qwen2_5_vl":
        vision = dict(depth=2, hidden_size=16, out_hidden_size=32, intermediate_size=32, num_heads=2, patch_size=2,
                      spatial_merge_size=2, temporal_patch_size=2, in_channels=3, window_size=8,
                      fullatt_block_indexes=[1])
        cfg = Qwen2_5_VLConfig(vision_config=vision, text_config=text_config(None, rope_parameters=rope, **text),
                               **qwen_ids)
    elif family == "qwen3_vl":
        vision = dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, patch_size=2, spatial_merge_size=2,
                      temporal_patch_size=2, in_channels=3, out_hidden_size=32, num_position_embeddings=16,
                      deepstack_visual_indexes=list(deepstack))
        text.setdefault("head_dim", 8)
        cfg = Qwen3VLConfig(vision_config=vision, text_config=text_config(
            None, rope_parameters=dict(rope, mrope_interleaved=True), **text), **qwen_ids)
    elif family == "internvl":
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      image_size=[8, 8], patch_size=[2, 2])
        cfg = InternVLConfig(vision_config=vision, text_config=text_config("qwen2", **text),
                             image_token_id=IMAGE_TOKEN, downsample_ratio=0.5)
    elif family == "instructblip":
        cfg = InstructBlipConfig(
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                               image_size=8, patch_size=2),
            qformer_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                encoder_hidden_size=32, vocab_size=64, max_position_embeddings=64),
            text_config=text_config(**text), num_query_tokens=4, image_token_index=IMAGE_TOKEN,
        )
    elif family in _NEWER:
        cfg = _newer_config(family, text, qwen_ids, rope)
    else:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    model = build_model(cfg, seed=seed, decode_all=True)
    model.generation_config.pad_token_id = PAD_TOKEN
    return model


def _gemma_config(family: str, text: dict) -> Any:
    """Gemma 3 / PaliGemma configs of :func:`tiny_vlm` (see there)."""
    from transformers import Gemma3Config, PaliGemmaConfig

    from flowkern.hf.compat import LAYER_TYPES

    siglip = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, image_size=8, patch_size=2)
    n = int(text.get("num_hidden_layers", 3))
    if family == "gemma3":
        text = text_config("gemma3_text", head_dim=8, query_pre_attn_scalar=8, sliding_window=5,
                           layer_types=[LAYER_TYPES[("sliding", "full")[i % 2]] for i in range(n)], **text)
        return Gemma3Config(vision_config=siglip, text_config=text, mm_tokens_per_image=4,
                            image_token_index=IMAGE_TOKEN, boi_token_index=102, eoi_token_index=103)
    text = text_config("gemma", head_dim=8, **text)
    return PaliGemmaConfig(vision_config=dict(siglip, patch_size=4, projection_dim=32), text_config=text,
                           image_token_index=IMAGE_TOKEN, projection_dim=32, hidden_size=32)


def _gemma4_config(text: dict) -> Any:
    """The Gemma 4 config of :func:`tiny_vlm`: sliding (window 5) and full layers alternating up to a full last
    layer, the second half of the layers KV-shared (from 4 layers), bidirectional attention inside each image, per-layer
    inputs of width 8; a one-layer vision tower of 2 x 2 patches pooled 2 x 2 (an 8 x 8 image: 4 tokens)."""
    from transformers import Gemma4Config

    from flowkern.hf.compat import LAYER_TYPES

    n = int(text.get("num_hidden_layers", 3))
    layer_types = [LAYER_TYPES[("full", "sliding")[(n - 1 - i) % 2]] for i in range(n)]
    text = text_config("gemma4_text", head_dim=8, global_head_dim=8, sliding_window=5, layer_types=layer_types,
                       num_kv_shared_layers=n // 2 if n >= 4 else 0, hidden_size_per_layer_input=8,
                       vocab_size_per_layer_input=int(text.get("vocab_size", 128)),
                       use_bidirectional_attention="vision", **text)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=2, head_dim=16, patch_size=2, pooling_kernel_size=2, position_embedding_size=64)
    return Gemma4Config(text_config=text, vision_config=vision, audio_config=None, image_token_id=IMAGE_TOKEN,
                        video_token_id=VIDEO_TOKEN, boi_token_id=102, eoi_token_id=103, audio_token_id=None)


_NEWER = ("gemma3", "gemma4", "paligemma", "llava_onevision1_5", "qwen3_5", "qwen3_5_moe", "idefics3", "smolvlm",
          "mistral3")


def _newer_config(family: str, text: dict, qwen_ids: dict, rope: dict) -> Any:
    """Configs of :func:`tiny_vlm` for the families added with masks beyond causal, separators or hybrid layers."""
    if family in ("gemma3", "paligemma"):
        return _gemma_config(family, text)
    if family == "gemma4":
        return _gemma4_config(text)
    if family == "llava_onevision1_5":
        from transformers import LlavaOnevision15Config

        vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, patch_size=2, spatial_merge_size=2,
                      out_hidden_size=32, in_channels=3)
        return LlavaOnevision15Config(vision_config=vision, text_config=text_config("qwen3", head_dim=8, **text),
                                      **qwen_ids)
    if family in ("qwen3_5", "qwen3_5_moe"):
        import transformers

        vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, patch_size=2, spatial_merge_size=2,
                      temporal_patch_size=2, in_channels=3, out_hidden_size=32, num_position_embeddings=16)
        rope35 = dict(rope, mrope_section=[1, 1, 0], mrope_interleaved=True, partial_rotary_factor=0.25)
        moe = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=16)
        text = text_config(None, head_dim=16, linear_conv_kernel_dim=2, linear_key_head_dim=8, linear_value_head_dim=8,
                           linear_num_key_heads=2, linear_num_value_heads=4, rope_parameters=rope35,
                           **(moe if family == "qwen3_5_moe" else {}), **text)
        cls = transformers.Qwen3_5MoeConfig if family == "qwen3_5_moe" else transformers.Qwen3_5Config
        return cls(vision_config=vision, text_config=text, **qwen_ids)
    if family in ("idefics3", "smolvlm"):
        from transformers import Idefics3Config, SmolVLMConfig

        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=8,
                      patch_size=2)
        cls = Idefics3Config if family == "idefics3" else SmolVLMConfig
        return cls(vision_config=vision, text_config=text_config(**text), image_token_id=IMAGE_TOKEN, scale_factor=2)
    if family == "mistral3":
        from transformers import Mistral3Config

        vision = dict(model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, head_dim=16, image_size=16, patch_size=2)
        return Mistral3Config(vision_config=vision, text_config=text_config("mistral", sliding_window=None, **text),
                              image_token_index=IMAGE_TOKEN, spatial_merge_size=2, vision_feature_layer=-1)
    raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
