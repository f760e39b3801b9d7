"""LLaVA-CAM cost: wall time and peak memory of ``flowkern.cam`` for all 32 layers x samples in {1, 8}.

Models have random weights built from a config (no download):

- ``llava-1.5-7b``: the LLaVA-1.5-7B config (CLIP ViT-L/14-336, Vicuna-7B: 32 layers, hidden 4096), bf16, CUDA.
- ``cpu-reduced``: the same layout and sequence (336 px / patch 14 = 576 image tokens, 32 decoder layers, vocab
  32064) with small widths (vision 2 x 64, text hidden 256), fp32 on CPU.

For each samples value the script runs ``flowkern.cam`` (one forward + one backward per batch of noisy copies for
all layers) and, for samples=1, the per-layer re-run the paper's released script does (one forward + backward per
layer, parameters requiring grad) as a baseline. Each measurement runs in a fresh subprocess so that its peak
memory is its own (CPU: peak RSS, and its increase over the loaded model; CUDA: ``max_memory_allocated``).

    python benchmarks/bench_cam.py                          # cpu-reduced on CPU, or llava-1.5-7b when CUDA is there
    python benchmarks/bench_cam.py --out benchmarks/results/cpu-2core-cam.json
    python benchmarks/bench_cam.py --save-demo-model /tmp/tiny-llava   # the README figure's tiny model + picture
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from _common import llava_15_config, max_rss_mib, write_json

PROMPT_LEN = 40  # system + user text tokens around the image (LLaVA-1.5 chat format is ~35-45)
ANSWER_LEN = 8
MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP normalisation (LLaVA-1.5's processor)
STD = (0.26862954, 0.26130258, 0.27577711)
CONFIGS = {"llava-1.5-7b": "7b", "cpu-reduced": "cpu-reduced"}  # --config -> size in _common.LLAVA_15_SIZES


def llava_config(name: str):
    """The ``--config`` model's LLaVA-1.5 config, without a pad token (this benchmark never pads)."""
    if name not in CONFIGS:
        raise ValueError(f"unknown config {name!r}")
    return llava_15_config(CONFIGS[name], pad_token_id=None)


def build(name: str, device: str, dtype: torch.dtype):
    from flowkern.hf.tiny import build_model

    cfg = llava_config(name)
    model = build_model(cfg, seed=0, device=device, dtype=dtype, decode_all=True)
    g = torch.Generator().manual_seed(1)
    n_img = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    text = torch.randint(2, 31000, (PROMPT_LEN,), generator=g)
    ids = torch.cat([text[:35], torch.full((n_img,), cfg.image_token_index), text[35:]])[None].to(device)
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                  pixel_values=torch.randn(1, 3, 336, 336, generator=g).to(device=device, dtype=dtype))
    answer = torch.randint(2, 31000, (ANSWER_LEN,), generator=g)
    return model, inputs, answer


def per_layer_baseline(model, inputs, answer, layers):
    """The paper script's pattern: one forward + backward per layer, parameters requiring grad, full logits."""
    S = inputs["input_ids"].shape[1]
    ids = torch.cat([inputs["input_ids"], answer[None].to(inputs["input_ids"].device)], dim=1)
    full = dict(inputs, input_ids=ids, attention_mask=torch.ones_like(ids))
    blocks = model.model.language_model.layers
    for layer in layers:
        saved = {}

        def hook(module, args, output, saved=saved):
            output.retain_grad()
            saved["A"] = output

        h = blocks[layer].post_attention_layernorm.register_forward_hook(hook)
        try:
            logits = model(**full, use_cache=False).logits[0].float()
        finally:
            h.remove()
        z = logits[S - 1 + torch.arange(answer.numel()), answer.to(logits.device)].sum()
        z.backward()
        a, g = saved["A"][0, 35 : 35 + 576].detach().float(), saved["A"].grad[0, 35 : 35 + 576].float()
        torch.relu(a @ g.mean(dim=0))
        model.zero_grad(set_to_none=True)
        del logits, z, saved


def measure(args) -> dict:
    """One measurement in this process (called through the --child flag)."""
    import flowkern
    from flowkern.cam import cam

    torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    model, inputs, answer = build(args.config, args.device, dtype)
    assert flowkern is not None
    layers = list(range(model.config.text_config.num_hidden_layers))
    samples, mode, batch_size = args.samples, args.mode, int(args.batch_size)

    def once():
        if mode == "flowkern":
            cam(model, inputs, answer, layers=layers, samples=samples, batch_size=min(samples, batch_size),
                noise_std=0.1 if samples > 1 else 0.0, pixel_mean=MEAN, pixel_std=STD)
        else:
            per_layer_baseline(model, inputs, answer, layers)
        if cuda:
            torch.cuda.synchronize()

    if args.repeats > 1:
        once()  # warm-up (also the first-call allocations)
    base_rss = max_rss_mib()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        loaded = torch.cuda.memory_allocated() / 2**20
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        once()
        times.append(time.perf_counter() - t0)
    out = dict(mode=mode, samples=samples, batch_size=min(samples, batch_size), layers=len(layers),
               seq_len=int(inputs["input_ids"].shape[1]) + ANSWER_LEN, times_s=times,
               median_s=statistics.median(times))
    if cuda:
        out.update(peak_alloc_mib=torch.cuda.max_memory_allocated() / 2**20, model_alloc_mib=loaded)
    else:
        out.update(peak_rss_mib=max_rss_mib(), rss_after_warmup_mib=base_rss)
    return out


