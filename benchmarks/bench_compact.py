"""Benchmark flowkern.compact_ (in-place KV-cache compaction) against the obvious torch code and a plain copy.

Workload: all layers' K and V ``[B, H, S, D]`` (default 32 layers = 64 tensors) and a keep mask that drops an
image span (positions [5%, 55%) of S: the system prompt stays, the image goes, the text after it moves).

Methods, all in one process on the same tensors, so ratios are comparable (docs/benchmarks.md):

- ``flowkern``: ``flowkern.compact_(kv, keep, 2)``: in place, one launch (CUDA) / one parallel loop (CPU);
  the time includes computing ``lengths`` and reading ``L`` on the host (a device sync).
- ``index_select``: the per-layer torch loop people write today: ``t.index_select(2, idx)`` for every tensor
  (B = 1; ``torch.gather`` with a [B, H, L, D] index when B > 1). Out of place: new tensors of the kept size.
- ``copy``: one device-to-device ``copy_`` of the same number of bytes as all kept rows (the bandwidth roof).

Bandwidth: bytes = 2 x (bytes of all kept rows) (each read once, written once), for every method; so the
``% of copy`` column is how close a method gets to the copy roof. flowkern does not actually touch the rows
before the first dropped position (5% here), which is counted anyway. Each time is the median of
``--repeats`` runs after a warm-up; peak extra memory is ``torch.cuda.max_memory_allocated`` above the inputs
(CUDA) or the growth of the peak RSS of a fresh process during one run (CPU, Linux).

    python benchmarks/bench_compact.py                  # CPU: S=1024, fp32; writes results/cpu-<n>core-compact.json
    python benchmarks/bench_compact.py --device cuda    # GPU: S=2048, fp16; writes results/h100-compact.json etc.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from _common import device_label, make_report, peak_rss_kib, reset_peak_rss_kib, resolve_device, sync, write_report

import flowkern


def make_inputs(args: argparse.Namespace, device: str, dtype: torch.dtype) -> tuple[list[torch.Tensor], torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(0)
    shape = (args.batch, args.heads, args.seq, args.head_dim)
    kv = []
    for _ in range(2 * args.layers):
        t = torch.empty(shape, dtype=dtype, device=device)
        t.copy_(torch.randn(shape[1:], generator=g).to(dtype))  # broadcast over B: fresh values, fast to make
        kv.append(t)
    keep = torch.ones(args.batch, args.seq, dtype=torch.bool)
    lo, hi = int(0.05 * args.seq), int((0.05 + args.drop) * args.seq)
    keep[:, lo:hi] = False
    return kv, keep.to(device)


def make_methods(kv: list[torch.Tensor], keep: torch.Tensor) -> dict:
    B = keep.shape[0]
    kept_numel = int(keep.sum()) * kv[0].shape[1] * kv[0].shape[3]
    src = torch.empty(sum(kept_numel for _ in kv) * kv[0].element_size(), dtype=torch.uint8, device=keep.device)
    dst = torch.empty_like(src)
    src.fill_(1)

    def run_flowkern():
        return flowkern.compact_(kv, keep, 2)

    def run_index_select():
        if B == 1:
            idx = keep[0].nonzero().squeeze(1)
            return [t.index_select(2, idx) for t in kv]
        order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, : int(keep.sum(1).max())]
        H, D = kv[0].shape[1], kv[0].shape[3]
        index = order[:, None, :, None].expand(B, H, order.shape[1], D)
        return [torch.gather(t, 2, index) for t in kv]

    def run_copy():
        return dst.copy_(src)

    return dict(flowkern=run_flowkern, index_select=run_index_select, copy=run_copy), src.numel()


def time_it(fn, device: str, repeats: int) -> dict:
    fn()  # warm-up (Triton compile, allocator, thread pool)
    sync(device)
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            out = fn()
            times.append((time.perf_counter() - t0) * 1e3)
        del out
    return dict(median_ms=statistics.median(times), min_ms=min(times), max_ms=max(times), repeats=repeats)


def peak_extra_mib(name: str, fn, device: str, argv: list[str]) -> float | None:
    """Peak memory a method allocates on top of the inputs (MiB)."""
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        del out
        return (peak - base) / 2**20
    # CPU: a fresh process in which glibc returns every allocation > 64 KiB to the OS on free (fixed mmap
    # threshold), so the growth of the peak RSS during one steady-state run is what the method allocated
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, __file__, *argv, "--memory-probe", name]
    try:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        return float(out.stdout.strip().splitlines()[-1])
    except (subprocess.CalledProcessError, ValueError, IndexError):
        return None


def memory_probe(name: str, fn) -> None:
    """Child process: print the peak RSS growth (MiB) of one run of ``fn`` after a warm-up (Linux)."""
    fn()
    base = reset_peak_rss_kib(fallback=False)
    out = fn()
    peak = peak_rss_kib(fallback=False)
    del out
    print((peak - base) / 1024)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                    help="default: float16 on CUDA, float32 on CPU")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--seq", type=int, default=None, help="default: 2048 on CUDA, 1024 on CPU")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--drop", type=float, default=0.5, help="fraction of S dropped (one span after the first 5%%)")
    ap.add_argument("--repeats", type=int, default=None, help="default: 50 on CUDA, 10 on CPU")
    ap.add_argument("--out", type=Path, default=None, help="default benchmarks/results/<device>-compact.json")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
    ap.add_argument("--memory-probe", help=argparse.SUPPRESS)
    args = ap.parse_args()

    device = resolve_device(args.device)
    gpu = device == "cuda"
    dtype = getattr(torch, args.dtype or ("float16" if gpu else "float32"))
    args.seq = args.seq or (2048 if gpu else 1024)
    repeats = args.repeats or (50 if gpu else 10)
    if not 0 <= args.drop <= 0.95:
        raise SystemExit("--drop must be in [0, 0.95]")
    torch.set_num_threads(os.cpu_count() or 1)
    label = device_label(device)

    kv, keep = make_inputs(args, device, dtype)
    methods, moved_bytes = make_methods(kv, keep)
    if args.memory_probe:
        with torch.no_grad():
            memory_probe(args.memory_probe, methods[args.memory_probe])
        return
    argv = sys.argv[1:]
    traffic = 2 * moved_bytes  # read + write of every kept row
    with torch.no_grad():
        res = {}
        for name, fn in methods.items():
            r = time_it(fn, device, repeats)
            r["GBps"] = traffic / (r["median_ms"] * 1e-3) / 1e9
            r["peak_extra_mib"] = None if args.no_memory else peak_extra_mib(name, fn, device, argv)
            res[name] = r
            print(f"{name:13s} {r['median_ms']:9.3f} ms  {r['GBps']:8.1f} GB/s", flush=True)
    for name in res:
        res[name]["pct_of_copy"] = 100 * res[name]["GBps"] / res["copy"]["GBps"]
    report = make_report(
        label, device,
        shape=dict(layers=args.layers, tensors=len(kv), B=args.batch, H=args.heads, S=args.seq, D=args.head_dim,
                   dtype=str(dtype).removeprefix("torch."), kept=int(keep.sum()) // args.batch,
                   cache_mib=sum(t.numel() * t.element_size() for t in kv) / 2**20),
        traffic_bytes=traffic, results=res,
        flowkern_over_index_select=res["flowkern"]["median_ms"] / res["index_select"]["median_ms"],
        flowkern_over_copy=res["flowkern"]["median_ms"] / res["copy"]["median_ms"],
    )
    write_report(report, args.out, "compact", markdown_table)


def markdown_table(report: dict) -> str:
    s = report["shape"]
    lines = [
        f"{report['device']} ({report['device_name']}, {report['threads']} threads, torch {report['torch']}, "
        f"backend {report['backend']}): {s['tensors']} x [{s['B']}, {s['H']}, {s['S']}, {s['D']}] {s['dtype']} "
        f"({s['cache_mib']:.0f} MiB), {s['kept']}/{s['S']} kept",
        "",
        "| method | ms (median) | GB/s (kept rows, read+write) | % of copy | time / flowkern | peak extra MiB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    fk = report["results"]["flowkern"]["median_ms"]
    for name, r in report["results"].items():
        mem = "-" if r.get("peak_extra_mib") is None else f"{r['peak_extra_mib']:.0f}"
        lines.append(f"| {name} | {r['median_ms']:.3f} | {r['GBps']:.1f} | {r['pct_of_copy']:.0f}% | "
                     f"{r['median_ms'] / fk:.2f}x | {mem} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
