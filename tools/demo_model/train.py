"""Train the demo model (the tiny LLaVA behind ``--model demo``) on the synthetic shapes world.

.. code-block:: console

    python -m tools.demo_model.train --out flowkern/demo/model --seed 0      # or: make demo-model

Each flag sets one :class:`~tools.demo_model.config.TrainConfig` field (:data:`FLAGS`); a flag left out keeps the
field's default, the shipped recipe. ``--out`` is the folder written (see :func:`tools.demo_model.loop.train`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flowkern import shapes as world
from tools.demo_model.config import PRECISIONS, TrainConfig, check_init, check_task_mix
from tools.demo_model.loop import train

__all__ = ["Flag", "FLAGS", "config_from_args", "main"]


def _task_mix(text: str) -> dict[str, float]:
    try:
        return check_task_mix({k: float(v) for k, v in (part.split("=") for part in text.split(","))})
    except ValueError as exc:
        raise ValueError(f"--task-mix {text!r}: {exc}") from None


def _sqa_boost(text: str) -> tuple[str, float] | None:
    if text == "none":
        return None
    kind, _, share = text.partition("=")
    try:
        boost = (kind, float(share))
    except ValueError:
        boost = None
    if boost is None or kind not in world.SQA_KINDS or not 0 <= boost[1] <= 1:
        raise ValueError(f"--sqa-boost {text!r}: KIND=SHARE with KIND one of {', '.join(world.SQA_KINDS)} and SHARE "
                         "in [0, 1]")
    return boost


def _boost_text(boost: tuple[str, float] | None) -> str:
    return "none" if boost is None else "=".join(map(str, boost))


@dataclass(frozen=True)
class Flag:
    """One command-line flag: ``--name`` sets the :class:`TrainConfig` field ``field`` (``-`` for ``_``).

    ``parse`` turns the text into the field's value (raising ``ValueError`` with the flag in its message); a
    ``bool`` field becomes ``--name`` / ``--no-name``. ``shown``: how the default is printed in the help.
    """

    field: str
    help: str
    parse: Callable[[str], Any] | None = None
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    shown: Callable[[Any], str] = str

    @property
    def name(self) -> str:
        """``--vision-steps`` for ``vision_steps``."""
        return "--" + self.field.replace("_", "-")


FLAGS: tuple[Flag, ...] = (
    Flag("seed", "weights and data stream seed", int),
    Flag("steps", "optimizer steps of the full model", int),
    Flag("vision_steps", "optimizer steps of the vision tower alone, before", int),
    Flag("batch_size", "examples per step", int),
    Flag("lr", "peak learning rate", float),
    Flag("threads", "torch CPU threads of the full stage (the vision stage leaves each worker a core; on an idle "
                    "2-core machine, 2 threads step 1.6x faster than 1; the result depends on it)", int),
    Flag("workers", "processes drawing the training examples (0: the training process; same stream)", int),
    Flag("init", "start from this trained demo model's weights instead of random ones (to train longer)", Path),
    Flag("task_mix", "shares of the tasks in the stream, e.g. pope=0.45,sqa=0.35,textvqa=0.1,caption=0.1", _task_mix,
         shown=lambda mix: ",".join(f"{k}={v}" for k, v in mix.items())),
    Flag("warmup", "warm-up steps of each stage", int),
    Flag("precision", "bf16: bfloat16 autocast of the matmuls, float32 weights and optimizer; fp32: everything in "
                      "float32 (2x slower on the 2-core CPU)", choices=PRECISIONS),
    Flag("position_aids", "the 2-D position code and the position and place read-outs"),
    Flag("names_guides", "the three 'whose shape' attention guides"),
    Flag("names_place", "with --position-aids: the place read-out at each 'whose shape' option as well (the option "
                        "names must carry where the person's object lies)"),
    Flag("names_compare", "with --position-aids: the second 'whose shape' option must say whether it is the answer "
                          "(a read-out in layer COMPARE_LAYER)"),
    Flag("sqa_boost", "ask that share of the training SQA problems as that kind (relation, count, color, names); "
                      "'none': every kind as often as the files ask it", _sqa_boost, metavar="KIND=SHARE",
         shown=_boost_text),
)
"""The training flags, in ``--help`` order; each one's default is the :class:`TrainConfig` field's."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.demo_model.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path, help="output directory (the model is written here)")
    defaults = TrainConfig()
    for flag in FLAGS:
        default = getattr(defaults, flag.field)
        shown = "none" if default is None else flag.shown(default)
        if isinstance(default, bool):
            p.add_argument(flag.name, action=argparse.BooleanOptionalAction, default=None,
                           help=f"{flag.help} (default: {'on' if default else 'off'})")
        else:  # parsed after argparse, so a bad value gets the message of parse, on one line
            p.add_argument(flag.name, default=None, metavar=flag.metavar, choices=flag.choices,
                           help=f"{flag.help} (default: {shown})")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` the parsed flags ask for (a flag left out: the field's default).

    Raises:
        ValueError: a flag value that does not parse or a combination the config rejects, naming the flag.
    """
    changes: dict[str, Any] = {}
    for flag in FLAGS:
        value = getattr(args, flag.field)
        if value is None:
            continue
        if flag.parse is not None:
            try:
                value = flag.parse(value)
            except ValueError as exc:
                raise ValueError(str(exc) if str(exc).startswith(flag.name) else f"{flag.name} {value!r}: {exc}") \
                    from None
        changes[flag.field] = value
    defaults = TrainConfig()
    aids = {k: changes.get(k, getattr(defaults, k)) for k in ("position_aids", "names_place", "names_compare")}
    if (aids["names_place"] or aids["names_compare"]) and not aids["position_aids"]:
        raise ValueError("--names-place and --names-compare need --position-aids (they extend their place "
                         "read-out); with --no-position-aids add --no-names-place --no-names-compare")
    return TrainConfig(**changes)


def main(argv: list[str] | None = None) -> int:
    """``python -m tools.demo_model.train --out DIR [flags]``: bad flags exit 2 with one line, before any work."""
    p = _parser()
    args = p.parse_args(argv)
    try:
        config = config_from_args(args)
        check_init(config.init)
    except FileNotFoundError as exc:
        p.error(f"--{exc}")
    except ValueError as exc:
        p.error(str(exc))
    record = train(args.out, config)
    print(f"trained {record['parameters'] / 1e6:.2f} M parameters in {record['train_seconds'] / 60:.1f} min; "
          f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
