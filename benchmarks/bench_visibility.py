"""Benchmark the visibility rules of ``segment_attention`` (segment table, sliding window, image groups).

In one process, on the same inputs (B = 1, H = 8, D = 128, a VLM layout: 5 % system, 50 % image, 40 % user, 5 %
generated), each time the median of ``--repeats`` runs after a warm-up, the methods interleaved run by run so that
a loaded machine slows them alike:

- ``plain``: ``flowkern.segment_attention`` with no rule (causal + segments, the default path);
- ``baseline``: the same call as the code before the visibility rules (CPU only): the C++ kernel of git revision
  ``--baseline-rev`` (default: the merge base with ``main``), built from ``git show <rev>:csrc/...`` into a
  separate extension whose op namespace and C++ namespace are renamed (``flowkern_baseline``), called with that
  revision's wrapper work (segment-id range check, int32 key ids, head mean of the mass);
- ``all_true``: ``allowed`` = an all-True table (the table path, nothing hidden);
- ``window``: ``window = --window`` (default 512); ``sdpa_window``: SDPA with the equivalent dense bool mask;
- ``knockout``: ``allowed`` hides the image from user and generated rows; ``eager_knockout``: what the peers run,
  eager attention with the equivalent dense additive mask (scores + mask, softmax, times v).

Ratios: plain / baseline (<= 1.02 wanted), all_true / plain (<= 1.05), plain / window at the largest S (>= 3),
sdpa_window / window (> 1), eager_knockout / knockout (>= 5). Peak extra memory of knockout and eager_knockout: on
CUDA ``max_memory_allocated`` above the inputs; on CPU the growth of peak RSS over one steady-state run, in a fresh
subprocess per method and size (``--no-memory`` skips it).

    python benchmarks/bench_visibility.py                  # CPU: S in {2048, 4096}; results/cpu-<n>core-visibility.json
    python benchmarks/bench_visibility.py --device cuda    # GPU (no baseline: the old kernels are C++ only here)
    python benchmarks/bench_visibility.py --seqs 128 --window 32 --repeats 1 --no-memory --no-baseline   # toy
"""

from __future__ import annotations

import argparse
import json
import os
import re
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
ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------------------------- the landed kernel


def build_baseline(rev: str) -> str:
    """Compile ``csrc/segment_attention.cpp`` (+ ``common.h``) of git revision ``rev`` as the op
    ``torch.ops.flowkern_baseline.segment_attention`` (namespaces renamed, so nothing clashes with flowkern._C)
    and load it; returns the full commit hash."""
    from torch.utils.cpp_extension import load

    sha = subprocess.run(["git", "rev-parse", rev], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    sha = sha.strip()
    folder = ROOT / "build" / f"bench-baseline-{sha[:12]}"
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("common.h", "segment_attention.cpp"):
        text = subprocess.run(["git", "show", f"{sha}:csrc/{name}"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout
        text = re.sub(r"\bflowkern\b", "flowkern_baseline", text.replace("flowkern_cpu", "flowkern_baseline"))
        path = folder / name
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
    isa = ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    with open("/proc/cpuinfo") as f:
        words = set(f.read().split())
    load(name=f"flowkern_baseline_{sha[:12]}", sources=[str(folder / "segment_attention.cpp")],
         extra_cflags=["-O3", "-fopenmp", "-std=c++17", *(isa if {"avx2", "fma"} <= words else [])],
         extra_ldflags=["-fopenmp"], build_directory=str(folder), is_python_module=False, verbose=False)
    return sha


def baseline_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seg: torch.Tensor) -> tuple:
    """The landed revision's ``segment_attention(q, k, v, seg, NSEG)``: its checks and key ids, its kernel."""
    lo, hi = int(seg.min()), int(seg.max())
    assert 0 <= lo and hi < NSEG
    key_ids = seg.clamp(0, NSEG - 1).to(torch.int32).contiguous()
    out, lse, mass = torch.ops.flowkern_baseline.segment_attention(q, k, v, key_ids, NSEG, True, q.shape[-1] ** -0.5)
    return out, lse, mass.mean(dim=1)


# --------------------------------------------------------------------------------------------- inputs and methods


def make_inputs(s: int, heads: int, device: str, dtype: torch.dtype, window: int) -> dict:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, s, 128, generator=g).to(device, dtype) for _ in range(3))
    bounds = [int(s * f) for f in (0.05, 0.55, 0.95)]
    seg = torch.full((s,), 3, dtype=torch.long)
    seg[: bounds[0]], seg[bounds[0]: bounds[1]], seg[bounds[1]: bounds[2]] = 0, 1, 2
    seg = seg[None].to(device)
    knockout = torch.ones(NSEG, NSEG, dtype=torch.bool)
    knockout[2, 1] = knockout[3, 1] = False  # user and generated rows do not see the image
    x = dict(q=q, k=k, v=v, seg=seg, window=window, all_true=torch.ones(NSEG, NSEG, dtype=torch.bool, device=device),
             knockout=knockout.to(device))
    i, j = torch.arange(s, device=device)[:, None], torch.arange(s, device=device)[None, :]
    x["window_mask"] = (j <= i) & (i - j < window)  # SDPA: True = attend
    return x


