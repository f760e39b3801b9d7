"""What a shapes-trained model's image tokens carry: per-patch word read-outs and a linear read-out of the column.

For ``--num`` label-bearing training-stream scenes that no training run draws (``training_example(777, i)``, TextVQA
only, so every image has a label), the image tokens (the projector's output, ``[num, 64, width]``) are compared,
by cosine similarity, with the language model's input embeddings of the candidate words:

- ``color`` / ``shape``: on patches under an object, the argmax over the colour (shape) words equals the colour
  (shape) of the object under the patch;
- ``char``: on label patches, the argmax over the label characters and their ``##`` continuations equals the
  character under the patch (``##K`` for a two-character label's second one) -- how well the tower reads labels;
- ``col_R2``: a least-squares linear map from the image tokens (plus a constant) to the patch's column, fitted on
  the first half of the tokens and scored (R^2 = 1 - SSE / SST) on the second half: whether the tokens know where
  they are (0 or below: not at all; 1: exactly).

    python -m tools.demo_model.probe_tower demo RUN --num 128

Prints one line per model, e.g. ``demo {'color': 1.0, 'shape': 0.997, 'char': 0.925, 'col_R2': -0.044}``.
"""

from __future__ import annotations

import argparse
import sys

import torch


def probe(model_dir: str, num: int = 128) -> dict[str, float]:
    """The read-outs above for the model in ``model_dir`` (or ``demo``) on ``num`` scenes; values in [0, 1]
    (``col_R2`` may be negative)."""
    from flowkern.demo import resolve_model
    from flowkern.hf.loading import load_model
    from tools.demo_model.config import VISION
    from tools.demo_model.data import patch_batch, training_example
    from tools.demo_model.losses import PATCH_WORDS, patch_classes

    model, processor = load_model(resolve_model(model_dir), device="cpu")
    grid = VISION["image_size"] // VISION["patch_size"]
    examples = [training_example(777, i, {"textvqa": 1.0}) for i in range(num)]
    targets = patch_batch(examples, grid)
    pixels = processor.image_processor(images=[e["image"] for e in examples], return_tensors="pt")["pixel_values"]
    captured: dict[str, torch.Tensor] = {}
    hook = model.model.multi_modal_projector.register_forward_hook(lambda _m, _i, o: captured.__setitem__("x", o))
    with torch.no_grad():
        model.model.get_image_features(pixel_values=pixels)
    hook.remove()
    feats = captured["x"].float().reshape(num * grid * grid, -1)
    unit = torch.nn.functional.normalize(feats, dim=-1)
    vocab = processor.tokenizer.get_vocab()
    embeddings = model.get_input_embeddings().weight.detach().float()

    def agreement(words: list[str], target: torch.Tensor) -> float:
        table = torch.nn.functional.normalize(embeddings[[vocab[w] for w in words]], dim=-1)
        on = target > 0
        predicted = (unit @ table.T).argmax(-1) + 1
        return float((predicted[on] == target[on]).float().mean())

    result = {key: agreement(list(words), patch_classes(targets, key)) for key, words in PATCH_WORDS.items()}
    x = torch.cat([feats, torch.ones(len(feats), 1)], dim=1).double()
    column = (torch.arange(grid * grid).repeat(num) % grid).double()[:, None]
    half = len(x) // 2
    solution = torch.linalg.lstsq(x[:half], column[:half]).solution
    residual = x[half:] @ solution - column[half:]
    result["col_R2"] = float(1 - residual.pow(2).sum() / (column[half:] - column[half:].mean()).pow(2).sum())
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.demo_model.probe_tower", description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+", help="model directories (or demo)")
    p.add_argument("--num", type=int, default=128, help="scenes (default 128)")
    args = p.parse_args(argv)
    if args.num < 2:
        p.error(f"--num must be >= 2, got {args.num}")
    torch.set_num_threads(2)
    for model_dir in args.models:
        print(model_dir, {k: round(v, 3) for k, v in probe(model_dir, args.num).items()}, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
