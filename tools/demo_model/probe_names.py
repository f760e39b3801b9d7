"""Where a shapes-trained model's "whose shape is further to the left / right?" answer breaks, hop by hop.

The problem (``Context: Anna drew the red circle. Ben drew the blue square. Whose shape is further to the left?
A. Ben B. Anna``) needs four hops. For ``--num`` such problems from a training stream no run draws
(``training_example(99, i)`` with every problem of that kind), teacher-forced in one eager forward pass, this
prints, per hop, what a linear read-out of the residual stream finds (least squares with a small ridge, fitted on
the first half of the tokens, scored on the second), at the input of each decoder layer 0..8:

- ``owner``: at each context sentence's shape word (``circle.``), which of the four names drew it (accuracy;
  chance 0.25) -- the word knows its drawer;
- ``place``: at the same word, the object's column (R^2 = 1 - SSE / SST; 0 or below: nothing) -- it knows where its
  object lies (the place read-out of ``--position-aids`` trains this into layer 3);
- ``option``: at each option's name (``B. Anna``), the column of the object that person drew (R^2) -- the option
  knows where its person's object lies (``--names-place`` trains this into layer 5);

- ``verdict``: at the second option's name, whether that person's object is the one further to the side asked,
  i.e. whether it is the answer (accuracy; chance 0.5) -- the comparison is made (``--names-compare`` trains this
  into layer 6);

and for the last hop, at the position that predicts the letter:

- ``side``: whether the question asks for the left or the right (accuracy; chance 0.5);
- ``text_mass``: the mean attention of heads 0-1 in layers 4-5 on the right option's line (0.5: no preference
  between the two options; the text guide of training pulls it up);
- ``letter``: the share of letters predicted right (greedy over the vocabulary; chance 0.5).

    python -m tools.demo_model.probe_names demo RUN --num 256

Prints one line per model, e.g. ``demo {'owner': [...], 'place': [...], 'option': [...], 'verdict': [...],
'side': [...], 'text_mass': 0.5, 'letter': 0.47}`` (lists: one value per decoder-layer input).
"""

from __future__ import annotations

import argparse
import sys

import torch