def knockout_additive_mask(x: dict) -> torch.Tensor:
    """The dense [1, 1, S, S] additive mask a peer builds for the knockout (0 = attend, -inf = hidden)."""
    s, seg = x["q"].shape[2], x["seg"][0]
    i, j = torch.arange(s, device=seg.device)[:, None], torch.arange(s, device=seg.device)[None, :]
    keep = (j <= i) & x["knockout"][seg[:, None], seg[None, :]]
    return torch.zeros(s, s, dtype=x["q"].dtype, device=seg.device).masked_fill(~keep, float("-inf"))[None, None]


def run(method: str, x: dict) -> object:
    q, k, v, seg = x["q"], x["k"], x["v"], x["seg"]
    if method == "plain":
        return flowkern.segment_attention(q, k, v, seg, NSEG)
    if method == "baseline":
        return baseline_call(q, k, v, seg)
    if method == "all_true":
        return flowkern.segment_attention(q, k, v, seg, NSEG, allowed=x["all_true"])
    if method == "window":
        return flowkern.segment_attention(q, k, v, seg, NSEG, window=x["window"])
    if method == "sdpa_window":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=x["window_mask"])
    if method == "knockout":
        return flowkern.segment_attention(q, k, v, seg, NSEG, allowed=x["knockout"])
    if method == "eager_knockout":  # the mask is built per call, as a peer's wrapper does
        scores = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5 + knockout_additive_mask(x)
        return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype), v)
    raise ValueError(method)


def time_interleaved(methods: list[str], x: dict, device: str, repeats: int) -> dict:
    """Median / min / max ms per method; one warm-up each, then ``repeats`` rounds over all methods."""
    for m in methods:
        run(m, x)
    sync(device)
    times: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(repeats):
        for m in methods:
            sync(device)
            t0 = time.perf_counter()
            run(m, x)
            sync(device)
            times[m].append((time.perf_counter() - t0) * 1e3)
    return {m: dict(median_ms=statistics.median(t), min_ms=min(t), max_ms=max(t), repeats=repeats)
            for m, t in times.items()}


def peak_extra_mib(method: str, s: int, heads: int, device: str, dtype: torch.dtype, window: int) -> float:
    if device == "cuda":
        x = make_inputs(s, heads, device, dtype, window)
        run(method, x)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run(method, x)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    spec = json.dumps(dict(method=method, s=s, heads=heads, dtype=str(dtype).removeprefix("torch."), window=window))
    out = subprocess.run([sys.executable, __file__, "--memory-probe", spec], capture_output=True, text=True,
                         check=True)
    return float(out.stdout.strip().splitlines()[-1])


def memory_probe(spec: str) -> None:
    """Child process: peak RSS growth (MiB) during one steady-state run of a method on CPU."""
    a = json.loads(spec)
    x = make_inputs(a["s"], a["heads"], "cpu", getattr(torch, a["dtype"]), a["window"])
    run(a["method"], x)  # warm-up: one-time allocations (BLAS buffers, thread pools)
    base = reset_peak_rss_kib()
    run(a["method"], x)
    print((peak_rss_kib() - base) / 1024)


# --------------------------------------------------------------------------------------------- driver

