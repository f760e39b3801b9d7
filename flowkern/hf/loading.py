"""Load a supported VLM and its processor from a local directory or the Hugging Face cache.

Shared by every command that runs a model (and usable from Python; images and inputs come from
:mod:`flowkern.hf.inputs`, whose :func:`~flowkern.hf.inputs.build_inputs` and
:func:`~flowkern.hf.inputs.load_images` this module re-exports):

.. code-block:: python

    model, processor = load_model("llava-hf/llava-1.5-7b-hf", device="cuda", dtype="bfloat16")
    images = load_images("cat.jpg")
    inputs = build_inputs(processor, model, images, "What is in the image?")
    out = model.generate(**inputs, max_new_tokens=16, do_sample=False)

Nothing is ever downloaded: every ``from_pretrained`` call passes ``local_files_only=True``, so a hub id works
only when its files are already in the Hugging Face cache (``hf download <id>`` first). No ``trust_remote_code``:
only transformers' built-in model classes of the families in :func:`flowkern.hf.models.supported_model_types`.

Errors a user can fix are raised as ``FileNotFoundError`` (missing directory, files, image) or ``ValueError``
(unsupported model family, bad dtype/device, a prompt without an image slot), with messages that name the
command-line option (``--model``, ``--image``, ...) so that a CLI can print them as they are.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from flowkern.hf.inputs import build_inputs, load_images

__all__ = [
    "load_model", "input_image", "position_range_message", "resolve_device", "resolve_dtype", "auto_model_class",
    "build_inputs", "load_images",
]
"""``build_inputs`` and ``load_images`` live in :mod:`flowkern.hf.inputs`; they are importable from here too, so
that loading a model and building its inputs is one import."""

try:  # what safetensors raises for a truncated or corrupt file (its header or tensor offsets do not add up)
    from safetensors import SafetensorError as _SafetensorError

    _CORRUPT_WEIGHTS: tuple[type[BaseException], ...] = (_SafetensorError,)
except ImportError:  # pragma: no cover - safetensors is a dependency
    _CORRUPT_WEIGHTS = ()

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


# ----------------------------------------------------------------------------------------------------------
# model


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` as a ``torch.device``.

    Raises:
        ValueError: an unknown device, or CUDA asked for but not available.
    """
    if isinstance(device, str) and device.strip().lower() == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"--device {device!r}: expected auto, cpu, cuda or cuda:N") from exc
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device!r}: flowkern runs on cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is available (use --device cpu)")
    return dev


def resolve_dtype(dtype: str | torch.dtype, device: torch.device, checkpoint_dtype: str | None = None) -> torch.dtype:
    """The weights' dtype: a ``torch.dtype`` or name (``float32``, ``float16``, ``bfloat16``); ``"auto"`` is float32
    on CPU (half-precision matmuls are slow there) and the checkpoint's dtype on CUDA (bfloat16 if it is float32
    or unknown).

    Raises:
        ValueError: an unknown dtype name.
    """
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"--dtype {dtype}: expected float32, float16 or bfloat16")
        return dtype
    name = str(dtype).strip().lower().removeprefix("torch.")
    if name == "auto":
        if device.type == "cpu":
            return torch.float32
        ckpt = _DTYPES.get(str(checkpoint_dtype or "").removeprefix("torch."))
        return ckpt if ckpt in (torch.float16, torch.bfloat16) else torch.bfloat16
    if name not in _DTYPES:
        raise ValueError(f"--dtype {dtype!r}: expected auto, float32, float16 or bfloat16")
    return _DTYPES[name]


def _locate(model: str) -> tuple[str, dict]:
    """(directory or hub id to load from, the raw config.json) without any network access."""
    path = Path(model).expanduser()
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(
                f"--model {model}: the directory has no config.json (expected a model saved with save_pretrained)"
            )
        return str(path), json.loads(config_file.read_text())
    if path.exists():
        raise FileNotFoundError(f"--model {model}: is a file; expected a model directory or a hub id")
    looks_like_path = model.startswith((".", "/", "~")) or "\\" in model or model.count("/") > 1
    if not looks_like_path:  # a hub id: only from the local cache, never downloaded
        from transformers.utils import cached_file

        try:
            config_file = cached_file(model, "config.json", local_files_only=True)
        except Exception:  # OSError when not cached, HFValidationError (a ValueError) for a malformed id
            config_file = None
        if config_file:
            return model, json.loads(Path(config_file).read_text())
        raise FileNotFoundError(
            f"--model {model}: no such directory, and not in the Hugging Face cache; flowkern never downloads: "
            f"run `hf download {model}` first, or pass a local directory"
        )
    raise FileNotFoundError(f"--model {model}: no such directory")


def _check_supported(model: str, raw_config: dict) -> str:
    from flowkern.hf.models import supported_model_types

    model_type = raw_config.get("model_type")
    supported = supported_model_types()
    if model_type in supported:
        return model_type
    hint = ""
    if raw_config.get("auto_map"):
        hint = (
            " (it ships its own modeling code, which needs trust_remote_code; flowkern runs transformers' "
            "built-in models only)"
        )
    raise ValueError(
        f"--model {model}: model type {model_type!r} is not supported{hint}; supported: {', '.join(supported)}"
    )


def auto_model_class(config: Any) -> Any:
    """The transformers Auto class (``AutoModelForImageTextToText``, else ``AutoModelForVision2Seq``) that maps this
    config to its image-text-to-text model.

    Raises:
        ValueError: neither maps the config's type.
    """
    import transformers

    for name in ("AutoModelForImageTextToText", "AutoModelForVision2Seq"):
        cls = getattr(transformers, name, None)
        if cls is not None and type(config) in cls._model_mapping:
            return cls
    raise ValueError(f"transformers has no image-text-to-text model class for model type {config.model_type!r}")


