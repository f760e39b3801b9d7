"""Benchmark task scoring: the official release files read, prompts built, answers parsed and scored the way the
community scores them. Pure Python: nothing here imports torch or transformers.

Tasks (:data:`TASKS`): ``pope`` (:mod:`flowkern.eval.tasks.pope`), ``sqa`` (:mod:`flowkern.eval.tasks.sqa`),
``textvqa`` (:mod:`flowkern.eval.tasks.textvqa`), ``chair`` (:mod:`flowkern.eval.tasks.chair`). Each module's
docstring gives the data layout, the prompt, the answer parsing and the metrics; :mod:`flowkern.eval.tasks.base`
holds the :class:`Task` interface and the answer-file reader.
"""

from __future__ import annotations

import os
from typing import Any

from flowkern.eval.tasks.base import Prediction, Sample, Task, read_predictions
from flowkern.eval.tasks.chair import ChairTask
from flowkern.eval.tasks.lmms_lab import table_task
from flowkern.eval.tasks.parquet import is_table_source
from flowkern.eval.tasks.pope import PopeTask
from flowkern.eval.tasks.protocol import protocol
from flowkern.eval.tasks.sqa import SqaTask
from flowkern.eval.tasks.textvqa import TextVqaTask

__all__ = ["TASKS", "get_task", "protocol", "Task", "Sample", "Prediction", "read_predictions",
           "PopeTask", "SqaTask", "TextVqaTask", "ChairTask"]

TASKS: dict[str, type[Task]] = {"pope": PopeTask, "sqa": SqaTask, "textvqa": TextVqaTask, "chair": ChairTask}
"""Task name -> class: the benchmarks ``flowkern eval``, ``flowkern score`` and ``flowkern sweep`` take."""


def get_task(name: str, data: str | os.PathLike[str], images: str | os.PathLike[str] | None = None,
             **options: Any) -> Task:
    """The task ``name`` reading ``data`` (options: ``strict`` for pope, ``ocr`` for textvqa, ``split`` for sqa and
    for table data).

    ``data`` is the benchmark's official files, or tables (a parquet / Arrow file, a folder of them, a dataset id
    such as ``lmms-lab/POPE`` in the local Hugging Face cache): :mod:`flowkern.eval.tasks.lmms_lab`.

    ``ValueError`` for an unknown task name (listing the known ones) or an option the task does not take.
    """
    if name not in TASKS:
        raise ValueError(f"--task: unknown task {name!r} (choose from {', '.join(TASKS)})")
    cls = TASKS[name]
    try:
        if is_table_source(data):
            return table_task(name, data, images, **options)
        if options.get("split", "") is None:
            options = {k: v for k, v in options.items() if k != "split"}
        return cls(data, images, **options)
    except TypeError as exc:
        if "unexpected keyword argument" in str(exc):
            raise ValueError(f"--task {name}: {exc}") from None
        raise
