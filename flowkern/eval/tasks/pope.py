"""POPE (Li et al., 2023): "Is there a <object> in the image?" on COCO val2014, yes/no answers.

Data: the official question files ``coco_pope_{random,popular,adversarial}.json`` (JSON lines with ``question_id``,
``image``, ``text``, ``label``) — one file, or a folder holding them (also looked up in ``<folder>/coco/``, LLaVA's
``playground/data/eval/pope`` layout), which scores each split. Images: COCO val2014 (``COCO_val2014_*.jpg``).

Prompt (LLaVA-1.5's ``model_vqa_loader``): ``"{text}\\nAnswer the question using a single word or phrase."``

Answer parsing:

- lenient (default) = LLaVA's ``eval_pope.py``: keep the text before the first ``"."``, drop commas, split on single
  spaces; if one of the words is exactly ``No``, ``no`` or ``not`` the answer is *no*, otherwise *yes* (so ``"NO"``,
  ``"Nope"`` and the empty answer are *yes*).
- strict = lmms-eval's ``pope`` task: ``text.lower().strip()`` must equal the label; an answer that is neither
  ``yes`` nor ``no`` is wrong for accuracy, never a positive for precision, and — lmms-eval's rule — left out of
  recall's denominator (a false negative is ``label yes, answer exactly "no"``).

Metrics: accuracy, precision, recall, f1 (positive class = yes) and yes_ratio, the share of *predictions* that are
yes (lmms-eval's ``pope_yes_ratio`` counts labels instead; we follow LLaVA). A zero denominator gives 0.0 (LLaVA's
script raises). Several splits: the top level is pooled over every scored prediction, ``splits`` has each split
and ``split_mean`` the unweighted mean over splits (LLaVA-1.5 reports the mean F1 of the three splits).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from flowkern.eval.tasks.base import Prediction, Sample, Task, id_key, ratio, read_jsonl, row_field

__all__ = ["PopeTask", "parse_lenient", "parse_strict", "pope_metrics", "POPE_SPLITS", "PROMPT_SUFFIX"]

POPE_SPLITS = ("adversarial", "popular", "random")
PROMPT_SUFFIX = "\nAnswer the question using a single word or phrase."
_FILE = re.compile(r"^coco_pope_(?P<split>[A-Za-z0-9_-]+)\.json$")
METRIC_KEYS = ("accuracy", "precision", "recall", "f1", "yes_ratio")


def parse_lenient(text: str) -> str:
    """LLaVA ``eval_pope``: ``"no"`` if the first sentence has the word ``No``, ``no`` or ``not``, else ``"yes"``."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def parse_strict(text: str) -> str:
    """lmms-eval parsing: the lower-cased, stripped text (``"yes"``, ``"no"`` or anything else)."""
    return text.lower().strip()


def pope_metrics(answers: list[str], labels: list[str]) -> dict[str, Any]:
    """Accuracy, precision, recall, f1, yes_ratio of parsed answers against ``"yes"``/``"no"`` labels.

    Answers other than yes/no (strict parsing) follow lmms-eval: wrong, never a positive, and not a false
    negative. ``counts`` has tp, fp, tn, fn and ``other`` (answers that are neither yes nor no).
    """
    tp = fp = tn = fn = other = correct = 0
    for answer, label in zip(answers, labels, strict=True):
        correct += answer == label
        if answer == "yes":
            if label == "yes":
                tp += 1
            else:
                fp += 1
        elif answer == "no":
            if label == "no":
                tn += 1
            else:
                fn += 1
        else:
            other += 1
    n = len(answers)
    precision = ratio(tp, tp + fp)
    recall = ratio(tp, tp + fn)
    return {
        "accuracy": ratio(correct, n),
        "precision": precision,
        "recall": recall,
        "f1": ratio(2 * precision * recall, precision + recall),
        "yes_ratio": ratio(tp + fp, n),
        "counts": {"tp": tp, "fp": fp, "tn": tn, "fn": fn, "other": other},
    }


