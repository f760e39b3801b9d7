r"""Ahead-of-time compile sweep of every Triton kernel for Hopper (sm_90), without a GPU.

What it proves: every specialisation that flowkern's launchers choose over the shape grid below *compiles* for
sm_90 with the installed Triton and its bundled ``ptxas``, fits in shared memory (<= 227 KB per block) and does
(or does not) spill registers. It says nothing about numerics or speed: only a GPU run shows those.

Method:

1. Every launcher in ``flowkern/kernels/`` runs on CPU tensors (allocated, never touched) with the module's
   ``@triton.jit`` functions replaced by a recorder and ``num_sms`` patched to an H100/H200's 132 SMs, so the
   launcher takes exactly the decisions (tiles, warps, stages, split-K, GQA packing, combine rows, compaction
   groups) that it takes on the GPU for the same shapes.
2. Each recorded launch is bound with Triton's own JIT binder (``create_function_from_signature`` +
   ``JITFunction._pack_args``), i.e. Triton's specialisation rules: ints equal to 1 become constants, ints and
   pointers divisible by 16 get ``tt.divisibility=16``. Launches that bind to the same (signature, constants,
   attributes, options) are one *config*.
3. Each distinct config is compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))``
   in a process pool, with a fresh, temporary ``TRITON_CACHE_DIR`` (nothing is cached across runs). Registers,
   spill stores/loads and stack come from ptxas' ``-v`` report (Triton's ``dump_ptxas_log``), shared memory from
   the compiled kernel's metadata; ``wgmma`` tells whether a dot lowered to Hopper's warpgroup MMA.

Shape grid (batch 1; S = 611 = 576 LLaVA image tokens + 35 text, not a multiple of 16, and S = 2048):

- heads ``(Hq, Hkv, D)``: D=64 (16, 16) and (32, 4); D=80 (32, 32) and (32, 8); D=128 (32, 32) and (28, 4);
  D=256 (16, 8) and (8, 1) -- MHA and GQA/MQA for each head dim;
- dtypes fp16, bf16, fp32;
- ``segment_attention``: prefill (Sq = Sk = S), chunk (Sq = 20 answer rows, Sk = S: GQA packing + split-K),
  decode (Sq = 1, Sk = S: split-K + combine); causal on and off; NSEG 1/3/8 (each head dim and dtype gets all
  three); S alternates between the two values along the grid, so every (kernel, dtype, D, phase) sees both;
- ``key_attention_mass``: Sq = 1 (last prompt row), 20, 2048 (all rows, Sk = 2048); causal on and off; with and
  without key ids (alternating);
- visibility features (segment table, window, groups; issue 30's constexpr variants): each of those attention
  launches runs twice, once without features and once with them: all three (``vis=all``, window 256) when
  causal, one of table / window / groups in turn when not, so every tile choice compiles with the heaviest
  variant;
- ``compact_``: all layers' K/V ``[B, Hkv, S, D]`` fp16/bf16/fp32 (D 64/80/128/256) with and without the hidden
  states ``[B, S, 4096]``, K in ``[B, S, Hkv, D]`` layout, a head-dim slice view, hidden states alone, rows that
  are not 16-byte aligned, short rows (position ids, attention mask), S = 7 / 611 / 2048, B = 1 and 4.

Exit status 1 (after printing every offender) on: a compile error or an unreadable ptxas report; shared memory
over 227 KB; any spill in a fp16/bf16 config; any spill in an fp32 config (pass ``--allow-fp32-spills`` to only
report those; fp32 tiles were chosen so that none spill, see the launchers' ``_config`` docstrings), except up to
``FP32_FEATURE_SPILL`` = 64 bytes (stores + loads) in an fp32 launch with a visibility feature: no fp32 tile
choice compiled every such launch spill-free under both Tritons (ptxas trades a few bytes of spill for occupancy:
it spills at 80 / 128 registers with 8 / 4 warps), so those few are reported in the summary line, not failed.

    python benchmarks/aot_sm90.py                    # the sweep: one summary line, exit 1 on a failure
    python benchmarks/aot_sm90.py --table            # ... plus one row per config
    python benchmarks/aot_sm90.py --brief            # ... plus one line per kernel (max registers/spills/smem)
    python benchmarks/aot_sm90.py --json out.json    # ... and the full report as JSON
    python benchmarks/aot_sm90.py --kernels compact --max-configs 3   # a quick subset (tests)
    python benchmarks/aot_sm90.py --match vis=all --match float32      # launches whose "dtype label" has both

From another script (e.g. the GPU check, to print the compiled resources beside its timings)::

    sys.path.insert(0, "benchmarks"); import aot_sm90
    print(aot_sm90.summarise("out.json"))            # the summary line of a saved report (or a report dict)
    print("\n".join(aot_sm90.brief("out.json")))     # one line per kernel

This module imports only the standard library at import time (torch and triton are imported by the sweep).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import multiprocessing
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
ARCH = 90  # sm_90 (H100 / H200); ptxas compiles for sm_90a
WARP_SIZE = 32
NUM_SMS = 132  # H100 SXM / H200
SMEM_LIMIT = 227 * 1024  # max dynamic shared memory per block on sm_90 (bytes)
KERNEL_MODULES = ("segment_attention", "key_attention_mass", "compact")

HEADS = (  # (Hq, Hkv, D)
    (16, 16, 64), (32, 4, 64),
    (32, 32, 80), (32, 8, 80),
    (32, 32, 128), (28, 4, 128),
    (16, 8, 256), (8, 1, 256),
)
DTYPES = ("float16", "bfloat16", "float32")
SEQS = (611, 2048)
NSEGS = (1, 3, 8)
CHUNK_ROWS = 20
WINDOW = 256  # the window of the visibility variants (splits divide window-bounded spans)
VIS_SINGLE = ("table", "window", "groups")  # the non-causal launches' feature, in turn along the grid
FP32_FEATURE_SPILL = 64  # bytes (stores + loads) an fp32 visibility-feature launch may spill (see the docstring)


# ------------------------------------------------------------------------------------------------ the grid


@dataclass(frozen=True)
class Case:
    """One launcher call of the grid: ``op`` (a kernel module), a label, and the call's parameters."""

    op: str
    label: str
    dtype: str
    params: dict[str, Any] = field(hash=False, compare=False)


