"""Benchmark flowkern's ops against SDPA (no mass) and the eager path users run today.

The eager path is what ``output_attentions=True`` gives: materialise ``softmax(q k^T)`` ([B, H, Sq, Sk]),
multiply by v, then sum the probabilities per segment (for segment_attention) or take the rows of interest
(for key_attention_mass). All methods run in one process on the same inputs, so ratios are comparable
(docs/benchmarks.md); each time is the median of ``--repeats`` runs after a warm-up.

Peak extra memory: on CUDA, ``torch.cuda.max_memory_allocated`` above the inputs; on CPU, the growth of the
process's peak RSS while running the method once, measured in a fresh subprocess per method and shape.

    python benchmarks/bench_attention.py                 # CPU: S in {1k, 2k}, decode; writes results/cpu-<n>core.json
    python benchmarks/bench_attention.py --device cuda   # GPU: S in {1k, 2k, 4k, 16k}, decode B=8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import device_label, make_report, peak_rss_kib, reset_peak_rss_kib, resolve_device, sync, write_report

import flowkern

NSEG = 4  # system / image / user / generated


def segments(b: int, sk: int, device: str) -> torch.Tensor:
    """A VLM-like layout: 5% system, 50% image, 40% user, the rest generated."""
    bounds = [int(sk * f) for f in (0.05, 0.55, 0.95)]
    seg = torch.full((sk,), 3, dtype=torch.long)
    seg[: bounds[0]] = 0
    seg[bounds[0] : bounds[1]] = 1
    seg[bounds[1] : bounds[2]] = 2
    return seg.expand(b, sk).contiguous().to(device)


def make_inputs(case: dict, device: str, dtype: torch.dtype, seed: int = 0) -> dict:
    g = torch.Generator(device="cpu").manual_seed(seed)
    b, h, sq, sk, d = case["b"], case["h"], case["sq"], case["sk"], case["d"]
    q = torch.randn(b, h, sq, d, generator=g).to(device, dtype)
    k = torch.randn(b, h, sk, d, generator=g).to(device, dtype)
    v = torch.randn(b, h, sk, d, generator=g).to(device, dtype)
    return dict(q=q, k=k, v=v, seg=segments(b, sk, device))


# --------------------------------------------------------------------------------------------- methods


def eager_probs(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    sq, sk = q.shape[2], k.shape[2]
    scores = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if sq > 1:
        causal = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)
        scores = scores.masked_fill(~causal, float("-inf"))
    return torch.softmax(scores, dim=-1, dtype=torch.float32)


def run_method(op: str, method: str, x: dict, sdpa_backend: str | None = None):
    q, k, v, seg = x["q"], x["k"], x["v"], x["seg"]
    causal = q.shape[2] > 1
    if op == "segment_attention":
        if method == "flowkern":
            return flowkern.segment_attention(q, k, v, seg, NSEG, causal=causal)
        if method == "sdpa":
            if sdpa_backend is None:
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(getattr(SDPBackend, sdpa_backend)):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        if method == "eager":
            p = eager_probs(q, k)
            out = torch.matmul(p.to(v.dtype), v)
            onehot = F.one_hot(seg, NSEG).to(p.dtype)
            return out, torch.matmul(p, onehot[:, None]).mean(1)
    if op == "key_attention_mass":  # attention each key receives from the last row
        if method == "flowkern":
            return flowkern.key_attention_mass(q, k, x["lse"], causal=True)
        if method == "eager":  # output_attentions gives the whole matrix; the caller slices the last row
            return eager_probs(x["q_full"], k)[:, :, -1].mean(1)
    raise ValueError(f"unknown method {op}/{method}")


def prepare(op: str, case: dict, device: str, dtype: torch.dtype) -> dict:
    x = make_inputs(case, device, dtype)
    if op == "key_attention_mass":
        _, lse, _ = flowkern.segment_attention(x["q"], x["k"], x["v"], x["seg"], NSEG, causal=True)
        x = dict(x, q_full=x["q"], q=x["q"][:, :, -1:], lse=lse[:, :, -1:].contiguous())
    return x


def time_method(op: str, method: str, x: dict, device: str, repeats: int, sdpa_backend: str | None = None) -> dict:
    run_method(op, method, x, sdpa_backend)  # warm-up (compilation, allocator, caches)
    sync(device)
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run_method(op, method, x, sdpa_backend)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            run_method(op, method, x, sdpa_backend)
            times.append((time.perf_counter() - t0) * 1e3)
    return dict(median_ms=statistics.median(times), min_ms=min(times), max_ms=max(times), repeats=repeats)


def peak_extra_mib(op: str, method: str, case: dict, device: str, dtype: torch.dtype) -> float:
    if device == "cuda":
        x = prepare(op, case, device, dtype)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run_method(op, method, x)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    probe = json.dumps(dict(op=op, method=method, case=case, dtype=str(dtype).removeprefix("torch.")))
    out = subprocess.run([sys.executable, __file__, "--memory-probe", probe], capture_output=True, text=True,
                         check=True)
    return float(out.stdout.strip().splitlines()[-1])


def memory_probe(spec: str) -> None:
    """Child process: peak RSS growth (MiB) during one steady-state run of a method on CPU."""
    s = json.loads(spec)
    dtype = getattr(torch, s["dtype"])
    x = prepare(s["op"], s["case"], "cpu", dtype)
    if s["op"] == "key_attention_mass":  # the lse came from a segment_attention run; don't count that run
        x = {k: v.clone() for k, v in x.items()}
    run_method(s["op"], s["method"], x)  # warm-up: one-time allocations (BLAS buffers, thread pools)
    base = reset_peak_rss_kib()
    run_method(s["op"], s["method"], x)
    print((peak_rss_kib() - base) / 1024)


# --------------------------------------------------------------------------------------------- driver


def cases_for(device: str, seqs: list[int], decode_sk: int, decode_b: int) -> list[tuple[str, dict]]:
    out = []
    for s in seqs:
        out.append(("segment_attention", dict(name=f"prefill S={s}", b=1, h=32, sq=s, sk=s, d=128)))
    out.append(("segment_attention", dict(name=f"decode B={decode_b} Sk={decode_sk}", b=decode_b, h=32, sq=1,
                                          sk=decode_sk, d=128)))
    for s in seqs:
        out.append(("key_attention_mass", dict(name=f"last row, S={s}", b=1, h=32, sq=s, sk=s, d=128)))
    return out


def eager_fits(case: dict, device: str) -> bool:
    need = case["b"] * case["h"] * case["sq"] * case["sk"] * 4 * 3  # scores, probs (fp32), masked copy
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return need < 0.8 * free
    return need < 8 * 2**30


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                    help="default: float32 on CPU, bfloat16 on CUDA")
    ap.add_argument("--seqs", type=lambda s: [int(x) for x in s.split(",")], default=None)
    ap.add_argument("--decode-sk", type=int, default=None)
    ap.add_argument("--decode-batch", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
    ap.add_argument("--out", type=Path, default=None, help="results JSON (default benchmarks/results/<device>.json)")
    ap.add_argument("--memory-probe", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_probe:
        memory_probe(args.memory_probe)
        return

    device = resolve_device(args.device)
    gpu = device == "cuda"
    dtype = getattr(torch, args.dtype or ("bfloat16" if gpu else "float32"))
    seqs = args.seqs or ([1024, 2048, 4096, 16384] if gpu else [1024, 2048])
    decode_sk = args.decode_sk or (4096 if gpu else 2048)
    decode_b = args.decode_batch or (8 if gpu else 1)
    repeats = args.repeats or (20 if gpu else 5)
    torch.set_num_threads(os.cpu_count() or 1)
    label = device_label(device)

    rows = []
    for op, case in cases_for(device, seqs, decode_sk, decode_b):
        x = prepare(op, case, device, dtype)
        methods = ["flowkern", "sdpa", "eager"] if op == "segment_attention" else ["flowkern", "eager"]
        result = dict(op=op, case=case["name"], shape=case, dtype=str(dtype).removeprefix("torch."))
        for method in methods:
            if method == "eager" and not eager_fits(case, device):
                result[method] = dict(skipped="the materialised matrix does not fit in memory")
                continue
            if method == "sdpa" and gpu:  # the fastest SDPA backend available for this shape
                best = None
                for name in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"):
                    try:
                        t = time_method(op, method, x, device, repeats, sdpa_backend=name)
                    except RuntimeError:
                        continue
                    if best is None or t["median_ms"] < best["median_ms"]:
                        best = dict(t, backend=name)
                result[method] = best
            else:
                result[method] = time_method(op, method, x, device, repeats)
            if not args.no_memory:
                result[method]["peak_extra_mib"] = peak_extra_mib(op, method, case, device, dtype)
            print(f"{op:19s} {case['name']:22s} {method:9s} {result[method]['median_ms']:10.2f} ms", flush=True)
        fk = result["flowkern"]["median_ms"]
        for method in methods[1:]:
            if "median_ms" in result.get(method, {}):
                result[f"flowkern_over_{method}"] = fk / result[method]["median_ms"]
                if "peak_extra_mib" in result[method] and result[method]["peak_extra_mib"] > 0:
                    result[f"memory_flowkern_over_{method}"] = (
                        result["flowkern"]["peak_extra_mib"] / result[method]["peak_extra_mib"]
                    )
        rows.append(result)
        del x

    write_report(make_report(label, device, results=rows), args.out, None, markdown_table)


def markdown_table(report: dict) -> str:
    lines = [
        f"{report['device']} ({report['device_name']}, {report['threads']} threads, torch {report['torch']}, "
        f"{report['results'][0]['dtype']}, backend {report['backend']})",
        "",
        "| op | case | flowkern ms | SDPA ms | eager ms | flowkern / SDPA | flowkern / eager "
        "| peak MiB flowkern / eager |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]

    def ms(r: dict, m: str) -> str:
        return f"{r[m]['median_ms']:.2f}" if m in r and "median_ms" in r[m] else "-"

    def mem(r: dict) -> str:
        if "peak_extra_mib" not in r["flowkern"] or "peak_extra_mib" not in r.get("eager", {}):
            return "-"
        return f"{r['flowkern']['peak_extra_mib']:.0f} / {r['eager']['peak_extra_mib']:.0f}"

    for r in report["results"]:
        ratio_sdpa = f"{r['flowkern_over_sdpa']:.2f}x" if "flowkern_over_sdpa" in r else "-"
        ratio_eager = f"{r['flowkern_over_eager']:.3f}x" if "flowkern_over_eager" in r else "-"
        lines.append(f"| {r['op']} | {r['case']} | {ms(r, 'flowkern')} | {ms(r, 'sdpa')} | {ms(r, 'eager')} | "
                     f"{ratio_sdpa} | {ratio_eager} | {mem(r)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
