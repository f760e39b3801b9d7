"""``flowkern sweep`` vs running each point on its own: a full truncation sweep (baseline + every decoder layer) on a
single-token task.

A tiny LLaVA-1.5-layout model is written with ``save_pretrained`` (random weights, no download; the ``"tiny"``
geometry of ``_common.LLAVA_15_SIZES``: CLIP 336 px / patch 14 = 576 image tokens, a 1-layer tower of width 128,
8 text layers of width 256), with ``--questions`` POPE questions over 8 random images, answered with one new token
(``max_new_tokens=1``: a single-token task).

- **independent**: the baseline and each point ``L = 0..7`` (k = 0) as its own :func:`flowkern.eval.run.run_eval`
  (what ``flowkern eval --prune-layer L`` runs after loading the model), one after the other;
- **sweep**: :func:`flowkern.eval.sweep.run_sweep` over the same points: per batch, the processor runs once, the
  point with the largest L records the prefill's per-layer keys/values and hidden states, and every other point skips
  its layers below L (``PrefixShare``);
- **sweep, no reuse**: ``run_sweep(reuse=False)``: the same engine, every point computing all its layers.

The model is loaded once and passed in. Reported: the median over ``--repeats`` (round-robin, after a warm-up) of
the wall time of each, the ratio sweep / independent, and whether every point's answer file is identical between the
three (the script exits 1 if not).

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

SIZE = "tiny"
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu")
    ap.add_argument("--questions", type=int, default=16, help="POPE questions (default 16)")
    ap.add_argument("--batch-size", type=int, default=4, help="questions per generate call (default 4)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each mode (default 3), after a warm-up")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    ap.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/<device>-sweep.json")
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

    def independent(tag: str, limit: int | None = None) -> tuple[float, dict]:
        out = tmp / tag
        start = time.perf_counter()
        for layer in [None, *layers]:
            name = "baseline" if layer is None else f"L{layer:02d}"
            run_eval(EvalConfig(out=out / name, limit=limit, prune_layer=layer, overwrite=True, **common), model=model,
                     processor=processor)
        return time.perf_counter() - start, answers(out)

    def sweep(tag: str, reuse: bool, limit: int | None = None) -> tuple[float, dict]:
        out = tmp / tag
        start = time.perf_counter()
        run_sweep(SweepConfig(out=out, layers="all", limit=limit, reuse=reuse, overwrite=True, **common),
                  model=model, processor=processor)
        return time.perf_counter() - start, answers(out / "points")

    modes = {"independent": lambda: independent("ind"), "sweep": lambda: sweep("sweep", True),
             "sweep, no reuse": lambda: sweep("plain", False)}
    independent("warm-ind", args.batch_size)
    sweep("warm-sweep", True, args.batch_size)
    times: dict[str, list[float]] = {m: [] for m in modes}
    got: dict[str, dict] = {}
    for _ in range(args.repeats):
        for mode, fn in modes.items():
            seconds, ans = fn()
            times[mode].append(seconds)
            if got.setdefault(mode, ans) != ans:
                raise SystemExit(f"{mode}: answers differ between repeats")
    ref = statistics.median(times["independent"])
    rows = []
    for mode in modes:
        median = statistics.median(times[mode])
        row = dict(mode=mode, points=len(names), questions=args.questions, seconds=median, times=times[mode],
                   ratio_to_independent=median / ref, answers_equal_independent=got[mode] == got["independent"])
        rows.append(row)
        print(f"{mode:16s}: {median:7.2f} s  x{median / ref:.3f} of independent  answers equal: "
              f"{row['answers_equal_independent']}", flush=True)
    prompt_tokens = int(processor(images=Image.new("RGB", (336, 336)), text="USER : <image> Is there a dog in the "
                                  "image? Answer the question using a single word or phrase. ASSISTANT :",
                                  return_tensors="pt")["input_ids"].shape[1])
    setup = dict(dtype="float32", task="pope", new_tokens=1, batch_size=args.batch_size, layers=layers,
                 model=model_summary(model, SIZE, vocab=True), prompt_tokens=prompt_tokens)
    report = make_report(device_label(device), device, with_transformers=True, setup=setup, results=rows,
                         load_average=list(os.getloadavg()))
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
             "| mode | seconds | x independent | answers identical |", "|---|---:|---:|---|"]
    for r in report["results"]:
        lines.append(f"| {r['mode']} | {r['seconds']:.2f} | {r['ratio_to_independent']:.3f} | "
                     f"{'yes' if r['answers_equal_independent'] else 'NO'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
