"""``flowkern eval`` throughput: questions per second at batch 1 vs batch 16, unpruned vs pruned at layer L.

A tiny LLaVA-1.5-layout model is written with ``save_pretrained`` (random weights, no download; the ``"tiny"``
geometry of ``_common.LLAVA_15_SIZES``: CLIP 336 px / patch 14 = 576 image tokens, a 1-layer tower of width 128,
8 text layers of width 256; a word-level tokenizer, so the vocabulary is ~100 words instead of 32064), with POPE
question files in the official format (``--questions`` questions over 8 random 336 x 336 images). Each run is
:func:`flowkern.eval.run.run_eval` — what ``flowkern eval`` runs after loading the model: prompts templated,
batches left-padded, greedy ``generate`` with ``--new-tokens`` new tokens (no end-of-sequence token, so every answer
has that length), answers appended and fsync-ed per batch, then scored. The model is loaded once and passed in, so the
numbers exclude loading (a few seconds for a 7B checkpoint) and include writing and scoring.

Reported per (pruning, batch): the median over ``--repeats`` runs (after a warm-up; the points are run round-robin,
so that load from other processes on a shared machine spreads over all of them) of the generation loop's wall time,
questions per second, the speed-up against batch 1 unpruned in the same process, and whether the answers equal
batch 1's (they must: left padding does not change greedy answers; the script exits 1 if they differ).

    python benchmarks/bench_eval.py                # CPU; writes results/cpu-<n>core-eval.json
    python benchmarks/bench_eval.py --device cuda  # the same tiny model on a GPU; results/<gpu>-eval.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from _common import device_label, make_report, model_summary, resolve_device, save_pope, save_pope_model, write_report
from PIL import Image

from flowkern.eval.answers import ANSWERS_FILE
from flowkern.eval.run import EvalConfig, run_eval
from flowkern.hf.loading import load_model
from flowkern.plan import PruneSpec

SIZE = "tiny"
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu")
    ap.add_argument("--questions", type=int, default=32, help="POPE questions per run (default 32)")
    ap.add_argument("--batches", default="1,16", help="comma-separated batch sizes, the first is the reference")
    ap.add_argument("--layer", type=int, default=2, help="pruned runs: image tokens removed from this layer on")
    ap.add_argument("--new-tokens", type=int, default=8, help="answer length (default 8)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per point (default 3), after one warm-up")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    ap.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/<device>-eval.json")
    args = ap.parse_args()

    device = resolve_device(args.device)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    batches = [int(b) for b in args.batches.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    save_pope_model(tmp / "model")
    data, images = save_pope(tmp, args.questions)
    model, processor = load_model(tmp / "model", device=device, dtype="float32")
    prunings = {"unpruned": {}, f"prune L={args.layer} k=0": dict(prune=PruneSpec(layer=args.layer, keep=0))}

    def one_run(name: str, batch: int, prune: dict, limit: int | None = None) -> tuple[float, dict]:
        out = tmp / "runs" / f"{name.replace(' ', '_')}-b{batch}"
        cfg = EvalConfig(model=str(tmp / "model"), task="pope", data=data, images=images, out=out, limit=limit,
                         batch_size=batch, max_new_tokens=args.new_tokens, device=device, overwrite=True, **prune)
        result = run_eval(cfg, model=model, processor=processor)
        rows = [json.loads(line) for line in (out / ANSWERS_FILE).read_text().splitlines()]
        return result.seconds, {r["question_id"]: r["text"] for r in rows}

    for prune in prunings.values():  # warm-up: every code path once
        for batch in batches:
            one_run("warmup", batch, prune, limit=min(batch, args.questions))
    points = [(name, prune, batch) for name, prune in prunings.items() for batch in batches]
    times: dict[tuple[str, int], list[float]] = {(n, b): [] for n, _, b in points}
    answers: dict[tuple[str, int], dict] = {}
    for _ in range(args.repeats):  # round-robin, so that a load spike on the shared machine hits every point alike
        for name, prune, batch in points:
            seconds, got = one_run(name, batch, prune)
            times[name, batch].append(seconds)
            if answers.setdefault((name, batch), got) != got:
                raise SystemExit(f"{name} batch {batch}: answers differ between repeats")
    rows = []
    reference_qps = args.questions / statistics.median(times[points[0][0], points[0][2]])
    for name, _, batch in points:
        median = statistics.median(times[name, batch])
        qps = args.questions / median
        row = dict(pruning=name, batch=batch, questions=args.questions, seconds=median, times=times[name, batch],
                   questions_per_second=qps, speedup=qps / reference_qps,
                   answers_equal_batch_1=answers[name, batch] == answers[name, batches[0]])
        rows.append(row)
        print(f"{name:16s} batch {batch:3d}: {median:7.2f} s  {qps:7.2f} questions/s  "
              f"answers = batch {batches[0]}: {row['answers_equal_batch_1']}", flush=True)
    setup = dict(dtype="float32", task="pope", new_tokens=args.new_tokens, layer=args.layer,
                 model=model_summary(model, SIZE, vocab=True),
                 prompt_tokens=int(processor(images=Image.new("RGB", (336, 336)), text="USER : <image> Is there a dog "
                                             "in the image? Answer the question using a single word or phrase. "
                                             "ASSISTANT :", return_tensors="pt")["input_ids"].shape[1]))
    report = make_report(device_label(device), device, with_transformers=True, setup=setup, results=rows,
                         load_average=list(os.getloadavg()))
    write_report(report, args.out, "eval", markdown_table)
    if not all(r["answers_equal_batch_1"] for r in rows):
        print("ERROR: batched answers differ from batch 1", file=sys.stderr)
        sys.exit(1)


def markdown_table(report: dict) -> str:
    m = report["model"]
    lines = [
        f"{report['device']} ({report['device_name']}, {report['threads']} threads, torch {report['torch']}, "
        f"transformers {report['transformers']}, {report['dtype']}): `flowkern eval` engine on a saved tiny LLaVA "
        f"({m['image_tokens_per_image']} image tokens, {m['text_layers']} text layers x {m['hidden']}, vocab "
        f"{m['vocab']}), POPE, ~{report['prompt_tokens']} prompt tokens, {report['new_tokens']} new tokens, median of "
        f"{len(report['results'][0]['times'])} runs",
        "",
        "| pruning | batch | questions | s | questions/s | speed-up | answers = batch 1 |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in report["results"]:
        lines.append(f"| {r['pruning']} | {r['batch']} | {r['questions']} | {r['seconds']:.2f} | "
                     f"{r['questions_per_second']:.2f} | {r['speedup']:.2f}x | "
                     f"{'yes' if r['answers_equal_batch_1'] else 'NO'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
