"""``flowkern score``: score an answer file against a benchmark's official files (no model, no images needed).

.. code-block:: console

    flowkern score --task pope --data playground/data/eval/pope/coco --predictions answers.jsonl [--strict]
    flowkern score --task sqa --data playground/data/eval/scienceqa --predictions answers.jsonl
    flowkern score --task textvqa --data playground/data/eval/textvqa/TextVQA_0.5.1_val.json --predictions a.jsonl
    flowkern score --task chair --data coco/annotations --predictions captions.jsonl --out chair.json

Predictions are LLaVA answer files (JSON lines with ``question_id`` and ``text``; for chair ``image_id`` and
``caption``), matched to the questions by id. Prints a summary, then the metrics as one JSON object on the last line
of stdout, and writes the same object to ``--out`` (atomically; an existing file only with ``--overwrite``; never one
of the input files, ``--predictions`` or ``--data``, whatever path leads to it).
User errors (missing file, malformed line, unknown task or id, duplicate id) print one line and exit 2.
Registered in :data:`flowkern.cli.SUBCOMMANDS` as ``"score"``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from flowkern.cli.common import UsageError, output_path, summary_text, user_errors
from flowkern.eval import TASKS

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``flowkern score`` on the ``flowkern`` command's subparsers."""
    p = subparsers.add_parser(
        "score",
        help="score an answer file on POPE, ScienceQA-IMG, TextVQA or CHAIR (official files, community rules)",
        description="Match the predictions to the benchmark's questions by id and print the metrics (fractions in "
                    "[0, 1]) as one JSON object on the last line; --out writes the same object to a file.",
    )
    p.add_argument("--task", required=True, metavar="TASK", help=f"one of: {', '.join(TASKS)}")
    p.add_argument("--data", required=True, type=Path, metavar="PATH",
                   help="pope: a coco_pope_<split>.json file or a folder of them; sqa: the folder with "
                        "problems.json and pid_splits.json; textvqa: TextVQA_0.5.1_val.json (or its folder); "
                        "chair: the folder with instances_val2014.json and captions_val2014.json")
    p.add_argument("--predictions", required=True, type=Path, metavar="FILE",
                   help="answer file: JSON lines with question_id and text (chair: image_id and caption)")
    p.add_argument("--strict", action="store_true",
                   help="pope only: lmms-eval's exact yes/no parsing instead of LLaVA eval_pope's lenient one")
    p.add_argument("--split", default=None, metavar="SPLIT",
                   help="sqa: the pid_splits.json split to score (default test); parquet / dataset-id data: the "
                        "dataset's split or SUBSET/SPLIT (docs/data.md)")
    p.add_argument("--out", type=output_path, default=None, metavar="FILE",
                   help="also write the metrics JSON here (not one of the input files)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.set_defaults(func=run)


def _same_file(a: Path, b: Path) -> bool:
    try:
        if os.path.realpath(a) == os.path.realpath(b):
            return True
        return a.exists() and b.exists() and os.path.samefile(a, b)  # hard links too
    except OSError:
        return False


def _refuse_an_input(out: Path | str, **inputs: Path) -> None:
    """Refuse an ``--out`` that is (through any path: symlink, hard link, another spelling) one of ``inputs``'s
    files, or an existing file inside an input folder (``--data`` as a folder of question files): writing the metrics
    would replace an input, ``--overwrite`` or not."""
    if not str(out).strip():
        return  # refused as an empty path by check_output_path
    target = Path(out).expanduser()
    for name, given in inputs.items():
        path = Path(given).expanduser()
        inside = (path.is_dir() and (target.exists() or target.is_symlink())
                  and os.path.realpath(target).startswith(os.path.realpath(path) + os.sep))
        if _same_file(target, path) or inside:
            what = f"a file of the --{name} folder {given}" if inside else f"the --{name} file {given}"
            raise UsageError(f"--out {out}: is {what}; the metrics would replace it (--overwrite or not): choose "
                             "another --out")


def run(args: argparse.Namespace) -> int:
    """The ``score`` subcommand (see :func:`add_parser`)."""
    from flowkern._io import atomic_write_json, check_output_path
    from flowkern.eval import get_task
    from flowkern.eval.tasks.parquet import is_table_source

    with user_errors():
        if args.out is not None:
            _refuse_an_input(args.out, predictions=args.predictions, data=args.data)
        out = check_output_path(args.out, overwrite=args.overwrite) if args.out is not None else None
        if args.task not in TASKS:
            raise UsageError(f"--task: unknown task {args.task!r} (choose from {', '.join(TASKS)})")
        if args.strict and args.task != "pope":
            raise UsageError(f"--strict applies to --task pope only, not {args.task}")
        if args.split is not None and args.task != "sqa" and not is_table_source(args.data):
            raise UsageError(f"--split applies to --task sqa and to table data only, not to {args.task}'s "
                             f"official files")
        options = {"pope": {"strict": args.strict}}.get(args.task, {})
        if args.split is not None:
            options["split"] = args.split
        if not args.predictions.is_file():
            raise UsageError(f"--predictions: {args.predictions} not found")
        task = get_task(args.task, args.data, **options)
        predictions = task.read_predictions(args.predictions)
        result = task.score(predictions)
    print(summary_text(result))
    line = json.dumps(result, allow_nan=False)
    if out is not None:
        atomic_write_json(out, result)
        print(f"wrote {out}")
    print(line)
    return 0
