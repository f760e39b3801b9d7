"""``flowkern cam``: LLaVA-CAM heatmaps of every chosen decoder layer (paper §3.1, Figures 3/4), from the shell.

.. code-block:: console

    flowkern cam --model llava-hf/llava-1.5-7b-hf --image cat.jpg --prompt "What animal is this?" \\
        --layers all --samples 8 --noise-std 0.1 --out cam-out

writes ``cam_grid.png`` (one panel per layer), ``layer_NN.png`` (one overlay per layer) and ``cam.npz``
(:meth:`flowkern.cam.Cam.to_numpy`: heatmaps, raw maps, grid indices, answer ids, targets), and prints the answer
and the peak cell of each layer's map. Registered in :data:`flowkern.cli.SUBCOMMANDS` as ``"cam"``.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from flowkern.cli.common import (
    UsageError,
    add_model_arguments,
    check_layers_early,
    check_output_dir,
    load_from_args,
    parse_layers,
    user_errors,
)

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``flowkern cam`` on the ``flowkern`` command's subparsers."""
    from flowkern.cam import SITES

    p = subparsers.add_parser(
        "cam",
        help="LLaVA-CAM: per-layer heatmaps of the image regions whose features push the answer up",
        description="Answer the prompt greedily (or take --answer), then compute the Grad-CAM of the answer's "
                    "logits over the image-token features of every chosen decoder layer in one forward + backward "
                    "per batch of noisy copies (SmoothGrad), and write cam_grid.png, layer_NN.png and cam.npz to "
                    "--out.",
    )
    add_model_arguments(p)
    p.add_argument("--layers", default="all", help="decoder layers: '0,4,8', 'all' (default) or 'auto' (8 spaced)")
    p.add_argument("--samples", type=int, default=8, metavar="N", help="noisy copies averaged (default 8)")
    p.add_argument("--noise-std", type=float, default=0.1, metavar="S",
                   help="std of the Gaussian pixel noise in [0, 1] image units (default 0.1; 0 = plain Grad-CAM)")
    p.add_argument("--batch-size", type=int, default=4, metavar="B", help="noisy copies per forward (default 4)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    p.add_argument("--site", default="post_attention_layernorm", choices=SITES,
                   help="features A: post-attention norm output (default, the paper's choice), attention output, "
                        "or decoder layer output")
    p.add_argument("--answer", default=None,
                   help="explain this answer text (teacher-forced) instead of the model's greedy answer")
    p.add_argument("--normalize", default="layer", choices=["layer", "global"],
                   help="max-normalise each layer's map (default) or all layers by one maximum")
    p.add_argument("--threshold", type=float, default=None, help="zero normalised values below it (e.g. 0.5)")
    p.add_argument("--alpha", type=float, default=0.5, help="heatmap opacity in the overlays (default 0.5)")
    p.add_argument("--out", type=Path, default=Path("flowkern-cam"), help="output directory (default ./flowkern-cam)")
    p.add_argument("--overwrite", action="store_true", help="replace the files of a previous run in --out")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """The ``cam`` subcommand (see :func:`add_parser`)."""
    import numpy as np
    import torch

    from flowkern import _io, viz
    from flowkern.cam import cam
    from flowkern.hf.loading import input_image
    from flowkern.hf.models import get_adapter

    if args.samples < 1 or args.batch_size < 1 or args.max_new_tokens < 1:
        raise UsageError("--samples, --batch-size and --max-new-tokens must be >= 1")
    if not 0 <= args.noise_std < math.inf:
        raise UsageError(f"--noise-std {args.noise_std}: expected a finite number >= 0")
    if not 0.0 <= args.alpha <= 1.0:
        raise UsageError(f"--alpha {args.alpha}: expected a value in [0, 1]")
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        raise UsageError(f"--threshold {args.threshold}: expected a value in [0, 1]")
    target = check_output_dir(args)
    check_layers_early(args)  # from config.json: a typo costs no model load
    loaded = load_from_args(args)
    model, processor, inputs = loaded.model, loaded.processor, loaded.inputs
    num_layers = int(get_adapter(model).text_config(model.config).num_hidden_layers)
    layers = parse_layers(args.layers, num_layers)
    answer_ids = None
    tokenizer = getattr(processor, "tokenizer", processor)
    if args.answer is not None:
        answer_ids = torch.tensor(tokenizer(args.answer, add_special_tokens=False)["input_ids"]).reshape(-1)
        if answer_ids.numel() == 0:
            raise UsageError(f"--answer {args.answer!r} tokenizes to nothing")

    with user_errors():  # bad combinations (no image tokens, ...) are the user's to fix
        result = cam(
            model, inputs, answer_ids, layers=layers, site=args.site, samples=args.samples,
            noise_std=args.noise_std, seed=args.seed, batch_size=args.batch_size, processor=processor,
            normalize=args.normalize, threshold=args.threshold, max_new_tokens=args.max_new_tokens, progress=True,
        )
    answer = tokenizer.batch_decode(result.answer_ids[None], skip_special_tokens=True)[0].strip()

    view = result.view(0)
    spatial = get_adapter(model).spatial_grids  # False: a row of query tokens, no picture to draw on
    picture = input_image(processor, inputs, loaded.images, 0) if spatial else None
    titles = [f"layer {layer}" for layer in result.layers]
    info = dict(command="flowkern cam", args={k: str(v) for k, v in vars(args).items() if k != "func"})
    with _io.AtomicDir(target, info=info) as out:  # all files or none: never half a result, never two runs mixed
        viz.heatmap_grid(picture, view.heatmap, titles, alpha=args.alpha, normalize=None, path=out / "cam_grid.png")
        for i, layer in enumerate(result.layers):
            viz.save_heatmap(picture, view.heatmap[i], out / f"layer_{layer:02d}.png", alpha=args.alpha,
                             normalize=None)
        np.savez_compressed(out / "cam.npz", **result.to_numpy())

    print(f"answer: {answer}")
    kind = "plain Grad-CAM" if args.noise_std == 0 else f"{args.samples} noisy copies, noise std {args.noise_std:g}"
    print(f"\nLLaVA-CAM at {args.site} ({kind}); image 0, view {view.name!r}, grid {view.shape[0]}x{view.shape[1]}")
    size = None if picture is None else picture.size  # (width, height) of the drawn picture
    print("layer  peak row  peak col" + ("      x px      y px" if size else "") + "     raw max")
    for (layer, row, col, _), raw in zip(result.peaks(0), view.raw, strict=True):
        top = float(raw.max())
        cells = [row, col] if top > 0 else ["-", "-"]  # an all-zero map has no peak (e.g. the last layer)
        if size:
            x, y = (col + 0.5) * size[0] / view.shape[1], (row + 0.5) * size[1] / view.shape[0]
            cells += [f"{x:.0f}", f"{y:.0f}"] if top > 0 else ["-", "-"]
        print(f"{layer:5d}" + "".join(f"{c:>10}" for c in cells) + f"  {top:10.4g}")
    names = ["cam_grid.png", *(f"layer_{layer:02d}.png" for layer in result.layers), "cam.npz"]
    shown = names if len(names) <= 6 else [*names[:3], "...", *names[-2:]]
    print(f"\nwrote {target}/: {', '.join(shown)}")
    return 0
