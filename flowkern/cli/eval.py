"""``flowkern eval``: answer a benchmark's questions with a model (batched greedy decoding, optionally pruned), write
LLaVA's answer file as it goes, then score it.

.. code-block:: console

    flowkern eval --model llava-hf/llava-1.5-7b-hf --task pope --data playground/data/eval/pope/coco \\
        --images playground/data/eval/pope/val2014 --batch-size 16 --prune-layer 2 --keep 0 --out runs/pope-L2

writes ``answers.jsonl`` (appended and fsync-ed per batch), ``run.json`` (the settings) and ``metrics.json`` (the
same numbers ``flowkern score`` gives on that answer file) to ``--out``, and prints the metrics as one JSON object on
the last line. A rerun with the same settings resumes (questions already answered are skipped); one with other
settings is refused. User errors print one line and exit 2 before any model is loaded; Ctrl-C prints one line and
exits 130, keeping the answers so far. The engine is :func:`flowkern.eval.run.run_eval`. Registered in
:data:`flowkern.cli.SUBCOMMANDS` as ``"eval"``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from flowkern.cli.common import (
    UsageError,
    add_answer_arguments,
    add_device_arguments,
    add_prune_arguments,
    add_task_arguments,
    config_from_args,
    error_line,
    output_path,
    spec_from_args,
    summary_text,
)

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``flowkern eval`` on the ``flowkern`` command's subparsers."""
    p = subparsers.add_parser(
        "eval",
        help="answer POPE / ScienceQA-IMG / TextVQA / CHAIR questions with a model (optionally pruned) and score them",
        description="Batched greedy answers (left padding) to the task's questions, appended to <out>/answers.jsonl "
                    "in LLaVA's answer-file format batch by batch, then scored like `flowkern score` "
                    "(<out>/metrics.json; the last stdout line is the metrics JSON). Reruns resume.",
    )
    add_task_arguments(p)
    p.add_argument("--out", required=True, type=output_path, metavar="DIR",
                   help="output folder: answers.jsonl, run.json, metrics.json (an existing run there is resumed)")
    p.add_argument("--overwrite", action="store_true", help="discard the answers already in --out and start afresh")
    add_answer_arguments(p)
    add_device_arguments(p)
    add_prune_arguments(p)
    p.set_defaults(func=run)


def _count_lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(1 for line in f if line.endswith(b"\n") and line.strip())
    except OSError:
        return 0


def run(args: argparse.Namespace) -> int:
    """The ``eval`` subcommand (see :func:`add_parser`)."""
    from flowkern.eval.answers import ANSWERS_FILE
    from flowkern.eval.run import EvalConfig, EvalUsageError, run_eval

    config = config_from_args(EvalConfig, args, prune=spec_from_args(args))  # refuses pruning flags without L
    answers = Path(args.out).expanduser().absolute() / ANSWERS_FILE
    try:
        result = run_eval(config, progress=True)
    except EvalUsageError as exc:
        raise UsageError(str(exc)) from None
    except KeyboardInterrupt:
        kept = _count_lines(answers)
        where = f"; {kept} answers kept in {answers}, rerun the same command to resume" if answers.exists() else ""
        error_line(f"flowkern eval: interrupted{where}")
        return 130
    rate = result.questions_per_second
    speed = f" in {result.seconds:.1f} s ({rate:.2f} questions/s)" if rate else ""
    resumed = f", {result.skipped} already answered" if result.skipped else ""
    torn = " (dropped a torn last line left by an interrupted run)" if result.torn_line else ""
    print(f"answered {result.generated} questions{speed}{resumed}{torn}")
    print(summary_text(result.metrics))
    print(f"wrote {result.answers_path}, {result.metrics_path}")
    print(json.dumps(result.metrics, allow_nan=False))
    return 0
