"""Every ``flowkern`` command that takes pruning options takes them from one table,
:data:`flowkern.cli.common.PRUNE_FLAGS` (through :func:`flowkern.cli.common.add_prune_arguments`), and they give one
:class:`flowkern.plan.PruneSpec`."""

from __future__ import annotations

import argparse

import pytest

import flowkern.cli as cli
from flowkern.cli.common import PRUNE_FLAGS, UsageError, add_prune_arguments, check_prune_arguments, spec_from_args
from flowkern.plan import PRUNE_OPTIONS, PruneSpec

PRUNING_COMMANDS = ("flow", "generate", "eval", "sweep")
NOT_PRUNING = {"demo": "--keep is the demo report's own K (an int >= 1 for its pruned runs), not a flowkern.prune flag"}
TABLE_FLAGS = {settings["flag"] for settings in PRUNE_FLAGS.values()}
FIELD_OF_DEST = {dest: field for field, dest in PRUNE_OPTIONS.items()}


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _pruning_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.dest in FIELD_OF_DEST or set(a.option_strings) & TABLE_FLAGS]


def test_the_table_covers_every_field():
    assert set(PRUNE_FLAGS) == {f for f in PRUNE_OPTIONS} == set(PruneSpec().to_dict())


@pytest.mark.parametrize("name", sorted(set(cli.SUBCOMMANDS) - set(NOT_PRUNING)))
def test_every_pruning_option_comes_from_the_table(name):
    actions = _pruning_actions(_subparsers()[name])
    if name not in PRUNING_COMMANDS:
        assert not actions, f"{name} has pruning options but is not listed as a pruning command"
        return
    assert {FIELD_OF_DEST.get(a.dest) for a in actions} >= {"keep", "rank", "seed"}
    for action in actions:
        field = FIELD_OF_DEST.get(action.dest)
        assert field is not None, f"flowkern {name} {action.option_strings}: {action.dest!r} is not a PruneSpec option"
        table = PRUNE_FLAGS[field]
        assert action.help == table["help"] and action.type == table.get("type"), (name, action.option_strings)
        assert action.choices == table.get("choices") and action.metavar == table.get("metavar"), name


def test_the_check_sees_a_private_copy():
    parser = argparse.ArgumentParser()
    parser.add_argument("--keep", type=int, default=0)
    assert _pruning_actions(parser) and _pruning_actions(parser)[0].help != PRUNE_FLAGS["keep"]["help"]


def _parse(argv: list[str], **kwargs) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_prune_arguments(parser, **kwargs)
    return parser.parse_args(argv)


def test_spec_from_args():
    assert spec_from_args(_parse([])) == PruneSpec()
    got = spec_from_args(_parse(["--prune-layer", "2", "--keep", "25%", "--rank", "grid", "--prune-seed", "3",
                                 "--prune-when", "decode"]))
    assert got == PruneSpec(layer=2, keep=0.25, rank="grid", seed=3, when="decode")
    args = _parse(["--prune-layer", "1"])
    check_prune_arguments(args)
    assert (args.keep, args.rank, args.prune_seed, args.prune_when) == (0, "attention", 0, "prefill")
    with pytest.raises(UsageError,
                       match=r"^--keep, --prune-seed have no effect without --prune-layer L \(or --prune-schedule\)$"):
        spec_from_args(_parse(["--keep", "5", "--prune-seed", "1"]))
    # a command without --prune-layer (sweep): the defaults are PruneSpec's, another spelling of a flag
    args = _parse(["--keep", "4", "--seed", "7"], fields=("keep", "rank", "seed"), flags={"seed": "--seed"},
                  defaults=True)
    assert spec_from_args(args) == PruneSpec(keep=4, seed=7)
    with pytest.raises(ValueError, match="no pruning option"):
        _parse([], fields=("keep", "knockout"))


def test_schedule_and_merge_flags():
    args = _parse(["--prune-schedule", "0:0.5,2:25%", "--rank", "diversity", "--prune-merge"])
    check_prune_arguments(args)  # commands check before loading a model, then build the spec: twice is harmless
    assert spec_from_args(args) == PruneSpec(schedule=((0, 0.5), (2, 0.25)), rank="diversity", merge=True)
    with pytest.raises(UsageError, match="replaces --prune-layer"):
        spec_from_args(_parse(["--prune-layer", "2", "--prune-schedule", "3:0.5"]))
    with pytest.raises(UsageError, match="drop --keep"):
        spec_from_args(_parse(["--keep", "4", "--prune-schedule", "3:0.5"]))
    with pytest.raises(SystemExit):
        _parse(["--prune-schedule", "3"])
    with pytest.raises(SystemExit):
        _parse(["--rank", "nope"])
