"""Tiny random-weight models of the newer families saved with a real processor, loadable like any checkpoint.

:func:`save_tiny` writes a :func:`flowkern.hf.tiny.tiny_vlm` model (4 decoder layers) together with the family's
own processor class (a PIL image processor, the video / audio parts the class requires, a word-level tokenizer from
:func:`flowkern.hf.tiny.word_tokenizer` holding the family's marker tokens, no chat template), so that ``flowkern
eval`` and :func:`flowkern.hf.loading.load_model` run on it exactly as on a downloaded checkpoint: the prompt comes
from the adapter's ``prompt_format`` (its words are in the vocabulary), the image placeholders from the processor.
The model's placeholder / marker token ids are set to the tokenizer's.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from flowkern.hf.models import ADAPTERS
from flowkern.hf.tiny import tiny_vlm, word_tokenizer

__all__ = ["SAVED_FAMILIES", "NEEDS_PACKAGES", "save_tiny"]


def _paligemma(words: list[str], filler: int) -> tuple[Any, dict]:
    """SigLIP 8 px, patch 4: 4 image tokens; prompts ``<image>`` + text (the processor adds ``<bos>`` and the
    newline, and PaliGemma's location tokens to the tokenizer)."""
    from transformers import PaliGemmaProcessor, SiglipImageProcessorPil

    tokenizer = word_tokenizer(words, filler=filler)
    ip = SiglipImageProcessorPil(size={"height": 8, "width": 8})
    ip.image_seq_length = 4
    processor = PaliGemmaProcessor(image_processor=ip, tokenizer=tokenizer)
    return processor, {"image_token_id": tokenizer.convert_tokens_to_ids("<image>")}


def _gemma3(words: list[str], filler: int) -> tuple[Any, dict]:
    """SigLIP 8 px pooled to 4 tokens between ``<start_of_image>`` / ``<end_of_image>``."""
    from transformers import Gemma3ImageProcessorPil, Gemma3Processor

    marks = {"boi_token": "<start_of_image>", "image_token": "<image_soft_token>", "eoi_token": "<end_of_image>"}
    tokenizer = word_tokenizer(words, filler=filler, named=marks)
    ip = Gemma3ImageProcessorPil(size={"height": 8, "width": 8})
    processor = Gemma3Processor(image_processor=ip, tokenizer=tokenizer, image_seq_length=4)
    ids = {k: tokenizer.convert_tokens_to_ids(v) for k, v in marks.items()}
    return processor, {"image_token_id": ids["image_token"], "boi_token_index": ids["boi_token"],
                       "eoi_token_index": ids["eoi_token"]}


_IDEFICS_MARKS = ["<fake_token_around_image>", "<global-img>", "<end_of_utterance>",
                  *(f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6))]


def _idefics3(words: list[str], filler: int) -> tuple[Any, dict]:
    """8 px tiles (patch 2, pixel shuffle 2: 4 tokens each): an image longer than 8 px is split into tiles plus
    the global image, the marker tokens between them."""
    from transformers import Idefics3ImageProcessorPil, Idefics3Processor

    tokenizer = word_tokenizer(words, filler=filler, extra_special=_IDEFICS_MARKS)
    ip = Idefics3ImageProcessorPil(size={"longest_edge": 16}, max_image_size={"longest_edge": 8})
    processor = Idefics3Processor(image_processor=ip, tokenizer=tokenizer, image_seq_len=4)
    return processor, {"image_token_id": tokenizer.convert_tokens_to_ids("<image>")}


def _smolvlm(words: list[str], filler: int) -> tuple[Any, dict]:
    """Idefics3's tiles (:func:`_idefics3`) with SmolVLM's processor and video processor."""
    from transformers import SmolVLMImageProcessorPil, SmolVLMProcessor, SmolVLMVideoProcessor

    tokenizer = word_tokenizer(words, filler=filler, extra_special=_IDEFICS_MARKS)
    ip = SmolVLMImageProcessorPil(size={"longest_edge": 16}, max_image_size={"longest_edge": 8})
    video = SmolVLMVideoProcessor(size={"longest_edge": 8})
    processor = SmolVLMProcessor(image_processor=ip, tokenizer=tokenizer, video_processor=video, image_seq_len=4)
    return processor, {"image_token_id": tokenizer.convert_tokens_to_ids("<image>")}


def _mistral3(words: list[str], filler: int) -> tuple[Any, dict]:
    """Pixtral: images resized to at most 16 px in multiples of 4 (patch 2, spatial merge 2: one token per 4 x 4 px),
    each row of ``[IMG]`` tokens closed by ``[IMG_BREAK]``, the last by ``[IMG_END]``."""
    from transformers import PixtralImageProcessorPil, PixtralProcessor

    tokenizer = word_tokenizer(words, filler=filler, extra_special=["[IMG]", "[IMG_BREAK]", "[IMG_END]"])
    ip = PixtralImageProcessorPil(size={"longest_edge": 16}, patch_size={"height": 4, "width": 4})
    processor = PixtralProcessor(image_processor=ip, tokenizer=tokenizer, patch_size=2, spatial_merge_size=2)
    return processor, {"image_token_id": tokenizer.convert_tokens_to_ids("[IMG]")}


_QWEN_CLASSES = {  # (processor, video processor): the classes transformers' auto mappings give these model types
    "qwen3_5": ("Qwen3VLProcessor", "Qwen3VLVideoProcessor"),
    "qwen3_5_moe": ("Qwen3VLProcessor", "Qwen3VLVideoProcessor"),
    "llava_onevision1_5": ("Exaone4_5_Processor", "Qwen2VLVideoProcessor"),  # 5.25: Qwen2-VL's, no mm_token_type_ids
}


