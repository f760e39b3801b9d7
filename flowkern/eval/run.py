"""The evaluation engine behind ``flowkern eval``: batched greedy answers to a task's questions, written as they come,
resumable, then scored by the task.

.. code-block:: python

    from flowkern.eval.run import EvalConfig, run_eval
    from flowkern.plan import PruneSpec

    result = run_eval(EvalConfig(model="llava-hf/llava-1.5-7b-hf", task="pope", data="pope/coco",
                                 images="pope/val2014", out="runs/pope-L2", batch_size=16,
                                 prune=PruneSpec(layer=2, keep=0)))
    result.metrics            # the same dict `flowkern score` prints for result.answers_path
    result.questions_per_second

A sweep calls :func:`run_eval` once per point with the loaded ``model``/``processor`` passed in (and one ``out``
folder per point).

**The output folder** (``out``) holds three files (written and read by :mod:`flowkern.eval.answers`):

- ``answers.jsonl`` — LLaVA's answer-file format, one JSON object per line: ``question_id``, ``prompt`` (the task
  prompt, without chat template), ``text`` (the answer), ``model_id`` (the model folder's name or the hub id), and
  ``category`` (the split) for POPE; for CHAIR ``image_id`` and ``caption`` instead of ``question_id`` and ``text``.
  Lines are appended batch by batch, each batch flushed and ``fsync``-ed before the next starts (and Ctrl-C held
  off while it is written), so a killed run loses at most the batch in flight.
- ``run.json`` — the settings the answers were generated under (:data:`SETTINGS_KEYS`, resolved: the model's
  files, revision, dtype and device type as loaded, the prompts; see :mod:`flowkern.identity`), written atomically
  before the first answer. A run on a folder whose answers were generated under other settings is refused
  (:class:`EvalUsageError` naming each differing setting, its recorded and its new value): answers of two
  configurations are never mixed.
- ``metrics.json`` — :meth:`flowkern.eval.tasks.base.Task.score` of the whole answer file (exactly what
  ``flowkern score --task T --data PATH --predictions answers.jsonl`` gives), written atomically at the end.

**The folder's owner.** :func:`run_eval` claims ``out`` (:func:`flowkern.outdir.claim`, kind ``eval``) before
anything else: one run at a time (a second one is refused, naming the first's pid), never a folder of another kind
or one holding other files, and only where a probe entry could be created.

**Resume.** A rerun with the same settings skips the questions already answered (matched by id, as scoring does) and
only generates the rest. A torn last line (a run killed while writing) is detected (no final newline) and dropped
before appending; any other malformed line is an error that leaves the file untouched. ``--limit``, the batch size,
which CUDA device and ``--strict`` (scoring only) may change between runs; ``overwrite=True`` starts afresh.

Every input is checked before a model is loaded: the task name, the question files (each field's type, naming the
file and row), the image of each question still to answer (decoded fully, once: a truncated file or a
decompression-bomb header is refused naming it; :func:`flowkern.hf.inputs.check_images`), the output folder
(creatable, writable, not a file) and an existing answer file (parseable, ids known, settings equal). Those mistakes
raise :class:`EvalUsageError` (a ``ValueError``) with a one-line message naming the option (``--data``, ``--images``,
``--out``, ...). A prompt that, with its answer, passes the model's ``max_position_embeddings`` is warned about once
(:class:`flowkern.hf.inputs.InputWarning`).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from flowkern import _version, identity, outdir
from flowkern._io import atomic_write_json
from flowkern.eval.answers import (
    ANSWERS_FILE,
    METRICS_FILE,
    SETTINGS_FILE,
    AnswerFile,
    answer_record,
    append_lines,
    read_answers,
    start_files,
)
from flowkern.eval.tasks.base import Sample, Task
from flowkern.eval.tasks.lmms_lab import table_settings
from flowkern.eval.tasks.parquet import EmbeddedImage, is_table_source, open_images
from flowkern.eval.tasks.parquet import check_images as check_embedded
from flowkern.hf.inputs import build_inputs
from flowkern.plan import PRUNE_OPTIONS, PruneSpec
from flowkern.prune import prune

__all__ = [
    "EvalConfig",
    "EvalPlan",
    "EvalResult",
    "EvalUsageError",
    "prepare",
    "run_eval",
    "generate_answers",
    "SETTINGS_KEYS",
    "DEFAULT_MAX_NEW_TOKENS",
]

SETTINGS_KEYS: tuple[str, ...] = ("model", "revision", "weights", "device", "dtype", "task", "data", "images",
                                  "prompts", "split", "ocr", "max_new_tokens", *PRUNE_OPTIONS.values())
"""The settings that change the answers (:mod:`flowkern.identity`): an answer file written under other values of any
of them is refused. Each is named by its option (:func:`flowkern.identity.flag`; the pruning ones:
:data:`flowkern.plan.PRUNE_OPTIONS`)."""

DEFAULT_MAX_NEW_TOKENS: dict[str, int] = {"pope": 128, "sqa": 128, "textvqa": 128, "chair": 512}
"""Answer length limit per task when none is given (LLaVA-1.5's ``model_vqa_loader`` uses 128; captions get 512)."""

class EvalUsageError(ValueError):
    """A mistake the user can fix (bad path, unknown task, missing image, mismatched settings): one-line message."""


@dataclass(frozen=True)
class EvalConfig:
    """What to evaluate and where the answers go (the options of ``flowkern eval``).

    Attributes:
        model: a ``save_pretrained`` folder or a cached hub id (:func:`flowkern.hf.loading.load_model`).
        task: ``pope``, ``sqa``, ``textvqa`` or ``chair`` (:data:`flowkern.eval.TASKS`).
        data: the task's official files (see ``flowkern score --help``), or its lmms-lab tables: a parquet / Arrow
            file or folder, or a dataset id in the local Hugging Face cache (:mod:`flowkern.eval.tasks.lmms_lab`).
        out: the output folder (answers.jsonl, run.json, metrics.json).
        images: the image folder (default: the task's, e.g. ``<data>/images`` for sqa; pope needs it).
        limit: answer only the first ``limit`` questions (in file order); None: all.
        batch_size: questions per ``generate`` call (left padding).
        max_new_tokens: answer length limit; None: :data:`DEFAULT_MAX_NEW_TOKENS` of the task.
        prune: the :func:`flowkern.prune` setting (off while ``prune.layer`` is None).
        strict: pope only, scoring only: lmms-eval's exact yes/no parsing.
        split: sqa: the ``pid_splits.json`` split (None: ``test``); table data (parquet / Arrow, a dataset id): the
            split, or ``SUBSET/SPLIT`` (None: the task's default, :mod:`flowkern.eval.tasks.lmms_lab`).
        ocr: textvqa only: the OCR-token prompt.
        device, dtype: as for :func:`flowkern.hf.loading.load_model`.
        overwrite: discard the folder's previous answers, settings and metrics and start afresh.
    """

    model: str
    task: str
    data: str | os.PathLike[str]
    out: str | os.PathLike[str]
    images: str | os.PathLike[str] | None = None
    limit: int | None = None
    batch_size: int = 1
    max_new_tokens: int | None = None
    prune: PruneSpec = field(default_factory=PruneSpec)
    strict: bool = False
    split: str | None = None
    ocr: bool = False
    device: str = "auto"
    dtype: str = "auto"
    overwrite: bool = False


@dataclass
class EvalPlan:
    """What :func:`prepare` found: the task, the selected questions, what is already answered and what remains."""

    config: EvalConfig
    task: Task
    settings: dict[str, Any]
    out: Path
    samples: list[Sample]
    todo: list[Sample]
    answered: set[str]
    valid_bytes: int | None
    """Length of the answer file's valid part (None: no file); a torn last line lies past it."""
    torn_line: bool = False
    fresh: bool = True
    """No answers to keep (no file, an empty one, or ``overwrite``): run.json is (re)written."""

    @property
    def answers_path(self) -> Path:
        return self.out / ANSWERS_FILE

    @property
    def settings_path(self) -> Path:
        return self.out / SETTINGS_FILE

    @property
    def metrics_path(self) -> Path:
        return self.out / METRICS_FILE

    def run_record(self) -> dict[str, Any]:
        """The content of ``run.json``: the settings, the flowkern version, device type, dtype (both resolved) and
        creation time."""
        return {"settings": self.settings, "flowkern": _version.__version__, "device": self.settings["device"],
                "dtype": self.settings["dtype"], "created": time.strftime("%Y-%m-%dT%H:%M:%S")}

    def start_files(self) -> None:
        """Make the folder ready to append (:func:`flowkern.eval.answers.start_files`): afresh with ``run.json``
        when :attr:`fresh`, else after dropping a torn last line."""
        start_files(self.out, self.run_record() if self.fresh else None,
                    truncate_to=self.valid_bytes if self.torn_line else None)


@dataclass
class EvalResult:
    """What :func:`run_eval` did: the metrics (the task's score of the answer file) and the run's numbers."""

    metrics: dict[str, Any]
    out: Path
    answers_path: Path
    metrics_path: Path
    settings: dict[str, Any]
    generated: int
    """Questions answered by this call."""
    skipped: int
    """Selected questions already answered in the folder (resume)."""
    seconds: float
    """Wall time of the generation loop (model loading and scoring excluded)."""
    torn_line: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def questions_per_second(self) -> float | None:
        """``generated / seconds`` (None when nothing was generated)."""
        return self.generated / self.seconds if self.generated and self.seconds > 0 else None


# ----------------------------------------------------------------------------------------------------------
# validation (no model)


def _task_options(config: EvalConfig) -> dict[str, Any]:
    if config.strict and config.task != "pope":
        raise EvalUsageError(f"--strict applies to --task pope only, not {config.task}")
    table = is_table_source(config.data)
    if config.split is not None and config.task != "sqa" and not table:
        raise EvalUsageError(f"--split applies to --task sqa and to table data (parquet, a dataset id) only, not "
                             f"to {config.task}'s official files")
    if config.ocr and config.task != "textvqa":
        raise EvalUsageError(f"--ocr applies to --task textvqa only, not {config.task}")
    if table:
        return {"pope": {"strict": config.strict, "split": config.split}, "sqa": {"split": config.split},
                "textvqa": {"ocr": config.ocr, "split": config.split}, "chair": {"split": config.split}}[config.task]
    return {"pope": {"strict": config.strict}, "sqa": {"split": config.split or "test"},
            "textvqa": {"ocr": config.ocr}}.get(config.task, {})


def _check_numbers(config: EvalConfig) -> None:
    def positive(value: Any, flag: str, *, allow_none: bool) -> None:
        if value is None and allow_none:
            return
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise EvalUsageError(f"{flag} {value!r}: expected an integer >= 1")

    positive(config.batch_size, "--batch-size", allow_none=False)
    positive(config.limit, "--limit", allow_none=True)
    positive(config.max_new_tokens, "--max-new-tokens", allow_none=True)
    if not isinstance(config.prune, PruneSpec):
        raise EvalUsageError(f"prune: expected a flowkern.plan.PruneSpec, got {config.prune!r}")
    if not config.prune.enabled:
        default = PruneSpec().to_dict(options=True)
        given = [_flag(k) for k, v in config.prune.to_dict(options=True).items() if v != default[k]]
        if given:
            raise EvalUsageError(f"{', '.join(given)} given without --prune-layer: pruning is off unless "
                                 f"--prune-layer L is given")


def _flag(key: str) -> str:
    """The option of a setting (:data:`SETTINGS_KEYS`): ``max_new_tokens`` -> ``--max-new-tokens``."""
    return identity.flag(key)


def _check_out_dir(config: EvalConfig) -> Path:
    """The output folder, absolute, checked without writing (:func:`flowkern.outdir.check`; :func:`run_eval` claims
    it, probe included, before this)."""
    try:
        out = outdir.check(config.out, "eval", overwrite=config.overwrite, probe=False)
    except outdir.OutputError as exc:
        raise EvalUsageError(str(exc)) from None
    for name in (ANSWERS_FILE, SETTINGS_FILE, METRICS_FILE):
        p = out / name
        if p.is_dir():
            raise EvalUsageError(f"--out: {p} is a directory, expected a file")
    return out


def _check_images(samples: Sequence[Sample], images_hint: str, progress: bool) -> None:
    """Every image of ``samples`` exists and decodes fully (:func:`flowkern.hf.inputs.check_images`)."""
    from flowkern.hf.inputs import ImageError, check_images

    missing: list[Sample] = []
    try:  # images stored in table cells (parquet data): decoded fully here, read a row group at a time
        check_embedded([s.image for s in samples if isinstance(s.image, EmbeddedImage)])
    except ValueError as exc:
        raise EvalUsageError(str(exc)) from None
    for s in samples:
        if isinstance(s.image, EmbeddedImage):
            continue
        if s.image is None:
            raise EvalUsageError(f"--data: question {s.id!r} has no image; flowkern eval answers image questions only")
        if not s.image.is_file() and not s.image.is_dir():
            missing.append(s)
    if missing:
        first = missing[0]
        more = f" ({len(missing)} of {len(samples)} questions' images are missing)" if len(missing) > 1 else ""
        raise EvalUsageError(f"--images: question {first.id!r}: image {first.image} not found{more}; {images_hint}")
    try:
        check_images([s.image for s in samples if not isinstance(s.image, EmbeddedImage)], what="--images",
                     progress=progress)
    except ImageError as exc:
        raise EvalUsageError(str(exc)) from None


def _compare_settings(path: Path, settings: dict[str, Any], out: Path) -> None:
    if not path.is_file():
        raise EvalUsageError(f"--out: {out} has answers but no {SETTINGS_FILE} (not written by flowkern eval?): "
                             f"use another --out, or pass --overwrite to start afresh")
    try:
        previous = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EvalUsageError(f"--out: {path}: not valid JSON ({exc}); pass --overwrite to start afresh") from None
    identity.check_same(previous.get("settings") if isinstance(previous, dict) else None, settings,
                        what=f"the answers in {out} were generated", where=path, error=EvalUsageError)


def prepare(config: EvalConfig, *, progress: bool = False) -> EvalPlan:
    """Check every input and the output folder, load the questions and read what is already answered. No model is
    loaded and nothing is written. Each image still to be answered is decoded fully
    (:func:`flowkern.hf.inputs.check_images`; ``progress``: a bar for big sets).

    Raises:
        EvalUsageError: an unknown task, a missing or malformed data file, a question whose image is absent or
            unreadable, an output folder that cannot be written, an answer file that is malformed or was written
            under other settings (:data:`SETTINGS_KEYS`).
    """
    from flowkern.eval import TASKS, get_task

    if config.task not in TASKS:
        raise EvalUsageError(f"--task: unknown task {config.task!r} (choose from {', '.join(TASKS)})")
    _check_numbers(config)
    options = _task_options(config)
    out = _check_out_dir(config)
    try:
        task = get_task(config.task, config.data, config.images, **options)
        samples = task.samples
    except EvalUsageError:
        raise
    except (FileNotFoundError, ValueError) as exc:
        raise EvalUsageError(str(exc)) from None
    if not samples:
        raise EvalUsageError(f"--data: {config.data}: no {config.task} questions found")
    selected = samples[: config.limit] if config.limit is not None else list(samples)
    images = getattr(task, "images", None)
    try:
        runtime = identity.runtime_identity(config.model, config.device, config.dtype)
    except ValueError as exc:
        raise EvalUsageError(str(exc)) from None
    settings = {
        **identity.model_identity(config.model),
        **runtime,
        "task": config.task,
        "data": str(Path(config.data).expanduser().resolve()),
        "images": str(Path(images).expanduser().resolve()) if images is not None else None,
        "prompts": identity.digest(s.prompt for s in samples),
        "split": (config.split or "test") if config.task == "sqa" else None,
        **table_settings(task),
        "ocr": bool(config.ocr) if config.task == "textvqa" else None,
        "max_new_tokens": config.max_new_tokens or DEFAULT_MAX_NEW_TOKENS[config.task],
        **{k: v if config.prune.enabled else None for k, v in config.prune.to_dict(options=True).items()},
    }
    found = AnswerFile()
    answers_path = out / ANSWERS_FILE
    if not config.overwrite and answers_path.is_file():
        try:
            found = read_answers(answers_path, task)
        except ValueError as exc:
            raise EvalUsageError(str(exc)) from None
        if found.answered:
            _compare_settings(out / SETTINGS_FILE, settings, out)
    answered, valid, torn = found.answered, found.valid_bytes, found.torn_line
    todo = [s for s in selected if s.key not in answered]
    hint = ("pass --images with the COCO val2014 folder" if config.task == "pope" and config.images is None
            else "check --images (the folder holding the task's images)")
    _check_images(todo, hint, progress)
    return EvalPlan(config=config, task=task, settings=settings, out=out, samples=selected, todo=todo,
                    answered=answered, valid_bytes=valid, torn_line=torn, fresh=config.overwrite or not answered)


# ----------------------------------------------------------------------------------------------------------
# generation


def _warn_positions(model: Any, inputs: Any, max_new_tokens: int) -> bool:
    """Warn (:class:`flowkern.hf.inputs.InputWarning`, once per run) when a batch's prompt plus its new tokens
    passes the model's ``max_position_embeddings`` (:func:`flowkern.hf.loading.position_range_message`, the check
    ``flow`` / ``generate`` / ``cam`` make); returns whether it warned."""
    import warnings

    from flowkern.hf.inputs import InputWarning
    from flowkern.hf.loading import position_range_message

    message = position_range_message(model, int(inputs["input_ids"].shape[1]) + max_new_tokens)
    if message:
        warnings.warn(f"--max-new-tokens: {message} (the first such batch; later ones are not reported)",
                      InputWarning, stacklevel=3)
    return message is not None


def generate_answers(model: Any, processor: Any, images: Sequence[Any], prompts: Sequence[str], *,
                     max_new_tokens: int, pruning: Any = None, inputs: Any = None) -> list[str]:
    """Greedy answers to a batch of image prompts (left padding), decoded without special tokens and stripped.

    Args:
        images, prompts: ``B`` each (see :func:`flowkern.hf.inputs.build_inputs`).
        max_new_tokens: answer length limit.
        pruning: a :class:`flowkern.prune.Pruning` to run the batch under (entered and left here), or None.
        inputs: :func:`flowkern.hf.inputs.build_inputs` of these images and prompts, already built (a sweep builds
            them once per batch for all its points); None: built here.

    Returns:
        ``B`` answer strings, in the order of ``prompts``.
    """
    import torch

    if inputs is None:
        inputs = build_inputs(processor, model, images, prompts)
    kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, do_sample=False)
    gen_cfg = getattr(model, "generation_config", None)
    tokenizer = getattr(processor, "tokenizer", processor)
    if gen_cfg is not None and gen_cfg.pad_token_id is None:
        pad = getattr(tokenizer, "pad_token_id", None)
        kwargs["pad_token_id"] = pad if pad is not None else getattr(tokenizer, "eos_token_id", None)
    ctx = pruning if pruning is not None else contextlib.nullcontext()
    with torch.inference_mode(), ctx:
        sequences = model.generate(**inputs, **kwargs)
    new = sequences[:, inputs["input_ids"].shape[1]:].cpu()
    decoder = processor if hasattr(processor, "batch_decode") else tokenizer
    return [t.strip() for t in decoder.batch_decode(new, skip_special_tokens=True)]


