"""Tiny offline LLaVA-1.5-layout models with a real processor, written with ``save_pretrained``.

For the tests, the benchmarks' demo model and examples that must run without network: a word-level tokenizer
built in memory (no vocabulary files to download), a CLIP image processor, a chat template with an image slot and
a ``LlavaForConditionalGeneration`` with random weights, all saved in the official format so that
:func:`flowkern.hf.loading.load_model` and the CLIs load them like any checkpoint.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["CHAT_TEMPLATE", "SPECIAL_TOKENS", "word_tokenizer", "save_tiny_llava"]

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


def word_tokenizer(words: Sequence[str], *, filler: int = 40, extra_special: Sequence[str] = ()) -> Any:
    """A whitespace word-level ``PreTrainedTokenizerFast`` built without files.

    Vocabulary: :data:`SPECIAL_TOKENS`, then ``extra_special``, then ``words``, then ``filler`` words
    ``w0 .. w{filler-1}`` (what a random-weight model tends to generate); a word given twice keeps its first id.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = [*SPECIAL_TOKENS, *extra_special]
    names = dict.fromkeys(special + list(words) + [f"w{i}" for i in range(filler)])  # a repeated word: one id, no gap
    vocab = {w: i for i, w in enumerate(names)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        additional_special_tokens=["<image>", *extra_special],
    )


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
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    torch.manual_seed(seed)
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
    LlavaForConditionalGeneration(cfg).save_pretrained(path)
    size = int(vision["image_size"])
    norm = {} if image_mean is None else dict(image_mean=list(image_mean), image_std=list(image_std or ()))
    ip = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}, **norm)
    LlavaProcessor(image_processor=ip, tokenizer=tokenizer, patch_size=int(vision["patch_size"]),
                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                   chat_template=chat_template).save_pretrained(path)
