"""Benchmarks from their official release files, scored the way the community scores them, and the engines that
run models on them.

.. code-block:: python

    from flowkern.eval import get_task

    task = get_task("pope", "playground/data/eval/pope/coco")     # a folder of coco_pope_*.json, or one file
    for sample in task.samples:                                     # id, key, image, prompt, reference, split
        ...
    metrics = task.score(task.read_predictions("answers.jsonl"))   # {"accuracy": ..., "f1": ..., ...}

Two layers: :mod:`flowkern.eval.tasks` reads, parses and scores (pure Python, no torch; :data:`TASKS`, the
names re-exported here); :mod:`flowkern.eval.run` and :mod:`flowkern.eval.sweep` load models and answer the
samples. Importing this package loads the scoring layer only.
"""

from __future__ import annotations

from flowkern.eval.tasks import (
    TASKS,
    ChairTask,
    PopeTask,
    Prediction,
    Sample,
    SqaTask,
    Task,
    TextVqaTask,
    get_task,
    read_predictions,
)

__all__ = ["TASKS", "get_task", "Task", "Sample", "Prediction", "read_predictions",
           "PopeTask", "SqaTask", "TextVqaTask", "ChairTask"]
