"""The sweep's engine: the points' answers, batch by batch over every point that still needs the batch, sharing
what the points compute alike (:mod:`flowkern.hf.reuse`), written as ``flowkern eval`` output folders and scored;
:func:`run_sweep` drives it with the cliff search (:func:`flowkern.eval.sweep.cliff.search_cliff`)."""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flowkern.eval.answers import ANSWERS_FILE, answer_record, append_lines
from flowkern.eval.run import EvalConfig, EvalPlan, EvalUsageError, generate_answers, prepare
from flowkern.eval.sweep.cliff import search_cliff
from flowkern.eval.sweep.dist import Dist
from flowkern.eval.sweep.files import (
    POINTS_DIR,
    RESULTS_FILE,
    SHARDS_DIR,
    checkpoint_layers,
    claim_out,
    read_results,
    start_sweep,
    write_outputs,
)
from flowkern.eval.sweep.points import (
    MAIN_METRIC,
    Point,
    SweepConfig,
    SweepResult,
    SweepUsageError,
    check_config,
    check_inputs,
    main_rank,
    parse_layer_spec,
    ranks_at,
    series,
    series_points,
    sweep_settings,
)
from flowkern.eval.tasks.parquet import open_images
from flowkern.hf.inputs import build_inputs
from flowkern.plan import PruneSpec

if TYPE_CHECKING:
    from flowkern.hf.reuse import ImageCache, PrefixShare

__all__ = ["run_sweep", "Engine"]


