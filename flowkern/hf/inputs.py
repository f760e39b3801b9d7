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

**The input checker** (:func:`check_images`): every command decodes each of its images fully, once, before a model
is loaded (``flowkern eval`` and ``sweep`` every image of the selected questions, ``generate`` / ``flow`` / ``cam``
their ``--image`` through :func:`load_images`), so a truncated file or a decompression-bomb header is one
:class:`ImageError` naming the file (CLI: one line, exit 2) instead of a traceback after the first batches. Images
that ``convert("RGB")`` renders wrongly (16-bit or float values, transparency: :func:`image_problem`) get one
:class:`ImageWarning` naming the file and its mode; they are still converted that way, as the reference evaluation
scripts do, so that answers stay comparable. :func:`image_token_counts` counts each prompt's image tokens from the
processor alone (no weights).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from flowkern._images import ImageError, decode_image
from flowkern.hf.models import ADAPTERS, ModelAdapter, get_adapter

__all__ = ["build_inputs", "prompt_text", "load_images", "check_images", "image_problem", "image_token_counts",
           "ImageError", "ImageWarning", "InputWarning"]


class InputWarning(UserWarning):
    """An input the run accepts but whose results may mislead (the CLI prints it as one line)."""


class ImageWarning(InputWarning):
    """An image whose ``convert("RGB")`` is not what it shows (16-bit / float values clipped, transparency dropped):
    the message names the file and its mode."""


_BIG_SET = 200
"""From this many distinct images on, :func:`check_images` shows a progress bar (when asked to)."""

_CHECKED: dict[tuple[str, int, int], str | None] = {}
"""(path, size, mtime) -> what :func:`check_images` found (None: nothing to warn about): an image is decoded once
per process however many eval points and resumes check it."""

_WARNED: set[str] = set()
"""Files already warned about in this process (each is named once, not once per point of a sweep)."""


def image_problem(image: Any) -> str | None:
    """Why ``image.convert("RGB")`` (what the model is fed, as in LLaVA's and lmms-eval's loaders) does not show what
    the image holds, or None: 16-bit / 32-bit / float values outside 0..255 (clipped: the image turns white),
    floats in [0, 1] (rounded to 0 or 1 of 255: black), or transparent pixels (the alpha channel is dropped and the
    colour stored under it, often black, shows). Reads the decoded pixels' extrema; changes nothing."""
    mode = image.mode
    if mode in ("I", "F") or mode.startswith("I;"):
        low, high = image.getextrema()
        if high > 255 or low < 0:
            return f"mode {mode}, values {low:g}..{high:g}: convert('RGB') clips them to 0..255 (the image turns white)"
        if mode == "F" and 0 < high <= 1:
            return (f"mode {mode}, values {low:g}..{high:g}: convert('RGB') reads them as 0..1 of 255 (the image "
                    "turns black)")
        return None
    if mode == "P" and "transparency" in image.info or mode in ("PA", "LA", "La", "RGBA", "RGBa"):
        alpha = (image.convert("RGBA") if mode in ("P", "PA") else image).getchannel("A")
        if alpha.getextrema()[0] < 255:
            return f"mode {mode} with transparent pixels: convert('RGB') drops the alpha channel"
    return None


def _warn(problems: list[tuple[Path, str]], what: str) -> None:
    import warnings

    fresh = [(p, m) for p, m in problems if str(p) not in _WARNED]
    if not fresh:
        return
    _WARNED.update(str(p) for p, _ in fresh)
    path, message = fresh[0]
    more = f" (and {len(fresh) - 1} more image(s) converted wrongly, e.g. {fresh[1][0]})" if len(fresh) > 1 else ""
    warnings.warn(f"{what} {path}: {message}{more}; the model sees that conversion, as LLaVA's loader does",
                  ImageWarning, stacklevel=3)


def check_images(paths: Any, *, what: str = "--images", progress: bool = False) -> None:
    """Decode every image fully, once, so that a run fails before its model loads rather than at the batch holding a
    bad file (the pixels are not kept; a file already checked in this process, unchanged since, is not decoded
    again). Images that :func:`image_problem` finds converted wrongly get one :class:`ImageWarning` (the first file,
    its mode, how many more).

    Args:
        paths: image paths (repeats are checked once); a ``PIL.Image`` among them (a loader that holds its images
            in memory) is only checked for its conversion.
        what: the option the paths came from, for the messages.
        progress: a tqdm bar on stderr when there are many images (200 or more).

    Raises:
        ImageError: the first path that is missing, a directory, or not a fully decodable image
            (:func:`flowkern._images.decode_image`).
    """
    from PIL import Image

    items = list(paths)
    problems: list[tuple[Path, str]] = []
    for picture in (p for p in items if isinstance(p, Image.Image)):  # already decoded: only its conversion
        problem = image_problem(picture)
        if problem is not None:
            problems.append((Path("<PIL.Image>"), problem))
    unique = list(dict.fromkeys(Path(os.fspath(p)).expanduser() for p in items if not isinstance(p, Image.Image)))
    bar = None
    if progress and len(unique) >= _BIG_SET:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(unique), unit="image", desc="checking images", dynamic_ncols=True, leave=False)
    try:
        for path in unique:
            try:
                stat = path.stat()
            except OSError as exc:
                raise ImageError(f"{what} {path}: {'no such file' if not path.exists() else exc.strerror}") from None
            if path.is_dir():
                raise ImageError(f"{what} {path}: is a directory, expected an image file")
            key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
            if key not in _CHECKED:
                _CHECKED[key] = image_problem(decode_image(path, what))
            if _CHECKED[key] is not None:
                problems.append((path, _CHECKED[key]))
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    _warn(problems, what)


