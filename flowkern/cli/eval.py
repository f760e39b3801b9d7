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
:data:`flowkern.cli.SUBCOMMANDS` as ``"flowkern.cli.eval"``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["add_parser", "run"]

_TASK_NAMES = ("pope", "sqa", "textvqa", "chair")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``flowkern eval`` on the ``flowkern`` command's subparsers."""
    from flowkern.cli.generate import add_prune_arguments

    p = subparsers.add_parser(
        "eval",
        help="answer POPE / ScienceQA-IMG / TextVQA / CHAIR questions with a model (optionally pruned) and score them",
        description="Batched greedy answers (left padding) to the task's questions, appended to <out>/answers.jsonl "
                    "in LLaVA's answer-file format batch by batch, then scored like `flowkern score` "
                    "(<out>/metrics.json; the last stdout line is the metrics JSON). Reruns resume.",
    )
    p.add_argument("--model", required=True,
                   help="hub id (already in the Hugging Face cache; never downloaded) or local directory")
    p.add_argument("--task", required=True, metavar="TASK", help=f"one of: {', '.join(_TASK_NAMES)}")
    p.add_argument("--data", required=True, type=Path, metavar="PATH",
                   help="the task's official files, as for `flowkern score --data`")
    p.add_argument("--images", type=Path, default=None, metavar="DIR",
                   help="image folder (pope: COCO val2014, required; sqa: default <data>/images; textvqa: default "
                        "<data folder>/train_images; chair: default <data>/val2014)")
    p.add_argument("--out", required=True, type=Path, metavar="DIR",
                   help="output folder: answers.jsonl, run.json, metrics.json (an existing run there is resumed)")
    p.add_argument("--overwrite", action="store_true", help="discard the answers already in --out and start afresh")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="answer only the first N questions")
    p.add_argument("--batch-size", type=int, default=1, metavar="B", help="questions per generate call (default 1)")
    p.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                   help="answer length limit (default 128; chair 512)")
    p.add_argument("--strict", action="store_true",
                   help="pope only: score with lmms-eval's exact yes/no parsing (scoring only; answers unchanged)")
    p.add_argument("--split", default="test", help="sqa only: the pid_splits.json split (default test)")
    p.add_argument("--ocr", action="store_true", help="textvqa only: add the OCR tokens to the prompt")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="weights dtype (auto: float32 on CPU, the checkpoint's dtype on CUDA)")
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
    from flowkern.cli import UsageError
    from flowkern.cli import generate as cli_generate
    from flowkern.cli.score import summary_text
    from flowkern.eval.run import ANSWERS_FILE, EvalConfig, EvalUsageError, run_eval

    check = getattr(cli_generate, "check_prune_arguments", None)
    if check is not None:  # refuses pruning flags without --prune-layer, then fills in their defaults
        check(args)
    prune = {name: default if getattr(args, name, None) is None else getattr(args, name)
             for name, default in (("keep", 0), ("rank", "attention"), ("prune_seed", 0), ("prune_when", "prefill"))}
    config = EvalConfig(
        model=args.model, task=args.task, data=args.data, out=args.out, images=args.images, limit=args.limit,
        batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, prune_layer=args.prune_layer, **prune,
        strict=args.strict, split=args.split, ocr=args.ocr, device=args.device, dtype=args.dtype,
        overwrite=args.overwrite,
    )
    answers = Path(args.out).expanduser().absolute() / ANSWERS_FILE
    try:
        result = run_eval(config, progress=True)
    except EvalUsageError as exc:
        raise UsageError(str(exc)) from None
    except KeyboardInterrupt:
        kept = _count_lines(answers)
        where = f"; {kept} answers kept in {answers}, rerun the same command to resume" if answers.exists() else ""
        print(f"flowkern eval: interrupted{where}", file=sys.stderr)
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