class Engine:
    """One sweep run: points, their plans and writers, the model, the progress bar.

    Attributes:
        config, dist, out: the options, the processes (:class:`flowkern.eval.sweep.dist.Dist`), the folder.
        model, processor: loaded on the first work (:meth:`load_model`) unless given.
        generated: (point, question) answers generated so far by this process.
    """

    def __init__(self, config: SweepConfig, dist: Dist, model: Any = None, processor: Any = None) -> None:
        self.config = config
        self.dist = dist
        self.out = Path(config.out).expanduser().absolute()
        self.model: Any = None
        self.processor: Any = None
        self.share: PrefixShare | None = None
        self.images: ImageCache | None = None
        self.generated = 0
        self.metric = MAIN_METRIC[config.task][0]
        if model is not None:
            self._set_model(model, processor)

    # -- configs ------------------------------------------------------------------------------------------

    def eval_config(self, point: Point, out: Path | None = None) -> EvalConfig:
        """The ``flowkern eval`` settings of ``point`` (its folder, or ``out``)."""
        c = self.config
        return EvalConfig(
            model=c.model, task=c.task, data=c.data, out=out or self.out / POINTS_DIR / point.name, images=c.images,
            limit=c.limit, batch_size=c.batch_size, max_new_tokens=c.max_new_tokens,
            prune=self.point_spec(point), strict=c.strict, split=c.split, ocr=c.ocr, device=self.dist.device,
            dtype=c.dtype, overwrite=False)

    def point_spec(self, point: Point) -> PruneSpec:
        """The pruning setting of ``point``: its own ``spec``, else the sweep's ``prune`` at its layer and rank
        (no pruning for the baseline)."""
        if point.spec is not None:
            return point.spec
        if point.layer is None:
            return PruneSpec()
        return replace(self.config.prune, layer=point.layer, rank=point.rank)

    def shard_dir(self, index: int) -> Path:
        """The folder process ``index`` appends its answers to under torchrun."""
        return self.out / SHARDS_DIR / f"rank{index}"

    # -- shards -------------------------------------------------------------------------------------------

    def merge_shards(self, points: Sequence[Point]) -> None:
        """Process 0: move every shard's answers of these points into the points' answer files, in question order."""
        from flowkern._io import atomic_write_text

        shards = sorted((self.out / SHARDS_DIR).glob("rank*")) if (self.out / SHARDS_DIR).is_dir() else []
        if not shards:
            return
        for point in points:
            files = [s / POINTS_DIR / point.name / ANSWERS_FILE for s in shards]
            files = [f for f in files if f.is_file() and f.stat().st_size]
            if not files:
                continue
            plan = prepare(self.eval_config(point))
            task, records = plan.task, {}
            main = plan.answers_path
            for f in ([main] if main.is_file() else []) + files:
                data = f.read_bytes()
                data = data[: data.rfind(b"\n") + 1]
                for raw in data.split(b"\n"):
                    if raw.strip():
                        obj = json.loads(raw)
                        records.setdefault(task.prediction_key(_prediction(task, obj)), obj)
            order = [s.key for s in plan.task.samples if s.key in records]
            replace(plan, fresh=not plan.answered, torn_line=plan.torn_line).start_files()
            atomic_write_text(main, "".join(json.dumps(records[k], ensure_ascii=False) + "\n" for k in order))
        for s in shards:
            for point in points:
                shutil.rmtree(s / POINTS_DIR / point.name, ignore_errors=True)

    # -- running points -----------------------------------------------------------------------------------

    def run_and_score(self, points: Sequence[Point], progress: bool) -> dict[str, dict[str, Any]]:
        """:meth:`run_points` then, once every process is done, :meth:`finish`: the scored records by point name
        (an input the eval refuses is a :class:`SweepUsageError`)."""
        try:
            self.run_points(points, progress)
        except EvalUsageError as exc:
            raise SweepUsageError(str(exc)) from None
        self.dist.barrier()
        return self.finish(points)

    def run_points(self, points: Sequence[Point], progress: bool) -> None:
        """Answer every remaining question of ``points`` (this process's batches), batch-major, sharing prefixes."""
        c, dist = self.config, self.dist
        if dist.index == 0:
            self.merge_shards(points)
        dist.barrier()
        plans = {p: prepare(self.eval_config(p)) for p in points}
        samples = next(iter(plans.values())).samples
        by_key = {s.key: s for s in samples}
        batch_of = {s.key: i // c.batch_size for i, s in enumerate(samples)}
        writers: dict[Point, EvalPlan] = {}
        todo: dict[Point, set[str]] = {}
        for p, plan in plans.items():
            keys = {s.key for s in plan.todo if batch_of[s.key] % dist.world == dist.index}
            if dist.world > 1:
                writer = prepare(self.eval_config(p, self.shard_dir(dist.index) / POINTS_DIR / p.name))
                keys -= writer.answered
            else:
                writer = plan
            if keys or dist.world == 1:
                writers[p] = writer
                todo[p] = keys
        work = sum(len(k) for k in todo.values())
        if work == 0:
            return
        self.load_model()
        for writer in writers.values():
            writer.start_files()
        model_id = Path(str(c.model).rstrip("/")).name or str(c.model)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=work, unit="answer", desc=f"sweep {c.task} ({len(todo)} points)", dynamic_ncols=True,
                       smoothing=0.05)
        n_batches = math.ceil(len(samples) / c.batch_size)
        max_new = plans[next(iter(plans))].settings["max_new_tokens"]
        task = plans[next(iter(plans))].task
        try:
            for j in range(n_batches):
                if j % dist.world != dist.index:
                    continue
                grid = samples[j * c.batch_size:(j + 1) * c.batch_size]
                groups: dict[tuple[str, ...], list[Point]] = {}
                for p, keys in todo.items():
                    sub = tuple(s.key for s in grid if s.key in keys)
                    if sub:
                        groups.setdefault(sub, []).append(p)
                for keys, group in groups.items():
                    batch = [by_key[k] for k in keys]
                    inputs = build_inputs(self.processor, self.model, open_images([s.image for s in batch]),
                                          [s.prompt for s in batch])
                    with contextlib.closing(self.run_group(group, batch, inputs, max_new)) as answered:
                        for p, texts, extras in answered:
                            append_lines(writers[p].answers_path, [
                                {**answer_record(task, s, t, model_id), **(extras[i] if extras else {})}
                                for i, (s, t) in enumerate(zip(batch, texts, strict=True))])
                            todo[p] -= set(keys)
                            self.generated += len(batch)
                            if bar is not None:
                                bar.set_postfix_str(f"{p.name}, batch {j + 1}/{n_batches}", refresh=False)
                                bar.update(len(batch))
        finally:
            if bar is not None:
                bar.close()
            if self.share is not None:
                self.share.clear()
            if self.images is not None:
                self.images.clear()

    def answer(self, p: Point, images: Sequence[Any], prompts: Sequence[str], inputs: Any,
               max_new: int) -> tuple[list[str], list[dict[str, Any]] | None]:
        """One batch's answers at point ``p`` and, per answer, extra fields for its answer-file line (None: none)."""
        from flowkern.prune import prune

        spec = self.point_spec(p)
        pruning = prune(self.model, spec) if spec.enabled else None
        return generate_answers(self.model, self.processor, images, prompts, max_new_tokens=max_new,
                                pruning=pruning, inputs=inputs), None

    def run_group(self, group: Sequence[Point], batch: Sequence[Any], inputs: Any,
                  max_new: int) -> Iterator[tuple[Point, list[str], list[dict[str, Any]] | None]]:
        """Answers (and :meth:`answer`'s extra fields) of one batch at each point of ``group``: the baseline first,
        then the other points by L descending, the first of those recording the shared prefix for the others
        (:class:`flowkern.hf.reuse.PrefixShare`). With reuse, the images are encoded once for all of them
        (:class:`flowkern.hf.reuse.ImageCache`; a point whose scorer reads the vision tower as it runs encodes them
        itself, :meth:`Point.reads_tower`) and the language model stays on the ``flowkern`` attention across the
        pruned points (each ``flowkern.prune`` would switch it there and back: the same computation, without the
        switches)."""
        from flowkern.hf.reuse import hold_attention

        images, prompts = [s.image for s in batch], [s.prompt for s in batch]

        def answer(p: Point) -> tuple[list[str], list[dict[str, Any]] | None]:
            with self.images.paused() if self.images is not None and p.reads_tower() else contextlib.nullcontext():
                return self.answer(p, images, prompts, inputs, max_new)

        reuse = self.config.reuse and self.share is not None
        pruned = sorted((p for p in group if p.layer is not None), key=lambda p: (-p.layer, p.depth()))
        with contextlib.ExitStack() as stack:
            if reuse and self.images is not None:
                stack.callback(self.images.clear)
                stack.enter_context(self.images.active())
            for p in group:
                if p.layer is None:
                    yield p, *answer(p)
            if not pruned:
                return
            first, rest = pruned[0], pruned[1:]
            depths = [p.depth() for p in rest if p.depth() >= 1]
            if not reuse:
                for p in pruned:
                    yield p, *answer(p)
                return
            stack.enter_context(hold_attention(self.model))
            if not depths:
                for p in pruned:
                    yield p, *answer(p)
                return
            assert self.share is not None
            stack.callback(self.share.clear)
            with self.share.capture(range(max(depths)), {d - 1 for d in depths}):
                texts = answer(first)
            yield first, *texts
            for p in rest:
                with self.share.replay(p.depth()):
                    texts = answer(p)
                yield p, *texts

    def load_model(self) -> None:
        """Load the model once (SweepUsageError for what the user can fix)."""
        if self.model is not None:
            return
        from flowkern.hf.loading import load_model

        try:
            self.model, self.processor = load_model(self.config.model, device=self.dist.device,
                                                    dtype=self.config.dtype)
        except (FileNotFoundError, ValueError, ImportError) as exc:
            raise SweepUsageError(str(exc)) from None
        self._set_model(self.model, self.processor)

    def _set_model(self, model: Any, processor: Any) -> None:
        from flowkern.hf.reuse import ImageCache, PrefixShare

        self.model, self.processor = model, processor
        self.share = PrefixShare(model) if self.config.reuse else None
        self.images = ImageCache(model) if self.config.reuse else None

    def num_layers(self) -> int:
        """Decoder layers of the model: from the checkpoint's config.json while no model is loaded (or loading it
        when that does not say)."""
        if self.model is None:
            n = checkpoint_layers(self.config.model)
            if n is not None:
                return n
            self.load_model()
        from flowkern.hf.models import get_adapter

        return len(get_adapter(self.model).decoder_layers(self.model))

    # -- results ------------------------------------------------------------------------------------------

    def finish(self, points: Sequence[Point]) -> dict[str, dict[str, Any]]:
        """Process 0: merge shards, score each point's answer file, write metrics.json, append results.jsonl."""
        from flowkern._io import atomic_write_json

        out: dict[str, dict[str, Any]] = {}
        if self.dist.index == 0:
            self.merge_shards(points)
            previous = read_results(self.out / RESULTS_FILE)
            lines = []
            for p in points:
                plan = prepare(self.eval_config(p))
                if plan.todo:
                    raise RuntimeError(f"flowkern sweep: point {p.name} still has {len(plan.todo)} questions to answer")
                metrics = plan.task.score(plan.task.read_predictions(plan.answers_path))
                atomic_write_json(plan.metrics_path, metrics)
                record = self.point_record(p, plan, metrics)
                if previous.get(p.name) != record:
                    lines.append(record)
                out[p.name] = record
            if lines:
                append_lines(self.out / RESULTS_FILE, lines)
        return self.dist.broadcast(out)

    def point_record(self, p: Point, plan: EvalPlan, metrics: dict[str, Any]) -> dict[str, Any]:
        """The results.jsonl record of a scored point."""
        return {"point": p.name, "series": p.series, "layer": p.layer, "rank": p.rank,
                "keep": self.config.prune.keep if p.layer is not None else None, "metric": self.metric,
                "value": metrics.get(self.metric), "n": metrics.get("n"),
                "answers": f"{POINTS_DIR}/{p.name}/{ANSWERS_FILE}", "metrics": metrics}




