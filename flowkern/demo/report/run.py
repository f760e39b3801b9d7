"""One ``flowkern demo`` run: the stages in order, the records, and the report folder written at once.

:func:`run_demo` checks the options, loads the model, draws the shapes sets in a scratch folder, runs the stages of
:mod:`flowkern.demo.report.stages`, builds the :class:`flowkern.demo.report.records.DemoSummary`, draws the figures
and writes the tables, ``summary.json`` and ``report.html`` through :class:`flowkern._io.AtomicDir`.
"""

from __future__ import annotations

import contextlib
import os
import platform
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import flowkern.demo.report.knockout as knockout
import flowkern.demo.report.methods as methods
import flowkern.demo.report.stages as stages
from flowkern.demo.report.config import (
    REPORT_FILE,
    SUMMARY_FILE,
    TASKS,
    DemoConfig,
    DemoSizes,
    check_config,
    tolerance_for,
)
from flowkern.demo.report.figures import draw_figures
from flowkern.demo.report.records import (
    DemoSummary,
    Environment,
    ModelFacts,
    Settings,
    SpeedRow,
    TaskResult,
    finite,
    to_json,
)
from flowkern.demo.report.render import render
from flowkern.demo.report.tables import tables, to_csv
from flowkern.demo.report.words import conclusions, headline

__all__ = ["DemoResult", "run_demo"]


@dataclass
class DemoResult:
    """What :func:`run_demo` wrote: the folder, the summary (``summary.json``'s content, with the examples' maps),
    its records, the wall time and the files."""

    out: Path
    summary: dict[str, Any]
    seconds: float
    files: list[str] = field(default_factory=list)
    records: DemoSummary | None = None

    @property
    def report(self) -> Path:
        """``out / report.html``."""
        return self.out / REPORT_FILE


class _Progress:
    """Stage lines on stderr (``flowkern demo: [2/5] ...``) and tqdm bars for the loops inside a stage."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled = enabled
        self.total = total
        self.index = 0
        self.t0 = time.perf_counter()
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str, what: str) -> Iterator[None]:
        self.index += 1
        if self.enabled:
            print(f"flowkern demo: [{self.index}/{self.total}] {what}  (at {time.perf_counter() - self.t0:.0f} s)",
                  file=sys.stderr, flush=True)
        start = time.perf_counter()
        yield
        self.timings[name] = round(time.perf_counter() - start, 2)

    def bar(self, total: int, desc: str, unit: str) -> Any:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, disable=not self.enabled, dynamic_ncols=True, leave=False)


@dataclass
class _Run:
    """What the stages of one run share: the options, the model, the folders and the progress display."""

    config: DemoConfig
    sizes: DemoSizes
    model: Any
    processor: Any
    model_id: str
    facts: ModelFacts
    tmp: Path
    scratch: Path
    steps: _Progress
    progress: bool


def run_demo(config: DemoConfig, *, model: Any = None, processor: Any = None, progress: bool = True) -> DemoResult:
    """Run the demo and write the report folder (see :mod:`flowkern.demo.report`).

    Args:
        config: the options (:class:`flowkern.demo.report.config.DemoConfig`).
        model, processor: the model already loaded by :func:`flowkern.demo.report.stages.load` (None: loaded here).
        progress: stage lines and tqdm bars on stderr.

    Returns:
        a :class:`DemoResult`.

    Raises:
        ValueError / FileNotFoundError: a bad option, an output folder that cannot be written, a model that cannot
            be loaded or has too few image tokens for ``keep`` -- all before anything is written.
    """
    import torch

    from flowkern import _io, _version

    start = time.perf_counter()
    target = check_config(config)
    model_id = stages.model_id_of(config)
    old_threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        if model is None or processor is None:
            model, processor = stages.load(config)
        image_tokens = stages.check_model(config, model, processor)
        facts = stages.model_facts(model, model_id, config.model, image_tokens)
        steps = _Progress(progress, 8)
        info = dict(command="flowkern demo", config=to_json(asdict(replace(config, out=str(target)))),
                    flowkern=_version.__version__)
        with _io.AtomicDir(target, info=info) as tmp, _scratch(Path(tmp)) as scratch:
            run = _Run(config, config.resolved_sizes(), model, processor, model_id, facts, Path(tmp), Path(scratch),
                       steps, progress)
            summary = replace(_measure(run), timings=dict(steps.timings, total=round(time.perf_counter() - start, 2)))
            with steps.stage("write", "writing the report"):
                summary = write(Path(tmp), summary)
            files = sorted(str(p.relative_to(tmp)) for p in Path(tmp).rglob("*") if p.is_file())
    finally:
        torch.set_num_threads(old_threads)
    return DemoResult(out=target, summary=summary.to_json(), seconds=time.perf_counter() - start, files=files,
                      records=summary)


@contextlib.contextmanager
def _scratch(tmp: Path) -> Iterator[Path]:
    """A scratch folder for the shapes sets inside the report's temporary folder, removed before the report is put in
    place; a killed run's goes with its temporary folder (removed by the next run on the same ``--out``)."""
    import shutil

    scratch = tmp / ".scratch"
    scratch.mkdir()
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _measure(run: _Run) -> DemoSummary:
    """The five analysis stages and the records; the figures need the shapes images, so they are drawn here too."""
    loaded = _draw_sets(run)
    attention = _attention(run, loaded)
    cams = _cams(run, attention)
    truncation = _truncation(run, loaded)
    knocked = _knockout(run, loaded)
    compared = _methods(run)
    tasks = {t.world: stages.task_result(t, loaded[t.world][0].samples, truncation[t.world], attention[t.world],
                                         shapes_command=_shapes_command(run, t.world))
             for t in TASKS}
    speed, speed_note = _speed(run, loaded, tasks)
    summary = DemoSummary(settings=_settings(run), environment=_environment(), model=run.facts, tasks=tasks,
                          speed=speed, speed_note=speed_note,
                          examples={t.world: stages.example_records(t, attention[t.world].examples, cams[t.world])
                                    for t in TASKS}, methods=compared.result)
    summary = replace(summary, headline=headline(summary),
                      conclusions=[*conclusions(summary), *knocked.conclusions, *compared.conclusions])
    summary = replace(summary, figures=[*draw_figures(run.tmp / "figures", summary, attention, cams),
                                        *knocked.figures, *compared.figures])
    return finite(summary)


