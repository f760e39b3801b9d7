"""The engine behind ``flowkern compare``: a task answered unpruned (the baseline) and under each pruning method at
each budget, with the task metric, the image tokens kept, the tokens each decoder layer processed, the measured
prefill time and decode speed, and an estimated FLOPs per answer (:mod:`flowkern.flops`) for every point; resumable
and sharded under ``torchrun`` like ``flowkern sweep`` (the same engine, :class:`flowkern.eval.sweep.engine.Engine`).

.. code-block:: python

    from flowkern.eval.sweep.compare import CompareConfig, run_compare

    result = run_compare(CompareConfig(model="llava-hf/llava-1.5-7b-hf", task="pope", data="pope/coco",
                                       images="pope/val2014", out="runs/compare",
                                       methods=("fastv=attention@2", "random=random@2", "pdrop=attention@2:0.5,8:0.25"),
                                       budgets=(0.5, 0.25, 0.1)))
    result.points      # one record per (method, budget) point: metric, kept tokens, FLOPs, prefill s, decode tok/s

**Methods** (:func:`parse_method`): ``[NAME=]SCORER@WHERE[+merge]``. ``SCORER`` is any registered scorer
(``--rank``'s names: ``attention``, ``random``, ``none``, ``grid``, and those :mod:`flowkern.scorers` adds);
``WHERE`` is a decoder layer ``L`` (one stage: prune from layer ``L`` on; negative counts from the end) or a
schedule ``L1:k1,L2:k2,...`` (multi-stage, :attr:`flowkern.plan.PruneSpec.schedule`, keeps as fractions of the
prompt's image tokens); ``+merge`` sets :attr:`~flowkern.plan.PruneSpec.merge`. ``NAME`` (letters, digits,
``_ . -``) labels the method; by default ``SCORER-L<layers>``. A method is a :class:`~flowkern.plan.PruneSpec`
template that a budget completes:

**Budgets** are keep fractions of the image tokens, in (0, 1). A one-stage method at budget ``b`` keeps ``b`` from
its layer on; a schedule is scaled so that its *last* stage keeps ``b``: every stage's keep is multiplied by
``b / k_last`` (capped at 1), so ``2:0.5,8:0.25`` at ``b = 0.1`` runs ``2:0.2,8:0.1``. The budget is thus the
image-token share of the deepest layers.

**What a point measures** (each answer line of its ``answers.jsonl`` carries its share, so the numbers are
recomputed from the point's file alone): the task metric (:data:`flowkern.eval.sweep.MAIN_METRIC` and every other
metric); ``image_tokens`` and ``kept_image_tokens`` (after the last stage, :attr:`flowkern.prune.Pruning.
kept_image_positions`); ``layer_tokens``, the prompt tokens decoder layer ``l`` held (the row's real tokens, less
the image tokens each stage removed from its layer on; earlier stages' counts from their keep, the last one's as
measured); ``new_tokens`` (up to the first end-of-sequence token); ``flops`` (:func:`flowkern.flops.answer_flops`
of those); ``prefill_seconds`` and ``decode_seconds`` (the batch's :attr:`~flowkern.prune.Pruning.prefill_seconds`
and decode-step times, divided among its answers) and ``decode_tokens`` (the batch's decode steps). Per point:
means per answer, the summed prefill time, and decode tokens/s = sum of decode tokens / sum of decode seconds.
``grid``: the kept cells of the sample's drawn image grid (the layout's whole-image view,
:class:`flowkern.hf.segments.ImageGrid`) as hex bits, for the kept-token maps.

**Timing.** By default every point runs on its own (``reuse=False``): the images are encoded and the prefill runs
whole at each point, so the measured times compare. ``reuse=True`` shares the image encoding and the layers below
each point's first stage between the points of a batch (:mod:`flowkern.hf.reuse`): the same answers, faster, but
the times then leave out what was shared. The baseline runs the model's own attention implementation (as
``flowkern eval`` without pruning), the pruned points flowkern's.

**Outputs**: ``points/<method>-keep<b>/`` (each an ``flowkern eval`` folder) and ``points/baseline/``,
``results.jsonl``, ``sweep.json`` (the settings, methods and budgets among them: a rerun under others is
refused), ``compare.csv``, ``compare.json``, ``compare.png`` (:func:`flowkern.viz_compare.plot_pareto`) and
``compare_maps.png`` (:func:`flowkern.viz_compare.plot_keep_maps`: per method, the fraction of answers keeping each
grid cell, at ``map_budget``).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from flowkern.eval.run import EvalUsageError, prepare
from flowkern.eval.sweep.compare_engine import CompareEngine, bits, point_record, point_stats
from flowkern.eval.sweep.dist import Dist
from flowkern.eval.sweep.files import POINTS_DIR, RESULTS_FILE, atomic_savefig, claim_out, start_sweep
from flowkern.eval.sweep.points import MAIN_METRIC, SWEEP_SETTINGS, Point, RunOptions, SweepUsageError, check_inputs
from flowkern.plan import PruneSpec

__all__ = ["Method", "CompareConfig", "CompareResult", "parse_method", "parse_budgets", "run_compare",
           "check_compare_config", "point_of", "point_stats", "point_record", "keep_maps", "bits", "COMPARE_CSV",
           "COMPARE_JSON", "COMPARE_FIGURE", "COMPARE_MAPS"]

COMPARE_CSV = "compare.csv"
COMPARE_JSON = "compare.json"
COMPARE_FIGURE = "compare.png"
COMPARE_MAPS = "compare_maps.png"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class Method:
    """A pruning method: a :class:`~flowkern.plan.PruneSpec` template that a budget completes (:meth:`spec`).

    Attributes:
        name: the label (points ``<name>-keep<b>``). rank: the scorer name. merge: as PruneSpec's.
        layer: one stage's decoder layer, or None with ``schedule``: ``((layer, keep fraction), ...)``.
    """

    name: str
    rank: str
    layer: int | None = None
    schedule: tuple[tuple[int, float], ...] | None = None
    merge: bool = False

    @property
    def text(self) -> str:
        """The method as written on the command line, without its name (``attention@2:0.5,8:0.25+merge``)."""
        where = str(self.layer) if self.schedule is None else ",".join(f"{x}:{k:g}" for x, k in self.schedule)
        return f"{self.rank}@{where}{'+merge' if self.merge else ''}"

    def layers(self) -> list[int]:
        """The stages' decoder layers."""
        return [self.layer] if self.schedule is None else [x for x, _ in self.schedule]

    def spec(self, budget: float, seed: int = 0) -> PruneSpec:
        """The setting at keep fraction ``budget``: one stage keeps ``budget``; a schedule is scaled so that its
        last stage keeps ``budget`` (each keep times ``budget / k_last``, capped at 1, rounded to 6 decimals)."""
        if self.schedule is None:
            return PruneSpec(layer=self.layer, keep=float(budget), rank=self.rank, seed=seed, merge=self.merge)
        factor = budget / self.schedule[-1][1]
        stages = [(x, min(1.0, round(k * factor, 6))) for x, k in self.schedule[:-1]]
        return PruneSpec(schedule=(*stages, (self.schedule[-1][0], float(budget))), rank=self.rank, seed=seed,
                         merge=self.merge)

    def resolved(self, num_layers: int) -> Method:
        """The method with its layers in ``[0, num_layers)`` (negative ones count from the end).

        Raises:
            SweepUsageError: a layer out of range, or a stage its scorer cannot run at (``attention`` at layer 0).
        """
        out = []
        for x in self.layers():
            if not -num_layers <= x < num_layers:
                raise SweepUsageError(f"--methods {self.name}={self.text}: layer {x} is out of range; the model has "
                                      f"{num_layers} decoder layers (0..{num_layers - 1})")
            out.append(x % num_layers)
        if sorted(set(out)) != out:
            raise SweepUsageError(f"--methods {self.name}={self.text}: the stages' layers must increase")
        method = Method(self.name, self.rank, out[0], None, self.merge) if self.schedule is None else Method(
            self.name, self.rank, None, tuple((x, k) for x, (_, k) in zip(out, self.schedule, strict=True)),
            self.merge)
        for x in out:
            try:
                PruneSpec(layer=x, keep=0.5, rank=self.rank).resolve(num_layers)
            except (ValueError, NotImplementedError) as exc:
                raise SweepUsageError(f"--methods {self.name}={self.text}: {exc}") from None
        return method