def _vis_variants(causal: bool, n: int) -> tuple[str, ...]:
    """The visibility variants of one attention launch of the grid (``n``: its index, to take turns)."""
    return ("none", "all") if causal else ("none", VIS_SINGLE[n % len(VIS_SINGLE)])


def grid() -> list[Case]:
    """Every launcher call of the documented shape grid (see the module docstring)."""
    cases: list[Case] = []
    for (di, dtype), (hi, (hq, hkv, d)) in itertools.product(enumerate(DTYPES), enumerate(HEADS)):
        for (pi, phase), (ci, causal) in itertools.product(enumerate(("prefill", "chunk", "decode")),
                                                            enumerate((True, False))):
            s = SEQS[(hi + pi + ci) % 2]
            nseg = NSEGS[(hi + pi + ci + di) % 3]
            sq = {"prefill": s, "chunk": CHUNK_ROWS, "decode": 1}[phase]
            for vis in _vis_variants(causal, hi + pi + di):
                label = f"{phase} Hq={hq} Hkv={hkv} D={d} Sq={sq} Sk={s} causal={int(causal)} nseg={nseg} vis={vis}"
                cases.append(Case("segment_attention", label, dtype,
                                  dict(hq=hq, hkv=hkv, d=d, sq=sq, sk=s, causal=causal, nseg=nseg, vis=vis)))
        for (ri, rows), (ci, causal) in itertools.product(enumerate((1, CHUNK_ROWS, 2048)), enumerate((True, False))):
            s = 2048 if rows == 2048 else SEQS[(hi + ci) % 2]
            for vis in _vis_variants(causal, hi + ri + di):
                ids = (hi + ri + ci) % 2 == 0 or vis in ("all", "table")  # a table needs key ids
                label = f"Hq={hq} Hkv={hkv} D={d} Sq={rows} Sk={s} causal={int(causal)} ids={int(ids)} vis={vis}"
                cases.append(Case("key_attention_mass", label, dtype,
                                  dict(hq=hq, hkv=hkv, d=d, sq=rows, sk=s, causal=causal, ids=ids, vis=vis)))
    layouts = [  # (label, dtype, batch, seq, tensor specs): spec = (kind, shape args)
        ("kv fp16 D=128 + hidden", "float16", 1, 611, [("kv", 32, 128), ("hidden", 4096)]),
        ("kv bf16 D=128", "bfloat16", 4, 2048, [("kv", 8, 128)]),
        ("kv fp16 D=64", "float16", 1, 2048, [("kv", 4, 64)]),
        ("kv fp16 D=80 + hidden", "float16", 1, 611, [("kv", 32, 80), ("hidden", 2560)]),
        ("kv fp32 D=80", "float32", 1, 611, [("kv", 8, 80)]),
        ("kv bf16 D=256", "bfloat16", 1, 2048, [("kv", 1, 256)]),
        ("kv fp32 D=256 S=7", "float32", 1, 7, [("kv", 8, 256)]),
        ("k [B,S,H,D] bf16", "bfloat16", 1, 2048, [("kv_bshd", 8, 128)]),
        ("head-dim slice fp16", "float16", 1, 611, [("kv_slice", 8, 128)]),
        ("hidden fp16", "float16", 4, 611, [("hidden", 4096)]),
        ("rows not 16B-aligned fp16 D=100", "float16", 1, 611, [("rows", 100)]),
        ("short rows: position ids + mask", "int64", 4, 611, [("posids",), ("mask",)]),
    ]
    for label, dtype, b, s, specs in layouts:
        cases.append(Case("compact", f"{label} B={b} S={s}", dtype, dict(b=b, s=s, specs=specs)))
    return cases


