"""``flowkern sweep`` vs running each point on its own: a full truncation sweep (baseline + every decoder layer) on a
single-token task.

A tiny LLaVA-1.5-layout model is written with ``save_pretrained`` (random weights, no download; the ``"tiny"``
geometry of ``_common.LLAVA_15_SIZES``: CLIP 336 px / patch 14 = 576 image tokens, a 1-layer tower of width 128,
8 text layers of width 256), with ``--questions`` POPE questions over 8 random images, answered with one new token
(``max_new_tokens=1``: a single-token task).

- **independent**: the baseline and each point ``L = 0..7`` (k = 0) as its own :func:`flowkern.eval.run.run_eval`
  (what ``flowkern eval --prune-layer L`` runs after loading the model), one after the other;
- **sweep**: :func:`flowkern.eval.sweep.run_sweep` over the same points: per batch, the processor runs once, the
  images are encoded once (:class:`flowkern.hf.reuse.ImageCache`), the point with the largest L records the
  prefill's per-layer keys/values and hidden states, and every other point skips its layers below L
  (:class:`flowkern.hf.reuse.PrefixShare`);
- **sweep, no reuse**: ``run_sweep(reuse=False)``: the same engine, every point encoding the images and computing all
  its layers.

The model is loaded once and passed in. Reported: the median over ``--repeats`` (round-robin, after a warm-up) of
the wall time of each, the ratio sweep / independent, and whether every point's answer file is identical between the
three (the script exits 1 if not). The modes run round-robin in a rotated order; each round's ratio to that round's
independent run is kept too (``round_ratios``, ``round_ratio_median``: a drifting load biases it less). Also the
process CPU time of each run (``cpu_seconds``, ``cpu_ratio``): on a
machine shared with other work the wall times stretch unevenly, the CPU times much less (``--note`` records the
conditions in the results file).

    python benchmarks/bench_sweep.py                 # CPU; writes results/cpu-<n>core-sweep.json
    python benchmarks/bench_sweep.py --device cuda   # results/<gpu>-sweep.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import device_label, make_report, model_summary, resolve_device, save_pope, save_pope_model, write_report
from PIL import Image

from flowkern.eval.run import EvalConfig, run_eval
from flowkern.eval.sweep import SweepConfig, run_sweep
from flowkern.hf.loading import load_model
from flowkern.plan import PruneSpec

SIZE = "tiny"
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu")
    ap.add_argument("--questions", type=int, default=16, help="POPE questions (default 16)")
    ap.add_argument("--batch-size", type=int, default=4, help="questions per generate call (default 4)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each mode (default 3), after a warm-up")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    ap.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/<device>-sweep.json")
    ap.add_argument("--note", default=None, help="measuring conditions to record in the results file")
    args = ap.parse_args()

    device = resolve_device(args.device)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    tmp = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    save_pope_model(tmp / "model")
    data, images = save_pope(tmp, args.questions)
    model, processor = load_model(tmp / "model", device=device, dtype="float32")
    layers = list(range(model.config.text_config.num_hidden_layers))
    common = dict(model=str(tmp / "model"), task="pope", data=data, images=images, batch_size=args.batch_size,
                  max_new_tokens=1, device=device)
    names = ["baseline"] + [f"L{x:02d}" for x in layers]

    def answers(folder: Path) -> dict[str, str]:
        return {n: (folder / n / "answers.jsonl").read_text() for n in names}

    def independent(tag: str, limit: int | None = None) -> tuple[float, float, dict]:
        out = tmp / tag
        start, cpu = time.perf_counter(), time.process_time()
        for layer in [None, *layers]:
            name = "baseline" if layer is None else f"L{layer:02d}"
            run_eval(EvalConfig(out=out / name, limit=limit, prune=PruneSpec(layer=layer), overwrite=True, **common),
                     model=model, processor=processor)
        return time.perf_counter() - start, time.process_time() - cpu, answers(out)

    def sweep(tag: str, reuse: bool, limit: int | None = None) -> tuple[float, float, dict]:
        out = tmp / tag
        start, cpu = time.perf_counter(), time.process_time()
        run_sweep(SweepConfig(out=out, layers="all", limit=limit, reuse=reuse, overwrite=True, **common),
                  model=model, processor=processor)
        return time.perf_counter() - start, time.process_time() - cpu, answers(out / "points")

    modes = {"independent": lambda: independent("ind"), "sweep": lambda: sweep("sweep", True),
             "sweep, no reuse": lambda: sweep("plain", False)}
    independent("warm-ind", args.batch_size)
    sweep("warm-sweep", True, args.batch_size)
    times: dict[str, list[float]] = {m: [] for m in modes}
    cpu_times: dict[str, list[float]] = {m: [] for m in modes}
    got: dict[str, dict] = {}
    load_before = list(os.getloadavg())
    order = list(modes)
    for r in range(args.repeats):
        for mode in order[r % len(order):] + order[:r % len(order)]:  # rotated: no mode always runs first
            seconds, cpu, ans = modes[mode]()
            times[mode].append(seconds)
            cpu_times[mode].append(cpu)
            if got.setdefault(mode, ans) != ans:
                raise SystemExit(f"{mode}: answers differ between repeats")
    ref = statistics.median(times["independent"])
    cpu_ref = statistics.median(cpu_times["independent"])
    rows = []
    for mode in modes:
        median, cpu = statistics.median(times[mode]), statistics.median(cpu_times[mode])
        rounds = [t / i for t, i in zip(times[mode], times["independent"], strict=True)]
        row = dict(mode=mode, points=len(names), questions=args.questions, seconds=median, times=times[mode],
                   ratio_to_independent=median / ref, round_ratios=rounds,
                   round_ratio_median=statistics.median(rounds), cpu_seconds=cpu, cpu_times=cpu_times[mode],
                   cpu_ratio=cpu / cpu_ref, answers_equal_independent=got[mode] == got["independent"])
        rows.append(row)
        print(f"{mode:16s}: {median:7.2f} s  x{median / ref:.3f} of independent (per round: median "
              f"x{row['round_ratio_median']:.3f})  CPU {cpu:6.2f} s x{cpu / cpu_ref:.3f}  answers equal: "
              f"{row['answers_equal_independent']}", flush=True)
    prompt_tokens = int(processor(images=Image.new("RGB", (336, 336)), text="USER : <image> Is there a dog in the "
                                  "image? Answer the question using a single word or phrase. ASSISTANT :",
                                  return_tensors="pt")["input_ids"].shape[1])
    setup = dict(dtype="float32", task="pope", new_tokens=1, batch_size=args.batch_size, layers=layers,
                 model=model_summary(model, SIZE, vocab=True), prompt_tokens=prompt_tokens)
    report = make_report(device_label(device), device, with_transformers=True, setup=setup, results=rows,
                         load_average_before=load_before, load_average=list(os.getloadavg()),
                         **({"note": args.note} if args.note else {}))
    write_report(report, args.out, "sweep", markdown_table)
    if not all(r["answers_equal_independent"] for r in rows):
        print("ERROR: sweep answers differ from independent points", file=sys.stderr)
        sys.exit(1)


def markdown_table(report: dict) -> str:
    m = report["model"]
    lines = [f"{report['device']} ({report['device_name']}, {report['threads']} threads, torch {report['torch']}, "
             f"transformers {report['transformers']}); LLaVA-1.5 tiny config, random weights: {m['text_layers']} "
             f"text layers x {m['hidden']}, {report['prompt_tokens']} prompt tokens (576 image); POPE, "
             f"{report['results'][0]['questions']} questions, batch {report['batch_size']}, 1 new token; "
             f"{report['results'][0]['points']} points (baseline + L = 0..{len(report['layers']) - 1}, k = 0); median "
             f"of {len(report['results'][0]['times'])}", "",
             "| mode | seconds | x independent | CPU seconds | x independent (CPU) | answers identical |",
             "|---|---:|---:|---:|---:|---|"]
    for r in report["results"]:
        lines.append(f"| {r['mode']} | {r['seconds']:.2f} | {r['ratio_to_independent']:.3f} | {r['cpu_seconds']:.2f} | "
                     f"{r['cpu_ratio']:.3f} | {'yes' if r['answers_equal_independent'] else 'NO'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
