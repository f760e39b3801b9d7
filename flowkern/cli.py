"""The ``flowkern`` command line. Subcommands are added as the features land (DESIGN.md §2)."""

from __future__ import annotations

import argparse
import sys


def _cmd_info(args: argparse.Namespace) -> int:
    import platform

    import torch

    import flowkern
    from flowkern import ops

    print(f"flowkern {flowkern.__version__}  python {platform.python_version()}  torch {torch.__version__}")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton: not installed (CUDA tensors need it)")
    print(f"C++ CPU kernels (flowkern._C): {'built' if ops.cpp_available() else 'NOT built: ' + str(ops._CPP_ERROR)}")
    print(f"default backend on cpu: {ops.backend_for(torch.device('cpu'))}")
    if torch.cuda.is_available():
        print(f"default backend on cuda: {ops.backend_for(torch.device('cuda'))} ({torch.cuda.get_device_name()})")
    else:
        print("cuda: not available")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand registered."""
    parser = argparse.ArgumentParser(prog="flowkern", description="Information-flow analysis for VLMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions, built kernels and the backend each device uses")
    info.set_defaults(func=_cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``flowkern`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