def load_model(
    model: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "auto",
    attn_implementation: str | None = "sdpa",
) -> tuple[torch.nn.Module, Any]:
    """Load a supported VLM and its processor, from a local directory or the Hugging Face cache (never the network).

    Args:
        model: a directory written by ``save_pretrained`` (model + processor files) or a hub id such as
            ``"llava-hf/llava-1.5-7b-hf"`` whose files are already cached.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"``.
        dtype: weights dtype, see :func:`resolve_dtype` (``"auto"``: float32 on CPU, the checkpoint's on CUDA).
        attn_implementation: the attention of every sub-model until :func:`flowkern.trace` switches the language
            model (default ``"sdpa"``; falls back to transformers' default where a sub-model has no SDPA).

    Returns:
        ``(model, processor)``: the model in eval mode on ``device`` (its class chosen by transformers'
        ``AutoModelForImageTextToText`` mapping) and its ``AutoProcessor`` (tokenizer padding on the left).

    Raises:
        FileNotFoundError: no such directory, a hub id that is not cached, or missing weight/processor files.
        ValueError: the model family is not supported (the message lists the supported ones), bad device/dtype.
        ImportError: the processor needs a package that is not installed (e.g. torchvision for a video processor).
    """
    import transformers

    from flowkern.hf.compat import pretrained_kwargs

    model = os.fspath(model)
    source, raw_config = _locate(model)
    _check_supported(model, raw_config)
    dev = resolve_device(device)
    text_raw = raw_config.get("text_config") or {}
    ckpt_dtype = raw_config.get("dtype") or raw_config.get("torch_dtype") or text_raw.get("dtype") or text_raw.get(
        "torch_dtype")
    torch_dtype = resolve_dtype(dtype, dev, ckpt_dtype)

    config = transformers.AutoConfig.from_pretrained(source, local_files_only=True)
    auto = auto_model_class(config)
    kwargs: dict[str, Any] = dict(config=config, dtype=torch_dtype, local_files_only=True, **pretrained_kwargs())
    try:
        try:
            net = auto.from_pretrained(source, attn_implementation=attn_implementation, **kwargs)
        except ValueError as exc:  # a sub-model without the requested attention: transformers' default instead
            if attn_implementation is None or attn_implementation not in str(exc).lower():
                raise
            net = auto.from_pretrained(source, **kwargs)
    except OSError as exc:
        raise FileNotFoundError(f"--model {model}: could not load the weights ({exc})") from exc
    except _CORRUPT_WEIGHTS as exc:  # a truncated or corrupt weights file
        raise ValueError(f"--model {model}: the weights file is corrupt or truncated ({type(exc).__name__}: {exc})") \
            from exc
    net = net.to(dev).eval()

    try:
        processor = transformers.AutoProcessor.from_pretrained(source, local_files_only=True)
    except ImportError as exc:  # transformers' message spans lines (torchvision's): one line, the package named
        raise ImportError(f"--model {model}: its processor needs a package that is not installed: "
                          f"{' '.join(str(exc).split())}") from exc
    except OSError as exc:
        raise FileNotFoundError(f"--model {model}: could not load the processor files ({exc})") from exc
    if getattr(processor, "image_processor", None) is None:
        raise FileNotFoundError(
            f"--model {model}: found a {type(processor).__name__} but no image processor "
            "(preprocessor_config.json / processor_config.json missing?)"
        )
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is not None:
        tokenizer.padding_side = "left"  # batched generate appends on the right
    return net, processor


# ----------------------------------------------------------------------------------------------------------
# about the inputs


def position_range_message(model: torch.nn.Module, total_tokens: int) -> str | None:
    """A warning when a run of ``total_tokens`` positions (prompt + new tokens) exceeds the language model's
    ``max_position_embeddings`` (positions past it were never trained; RoPE extrapolates silently), else None."""
    from flowkern.hf.models import get_adapter

    limit = getattr(get_adapter(model).text_config(model.config), "max_position_embeddings", None)
    if isinstance(limit, int) and total_tokens > limit:
        return (f"the run needs {total_tokens} positions (prompt + new tokens) but the model was trained on at most "
                f"max_position_embeddings={limit}: the answer past that is extrapolated and may be garbage")
    return None


def input_image(processor: Any, inputs: Any, images: Sequence[Any], index: int = 0) -> Any:
    """The picture a heatmap of image ``index`` should be drawn on: what the model saw of that image.

    When ``pixel_values`` hold one ``[3, H, W]`` tensor per image (LLaVA-1.5 style: resized and centre-cropped),
    it is un-normalised back to an RGB image, so the token grid lines up exactly. Otherwise (multi-view / tiled /
    patchified inputs, whose base view covers the whole image) the original image is returned.

    Returns:
        an RGB ``PIL.Image``.
    """
    import numpy as np
    from PIL import Image

    original = images[index]
    pv = inputs.get("pixel_values") if hasattr(inputs, "get") else None
    ip = getattr(processor, "image_processor", None)
    if not isinstance(pv, torch.Tensor) or pv.dim() != 4 or pv.shape[0] != len(images) or pv.shape[1] != 3:
        return original
    mean, std = getattr(ip, "image_mean", None), getattr(ip, "image_std", None)
    if mean is None or std is None or not getattr(ip, "do_normalize", True):
        return original
    x = pv[index].detach().float().cpu()
    x = x * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)
    scale = float(getattr(ip, "rescale_factor", 1 / 255) or 1 / 255) if getattr(ip, "do_rescale", True) else 1.0
    x = (x / scale).clamp(0, 255).round().to(torch.uint8)
    return Image.fromarray(np.ascontiguousarray(x.permute(1, 2, 0).numpy()))
