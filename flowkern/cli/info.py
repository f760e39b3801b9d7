"""``flowkern info``: versions, the built kernels, the backend each device uses, the supported model families with
what works on each and the pruning scorers (no model needed).

.. code-block:: console

    flowkern info

Registered in :data:`flowkern.cli.SUBCOMMANDS` as ``"info"``.
"""

from __future__ import annotations

import argparse

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``flowkern info`` on the ``flowkern`` command's subparsers."""
    p = subparsers.add_parser("info", help="versions, built kernels, backends and the supported model families")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """The ``info`` subcommand (see :func:`add_parser`)."""
    import platform

    import torch

    from flowkern import _version, ops

    print(f"flowkern {_version.__version__}  python {platform.python_version()}  torch {torch.__version__}")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton: not installed (CUDA tensors need it)")
    try:
        from flowkern.hf import compat
    except ImportError as exc:
        print(f"transformers: not importable ({exc}); the model commands need it")
    else:
        version, _ = compat.version_report()
        lo, hi = compat.TESTED_TRANSFORMERS
        msg = compat.untested_message()
        print(f"transformers {version} (tested range: {lo} to {hi})" if msg is None else f"WARNING: {msg}")
        from flowkern.hf.support import support_table

        print("model families (trace / prune / cam / knockout):")
        print(support_table())
    from flowkern.scorers import scorer_descriptions

    print("pruning scorers (--rank):")
    for name, what in scorer_descriptions().items():
        print(f"  {name:<20} {what}")
    print(f"C++ CPU kernels (flowkern._C): {'built' if ops.cpp_available() else 'NOT built: ' + str(ops._CPP_ERROR)}")
    print(f"default backend on cpu: {ops.backend_for(torch.device('cpu'))}")
    if torch.cuda.is_available():
        print(f"default backend on cuda: {ops.backend_for(torch.device('cuda'))} ({torch.cuda.get_device_name()})")
    else:
        print("cuda: not available")
    return 0
