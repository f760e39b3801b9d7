"""Tiny random-weight models of the newer families saved with a real processor, loadable like any checkpoint.

:func:`save_tiny` writes a :func:`flowkern.hf.tiny.tiny_vlm` model (4 decoder layers) together with the family's
own processor class (a PIL image processor, a word-level tokenizer from :func:`flowkern.hf.tiny.word_tokenizer`
holding the family's marker tokens, no chat template), so that ``flowkern eval`` and :func:`flowkern.hf.loading
.load_model` run on it exactly as on a downloaded checkpoint: the prompt comes from the adapter's
``prompt_format`` (its words are in the vocabulary), the image placeholders from the processor. The model's
placeholder / marker token ids are set to the tokenizer's.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from flowkern.hf.models import ADAPTERS
from flowkern.hf.tiny import tiny_vlm, word_tokenizer

__all__ = ["SAVED_FAMILIES", "save_tiny"]


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


def _idefics3(words: list[str], filler: int) -> tuple[Any, dict]:
    """8 px tiles (patch 2, pixel shuffle 2: 4 tokens each): an image longer than 8 px is split into tiles plus
    the global image, the marker tokens between them."""
    from transformers import Idefics3ImageProcessorPil, Idefics3Processor

    marks = ["<fake_token_around_image>", "<global-img>", "<end_of_utterance>",
             *(f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6))]
    tokenizer = word_tokenizer(words, filler=filler, extra_special=marks)
    ip = Idefics3ImageProcessorPil(size={"longest_edge": 16}, max_image_size={"longest_edge": 8})
    processor = Idefics3Processor(image_processor=ip, tokenizer=tokenizer, image_seq_len=4)
    return processor, {"image_token_id": tokenizer.convert_tokens_to_ids("<image>")}


_PROCESSORS: dict[str, Callable[[list[str], int], tuple[Any, dict]]] = {
    "paligemma": _paligemma, "gemma3": _gemma3, "idefics3": _idefics3,
}

SAVED_FAMILIES = tuple(_PROCESSORS)
"""The families :func:`save_tiny` writes. Not Mistral 3, SmolVLM, LLaVA-OneVision-1.5, Qwen3.5, Gemma 4: their
processor classes require torchvision (Pixtral's processor itself; the others through their video processors)."""


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
