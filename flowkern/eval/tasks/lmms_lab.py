"""The four tasks read from the lmms-lab parquet releases (the datasets lmms-eval downloads) instead of the official
files: the same prompts, answer parsing and metrics (each class is its task's subclass), images decoded from the
embedded bytes (:class:`~flowkern.eval.tasks.parquet.EmbeddedImage`), ids and categories carried into the answer
files so that ``flowkern score`` reads either format.

========  ===================  ==================================================================  ===============
task      dataset              columns read                                                        default split
========  ===================  ==================================================================  ===============
pope      lmms-lab/POPE        question_id, question, answer, category, image                      all of subset
                                                                                                   ``default``
sqa       lmms-lab/ScienceQA   question, choices, answer, hint, category, image                    ``test`` of
                                                                                                   ``ScienceQA-IMG``
textvqa   lmms-lab/textvqa     question_id, image_id, question, answers, ocr_tokens, image         ``validation``
chair     lmms-lab/COCO-       question_id (the image file name), answer (the reference captions),  ``val``
          Caption              image
========  ===================  ==================================================================  ===============

- POPE: a question id of digits is written as an integer (as in the official files and LLaVA's answer files);
  ``category`` is the sample's split (adversarial / popular / random): subset ``default`` (split ``test``, the
  three categories) and subset ``Full`` (``--split adversarial`` ...) give each category's numbers and their mean.
- ScienceQA: the rows carry no problem id; a question's id is its row number in the split (0-based).
- CHAIR: the rows carry no instance annotations, so an image's ground-truth objects are those its reference captions
  mention (the official files add the instance classes): CHAIR numbers from the two formats differ by that.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from flowkern.eval.tasks import parquet as tables
from flowkern.eval.tasks.base import Sample, Task, id_key
from flowkern.eval.tasks.chair import PROMPT as CHAIR_PROMPT
from flowkern.eval.tasks.chair import ChairTask, ObjectVocabulary
from flowkern.eval.tasks.pope import PROMPT_SUFFIX as POPE_SUFFIX
from flowkern.eval.tasks.pope import PopeTask
from flowkern.eval.tasks.sqa import SqaTask, build_prompt
from flowkern.eval.tasks.textvqa import TextVqaTask
from flowkern.eval.tasks.textvqa import build_prompt as textvqa_prompt

__all__ = ["TablePope", "TableSqa", "TableTextVqa", "TableChair", "TABLE_TASKS", "table_task", "table_settings"]


class _TableMixin:
    """The table side of a task: the source, the chosen subset / splits and their files."""

    columns: dict[str, str] = {}
    optional: dict[str, str] = {}
    prefer_subset: tuple[str, ...] = ("default",)
    prefer_split: tuple[str, ...] = ()

    def _open(self, data: str | os.PathLike[str], split: str | None) -> None:
        self.source = tables.open_source(data)
        self.subset, self.table_splits, self.table_files = tables.select(
            self.source, split, prefer_subset=self.prefer_subset, prefer_split=self.prefer_split)
        self.data = self.source.root
        self.images = None

    image_optional = False
    """The image column may hold nulls (ScienceQA's questions without an image): then it is read with the rows;
    otherwise the images stay in the files until a batch needs them (:func:`~flowkern.eval.tasks.parquet.open_images`,
    which reports a missing one)."""

    def _rows(self) -> Any:
        """``(file, row, values)`` of every selected file, schema checked first."""
        for f in self.table_files:
            tables.check_columns(f.path, self.columns)
            names = tables.column_names(f.path)
            extra = {k: v for k, v in self.optional.items() if k in names}
            if extra:
                tables.check_columns(f.path, extra)
            read = [c for c in [*self.columns, *extra] if c != "image" or self.image_optional]
            required = [c for c in self.columns if c in read and c != "image"]
            for row, values in tables.iter_rows(f.path, read, required=required):
                yield f, row, values

    def describe_source(self) -> dict[str, Any]:
        """The data-source part of the protocol (:mod:`flowkern.eval.tasks.protocol`)."""
        return {"format": "parquet" if all(f.path.suffix == ".parquet" for f in self.table_files) else "arrow",
                "dataset": self.source.dataset_id, "revision": self.source.revision, "path": str(self.source.root),
                "subset": self.subset, "split": self.table_splits}


class TablePope(_TableMixin, PopeTask):
    """POPE from lmms-lab/POPE (see the module docstring); ``split``: a split (or ``SUBSET/SPLIT``) to read."""

    columns = {"question_id": "id", "question": "str", "answer": "str", "category": "str", "image": "image"}

    def __init__(self, data: str | os.PathLike[str], images: str | os.PathLike[str] | None = None, *,
                 strict: bool = False, split: str | None = None) -> None:
        Task.__init__(self)
        self._open(data, split)
        self.strict = strict
        self.files = []
        self.splits: list[str] = []
        self._by_split = False

    def _load(self) -> list[Sample]:
        rows = list(self._rows())
        categories = list(dict.fromkeys(str(v["category"]) for _, _, v in rows))
        self.splits = categories
        keys = [id_key(v["question_id"]) for _, _, v in rows]
        self._by_split = len(categories) > 1 and len(set(keys)) < len(keys)
        samples = []
        for (f, row, v), key in zip(rows, keys, strict=True):
            label = v["answer"].lower().strip()
            if label not in ("yes", "no"):
                raise ValueError(f"--data: {f.path}: row {row}: column 'answer' must be 'yes' or 'no', got "
                                 f"{v['answer']!r}")
            category = str(v["category"])
            qid = int(key) if key.isdigit() else v["question_id"]  # the official files' integer ids
            samples.append(Sample(id=qid, key=f"{category}/{key}" if self._by_split else key,
                                  image=tables.EmbeddedImage(f.path, row), prompt=f"{v['question']}{POPE_SUFFIX}",
                                  reference=label, split=category, meta={"question": v["question"]}))
        return samples


class TableSqa(_TableMixin, SqaTask):
    """ScienceQA from lmms-lab/ScienceQA (subset ``ScienceQA-IMG``, split ``test`` by default)."""

    columns = {"question": "str", "choices": "strs", "answer": "int", "image": "image"}
    optional = {"hint": "str", "category": "str"}
    prefer_subset = ("ScienceQA-IMG", "default")
    prefer_split = ("test",)
    image_optional = True

    def __init__(self, data: str | os.PathLike[str], images: str | os.PathLike[str] | None = None, *,
                 split: str | None = None, image_only: bool = True) -> None:
        Task.__init__(self)
        self._open(data, split)
        self.split = "/".join([self.subset, *self.table_splits])
        self.image_only = image_only

    def _load(self) -> list[Sample]:
        samples = []
        index: dict[str, int] = {}
        for f, row, v in self._rows():
            number = index[f.split] = index.get(f.split, -1) + 1
            if v["image"] is None and self.image_only:
                continue
            choices = [str(c) for c in v["choices"]]
            answer = v["answer"]
            if not 0 <= answer < len(choices):
                raise ValueError(f"--data: {f.path}: row {row}: column 'answer': {answer} is not an index into its "
                                 f"{len(choices)} choices")
            pid = number if len(self.table_splits) == 1 else f"{f.split}/{number}"
            samples.append(Sample(
                id=pid, key=str(pid),
                image=tables.EmbeddedImage(f.path, row) if v["image"] is not None else None,
                prompt=build_prompt(v["question"], choices, v.get("hint")), reference=chr(ord("A") + answer),
                split=f.split, meta={"question": v["question"], "choices": choices, "category": v.get("category")}))
        return samples


class TableTextVqa(_TableMixin, TextVqaTask):
    """TextVQA from lmms-lab/textvqa (split ``validation`` by default); ``ocr`` reads the rows' ``ocr_tokens``."""

    columns = {"question_id": "id", "image_id": "id", "question": "str", "answers": "strs", "image": "image"}
    prefer_split = ("validation",)

    def __init__(self, data: str | os.PathLike[str], images: str | os.PathLike[str] | None = None, *,
                 ocr: bool = False, split: str | None = None) -> None:
        Task.__init__(self)
        self._open(data, split)
        self.ocr = ocr
        self.annotation_file = self.source.root
        self._by_image_question: dict[tuple[str, str], str] = {}
        if ocr:
            self.columns = {**self.columns, "ocr_tokens": "strs"}

    def _load(self) -> list[Sample]:
        samples = []
        for f, row, v in self._rows():
            if not v["answers"]:
                raise ValueError(f"--data: {f.path}: row {row}: column 'answers' is empty")
            image_id = str(v["image_id"])
            key = id_key(v["question_id"])
            samples.append(Sample(
                id=v["question_id"], key=key, image=tables.EmbeddedImage(f.path, row),
                prompt=textvqa_prompt(v["question"], v["ocr_tokens"] if self.ocr else None),
                reference=[str(a) for a in v["answers"]], meta={"image_id": image_id, "question": v["question"]}))
            self._by_image_question.setdefault((image_id, v["question"].lower()), key)
        return samples


def _coco_image_id(name: Any, where: str) -> int:
    stem = Path(str(name)).stem.rsplit("_", 1)[-1]
    if not stem.isdigit():
        raise ValueError(f"{where}: column 'question_id' {name!r} is not a COCO image file name")
    return int(stem)


class TableChair(_TableMixin, ChairTask):
    """CHAIR from lmms-lab/COCO-Caption (split ``val`` by default); ground truth from the reference captions."""

    columns = {"question_id": "str", "answer": "strs", "image": "image"}
    prefer_split = ("val",)

    def __init__(self, data: str | os.PathLike[str], images: str | os.PathLike[str] | None = None, *,
                 vocabulary: ObjectVocabulary | None = None, split: str | None = None) -> None:
        Task.__init__(self)
        self._open(data, split)
        self.vocabulary = vocabulary or ObjectVocabulary.coco()
        self._truth: dict[str, frozenset[str]] = {}

    def _load(self) -> list[Sample]:
        samples = {}
        for f, row, v in self._rows():
            image_id = _coco_image_id(v["question_id"], f"--data: {f.path}: row {row}")
            samples.setdefault(image_id, Sample(
                id=image_id, key=str(image_id), image=tables.EmbeddedImage(f.path, row), prompt=CHAIR_PROMPT,
                reference={"classes": frozenset(), "captions": tuple(str(c) for c in v["answer"])}))
        return [samples[k] for k in sorted(samples)]


TABLE_TASKS: dict[str, type[Task]] = {"pope": TablePope, "sqa": TableSqa, "textvqa": TableTextVqa,
                                      "chair": TableChair}


def table_task(name: str, data: str | os.PathLike[str], images: str | os.PathLike[str] | None = None,
               **options: Any) -> Task:
    """The task ``name`` reading the tables of ``data`` (options as for the task, plus ``split``)."""
    if images is not None:
        raise ValueError(f"--images: {data} holds its images (embedded in the table files); drop --images")
    return TABLE_TASKS[name](data, **options)


def table_settings(task: Task) -> dict[str, Any]:
    """The settings a table task's answers depend on, for ``run.json``: ``data`` (``ORG/NAME@REVISION`` for a
    cached dataset id, else the resolved folder or file) and ``split`` (``SUBSET/SPLIT[,SPLIT...]``); ``{}`` for a
    task reading official files."""
    if not isinstance(task, _TableMixin):
        return {}
    source = task.source
    data = f"{source.dataset_id}@{source.revision}" if source.dataset_id and source.revision else \
        str(source.root.resolve())
    return {"data": data, "split": f"{task.subset}/{','.join(task.table_splits)}"}
