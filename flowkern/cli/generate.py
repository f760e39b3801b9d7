"""``flowkern generate``: answer a prompt, optionally with image tokens pruned from a layer on, and time it.

.. code-block:: console

    flowkern generate --model llava-hf/llava-1.5-7b-hf --image cat.jpg --prompt "What animal is this?" \\
        --prune-layer 2 --keep 0

prints the answer, the prefill time, the decode speed (tokens/s, forward time) and what was pruned. Registered in
:data:`flowkern.cli.SUBCOMMANDS` as ``"flowkern.cli.generate"``. Other commands take the same pruning flags with
:func:`add_prune_arguments` and wrap their run in :func:`prune_from_args`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path
from typing import Any

__all__ = ["add_parser", "run", "add_prune_arguments", "check_prune_arguments", "prune_from_args", "parse_keep"]

_PRUNE_DEFAULTS = {"keep": 0, "rank": "attention", "prune_seed": 0, "prune_when": "prefill"}
_PRUNE_FLAGS = {"keep": "--keep", "rank": "--rank", "prune_seed": "--prune-seed", "prune_when": "--prune-when"}


def parse_keep(text: str) -> int | float:
    """``--keep``: ``"0"`` / ``"64"`` (image tokens per sample), ``"0.25"`` or ``"25%"`` (a fraction).

    Raises:
        argparse.ArgumentTypeError: anything else.
    """
    value = text.strip()
    try:
        if value.endswith("%"):
            frac = float(value[:-1]) / 100.0
        elif any(c in value for c in ".eE"):
            frac = float(value)
        else:
            k = int(value)
            if k < 0:
                raise ValueError
            return k
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected a count >= 0 (e.g. 0 or 64) or a fraction in [0, 1] (e.g. 0.25 or 25%)"
        ) from None
    if not 0.0 <= frac <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r}: a fraction must be in [0, 1]")
    return frac


def add_prune_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--prune-layer --keep --rank --prune-seed --prune-when`` (pruning is off unless --prune-layer is given)."""
    g = parser.add_argument_group("image-token pruning (flowkern.prune)")
    g.add_argument("--prune-layer", type=int, default=None, metavar="L",
                   help="remove image tokens from decoder layer L on (0-based; the paper's layer L+1); off by default")
    g.add_argument("--keep", type=parse_keep, default=None, metavar="K",
                   help="image tokens kept per sample: 0 (drop all, default), a count (64) or a fraction (0.25, 25%%)")
    g.add_argument("--rank", default=None, choices=["attention", "random", "none", "grid"],
                   help="which to keep: attention received from the last prompt token at layer L-1 (default), "
                        "random (seeded control), none (the first K) or grid (uniform on the image grid: control)")
    g.add_argument("--prune-seed", type=int, default=None, metavar="N", help="seed of --rank random (default 0)")
    g.add_argument("--prune-when", default=None, choices=["prefill", "decode"],
                   help="prefill: layers >= L never see the removed tokens (default); decode: full prefill, then "
                        "the KV cache of layers >= L is compacted for the decode steps")


def check_prune_arguments(args: argparse.Namespace) -> None:
    """Refuse pruning options given without ``--prune-layer`` (they would be silently ignored); with it, fill in the
    defaults of the others (``--keep 0 --rank attention --prune-seed 0 --prune-when prefill``). Call before loading a
    model; calling it again is harmless.

    Raises:
        flowkern.cli.UsageError: e.g. ``--keep 5`` without ``--prune-layer``.
    """
    from flowkern.cli import UsageError

    given = [flag for name, flag in _PRUNE_FLAGS.items() if getattr(args, name, None) is not None]
    if getattr(args, "prune_layer", None) is None:
        if given:
            raise UsageError(f"{', '.join(given)} {'has' if len(given) == 1 else 'have'} no effect without "
                             "--prune-layer L")
        return
    for name, default in _PRUNE_DEFAULTS.items():
        if getattr(args, name, None) is None:
            setattr(args, name, default)


