"""``flowkern generate``: answer a prompt, optionally with image tokens pruned from a layer on, and time it.

.. code-block:: console

    flowkern generate --model llava-hf/llava-1.5-7b-hf --image cat.jpg --prompt "What animal is this?" \\
        --prune-layer 2 --keep 0

prints the answer, the prefill time, the decode speed (tokens/s, forward time) and what was pruned. Registered in
:data:`flowkern.cli.SUBCOMMANDS` as ``"generate"``. The pruning flags are
:func:`flowkern.cli.common.add_prune_arguments`, shared with ``flow`` and ``eval``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from flowkern.cli.common import (
    UsageError,
    add_model_arguments,
    add_prune_arguments,
    check_prune_arguments,
    load_from_args,
    prune_from_args,
    user_errors,
)

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``flowkern generate`` on the ``flowkern`` command's subparsers."""
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
    from flowkern.prune import Pruning
    from flowkern.timer import ForwardTimer

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
        how = (f"keep={args.keep}" if pruning.spec.schedule is None else
               "schedule=" + ",".join(f"{x}:{k}" for x, k in pruning.stages))
        print(f"pruned: {where} >= {pruning.layer} (of {pruning.num_layers}) keep {n_kept} of {n_img} image tokens "
              f"(rank={args.rank}, {how}{', merged' if pruning.spec.merge else ''})")
    if args.json is not None:
        args_record = {k: str(v) for k, v in vars(args).items() if k != "func"}
        _io.atomic_write_text(args.json, json.dumps(dict(record, args=args_record), indent=1) + "\n")
    return 0