def _child(args, mode: str, samples: int, batch_size: int) -> dict:
    repeats = args.repeats if mode == "flowkern" else args.baseline_repeats
    cmd = [sys.executable, __file__, "--child", "--config", args.config, "--device", args.device,
           "--threads", str(args.threads), "--repeats", str(repeats), "--batch-size", str(batch_size),
           "--samples", str(samples), "--mode", mode]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"child failed: {' '.join(cmd)}\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _loaded_rss(args) -> float:
    """Peak RSS of a process that only builds the model and inputs (the baseline of the CPU memory numbers)."""
    code = (f"import sys, torch; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench_cam as b; "
            f"torch.set_num_threads({args.threads}); b.build({args.config!r}, 'cpu', torch.float32); "
            "import flowkern.cam; print(b.max_rss_mib())")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(res.stdout.strip().splitlines()[-1])


def save_demo_model(path: Path, layers: int = 8) -> None:
    """A tiny LLaVA-1.5-layout model (336 px / patch 14: 24 x 24 image tokens, ``layers`` decoder layers, random
    weights) with its processor (CLIP image processor, word-level tokenizer, chat template) and a picture
    ``demo.png``: what the README's ``flowkern cam`` example runs on."""
    from PIL import Image, ImageDraw

    from flowkern.hf.tiny import save_tiny_llava

    words = "USER ASSISTANT : what is in the image ? where a the red ball blue sky green grass yes no".split()
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=336,
                  patch_size=14, projection_dim=64)
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=1024, eos_token_id=2)
    save_tiny_llava(path, vision=vision, text=text, words=words, filler=64, vision_feature_layer=-2,
                    image_mean=MEAN, image_std=STD)
    img = Image.new("RGB", (448, 336), (120, 170, 235))
    draw = ImageDraw.Draw(img)
    draw.rectangle([0, 230, 448, 336], fill=(70, 150, 60))
    draw.ellipse([250, 150, 350, 250], fill=(215, 40, 40))
    img.save(path / "demo.png")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=None, choices=["cpu-reduced", "llava-1.5-7b"])
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up (1: no warm-up)")
    p.add_argument("--baseline-repeats", type=int, default=1, help="timed runs of the per-layer baseline")
    p.add_argument("--batch-size", default="8", help="comma-separated batch sizes for samples=8 (default 8)")
    p.add_argument("--no-baseline", action="store_true", help="skip the per-layer re-run baseline")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--save-demo-model", type=Path, default=None, metavar="DIR")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--samples", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--mode", default="flowkern", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.save_demo_model is not None:
        save_demo_model(args.save_demo_model)
        print(f"wrote {args.save_demo_model} (model, processor, demo.png)")
        return
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.config = args.config or ("llava-1.5-7b" if args.device.startswith("cuda") else "cpu-reduced")
    if args.child:
        print(json.dumps(measure(args)))
        return

    batch_sizes = [int(b) for b in str(args.batch_size).split(",")]
    runs = [("flowkern", 1, 1), *(("flowkern", 8, b) for b in batch_sizes)]
    runs += [] if args.no_baseline else [("per-layer", 1, 1)]
    results = []
    for mode, samples, batch_size in runs:
        r = _child(args, mode, samples, batch_size)
        results.append(r)
        print(json.dumps(r), flush=True)
    record = dict(
        benchmark="flowkern.cam", config=args.config, device=args.device, threads=args.threads,
        dtype="bfloat16" if args.device.startswith("cuda") else "float32", repeats=args.repeats,
        baseline_repeats=args.baseline_repeats,
        torch=torch.__version__, python=platform.python_version(),
        command=" ".join([os.path.basename(sys.executable), *sys.argv]), results=results,
    )
    if args.device.startswith("cuda"):
        record["gpu"] = torch.cuda.get_device_name()
    else:
        record["loaded_model_rss_mib"] = _loaded_rss(args)
    base = record.get("loaded_model_rss_mib")
    label = "peak CUDA alloc MiB" if base is None else "peak RSS MiB (over the loaded model)"
    print(f"\n| what | samples | batch | median s | {label} |")
    print("|---|---|---|---|---|")
    for r in results:
        mem = r.get("peak_alloc_mib", r.get("peak_rss_mib"))
        extra = "" if base is None else f" (+{mem - base:.0f})"
        print(f"| {r['mode']} | {r['samples']} | {r['batch_size']} | {r['median_s']:.2f} | {mem:.0f}{extra} |")
    if args.out is not None:
        write_json(args.out, record, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
