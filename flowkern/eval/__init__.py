"""Benchmarks from their official release files, scored the way the community scores them.

.. code-block:: python

    from flowkern.eval import get_task

    task = get_task("pope", "playground/data/eval/pope/coco")     # a folder of coco_pope_*.json, or one file
    for sample in task.samples:                                     # id, key, image, prompt, reference, split
        ...
    metrics = task.score(task.read_predictions("answers.jsonl"))   # {"accuracy": ..., "f1": ..., ...}

Tasks (:data:`TASKS`): ``pope`` (:mod:`flowkern.eval.pope`), ``sqa`` (:mod:`flowkern.eval.sqa`), ``textvqa``
(:mod:`flowkern.eval.textvqa`), ``chair`` (:mod:`flowkern.eval.chair`). Each module's docstring gives the data
layout, the prompt, the answer parsing and the metrics. Nothing here imports torch or transformers.
"""

from __future__ import annotations

import os
from typing import Any

from flowkern.eval.base import Prediction, Sample, Task, read_predictions
from flowkern.eval.chair import ChairTask
from flowkern.eval.pope import PopeTask
from flowkern.eval.sqa import SqaTask
from flowkern.eval.textvqa import TextVqaTask

__all__ = ["TASKS", "get_task", "Task", "Sample", "Prediction", "read_predictions",
           "PopeTask", "SqaTask", "TextVqaTask", "ChairTask"]

TASKS: dict[str, type[Task]] = {"pope": PopeTask, "sqa": SqaTask, "textvqa": TextVqaTask, "chair": ChairTask}
"""Task name -> class."""


def get_task(name: str, data: str | os.PathLike[str], images: str | os.PathLike[str] | None = None,
             **options: Any) -> Task:
    """The task ``name`` reading ``data`` (options: ``strict`` for pope, ``ocr`` for textvqa, ``split`` for sqa).

    ``ValueError`` for an unknown task name (listing the known ones) or an option the task does not take.
    """
    if name not in TASKS:
        raise ValueError(f"--task: unknown task {name!r} (choose from {', '.join(TASKS)})")
    cls = TASKS[name]
    try:
        return cls(data, images, **options)
    except TypeError as exc:
        if "unexpected keyword argument" in str(exc):
            raise ValueError(f"--task {name}: {exc}") from None
        raise
