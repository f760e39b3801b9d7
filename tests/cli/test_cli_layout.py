"""The layout of :mod:`flowkern.cli`: one module per subcommand, each registered by name, importable on its own, and
importing only :mod:`flowkern.cli.common` of the package (no sibling command module, not the package ``__init__``):
no import cycle, no order in which the commands must be loaded."""

from __future__ import annotations

import argparse
import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import flowkern.cli as cli

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "flowkern" / "cli"
NOT_COMMANDS = {"__init__", "__main__", "common"}


def _modules() -> list[str]:
    return sorted(p.stem for p in PACKAGE.glob("*.py"))


def _cli_imports(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every import of a ``flowkern.cli`` module in ``path``, at any depth (function bodies
    included), resolved to the full module name: ``from flowkern.cli import X`` counts as ``flowkern.cli.X`` when
    ``X`` is a module of the package, else as ``flowkern.cli`` (a name of the package ``__init__``)."""
    modules = set(_modules())
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[:2] == ["flowkern", "cli"]]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative to flowkern.cli (the package's own modules sit directly in it)
                base = ".".join(["flowkern", "cli", *([base] if base else [])])
            if base.split(".")[:2] != ["flowkern", "cli"]:
                continue
            if base == "flowkern.cli":
                found += [(node.lineno, f"flowkern.cli.{a.name}" if a.name in modules else "flowkern.cli")
                          for a in node.names]
            else:
                found.append((node.lineno, base))
    return sorted(found)


def test_every_command_module_is_registered():
    commands = [m for m in _modules() if m not in NOT_COMMANDS]
    assert sorted(cli.SUBCOMMANDS) == commands
    assert len(set(cli.SUBCOMMANDS)) == len(cli.SUBCOMMANDS)


@pytest.mark.parametrize("name", sorted(set(_modules()) - {"__main__"}))
def test_imports_only_common(name):
    allowed = {"flowkern.cli.common"}
    bad = [(line, m) for line, m in _cli_imports(PACKAGE / f"{name}.py") if m not in allowed]
    if name == "common":  # the shared helpers import nothing of the package
        bad = [(line, m) for line, m in _cli_imports(PACKAGE / "common.py")]
    assert not bad, f"flowkern/cli/{name}.py imports {bad}: only flowkern.cli.common is allowed"


def test_the_import_check_sees_sibling_and_package_imports(tmp_path):
    """The check above can fail: a sibling import in a function body, a relative one, and one of the package."""
    path = tmp_path / "bad.py"
    path.write_text("from flowkern.cli.common import UsageError\n"
                    "def run():\n    from flowkern.cli.generate import run\n"
                    "from . import cam\nfrom .common import user_errors\nfrom flowkern.cli import main\n"
                    "import flowkern.cli.score\n")
    assert _cli_imports(path) == [(1, "flowkern.cli.common"), (3, "flowkern.cli.generate"), (4, "flowkern.cli.cam"),
                                  (5, "flowkern.cli.common"), (6, "flowkern.cli"), (7, "flowkern.cli.score")]


_ALONE = """
import argparse, sys
import flowkern.cli.{name} as m
loaded = sorted(k for k in sys.modules if k.startswith("flowkern.cli."))
assert loaded == sorted({{"flowkern.cli.common", "flowkern.cli.{name}"}}), loaded
parser = argparse.ArgumentParser(prog="flowkern")
m.add_parser(parser.add_subparsers(dest="command", required=True))
args = parser.parse_args(["{name}", *sys.argv[1:]])
assert args.command == "{name}" and callable(args.func) and args.func.__module__ == "flowkern.cli.{name}"
print("ok")
"""

# the fewest arguments each command's parser accepts
_MINIMAL = {
    "info": [], "shapes": ["--task", "pope", "--out", "x"], "demo": [],
    "flow": ["--model", "m", "--image", "i", "--prompt", "p"], "generate": ["--model", "m", "--image", "i",
                                                                         "--prompt", "p"],
    "cam": ["--model", "m", "--image", "i", "--prompt", "p"],
    "score": ["--task", "pope", "--data", "d", "--predictions", "p"],
    "eval": ["--model", "m", "--task", "pope", "--data", "d", "--out", "o"],
    "sweep": ["--model", "m", "--task", "pope", "--data", "d", "--out", "o"],
    "knockout": ["--model", "m", "--task", "pope", "--data", "d", "--out", "o"],
    "compare": ["--model", "m", "--task", "pope", "--data", "d", "--out", "o", "--methods", "a=random@1"],
}


@pytest.mark.parametrize("name", cli.SUBCOMMANDS)
def test_each_command_imports_alone_in_a_fresh_interpreter(name):
    """No command needs another one (or the registry) to have been imported first."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-c", _ALONE.format(name=name), *_MINIMAL[name]], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_registry_builds_every_parser():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert list(sub.choices) == list(cli.SUBCOMMANDS)