def _ridge(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Predictions on the second half of ``x`` ``[N, D]`` of a ridge fit (lambda 1) of ``y`` ``[N, K]`` on the first
    half (a constant column added)."""
    x = torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.float64)], dim=1)
    half = len(x) // 2
    a = x[:half]
    w = torch.linalg.solve(a.T @ a + torch.eye(a.shape[1], dtype=torch.float64), a.T @ y[:half].double())
    return x[half:] @ w


def _r2(x: torch.Tensor, column: torch.Tensor) -> float:
    pred = _ridge(x, column[:, None].double())[:, 0]
    truth = column[len(column) // 2:].double()
    return round(float(1 - ((pred - truth) ** 2).sum() / ((truth - truth.mean()) ** 2).sum()), 3)


def probe(model_dir: str, num: int = 256, batch_size: int = 32) -> dict[str, object]:
    """The read-outs above for the model in ``model_dir`` (or ``demo``) on ``num`` "whose shape" problems:
    ``owner`` / ``place`` / ``option`` / ``verdict`` / ``side``: one value per decoder-layer input
    (``num_layers + 1``); ``text_mass`` and ``letter`` in [0, 1]."""
    from flowkern import shapes as world
    from flowkern.demo import resolve_model
    from flowkern.hf.loading import load_model
    from tools.demo_model.config import ATTENTION_HEADS, NAMES_PLACE_LAYER, TEXT_ATTENTION_LAYERS
    from tools.demo_model.data import encode, training_example

    # eager attention: the probe reads the attention weights
    model, processor = load_model(resolve_model(model_dir), device="cpu", attn_implementation="eager")
    tok = processor.tokenizer
    names = list(world.PEOPLE)
    examples, i = [], 0
    while len(examples) < num:
        ex = training_example(99, i, {"sqa": 1.0}, ("names", 1.0))
        i += 1
        if ex["kind"] == "names":
            examples.append(ex)
    owner: list[tuple[list[torch.Tensor], int]] = []  # (hidden state per layer input, drawer's index)
    place: list[tuple[list[torch.Tensor], int]] = []  # (..., column of the sentence's object)
    option: list[tuple[list[torch.Tensor], int]] = []  # (..., column of the option's person's object)
    verdict: list[tuple[list[torch.Tensor], int]] = []  # (... at the second option, 1: it is the answer)
    side: list[tuple[list[torch.Tensor], int]] = []  # (... at the letter's position, 1: "left" asked)
    mass: list[float] = []
    right = 0
    for start in range(0, num, batch_size):
        chunk = examples[start:start + batch_size]
        batch = encode(processor, chunk)
        with torch.no_grad():
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        pixel_values=batch["pixel_values"], output_hidden_states=True, output_attentions=True)
        states = out.hidden_states
        for (row, pos), (col, _), layer in zip(batch["place_rows"].tolist(), batch["place_cells"].tolist(),
                                               batch["place_layers"].tolist(), strict=True):
            (option if layer == NAMES_PLACE_LAYER else place).append(([h[row, pos].float() for h in states], col))
        for (row, pos), keys in zip(batch["owner_rows"].tolist(), batch["owner_keys"], strict=True):
            drawer = tok.convert_ids_to_tokens([int(batch["input_ids"][row, int(keys.nonzero()[0, 0])])])[0]
            owner.append(([h[row, pos].float() for h in states], names.index(drawer)))
        for (row, pos), label in zip(batch["compare_rows"].tolist(), batch["compare_labels"].tolist(), strict=True):
            verdict.append(([h[row, pos].float() for h in states], label))
        for k, ex in enumerate(chunk):
            last = int((batch["labels"][k] == -100).sum()) - 1
            side.append(([h[k, last].float() for h in states], int("left?" in ex["prompt"])))
        rows, keys = batch["text_rows"], batch["text_keys"]
        for layer in TEXT_ATTENTION_LAYERS:
            probs = out.attentions[layer][rows[:, 0], 0:ATTENTION_HEADS, rows[:, 1]].float().mean(1)
            mass += (probs * keys).sum(-1).tolist()
        for k, ex in enumerate(chunk):
            n = int((batch["labels"][k] == -100).sum())
            right += tok.convert_ids_to_tokens([int(out.logits[k, n - 1].argmax())])[0] == ex["answer"]
    layers = len(states)

    def stack(items: list[tuple[list[torch.Tensor], int]], layer: int) -> torch.Tensor:
        return torch.stack([h[layer] for h, _ in items])

    def accuracy(items: list[tuple[list[torch.Tensor], int]], classes: int) -> list[float]:
        y = torch.tensor([label for _, label in items])
        out = []
        for layer in range(layers):
            pred = _ridge(stack(items, layer), torch.nn.functional.one_hot(y, classes)).argmax(1)
            out.append(round(float((pred == y[len(y) // 2:]).float().mean()), 3))
        return out

    return {"owner": accuracy(owner, len(names)),
            "place": [_r2(stack(place, L), torch.tensor([y for _, y in place])) for L in range(layers)],
            "option": [_r2(stack(option, L), torch.tensor([y for _, y in option])) for L in range(layers)],
            "verdict": accuracy(verdict, 2), "side": accuracy(side, 2),
            "text_mass": round(sum(mass) / len(mass), 3), "letter": round(right / num, 3)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.demo_model.probe_names", description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+", help="model directories, or demo (the shipped model)")
    p.add_argument("--num", type=int, default=256, help="'whose shape' problems (default 256; at least 16)")
    args = p.parse_args(argv)
    if args.num < 16:
        p.error(f"--num must be at least 16 (two halves of read-out samples), got {args.num}")
    for m in args.models:
        print(m, probe(m, args.num), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