def _draw_sets(run: _Run) -> dict[str, tuple[Any, Path, Path | None]]:
    """Write the four shapes sets into the scratch folder; per world the loaded task, its folder and images."""
    from flowkern import shapes as world
    from flowkern.eval import get_task

    loaded = {}
    with run.steps.stage("data", f"drawing the shapes sets (seed {run.config.seed})"):
        for t in TASKS:
            folder = run.scratch / t.world
            world.write_task(t.world, folder, seed=run.config.seed, num=run.sizes.images[t.world])
            images = folder / "images" if t.loader == "pope" else None
            loaded[t.world] = (get_task(t.loader, folder, images), folder, images)
    return loaded


def _max_new(loader: str) -> int:
    from flowkern.demo.quality import MAX_NEW_TOKENS

    return MAX_NEW_TOKENS[loader]


def _attention(run: _Run, loaded: Mapping[str, Any]) -> dict[str, stages.AttentionResult]:
    sizes = run.sizes
    out = {}
    with run.steps.stage("attention", f"attention shares per layer, {sizes.trace} questions per task "
                                      "(flowkern.trace)"):
        total = sum(min(sizes.trace, len(loaded[t.world][0].samples)) for t in TASKS)
        with run.steps.bar(total, "trace", "q") as bar:
            for t in TASKS:
                out[t.world] = stages.attention_stage(
                    run.model, run.processor, stages.spread(loaded[t.world][0].samples, sizes.trace),
                    max_new_tokens=_max_new(t.loader), batch_size=sizes.batch_size,
                    examples=max(sizes.map_examples, sizes.cam_examples), bar=bar)
    return out


def _cams(run: _Run, attention: Mapping[str, stages.AttentionResult]) -> dict[str, list[stages.CamResult]]:
    sizes = run.sizes
    out = {}
    with run.steps.stage("cam", f"LLaVA-CAM, {sizes.cam_examples} questions per task ({sizes.cam_samples} noisy "
                                "copies)"):
        with run.steps.bar(sizes.cam_examples * len(TASKS), "cam", "q") as bar:
            for t in TASKS:
                picks = [e.sample for e in attention[t.world].examples[:sizes.cam_examples]]
                out[t.world] = stages.cam_stage(run.model, run.processor, picks, max_new_tokens=_max_new(t.loader),
                                                copies=sizes.cam_samples, bar=bar)
    return out


def _truncation(run: _Run, loaded: Mapping[str, Any]) -> dict[str, stages.TruncationResult]:
    config = run.config
    out = {}
    with run.steps.stage("truncation", f"truncation sweeps over all {run.facts.num_layers} layers: k = 0, and keep "
                                       f"{config.keep} by attention vs random"):
        for t in TASKS:
            task, folder, images = loaded[t.world]
            out[t.world] = stages.truncation_stage(
                run.model, run.processor, t, model_id=run.model_id, data=folder, images=images,
                out=run.tmp / "sweeps" / t.world, keep=config.keep, tolerance=tolerance_for(config, len(task.samples)),
                batch_size=run.sizes.batch_size, max_new_tokens=_max_new(t.loader), device=config.device,
                progress=run.progress)
    return out


