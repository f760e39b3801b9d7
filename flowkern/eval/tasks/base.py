"""The task protocol shared by every benchmark: samples in, predictions matched by id, metrics out.

A :class:`Task` reads a benchmark's official release files (never downloads), exposes its :class:`Sample` list
(id, image path, prompt text as LLaVA-1.5's evaluation builds it, reference) and scores predictions into a dict of
metrics. Predictions are matched to samples by id, never by line order; an id the task does not know, or one given
twice, is an error (``ValueError`` naming it). Scoring needs only the annotation files, no image folder.

Answer files are JSON lines in LLaVA's format (``{"question_id": ..., "text": ...}``, for captions
``{"image_id": ..., "caption": ...}``; other fields are kept but ignored): :func:`read_predictions`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

__all__ = [
    "ratio",
    "describe_protocol",
    "Sample",
    "Prediction",
    "Task",
    "read_json",
    "read_jsonl",
    "read_predictions",
    "id_key",
    "row_field",
    "json_type",
]


@dataclass(frozen=True)
class Sample:
    """One benchmark item.

    ``id`` is the id as written in the official file (an int for POPE, TextVQA and COCO, a string for ScienceQA);
    ``key`` is the string predictions are matched by (usually ``str(id)``). ``image`` is the image path (inside
    the task's image folder; it need not exist to score), or for table data the
    :class:`~flowkern.eval.tasks.parquet.EmbeddedImage` holding it. ``prompt`` is the user text without chat
    template or image placeholder. ``reference`` is what the prediction is scored against (a label, an option
    letter, the ten answers, the set of objects in the image). ``split`` names the part of a multi-file benchmark
    (POPE's split or category).
    """

    id: Any
    key: str
    image: Path | Any | None
    prompt: str
    reference: Any
    split: str | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Prediction:
    """One answer-file line: the id as written, the answer text, and where it came from (for error messages)."""

    id: Any
    text: str
    record: Mapping[str, Any] = field(default_factory=dict)
    source: str = ""


def id_key(value: Any) -> str:
    """The string an id is matched by: ``1`` and ``"1"`` are the same id; ``1.0``/``True`` are refused."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"expected an integer or string id, got {value!r}")
    return str(value).strip()


_JSON_NAMES = {type(None): "null", bool: "a boolean", int: "a number", float: "a number", str: "a string",
               list: "a list", dict: "an object"}


def json_type(value: Any) -> str:
    """How JSON names ``value``'s type, for messages: ``null``, ``a number``, ``a string``, ``a list``, ..."""
    return _JSON_NAMES.get(type(value), type(value).__name__)


_KINDS: dict[str, tuple[tuple[type, ...], str]] = {
    "string": ((str,), "a string"), "id": ((int, str), "an integer or a string"), "int": ((int,), "an integer"),
    "list": ((list,), "a list"), "object": ((dict,), "an object"), "number": ((int, float), "a number")}


def row_field(row: Any, name: str, kind: str, where: str, *, optional: bool = False, empty: bool = False) -> Any:
    """``row[name]`` of an official data file, checked: the one validator every task's loader reads fields through.

    Args:
        row: the record (a JSON object; anything else is refused).
        name: the field.
        kind: ``"string"``, ``"id"`` (an int or a string, as ids are written), ``"int"``, ``"number"``, ``"list"`` or
            ``"object"``; a boolean is never a number.
        where: ``"--data: <file>:<line>"`` or ``"--data: <file>: data[3]"``: the file and the row, for the message.
        optional: a missing field or ``null`` gives None.
        empty: an empty string or list is accepted (default: refused).

    Raises:
        ValueError: ``"{where}: image must be a string, got null"`` (and alike for a missing field, a wrong type
            or an empty value).
    """
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected an object, got {json_type(row)}")
    if name not in row or row[name] is None:
        if optional:
            return None
        if name not in row:
            raise ValueError(f"{where}: missing field {name!r}")
    value = row[name]
    wanted, names = _KINDS[kind]
    if isinstance(value, bool) or not isinstance(value, wanted):
        got = "null" if value is None else f"{json_type(value)} ({json.dumps(value)[:40]})"
        raise ValueError(f"{where}: {name} must be {names}, got {got}")
    if not empty and isinstance(value, str | list) and not (value.strip() if isinstance(value, str) else value):
        raise ValueError(f"{where}: {name} must not be empty, got {json.dumps(value)}")
    return value


def read_json(path: str | os.PathLike[str], *, what: str = "--data") -> Any:
    """Load one JSON file; ``FileNotFoundError``/``ValueError`` naming ``what`` and the file."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what}: {p} not found")
    try:
        with p.open(encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what}: {p}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{what}: {p}: not UTF-8 text ({exc.reason})") from None


def read_jsonl(path: str | os.PathLike[str], *, what: str = "--data") -> list[tuple[int, dict]]:
    """Load a JSON-lines file as ``[(line_number, object), ...]``; blank lines are skipped.

    A line that is not a JSON object raises ``ValueError("{what}: {file}:{line}: ...")``.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what}: {p} not found")
    rows: list[tuple[int, dict]] = []
    try:
        with p.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{what}: {p}:{number}: not valid JSON ({exc.msg})") from None
                if not isinstance(obj, dict):
                    raise ValueError(f"{what}: {p}:{number}: expected a JSON object, got {type(obj).__name__}")
                rows.append((number, obj))
    except UnicodeDecodeError as exc:
        raise ValueError(f"{what}: {p}: not UTF-8 text ({exc.reason})") from None
    return rows


def read_predictions(
    path: str | os.PathLike[str],
    *,
    id_field: str = "question_id",
    text_field: str = "text",
    what: str = "--predictions",
) -> list[Prediction]:
    """Read an answer file (JSON lines with ``id_field`` and ``text_field``) into :class:`Prediction` objects.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` ``"{what}: {file}:{line}: ..."`` for a
    malformed line, a missing or non-string field, or an empty file. Duplicate ids are detected by
    :meth:`Task.score` (which knows how a task keys its predictions).
    """
    rows = read_jsonl(path, what=what)
    predictions: list[Prediction] = []
    for number, obj in rows:
        where = f"{what}: {path}:{number}"
        if id_field not in obj:
            raise ValueError(f"{where}: missing field {id_field!r}")
        if text_field not in obj:
            raise ValueError(f"{where}: missing field {text_field!r}")
        text = obj[text_field]
        if not isinstance(text, str):
            raise ValueError(f"{where}: field {text_field!r} must be a string, got {type(text).__name__}")
        try:
            id_key(obj[id_field])
        except ValueError as exc:
            raise ValueError(f"{where}: field {id_field!r}: {exc}") from None
        predictions.append(Prediction(obj[id_field], text, obj, f"{path}:{number}"))
    if not predictions:
        raise ValueError(f"{what}: {path}: no predictions in the file")
    return predictions


class Task:
    """Base class of the benchmarks: load samples, build prompts, parse answers, score predictions.

    Subclasses set :attr:`name`, :attr:`id_field`, :attr:`text_field`, implement :meth:`_load` (returning the
    samples) and :meth:`_metrics` (scoring matched ``(sample, text)`` pairs), and may override :meth:`parse` and
    :meth:`prediction_key`.
    """

    name: ClassVar[str] = ""
    id_field: ClassVar[str] = "question_id"
    text_field: ClassVar[str] = "text"

    def __init__(self) -> None:
        self._samples: list[Sample] | None = None
        self._by_key: dict[str, Sample] | None = None

    # -- samples ------------------------------------------------------------------------------------------------

    def _load(self) -> list[Sample]:
        raise NotImplementedError

    @property
    def samples(self) -> list[Sample]:
        """The samples, in file order (loaded on first use)."""
        if self._samples is None:
            samples = self._load()
            by_key: dict[str, Sample] = {}
            for s in samples:
                if s.key in by_key:
                    raise ValueError(f"--data: {self.name}: id {s.id!r} appears twice in the question files")
                by_key[s.key] = s
            self._samples, self._by_key = samples, by_key
        return self._samples

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples)

    def sample(self, key: Any) -> Sample:
        """The sample with this id (``KeyError`` if none)."""
        self.samples  # noqa: B018 - load
        assert self._by_key is not None
        return self._by_key[id_key(key)]

    # -- predictions --------------------------------------------------------------------------------------------

    def parse(self, text: str) -> Any:
        """The answer a prediction's text parses to (task-specific; the text itself by default)."""
        return text

    def prediction_key(self, prediction: Prediction) -> str:
        """The sample key a prediction is matched to (``str`` of its id by default)."""
        return id_key(prediction.id)

    def outside_subset(self, key: str) -> bool:
        """Whether ``key`` names a question of the benchmark that this task does not score (ScienceQA's text-only
        problems, another split): a prediction for it is ignored and counted (``ignored`` in :meth:`score`), as the
        reference scripts do with answer files covering a whole split. False here: every unknown id is an error."""
        return False

    def match(self, predictions: Iterable[Prediction] | Mapping[Any, str]) -> list[tuple[Sample, str]]:
        """Pair predictions with samples by id. ``ValueError`` for an unknown id or an id given twice; predictions
        for questions outside the scored subset (:meth:`outside_subset`) are left out."""
        return self._match(predictions)[0]

    def _match(self, predictions: Iterable[Prediction] | Mapping[Any, str]) -> tuple[list[tuple[Sample, str]], int]:
        """:meth:`match`'s pairs and the number of predictions left out as outside the scored subset."""
        if isinstance(predictions, Mapping):
            predictions = [Prediction(k, v) for k, v in predictions.items()]
        self.samples  # noqa: B018 - load
        assert self._by_key is not None
        seen: dict[str, str] = {}
        pairs: list[tuple[Sample, str]] = []
        ignored = 0
        for p in predictions:
            where = f"{p.source}: " if p.source else ""
            key = self.prediction_key(p)
            sample = self._by_key.get(key)
            if sample is None and self.outside_subset(key):
                ignored += 1
                continue
            if sample is None:
                raise ValueError(f"--predictions: {where}{self.id_field} {p.id!r} is not in the {self.name} data "
                                 f"(--data)")
            if key in seen:
                first = f" (first at {seen[key]})" if seen[key] else ""
                raise ValueError(f"--predictions: {where}{self.id_field} {p.id!r} is given twice{first}")
            seen[key] = p.source
            pairs.append((sample, p.text))
        if not pairs:
            outside = f" ({ignored} are for questions outside the scored subset)" if ignored else ""
            raise ValueError(f"--predictions: no predictions to score{outside}")
        return pairs, ignored

    def score(self, predictions: Iterable[Prediction] | Mapping[Any, str]) -> dict[str, Any]:
        """Score predictions (answer-file lines, or a mapping id -> text) into a dict of metrics.

        Only the predicted samples are scored (``n`` says how many; ``missing`` how many samples have none;
        ``ignored``, present when not 0, how many predictions were for questions outside the scored subset);
        ``protocol`` says how the numbers were made (:func:`flowkern.eval.tasks.protocol.protocol`).
        """
        pairs, ignored = self._match(predictions)
        result: dict[str, Any] = {"task": self.name}
        result.update(self._metrics(pairs))
        result["n"] = len(pairs)
        result["missing"] = len(self.samples) - len(pairs)
        if ignored:
            result["ignored"] = ignored
        if describe_protocol is not None:
            result["protocol"] = describe_protocol(self)
        return result

    def _metrics(self, pairs: list[tuple[Sample, str]]) -> dict[str, Any]:
        raise NotImplementedError

    def read_predictions(self, path: str | os.PathLike[str]) -> list[Prediction]:
        """:func:`read_predictions` with this task's id and text fields."""
        return read_predictions(path, id_field=self.id_field, text_field=self.text_field)


describe_protocol: Callable[[Task], dict[str, Any]] | None = None
"""What :meth:`Task.score` writes under ``protocol``: :func:`flowkern.eval.tasks.protocol.protocol`, set when that
module is imported (with the package; it reads the task modules, which import this one)."""


def ratio(numerator: float, denominator: float) -> float:
    """``numerator / denominator``, 0.0 when the denominator is 0 (as lmms-eval does)."""
    return float(numerator) / float(denominator) if denominator else 0.0
