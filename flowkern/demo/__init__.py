"""The embedded demo model: a tiny LLaVA trained on the synthetic shapes world (:mod:`flowkern.shapes`).

``flowkern.demo_model_path()`` is the folder of the shipped checkpoint (``save_pretrained`` layout: config,
safetensors, tokenizer, image processor, chat template), so

.. code-block:: python

    from transformers import AutoProcessor, LlavaForConditionalGeneration
    model = LlavaForConditionalGeneration.from_pretrained(flowkern.demo_model_path(), use_kernels=False)

and ``--model demo`` on the command line work offline (``use_kernels=False`` keeps transformers >= 5.25 from
swapping hub kernels into the layers, which fails without the ``kernels`` package).
`make demo-model` (``tools/demo_model``) retrains it, :mod:`flowkern.demo.quality` measures it on fresh shapes sets.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["demo_model_path", "resolve_model", "shadowed_demo", "DEMO_MODEL_NAME"]

DEMO_MODEL_NAME = "demo"
"""What ``--model`` accepts for the shipped model."""


def demo_model_path() -> Path:
    """The directory of the shipped demo model (``flowkern/demo/model``).

    Raises:
        FileNotFoundError: the package was installed without its model files (package data missing).
    """
    path = Path(__file__).resolve().parent / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"--model demo: the demo model files are missing from {path} (an install without package data?); "
            "retrain them with `make demo-model` (a clone of the repository) or pass --model DIR"
        )
    return path


def resolve_model(model: str | os.PathLike[str]) -> str:
    """What to load for ``model`` (a ``--model`` value): the shipped model's folder for :data:`DEMO_MODEL_NAME`,
    always (a folder named ``demo`` in the working directory is ``./demo``: :func:`shadowed_demo` tells when one
    exists), else ``model`` as given.

    Raises:
        FileNotFoundError: ``"demo"`` in an install without the model files.
    """
    model = os.fspath(model)
    if model == DEMO_MODEL_NAME:
        return str(demo_model_path())
    return model


def shadowed_demo(model: str | os.PathLike[str]) -> str | None:
    """For ``--model demo`` while a path ``demo`` exists in the working directory: a note that the shipped model is
    loaded and how to load the local one; else None."""
    if os.fspath(model) == DEMO_MODEL_NAME and Path(DEMO_MODEL_NAME).exists():
        return (f"--model demo is the shipped demo model; the {Path(DEMO_MODEL_NAME).absolute()} in the working "
                "directory is not loaded (pass --model ./demo for it)")
    return None
