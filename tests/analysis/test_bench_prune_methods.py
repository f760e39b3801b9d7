"""The pruning-methods benchmark (benchmarks/bench_prune_methods.py): its ``--quick`` smoke run writes a report in
which every measurement is either measured or skipped with a reason, and the one-stage equivalent of a schedule has
the schedule's average rows per layer."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "bench_prune_methods.py"


def _load() -> Any:
    sys.path.insert(0, str(SCRIPT.parent))  # the script imports _common from its folder
    try:
        spec = importlib.util.spec_from_file_location("bench_prune_methods", SCRIPT)
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules.setdefault("bench_prune_methods", mod)  # dataclasses look their module up there
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(SCRIPT.parent))


def test_one_stage_keep_matches_the_schedules_average_rows() -> None:
    bench = _load()
    # LLaVA-1.5 shape: 640 rows, 576 image tokens, 32 layers; schedule 2:0.5, 8:0.25, 16:0.125 keeps 288/144/72
    rows = [640] * 2 + [64 + 288] * 6 + [64 + 144] * 8 + [64 + 72] * 16
    k = bench.one_stage_keep(rows, 2, 640, 576)
    assert k == 134  # (2 * 640 + 30 * (64 + 134.4)) / 32 = sum(rows) / 32
    single = [640] * 2 + [64 + k] * 30
    assert abs(sum(single) - sum(rows)) / 32 < 1.0  # the rounding moves the average by less than one row
    assert bench.one_stage_keep([10] * 4, 0, 10, 6) == 6 and bench.one_stage_keep([4] * 4, 0, 10, 6) == 0


def test_quick_run_measures_or_says_why_not(tmp_path: Path) -> None:
    out = tmp_path / "prune-methods.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--threads", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["quick"] and report["definitions"]["average_rows_per_layer"]
    (row,) = report["results"]
    assert row["batch"] == 2 and row["image_tokens"] == 64
    assert row["unpruned"]["prefill_s"] > 0 and row["unpruned"]["rows_per_layer"] == [row["prompt_tokens"]] * 18
    entries = [*row["removal"], *row["scorers"], row["schedule"], row["one_stage"]]
    for e in entries:
        assert ("skipped" in e and len(e["skipped"]) > 10) or "prefill_s" in e, e
    for e in row["removal"]:
        if "skipped" not in e:
            assert e["pruned_length"] == e["rows_per_layer"][0] < row["prompt_tokens"]
            assert e["ideal"] > 1 and e["speedup_vs_ideal"] > 0
    reference = next(e for e in row["scorers"] if e["scorer"] == "none" and e["layer"] == 2)
    assert reference["reference"] and reference["rows_per_layer"][1] > reference["rows_per_layer"][2]
    assert {e["scorer"] for e in row["scorers"]} >= {"attention", "random", "none", "grid"}
    measured = [e for e in row["scorers"] if "overhead" in e]
    assert measured and all(e["spec"]["rank"] == e["scorer"] for e in measured)


def test_sections_from_measured_variants() -> None:
    """What the report says once every setting runs (a build with the whole pruning platform), on made-up times."""
    import argparse

    bench = _load()
    args = argparse.Namespace(new_tokens=4, scorer_layers=[2, 0], scorer_keep=0.25, schedule_rank="attention")
    variants, sections = bench.plan_variants(args)
    prompt, image, layers = 640, 576, 32

    def fill(v: Any, rows: list[int], seconds: float) -> None:
        v.rows, v.prefill, v.lm, v.decode = rows, [seconds, seconds], [seconds - 0.01] * 2, [10 / seconds] * 2

    for v in variants.values():
        stages = v.spec.stages if isinstance(v.spec, bench.PruneSpec) else ()
        rows, kept = [prompt] * layers, image
        for layer, keep in stages:
            kept = round(keep * image) if isinstance(keep, float) else keep
            rows[layer:] = [prompt - image + kept] * (layers - layer)
        fill(v, rows, sum(rows) / 1e4 + (0.002 if v.spec is not None and "attention" in v.name else 0))
    sched = variants[sections["schedule"]]
    k = bench.one_stage_keep(sched.rows, 2, prompt, image)
    one = bench.Variant("one", bench.PruneSpec(layer=2, keep=k, rank="attention"), 4)
    fill(one, [prompt] * 2 + [prompt - image + k] * 30, (2 * prompt + 30 * (prompt - image + k)) / 1e4)
    variants["one"], sections["one_stage"] = one, "one"
    out = bench.section_rows(variants, sections, prompt)
    r = {x["keep"]: x for x in out["removal"]}
    assert r[0.25]["pruned_length"] == 64 + 144 and abs(r[0.25]["ideal"] - 640 / 208) < 1e-9
    assert abs(r[0.25]["speedup_vs_ideal"] - 1.0) < 1e-9 and r[0.25]["meets_goal"]
    att = next(x for x in out["scorers"] if x["scorer"] == "attention" and x["layer"] == 2)
    assert 0 < att["overhead"] < 0.05 and att["meets_goal"] and att["spec"]["rank"] == "attention"
    assert next(x for x in out["scorers"] if x["scorer"] == "attention" and x["layer"] == 0)["skipped"]
    assert abs(out["schedule"]["average_rows_per_layer"] - out["one_stage"]["average_rows_per_layer"]) < 1
    assert out["schedule_vs_one_stage"]["prefill_speedup"] > 0 and out["schedule"]["decode_tok_s"] > 0
    table = bench.markdown_table(dict(device="cpu-2core", device_name="x", threads=2, torch="t", transformers="t",
                                      dtype="float32", backend="cpp", repeats=2, schedule=[[2, 0.5]],
                                      scorer_keep=0.25, schedule_rank="attention",
                                      model=dict(size="s", text_layers=32, hidden=512, image_tokens_per_image=576),
                                      results=[dict(batch=1, prompt_tokens=prompt, new_tokens=4, **out)]))
    assert "| 1 | 0.25 | 208 | 3.08 | " in table and "| 1 | 0 | `attention` | skipped: " in table
    assert "| 1 | 2 | `none` | 752.0 | (reference) |" in table and "| 1 | one stage, keep 134 | " in table


def test_every_registered_scorer_gets_a_setting(monkeypatch: Any) -> None:
    """A scorer registered beside the built-ins is measured at every scorer layer it can rank at."""
    import argparse
    from dataclasses import dataclass
    from typing import ClassVar

    import torch

    from flowkern.scorers import Scorer, base

    bench = _load()
    base.scorer_names()
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))

    @dataclass(frozen=True)
    class Late(Scorer):
        name: ClassVar[str] = "test-late"
        before_decoder: ClassVar[bool] = False

        def score(self, inputs: Any) -> torch.Tensor:
            return torch.zeros(inputs.image.shape)

    @dataclass(frozen=True)
    class Early(Late):
        name: ClassVar[str] = "test-early"
        before_decoder: ClassVar[bool] = True

    base.register(Late)
    base.register(Early)
    args = argparse.Namespace(new_tokens=2, scorer_layers=[2, 0], scorer_keep=0.25, schedule_rank="attention")
    variants, sections = bench.plan_variants(args)
    scorers = sections["scorers"]
    assert scorers[(2, "test-late")][0] == "L2 keep 0.25 test-late" and "needs layer >= 1" in scorers[(0, "test-late")][
        0]["skipped"]
    assert scorers[(0, "test-early")][0] == "L0 keep 0.25 test-early" and scorers[(0, "test-early")][1] == (
        "L0 keep 0.25 none")
    assert variants["L0 keep 0.25 test-early"].spec.rank == "test-early"
