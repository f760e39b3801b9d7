"""The records of a ``flowkern demo`` run: what the stages measured, as frozen dataclasses.

:class:`DemoSummary` holds everything the report shows: the settings, the machine, the model, one
:class:`TaskResult` per task, the :class:`SpeedRow` timings, the drawn :class:`Example` questions, the
:class:`Headline`, the :class:`Conclusion` sentences and the :class:`FigureRecord` of each figure. The tables, the
words and the HTML page are computed from it; ``summary.json`` is its :meth:`DemoSummary.to_json`.

Layer-indexed series (``curve``, ``attention_k``, ``random_k``) are ``{layer: value}`` with int keys; JSON writes
the keys as strings. Metrics are fractions in ``[0, 1]``; ``*_points`` values are percentage points.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from typing import Any

from flowkern.demo.report.config import DemoSizes

__all__ = ["TaskResult", "FlowResult", "SpeedRow", "ExampleCam", "Example", "Conclusion", "FigureRecord", "Headline",
           "Settings", "Environment", "ModelFacts", "MethodsTask", "SpatialBias", "MethodsResult", "DemoSummary",
           "finite", "to_json"]


@dataclass(frozen=True)
class FlowResult:
    """A task's flow analyses over its traced questions (each question weighs the same).

    Attributes:
        traced: questions traced.
        answer_prob: ``[num_layers]``: mean logit-lens probability, at the last prompt position, of the model's own
            first answer token (:func:`flowkern.lens`).
        answer_top1: ``[num_layers]``: fraction of questions whose lens top-1 there is that token.
        decodable_layer: the first layer from which ``answer_top1 >= 0.5`` at every later layer
            (:func:`flowkern.demo.report.flow.decodable_layer`).
        head_image: ``[num_layers][heads]``: image share of the answer's attention per head.
        segment_flow: ``[num_layers][4][4]``: mean mass from each query segment to each key segment
            (None where no question has a row of that segment).
    """

    traced: int
    answer_prob: Sequence[float]
    answer_top1: Sequence[float]
    decodable_layer: int | None
    head_image: Sequence[Sequence[float]]
    segment_flow: Sequence[Sequence[Sequence[float | None]]]


@dataclass(frozen=True)
class TaskResult:
    """One task's numbers: its truncation sweeps, cliff layers and attention shares.

    Attributes:
        label, kind, loader: the task (:class:`flowkern.demo.report.config.DemoTask`).
        metric, higher_is_better: the sweep's main metric and its direction.
        n: questions scored; tolerance: the cliff tolerance in points.
        baseline, baseline_metrics: the unpruned model's main metric and every metric.
        chance: the main metric of answering at random (None where it has no simple value).
        curve: ``{L: metric}`` with every image token dropped from layer L on (k = 0).
        attention_k, random_k: ``{L: metric}`` keeping ``keep`` image tokens ranked by attention / at random.
        keepk_baseline: the unpruned metric of the keep-K sweep.
        cliff_layer, no_harm_layer, monotone, note: the k = 0 sweep's cliff report.
        keepk_cliff, random_cliff: the cliff layers of the attention-ranked and random series.
        at_cliff, at_cliff_metrics: the main metric and every metric truncated at the cliff layer (None: no cliff).
        no_image: the metric with the image dropped from layer 0 on; image_effect_points: baseline minus it in
            points, signed so that > 0 means the image helps.
        se_points: the baseline's binomial standard error in points.
        shares: ``[num_layers][len(segment_names)]`` mean attention share of the answer; image_share, image_sd:
            its image column and the standard deviation of that over the questions; traced: questions traced.
        segment_names: the share columns (system / image / user / generated).
        shapes_command: the ``flowkern shapes`` command that redraws the task's set.
        sweep_seconds: wall time of the two sweeps.
        image_use: ``"clear"``, ``"weak"``, ``"none"`` or ``"hurts"``
            (:func:`flowkern.demo.report.words.image_use`).
        flow: the logit lens, per-head shares and segment flow of the traced questions (None: not measured).
    """

    label: str
    kind: str
    loader: str
    metric: str
    higher_is_better: bool
    n: int
    tolerance: float
    baseline: float | None
    baseline_metrics: Mapping[str, Any]
    chance: float | None
    curve: Mapping[int, float | None]
    attention_k: Mapping[int, float | None]
    random_k: Mapping[int, float | None]
    keepk_baseline: float | None
    cliff_layer: int | None
    no_harm_layer: int | None
    monotone: bool
    note: str | None
    keepk_cliff: int | None
    random_cliff: int | None
    at_cliff: float | None
    at_cliff_metrics: Mapping[str, Any] | None
    no_image: float | None
    image_effect_points: float | None
    se_points: float
    shares: Sequence[Sequence[float]]
    image_share: Sequence[float]
    image_sd: Sequence[float]
    traced: int
    segment_names: Sequence[str]
    shapes_command: str
    sweep_seconds: float
    image_use: str
    flow: FlowResult | None = None


@dataclass(frozen=True)
class SpeedRow:
    """Prefill time and decode speed of one task's prompts, pruned (k = 0) at ``layer`` vs unpruned; medians.

    ``label`` is ``"<task> L=<layer> B=<batch>"``; ``cliff_layer`` the task's cliff layer (``layer`` is the cliff
    layer, or the middle layer when no task has a cliff).
    """

    label: str
    task: str
    layer: int
    batch: int
    prompt_tokens: int
    unpruned_prefill_ms: float | None
    pruned_prefill_ms: float | None
    prefill_speedup: float | None
    unpruned_decode_tok_s: float | None
    pruned_decode_tok_s: float | None
    decode_speedup: float | None
    repeats: int
    new_tokens: int
    cliff_layer: int | None = None


@dataclass(frozen=True)
class ExampleCam:
    """LLaVA-CAM of an example: its answer, ``error`` when there was nothing to explain, the peaks
    ``(layer, row, col, value)`` and the ``[num_layers][gh][gw]`` maps (None with an error)."""

    answer: str
    error: str | None
    peaks: Sequence[Sequence[Any]]
    maps: Sequence[Any] | None


@dataclass(frozen=True)
class Example:
    """A drawn question: the sample ``id``, the image file name, question and answer as a person reads them, the
    reference, the image share per layer, the ``[num_layers][gh][gw]`` answer -> image maps and, where computed,
    its LLaVA-CAM."""

    id: str
    image: str
    question: str
    answer: str
    reference: str
    image_share: Sequence[float]
    attention_maps: Sequence[Any]
    cam: ExampleCam | None = None

    def to_json(self, *, maps: bool = True) -> dict[str, Any]:
        """The JSON record (``cam_*`` keys only where a LLaVA-CAM was computed; no ``*_maps`` unless ``maps``)."""
        out: dict[str, Any] = dict(id=self.id, image=self.image, question=self.question, answer=self.answer,
                                   reference=self.reference, image_share=self.image_share,
                                   attention_maps=self.attention_maps)
        if self.cam is not None:
            out.update(cam_answer=self.cam.answer, cam_error=self.cam.error, cam_peaks=self.cam.peaks,
                       cam_maps=self.cam.maps)
        return out if maps else {k: v for k, v in out.items() if not k.endswith("_maps")}


@dataclass(frozen=True)
class Conclusion:
    """One sentence of the plain-words section: ``topic``, ``verdict`` (one of
    :data:`flowkern.demo.report.words.VERDICTS`) and ``text``."""

    topic: str
    verdict: str
    text: str


@dataclass(frozen=True)
class FigureRecord:
    """A drawn figure: ``id``, ``file`` (relative to the report), ``section`` of the page, ``title``, ``caption``;
    ``half`` figures share a two-column row."""

    id: str
    file: str
    section: str
    title: str
    caption: str
    half: bool = False


@dataclass(frozen=True)
class Headline:
    """The numbers for a README, per task label: the cliff layer, the image use, the baseline, the metric, and the
    speed row at the largest timed batch."""

    cliff: Mapping[str, int | None]
    image_use: Mapping[str, str]
    baseline: Mapping[str, float | None]
    metric: Mapping[str, str]
    speed: Mapping[str, SpeedRow]

    def to_json(self) -> dict[str, Any]:
        """``speed`` reduced to ``batch``, ``layer``, ``cliff_layer``, ``prefill_speedup``, ``decode_speedup``."""
        keys = ("batch", "layer", "cliff_layer", "prefill_speedup", "decode_speedup")
        return dict(cliff=dict(self.cliff), image_use=dict(self.image_use), baseline=dict(self.baseline),
                    metric=dict(self.metric),
                    speed={label: {k: getattr(r, k) for k in keys} for label, r in self.speed.items()})


@dataclass(frozen=True)
class Settings:
    """How the run was made: ``quick`` (the QUICK sizes by name), the shapes ``seed``, ``keep``, the
    ``tolerance`` option and its rule in words, torch ``threads``, ``device``, the ``sizes`` and the
    ``max_new_tokens`` per task world."""

    quick: bool
    seed: int
    keep: int
    tolerance: float | None
    tolerance_rule: str
    threads: int
    device: str
    sizes: DemoSizes
    max_new_tokens: Mapping[str, int]


@dataclass(frozen=True)
class Environment:
    """The machine and versions of the run; ``created`` is a local ``%Y-%m-%d %H:%M:%S`` time."""

    flowkern: str
    torch: str
    python: str
    machine: str
    cpu_count: int | None
    platform: str
    load_average: Sequence[float] | None
    created: str


@dataclass(frozen=True)
class ModelFacts:
    """The model: the ``--model`` ``name``, its ``path``, ``model_type``, decoder layers, hidden size, parameter
    count and image tokens per image; attention heads per layer and the ``[layer, head]`` pairs its training guided
    (the model folder's ``training.json``; empty when it says none)."""

    name: str
    path: str
    model_type: str
    num_layers: int
    hidden_size: int
    parameters: int
    image_tokens: int
    num_heads: int = 0
    guided_heads: Sequence[Sequence[int]] = ()


@dataclass(frozen=True)
class MethodsTask:
    """One task of the pruning-methods comparison (:mod:`flowkern.demo.report.methods`).

    Attributes:
        label, metric, higher_is_better: the task, its main metric and the metric's direction.
        n: questions answered at every point (the first ``n`` of the task's set).
        baseline: the unpruned metric on those questions.
        values: method name -> ``{budget: metric}`` (None: the metric is undefined there).
        kept: method name -> ``{budget: mean image tokens kept}``.
        maps: method name -> ``[rows][cols]`` fraction of the answers keeping each image-grid cell at the map budget
            (None: no token there).
    """

    label: str
    metric: str
    higher_is_better: bool
    n: int
    baseline: float | None
    values: Mapping[str, Mapping[float, float | None]]
    kept: Mapping[str, Mapping[float, float]] = field(default_factory=dict)
    maps: Mapping[str, Sequence[Sequence[float | None]]] = field(default_factory=dict)


@dataclass(frozen=True)
class SpatialBias:
    """Where one method's kept image tokens lie on the image grid, over every answer of every task at the map budget.

    Attributes:
        row_offset: mean over the answers of the kept tokens' centre of mass, in fractions of the image height below
            the grid's centre (> 0: towards the last rows, which come last in the sequence); row_offset_se: its
            standard error over the answers.
        last_rows: mean fraction of the kept tokens in the last quarter of the rows; last_rows_se: its standard
            error; uniform: that fraction for tokens spread evenly over the grid.
        answers: answers counted.
    """

    row_offset: float
    row_offset_se: float
    last_rows: float
    last_rows_se: float
    uniform: float
    answers: int


@dataclass(frozen=True)
class MethodsResult:
    """The pruning-methods comparison: the built-in scorers at a few budgets on a subset of each task.

    Attributes:
        methods: method name -> ``SCORER@LAYER`` (``flowkern compare``'s notation), in figure order.
        budgets: keep fractions of the image tokens, largest first; map_budget: the kept-token maps' budget.
        tasks: per task world, its :class:`MethodsTask`.
        bias: method name -> its :class:`SpatialBias` (pooled over the tasks).
        skipped: method name -> why the model refused it.
        seconds: wall time of the comparison.
    """

    methods: Mapping[str, str]
    budgets: Sequence[float]
    map_budget: float
    tasks: Mapping[str, MethodsTask]
    bias: Mapping[str, SpatialBias] = field(default_factory=dict)
    skipped: Mapping[str, str] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass(frozen=True)
class DemoSummary:
    """Everything a run measured and the report shows (``summary.json``).

    ``tasks`` and ``examples`` are keyed by task world (``"pope"``, ``"sqa"``, ``"textvqa"``, ``"caption"``) in
    report order; ``timings`` are seconds per stage and ``total``; ``tables`` the table files written; ``methods``
    the pruning-methods comparison (None: not run).
    """

    settings: Settings
    environment: Environment
    model: ModelFacts
    tasks: Mapping[str, TaskResult]
    speed: Sequence[SpeedRow] = ()
    speed_note: str | None = None
    examples: Mapping[str, Sequence[Example]] = field(default_factory=dict)
    headline: Headline | None = None
    conclusions: Sequence[Conclusion] = ()
    figures: Sequence[FigureRecord] = ()
    timings: Mapping[str, float] = field(default_factory=dict)
    tables: Sequence[str] = ()
    methods: MethodsResult | None = None

    def to_json(self, *, maps: bool = True) -> dict[str, Any]:
        """The summary as JSON-ready data (:func:`to_json`); ``maps=False`` leaves the examples' maps out (as in
        ``summary.json``; ``tables/examples.json`` has them)."""
        out = {f.name: to_json(getattr(self, f.name)) for f in fields(self)}
        out["examples"] = {w: [e.to_json(maps=maps) for e in ex] for w, ex in self.examples.items()}
        out["examples"] = to_json(out["examples"])
        return out


def finite(x: Any) -> Any:
    """``x`` with every non-finite float replaced by None and NumPy scalars by Python numbers, recursively through
    records (same type), mappings (keys kept), lists and tuples."""
    if is_dataclass(x) and not isinstance(x, type):
        return replace(x, **{f.name: finite(getattr(x, f.name)) for f in fields(x)})
    if isinstance(x, Mapping):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return type(x)(finite(v) for v in x)
    if hasattr(x, "item") and not isinstance(x, str | bytes):
        with contextlib.suppress(Exception):
            x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def to_json(x: Any) -> Any:
    """JSON-ready data: records as dicts (their own ``to_json`` where they have one), string keys, NaN / inf ->
    None, NumPy scalars -> Python, sets sorted."""
    if is_dataclass(x) and not isinstance(x, type):
        own = getattr(x, "to_json", None)
        return to_json(own() if own is not None else asdict(x))
    if isinstance(x, Mapping):
        return {str(k): to_json(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [to_json(v) for v in x]
    if hasattr(x, "item") and not isinstance(x, str | bytes):
        with contextlib.suppress(Exception):
            x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, set | frozenset):
        return sorted(to_json(v) for v in x)
    return x