def prune_from_args(model: Any, args: argparse.Namespace) -> contextlib.AbstractContextManager:
    """``flowkern.prune(model, ...)`` from the flags of :func:`add_prune_arguments`, or a null context when
    ``--prune-layer`` is not given. Use as ``with prune_from_args(model, args) as pruning: ...`` (``pruning`` is a
    :class:`flowkern.prune.Pruning` or None).

    Raises:
        flowkern.cli.UsageError: a bad combination (e.g. ``--rank attention`` with ``--prune-layer 0``).
    """
    from flowkern.cli import user_errors

    check_prune_arguments(args)
    if getattr(args, "prune_layer", None) is None:
        return contextlib.nullcontext()
    import flowkern

    with user_errors():
        try:
            return flowkern.prune(model, layer=args.prune_layer, keep=args.keep, rank=args.rank,
                                  seed=args.prune_seed, when=args.prune_when)
        except NotImplementedError as exc:
            raise ValueError(str(exc)) from exc


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``flowkern generate``."""
    from flowkern.cli import add_model_arguments

    p = subparsers.add_parser(
        "generate",
        help="answer a prompt (optionally pruning image tokens from layer L on) and report prefill time and tokens/s",
        description="Greedy answer to the prompt. With --prune-layer L, image tokens are removed from decoder layer "
                    "L on (hidden states and KV cache; flowkern.prune). Prints the answer, the prefill time and the "
                    "decode speed (model forward time, CUDA synchronised).",
    )
    add_model_arguments(p, max_new_tokens=32)
    add_prune_arguments(p)
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the record as JSON")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """The ``generate`` subcommand (see :func:`add_parser`)."""
    import torch

    from flowkern import _io
    from flowkern.cli import UsageError, load_from_args, user_errors
    from flowkern.prune import ForwardTimer, Pruning

    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens {args.max_new_tokens}: expected >= 1")
    check_prune_arguments(args)
    if args.json is not None:  # before any work: a bad path must not cost a model load and a generation
        with user_errors():
            args.json = _io.check_output_path(args.json, overwrite=args.overwrite, what="--json")
    loaded = load_from_args(args)
    model, inputs = loaded.model, loaded.inputs
    pruning_ctx = prune_from_args(model, args)
    with torch.inference_mode(), pruning_ctx as pruning, ForwardTimer(model) as timer:
        sequences = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    answer = loaded.decode(sequences)
    n_new = int(sequences.shape[1] - loaded.prompt_length)
    record: dict[str, Any] = dict(
        answer=answer, prompt_tokens=loaded.prompt_length, new_tokens=n_new,
        prefill_seconds=timer.prefill_seconds, decode_steps=len(timer.decode_seconds),
        decode_tokens_per_second=timer.decode_tokens_per_second,
    )
    print(f"answer: {answer}")
    print(f"prefill: {1e3 * (timer.prefill_seconds or 0.0):.1f} ms ({loaded.prompt_length} prompt tokens)")
    tps = timer.decode_tokens_per_second
    if tps is None:
        print("decode: no decode step (one new token)")
    else:
        print(f"decode: {len(timer.decode_seconds)} steps in {sum(timer.decode_seconds):.3f} s: {tps:.1f} tokens/s")
    if isinstance(pruning, Pruning):
        info = pruning.to_dict()
        record["prune"] = info
        n_img, n_kept = info.get("num_image_tokens", [0])[0], info.get("num_kept_image_tokens", [0])[0]
        where = "the KV cache of layers" if args.prune_when == "decode" else "layers"
        print(f"pruned: {where} >= {pruning.layer} (of {pruning.num_layers}) keep {n_kept} of {n_img} image tokens "
              f"(rank={args.rank}, keep={args.keep})")
    if args.json is not None:
        args_record = {k: str(v) for k, v in vars(args).items() if k != "func"}
        _io.atomic_write_text(args.json, json.dumps(dict(record, args=args_record), indent=1) + "\n")
    return 0