def _compact_tensors(dtype: Any, b: int, s: int, specs: list[tuple]) -> tuple[list[Any], list[int]]:
    import torch

    tensors, dims = [], []
    for kind, *a in specs:
        if kind == "kv":  # two layers of K and V
            tensors += [torch.empty(b, a[0], s, a[1], dtype=dtype) for _ in range(4)]
            dims += [2] * 4
        elif kind == "kv_bshd":
            tensors += [torch.empty(b, s, a[0], a[1], dtype=dtype) for _ in range(2)]
            dims += [1, 1]
        elif kind == "kv_slice":
            tensors.append(torch.empty(b, a[0], s, a[1], dtype=dtype)[..., : a[1] // 2])
            dims.append(2)
        elif kind == "hidden":
            tensors.append(torch.empty(b, s, a[0], dtype=dtype))
            dims.append(1)
        elif kind == "rows":
            tensors.append(torch.empty(b, s, a[0] + 3, dtype=dtype)[..., 3:])  # 6-byte offset: 2-byte words
            dims.append(1)
        elif kind == "posids":
            tensors.append(torch.empty(b, s, dtype=torch.int64))
            dims.append(1)
        elif kind == "mask":
            tensors.append(torch.empty(b, s, dtype=torch.bool))
            dims.append(1)
        else:
            raise ValueError(kind)
    return tensors, dims


def _visibility(vis: str, nseg: int, sk: int) -> dict[str, Any]:
    """The launchers' visibility arguments of a variant (allocated, never read: only their kinds matter)."""
    import torch

    table = vis in ("all", "table")
    window = vis in ("all", "window")
    groups = vis in ("all", "groups")
    return dict(allowed=torch.empty(nseg, dtype=torch.int32) if table else None, window=WINDOW if window else 0,
                group_ids=torch.empty(1, sk, dtype=torch.int32) if groups else None,
                span=torch.empty(1, 2, sk, dtype=torch.int32) if window or groups else None)


def _call(case: Case, modules: dict[str, Any]) -> None:
    """Run the case's launcher on CPU tensors (the kernels are recorders at this point)."""
    import torch

    p = case.params
    mod = modules[case.op]
    if case.op == "compact":
        dtype = getattr(torch, case.dtype) if case.dtype != "int64" else torch.float16
        tensors, dims = _compact_tensors(dtype, p["b"], p["s"], p["specs"])
        keep = torch.ones(p["b"], p["s"], dtype=torch.bool)
        keep[:, p["s"] // 3: 2 * p["s"] // 3] = False
        mod.compact_fwd(tensors, keep, dims)
        return
    dtype = getattr(torch, case.dtype)
    q = torch.empty(1, p["hq"], p["sq"], p["d"], dtype=dtype)
    k = torch.empty(1, p["hkv"], p["sk"], p["d"], dtype=dtype)
    scale = p["d"] ** -0.5
    if case.op == "segment_attention":
        v = torch.empty_like(k)
        ids = torch.zeros(1, p["sk"], dtype=torch.int32)
        mod.segment_attention_fwd(q, k, v, ids, p["nseg"], p["causal"], scale,
                                  **_visibility(p["vis"], p["nseg"], p["sk"]))
    else:
        lse = torch.zeros(1, p["hq"], p["sq"], dtype=torch.float32)
        ids = torch.zeros(1, p["sk"], dtype=torch.int32) if p["ids"] else None
        mod.key_attention_mass_fwd(q, k, lse, ids, p["causal"], scale, **_visibility(p["vis"], 3, p["sk"]))


# --------------------------------------------------------------------------------------- record and bind


@dataclass
class Config:
    """One distinct compile: what Triton would compile for the launches in ``labels``."""

    kernel: str  # "module:function"
    signature: dict[str, str]
    constexprs: dict[tuple, Any]
    attrs: dict[tuple, Any]
    options: dict[str, Any]
    dtypes: set[str] = field(default_factory=set)
    labels: list[str] = field(default_factory=list)

    def key(self) -> str:
        return repr((self.kernel, sorted(self.signature.items()), sorted(self.constexprs.items()),
                     sorted(self.attrs.items()), sorted(self.options.items())))


@contextlib.contextmanager
def _recording(modules: dict[str, Any], sink: list) -> Iterator[None]:
    """Replace every ``@triton.jit`` function of the kernel modules by a recorder; patch ``num_sms``."""
    from triton.runtime.jit import JITFunction

    class Recorder:
        def __init__(self, fn: JITFunction) -> None:
            self.fn = fn

        def __getitem__(self, grid: Any) -> Any:
            return lambda *args, **kwargs: sink.append((self.fn, args, kwargs))

    saved = []
    try:
        for mod in modules.values():
            for name, obj in list(vars(mod).items()):
                if isinstance(obj, JITFunction):
                    saved.append((mod, name, obj))
                    setattr(mod, name, Recorder(obj))
            if hasattr(mod, "num_sms"):
                saved.append((mod, "num_sms", mod.num_sms))
                mod.num_sms = lambda device: NUM_SMS
        yield
    finally:
        for mod, name, obj in reversed(saved):
            setattr(mod, name, obj)


def collect(cases: list[Case]) -> tuple[list[Config], int]:
    """Run every case's launcher, bind each launch like Triton's JIT; returns (distinct configs, launches)."""
    import importlib

    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    from flowkern.kernels._common import interpreting

    if interpreting():
        raise SystemExit("aot_sm90: unset TRITON_INTERPRET (the sweep compiles for the GPU)")
    modules = {name: importlib.import_module(f"flowkern.kernels.{name}") for name in KERNEL_MODULES}
    backend = make_backend(GPUTarget("cuda", ARCH, WARP_SIZE))
    binders: dict[Any, Any] = {}
    configs: dict[str, Config] = {}
    n_launches = 0
    for case in cases:
        sink: list = []
        with _recording(modules, sink):
            _call(case, modules)
        for fn, args, kwargs in sink:
            n_launches += 1
            kwargs = dict(kwargs)  # the options that JITFunction.run adds before binding
            kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
            for opt in ("instrumentation_mode", "fpsan_homomorphic_casts"):
                if hasattr(knobs.compilation, opt):
                    kwargs[opt] = getattr(knobs.compilation, opt)
            if fn not in binders:
                binders[fn] = create_function_from_signature(fn.signature, fn.params, backend)
            bound, spec, opts = binders[fn](*args, **kwargs)
            options, signature, constexprs, attrs = fn._pack_args(backend, dict(kwargs), bound, spec, opts)
            cfg = Config(f"{fn.fn.__module__}:{fn.__name__}", signature, constexprs, attrs, dict(options.__dict__))
            cfg = configs.setdefault(cfg.key(), cfg)
            cfg.dtypes.add(case.dtype)
            cfg.labels.append(f"{case.op}: {case.label}")
    return list(configs.values()), n_launches


# ---------------------------------------------------------------------------------------------- compile

_REGS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def _worker_init(cache_dir: str) -> None:
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated (silences a warning)
    sys.path.insert(0, str(ROOT))


def compile_one(kernel: str, signature: dict, constexprs: dict, attrs: dict, options: dict) -> dict[str, Any]:
    """Compile one config for sm_90; returns its resources (or ``error``)."""
    import importlib

    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    t0 = time.perf_counter()
    module, name = kernel.split(":")
    fn = getattr(importlib.import_module(module), name)
    knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            ck = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", ARCH, WARP_SIZE),
                                options=options)
    except Exception as e:  # noqa: BLE001 -- every compile failure is reported, not raised
        return {"error": f"{type(e).__name__}: {str(e)[-2000:]}", "seconds": time.perf_counter() - t0}
    text = log.getvalue()
    regs, spills = _REGS.findall(text), _SPILL.findall(text)
    if not regs or not spills:
        return {"error": f"no ptxas report in the compile log: {text[-500:]!r}", "seconds": time.perf_counter() - t0}
    return {
        "registers": max(int(r) for r in regs),
        "stack": max(int(s[0]) for s in spills),
        "spill_stores": sum(int(s[1]) for s in spills),
        "spill_loads": sum(int(s[2]) for s in spills),
        "shared": int(ck.metadata.shared),
        "wgmma": "wgmma" in ck.asm["ptx"],
        "seconds": time.perf_counter() - t0,
    }


def _short_constants(cfg: Config, fn_args: list[str]) -> dict[str, Any]:
    """The named constexprs of a config (tile sizes, flags; ints specialised to 1 included)."""
    out = {}
    for path, v in sorted(cfg.constexprs.items()):
        out[fn_args[path[0]]] = v if isinstance(v, int | float | bool | str) else str(v)
    return out


def sweep(cases: list[Case], jobs: int, max_configs: int | None = None) -> dict[str, Any]:
    """Record, bind and compile; returns the report (``summary``, ``configs``, ``failures``)."""
    import importlib

    import triton

    t0 = time.perf_counter()
    configs, n_launches = collect(cases)
    if max_configs is not None:
        configs = configs[:max_configs]
    t_collect = time.perf_counter() - t0
    cache_dir = tempfile.mkdtemp(prefix="flowkern-aot-")  # fresh: a cached kernel could hide a failure
    results: list[dict[str, Any] | None] = [None] * len(configs)
    try:
        # heaviest first (attention kernels with the most warps/stages), so the pool ends together
        order = sorted(range(len(configs)), key=lambda i: ("compact" in configs[i].kernel, "combine" in
                                                           configs[i].kernel, -configs[i].options.get("num_warps", 4)))
        with ProcessPoolExecutor(max_workers=jobs, initializer=_worker_init, initargs=(cache_dir,),
                                 mp_context=multiprocessing.get_context("spawn")) as pool:
            futs = {pool.submit(compile_one, configs[i].kernel, configs[i].signature, configs[i].constexprs,
                                configs[i].attrs, configs[i].options): i for i in order}
            for fut in as_completed(futs):
                results[futs[fut]] = fut.result()
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)

    rows = []
    for cfg, res in zip(configs, results, strict=True):
        assert res is not None
        module, name = cfg.kernel.split(":")
        fn = getattr(importlib.import_module(module), name)
        consts = _short_constants(cfg, fn.arg_names)
        rows.append({
            "kernel": f"{module.rsplit('.', 1)[-1]}.{name}",
            "dtypes": sorted(cfg.dtypes),
            "num_warps": cfg.options.get("num_warps"),
            "num_stages": cfg.options.get("num_stages"),
            "constants": consts,
            "launches": len(cfg.labels),
            "example": cfg.labels[0],
            **res,
        })
    report = {
        "target": f"cuda sm_{ARCH} (ptxas sm_{ARCH}a), {NUM_SMS} SMs",
        "triton": triton.__version__,
        "python": sys.version.split()[0],
        "launches": n_launches,
        "collect_seconds": round(t_collect, 1),
        "configs": rows,
    }
    report["wall_seconds"] = round(time.perf_counter() - t0, 1)
    return report


# ------------------------------------------------------------------------------------------- evaluation


def _spills(row: dict[str, Any]) -> int:
    return int(row.get("spill_stores", 0)) + int(row.get("spill_loads", 0))


def _tolerated(row: dict[str, Any]) -> bool:
    """An fp32 launch with a visibility feature that spills at most FP32_FEATURE_SPILL bytes (see the docstring)."""
    c = row.get("constants", {})
    features = any(c.get(k) for k in ("HAS_ALLOWED", "HAS_WINDOW", "HAS_GROUPS"))
    return features and _spills(row) <= FP32_FEATURE_SPILL


def failures(report: dict[str, Any], allow_fp32_spills: bool = False) -> list[str]:
    """Why the report fails (empty: it passes): compile errors, smem over the limit, spills (see the docstring)."""
    out = []
    for row in report["configs"]:
        what = f"{row['kernel']} {'/'.join(row['dtypes'])} {row['example']}"
        if "error" in row:
            out.append(f"compile error: {what}: {row['error']}")
            continue
        if row["shared"] > SMEM_LIMIT:
            out.append(f"shared memory {row['shared']} B > {SMEM_LIMIT} B: {what}")
        if _spills(row):
            fp32_only = set(row["dtypes"]) == {"float32"}
            if not (fp32_only and (allow_fp32_spills or _tolerated(row))):
                out.append(f"spill ({row['spill_stores']} B stores, {row['spill_loads']} B loads, "
                           f"{row['registers']} registers): {what} {row['constants']}")
    return out


def _load(report: dict[str, Any] | str | os.PathLike) -> dict[str, Any]:
    if isinstance(report, dict):
        return report
    return json.loads(Path(report).read_text())


def summarise(report: dict[str, Any] | str | os.PathLike) -> str:
    """The one summary line of a report (a dict, or the path of a ``--json`` file)."""
    r = _load(report)
    rows = r["configs"]
    ok = [x for x in rows if "error" not in x]
    spilled = [x for x in ok if _spills(x)]
    n16 = sum(1 for x in spilled if set(x["dtypes"]) != {"float32"})
    max_regs = max((x["registers"] for x in ok), default=0)
    max_smem = max((x["shared"] for x in ok), default=0)
    worst = max(spilled, key=_spills, default=None)
    worst_s = f"; worst {worst['kernel']} {_spills(worst)} B" if worst else ""
    return (f"aot sm_{ARCH} triton {r['triton']}: {len(ok)}/{len(rows)} configs compiled ({r['launches']} launches), "
            f"max {max_regs} registers, {len(spilled)} spill (fp16/bf16 {n16}, fp32 {len(spilled) - n16}{worst_s}), "
            f"max smem {max_smem / 1024:.1f} KB of {SMEM_LIMIT // 1024} KB, {r['wall_seconds']:.0f} s")


def brief(report: dict[str, Any] | str | os.PathLike) -> list[str]:
    """One line per kernel and dtype class: configs, max registers, spilling configs, max shared memory."""
    r = _load(report)
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for x in r["configs"]:
        cls = "fp32" if set(x["dtypes"]) == {"float32"} else "/".join(
            {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}.get(d, d) for d in x["dtypes"])
        groups.setdefault((x["kernel"], cls), []).append(x)
    lines = []
    for (kernel, cls), xs in sorted(groups.items()):
        ok = [x for x in xs if "error" not in x]
        regs = max((x["registers"] for x in ok), default=0)
        smem = max((x["shared"] for x in ok), default=0) / 1024
        spilled = sum(1 for x in ok if _spills(x))
        lines.append(f"  {kernel:<46} {cls:<10} {len(ok):>3}/{len(xs):<3} configs  max {regs:>3} regs  "
                     f"{spilled} spill  max smem {smem:6.1f} KB")
    return lines


def table(report: dict[str, Any]) -> list[str]:
    """One row per config."""
    keys = ("BLOCK_M", "BLOCK_N", "BLOCK_R", "BLOCK_S", "BLOCK_I", "HEAD_DIM", "NSEG", "PACK_GQA", "SPLIT", "CAUSAL",
            "HAS_ALLOWED", "HAS_WINDOW", "HAS_GROUPS")
    lines = [f"{'kernel':<46} {'dtype':<9} {'w':>2} {'st':>2} {'regs':>4} {'spill':>6} {'smem':>7} {'wgmma':>5}  "
             "constants / first launch"]
    for x in sorted(report["configs"], key=lambda x: (x["kernel"], x["dtypes"], -_spills(x), -x.get("registers", 0))):
        c = x["constants"]
        consts = " ".join(f"{k}={int(c[k]) if isinstance(c[k], bool) else c[k]}" for k in keys if k in c)
        if "error" in x:
            lines.append(f"{x['kernel']:<46} {'/'.join(x['dtypes']):<9} ERROR {x['error'][:120]}")
            continue
        lines.append(f"{x['kernel']:<46} {'/'.join(x['dtypes']):<9} {x['num_warps']:>2} {x['num_stages']:>2} "
                     f"{x['registers']:>4} {_spills(x):>6} {x['shared']:>7} {'yes' if x['wgmma'] else 'no':>5}  "
                     f"{consts} | {x['example']}")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--json", metavar="PATH", help="write the full report here")
    ap.add_argument("--table", action="store_true", help="print one row per config")
    ap.add_argument("--brief", action="store_true", help="print one line per kernel and dtype class")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes (default: all cores)")
    ap.add_argument("--kernels", default=",".join(KERNEL_MODULES),
                    help=f"comma-separated subset of {','.join(KERNEL_MODULES)}")
    ap.add_argument("--max-configs", type=int, help="compile only the first N distinct configs (quick checks)")
    ap.add_argument("--match", action="append", default=[], metavar="TEXT",
                    help="keep only launches whose 'dtype label' contains TEXT (repeatable: all must match)")
    ap.add_argument("--allow-fp32-spills", action="store_true",
                    help="report fp32 spills without failing (fp16/bf16 spills always fail)")
    args = ap.parse_args(argv)

    os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: compile, don't interpret
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    sys.path.insert(0, str(ROOT))
    wanted = set(args.kernels.split(","))
    if not wanted <= set(KERNEL_MODULES):
        ap.error(f"--kernels: unknown {sorted(wanted - set(KERNEL_MODULES))}")
    cases = [c for c in grid() if c.op in wanted and all(m in f"{c.dtype} {c.label}" for m in args.match)]
    report = sweep(cases, max(1, args.jobs), args.max_configs)
    fails = failures(report, args.allow_fp32_spills)
    report["failures"] = fails
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str) + "\n")
    if args.table:
        print("\n".join(table(report)))
    if args.brief:
        print("\n".join(brief(report)))
    for f in fails:
        print("FAIL", f)
    print(summarise(report))
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
