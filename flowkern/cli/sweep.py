"""``flowkern sweep``: score a task unpruned and with the image dropped from each decoder layer L on; report the
information-flow cliff layer and draw the curve (the paper's Figure 5).

.. code-block:: console

    flowkern sweep --model llava-hf/llava-1.5-7b-hf --task pope --data DIR --images DIR --layers all --out runs/pope
    torchrun --nproc-per-node 8 -m flowkern.cli sweep ...            # batches sharded over 8 GPUs, merged on rank 0

writes ``<out>/points/<point>/`` (each an ``flowkern eval`` folder), ``results.jsonl``, ``summary.csv``,
``cliff.json`` and ``sweep.png``; the last stdout line is ``cliff.json``'s headline as JSON. A rerun resumes; other
settings are refused. User errors print one line and exit 2 before a model is loaded; Ctrl-C exits 130 keeping the
answers so far. The engine is :mod:`flowkern.eval.sweep`. Registered in :data:`flowkern.cli.SUBCOMMANDS` as ``"sweep"``.
"""

from __future__ import annotations

import argparse
import json

from flowkern.cli.common import (
    UsageError,
    add_answer_arguments,
    add_device_arguments,
    add_prune_arguments,
    add_task_arguments,
    check_counts,
    config_from_args,
    output_path,
    run_resumable,
    spec_from_args,
)

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``flowkern sweep`` on the ``flowkern`` command's subparsers."""
    p = subparsers.add_parser(
        "sweep", help="truncation sweep over decoder layers: the information-flow cliff layer (paper Figure 5)",
        description="Scores the task unpruned (baseline) and with image tokens removed from each decoder layer L on "
                    "(flowkern.prune, k = 0 by default). Cliff layer: the smallest L such that every L' >= L scores "
                    "within --tolerance points of the baseline on the task's main metric (POPE F1, SQA/TextVQA "
                    "accuracy, CHAIR_S). Reruns resume; works under torchrun.")
    add_task_arguments(p)
    p.add_argument("--out", required=True, type=output_path, metavar="DIR",
                   help="sweep folder: points/, results.jsonl, summary.csv, cliff.json, sweep.png (resumed)")
    p.add_argument("--layers", default="all", metavar="SPEC",
                   help="0-based decoder layers: all (default), a range 0-31, or a list 0,2,4,8-12")
    p.add_argument("--control", default="", metavar="RANKS",
                   help="control series at the same layers and K: scorers as for --rank, e.g. random,grid (needs "
                        "--keep != 0)")
    add_prune_arguments(p, fields=("keep", "rank", "seed", "merge", "schedule"), flags={"seed": "--seed"},
                        defaults=True)
    p.add_argument("--search", default="full", choices=["full", "bisect"],
                   help="full: every layer (default); bisect: O(log layers) points when the curve is monotone, "
                        "every layer when it is not")
    p.add_argument("--tolerance", type=float, default=1.0, metavar="POINTS",
                   help="cliff tolerance in points of the main metric (default 1 = 0.01 of a ratio)")
    add_answer_arguments(p)
    add_device_arguments(p, torchrun=True)
    p.add_argument("--no-reuse", action="store_true",
                   help="run each point on its own (no shared prefill below L, images encoded at every point): for "
                        "checking, slower")
    p.add_argument("--overwrite", action="store_true", help="discard the sweep in --out and start afresh")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """The ``sweep`` subcommand (see :func:`add_parser`)."""
    from flowkern.eval.sweep import SweepConfig, run_sweep
    from flowkern.eval.sweep.dist import process_index

    controls = tuple(r.strip() for r in args.control.split(",") if r.strip())
    if args.prune_schedule is not None:  # refused before PruneSpec sees it beside --keep
        raise UsageError("--prune-schedule: a sweep varies the one layer it prunes from (one point per layer of "
                         "--layers), so it takes no schedule; compare schedules with flowkern compare")
    spec = spec_from_args(args)
    config = config_from_args(SweepConfig, args, controls=controls, reuse=not args.no_reuse, prune=spec)
    check_counts({"--batch-size": args.batch_size, "--limit": args.limit, "--max-new-tokens": args.max_new_tokens})
    result = run_resumable("sweep", args.out, lambda: run_sweep(config, progress=process_index() == 0))
    if result is None:
        return 130
    if process_index() != 0:
        return 0
    c = result.cliff
    print(f"answered {result.generated} (point, question) pairs in {result.seconds:.1f} s")
    print(f"baseline {c['metric']} {result.baseline * 100:.2f}; " + ", ".join(
        f"L{x} {v * 100:.2f}" for x, v in sorted(result.curve.items())))
    print(f"cliff layer: {c['cliff_layer']} (tolerance {c['tolerance_points']:g} points); no-harm layer: "
          f"{c['no_harm_layer']}; {c['note']}")
    print(f"wrote {', '.join(str(p) for p in result.files.values())}")
    print(json.dumps({k: c[k] for k in ("task", "metric", "baseline", "cliff_layer", "no_harm_layer",
                                        "first_no_harm_layer", "monotone", "tolerance_points")}, allow_nan=False))
    return 0