def parse_method(text: str) -> Method:
    """A method from ``[NAME=]SCORER@WHERE[+merge]`` (see the module docstring).

    Raises:
        SweepUsageError: naming ``--methods`` and the text.
    """
    from flowkern.plan import parse_schedule

    def bad(why: str) -> SweepUsageError:
        return SweepUsageError(f"--methods {text!r}: {why}; expected [NAME=]SCORER@LAYER or "
                               "[NAME=]SCORER@L1:K1,L2:K2,... with an optional +merge (e.g. fastv=attention@2)")

    name, sep, rest = text.strip().partition("=")
    if not sep:
        name, rest = "", name
    rank, at, where = rest.partition("@")
    if not at or not rank or not where:
        raise bad("no SCORER@WHERE")
    merge = where.endswith("+merge")
    where = where[: -len("+merge")] if merge else where
    try:
        PruneSpec(rank=rank)
    except ValueError as exc:
        raise bad(str(exc)) from None
    layer, schedule = None, None
    if ":" in where:
        try:
            schedule = parse_schedule(where)
        except ValueError as exc:
            raise bad(str(exc)) from None
        if any(not isinstance(k, float) or k <= 0 for _, k in schedule):
            raise bad("a schedule's keeps must be fractions > 0 (the budget scales them)")
    else:
        try:
            layer = int(where)
        except ValueError:
            raise bad(f"{where!r} is neither a layer nor a schedule") from None
    if not name:
        layers = [layer] if schedule is None else [x for x, _ in schedule]
        name = f"{rank}-L{'-'.join(str(x) for x in layers)}{'-merge' if merge else ''}".replace("+", "_")
    if not _NAME.match(name):
        raise bad(f"the name {name!r} must be letters, digits, _ . - (it names the points' folders)")
    return Method(name, rank, layer, schedule, merge)