def _prediction(task: Any, obj: dict) -> Any:
    from flowkern.eval.tasks.base import Prediction

    return Prediction(obj[task.id_field], obj[task.text_field], obj)


def run_sweep(config: SweepConfig, *, model: Any = None, processor: Any = None,
              progress: bool = False) -> SweepResult:
    """Run (or resume) a sweep and write its results (see the module docstring).

    Args:
        config: what to sweep (:class:`SweepConfig`).
        model, processor: an already loaded model (None: loaded from ``config.model`` once there is work).
        progress: a tqdm bar over (point, question) answers with an ETA, on stderr.

    Returns:
        a :class:`SweepResult` (``cliff`` is also in ``<out>/cliff.json``).

    Raises:
        SweepUsageError: bad options, bad inputs (:func:`flowkern.eval.run.prepare`'s checks), an output folder
            that cannot be claimed (:func:`flowkern.eval.sweep.files.claim_out`) or other settings in ``out``;
            before any model is loaded.
    """
    check_config(config)
    dist = Dist(config.device)
    try:
        with claim_out(config, dist) or contextlib.nullcontext():
            result = _run(config, dist, model, processor, progress)
        # every process past its last collective before any tears the process group down: one that exits while
        # its peer still reads from it makes gloo abort the peer ("Connection closed by peer", SIGABRT)
        dist.barrier()
        return result
    finally:
        dist.close()


