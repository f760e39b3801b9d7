"""Benchmark attention knockout: ``flowkern.knockout`` (the cut inside the fused kernel, KV cache, batches) vs what the
peers run, eager attention plus the equivalent dense additive mask, on the same model and inputs.

The model is the CPU ``tiny`` LLaVA-1.5 config of :mod:`_common` (576 image tokens per image, 8 text layers of width
256, random weights, fp32; on CUDA ``--size 7b`` in bf16). Workload: 1 image + 64 text tokens per sample (S = 640),
batch 1 and 16, ``--new-tokens`` greedy steps (end-of-sequence disabled). The cut: the CVPR 2025 four edges
(image -> user, image -> last, user -> last, last -> last) at layers ``--layers`` (default 2-3, the CVPR window of
9 of 32 layers scaled to 8). Methods, one process:

- ``sdpa``: plain ``generate``, no cut (the model's own attention): for scale;
- ``flowkern``: ``generate`` inside ``flowkern.knockout(model, edges, layers)``;
- ``eager-mask``: ``generate`` with ``attn_implementation="eager"`` and a forward pre-hook on each language-model
  attention module of the cut layers that writes the dtype's minimum into transformers' 4D additive mask where a
  query may not read a key (the mask built densely from the token labels once per forward, as the peers' code does).

Per run a :class:`flowkern.timer.ForwardTimer` splits the wall time into the prefill and the decode forwards;
reported: median prefill seconds and decode tokens/s over ``--repeats`` rounds after one warm-up round (at the first
batch size; each round runs every method once, the order rotated; ratios are medians of the per-round ratios), the
peak memory of the first round's run above what was resident before it (CPU: peak RSS growth,
``/proc/self/clear_refs``; CUDA: ``max_memory_allocated``), and whether the two knockouts produce the same tokens.

    nice -n 10 python benchmarks/bench_knockout.py            # CPU; writes results/cpu-<n>core-knockout.json
    python benchmarks/bench_knockout.py --device cuda --size 7b
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
    peak_rss_kib,
    reset_peak_rss_kib,
    resolve_device,
    write_report,
)

import flowkern
from flowkern.timer import ForwardTimer

METHODS = ("sdpa", "flowkern", "eager-mask")
EDGES = (("image", "user"), ("image", "last"), ("user", "last"), ("last", "last"))
SYSTEM_TOKENS, TEXT_TOKENS = 5, 64
SYSTEM, IMAGE, USER, GENERATED, LAST = range(5)
NAMES = {"system": SYSTEM, "image": IMAGE, "user": USER, "generated": GENERATED, "last": LAST}


def make_inputs(model, batch: int, device: str, dtype: torch.dtype) -> dict:
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


class DenseMask:
    """The peers' knockout: at the cut layers, the dense ``[B, 1, Sq, Sk]`` mask of the blocked (query, key) pairs
    written into eager attention's additive mask (built once per forward from the prompt's labels)."""

    def __init__(self, model, ids: torch.Tensor, layers: range) -> None:
        image = model.config.image_token_index
        S = ids.shape[1]
        lab = torch.full_like(ids, USER)
        lab[:, :SYSTEM_TOKENS] = SYSTEM
        lab[ids == image] = IMAGE
        lab[:, S - 1] = LAST
        self.labels, self.layers, self.model = lab, set(layers), model
        self._key: tuple[int, int] | None = None
        self._block: torch.Tensor | None = None
        self._handles: list = []

    def block(self, sq: int, sk: int) -> torch.Tensor:
        if self._key != (sq, sk):
            B, S = self.labels.shape
            lab = torch.full((B, sk), GENERATED, dtype=self.labels.dtype, device=self.labels.device)
            lab[:, :S] = self.labels
            q = lab[:, sk - sq:]
            block = torch.zeros(B, sq, sk, dtype=torch.bool, device=lab.device)
            for src, dst in EDGES:
                block |= (q[:, :, None] == NAMES[dst]) & (lab[:, None, :] == NAMES[src])
            self._key, self._block = (sq, sk), block[:, None]
        return self._block

    def _pre(self, module, args, kwargs):
        mask = kwargs["attention_mask"]
        block = self.block(kwargs["hidden_states"].shape[1], mask.shape[-1])
        kwargs["attention_mask"] = mask.masked_fill(block, torch.finfo(mask.dtype).min)
        return args, kwargs

    def __enter__(self) -> DenseMask:
        self.model.set_attn_implementation({"text_config": "eager"})
        for name, m in self.model.named_modules():
            if "language_model" in name and name.endswith("self_attn") and m.layer_idx in self.layers:
                self._handles.append(m.register_forward_pre_hook(self._pre, with_kwargs=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.model.set_attn_implementation({"text_config": "sdpa"})


def context(method: str, model, kwargs: dict, layers: range) -> contextlib.AbstractContextManager:
    if method == "sdpa":
        return contextlib.nullcontext()
    if method == "flowkern":
        return flowkern.knockout(model, EDGES, layers=layers)
    return DenseMask(model, kwargs["input_ids"], layers)


def run(method: str, model, kwargs: dict, new_tokens: int, layers: range) -> tuple[float, float, torch.Tensor]:
    """One generate: (prefill seconds, decode tokens/s, sequences)."""
    with torch.inference_mode(), context(method, model, kwargs, layers), ForwardTimer(model) as timer:
        out = model.generate(**kwargs, max_new_tokens=new_tokens, do_sample=False)
    return timer.prefill_seconds, timer.decode_tokens_per_second, out


def measure(model, kwargs: dict, new_tokens: int, layers: range, repeats: int, gpu: bool, warm_up: bool) -> dict:
    """Per method: median prefill seconds and decode tokens/s over ``repeats`` rounds (after one warm-up round when
    ``warm_up``), every method once per round, the order rotated; the peak memory is that of the first round's run
    (CPU: peak RSS growth over the run; CUDA: allocated memory above what was allocated before)."""
    if warm_up:
        for m in METHODS:
            run(m, model, kwargs, new_tokens, layers)
    prefill: dict[str, list[float]] = {m: [] for m in METHODS}
    tps: dict[str, list[float]] = {m: [] for m in METHODS}
    peak: dict[str, float] = {}
    seqs: dict[str, torch.Tensor] = {}
    for i in range(repeats):
        for m in METHODS[i % len(METHODS):] + METHODS[: i % len(METHODS)]:
            if i == 0 and gpu:
                out = {}
                peak[m] = cuda_peak_mib(lambda m=m, out=out: out.update(r=run(m, model, kwargs, new_tokens, layers)))[
                    "peak_extra_mib"]
                p, t, seqs[m] = out["r"]
            elif i == 0:
                gc.collect()
                base = reset_peak_rss_kib(fallback=False)
                p, t, seqs[m] = run(m, model, kwargs, new_tokens, layers)
                peak[m] = (peak_rss_kib(fallback=False) - base) / 1024
            else:
                p, t, _ = run(m, model, kwargs, new_tokens, layers)
            prefill[m].append(p)
            tps[m].append(t)
    out: dict = {"same_tokens_flowkern_eager": bool(torch.equal(seqs["flowkern"], seqs["eager-mask"])),
                 "cut_changes_tokens": not bool(torch.equal(seqs["flowkern"], seqs["sdpa"]))}
    for m in METHODS:
        out[m] = dict(prefill_s=statistics.median(prefill[m]), decode_tok_s=statistics.median(tps[m]),
                      peak_extra_mib=peak[m], repeats=repeats)
    out["flowkern"]["prefill_speedup_vs_eager"] = statistics.median(
        e / f for f, e in zip(prefill["flowkern"], prefill["eager-mask"], strict=True))
    out["flowkern"]["decode_speedup_vs_eager"] = statistics.median(
        f / e for f, e in zip(tps["flowkern"], tps["eager-mask"], strict=True))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--size", choices=["7b", "tiny"], default=None, help="default: 7b on CUDA, tiny on CPU")
    ap.add_argument("--layers", default="2-3", help="cut layers a-b (default 2-3)")
    ap.add_argument("--batches", default="1,16", help="comma-separated batch sizes (default 1,16)")
    ap.add_argument("--new-tokens", type=int, default=None, help="default: 32 on CUDA, 4 on CPU")
    ap.add_argument("--repeats", type=int, default=None, help="default: 5 on CUDA, 2 on CPU")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    ap.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/<device>-knockout.json")
    args = ap.parse_args()

    device = resolve_device(args.device)
    gpu = device == "cuda"
    size = args.size or ("7b" if gpu else "tiny")
    dtype = torch.bfloat16 if gpu else torch.float32
    repeats = args.repeats or (5 if gpu else 2)
    new_tokens = args.new_tokens or (32 if gpu else 4)
    a, _, b = args.layers.partition("-")
    layers = range(int(a), int(b or a) + 1)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    load_before = os.getloadavg()[0]
    model = build_model(size, device, dtype)
    rows = []
    for batch in [int(x) for x in args.batches.split(",")]:
        kwargs = make_inputs(model, batch, device, dtype)
        row = dict(batch=batch, prompt_tokens=int(kwargs["input_ids"].shape[1]), new_tokens=new_tokens)
        row.update(measure(model, kwargs, new_tokens, layers, repeats, gpu, warm_up=not rows))
        for m in METHODS:
            r = row[m]
            print(f"batch {batch:3d} {m:10s} prefill {1e3 * r['prefill_s']:9.1f} ms  decode {r['decode_tok_s']:9.1f} "
                  f"tok/s  peak +{r['peak_extra_mib']:.0f} MiB", flush=True)
        rows.append(row)
        del kwargs
        gc.collect()
    setup = dict(dtype=str(dtype).removeprefix("torch."), edges=["->".join(e) for e in EDGES],
                 layers=[layers.start, layers.stop - 1], methods=list(METHODS),
                 load_average_1m=[round(load_before, 2), round(os.getloadavg()[0], 2)],
                 model=model_summary(model, size))
    report = make_report(device_label(device), device, with_transformers=True, setup=setup, results=rows)
    write_report(report, args.out, "knockout", markdown_table)


def markdown_table(report: dict) -> str:
    m = report["model"]
    lines = [llava_caption(report) + f"{m['image_tokens_per_image']} image tokens + {TEXT_TOKENS} text tokens; "
             f"cut {', '.join(report['edges'])} at layers {report['layers'][0]}-{report['layers'][1]}; "
             f"{report['results'][0]['new_tokens']} new tokens", "",
             "| batch | method | prefill ms | decode tok/s | peak extra MiB | vs eager-mask (prefill, decode) |",
             "|---:|---|---:|---:|---:|---|"]
    for r in report["results"]:
        for method in report["methods"]:
            x = r[method]
            ratio = (f"{x['prefill_speedup_vs_eager']:.2f}x, {x['decode_speedup_vs_eager']:.2f}x"
                     if method == "flowkern" else "")
            lines.append(f"| {r['batch']} | {method} | {1e3 * x['prefill_s']:.1f} | {x['decode_tok_s']:.1f} | "
                         f"{x['peak_extra_mib']:.0f} | {ratio} |")
        lines.append(f"| {r['batch']} | same tokens (flowkern, eager-mask) | {r['same_tokens_flowkern_eager']} | | | |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
