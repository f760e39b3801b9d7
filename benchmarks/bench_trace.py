"""End to end: one ``generate`` under ``flowkern.trace`` vs ``output_attentions=True`` (eager), LLaVA-1.5 geometry.

The model is built from a config with random weights (no download): on GPU the published geometry of
``llava-hf/llava-1.5-7b-hf`` (``_common.llava_15_config("7b")``: CLIP ViT-L/14-336 tower, 576 image tokens per image,
Llama-2-7B text model: 32 layers, hidden 4096, 32 heads, vocab 32064), bf16; on CPU a reduced config with the same
token counts (``"cpu"``: 576 image tokens per image, 4 text layers of width 512, a 2-layer tower), fp32.

Workloads: 1 image + 64 text tokens (S = 640) and 4 images + 64 text tokens (S = 2368), ``--new-tokens`` greedy
steps (end-of-sequence disabled, so every method decodes the same number of steps). Methods, one process, same
model and inputs, so ratios are comparable (docs/benchmarks.md):

- ``sdpa``: plain ``generate`` (no analysis): the floor.
- ``flowkern``: ``generate`` inside ``flowkern.trace`` (per-layer shares + image-token attention of every answer row).
- ``eager``: what users run today: the language model on transformers' eager attention (the vision tower stays on
  SDPA), ``generate(output_attentions=True, return_dict_in_generate=True)``, then the same shares reduced from
  the returned attention matrices. The two methods' shares are compared (``shares_max_abs_diff``).

Time: median of ``--repeats`` runs after one warm-up (CUDA: synchronised wall time); the methods take turns
(one run each per round, the order rotated), and the ratios are medians of the per-round ratios, so that the load
of a shared machine drifting during the run biases no method. Peak memory: on CUDA
``torch.cuda.max_memory_allocated`` above what was allocated before the call (weights, inputs), measured in this
process; on CPU the growth of the peak RSS (``VmHWM`` after ``/proc/self/clear_refs``, helpers from
``_common.py``) during one run in a fresh process per method and workload (no warm-up there, so cached
allocations of an earlier run cannot hide the peak).

    python benchmarks/bench_trace.py                  # CPU, reduced config; writes results/cpu-<n>core-trace.json
    python benchmarks/bench_trace.py --device cuda    # GPU, LLaVA-1.5-7B geometry, bf16; results/h100-trace.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from _common import (
    build_model,
    cuda_peak_mib,
    device_label,
    llava_caption,
    make_report,
    model_summary,
    peak_rss_kib,
    reset_peak_rss_kib,
    resolve_device,
    sync,
    write_report,
)
from transformers import LlavaForConditionalGeneration

import flowkern

METHODS = ("sdpa", "flowkern", "eager")
CASES = (
    dict(name="1 image + 64 text tokens", images=1, text=64),
    dict(name="4 images + 64 text tokens", images=4, text=64),
)
SYSTEM_TOKENS = 5  # text tokens before the first image; the rest of the 64 text tokens follow the images


def make_inputs(model: LlavaForConditionalGeneration, case: dict, device: str, dtype: torch.dtype) -> tuple:
    """``generate`` kwargs and the segment label of every prompt token (0 system, 1 image, 2 user)."""
    cfg = model.config
    g = torch.Generator().manual_seed(1)
    per_image = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    n_img = case["images"] * per_image
    n_user = case["text"] - SYSTEM_TOKENS
    text = torch.randint(3, 32000, (case["text"],), generator=g)
    text[0] = cfg.text_config.bos_token_id
    ids = torch.cat([text[:SYSTEM_TOKENS], torch.full((n_img,), cfg.image_token_index), text[SYSTEM_TOKENS:]])
    labels = torch.tensor([0] * SYSTEM_TOKENS + [1] * n_img + [2] * n_user)
    size = cfg.vision_config.image_size
    pixels = torch.randn(case["images"], 3, size, size, generator=g)
    kwargs = dict(input_ids=ids[None].to(device), attention_mask=torch.ones(1, ids.numel(), dtype=torch.long,
                                                                              device=device),
                  pixel_values=pixels.to(device, dtype))
    return kwargs, labels


def eager_shares(attentions: tuple, labels: torch.Tensor) -> torch.Tensor:
    """[layers, 4] from ``generate(output_attentions=True)``: each step's last row, head mean, summed per segment,
    averaged over steps (the definition of ``flowkern.trace``'s ``shares``)."""
    per_step = []
    for t, step in enumerate(attentions):
        full = torch.cat([labels, torch.full((t,), 3)]).to(step[0].device)
        onehot = torch.nn.functional.one_hot(full, 4).float()
        rows = torch.stack([layer[0, :, -1, :].float().mean(dim=0) for layer in step])  # [L, Sk]
        per_step.append(rows @ onehot)
    return torch.stack(per_step).mean(dim=0).cpu()


def run(method: str, model: LlavaForConditionalGeneration, kwargs: dict, labels: torch.Tensor, new_tokens: int):
    """One generate; returns (sequences, shares or None). Results stay alive until return (they count in the peak)."""
    gen = dict(max_new_tokens=new_tokens, do_sample=False)
    with torch.inference_mode():
        if method == "sdpa":
            return model.generate(**kwargs, **gen), None
        if method == "flowkern":
            with flowkern.trace(model) as flow:
                seq = model.generate(**kwargs, **gen)
            return seq, flow.shares
        if method == "eager":
            model.set_attn_implementation({"text_config": "eager"})
            try:
                out = model.generate(**kwargs, **gen, output_attentions=True, return_dict_in_generate=True)
            finally:
                model.set_attn_implementation({"text_config": "sdpa"})
            return out.sequences, eager_shares(out.attentions, labels)
    raise ValueError(method)


def time_methods(methods, model, kwargs, labels, new_tokens: int, device: str, repeats: int) -> dict:
    """Wall time of each method: one warm-up each, then ``repeats`` rounds in which every method runs once, the
    order rotated per round, so that a machine whose load drifts biases no method (ratios are per round)."""
    for method in methods:
        run(method, model, kwargs, labels, new_tokens)  # warm-up
    times: dict[str, list[float]] = {m: [] for m in methods}
    for i in range(repeats):
        for method in methods[i % len(methods):] + methods[: i % len(methods)]:
            sync(device)
            t0 = time.perf_counter()
            run(method, model, kwargs, labels, new_tokens)
            sync(device)
            times[method].append(time.perf_counter() - t0)
    return {m: dict(median_s=statistics.median(t), min_s=min(t), max_s=max(t), repeats=repeats, times_s=t)
            for m, t in times.items()}


def cuda_peak(method: str, model, kwargs, labels, new_tokens: int) -> dict:
    return cuda_peak_mib(lambda: run(method, model, kwargs, labels, new_tokens))


def cpu_peak(method: str, case: dict, size: str, dtype: torch.dtype, new_tokens: int) -> dict:
    spec = json.dumps(dict(method=method, case=case, size=size, dtype=str(dtype).removeprefix("torch."),
                           new_tokens=new_tokens))
    out = subprocess.run([sys.executable, __file__, "--memory-probe", spec], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"memory probe {method} / {case['name']} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory_probe(spec: str) -> None:
    """Child process: peak RSS growth (and peak RSS) during one run of a method on CPU."""
    s = json.loads(spec)
    torch.set_num_threads(os.cpu_count() or 1)
    dtype = getattr(torch, s["dtype"])
    model = build_model(s["size"], "cpu", dtype)
    kwargs, labels = make_inputs(model, s["case"], "cpu", dtype)
    gc.collect()
    base = reset_peak_rss_kib()
    run(s["method"], model, kwargs, labels, s["new_tokens"])
    peak = peak_rss_kib()
    print(json.dumps(dict(peak_extra_mib=(peak - base) / 1024, peak_total_mib=peak / 1024)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--size", choices=["7b", "cpu"], default=None, help="default: 7b on CUDA, cpu on CPU")
    ap.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                    help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=None, help="default: 5 on CUDA, 3 on CPU")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    ap.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/<device>-trace.json")
    ap.add_argument("--memory-probe", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_probe:
        memory_probe(args.memory_probe)
        return

    device = resolve_device(args.device)
    gpu = device == "cuda"
    size = args.size or ("7b" if gpu else "cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if gpu else "float32"))
    repeats = args.repeats or (5 if gpu else 3)
    torch.set_num_threads(os.cpu_count() or 1)
    label = device_label(device)

    load_before = os.getloadavg()[0]  # a shared machine: say how busy it was
    model = build_model(size, device, dtype)
    rows = []
    for case in CASES:
        kwargs, labels = make_inputs(model, case, device, dtype)
        result = dict(case=case["name"], prompt_tokens=int(labels.numel()), image_tokens=int((labels == 1).sum()),
                      new_tokens=args.new_tokens)
        _, fk_shares = run("flowkern", model, kwargs, labels, args.new_tokens)
        _, eager = run("eager", model, kwargs, labels, args.new_tokens)
        result["shares_max_abs_diff"] = float((fk_shares - eager).abs().max())
        result["image_share_per_layer"] = [round(float(v), 4) for v in fk_shares[:, 1]]
        result.update(time_methods(list(METHODS), model, kwargs, labels, args.new_tokens, device, repeats))
        for method in METHODS:
            if not args.no_memory:
                if gpu:
                    result[method].update(cuda_peak(method, model, kwargs, labels, args.new_tokens))
                else:
                    result[method].update(cpu_peak(method, case, size, dtype, args.new_tokens))
            print(f"{case['name']:26s} {method:9s} {result[method]['median_s']:8.3f} s"
                  + (f"  peak +{result[method]['peak_extra_mib']:.0f} MiB" if not args.no_memory else ""), flush=True)
        for other in ("sdpa", "eager"):  # the median of the per-round ratios
            result[f"time_flowkern_over_{other}"] = statistics.median(
                a / b for a, b in zip(result["flowkern"]["times_s"], result[other]["times_s"], strict=True))
            if not args.no_memory and result[other]["peak_extra_mib"] > 0:
                result[f"memory_flowkern_over_{other}"] = (
                    result["flowkern"]["peak_extra_mib"] / result[other]["peak_extra_mib"])
        rows.append(result)
        del kwargs
        gc.collect()

    setup = dict(dtype=str(dtype).removeprefix("torch."), model=model_summary(model, size, vocab=True),
                 load_average_1m=[round(load_before, 2), round(os.getloadavg()[0], 2)])
    report = make_report(label, device, with_transformers=True, setup=setup, results=rows)
    write_report(report, args.out, "trace", markdown_table)


def markdown_table(report: dict) -> str:
    m = report["model"]
    lines = [
        llava_caption(report)
        + f"{m['image_tokens_per_image']} tokens per image; {report['results'][0]['new_tokens']} new tokens",
        "",
        "| workload | prompt tokens | SDPA s | flowkern.trace s | eager + output_attentions s | trace / SDPA "
        "| trace / eager | peak extra MiB SDPA / trace / eager | memory trace / eager |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        mem = "-"
        ratio = "-"
        if "peak_extra_mib" in r["flowkern"]:
            mem = " / ".join(f"{r[k]['peak_extra_mib']:.0f}" for k in METHODS)
            ratio = f"{r['memory_flowkern_over_eager']:.3f}x" if "memory_flowkern_over_eager" in r else "-"
        lines.append(
            f"| {r['case']} | {r['prompt_tokens']} | {r['sdpa']['median_s']:.3f} | {r['flowkern']['median_s']:.3f} | "
            f"{r['eager']['median_s']:.3f} | {r['time_flowkern_over_sdpa']:.2f}x | "
            f"{r['time_flowkern_over_eager']:.2f}x | {mem} | {ratio} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