def _run(config: SweepConfig, dist: Dist, model: Any, processor: Any, progress: bool) -> SweepResult:
    start = time.perf_counter()
    engine = Engine(config, dist, model, processor)
    layers = parse_layer_spec(config.layers, engine.num_layers())
    main_layers = [x for x in layers if ranks_at(main_rank(config), x, config.prune.keep)]
    skipped = len(main_layers) < len(layers)
    if not main_layers:
        raise SweepUsageError(f"--layers: rank {main_rank(config)!r} with --keep != 0 needs layers >= 1 (it ranks by "
                              "the attention of layer L-1; layer 0 has no previous layer)")
    baseline = Point(None)
    try:
        first_plan = prepare(engine.eval_config(baseline))  # validates task, data, images, --out of a point
    except EvalUsageError as exc:
        raise SweepUsageError(str(exc)) from None
    check_inputs(config, first_plan, progress=progress and dist.index == 0)  # every image, --keep: before any write
    start_sweep(engine.out, config, dist, sweep_settings(config, first_plan))

    done: dict[str, dict[str, Any]] = {}
    main = series(config)[0][0]

    def evaluate(ls: Sequence[int | None]) -> dict[int | None, float]:
        points = ([baseline] if None in ls else []) + series_points(config, [x for x in ls if x is not None])
        done.update(engine.run_and_score(points, progress))
        return {x: done[baseline.name if x is None else Point(x, main, "main", config.prune.keep).name]["value"]
                for x in ls}

    _, _, search = search_cliff(main_layers, evaluate, mode=config.search, tolerance=config.tolerance)
    result = write_outputs(engine.out, config, dist, done, main_layers, series(config), search, skipped)
    result.generated = engine.generated
    result.seconds = time.perf_counter() - start
    return result