def parse_budgets(text: str | Sequence[float]) -> tuple[float, ...]:
    """Distinct keep fractions in (0, 1), largest first, from ``"0.5,0.25,0.1"`` (``25%`` too) or a list.

    Raises:
        SweepUsageError: naming ``--budgets``.
    """
    from flowkern.plan import parse_keep

    items = [x.strip() for x in text.split(",") if x.strip()] if isinstance(text, str) else list(text)
    out = []
    for item in items:
        try:
            value = parse_keep(item) if isinstance(item, str) else item
        except ValueError as exc:
            raise SweepUsageError(f"--budgets: {exc}") from None
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1:
            raise SweepUsageError(f"--budgets {item!r}: expected keep fractions of the image tokens in (0, 1), "
                                  "e.g. 0.5,0.25,0.1")
        out.append(float(value))
    if not out:
        raise SweepUsageError("--budgets: no budget given")
    return tuple(sorted(set(out), reverse=True))


@dataclass(frozen=True)
class CompareConfig(RunOptions):
    """What to compare (the options of ``flowkern compare``).

    Attributes (besides :class:`~flowkern.eval.sweep.points.RunOptions`):
        methods: ``[NAME=]SCORER@WHERE[+merge]`` texts or :class:`Method` objects (:func:`parse_method`).
        budgets: keep fractions in (0, 1) (a text ``"0.5,0.25"`` or numbers).
        seed: the pruning seed (``random``).
        map_budget: the budget of the kept-token maps (None: the smallest; must be one of ``budgets``).
        reuse: share work between the points of a batch (False by default: the times then compare).
    """

    methods: tuple[str | Method, ...] = ()
    budgets: str | tuple[float, ...] = (0.5, 0.25, 0.1)
    seed: int = 0
    map_budget: float | None = None
    reuse: bool = field(default=False, kw_only=True)


@dataclass
class CompareResult:
    """What :func:`run_compare` produced: the baseline's and every point's record (``compare.json``'s)."""

    out: Path
    baseline: dict[str, Any]
    points: list[dict[str, Any]]
    maps: dict[str, Any]
    generated: int
    seconds: float
    files: dict[str, Path] = field(default_factory=dict)


def check_compare_config(config: CompareConfig) -> tuple[list[Method], tuple[float, ...], float]:
    """The methods, budgets and map budget, checked before any work (pure: no model, no files).

    Raises:
        SweepUsageError: an unknown task, a malformed method or budget, a name given twice, a bad map budget.
    """
    from flowkern.eval import TASKS

    if config.task not in TASKS:
        raise SweepUsageError(f"--task: unknown task {config.task!r} (choose from {', '.join(TASKS)})")
    methods = [m if isinstance(m, Method) else parse_method(m) for m in config.methods]
    if not methods:
        raise SweepUsageError("--methods: no method given")
    names = [m.name for m in methods]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise SweepUsageError(f"--methods: the name {twice[0]!r} is given twice (name them: NAME=SCORER@WHERE)")
    budgets = parse_budgets(config.budgets)
    if isinstance(config.seed, bool) or not isinstance(config.seed, int):
        raise SweepUsageError(f"--seed {config.seed!r}: expected an integer")
    map_budget = min(budgets) if config.map_budget is None else config.map_budget
    if map_budget not in budgets:
        raise SweepUsageError(f"--map-budget {map_budget!r}: expected one of the budgets "
                              f"{', '.join(f'{b:g}' for b in budgets)}")
    return methods, budgets, map_budget


