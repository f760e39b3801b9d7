"""Measure a shapes-trained model on fresh shapes sets: the demo model's quality table.

.. code-block:: console

    python -m flowkern.demo.quality --model demo --seed 1000 --num 200 --out quality/

For each task analogue a set is written with :func:`flowkern.shapes.write_task` (``seed`` fresh: no one has
tuned on it), read back with the :mod:`flowkern.eval` loader of the real benchmark, answered with greedy decoding
(LLaVA answer-file records) and scored by the task's own ``score``. ``pope-noimage`` is shapes-POPE again with
every image token removed from decoder layer 0 on (``flowkern.prune(model, layer=0, keep=0)``): it should sit near
chance (50 %) if the answers really come from the image. Prints a Markdown table and the metrics as JSON on the
last line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from flowkern import shapes as world
from flowkern.demo import resolve_model
from flowkern.eval import Task, get_task

__all__ = ["MAX_NEW_TOKENS", "BARS", "answer_task", "shapes_task", "evaluate", "table", "figure", "main"]

MAX_NEW_TOKENS = {"pope": 3, "sqa": 3, "textvqa": 4, "chair": 48}
"""Answer length limits per loader task (captions need the most)."""

BARS: dict[str, tuple[str, str, float]] = {
    "pope": ("accuracy", ">=", 0.95), "sqa": ("accuracy", ">=", 0.85), "textvqa": ("accuracy", ">=", 0.80),
    "caption": ("chair_s", "<=", 0.10), "pope-noimage": ("accuracy", "within 0.10 of", 0.50),
    "caption-noimage": ("count_accuracy", "diagnostic", float("nan")),
}
"""The demo model's quality bar: (metric, comparison, threshold) per row of the table; ``diagnostic`` rows have
no bar (``caption-noimage``: captions with every image token removed from layer 0 on; its ``count_accuracy``
against the caption row's shows how much of the object count comes from the image)."""

_COUNT_WORDS = {w: i for i, w in enumerate(world.NUMBER_WORDS)}


def count_accuracy(task: Task, records: Sequence[dict[str, Any]]) -> float:
    """Share of captions whose ``There are N shapes`` / ``There is one shape`` states the true object count."""
    right = 0
    for r in records:
        words = r[task.text_field].split()
        said = _COUNT_WORDS.get(words[2]) if len(words) > 2 and words[:2] == ["There", "are"] else (
            1 if words[:3] == ["There", "is", "one"] else None)
        right += said == len(task.sample(r[task.id_field]).reference["classes"])
    return right / len(records) if records else 0.0

_LOADER = {"pope": "pope", "sqa": "sqa", "textvqa": "textvqa", "caption": "chair"}


def shapes_task(task: str, folder: str | Path, *, seed: int, num: int) -> Task:
    """Write a shapes set of ``task`` into ``folder`` and return the real benchmark's loader reading it."""
    folder = Path(folder)
    world.write_task(task, folder, seed=seed, num=num)
    images = folder / "images" if task == "pope" else None
    return get_task(_LOADER[task], folder, images)


def answer_task(model: Any, processor: Any, task: Task, *, limit: int | None = None, batch_size: int = 16,
                prune_layer: int | None = None) -> list[dict[str, Any]]:
    """Greedy answers to a task's samples as LLaVA answer-file records (``question_id``/``text``; captions
    ``image_id``/``caption``), batched with left padding; ``prune_layer``: inside
    ``flowkern.prune(model, layer=prune_layer, keep=0)``."""
    from PIL import Image

    from flowkern.prune import prune

    samples = task.samples[:limit] if limit else task.samples
    tok = processor.tokenizer
    tok.padding_side = "left"
    param = next(model.parameters())
    records = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        texts = [processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": s.prompt}]}],
            add_generation_prompt=True, tokenize=False) for s in chunk]
        images = []
        for s in chunk:
            with Image.open(s.image) as im:
                images.append(im.convert("RGB"))
        inputs = processor(images=images, text=texts, return_tensors="pt", padding=True).to(param.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(param.dtype)
        pruning = (prune(model, layer=prune_layer, keep=0, rank="none", timing=False)
                   if prune_layer is not None else contextlib.nullcontext())
        with torch.inference_mode(), pruning:
            out = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS[task.name], do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        answers = tok.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        for s, text in zip(chunk, answers, strict=True):
            text = text.strip()
            records.append({task.id_field: s.id, task.text_field: text, "prompt": s.prompt})
    return records


def evaluate(model_dir: str | Path = "demo", *, seed: int = 1000, num: int = 100,
             tasks: Sequence[str] = ("pope", "sqa", "textvqa", "caption", "pope-noimage", "caption-noimage"),
             batch_size: int = 16,
             out: str | Path | None = None, threads: int | None = None) -> dict[str, Any]:
    """Score ``model_dir`` (a directory or ``"demo"``) on fresh shapes sets of ``num`` images each.

    Returns ``{row: {"metrics": ..., "value": ..., "bar": ..., "passed": ..., "seconds": ...}}``; with ``out``, the
    sets, answer files and ``quality.json`` are kept there.
    """
    from flowkern.hf.loading import load_model

    if threads:
        torch.set_num_threads(threads)
    model, processor = load_model(resolve_model(model_dir), device="cpu")
    results: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        root = Path(out) if out else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        loaded: dict[str, Task] = {}
        for row in tasks:
            name = row.removesuffix("-noimage")
            if name not in loaded:
                loaded[name] = shapes_task(name, root / f"shapes-{name}", seed=seed, num=num)
            task = loaded[name]
            t0 = time.time()
            records = answer_task(model, processor, task, batch_size=batch_size,
                                  prune_layer=0 if row.endswith("-noimage") else None)
            seconds = time.time() - t0
            (root / f"answers-{row}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
            metrics = task.score(records_to_predictions(task, records))
            if name == "caption":
                metrics["count_accuracy"] = count_accuracy(task, records)
            key, op, threshold = BARS[row]
            value = float(metrics[key])
            if op == "diagnostic":
                passed = None
            elif op.startswith("within"):
                passed = abs(value - threshold) <= 0.10
            else:
                passed = value >= threshold if op == ">=" else value <= threshold
            results[row] = {"metric": key, "value": value, "passed": passed,
                            "bar": "-" if op == "diagnostic" else f"{op} {threshold:g}",
                            "n": metrics["n"], "seconds": round(seconds, 1), "metrics": metrics,
                            "examples": records[:5]}
        if out:
            (root / "quality.json").write_text(json.dumps({"seed": seed, "num": num, "results": results},
                                                          indent=1, default=str) + "\n")
    return results


def records_to_predictions(task: Task, records: Sequence[dict[str, Any]]) -> list:
    """Answer records -> :class:`flowkern.eval.Prediction` objects, as ``read_predictions`` would give them."""
    from flowkern.eval import Prediction

    return [Prediction(r[task.id_field], r[task.text_field], r) for r in records]


def table(results: dict[str, Any]) -> str:
    """The Markdown quality table of :func:`evaluate`'s results (shapes-SQA's other metrics: accuracy per problem
    kind, ``problems.json``'s ``category``)."""
    lines = ["| task | n | metric | value | bar | passed | other metrics |", "|---|---|---|---|---|---|---|"]
    for row, r in results.items():
        m = r["metrics"]
        other = {"pope": ("f1", "yes_ratio"), "caption": ("chair_i", "recall", "count_accuracy")}.get(
            row.removesuffix("-noimage"), ())
        parts = [f"{k} {100 * m[k]:.1f} %" for k in other if k in m]
        parts += [f"{kind} {100 * c['accuracy']:.1f} % of {c['n']}"  # shapes-SQA: by problem kind
                  for kind, c in m.get("by_category", {}).items()]
        others = ", ".join(parts)
        verdict = "-" if r["passed"] is None else ("yes" if r["passed"] else "NO")
        lines.append(f"| shapes-{row} | {r['n']} | {r['metric']} | {100 * r['value']:.1f} % | {r['bar']} | "
                     f"{verdict} | {others} |")
    return "\n".join(lines)


def figure(model_dir: str | Path, path: str | Path, *, seed: int = 2024,
           picks: Sequence[tuple[str, int]] = (("pope", 0), ("pope", 3), ("sqa", 0), ("sqa", 1), ("textvqa", 0),
                                               ("caption", 0), ("caption", 1), ("sqa", 2))) -> Path:
    """A PNG of a few fresh shapes images with the question, the model's answer and the reference, one panel
    per ``(task, sample index)`` of ``picks`` (matplotlib, no pyplot)."""
    import textwrap

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from PIL import Image

    from flowkern.hf.loading import load_model

    model, processor = load_model(resolve_model(model_dir), device="cpu")
    cols = 4
    rows = math.ceil(len(picks) / cols)
    fig = Figure(figsize=(4.2 * cols, 6.0 * rows), dpi=90)
    FigureCanvasAgg(fig)
    with tempfile.TemporaryDirectory() as tmp:
        tasks: dict[str, Task] = {}
        for k, (name, index) in enumerate(picks):
            if name not in tasks:
                tasks[name] = shapes_task(name, Path(tmp) / name, seed=seed, num=max(i for n, i in picks
                                                                                   if n == name) + 2)
            task = tasks[name]
            sample = task.samples[index]
            one = _OneSample(task, sample)
            record = answer_task(model, processor, one)[0]
            answer = record[task.text_field]
            ax = fig.add_subplot(rows, cols, k + 1)
            with Image.open(sample.image) as im:
                ax.imshow(im.convert("RGB"))
            ax.set_xticks([])
            ax.set_yticks([])
            question = sample.meta.get("question", sample.prompt.split("\n")[0]) if name != "caption" \
                else "Please describe this image in detail."
            if name == "sqa":
                question += "  " + "  ".join(f"{chr(65 + i)}. {c}" for i, c in enumerate(sample.meta["choices"]))
                hint = sample.prompt.split("\n")[0]
                if hint.startswith("Context:"):
                    question = hint + " " + question
            ref = sample.reference
            if name == "textvqa":
                ref = ref[0]
            elif name == "caption":
                ref = ", ".join(sorted(task.ground_truth(sample)))
            right = _correct(task, sample, answer)
            ax.set_title(f"shapes-{name}", fontsize=10, fontweight="bold")
            text = (textwrap.fill(f"Q: {question}", 46) + "\n" + textwrap.fill(f"model: {answer}", 46) + "\n"
                    + textwrap.fill(f"truth: {ref}", 46))
            ax.text(0.0, -0.03, text, transform=ax.transAxes, va="top", ha="left", fontsize=8.5,
                    color="darkgreen" if right else "darkred", family="monospace")
    fig.subplots_adjust(left=0.02, right=0.98, top=0.97, bottom=0.16, wspace=0.08, hspace=0.62)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


class _OneSample(Task):
    """A view of one sample of a task (for :func:`figure`)."""

    def __init__(self, task: Task, sample: Any) -> None:
        super().__init__()
        self.name, self.id_field, self.text_field = task.name, task.id_field, task.text_field  # type: ignore[misc]
        self._one = sample

    def _load(self) -> list:
        return [self._one]


def _correct(task: Task, sample: Any, answer: str) -> bool:
    result = task.score({sample.id: answer})
    return result["chair_s"] == 0.0 and result["recall"] == 1.0 if task.name == "chair" else result["accuracy"] > 0.99


def main(argv: list[str] | None = None) -> int:
    """``python -m flowkern.demo.quality --model demo --seed 1000 --num 100``."""
    p = argparse.ArgumentParser(prog="python -m flowkern.demo.quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="demo", help="model directory, or demo (the shipped model)")
    p.add_argument("--seed", type=int, default=1000, help="seed of the fresh shapes sets (default 1000)")
    p.add_argument("--num", type=int, default=100, help="images per set (default 100)")
    p.add_argument("--tasks", default="pope,sqa,textvqa,caption,pope-noimage,caption-noimage",
                   help="comma-separated rows (a task, or task-noimage: every image token removed from layer 0 on)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", type=Path, default=None, help="keep the sets, answers and quality.json here")
    p.add_argument("--figure", type=Path, default=None, help="also draw a PNG of a few images with the answers")
    args = p.parse_args(argv)
    if args.figure:
        print(f"wrote {figure(args.model, args.figure)}")
    results = evaluate(args.model, seed=args.seed, num=args.num, tasks=args.tasks.split(","),
                       batch_size=args.batch_size, out=args.out, threads=args.threads)
    print(table(results))
    print(json.dumps({k: {"value": v["value"], "passed": v["passed"], "n": v["n"]} for k, v in results.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
