"""The ``flowkern`` command line (DESIGN.md §2).

Adding a subcommand is one line in :data:`SUBCOMMANDS`: a ``"module"`` (which must define
``add_parser(subparsers)``) or a ``"module:function"``. That function adds its parser to the ``subparsers``
action and sets ``func`` (``args -> exit code``)::

    def add_parser(subparsers: argparse._SubParsersAction) -> None:
        p = subparsers.add_parser("cam", help="LLaVA-CAM heatmaps per layer")
        add_model_arguments(p)                     # --model --image --prompt --device --dtype --max-new-tokens
        p.set_defaults(func=run)

    def run(args: argparse.Namespace) -> int:
        loaded = load_from_args(args)              # model, processor, images, inputs (user errors -> exit 2)
        ...
        return 0

Errors the user can fix are raised as :class:`UsageError` (or turned into one by :func:`user_errors`):
:func:`main` prints ``flowkern <command>: error: <message>`` on one line to stderr and returns 2, no traceback.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib
import json
import math
import signal
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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

SUBCOMMANDS: tuple[str, ...] = (
    "flowkern.cli:add_info_parser",
    "flowkern.cli:add_flow_parser",
    "flowkern.cli.generate",
    "flowkern.cli.cam",
    "flowkern.cli.score",
    "flowkern.cli.eval",
    "flowkern.cli.sweep",
    "flowkern.cli.shapes",
    "flowkern.cli.demo",
)
"""One entry per subcommand: ``"module"`` (its ``add_parser``) or ``"module:function"``, imported lazily."""


class UsageError(Exception):
    """A mistake the user can fix (missing file, unsupported model, bad option): one line on stderr, exit 2."""


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn ``FileNotFoundError``, ``ValueError`` and ``ImportError`` raised inside into :class:`UsageError`.

    Wrap only the steps whose failures are the user's to fix (argument checks, loading, building inputs), not the
    analysis itself, so that bugs keep their tracebacks.
    """
    try:
        yield
    except UsageError:
        raise
    except FileNotFoundError as exc:
        msg = str(exc) if exc.args and not exc.filename else f"{exc.filename}: {exc.strerror or exc}"
        raise UsageError(msg) from exc
    except (ValueError, ImportError) as exc:
        raise UsageError(str(exc)) from exc


# ----------------------------------------------------------------------------------------------------------
# shared by the model commands (flow, cam, generate)