def point_of(method: Method, budget: float, seed: int) -> Point:
    """The engine's point of ``method`` at ``budget``: ``<name>-keep<b>``, its first stage's layer."""
    spec = method.spec(budget, seed)
    return Point(spec.stages[0][0], method.rank, "compare", budget, spec=spec, label=f"{method.name}-keep{budget:g}")


def run_compare(config: CompareConfig, *, model: Any = None, processor: Any = None,
                progress: bool = False) -> CompareResult:
    """Run (or resume) a comparison and write its results (see the module docstring).

    Raises:
        SweepUsageError: bad options (naming the flag), bad inputs, another run's settings in ``out``, a method the
            model cannot run; before any answer is written.
    """
    methods, budgets, map_budget = check_compare_config(config)
    dist = Dist(config.device)
    try:
        # a sweep-engine folder (sweep.json, points/), claimed as ``flowkern knockout`` claims its folder
        with claim_out(config, dist) or contextlib.nullcontext():  # type: ignore[arg-type]
            result = _run(config, methods, budgets, map_budget, dist, model, processor, progress)
        dist.barrier()
        return result
    finally:
        dist.close()


def _run(config: CompareConfig, methods: list[Method], budgets: tuple[float, ...], map_budget: float, dist: Dist,
         model: Any, processor: Any, progress: bool) -> CompareResult:

    start = time.perf_counter()
    engine = CompareEngine(config, dist, model, processor)
    num_layers = engine.num_layers()
    methods = [m.resolved(num_layers) for m in methods]
    baseline = Point(None)
    try:
        plan = prepare(engine.eval_config(baseline))
    except EvalUsageError as exc:
        raise SweepUsageError(str(exc)) from None
    check_inputs(config, plan, progress=progress and dist.index == 0, keeps=budgets,  # type: ignore[arg-type]
                 flag="--budgets")
    if config.overwrite and dist.index == 0:
        for name in (COMPARE_CSV, COMPARE_JSON, COMPARE_FIGURE, COMPARE_MAPS):
            with contextlib.suppress(FileNotFoundError):
                (engine.out / name).unlink()
    settings = {**{k: plan.settings.get(k) for k in SWEEP_SETTINGS if k not in ("keep", "rank")}, "seed": config.seed,
                "methods": {m.name: m.text for m in methods}, "budgets": list(budgets)}
    start_sweep(engine.out, config, dist, settings)  # type: ignore[arg-type]
    grid = {(m.name, b): point_of(m, b, config.seed) for m in methods for b in budgets}
    engine.methods = {p.name: name for (name, _), p in grid.items()}
    points = [baseline, *grid.values()]
    done = engine.run_and_score(points, progress)
    maps = {}
    if dist.index == 0:
        maps = keep_maps({m.name: engine.out / POINTS_DIR / grid[m.name, map_budget].name / "answers.jsonl"
                          for m in methods})
    result = _write_outputs(engine.out, config, dist, done, methods, budgets, grid, maps, map_budget)
    result.generated, result.seconds = engine.generated, time.perf_counter() - start
    return result


# ----------------------------------------------------------------------------------------------------------
# per-point numbers from the answer files


def keep_maps(files: dict[str, Path]) -> dict[str, Any]:
    """Per method, the fraction of answers that kept each cell of the image grid (from the ``grid`` field of its
    answer lines). Grids of another shape than the most common one are mapped onto it by the cells' centres
    (nearest cell). Returns ``{"shape": [rows, cols] or None, "maps": {name: rows x cols list, None = no token}}``."""
    grids: dict[str, list[tuple[tuple[int, int], np.ndarray, np.ndarray]]] = {}
    for name, path in files.items():
        grids[name] = []
        if not path.is_file():
            continue
        for raw in path.read_bytes().split(b"\n"):
            g = json.loads(raw).get("grid") if raw.strip() else None
            if g:
                r, c = g["shape"]
                grids[name].append(((r, c), _unbits(g["kept"], r, c), _unbits(g["present"], r, c)))
    shapes = Counter(s for items in grids.values() for s, _, _ in items)
    if not shapes:
        return {"shape": None, "maps": {}}
    R, C = shapes.most_common(1)[0][0]
    maps = {}
    for name, items in grids.items():
        kept, present = np.zeros((R, C)), np.zeros((R, C))
        for (r, c), k, p in items:
            rows = (np.arange(R) + 0.5) * r // R
            cols = (np.arange(C) + 0.5) * c // C
            kept += k[np.ix_(rows.astype(int), cols.astype(int))]
            present += p[np.ix_(rows.astype(int), cols.astype(int))]
        freq = np.where(present > 0, kept / np.maximum(present, 1), np.nan)
        maps[name] = [[None if np.isnan(v) else round(float(v), 6) for v in row] for row in freq]
    return {"shape": [R, C], "maps": maps}