def _qwen(family: str) -> Callable[[list[str], int], tuple[Any, dict]]:
    """Qwen-VL-style flattened patches (patch 2, spatial merge 2: one token per 4 x 4 px, 4 to 16 tokens an image;
    temporal patch 2 for Qwen3.5 / Qwen3.5-MoE, 1 for LLaVA-OneVision-1.5) with the family's processor and video
    processor classes (:data:`_QWEN_CLASSES`)."""

    def build(words: list[str], filler: int) -> tuple[Any, dict]:
        import transformers

        marks = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                 "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"}
        tokenizer = word_tokenizer(words, filler=filler, named=marks)
        sizes = dict(patch_size=2, merge_size=2, temporal_patch_size=1 if family == "llava_onevision1_5" else 2)
        ip = transformers.Qwen2VLImageProcessorPil(size={"shortest_edge": 64, "longest_edge": 256}, **sizes)
        processor_cls, video_cls = (getattr(transformers, name) for name in _QWEN_CLASSES[family])
        processor = processor_cls(image_processor=ip, tokenizer=tokenizer, video_processor=video_cls(**sizes))
        return processor, {f"{k}_id": tokenizer.convert_tokens_to_ids(v) for k, v in marks.items()}

    return build


def _gemma4(words: list[str], filler: int) -> tuple[Any, dict]:
    """Patches of 2 x 2 px pooled 2 x 2, at most 70 tokens an image (its aspect ratio kept), between ``<|image>`` /
    ``<image|>``; the processor's audio and video parts are built too (it requires them)."""
    from transformers import Gemma4AudioFeatureExtractor, Gemma4ImageProcessorPil, Gemma4Processor, Gemma4VideoProcessor

    marks = {"image_token": "<|image|>", "boi_token": "<|image>", "eoi_token": "<image|>", "audio_token": "<|audio|>",
             "boa_token": "<|audio>", "eoa_token": "<audio|>"}
    tokenizer = word_tokenizer(words, filler=filler, extra_special=["<|video|>"], named=marks)
    ip = Gemma4ImageProcessorPil(patch_size=2, pooling_kernel_size=2, max_soft_tokens=70)
    video = Gemma4VideoProcessor(patch_size=2, pooling_kernel_size=2, max_soft_tokens=70)
    processor = Gemma4Processor(feature_extractor=Gemma4AudioFeatureExtractor(), image_processor=ip,
                                tokenizer=tokenizer, video_processor=video, image_seq_length=70)
    ids = {k: tokenizer.convert_tokens_to_ids(v) for k, v in marks.items()}
    return processor, {"image_token_id": ids["image_token"], "boi_token_id": ids["boi_token"],
                       "eoi_token_id": ids["eoi_token"], "video_token_id": tokenizer.convert_tokens_to_ids("<|video|>")}


_PROCESSORS: dict[str, Callable[[list[str], int], tuple[Any, dict]]] = {
    "paligemma": _paligemma, "gemma3": _gemma3, "idefics3": _idefics3, "smolvlm": _smolvlm, "mistral3": _mistral3,
    "llava_onevision1_5": _qwen("llava_onevision1_5"), "qwen3_5": _qwen("qwen3_5"),
    "qwen3_5_moe": _qwen("qwen3_5_moe"), "gemma4": _gemma4,
}

SAVED_FAMILIES = tuple(_PROCESSORS)
"""The families :func:`save_tiny` writes. Those of :data:`NEEDS_PACKAGES` can be written (and loaded) only where
those packages import."""

NEEDS_PACKAGES: dict[str, tuple[str, ...]] = {
    "mistral3": ("torchvision",), "smolvlm": ("torchvision", "num2words"), "llava_onevision1_5": ("torchvision",),
    "qwen3_5": ("torchvision",), "qwen3_5_moe": ("torchvision",), "gemma4": ("torchvision",),
}
"""Packages flowkern does not depend on that a family's processor classes require (transformers 5.25:
PixtralProcessor itself, the others through their video processors; SmolVLM's processor also spells numbers out
with num2words). Without them, loading such a checkpoint fails with one line naming the package."""


def save_tiny(family: str, path: str | os.PathLike, *, words: Sequence[str], filler: int = 40, seed: int = 0) -> None:
    """Write a 4-layer :func:`~flowkern.hf.tiny.tiny_vlm` of ``family`` and its processor to ``path``.

    Args:
        family: one of :data:`SAVED_FAMILIES`.
        path: the folder (created).
        words, filler: the tokenizer's vocabulary (:func:`~flowkern.hf.tiny.word_tokenizer`); the words of the
            family's ``prompt_format`` are added.

    Raises:
        ValueError: an unknown ``family``.
    """
    if family not in _PROCESSORS:
        raise ValueError(f"family must be one of {SAVED_FAMILIES}, got {family!r}")
    adapter = next(a for a in ADAPTERS.values() if family in a.model_types)
    fmt = adapter.prompt_format.replace("{images}", " ").replace("{prompt}", " ")
    processor, ids = _PROCESSORS[family](list(dict.fromkeys([*words, *fmt.split()])), filler)
    tokenizer = processor.tokenizer
    model = tiny_vlm(family, layers=4, seed=seed, vocab_size=len(tokenizer))
    for key, value in ids.items():
        setattr(model.config, key, value)
    model.config.get_text_config().bos_token_id = tokenizer.bos_token_id
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
