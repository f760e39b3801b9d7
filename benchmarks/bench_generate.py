"""End to end: ``generate`` with image tokens pruned from layer L on (``flowkern.prune``) vs unpruned, LLaVA-1.5.

The model is built from a config with random weights (no download): on GPU the published geometry of
``llava-hf/llava-1.5-7b-hf`` (``_common.llava_15_config("7b")``: CLIP ViT-L/14-336, 576 image tokens,
Llama-2-7B: 32 layers x 4096), bf16; on CPU a tiny config with the same token counts (``"tiny"``: 576 image tokens
per image, 8 text layers of width 256, a 1-layer tower of width 128), fp32.

Workload: 1 image + 64 text tokens per sample (S = 640), batch 1 and batch 32 (different random texts and images,
no padding), ``--new-tokens`` greedy steps (end-of-sequence disabled). Methods, one process, same model and inputs:

- ``sdpa``: plain ``generate`` (transformers' SDPA attention): the baseline;
- ``flowkern``: ``generate`` inside ``flowkern.prune(model)`` with nothing pruned (flowkern attention only);
- ``prune-k0``: ``flowkern.prune(model, layer=L, keep=0)``: every image token removed from layer L on (default
  L = 2: the issue's target);
- ``prune-k64``: ``flowkern.prune(model, layer=L, keep=64, rank="attention")``: FastV-style, top 64 kept.

Per run a forward-hook timer (:class:`flowkern.timer.ForwardTimer`, CUDA synchronised) splits the wall time into
the prefill forward (vision tower + prompt) and the decode forwards; reported: median prefill seconds and median
decode tokens/s (``B * steps / decode time``) over ``--repeats`` rounds after one warm-up, and on CUDA the peak
allocated memory above the weights and inputs. In each round every method runs once, the order rotated; ratios
(``prefill_speedup``: sdpa prefill / method prefill; ``decode_speedup``: method tokens/s / sdpa tokens/s) are the
medians of the per-round ratios, within one process (docs/benchmarks.md), so that a shared machine's drifting load
biases no method. Targets: issue 4 (GPU, 7B config, L=2, keep=0): prefill >= 2.5x, batch-32 decode >= 1.5x vs
SDPA; issue 11 (CPU, tiny config, batch 1): ``flowkern`` decode >= 0.97x, ``prune-k0`` decode >= 1.0x.

    python benchmarks/bench_generate.py                  # CPU, tiny config; writes results/cpu-<n>core-generate.json
    python benchmarks/bench_generate.py --device cuda    # GPU, LLaVA-1.5-7B geometry, bf16; results/h100-generate.json
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import statistics
from pathlib import Path

import torch
from _common import (
    build_model,
    cuda_peak_mib,
    device_label,
    llava_caption,
    make_report,
    model_summary,
    resolve_device,
    write_report,
)
from transformers import LlavaForConditionalGeneration

import flowkern
from flowkern.timer import ForwardTimer

METHODS = ("sdpa", "flowkern", "prune-k0", "prune-k64")
TEXT_TOKENS = 64
SYSTEM_TOKENS = 5


def make_inputs(model: LlavaForConditionalGeneration, batch: int, device: str, dtype: torch.dtype) -> dict:
    cfg = model.config
    g = torch.Generator().manual_seed(batch)
    n_img = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    text = torch.randint(3, 32000, (batch, TEXT_TOKENS), generator=g)
    text[:, 0] = cfg.text_config.bos_token_id
    ids = torch.cat([text[:, :SYSTEM_TOKENS], torch.full((batch, n_img), cfg.image_token_index),
                     text[:, SYSTEM_TOKENS:]], dim=1)
    size = cfg.vision_config.image_size
    pixels = torch.randn(batch, 3, size, size, generator=g)
    return dict(input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device),
                pixel_values=pixels.to(device, dtype))


def context(method: str, model, layer: int) -> contextlib.AbstractContextManager:
    if method == "sdpa":
        return contextlib.nullcontext()
    if method == "flowkern":
        return flowkern.prune(model, layer=None)
    if method == "prune-k0":
        return flowkern.prune(model, layer=layer, keep=0)
    if method == "prune-k64":
        return flowkern.prune(model, layer=layer, keep=64, rank="attention")
    raise ValueError(method)


def run(method: str, model, kwargs: dict, new_tokens: int, layer: int) -> tuple[float, float]:
    """One generate: (prefill seconds, decode tokens/s)."""
    with torch.inference_mode(), context(method, model, layer), ForwardTimer(model) as timer:
        model.generate(**kwargs, max_new_tokens=new_tokens, do_sample=False)
    return timer.prefill_seconds, timer.decode_tokens_per_second


def measure(methods: list[str], model, kwargs: dict, new_tokens: int, layer: int, repeats: int, gpu: bool) -> dict:
    """Per method: median prefill seconds and decode tokens/s over ``repeats`` rounds after one warm-up each; in
    every round each method runs once, the order rotated, and the speed-ups vs SDPA are medians of the per-round
    ratios (a shared machine's load drifting during the run biases no method)."""
    for method in methods:
        run(method, model, kwargs, new_tokens, layer)  # warm-up
    prefill: dict[str, list[float]] = {m: [] for m in methods}
    tps: dict[str, list[float]] = {m: [] for m in methods}
    for i in range(repeats):
        for method in methods[i % len(methods):] + methods[: i % len(methods)]:
            p, t = run(method, model, kwargs, new_tokens, layer)
            prefill[method].append(p)
            tps[method].append(t)
    out = {}
    for m in methods:
        out[m] = dict(prefill_s=statistics.median(prefill[m]), prefill_min_s=min(prefill[m]),
                      decode_tok_s=statistics.median(tps[m]), decode_max_tok_s=max(tps[m]), repeats=repeats)
        if m != "sdpa":
            out[m]["prefill_speedup"] = statistics.median(
                b / a for a, b in zip(prefill[m], prefill["sdpa"], strict=True))
            out[m]["decode_speedup"] = statistics.median(a / b for a, b in zip(tps[m], tps["sdpa"], strict=True))
    if gpu:
        for m in methods:
            peak = cuda_peak_mib(lambda m=m: run(m, model, kwargs, new_tokens, layer))
            out[m]["peak_extra_mib"] = peak["peak_extra_mib"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--size", choices=["7b", "tiny"], default=None, help="default: 7b on CUDA, tiny on CPU")
    ap.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                    help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--layer", type=int, default=2, help="first pruned decoder layer L (default 2)")
    ap.add_argument("--batches", default="1,32", help="comma-separated batch sizes (default 1,32)")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"subset of {','.join(METHODS)}")
    ap.add_argument("--new-tokens", type=int, default=None, help="default: 32 on CUDA, 8 on CPU")
    ap.add_argument("--repeats", type=int, default=None, help="default: 5 on CUDA, 3 on CPU")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    ap.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/<device>-generate.json")
    args = ap.parse_args()

    device = resolve_device(args.device)
    gpu = device == "cuda"
    size = args.size or ("7b" if gpu else "tiny")
    dtype = getattr(torch, args.dtype or ("bfloat16" if gpu else "float32"))
    repeats = args.repeats or (5 if gpu else 3)
    new_tokens = args.new_tokens or (32 if gpu else 8)
    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(METHODS)
    if unknown or "sdpa" not in methods:
        raise SystemExit(f"--methods: expected a subset of {METHODS} including sdpa, got {methods}")
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    label = device_label(device)

    load_before = os.getloadavg()[0]  # a shared machine: say how busy it was
    model = build_model(size, device, dtype)
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        kwargs = make_inputs(model, batch, device, dtype)
        row = dict(batch=batch, prompt_tokens=int(kwargs["input_ids"].shape[1]),
                   image_tokens=int((kwargs["input_ids"][0] == model.config.image_token_index).sum()),
                   new_tokens=new_tokens)
        row.update(measure(methods, model, kwargs, new_tokens, args.layer, repeats, gpu))
        for method in methods:
            r = row[method]
            print(f"batch {batch:3d} {method:10s} prefill {1e3 * r['prefill_s']:9.1f} ms  decode "
                  f"{r['decode_tok_s']:9.1f} tok/s" + (f"  peak +{r['peak_extra_mib']:.0f} MiB" if gpu else ""),
                  flush=True)
        rows.append(row)
        del kwargs
        gc.collect()

    setup = dict(dtype=str(dtype).removeprefix("torch."), layer=args.layer, methods=methods,
                 load_average_1m=[round(load_before, 2), round(os.getloadavg()[0], 2)],
                 model=model_summary(model, size))
    report = make_report(label, device, with_transformers=True, setup=setup, results=rows)
    write_report(report, args.out, "generate", markdown_table)


def markdown_table(report: dict) -> str:
    m = report["model"]
    lines = [
        llava_caption(report)
        + f"{m['image_tokens_per_image']} image tokens + {TEXT_TOKENS} text tokens; pruned from layer "
        f"{report['layer']}; {report['results'][0]['new_tokens']} new tokens",
        "",
        "| batch | method | prefill ms | prefill speed-up | decode tok/s | decode speed-up | peak extra MiB |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        for method in report["methods"]:
            x = r[method]
            lines.append(
                f"| {r['batch']} | {method} | {1e3 * x['prefill_s']:.1f} | "
                f"{x.get('prefill_speedup', 1.0):.2f}x | {x['decode_tok_s']:.1f} | {x.get('decode_speedup', 1.0):.2f}x "
                f"| {x['peak_extra_mib']:.0f} |" if "peak_extra_mib" in x else
                f"| {r['batch']} | {method} | {1e3 * x['prefill_s']:.1f} | {x.get('prefill_speedup', 1.0):.2f}x | "
                f"{x['decode_tok_s']:.1f} | {x.get('decode_speedup', 1.0):.2f}x | - |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