def _unbits(text: str, rows: int, cols: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(bytes.fromhex(text), dtype=np.uint8))[: rows * cols].reshape(rows, cols) \
        .astype(np.float64)


# ----------------------------------------------------------------------------------------------------------
# outputs

_CSV_STATS = ("image_tokens", "kept_image_tokens", "tokens_per_layer", "new_tokens", "flops_per_answer",
              "prefill_seconds", "prefill_seconds_per_answer", "decode_tokens_per_second")


def _write_outputs(out: Path, config: CompareConfig, dist: Dist, done: dict[str, dict[str, Any]],
                   methods: list[Method], budgets: tuple[float, ...], grid: dict[tuple[str, float], Point],
                   maps: dict[str, Any], map_budget: float) -> CompareResult:
    from flowkern._io import atomic_write_json, atomic_write_text
    from flowkern.viz_compare import plot_keep_maps, plot_pareto

    metric, higher = MAIN_METRIC[config.task]
    base = done["baseline"]
    records = [done[grid[m.name, b].name] for m in methods for b in budgets]
    files = {"results": out / RESULTS_FILE, "csv": out / COMPARE_CSV, "json": out / COMPARE_JSON,
             "figure": out / COMPARE_FIGURE, "maps": out / COMPARE_MAPS}
    if dist.index == 0:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["point", "method", "scorer", "stages", "merge", "budget", "n", metric, "delta_points",
                    *_CSV_STATS, "flops_ratio"])
        for r in [base, *records]:
            spec = r.get("spec") or {}
            stages = ";".join(f"{x}:{k:g}" for x, k in PruneSpec.from_dict(spec).stages) if spec else ""
            w.writerow([r["point"], r.get("method") or "", spec.get("rank", ""), stages, spec.get("merge", ""),
                        "" if r.get("budget") is None else f"{r['budget']:g}", r["n"], _fmt(r["value"]),
                        _fmt(None if r["value"] is None else (r["value"] - base["value"]) * 100.0),
                        *(_fmt(r.get(k)) for k in _CSV_STATS),
                        _fmt(r["flops_per_answer"] / base["flops_per_answer"])])
        atomic_write_text(files["csv"], buf.getvalue())
        summary = {
            "task": config.task, "metric": metric, "higher_is_better": higher, "budgets": list(budgets),
            "methods": {m.name: m.text for m in methods}, "baseline": base, "points": records,
            "map_budget": map_budget, "maps": maps,
            "definitions": {
                "budget": "keep fraction of the prompt's image tokens after the last stage (a schedule is scaled so "
                          "that its last stage keeps it)",
                "layer_tokens": "mean prompt tokens each decoder layer held at the prefill",
                "flops_per_answer": "flowkern.flops.answer_flops: language model only, prefill + decode, linear "
                                    "layers x tokens present + causal attention over the keys present",
                "prefill_seconds": "sum over batches of the measured prefill wall time (vision tower included)",
                "decode_tokens_per_second": "decode tokens / decode wall time, over all batches",
                "maps": "per method at map_budget: fraction of answers keeping each cell of the image grid"}}
        atomic_write_json(files["json"], summary)
        title = f"{config.task}: {Path(str(config.model).rstrip('/')).name}"
        series = {m.name: [(done[grid[m.name, b].name]["flops_per_answer"],
                            done[grid[m.name, b].name]["kept_image_tokens"], done[grid[m.name, b].name]["value"])
                           for b in budgets] for m in methods}
        fig = plot_pareto(series, (base["flops_per_answer"], base["kept_image_tokens"], base["value"]),
                          metric=metric, higher_is_better=higher, title=title)
        atomic_savefig(fig, files["figure"])
        if maps.get("maps"):
            fig = plot_keep_maps({k: np.array([[np.nan if v is None else v for v in row] for row in g])
                                  for k, g in maps["maps"].items()}, budget=map_budget, title=title)
            atomic_savefig(fig, files["maps"])
    return CompareResult(out=out, baseline=base, points=records, maps=maps, generated=0, seconds=0.0, files=files)


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.6g}" if isinstance(value, float) else str(value)