def _knockout(run: _Run, loaded: Mapping[str, Any]) -> knockout.KnockoutSection:
    with run.steps.stage("knockout", "attention knockout: the CVPR four edges in windows over the depth"):
        return knockout.knockout_stage(
            run.model, run.processor, loaded, tmp=run.tmp, model_id=run.model_id, quick=run.config.quick,
            batch_size=run.sizes.batch_size, max_new_tokens={t.loader: _max_new(t.loader) for t in TASKS},
            device=run.config.device, progress=run.progress)


def _methods(run: _Run) -> methods.MethodsSection:
    with run.steps.stage("methods", f"pruning methods: {len(methods.BUILT_INS)} scorers at keep "
                                    f"{', '.join(f'{b:g}' for b in methods.BUDGETS)} on "
                                    f"{methods.describe(run.config.quick)}"):
        return methods.methods_stage(
            run.model, run.processor, scratch=run.scratch, seed=run.config.seed, tmp=run.tmp, model_id=run.model_id,
            quick=run.config.quick,
            max_new_tokens={t.loader: _max_new(t.loader) for t in TASKS}, device=run.config.device,
            progress=run.progress)


def _speed(run: _Run, loaded: Mapping[str, Any],
           tasks: Mapping[str, TaskResult]) -> tuple[list[SpeedRow], str | None]:
    """Time each task with a cliff pruned there (no cliff anywhere: the middle layer)."""
    sizes = run.sizes
    points: list[tuple[str, int, Sequence[Any]]] = [
        (t.label, tasks[t.world].cliff_layer, loaded[t.world][0].samples) for t in TASKS
        if tasks[t.world].cliff_layer is not None]
    notes = []
    if not points:
        mid = run.facts.num_layers // 2
        points = [(TASKS[0].label, mid, loaded[TASKS[0].world][0].samples)]
        notes.append(f"no task has a cliff layer; timed at the middle layer L = {mid} for scale")
    runs = len(points) * len(sizes.speed_batches) * 2 * (sizes.speed_repeats + 1)
    with run.steps.stage("speed", f"speed: pruned at the cliff layer vs unpruned ({runs} timed generate calls)"):
        with run.steps.bar(runs, "speed", "run") as bar:
            rows = stages.speed_stage(run.model, run.processor, points, batches=sizes.speed_batches,
                                      new_tokens=sizes.speed_new_tokens, repeats=sizes.speed_repeats, bar=bar)
    cliff_of = {t.label: tasks[t.world].cliff_layer for t in TASKS}
    return [replace(r, cliff_layer=cliff_of.get(r.task)) for r in rows], "; ".join(notes) or None


def _shapes_command(run: _Run, world: str) -> str:
    return (f"flowkern shapes --task {world} --seed {run.config.seed} --num {run.sizes.images[world]} "
            f"--out shapes-{world}")


def _settings(run: _Run) -> Settings:
    import torch

    config = run.config
    return Settings(quick=config.sizes is None and config.quick, seed=config.seed, keep=config.keep,
                    tolerance=config.tolerance, tolerance_rule="per task max(1, 100 / n) points"
                    if config.tolerance is None else f"{config.tolerance:g} points for every task",
                    threads=torch.get_num_threads(), device=config.device, sizes=run.sizes,
                    max_new_tokens={t.world: _max_new(t.loader) for t in TASKS})


def _environment() -> Environment:
    import torch

    from flowkern import _version

    load_average = None
    with contextlib.suppress(OSError, AttributeError):
        load_average = [round(x, 2) for x in os.getloadavg()]
    return Environment(flowkern=_version.__version__, torch=torch.__version__, python=platform.python_version(),
                       machine=platform.machine(), cpu_count=os.cpu_count(), platform=platform.platform(),
                       load_average=load_average, created=time.strftime("%Y-%m-%d %H:%M:%S"))


def write(tmp: Path, summary: DemoSummary) -> DemoSummary:
    """Write the tables (CSV + JSON), ``tables/examples.json``, ``summary.json`` and ``report.html`` into ``tmp``
    (the figures are already there); returns ``summary`` with its ``tables`` set."""
    from flowkern import _io

    written = []
    tdir = tmp / "tables"
    for name, rows in tables(summary).items():
        _io.atomic_write_text(tdir / f"{name}.csv", to_csv(rows))
        header, body = rows[0], rows[1:]
        _io.atomic_write_json(tdir / f"{name}.json", to_json([dict(zip(header, r, strict=True)) for r in body]))
        written += [f"tables/{name}.csv", f"tables/{name}.json"]
    _io.atomic_write_json(tdir / "examples.json", to_json(summary.examples))
    written.append("tables/examples.json")
    summary = replace(summary, tables=written)
    _io.atomic_write_json(tmp / SUMMARY_FILE, summary.to_json(maps=False))
    _io.atomic_write_text(tmp / REPORT_FILE, render(summary, tmp))
    return summary
