"""``flowkern compare``: answer a task unpruned and under each pruning method at each budget; per point the task
metric, the image tokens kept, the tokens per decoder layer, the measured prefill time and decode speed and an
estimated FLOPs per answer; a Pareto figure (metric vs FLOPs, metric vs kept tokens) and where each method's kept
tokens lie on the image grid.

.. code-block:: console

    flowkern compare --model llava-hf/llava-1.5-7b-hf --task pope --data DIR --images DIR --out runs/cmp \\
        --methods fastv=attention@2 random=random@2 grid=grid@2 pdrop=attention@2:0.5,8:0.25 --budgets 0.5,0.25,0.1
    torchrun --nproc-per-node 8 -m flowkern.cli compare ...        # batches sharded, merged on rank 0

writes ``<out>/points/<point>/`` (each an ``flowkern eval`` folder), ``results.jsonl``, ``sweep.json``,
``compare.csv``, ``compare.json``, ``compare.png`` and ``compare_maps.png``; the last stdout line is a JSON summary.
A rerun resumes; other settings (methods, budgets among them) are refused. User errors print one line and exit 2
before a model is loaded; Ctrl-C exits 130 keeping the answers so far. The engine is
:mod:`flowkern.eval.sweep.compare`. Registered in :data:`flowkern.cli.SUBCOMMANDS` as ``"compare"``.
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
    """Register ``flowkern compare`` on the ``flowkern`` command's subparsers."""
    p = subparsers.add_parser(
        "compare", help="compare pruning methods: metric vs image tokens kept, FLOPs, prefill time, decode speed",
        description="Answers the task unpruned (baseline) and under each method at each budget (a keep fraction of "
                    "the image tokens). A method is [NAME=]SCORER@LAYER or [NAME=]SCORER@L1:K1,L2:K2,... (a "
                    "schedule, scaled so that its last stage keeps the budget), optionally +merge. Per point: the "
                    "task metric, image tokens kept, tokens per decoder layer, measured prefill seconds, decode "
                    "tokens/s and estimated FLOPs per answer. Reruns resume; works under torchrun.")
    add_task_arguments(p)
    p.add_argument("--out", required=True, type=output_path, metavar="DIR",
                   help="folder: points/, results.jsonl, compare.csv, compare.json, compare.png, compare_maps.png "
                        "(resumed)")
    p.add_argument("--methods", required=True, nargs="+", metavar="METHOD",
                   help="methods, space-separated: [NAME=]SCORER@LAYER or [NAME=]SCORER@L1:K1,L2:K2,... [+merge], "
                        "e.g. fastv=attention@2 random=random@2 pdrop=attention@2:0.5,8:0.25 (SCORER: a --rank "
                        "name, flowkern info lists them)")
    p.add_argument("--budgets", default="0.5,0.25,0.1", metavar="FRACTIONS",
                   help="keep fractions of the image tokens in (0, 1), comma-separated (default 0.5,0.25,0.1)")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the random scorer (default 0)")
    p.add_argument("--map-budget", type=float, default=None, metavar="B",
                   help="the budget of the kept-token maps (default the smallest)")
    add_answer_arguments(p)
    add_device_arguments(p, torchrun=True)
    p.add_argument("--reuse", action="store_true",
                   help="share the image encoding and the layers below each point's first stage between points: "
                        "the same answers, faster, but the measured times leave out what is shared")
    p.add_argument("--overwrite", action="store_true", help="discard the run in --out and start afresh")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """The ``compare`` subcommand (see :func:`add_parser`)."""
    from flowkern.eval.sweep.compare import CompareConfig, run_compare
    from flowkern.eval.sweep.dist import process_index

    check_counts({"--batch-size": args.batch_size, "--limit": args.limit, "--max-new-tokens": args.max_new_tokens})
    config = config_from_args(CompareConfig, args, methods=tuple(args.methods), reuse=args.reuse)
    result = run_resumable("compare", args.out, lambda: run_compare(config, progress=process_index() == 0))
    if result is None:
        return 130
    if process_index() != 0:
        return 0
    base = result.baseline
    print(f"answered {result.generated} (point, question) pairs in {result.seconds:.1f} s")
    print(f"{'point':<28} {base['metric']:>8} {'kept':>7} {'GFLOPs':>10} {'prefill s':>10} {'decode tok/s':>12}")
    for r in [base, *result.points]:
        value = "" if r["value"] is None else f"{r['value'] * 100:.2f}"
        dec = r.get("decode_tokens_per_second")
        print(f"{r['point']:<28} {value:>8} {r['kept_image_tokens']:>7.1f} {r['flops_per_answer'] / 1e9:>10.4f} "
              f"{r['prefill_seconds']:>10.3f} {'' if dec is None else f'{dec:.1f}':>12}")
    print(f"wrote {', '.join(str(p) for p in result.files.values())}")
    print(json.dumps({"baseline": base["value"], "points": {r["point"]: {k: r.get(k) for k in (
        "value", "kept_image_tokens", "flops_per_answer")} for r in result.points}}, allow_nan=False))
    return 0
