"""``flowkern flow``: the attention share per layer of the answer tokens (paper Figure 2A) and the answer's attention
on the image (Figure 2B), from the shell.

.. code-block:: console

    flowkern flow --model llava-hf/llava-1.5-7b-hf --image cat.jpg --prompt "What animal is this?" --out flow-out

answers greedily under :func:`flowkern.trace` (optionally pruned: the flags of
:func:`flowkern.cli.common.add_prune_arguments`), prints the per-layer share table and the cliff layer, and writes
``shares.json``, ``shares.csv``, ``shares.png`` and ``image_attention.png`` to ``--out``, all at once. Registered in
:data:`flowkern.cli.SUBCOMMANDS` as ``"flow"``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flowkern.cli.common import (
    LoadedInputs,
    UsageError,
    add_model_arguments,
    add_prune_arguments,
    check_layers_early,
    check_output_dir,
    check_prune_arguments,
    load_from_args,
    parse_layers,
    prune_from_args,
)

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``flowkern flow`` on the ``flowkern`` command's subparsers."""
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
    add_prune_arguments(p)
    p.set_defaults(func=run)


def _args_dict(args: argparse.Namespace) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"}


def _format_table(shares: Any, names: Sequence[str], cliff: int | None) -> str:
    width = max(9, *(len(n) + 2 for n in names))
    lines = ["layer" + "".join(f"{n:>{width}}" for n in names)]
    for layer, row in enumerate(shares):
        mark = "  <- cliff" if layer == cliff else ""
        lines.append(f"{layer:5d}" + "".join(f"{float(v):>{width}.4f}" for v in row) + mark)
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """The ``flow`` subcommand (see :func:`add_parser`)."""
    import torch

    from flowkern import _io, viz
    from flowkern.hf.models import get_adapter
    from flowkern.trace import trace

    if not 0.0 <= args.threshold <= 1.0:
        raise UsageError(f"--threshold {args.threshold}: expected a share in [0, 1]")
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens {args.max_new_tokens}: expected >= 1")
    check_prune_arguments(args)
    target = check_output_dir(args)
    check_layers_early(args)  # from config.json: a typo costs no model load
    loaded = load_from_args(args)
    model, inputs = loaded.model, loaded.inputs
    num_layers = int(get_adapter(model).text_config(model.config).num_hidden_layers)
    layers = parse_layers(args.layers, num_layers)

    with (
        torch.inference_mode(),
        prune_from_args(model, args) as pruning,
        trace(model, image_inputs=inputs) as flow,
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


def _whole_view(grids: list, image: int = 0) -> Any:
    """The :class:`flowkern.hf.segments.ImageGrid` of image ``image`` to draw: the one the family's layout marks
    ``whole`` (the whole image: LLaVA's ``image``, LLaVA-NeXT's ``base``, InternVL's thumbnail tile), else its first
    view (a video's first frame, InstructBLIP's query row), as :meth:`flowkern.cam.Cam.view` chooses.

    Raises:
        ValueError: the sample has no image ``image``.
    """
    views = [g for g in grids if g.image == image]
    if not views:
        raise ValueError(f"the prompt has no image {image}")
    return next((g for g in views if g.whole), views[0])


def _write_flow(out: Path, args: argparse.Namespace, loaded: LoadedInputs, flow: Any, pruning: Any, answer: str,
                shares: Any, names: list, cliff: int | None, layers: list[int]) -> tuple[list[str], str | None]:
    """Write the ``flow`` files into ``out``; returns the file names and a note when the maps were skipped."""
    from flowkern import viz
    from flowkern.hf.loading import input_image
    from flowkern.hf.models import get_adapter

    inputs = loaded.inputs
    written = []
    record = dict(answer=answer, args=_args_dict(args), threshold=args.threshold, cliff_layer=cliff)
    maps_note = None
    try:
        view = _whole_view(flow.image_grids[0], image=0)
        maps = [flow.image_attention(layer, image=0, view=view.name) for layer in layers]
        titles = [f"layer {layer}  (image {shares[layer, names.index('image')]:.1%})" for layer in layers]
        spatial = get_adapter(loaded.model).spatial_grids  # False: a row of query tokens, no picture to draw on
        picture = input_image(loaded.processor, inputs, loaded.images, 0) if spatial else None
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
