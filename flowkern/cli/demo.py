"""``flowkern demo``: the paper's analysis end to end on the shipped shapes model, in one HTML report.

.. code-block:: console

    flowkern demo --out runs/demo            # ~5 minutes on 2 CPU cores
    flowkern demo --quick --out runs/quick   # fewer questions, under 2 minutes

writes ``<out>/report.html`` (self-contained: figures embedded, no network), ``figures/*.png``, ``tables/*.csv``
and ``.json``, ``summary.json`` and the sweep folders, all at once (:class:`flowkern._io.AtomicDir`): an interrupted
run leaves the previous report or nothing. Prints the headline and the plain-words conclusions; the last stdout line
is the headline as JSON. The engine is :mod:`flowkern.demo.report`. Registered in :data:`flowkern.cli.SUBCOMMANDS`
as ``"demo"``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from flowkern.cli.common import config_from_args, output_path, user_errors

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``flowkern demo`` on the ``flowkern`` command's subparsers."""
    p = subparsers.add_parser(
        "demo", help="the paper's analysis end to end on the shipped shapes model, in one HTML report",
        description="On fresh shapes sets of the four task analogues (POPE, SQA, TextVQA, CHAIR captions): the "
                    "answer's attention share per layer and answer->image maps (Figure 2), LLaVA-CAM grids "
                    "(Figures 3/4), a truncation sweep over every layer per task with a random-rank control and "
                    "the cliff layer (Figure 5, Table 1), the speed of the model pruned at its cliff layer, and a "
                    "plain-words section computed from the numbers. Offline; writes --out/report.html.")
    p.add_argument("--out", type=output_path, default=Path("runs/demo"), metavar="DIR",
                   help="report folder (default runs/demo); replaced as a whole, a previous report only with "
                        "--overwrite")
    p.add_argument("--quick", action="store_true",
                   help="fewer questions and repeats (48 POPE, 32 SQA, 32 TextVQA, 16 captions): under 2 minutes")
    p.add_argument("--model", default="demo",
                   help="demo (the shipped shapes model, default) or the directory of another shapes-trained model")
    p.add_argument("--seed", type=int, default=1000, help="seed of the shapes sets (default 1000)")
    p.add_argument("--keep", type=int, default=16, metavar="K",
                   help="image tokens kept by the attention-ranked and random-control sweeps (default 16)")
    p.add_argument("--tolerance", type=float, default=None, metavar="POINTS",
                   help="cliff tolerance in points for every task (default: per task the larger of 1 point and "
                        "one question's worth, 100/n)")
    p.add_argument("--threads", type=int, default=1, metavar="N",
                   help="torch CPU threads (default 1: fastest for this tiny model on a shared machine)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    p.add_argument("--overwrite", action="store_true", help="replace the previous report in --out")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """The ``demo`` subcommand (see :func:`add_parser`)."""
    from flowkern.demo.report import DemoConfig, check_config, load, run_demo

    config = config_from_args(DemoConfig, args)
    with user_errors():  # every mistake the user can fix is found here, before any work
        check_config(config)
        model, processor = load(config)
    result = run_demo(config, model=model, processor=processor, progress=True)
    summary = result.records
    h = summary.headline
    print(f"flowkern demo: report {result.report}  ({result.seconds:.0f} s)")
    for label, layer in h.cliff.items():
        used = {"clear": "", "weak": "  (not shown that the answers use the image: within the sampling noise)",
                "none": "  (the image does not matter for this task on this model)",
                "hurts": "  (the answers are better without the image)"}[h.image_use[label]]
        print(f"  {label:16s} {h.metric[label]:9s} baseline {100 * h.baseline[label]:5.1f} %   cliff layer "
              f"{'none' if layer is None else layer}{used}")
    for label, sp in h.speed.items():
        at = f"L={sp.layer}" + ("" if sp.cliff_layer == sp.layer else
                                " (no cliff: the middle layer)" if sp.cliff_layer is None else
                                f" for cliff {sp.cliff_layer}")
        print(f"  speed pruned at the cliff ({label}, {at}, batch {sp.batch}): prefill "
              f"{sp.prefill_speedup:.2f}x, decode {sp.decode_speedup:.2f}x vs unpruned")
    print("in plain words:")
    for c in summary.conclusions:
        print(f"  [{c.verdict}] {c.topic}: {c.text}")
    print(json.dumps(result.summary["headline"]))
    return 0
