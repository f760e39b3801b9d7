"""The protocol behind a task's numbers, written into every score (``metrics.json`` of ``flowkern eval`` and of each
sweep point, and ``flowkern score``'s output) so that two runs can be compared without guessing: the data source
(official JSON or tables; path, or dataset id and revision; subset and split), the answer-parsing rule, the prompt
template and whether OCR tokens are in the prompt.

POPE and TextVQA numbers in the literature disagree mostly through these: lenient (LLaVA) or strict (lmms-eval)
yes/no parsing, and TextVQA with or without the OCR-token line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flowkern.eval.tasks import base, chair, pope, sqa, textvqa
from flowkern.eval.tasks.base import Task

__all__ = ["protocol", "PARSING", "PROMPTS"]

PROMPTS: dict[str, str] = {
    "pope": "{question}" + pope.PROMPT_SUFFIX,
    "sqa": "[Context: {hint}\n]{question}\n{A. choice}\n{B. choice}..." + sqa.PROMPT_SUFFIX,
    "textvqa": "{question}" + textvqa.PROMPT_SUFFIX,
    "textvqa+ocr": "{question}" + textvqa.OCR_PREFIX + "{tok1}, {tok2}, ..." + textvqa.PROMPT_SUFFIX,
    "chair": chair.PROMPT,
}
"""Each task's prompt template (the user text, before the model's chat template; ``[...]`` only when there is a
hint)."""

PARSING: dict[str, str] = {
    "pope": "lenient (LLaVA eval_pope)",
    "pope+strict": "strict (lmms-eval)",
    "sqa": "option letter (lmms-eval sqa_process_results)",
    "textvqa": "EvalAI normalisation, VQA soft accuracy (m4c TextVQAAccuracyEvaluator)",
    "chair": "CHAIR object words (lemminflect singularisation)",
}
"""Each task's answer-parsing rule (see the task modules)."""


def _resolved(path: Any) -> str:
    return str(Path(path).expanduser().resolve())


def _source(task: Task) -> dict[str, Any]:
    describe = getattr(task, "describe_source", None)
    if describe is not None:
        return describe()
    if isinstance(task, pope.PopeTask):
        return {"format": "official json", "path": [_resolved(p) for _, p in task.files], "split": task.splits}
    if isinstance(task, sqa.SqaTask):
        return {"format": "official json", "path": _resolved(task.data), "split": [task.split]}
    if isinstance(task, textvqa.TextVqaTask):
        return {"format": "official json", "path": _resolved(task.annotation_file), "split": ["val"]}
    if isinstance(task, chair.ChairTask):
        return {"format": "official json", "path": [_resolved(task.instances_file), _resolved(task.captions_file)],
                "split": ["val2014"]}
    return {"format": "unknown"}


def protocol(task: Task) -> dict[str, Any]:
    """``{"source": {...}, "parsing": ..., "prompt": ..., "ocr": ...}`` of a task (``ocr`` is None for the tasks
    without an OCR option)."""
    ocr = bool(getattr(task, "ocr", False)) if task.name == "textvqa" else None
    prompt = PROMPTS.get(f"{task.name}+ocr" if ocr else task.name, "")
    parsing = PARSING.get(f"{task.name}+strict" if getattr(task, "strict", False) else task.name, "")
    return {"source": _source(task), "parsing": parsing, "prompt": prompt, "ocr": ocr}


base.describe_protocol = protocol