def run_eval(
    config: EvalConfig,
    *,
    model: Any = None,
    processor: Any = None,
    progress: bool = False,
    on_batch: Callable[[int, int], None] | None = None,
) -> EvalResult:
    """Answer the task's (remaining) questions in batches, appending to the answer file, then score it.

    Args:
        config: what to run (:class:`EvalConfig`).
        model, processor: an already loaded model and its processor (a sweep reuses one); None: loaded from
            ``config.model`` with :func:`flowkern.hf.loading.load_model` after every input has been checked.
        progress: show a tqdm bar (questions, rate, ETA) on stderr.
        on_batch: called as ``on_batch(done, total)`` after each batch is on disk.

    Returns:
        an :class:`EvalResult`; ``metrics`` is also in ``<out>/metrics.json``.

    Raises:
        EvalUsageError: see :func:`prepare`; also an output folder that cannot be claimed
            (:func:`flowkern.outdir.claim`: in use by another run, of another kind, not writable), a model that
            cannot be loaded or pruning settings the model does not take (before anything is written).
        OSError: a failed write (full disk, ...), naming the path; the answers already written are kept.
    """
    try:
        owned = outdir.claim(config.out, "eval", overwrite=config.overwrite)
    except outdir.OutputError as exc:
        raise EvalUsageError(str(exc)) from None
    with owned:
        return _run_owned(config, model, processor, progress, on_batch)


