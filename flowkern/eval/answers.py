"""An eval folder's files: LLaVA-format answer files written batch by batch so that a killed run loses at most the
batch in flight, read back for a resume, and the folder's ``run.json``. Used by :mod:`flowkern.eval.run` and the
sweep (one such folder per point).

- :func:`answer_record`: one answer line (``question_id``, ``prompt``, ``text``, ``model_id``, POPE's
  ``category``; CHAIR's ``image_id`` and ``caption``).
- :func:`append_lines`: JSON lines appended, ``fsync``-ed, with Ctrl-C held off while they are written
  (:func:`sigint_held`).
- :func:`read_answers`: what an existing answer file already answers (:class:`AnswerFile`), its valid length and
  whether its last line is torn; any other malformed line is an error.
- :func:`start_files`: make a folder ready to append: afresh (``run.json`` written atomically) or after dropping a
  torn last line.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flowkern._io import atomic_write_json
from flowkern.eval.tasks.base import Prediction, Sample, Task

__all__ = [
    "ANSWERS_FILE",
    "SETTINGS_FILE",
    "METRICS_FILE",
    "AnswerFile",
    "answer_record",
    "append_lines",
    "read_answers",
    "start_files",
    "sigint_held",
]

ANSWERS_FILE = "answers.jsonl"
SETTINGS_FILE = "run.json"
METRICS_FILE = "metrics.json"


@dataclass
class AnswerFile:
    """What :func:`read_answers` found in an answer file."""

    answered: set[str] = field(default_factory=set)
    """The task keys (:attr:`flowkern.eval.tasks.base.Sample.key`) already answered."""
    valid_bytes: int | None = None
    """Length of the file's valid part (None: no file); a torn last line lies past it."""
    torn_line: bool = False
    """The last line has no final newline (a run killed while writing it)."""


def answer_record(task: Task, sample: Sample, text: str, model_id: str) -> dict[str, Any]:
    """One answer-file line in LLaVA's format: ``question_id``, ``prompt`` (the task prompt, without chat template),
    ``text`` (the answer), ``model_id``, and ``category`` (the split) for POPE; for CHAIR ``image_id`` and
    ``caption`` instead of ``question_id`` and ``text``."""
    if task.name == "chair":
        return {"image_id": sample.id, "caption": text, "prompt": sample.prompt, "model_id": model_id}
    record: dict[str, Any] = {"question_id": sample.id, "prompt": sample.prompt, "text": text, "model_id": model_id}
    if task.name == "pope" and sample.split is not None:
        record["category"] = sample.split
    return record


@contextlib.contextmanager
def sigint_held() -> Iterator[None]:
    """Hold a Ctrl-C off until the block is done (then raise ``KeyboardInterrupt``), so that it never tears a batch's
    lines. A Python-level handler in the main thread: a blocked signal mask would let the kernel hand the signal to
    another thread (torch's, tqdm's), where it can be lost."""
    caught: list[int] = []
    try:
        old = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    except ValueError:  # not the main thread: nothing to hold
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
    if caught:
        raise KeyboardInterrupt


def append_lines(path: str | os.PathLike[str], records: Sequence[Mapping[str, Any]]) -> None:
    """Append ``records`` as JSON lines (UTF-8, no ASCII escaping) to ``path`` (created if missing) and ``fsync``
    it, with Ctrl-C held off until the lines are on disk."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    with sigint_held():
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            view = memoryview(text)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)


def read_answers(path: Path, task: Task) -> AnswerFile:
    """What the answer file ``path`` already answers for ``task``; nothing is modified. Blank lines are skipped; a
    last line without its newline is torn (reported, not read).

    Raises:
        ValueError: naming ``--out`` and the line: not JSON, not an answer line, an id that is not in the task's
            data, or an id answered twice.
    """
    data = path.read_bytes()
    torn = bool(data) and not data.endswith(b"\n")
    valid = data.rfind(b"\n") + 1 if torn else len(data)
    answered: set[str] = set()
    where_first: dict[str, int] = {}
    for number, raw in enumerate(data[:valid].split(b"\n")[:-1] if valid else [], start=1):
        where = f"--out: {path}:{number}"
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{where}: not a valid JSON line ({exc}); fix or remove the line, or pass "
                             f"--overwrite to start afresh") from None
        if not isinstance(obj, dict) or task.id_field not in obj or not isinstance(obj.get(task.text_field), str):
            raise ValueError(f"{where}: not an answer line (needs {task.id_field!r} and a string "
                             f"{task.text_field!r}); pass --overwrite to start afresh")
        try:
            key = task.prediction_key(Prediction(obj[task.id_field], obj[task.text_field], obj, f"{path}:{number}"))
            task.sample(key)
        except (KeyError, ValueError):
            raise ValueError(f"{where}: {task.id_field} {obj[task.id_field]!r} is not in the {task.name} data "
                             f"(--data): the answers were written for other questions") from None
        if key in where_first:
            raise ValueError(f"{where}: {task.id_field} {obj[task.id_field]!r} is answered twice (first at line "
                             f"{where_first[key]}); pass --overwrite to start afresh")
        where_first[key] = number
        answered.add(key)
    return AnswerFile(answered, valid, torn)


def start_files(out: Path, run_record: Mapping[str, Any] | None, *, truncate_to: int | None = None) -> None:
    """Make the folder ``out`` ready to append answers.

    Args:
        out: the folder (created if missing).
        run_record: start afresh: the answers and ``metrics.json`` are removed, ``run.json`` is written
            atomically with this content and an empty answer file is created. None: keep the answers.
        truncate_to: with ``run_record=None``, cut the answer file to this length (drops a torn last line; see
            :attr:`AnswerFile.valid_bytes`) and ``fsync`` it.
    """
    out.mkdir(parents=True, exist_ok=True)
    answers = out / ANSWERS_FILE
    if run_record is not None:
        for name in (METRICS_FILE, ANSWERS_FILE):
            with contextlib.suppress(FileNotFoundError):
                (out / name).unlink()
        atomic_write_json(out / SETTINGS_FILE, dict(run_record))
        answers.touch()
    elif truncate_to is not None:
        os.truncate(answers, truncate_to)
        with sigint_held():
            fd = os.open(answers, os.O_WRONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
