"""ScienceQA-IMG (Lu et al., 2022): multiple-choice science questions, the test split's questions with an image.

Data: the ScienceQA release folder — ``problems.json`` (pid -> question, choices, answer index, hint, image, ...),
``pid_splits.json`` (split -> list of pids) and ``images/test/<pid>/image.png`` (LLaVA's
``playground/data/eval/scienceqa`` layout). 2017 questions in the official test split have an image.

Prompt (lmms-eval ``scienceqa_img``, the LLaVA-1.5 format)::

    Context: {hint}            <- only when the hint is not empty
    {question}
    A. {choice 0}
    B. {choice 1}
    Answer with the option's letter from the given choices directly.

Predictions are matched by pid. LLaVA's answer files (``model_vqa_science`` on ``llava_test_CQM-A.json``) cover the
whole test split, text-only problems included; as LLaVA's ``eval_science_qa.py`` reads only the problems it scores,
predictions for problems of any ``pid_splits.json`` split that this task does not score are ignored and counted
(``ignored`` in the metrics); an id in no split at all is an error.

Answer parsing = lmms-eval's ``sqa_process_results``: the stripped answer is right if it equals the target letter
ignoring case (``"B"``, ``"b"``, ``" B "``), or if it starts with an upper-case letter followed by ``"."`` and that
letter is the target (``"B."``, ``"B. sunlight"``); anything else is wrong (``"b."``, ``"(B)"``,
``"The answer is B."``, the empty answer). Metric: accuracy; ``by_category``: the accuracy per ``problems.json``
``category`` (``{category: {"accuracy", "correct", "n"}}``, when the problems have one).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from flowkern.eval.tasks.base import Sample, Task, json_type, ratio, read_json, row_field

__all__ = ["SqaTask", "parse_option", "build_prompt", "PROMPT_SUFFIX"]

PROMPT_SUFFIX = "\nAnswer with the option's letter from the given choices directly."


def build_prompt(question: str, choices: list[str], hint: str | None) -> str:
    """The LLaVA-1.5 / lmms-eval ScienceQA prompt (see the module docstring)."""
    options = "\n".join(f"{chr(ord('A') + i)}. {choice}" for i, choice in enumerate(choices))
    context = f"Context: {hint}\n" if hint else ""
    return f"{context}{question}\n{options}{PROMPT_SUFFIX}"


def parse_option(text: str) -> str | None:
    """The option letter lmms-eval reads from an answer (upper case), or None when it reads none.

    A lone letter in either case counts (``"b"`` -> ``"B"``); otherwise an upper-case letter followed by ``"."``
    at the start (``"B. xyz"`` -> ``"B"``). A lone non-letter, ``"b."`` or ``"The answer is B."`` give None.
    """
    pred = text.strip()
    if len(pred) == 1 and pred.isalpha():
        return pred.upper()
    if len(pred) >= 2 and pred[0].isupper() and pred[1] == ".":
        return pred[0]
    return None


class SqaTask(Task):
    """ScienceQA, one split (default ``test``), questions with an image only (``image_only=False`` keeps all).

    ``data``: the folder with ``problems.json`` and ``pid_splits.json``. ``images``: the folder holding
    ``<split>/<pid>/image.png`` (default ``<data>/images``).
    """

    name = "sqa"

    def __init__(self, data: str | os.PathLike[str], images: str | os.PathLike[str] | None = None, *,
                 split: str = "test", image_only: bool = True) -> None:
        super().__init__()
        self.data = Path(data)
        if self.data.is_file():
            self.data = self.data.parent
        if not self.data.is_dir():
            raise FileNotFoundError(f"--data: {self.data} not found (expected the ScienceQA folder with "
                                    f"problems.json and pid_splits.json)")
        self.images = Path(images) if images is not None else self.data / "images"
        self.split = split
        self.image_only = image_only
        self._split_pids: set[str] = set()

    def _load(self) -> list[Sample]:
        problems_file, splits_file = self.data / "problems.json", self.data / "pid_splits.json"
        problems = read_json(problems_file)
        splits = read_json(splits_file)
        if not isinstance(problems, dict):
            raise ValueError(f"--data: {problems_file}: expected an object pid -> problem")
        if not isinstance(splits, dict) or self.split not in splits:
            names = ", ".join(sorted(splits)) if isinstance(splits, dict) else "none"
            raise ValueError(f"--data: {splits_file}: no split {self.split!r} (has {names})")
        self._split_pids = set()
        for name, pids in splits.items():
            row_field(splits, name, "list", f"--data: {splits_file}", empty=True)
            for i, pid in enumerate(pids):
                row_field({"pid": pid}, "pid", "id", f"--data: {splits_file}: {name}[{i}]")
            self._split_pids.update(str(pid).strip() for pid in pids)
        samples = []
        for pid in splits[self.split]:
            pid = str(pid).strip()
            if pid not in problems:
                raise ValueError(f"--data: pid_splits.json lists {pid!r}, which is not in problems.json")
            sample = self._sample(pid, problems[pid], f"--data: {problems_file}: {pid}")
            if sample is not None:
                samples.append(sample)
        return samples

    def _sample(self, pid: str, prob: Any, where: str) -> Sample | None:
        """The sample of problem ``pid`` (None: a text-only problem while ``image_only``), its fields checked."""
        question = row_field(prob, "question", "string", where)
        choices = row_field(prob, "choices", "list", where)
        for i, choice in enumerate(choices):
            if isinstance(choice, bool) or not isinstance(choice, str | int | float):
                raise ValueError(f"{where}: choices[{i}] must be a string, got {json_type(choice)}")
        answer = row_field(prob, "answer", "int", where)
        image = row_field(prob, "image", "string", where, optional=True)
        hint = row_field(prob, "hint", "string", where, optional=True, empty=True)
        category = row_field(prob, "category", "string", where, optional=True, empty=True)
        if self.image_only and image is None:
            return None
        choices = [str(c) for c in choices]
        if not 0 <= answer < len(choices):
            raise ValueError(f"{where}: answer {answer!r} is not an index into its {len(choices)} choices")
        return Sample(
            id=pid,
            key=pid,
            image=self.images / self.split / pid / image if image else None,
            prompt=build_prompt(question, choices, hint),
            reference=chr(ord("A") + answer),
            split=self.split,
            meta={"question": question, "choices": choices, "category": category},
        )

    def outside_subset(self, key: str) -> bool:
        """A problem of some ``pid_splits.json`` split that is not scored here (a text-only problem, another split):
        LLaVA's answer files cover the whole test split, text-only problems included, and its scorer reads only the
        problems it scores. An id in no split is still an error."""
        self.samples  # noqa: B018 - load
        return key in self._split_pids

    def parse(self, text: str) -> str | None:
        """The option letter read from the answer, or None (see :func:`parse_option`)."""
        return parse_option(text)

    def _metrics(self, pairs: list[tuple[Sample, str]]) -> dict[str, Any]:
        right = [parse_option(text) == sample.reference for sample, text in pairs]
        by: dict[str, list[bool]] = {}
        for (sample, _), ok in zip(pairs, right, strict=True):
            if sample.meta.get("category") is not None:
                by.setdefault(str(sample.meta["category"]), []).append(ok)
        metrics: dict[str, Any] = {"accuracy": ratio(sum(right), len(pairs)), "correct": sum(right)}
        if by:  # problems.json's `category` (ScienceQA: e.g. "Weather and climate"; shapes-SQA: the problem kind)
            metrics["by_category"] = {c: {"accuracy": ratio(sum(v), len(v)), "correct": sum(v), "n": len(v)}
                                      for c, v in sorted(by.items())}
        return metrics
