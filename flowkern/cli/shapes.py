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

from flowkern.cli.common import UsageError, output_path, user_errors

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
    p.add_argument("--out", required=True, type=output_path,
                   help="output folder (created; a previous shapes set's files are replaced; a folder holding other "
                        "files is refused)")
    p.add_argument("--model", default="demo", help="model named in the printed eval command (default demo)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """The ``shapes`` subcommand (see :func:`add_parser`)."""
    from flowkern import outdir
    from flowkern.shapes import eval_command, write_task

    if args.num < 1:
        raise UsageError(f"--num {args.num}: expected at least 1")
    with outdir.claim(args.out, "shapes", overwrite=True) as owned, user_errors():
        write_task(args.task, owned.path, seed=args.seed, num=args.num)
    files = sorted(str(p.relative_to(args.out)) for p in args.out.iterdir() if p.name != outdir.LOCK_FILE)
    print(f"wrote shapes-{args.task} (seed {args.seed}, {args.num} images) to {args.out}: {', '.join(files)}")
    print("score it with:")
    print(eval_command(args.task, args.out, model=args.model))
    return 0
