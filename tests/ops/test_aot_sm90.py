"""The ahead-of-time sm_90 sweep (benchmarks/aot_sm90.py): a few real compiles, and the report's evaluation.

The full sweep runs in CI (``bash benchmarks/aot_check.sh``); here only a few configs are compiled, in a
subprocess without ``TRITON_INTERPRET`` (conftest sets it for the kernel tests). Skipped when the Triton install has
no CUDA backend or no bundled ptxas.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "aot_sm90.py"


def _load() -> Any:
    spec = importlib.util.spec_from_file_location("aot_sm90", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("aot_sm90", mod)  # dataclasses look their module up there
    spec.loader.exec_module(mod)  # standard library only at import time
    return mod


aot = _load()


def _has_ptxas() -> bool:
    try:
        import triton.backends.nvidia as nv
    except ImportError:
        return False
    return (Path(nv.__file__).parent / "bin" / "ptxas").exists()


def _row(**kw: Any) -> dict[str, Any]:
    row = {"kernel": "k.f", "dtypes": ["float16"], "example": "x", "constants": {}, "num_warps": 4, "num_stages": 2,
           "registers": 100, "spill_stores": 0, "spill_loads": 0, "stack": 0, "shared": 1024, "wgmma": True}
    row.update(kw)
    return row


def _report(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {"triton": "9.9.9", "launches": len(rows), "wall_seconds": 1.0, "configs": rows}


def test_evaluation_rules() -> None:
    ok = _report([_row(), _row(dtypes=["float32"], registers=200, shared=2048)])
    assert aot.failures(ok) == []
    line = aot.summarise(ok)
    assert "2/2 configs compiled" in line and "max 200 registers" in line and "0 spill" in line
    assert "max smem 2.0 KB of 227 KB" in line

    fp32_spill = _report([_row(dtypes=["float32"], spill_stores=40, spill_loads=40)])
    assert len(aot.failures(fp32_spill)) == 1
    assert aot.failures(fp32_spill, allow_fp32_spills=True) == []
    assert "1 spill (fp16/bf16 0, fp32 1" in aot.summarise(fp32_spill)

    feature = {"HAS_WINDOW": True}
    small = _report([_row(dtypes=["float32"], constants=feature, spill_stores=24, spill_loads=24)])
    assert aot.failures(small) == [] and "1 spill (fp16/bf16 0, fp32 1" in aot.summarise(small)
    big_fp32 = _report([_row(dtypes=["float32"], constants=feature, spill_stores=40, spill_loads=40)])
    assert len(aot.failures(big_fp32)) == 1  # over FP32_FEATURE_SPILL
    half_feature = _report([_row(dtypes=["float16"], constants=feature, spill_stores=4)])
    assert len(aot.failures(half_feature)) == 1  # 16-bit: never tolerated

    half_spill = _report([_row(dtypes=["bfloat16", "float32"], spill_stores=8)])
    assert len(aot.failures(half_spill, allow_fp32_spills=True)) == 1  # a 16-bit spill always fails

    big = _report([_row(shared=aot.SMEM_LIMIT + 1)])
    assert "shared memory" in aot.failures(big)[0]
    err = _report([{**_row(), "error": "CompilationError: boom"}])
    assert "compile error" in aot.failures(err)[0]
    assert "0/1 configs compiled" in aot.summarise(err)


@pytest.mark.skipif(not _has_ptxas(), reason="this triton install has no CUDA backend / bundled ptxas")
def test_compiles_a_few_configs(tmp_path: Path) -> None:
    out = tmp_path / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--kernels", "compact", "--max-configs", "2", "--jobs", "1", "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert len(report["configs"]) == 2
    for row in report["configs"]:
        assert "error" not in row and row["registers"] > 0 and row["shared"] <= aot.SMEM_LIMIT
    assert proc.stdout.strip().splitlines()[-1] == aot.summarise(report)
    assert aot.brief(str(out))[0].lstrip().startswith("compact._compact_kernel")


def test_grid_pairs_every_attention_launch_with_a_visibility_variant() -> None:
    """Every attention launch of the grid compiles without features and with them (all three when causal), and
    each single feature appears with every kernel and dtype."""
    cases = aot.grid()
    for op in ("segment_attention", "key_attention_mass"):
        launches: dict[tuple, set[str]] = {}
        for c in cases:
            if c.op == op:
                key = (c.dtype, *sorted((k, v) for k, v in c.params.items() if k not in ("vis", "ids")))
                launches.setdefault(key, set()).add(c.params["vis"])
        for key, variants in launches.items():
            causal = dict(key[1:])["causal"]
            assert "none" in variants and ("all" in variants if causal else len(variants) == 2), (op, key)
        for dtype in aot.DTYPES:
            seen = {c.params["vis"] for c in cases if c.op == op and c.dtype == dtype}
            assert seen == {"none", "all", *aot.VIS_SINGLE}, (op, dtype, seen)


@pytest.mark.skipif(not _has_ptxas(), reason="this triton install has no CUDA backend / bundled ptxas")
@pytest.mark.parametrize("kernel", ["segment_attention", "key_attention_mass"])
def test_compiles_a_visibility_variant(kernel: str, tmp_path: Path) -> None:
    """One fp32 decode launch with table, window and groups (the main kernel, and for segment_attention the
    split-K combine) compiles for sm_90 without spills."""
    out = tmp_path / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    rows = "Sq=1 " if kernel == "key_attention_mass" else "decode "
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--kernels", kernel, "--match", "float32", "--match", rows, "--match",
         "vis=all", "--max-configs", "2", "--jobs", "1", "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert report["configs"] and aot.failures(report) == []
    assert any(row["constants"].get("HAS_GROUPS") and row["constants"].get("HAS_ALLOWED") for row in report["configs"])
