"""From images and prompts to a model's inputs: one builder for one prompt or a batch of ``B``; images read as RGB.

.. code-block:: python

    from flowkern.hf.inputs import build_inputs

    one = build_inputs(processor, model, "cat.jpg", "What is in the image?")             # input_ids [1, S]
    batch = build_inputs(processor, model, ["a.jpg", ["b.jpg", "c.jpg"]], ["Is it red?", "Same animal?"])  # [2, S]
    out = model.generate(**batch, max_new_tokens=16, do_sample=False)

Each prompt is templated by :func:`prompt_text` (the user's own text when it already holds the image token, else
the processor's chat template with one image slot per image, else the family's plain format); the processor
tokenizes the texts together, padded on the left (so a batched ``generate`` appends on the right), and the tensors
go to the model's device, floating ones in the model's dtype.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from flowkern.hf.models import ADAPTERS, ModelAdapter, get_adapter

__all__ = ["build_inputs", "prompt_text", "load_images"]


def load_images(image: Any) -> list:
    """Images as a list of RGB ``PIL.Image``.

    Args:
        image: a path, a ``PIL.Image``, or a list of them.

    Raises:
        FileNotFoundError: a path that does not exist.
        ValueError: a file that is not an image, or an empty list.
    """
    from PIL import Image, UnidentifiedImageError

    items = list(image) if isinstance(image, (list, tuple)) else [image]
    if not items:
        raise ValueError("--image: no image given")
    out = []
    for item in items:
        if isinstance(item, Image.Image):
            out.append(item.convert("RGB"))
            continue
        path = Path(os.fspath(item)).expanduser()
        if path.is_dir():
            raise ValueError(f"--image {item}: is a directory, expected an image file")
        if not path.is_file():
            raise FileNotFoundError(f"--image {item}: no such file")
        try:
            with Image.open(path) as im:
                out.append(im.convert("RGB"))
        except (UnidentifiedImageError, OSError) as exc:
            raise ValueError(f"--image {item}: not a readable image ({exc})") from exc
    return out


def prompt_text(processor: Any, family: str, prompt: str, n_images: int) -> str:
    """The full prompt string for ``prompt`` about ``n_images`` images, as :func:`build_inputs` builds it: ``prompt``
    itself when it already holds the image token, else the processor's chat template (one user turn, generation
    prompt), else the family's :attr:`~flowkern.hf.models.ModelAdapter.prompt_format`.

    Raises:
        ValueError: there is no way to place the images (no chat template and no image token).
    """
    image_token = getattr(processor, "image_token", None)
    if image_token and image_token in prompt:
        return prompt  # the user wrote the whole prompt, image placeholders included
    if getattr(processor, "chat_template", None):
        content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": prompt}]
        text = processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )
        return text[0] if isinstance(text, list) else text
    fmt = ADAPTERS[family].prompt_format if family in ADAPTERS else ModelAdapter.prompt_format
    if "{images}" in fmt and not image_token:
        raise ValueError(
            f"the {family} processor has neither a chat template nor an image_token; write the image placeholder "
            "into --prompt yourself"
        )
    return fmt.format(images=(image_token or "") * n_images, prompt=prompt)


def build_inputs(
    processor: Any,
    model: torch.nn.Module,
    images: Any,
    prompts: str | Sequence[str],
    *,
    device: str | torch.device | None = None,
) -> Any:
    """Processor outputs for one prompt or a batch of ``B`` prompts, each about one or more images, ready for
    ``model.generate(**inputs)``.

    Args:
        processor: the model's processor (:func:`flowkern.hf.loading.load_model`); its tokenizer pads on the left.
        model: the model (for its family, image placeholder ids, device and dtype).
        images: with one prompt (a ``str``): a path, a ``PIL.Image`` or a list of them (several images in the
            prompt); with ``B`` prompts (a sequence): ``B`` such entries, one per prompt.
        prompts: the user's question (a ``str``: ``B = 1``) or ``B`` of them.
        device: where the tensors go (default: the model's device); floating tensors take the model's dtype.

    Returns:
        a ``BatchFeature`` with ``input_ids [B, S]``, ``attention_mask [B, S]`` (0 on the left padding),
        ``pixel_values`` and whatever else the processor returns (``image_sizes``, ``image_grid_thw``, ...).

    Raises:
        FileNotFoundError: an image path that does not exist.
        ValueError: a prompt that ends up without an image slot (its ``input_ids`` hold no image placeholder
            token), a processor that rejects the prompts / images, or not one image entry per prompt.
    """
    if isinstance(prompts, str):
        prompts, groups = [prompts], [load_images(images)]
    else:
        if len(images) != len(prompts) or not prompts:
            raise ValueError(f"expected one image entry per prompt, got {len(images)} for {len(prompts)} prompts")
        groups = [list(item) if isinstance(item, (list, tuple)) else [item] for item in images]
        if any(not g for g in groups):
            raise ValueError("every prompt needs at least one image")
    adapter = get_adapter(model)
    pictures = load_images([im for g in groups for im in g])
    texts = [prompt_text(processor, adapter.family, p, len(g)) for p, g in zip(prompts, groups, strict=True)]
    placeholders = torch.tensor(adapter.placeholder_token_ids(model.config))
    image_token = getattr(processor, "image_token", None)

    def no_slot(text: str) -> ValueError:
        return ValueError(
            f"the prompt has no image slot: its input_ids contain no image token {placeholders.tolist()} (prompt "
            f"text {text!r}); use a processor whose chat template renders images, or put the image placeholder in "
            "--prompt")

    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is not None and getattr(tokenizer, "padding_side", "left") != "left":
        tokenizer.padding_side = "left"
    try:
        inputs = processor(images=pictures, text=texts, padding=True, return_tensors="pt")
    except ValueError as exc:
        missing = [t for t in texts if image_token and image_token not in t]
        if missing:
            raise no_slot(missing[0]) from exc
        shown = texts[0] if len(texts) == 1 else texts
        raise ValueError(f"the processor rejected the prompt {shown!r} with {len(pictures)} image(s): {exc}") from exc
    has_slot = torch.isin(inputs["input_ids"], placeholders).any(dim=1)
    if not bool(has_slot.all()):
        raise no_slot(texts[int((~has_slot).nonzero()[0])])
    param = next(model.parameters(), None)
    dev = torch.device(device) if device is not None else (param.device if param is not None else torch.device("cpu"))
    dtype = param.dtype if param is not None and param.is_floating_point() else None
    return inputs.to(device=dev, dtype=dtype) if dtype is not None else inputs.to(device=dev)