def _question_files(data: Path) -> list[tuple[str, Path]]:
    if data.is_file():
        m = _FILE.match(data.name)
        return [(m.group("split") if m else data.stem, data)]
    if not data.exists():
        raise FileNotFoundError(f"--data: {data} not found")
    for folder in (data, data / "coco"):
        found = sorted((m.group("split"), folder / name) for name in os.listdir(folder) if (m := _FILE.match(name))) \
            if folder.is_dir() else []
        if found:
            return found
    raise FileNotFoundError(f"--data: no POPE question file coco_pope_{{random,popular,adversarial}}.json in {data}")


class PopeTask(Task):
    """POPE from its official question file(s); see the module docstring for parsing and metrics.

    ``data``: a ``coco_pope_<split>.json`` file or a folder of them. ``images``: the COCO val2014 folder (only for
    ``Sample.image``). ``strict``: lmms-eval parsing instead of LLaVA's.
    """

    name = "pope"

    def __init__(self, data: str | os.PathLike[str], images: str | os.PathLike[str] | None = None, *,
                 strict: bool = False) -> None:
        super().__init__()
        self.data = Path(data)
        self.images = Path(images) if images is not None else None
        self.strict = strict
        self.files = _question_files(self.data)
        self.splits = [split for split, _ in self.files]
        self._by_split = False

    def _load(self) -> list[Sample]:
        rows: list[tuple[str, Path, int, dict]] = []
        for split, path in self.files:
            rows.extend((split, path, number, obj) for number, obj in read_jsonl(path, what="--data"))
        ids: list[str | None] = []
        for _, path, number, obj in rows:
            ids.append(id_key(row_field(obj, "question_id", "id", f"--data: {path}:{number}")))
        # The official files each number their questions from 1: keyed by split when they collide.
        self._by_split = len(self.files) > 1 and len(set(ids)) < len(ids)
        samples = []
        for (split, path, number, obj), key in zip(rows, ids, strict=True):
            where = f"--data: {path}:{number}"
            image = Path(row_field(obj, "image", "string", where))
            text = row_field(obj, "text", "string", where)
            label = row_field(obj, "label", "string", where).lower().strip()
            if label not in ("yes", "no"):
                raise ValueError(f"{where}: label must be 'yes' or 'no', got {obj['label']!r}")
            samples.append(Sample(
                id=obj["question_id"],
                key=f"{split}/{key}" if self._by_split else key,
                image=self.images / image if self.images is not None else image,
                prompt=f"{text}{PROMPT_SUFFIX}",
                reference=label,
                split=split,
                meta={"question": text},
            ))
        return samples

    @property
    def keyed_by_split(self) -> bool:
        """True when question ids repeat across the loaded files: predictions then need a ``category`` field."""
        self.samples  # noqa: B018 - load
        return self._by_split

    def prediction_key(self, prediction: Prediction) -> str:
        """``question_id``, or ``category/question_id`` when the ids repeat across splits."""
        key = id_key(prediction.id)
        if not self.keyed_by_split:
            return key
        category = prediction.record.get("category") if prediction.record else None
        if category is None:
            where = f"{prediction.source}: " if prediction.source else ""
            raise ValueError(f"--predictions: {where}question ids repeat across the POPE splits "
                             f"({', '.join(self.splits)}): each prediction needs a 'category' field naming its "
                             f"split, or score one split file at a time")
        return f"{category}/{key}"

    def parse(self, text: str) -> str:
        """``"yes"``/``"no"`` (lenient), or the normalised text (strict)."""
        return parse_strict(text) if self.strict else parse_lenient(text)

    def _metrics(self, pairs: list[tuple[Sample, str]]) -> dict[str, Any]:
        answers = [self.parse(text) for _, text in pairs]
        labels = [sample.reference for sample, _ in pairs]
        result: dict[str, Any] = {"parsing": "strict (lmms-eval)" if self.strict else "lenient (LLaVA eval_pope)"}
        result.update(pope_metrics(answers, labels))
        if len(self.splits) > 1:
            per_split: dict[str, Any] = {}
            for split in self.splits:
                idx = [i for i, (s, _) in enumerate(pairs) if s.split == split]
                if idx:
                    per_split[split] = pope_metrics([answers[i] for i in idx], [labels[i] for i in idx])
                    per_split[split]["n"] = len(idx)
            result["splits"] = per_split
            result["split_mean"] = {k: sum(m[k] for m in per_split.values()) / len(per_split) for k in METRIC_KEYS}
        return result