def add_model_arguments(
    parser: argparse.ArgumentParser, *, prompt: bool = True, max_new_tokens: int | None = 16
) -> None:
    """Add ``--model --image --prompt --device --dtype`` (and ``--max-new-tokens`` unless None) to a subparser."""
    parser.add_argument("--model", required=True,
                        help="hub id (already in the Hugging Face cache; never downloaded) or local directory")
    parser.add_argument("--image", required=True, nargs="+", metavar="PATH",
                        help="input image(s); heatmaps are drawn for the first one")
    if prompt:
        parser.add_argument("--prompt", required=True,
                            help="the question; wrapped in the model's chat template with an image slot, unless it "
                                 "already contains the image placeholder (e.g. <image>)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                        help="weights dtype (auto: float32 on CPU, the checkpoint's dtype on CUDA)")
    if max_new_tokens is not None:
        parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens, metavar="N",
                            help=f"answer length limit, greedy decoding (default {max_new_tokens})")


@dataclass
class LoadedInputs:
    """What :func:`load_from_args` returns: the model, its processor, the RGB images and the processor outputs."""

    model: Any
    processor: Any
    images: list
    inputs: Any

    @property
    def prompt_length(self) -> int:
        """Tokens in the prompt (``input_ids.shape[1]``)."""
        return int(self.inputs["input_ids"].shape[1])

    def decode(self, sequences: Any) -> str:
        """The answer text of the first sample of ``generate``'s output (prompt tokens removed)."""
        ids = self.inputs["input_ids"]
        seq = sequences[0]
        n = ids.shape[1]
        if seq.shape[0] >= n and bool((seq[:n].to(ids.device) == ids[0]).all()):
            seq = seq[n:]
        decoder = self.processor if hasattr(self.processor, "batch_decode") else self.processor.tokenizer
        return decoder.batch_decode(seq[None].cpu(), skip_special_tokens=True)[0].strip()


def load_from_args(args: argparse.Namespace) -> LoadedInputs:
    """Load the images (first, so a typo fails fast), the model and its processor, and build the inputs.

    Raises:
        UsageError: missing image / model directory, uncached hub id, unsupported model, prompt without an image slot.
    """
    from flowkern.hf.loading import build_inputs, load_images, load_model, position_range_message

    with user_errors():
        images = load_images(args.image)
        model, processor = load_model(args.model, device=args.device, dtype=args.dtype)
        inputs = build_inputs(processor, model, images, getattr(args, "prompt", ""))
    loaded = LoadedInputs(model, processor, images, inputs)
    warning = position_range_message(model, loaded.prompt_length + int(getattr(args, "max_new_tokens", 0) or 0))
    if warning:
        print(f"flowkern {getattr(args, 'command', '')}: warning: {warning}", file=sys.stderr)
    return loaded


def check_output_dir(args: argparse.Namespace, name: str = "out") -> Path:
    """Validate a command's result folder (``args.<name>``, flag ``--<name>``) before any work, honouring
    ``--overwrite``; returns the absolute path.

    Raises:
        UsageError: a file where the folder should be, no permission, or a previous run's files without --overwrite.
    """
    from flowkern import _io

    with user_errors():
        return _io.check_output_dir(getattr(args, name), overwrite=getattr(args, "overwrite", False),
                                    what=f"--{name.replace('_', '-')}")


def parse_layers(spec: str | None, num_layers: int, *, default_count: int = 8) -> list[int]:
    """Decoder layers from ``"0,4,8"`` (negative counts from the end), ``"all"``, or None/``"auto"``: up to
    ``default_count`` evenly spaced layers, the first and the last included.

    Raises:
        UsageError: a malformed spec or a layer outside ``[-num_layers, num_layers)``.
    """
    if spec is None or spec.strip().lower() == "auto":
        count = min(default_count, num_layers)
        if count <= 1:
            return [0]
        return sorted({round(i * (num_layers - 1) / (count - 1)) for i in range(count)})
    if spec.strip().lower() == "all":
        return list(range(num_layers))
    layers = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            layer = int(part)
        except ValueError:
            raise UsageError(f"--layers {spec!r}: expected comma-separated integers, 'all' or 'auto'") from None
        if not -num_layers <= layer < num_layers:
            raise UsageError(f"--layers: layer {layer} is out of range; the model has {num_layers} decoder layers")
        layers.append(layer % num_layers)
    if not layers:
        raise UsageError(f"--layers {spec!r}: no layer given")
    return list(dict.fromkeys(layers))


def _args_dict(args: argparse.Namespace) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"}


# ----------------------------------------------------------------------------------------------------------
# info


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
    try:
        from flowkern.hf import compat
    except ImportError as exc:
        print(f"transformers: not importable ({exc}); the model commands need it")
    else:
        version, _ = compat.version_report()
        lo, hi = compat.TESTED_TRANSFORMERS
        msg = compat.untested_message()
        print(f"transformers {version} (tested range: {lo} to {hi})" if msg is None else f"WARNING: {msg}")
    print(f"C++ CPU kernels (flowkern._C): {'built' if ops.cpp_available() else 'NOT built: ' + str(ops._CPP_ERROR)}")
    print(f"default backend on cpu: {ops.backend_for(torch.device('cpu'))}")
    if torch.cuda.is_available():
        print(f"default backend on cuda: {ops.backend_for(torch.device('cuda'))} ({torch.cuda.get_device_name()})")
    else:
        print("cuda: not available")
    return 0


def add_info_parser(subparsers: argparse._SubParsersAction) -> None:
    """``flowkern info``."""
    info = subparsers.add_parser("info", help="versions, built kernels and the backend each device uses")
    info.set_defaults(func=_cmd_info)


# ----------------------------------------------------------------------------------------------------------
# flow


def add_flow_parser(subparsers: argparse._SubParsersAction) -> None:
    """``flowkern flow``: attention share per layer of the answer tokens (Figure 2A) and image maps (Figure 2B)."""
    p = subparsers.add_parser(
        "flow",
        help="attention share per layer (system/image/user/generated) of the answer, and image attention maps",
        description="Answer the prompt with greedy decoding under flowkern.trace; print the per-layer attention "
                    "share of the answer tokens and write shares.json, shares.csv, shares.png (paper Figure 2A) and "
                    "image_attention.png (Figure 2B) to --out.",
    )
    add_model_arguments(p)
    p.add_argument("--layers", default="auto",
                   help="layers for image_attention.png: '0,4,8', 'all' or 'auto' (8 evenly spaced; default)")
    p.add_argument("--threshold", type=float, default=0.1,
                   help="cliff layer = first layer whose image share is below this (default 0.1)")
    p.add_argument("--out", type=Path, default=Path("flowkern-flow"), help="output directory (default ./flowkern-flow)")
    p.add_argument("--overwrite", action="store_true", help="replace the files of a previous run in --out")
    from flowkern.cli.generate import add_prune_arguments

    add_prune_arguments(p)
    p.set_defaults(func=run_flow)


def _base_view(grids: list) -> Any:
    """The view of an image to draw: the whole image (``image`` / ``base``; InternVL: the thumbnail tile)."""
    for name in ("image", "base"):
        for g in grids:
            if g.name == name:
                return g
    tiles = [g for g in grids if g.name.startswith("tile")]
    if tiles:
        return tiles[-1]  # several tiles: the thumbnail (the whole image) is the last one
    return grids[0]


def _format_table(shares: Any, names: Sequence[str], cliff: int | None) -> str:
    width = max(9, *(len(n) + 2 for n in names))
    lines = ["layer" + "".join(f"{n:>{width}}" for n in names)]
    for layer, row in enumerate(shares):
        mark = "  <- cliff" if layer == cliff else ""
        lines.append(f"{layer:5d}" + "".join(f"{float(v):>{width}.4f}" for v in row) + mark)
    return "\n".join(lines)


def run_flow(args: argparse.Namespace) -> int:
    """The ``flow`` subcommand (see :func:`add_flow_parser`)."""
    import torch

    import flowkern
    from flowkern import _io, viz
    from flowkern.cli.generate import check_prune_arguments, prune_from_args
    from flowkern.hf.models import get_adapter

    if not 0.0 <= args.threshold <= 1.0:
        raise UsageError(f"--threshold {args.threshold}: expected a share in [0, 1]")
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens {args.max_new_tokens}: expected >= 1")
    check_prune_arguments(args)
    target = check_output_dir(args)
    loaded = load_from_args(args)
    model, inputs = loaded.model, loaded.inputs
    num_layers = int(get_adapter(model).text_config(model.config).num_hidden_layers)
    layers = parse_layers(args.layers, num_layers)

    with (
        torch.inference_mode(),
        prune_from_args(model, args) as pruning,
        flowkern.trace(model, image_inputs=inputs) as flow,
    ):
        sequences = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    answer = loaded.decode(sequences)
    shares = flow.shares.numpy()
    names = list(flow.segment_names)
    cliff = viz.cliff_layer(shares, threshold=args.threshold, segment_names=names)

    with _io.AtomicDir(target, info=dict(command="flowkern flow", args=_args_dict(args))) as out:
        written, maps_note = _write_flow(out, args, loaded, flow, pruning, answer, shares, names, cliff, layers)

    print(f"answer: {answer}")
    print(f"\nattention share of the answer tokens per decoder layer (mean over {flow.num_steps} answer rows):")
    print(_format_table(shares, names, cliff))
    if cliff is None:
        print(f"no layer has an image share below {args.threshold:g}")
    else:
        print(f"cliff layer (first layer with image share < {args.threshold:g}): {cliff}")
    if maps_note:
        print(maps_note, file=sys.stderr)
    print(f"\nwrote {', '.join(str(target / n) for n in written)}")
    return 0


def _write_flow(out: Path, args: argparse.Namespace, loaded: LoadedInputs, flow: Any, pruning: Any, answer: str,
                shares: Any, names: list, cliff: int | None, layers: list[int]) -> tuple[list[str], str | None]:
    """Write the ``flow`` files into ``out``; returns the file names and a note when the maps were skipped."""
    from flowkern import viz
    from flowkern.hf.loading import input_image

    inputs = loaded.inputs
    written = []
    record = dict(answer=answer, args=_args_dict(args), threshold=args.threshold, cliff_layer=cliff)
    maps_note = None
    try:
        view = _base_view(flow.image_grids[0])
        maps = [flow.image_attention(layer, image=0, view=view.name) for layer in layers]
        titles = [f"layer {layer}  (image {shares[layer, names.index('image')]:.1%})" for layer in layers]
        picture = None if view.name == "queries" else input_image(loaded.processor, inputs, loaded.images, 0)
        viz.heatmap_grid(picture, maps, titles, normalize="each", path=out / "image_attention.png")
        written.append("image_attention.png")
        record["image_attention"] = dict(
            image=0, view=view.name, grid=list(view.shape), layers=layers, normalize="each",
            maps={str(layer): [[None if math.isnan(v) else v for v in row] for row in m.tolist()]
                  for layer, m in zip(layers, maps, strict=True)},
        )
    except ValueError as exc:  # a prompt the image layout rules do not describe: shares are still valid
        maps_note = f"image_attention.png skipped: {exc}"
    record.update(flow.to_dict())
    if pruning is not None:
        record["prune"] = pruning.to_dict()

    (out / "shares.json").write_text(json.dumps(record, indent=1) + "\n")
    with open(out / "shares.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["layer", *names])
        for layer, row in enumerate(shares):
            w.writerow([layer, *(f"{float(v):.6g}" for v in row)])
    title = f"{Path(str(args.model)).name}: attention share of the answer tokens ({flow.num_steps} rows)"
    viz.plot_shares(shares, names, threshold=args.threshold, title=title, path=out / "shares.png")
    return ["shares.json", "shares.csv", "shares.png", *written], maps_note


# ----------------------------------------------------------------------------------------------------------
# entry point


def _resolve(entry: str) -> Any:
    module, _, func = entry.partition(":")
    return getattr(importlib.import_module(module), func or "add_parser")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand of :data:`SUBCOMMANDS` registered."""
    parser = argparse.ArgumentParser(prog="flowkern", description="Information-flow analysis for VLMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    for entry in SUBCOMMANDS:
        _resolve(entry)(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``flowkern`` console script; returns the exit code (2 for user errors)."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UsageError as exc:
        message = " ".join(str(exc).split())  # one line
        print(f"flowkern {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: one line, no traceback; results are written atomically, nothing half-done
        print(f"flowkern {args.command}: interrupted", file=sys.stderr)
        return 130



def entry() -> None:
    """The ``flowkern`` console script: :func:`main`, then exit with its code. Once the work is done (or abandoned)
    and reported, a Ctrl-C during interpreter shutdown is ignored, so it cannot turn the run into a death by SIGINT
    without a word. (Only here, in the process's entry: :func:`main` called as a function leaves signals alone, since
    an ignored SIGINT would be inherited by every subprocess the caller starts.)"""
    code = main()
    with contextlib.suppress(ValueError):  # not the main thread
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(code)
