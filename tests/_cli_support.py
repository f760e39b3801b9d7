"""What the model-command tests share (test_cli_flow, test_cli_reliability, test_prune_cli): one prompt, a word-level
tokenizer that spells it, and a tiny LLaVA-1.5 saved in the official format, all made with the one tiny-model
builder :mod:`flowkern.hf.tiny` (so no test module imports another one)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from PIL import Image

from flowkern.hf.tiny import CHAT_TEMPLATE, clip_config, save_tiny_llava, text_config, word_tokenizer

WORDS = "USER ASSISTANT USER: ASSISTANT: : what is in the image ? a cat dog red blue yes no describe color".split()
"""The tokenizer's words: the chat template's and the prompt's (plus ``w0 ..`` filler words)."""

PROMPT = "what is in the image ?"
LAYERS = 4
"""Decoder layers of the tiny language models."""


def make_tokenizer(extra_special: tuple[str, ...] = ()) -> Any:
    """A word-level tokenizer of :data:`WORDS` with ``<image>`` (and ``extra_special``) as special tokens."""
    return word_tokenizer(WORDS, extra_special=extra_special)


def llm_config(tok: Any = None, *, model_type: str | None = "llama", **extra: Any) -> dict:
    """:func:`flowkern.hf.tiny.text_config` with :data:`LAYERS` layers and ``tok``'s vocabulary (default
    :func:`make_tokenizer`); ``model_type=None`` for families whose text config has its own class (Qwen2-VL)."""
    tok = make_tokenizer() if tok is None else tok
    return text_config(model_type, num_hidden_layers=LAYERS, vocab_size=len(tok), **extra)


def save_llava(path: str | os.PathLike, *, chat_template: str | None = CHAT_TEMPLATE, **text: Any) -> None:
    """A LLaVA-1.5 layout saved to ``path``: CLIP tower 8x8 / patch 2 (16 image tokens, CLS dropped), a Llama text
    model of :func:`llm_config` (``text``: more of its fields, e.g. ``max_position_embeddings``)."""
    save_tiny_llava(path, vision=clip_config(8, 2), text=llm_config(**text), words=WORDS, chat_template=chat_template)


def save_photo(path: str | os.PathLike, *, seed: int = 0, size: tuple[int, int] = (30, 40)) -> None:
    """A random RGB picture ``size = (height, width)`` written to ``path``."""
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