RATIOS = [  # (name, numerator, denominator, target text)
    ("plain_over_baseline", "plain", "baseline", "<= 1.02"),
    ("all_true_over_plain", "all_true", "plain", "<= 1.05"),
    ("plain_over_window", "plain", "window", ">= 3 at the largest S"),
    ("sdpa_window_over_window", "sdpa_window", "window", "> 1"),
    ("eager_knockout_over_knockout", "eager_knockout", "knockout", ">= 5"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                    help="default: float32 on CPU, bfloat16 on CUDA")
    ap.add_argument("--seqs", type=lambda s: [int(x) for x in s.split(",")], default=None)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--baseline-rev", default=None, help="git revision of the landed kernel (default: merge base "
                    "of HEAD and main)")
    ap.add_argument("--no-baseline", action="store_true", help="skip building and timing the landed kernel")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
    ap.add_argument("--out", type=Path, default=None,
                    help="results JSON (default benchmarks/results/<device>-visibility.json)")
    ap.add_argument("--memory-probe", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_probe:
        memory_probe(args.memory_probe)
        return

    device = resolve_device(args.device)
    gpu = device == "cuda"
    dtype = getattr(torch, args.dtype or ("bfloat16" if gpu else "float32"))
    seqs = args.seqs or ([2048, 4096, 16384] if gpu else [2048, 4096])
    repeats = args.repeats or (20 if gpu else 7)
    torch.set_num_threads(os.cpu_count() or 1)
    baseline = None
    if not (gpu or args.no_baseline):
        rev = args.baseline_rev or subprocess.run(["git", "merge-base", "HEAD", "main"], cwd=ROOT,
                                                  capture_output=True, text=True, check=True).stdout.strip()
        baseline = build_baseline(rev)

    rows = []
    for s in seqs:
        x = make_inputs(s, args.heads, device, dtype, args.window)
        methods = ["plain", "all_true", "window", "sdpa_window", "knockout", "eager_knockout"]
        if baseline:
            methods.insert(1, "baseline")
        eager_bytes = args.heads * s * s * 4 * 4
        if eager_bytes > (0.5 * torch.cuda.mem_get_info()[0] if gpu else 8 * 2**30):
            methods.remove("eager_knockout")
        result = dict(s=s, heads=args.heads, d=128, window=args.window, dtype=str(dtype).removeprefix("torch."))
        result.update(time_interleaved(methods, x, device, repeats))
        if baseline:  # the same outputs, or the comparison means nothing
            pairs = zip(run("plain", x), run("baseline", x), strict=True)
            result["baseline_max_abs_diff"] = max(float((a.float() - b.float()).abs().max()) for a, b in pairs)
        for name, num, den, _ in RATIOS:
            if num in result and den in result:
                result[name] = result[num]["median_ms"] / result[den]["median_ms"]
        if not args.no_memory:
            for m in ("knockout", "eager_knockout"):
                if m in result:
                    result[m]["peak_extra_mib"] = peak_extra_mib(m, s, args.heads, device, dtype, args.window)
        print(f"S={s}: " + ", ".join(f"{m} {result[m]['median_ms']:.1f} ms" for m in methods), flush=True)
        rows.append(result)
        del x

    report = make_report(device_label(device), device, setup=dict(baseline_rev=baseline, nseg=NSEG),
                         results=rows)
    write_report(report, args.out, "visibility", markdown_table)


def markdown_table(report: dict) -> str:
    lines = [
        f"{report['device']} ({report['device_name']}, {report['threads']} threads, torch {report['torch']}, "
        f"backend {report['backend']}; baseline {str(report.get('baseline_rev'))[:12]})",
        "",
        "| S | plain ms | baseline ms | all-true ms | window ms | SDPA+mask ms | knockout ms | eager+mask ms "
        "| plain / baseline | all-true / plain | plain / window | SDPA / window | eager / knockout "
        "| peak MiB knockout / eager |",
        "|---:|" + "---:|" * 13,
    ]

    def ms(r: dict, m: str) -> str:
        return f"{r[m]['median_ms']:.1f}" if m in r else "-"

    def ratio(r: dict, name: str) -> str:
        return f"{r[name]:.3f}x" if name in r else "-"

    for r in report["results"]:
        mem = "-"
        if "peak_extra_mib" in r.get("knockout", {}) and "peak_extra_mib" in r.get("eager_knockout", {}):
            mem = f"{r['knockout']['peak_extra_mib']:.1f} / {r['eager_knockout']['peak_extra_mib']:.0f}"
        cells = [ms(r, m) for m in ("plain", "baseline", "all_true", "window", "sdpa_window", "knockout",
                                    "eager_knockout")]
        cells += [ratio(r, name) for name, *_ in RATIOS]
        lines.append(f"| {r['s']} | " + " | ".join(cells) + f" | {mem} |")
    lines += ["", "targets: " + "; ".join(f"{name} {target}" for name, _, _, target in RATIOS)]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
