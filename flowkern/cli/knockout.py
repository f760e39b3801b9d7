"""``flowkern knockout``: answer a task with one attention edge cut in a window of decoder layers, for each edge and
window start over the depth; per window the relative change in the probability of the model's own unblocked answer
and the task metric (the CVPR 2025 cross-modal information-flow curves).

.. code-block:: console

    flowkern knockout --model llava-hf/llava-1.5-7b-hf --task pope --data DIR --images DIR --out runs/ko
    flowkern knockout --model demo --task pope --data DIR --images DIR --edges image->last,user->last --window 2 ...
    torchrun --nproc-per-node 8 -m flowkern.cli knockout ...        # batches sharded, merged on rank 0

writes ``<out>/points/<point>/`` (each an ``flowkern eval`` folder), ``results.jsonl``, ``knockout.csv``,
``knockout.json`` and ``knockout.png``; the last stdout line is a JSON summary. A rerun resumes; other settings are
refused. User errors print one line and exit 2 before a model is loaded; Ctrl-C exits 130 keeping the answers so far.
The engine is :mod:`flowkern.eval.sweep.knockout`. Registered in :data:`flowkern.cli.SUBCOMMANDS` as
``"knockout"``.
"""

from __future__ import annotations

import argparse
import json

from flowkern.cli.common import (
    add_answer_arguments,
    add_device_arguments,
    add_task_arguments,
    check_counts,
    config_from_args,
    output_path,
    run_resumable,
)

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``flowkern knockout`` on the ``flowkern`` command's subparsers."""
    p = subparsers.add_parser(
        "knockout", help="attention knockout curves: cut segment -> segment edges in a sliding window of layers",
        description="Answers the task unblocked (baseline) and, for each edge src->dst and each window of --window "
                    "consecutive decoder layers, with the queries of segment dst unable to read the keys of segment "
                    "src there (flowkern.knockout). Segments: system, image, user (the question), generated, last "
                    "(the last prompt position). Per window: the relative change (%) in the probability of the "
                    "unblocked model's first answer token, and the task metric. Reruns resume; works under torchrun.")
    add_task_arguments(p)
    p.add_argument("--out", required=True, type=output_path, metavar="DIR",
                   help="folder: points/, results.jsonl, knockout.csv, knockout.json, knockout.png (resumed)")
    p.add_argument("--edges", default="image->user,image->last,user->last,last->last", metavar="EDGES",
                   help="comma-separated src->dst edges, one curve each (default the CVPR four: "
                        "image->user,image->last,user->last,last->last)")
    p.add_argument("--window", type=int, default=None, metavar="K",
                   help="layers per window (default the CVPR 9 of 32 scaled to the depth: max(1, round(9 * L / 32)))")
    p.add_argument("--layers", default="all", metavar="SPEC",
                   help="window starts, 0-based: all (default: every start with a full window) or e.g. 0-20 or "
                        "0,4,8")
    add_answer_arguments(p)
    add_device_arguments(p, torchrun=True)
    p.add_argument("--no-reuse", action="store_true",
                   help="run each point on its own (no shared layers below the window, images encoded at every "
                        "point): for checking, slower")
    p.add_argument("--overwrite", action="store_true", help="discard the run in --out and start afresh")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """The ``knockout`` subcommand (see :func:`add_parser`)."""
    from flowkern.eval.sweep.dist import process_index
    from flowkern.eval.sweep.knockout import KnockoutConfig, run_knockout

    edges = tuple(e.strip() for e in args.edges.split(",") if e.strip())
    check_counts({"--batch-size": args.batch_size, "--limit": args.limit, "--max-new-tokens": args.max_new_tokens,
                  "--window": args.window})
    config = config_from_args(KnockoutConfig, args, edges=edges, reuse=not args.no_reuse)
    result = run_resumable("knockout", args.out, lambda: run_knockout(config, progress=process_index() == 0))
    if result is None:
        return 130
    if process_index() != 0:
        return 0
    print(f"answered {result.generated} (point, question) pairs in {result.seconds:.1f} s; window {result.window}")
    summary = {}
    for edge, curve in result.curves.items():
        worst = min(curve, key=lambda a: curve[a]["p_change"]) if curve else None
        summary[edge] = None if worst is None else {"worst_first_layer": worst, **curve[worst]}
        print(f"{edge}: " + ", ".join(f"L{a} {v['p_change']:+.1f}%" for a, v in sorted(curve.items())))
    print(f"wrote {', '.join(str(p) for p in result.files.values())}")
    print(json.dumps({"baseline": result.baseline, "window": result.window, "worst": summary}, allow_nan=False))
    return 0
