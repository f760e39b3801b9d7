"""The ``flowkern`` CLI (docs/architecture.md): ``flowkern info | flow | generate | cam | score | eval | sweep |
knockout | shapes | demo``.

Layout: one module per subcommand (``flowkern/cli/<name>.py``), what they share in :mod:`flowkern.cli.common`, and
here only the registry and the entry point. A command module imports from :mod:`flowkern.cli.common` and the
library, never from a sibling command module or from this ``__init__`` (``tests/cli/test_cli_layout.py`` checks), so
every command loads on its own and there is no import cycle.

A new subcommand is a module ``flowkern/cli/<name>.py`` plus its name in :data:`SUBCOMMANDS`. The module defines
``add_parser(subparsers)``, which adds its parser to the ``subparsers`` action and sets ``func``
(``args -> exit code``)::

    from flowkern.cli.common import add_model_arguments, load_from_args

    def add_parser(subparsers: argparse._SubParsersAction) -> None:
        p = subparsers.add_parser("cam", help="LLaVA-CAM heatmaps per layer")
        add_model_arguments(p)                     # --model --image --prompt --device --dtype --max-new-tokens
        p.set_defaults(func=run)

    def run(args: argparse.Namespace) -> int:
        loaded = load_from_args(args)              # model, processor, images, inputs (user errors -> exit 2)
        ...
        return 0

Import heavy libraries (torch, transformers) inside ``run``, so that ``flowkern --help`` and a mistyped option stay
fast. Errors the user can fix are raised as :class:`UsageError` (or turned into one by :func:`user_errors`; an output
location refused by :mod:`flowkern.outdir` is one too): :func:`main` prints ``flowkern <command>: error: <message>``
on one line to stderr and returns 2, no traceback. An error of the system while the command works (``OSError``: a
full disk, a read-only or vanished folder, no permission) is one line too, naming the path and the reason, and
returns 1; what was written before it is kept (answers are appended and fsync-ed, results replaced atomically), so
the same command resumes once the cause is fixed;
Ctrl-C prints ``flowkern <command>: interrupted`` and returns 130 (a command that says more on Ctrl-C catches
``KeyboardInterrupt`` itself and prints with :func:`flowkern.cli.common.error_line`). Anything else is a bug and keeps
its traceback.

The shared helpers are re-exported here (``from flowkern.cli import main, UsageError, parse_layers`` works).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import sys

from flowkern.cli.common import (
    LoadedInputs,
    UsageError,
    add_model_arguments,
    check_output_dir,
    error_line,
    load_from_args,
    parse_layers,
    track_stderr,
    user_errors,
)
from flowkern.outdir import OutputError, os_error_line

__all__ = [
    "SUBCOMMANDS",
    "UsageError",
    "user_errors",
    "add_model_arguments",
    "load_from_args",
    "check_output_dir",
    "LoadedInputs",
    "parse_layers",
    "build_parser",
    "main",
    "entry",
]

SUBCOMMANDS: tuple[str, ...] = ("info", "flow", "generate", "cam", "score", "eval", "sweep", "knockout", "compare",
                               "shapes", "demo")
"""The subcommands, in ``--help`` order: each is the module ``flowkern.cli.<name>`` (imported when the parser is built),
whose ``add_parser(subparsers)`` registers it."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand of :data:`SUBCOMMANDS` registered."""
    parser = argparse.ArgumentParser(prog="flowkern", description="Information-flow analysis for VLMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(f"{__name__}.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``flowkern`` console script; returns the exit code (2 for user errors, 1 for a system error
    such as a full disk, 130 for Ctrl-C)."""
    args = build_parser().parse_args(argv)
    with track_stderr():  # the message lines below start on a line of their own, also after a cut-short progress bar
        try:
            return int(args.func(args) or 0)
        except (UsageError, OutputError) as exc:
            message = " ".join(str(exc).split())  # one line
            error_line(f"flowkern {args.command}: error: {message}")
            return 2
        except KeyboardInterrupt:  # Ctrl-C: one line, no traceback; results are written atomically, nothing half-done
            error_line(f"flowkern {args.command}: interrupted")
            return 130
        except OSError as exc:
            if _caused_by_interrupt(exc):
                error_line(f"flowkern {args.command}: interrupted")
                return 130
            message = " ".join(os_error_line(exc).split())
            error_line(f"flowkern {args.command}: error: {message} (what was written before is kept)")
            return 1
        except Exception as exc:
            if not _caused_by_interrupt(exc):
                raise
            # a Ctrl-C inside a C extension's import surfaces as that import's error ("ImportError: initialization
            # failed", raised from the KeyboardInterrupt): still an interrupt
            error_line(f"flowkern {args.command}: interrupted")
            return 130


def _caused_by_interrupt(exc: BaseException) -> bool:
    """Whether ``exc`` was raised while handling a KeyboardInterrupt (its ``__cause__`` / ``__context__`` chain)."""
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        if isinstance(link, KeyboardInterrupt):
            return True
        seen.add(id(link))
        link = link.__cause__ or link.__context__
    return False


def entry() -> None:
    """The ``flowkern`` console script: :func:`main`, then exit with its code. Once the work is done (or abandoned)
    and reported, a Ctrl-C during interpreter shutdown is ignored, so it cannot turn the run into a death by SIGINT
    without a word. (Only here, in the process's entry: :func:`main` called as a function leaves signals alone, since
    an ignored SIGINT would be inherited by every subprocess the caller starts.)

    An interrupted run (exit code 130) leaves without the interpreter's finalization, once stdout and stderr are
    flushed: its results are already whole or absent (the atomic writer cleans up in :func:`main`), and a native
    library's at-exit teardown after an interrupt was seen to abort the process once in many runs ("Fatal Python
    error: PyThreadState_Get", exit -6 instead of 130)."""
    code = main()
    with contextlib.suppress(ValueError):  # not the main thread
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    if code == 130:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(130)
    sys.exit(code)
