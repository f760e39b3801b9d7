"""``flowkern shapes``: write a fresh synthetic shapes set in a real benchmark's official layout.

.. code-block:: console

    flowkern shapes --task pope --seed 1000 --num 100 --out shapes-pope
    flowkern shapes --task caption --seed 7 --num 500 --out shapes-caption

Tasks (:mod:`flowkern.shapes`): ``pope`` (POPE question files), ``sqa`` (ScienceQA problems.json +
pid_splits.json + images tree), ``textvqa`` (TextVQA_0.5.1_val.json + train_images) and ``caption`` (COCO
instances + captions for CHAIR, with the shapes object vocabulary). The same seed writes the same files; a fresh
seed gives a held-out set. Prints what was written and, on the last line, the ``flowkern eval`` command that scores
the set. Registered in :data:`flowkern.cli.SUBCOMMANDS` as ``"shapes"``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from flowkern.cli.common import UsageError, user_errors

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``flowkern shapes`` on the ``flowkern`` command's subparsers."""
    from flowkern.shapes import ANALOGUES

    p = subparsers.add_parser(
        "shapes",
        help="write a synthetic shapes set (pope, sqa, textvqa, caption) in the real benchmark's file format",
        description="Draw --num scenes of coloured shapes from --seed and write the questions and images of one "
                    "task analogue to --out, in the official layout of POPE, ScienceQA, TextVQA or COCO/CHAIR, so "
                    "`flowkern eval` and `flowkern score` read them like the real benchmark. Prints the eval command.",
    )
    p.add_argument("--task", required=True, choices=ANALOGUES, help="the task analogue to write")
    p.add_argument("--seed", type=int, default=0, help="the set's seed (default 0; a fresh seed = a held-out set)")
    p.add_argument("--num", type=int, default=100, metavar="N",
                   help="images (pope: 2 questions per image and split; others: one question per image; "
                        "default 100)")
    p.add_argument("--out", required=True, type=Path, help="output folder (created; existing files are replaced)")
    p.add_argument("--model", default="demo", help="model named in the printed eval command (default demo)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """The ``shapes`` subcommand (see :func:`add_parser`)."""
    from flowkern.shapes import eval_command, write_task

    if args.num < 1:
        raise UsageError(f"--num {args.num}: expected at least 1")
    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out}: is a file, expected a folder")
    with user_errors():
        write_task(args.task, args.out, seed=args.seed, num=args.num)
    files = sorted(str(p.relative_to(args.out)) for p in args.out.iterdir())
    print(f"wrote shapes-{args.task} (seed {args.seed}, {args.num} images) to {args.out}: {', '.join(files)}")
    print("score it with:")
    print(eval_command(args.task, args.out, model=args.model))
    return 0