def load_images(image: Any) -> list:
    """Images as a list of RGB ``PIL.Image``, each decoded fully (a damaged file fails here, naming it). An image
    whose RGB conversion is wrong (:func:`image_problem`) gets an :class:`ImageWarning`; the conversion is still
    ``convert("RGB")``, the one the reference evaluation scripts feed their models, so that answers stay comparable.

    Args:
        image: a path, a ``PIL.Image``, or a list of them.

    Raises:
        FileNotFoundError: a path that does not exist.
        ValueError: an empty list; :class:`ImageError` (a ``ValueError``): a directory, a file that is not an image,
            a truncated file or a decompression-bomb header.
    """
    return _read_images(image, warn=True)


def _read_images(image: Any, *, warn: bool) -> list:
    from PIL import Image

    items = list(image) if isinstance(image, (list, tuple)) else [image]
    if not items:
        raise ValueError("--image: no image given")
    out, problems = [], []
    for item in items:
        if isinstance(item, Image.Image):
            picture, where = item, Path("<PIL.Image>")
        else:
            where = Path(os.fspath(item)).expanduser()
            if where.is_dir():
                raise ImageError(f"--image {item}: is a directory, expected an image file")
            if not where.is_file():
                raise FileNotFoundError(f"--image {item}: no such file")
            picture = decode_image(where, "--image")
        problem = image_problem(picture) if warn else None
        if problem is not None:
            problems.append((where, problem))
        out.append(picture.convert("RGB"))
    if problems:
        _warn(problems, "--image")
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
        prompts, groups = [prompts], [images if isinstance(images, (list, tuple)) else [images]]
    else:
        if len(images) != len(prompts) or not prompts:
            raise ValueError(f"expected one image entry per prompt, got {len(images)} for {len(prompts)} prompts")
        groups = [list(item) if isinstance(item, (list, tuple)) else [item] for item in images]
        if any(not g for g in groups):
            raise ValueError("every prompt needs at least one image")
    inputs = _processor_inputs(processor, model.config, groups, prompts)
    param = next(model.parameters(), None)
    dev = torch.device(device) if device is not None else (param.device if param is not None else torch.device("cpu"))
    dtype = param.dtype if param is not None and param.is_floating_point() else None
    return inputs.to(device=dev, dtype=dtype) if dtype is not None else inputs.to(device=dev)


def image_token_counts(processor: Any, config: Any, images: Sequence[Any], prompts: Sequence[str]) -> list[int]:
    """Image tokens in each of ``B`` prompts as the processor expands them (``config``: the model's config, for its
    placeholder ids; no weights needed), e.g. a 24 x 24 grid per LLaVA-1.5 image.

    Args:
        images, prompts: ``B`` each, as for :func:`build_inputs`.

    Returns:
        ``B`` counts.
    """
    groups = [list(item) if isinstance(item, (list, tuple)) else [item] for item in images]
    inputs = _processor_inputs(processor, config, groups, list(prompts))
    placeholders = torch.tensor(get_adapter(config).placeholder_token_ids(config))
    return [int(n) for n in torch.isin(inputs["input_ids"], placeholders).sum(dim=1)]


def _processor_inputs(processor: Any, config: Any, groups: list[list[Any]], prompts: list[str]) -> Any:
    """The processor's CPU tensors for ``B`` prompts, each about its group of images (see :func:`build_inputs`)."""
    adapter = get_adapter(config)
    pictures = _read_images([im for g in groups for im in g], warn=False)  # checked by the caller's checker
    texts = [prompt_text(processor, adapter.family, p, len(g)) for p, g in zip(prompts, groups, strict=True)]
    placeholders = torch.tensor(adapter.placeholder_token_ids(config))
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
        if adapter.nested_images:  # one list per prompt
            ends = torch.tensor([len(g) for g in groups]).cumsum(0).tolist()
            pictures = [pictures[end - len(g):end] for g, end in zip(groups, ends, strict=True)]
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
    return inputs