def _run_owned(config: EvalConfig, model: Any, processor: Any, progress: bool,
               on_batch: Callable[[int, int], None] | None) -> EvalResult:
    """:func:`run_eval` once the folder is owned."""
    plan = prepare(config, progress=progress)
    task, settings = plan.task, plan.settings
    pruning = None
    if plan.todo:
        if model is None or processor is None:
            from flowkern.hf.loading import load_model

            try:
                model, processor = load_model(config.model, device=config.device, dtype=config.dtype)
            except (FileNotFoundError, ValueError, ImportError) as exc:
                raise EvalUsageError(str(exc)) from None
        if config.prune.enabled:
            try:
                pruning = prune(model, config.prune)
            except (ValueError, NotImplementedError) as exc:
                where = (f"--prune-layer {config.prune.layer}" if config.prune.schedule is None else
                         f"--prune-schedule {','.join(f'{x}:{k}' for x, k in config.prune.schedule)}")
                raise EvalUsageError(f"{where}: {exc}") from None
    plan.start_files()

    model_id = Path(str(config.model).rstrip("/")).name or str(config.model)
    total, done = len(plan.samples), len(plan.samples) - len(plan.todo)
    bar = None
    if progress and plan.todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=done, unit="q", desc=f"{task.name}", dynamic_ncols=True, smoothing=0.1)
    start = time.perf_counter()
    generated = 0
    warned = False
    try:
        for i in range(0, len(plan.todo), config.batch_size):
            batch = plan.todo[i: i + config.batch_size]
            images = open_images([s.image for s in batch])  # table data: decoded from the files here
            prompts = [s.prompt for s in batch]
            inputs = build_inputs(processor, model, images, prompts)
            if not warned:
                warned = _warn_positions(model, inputs, settings["max_new_tokens"])
            texts = generate_answers(model, processor, images, prompts, max_new_tokens=settings["max_new_tokens"],
                                     pruning=pruning, inputs=inputs)
            append_lines(plan.answers_path, [answer_record(task, s, t, model_id)
                                             for s, t in zip(batch, texts, strict=True)])
            generated += len(batch)
            if bar is not None:
                bar.update(len(batch))
            if on_batch is not None:
                on_batch(done + generated, total)
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - start
    metrics = task.score(task.read_predictions(plan.answers_path))
    atomic_write_json(plan.metrics_path, metrics)
    return EvalResult(metrics=metrics, out=plan.out, answers_path=plan.answers_path, metrics_path=plan.metrics_path,
                      settings=settings, generated=generated, skipped=len(plan.samples) - len(plan.todo),
                      seconds=seconds, torn_line=plan.torn_line, extra={"config": asdict(config)})
