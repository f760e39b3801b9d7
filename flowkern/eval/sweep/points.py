"""What a sweep is made of: its options (:class:`SweepConfig`), its points (:class:`Point`), what it returns
(:class:`SweepResult`), the layers it covers (:func:`parse_layer_spec`) and the checks on its options."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path
from typing import Any

from flowkern.eval.run import EvalPlan, EvalUsageError
from flowkern.plan import PruneSpec, check_keep

__all__ = ["SweepUsageError", "Point", "RunOptions", "SweepConfig", "SweepResult", "MAIN_METRIC", "SWEEP_SETTINGS",
           "FLAGS", "parse_layer_spec", "check_config", "check_inputs", "sweep_settings", "main_rank", "series",
           "series_points", "ranks_at"]

MAIN_METRIC: dict[str, tuple[str, bool]] = {"pope": ("f1", True), "sqa": ("accuracy", True),
                                            "textvqa": ("accuracy", True), "chair": ("chair_s", False)}
"""Task -> (main metric, higher is better): the paper's Table 1 metrics."""

SWEEP_SETTINGS: tuple[str, ...] = ("model", "revision", "weights", "device", "dtype", "task", "data", "images",
                                   "prompts", "split", "ocr", "max_new_tokens", "keep", "rank", "seed", "prune_merge")
"""Settings that change a sweep's answers (:mod:`flowkern.identity`): a rerun under other values is refused."""

FLAGS = {"seed": "--seed"}
"""The options of the settings named otherwise than ``--<key with - for _>`` (:func:`flowkern.identity.flag`)."""


class SweepUsageError(EvalUsageError):
    """A mistake the user can fix (bad layers, other settings in --out, ...): one-line message."""


@dataclass(frozen=True)
class Point:
    """One point of a sweep: the baseline (``layer=None``), pruning from ``layer`` on with ``rank``, (``edge``
    set) the knockout of ``edge`` at layers ``layer .. layer + window - 1`` (:mod:`flowkern.eval.sweep.knockout`),
    or (``spec`` set) the whole pruning setting ``spec``, whose first stage is at ``layer``
    (:mod:`flowkern.eval.sweep.compare`).

    ``series`` is ``"baseline"``, ``"main"``, ``"control"``, ``"knockout"`` or ``"compare"``; ``label``, when set,
    is the point's folder name.
    """

    layer: int | None
    rank: str | None = None
    series: str = "baseline"
    keep: int | float = 0
    edge: str | None = None
    window: int = 0
    spec: PruneSpec | None = None
    label: str | None = None

    @property
    def name(self) -> str:
        """Folder name: ``label`` if set, else ``baseline``, ``L05`` (k = 0), ``L05-<rank>`` or, for a knockout,
        ``<src>-<dst>-L05``."""
        if self.label is not None:
            return self.label
        if self.layer is None:
            return "baseline"
        if self.edge is not None:
            return f"{self.edge.replace('->', '-')}-L{self.layer:02d}"
        return f"L{self.layer:02d}" if self.keep == 0 else f"L{self.layer:02d}-{self.rank}"

    def depth(self) -> int:
        """Decoder layers this point computes exactly like the unpruned prefill (and may skip when shared): a
        knockout's layers below its window; else the layers below ``layer`` (``spec``'s first stage), less the one
        before it when the scorer reads that layer's attention (and keeps some image tokens)."""
        if self.layer is None:
            return 0
        if self.edge is not None:
            return self.layer
        rank, keep = (self.rank, self.keep) if self.spec is None else (self.spec.rank, self.spec.stages[0][1])
        reads = keep != 0 and bool(_scorer_needs(rank) & {"attention", "prerope_attention"})
        return self.layer - 1 if reads else self.layer

    def reads_tower(self) -> bool:
        """Whether this point's scorer reads the vision tower while it encodes the images (``cls_attention``), so
        the tower must run at this point's own forward rather than be answered from a memo
        (:class:`flowkern.hf.reuse.ImageCache`)."""
        if self.layer is None or self.edge is not None:
            return False
        rank, keeps = (self.rank, [self.keep]) if self.spec is None else (
            self.spec.rank, [k for _, k in self.spec.stages])
        return any(k != 0 for k in keeps) and "cls_attention" in _scorer_needs(rank)


def _scorer_needs(rank: Any) -> frozenset[str]:
    """What the scorer ``rank`` reads (:attr:`flowkern.scorers.Scorer.needs`)."""
    from flowkern.scorers import get_scorer

    return frozenset(get_scorer(rank).needs)


@dataclass(frozen=True)
class RunOptions:
    """The options every command that answers a task over points shares (``flowkern sweep``, ``flowkern knockout``):
    the data, the output folder and how answers are generated. The base of :class:`SweepConfig` and
    :class:`flowkern.eval.sweep.knockout.KnockoutConfig`; the options after ``images`` are keyword-only.

    Attributes:
        model, task, data, images, limit, batch_size, max_new_tokens, strict, split, ocr, device, dtype: as for
            :class:`flowkern.eval.run.EvalConfig`.
        out: the command's folder (points/, results.jsonl, sweep.json and its own summary files).
        reuse: share the layers below each point's first changed layer (:class:`flowkern.hf.reuse.PrefixShare`)
            and the image encoding (:class:`flowkern.hf.reuse.ImageCache`) between points; False runs each point on
            its own.
        overwrite: discard the folder's previous run and start afresh.
    """

    model: str
    task: str
    data: str | os.PathLike[str]
    out: str | os.PathLike[str]
    images: str | os.PathLike[str] | None = None
    _: KW_ONLY
    limit: int | None = None
    batch_size: int = 1
    max_new_tokens: int | None = None
    strict: bool = False
    split: str | None = None
    ocr: bool = False
    device: str = "auto"
    dtype: str = "auto"
    reuse: bool = True
    overwrite: bool = False


@dataclass(frozen=True)
class SweepConfig(RunOptions):
    """What to sweep (the options of ``flowkern sweep``).

    Attributes (besides :class:`RunOptions`; ``out`` also gets summary.csv, cliff.json and sweep.png):
        layers: ``"all"``, or ranges and lists of 0-based decoder layers (``"0-31"``, ``"0,2,4,8-12"``), or a list.
        prune: the :class:`flowkern.plan.PruneSpec` applied at each swept layer (its ``layer`` and ``schedule`` stay
            None: the sweep sets the layer per point): ``keep`` (k = 0 drops every image token; ``rank`` is then
            moot), ``rank`` (a registered scorer name, :func:`flowkern.scorers.scorer_names`), ``seed``, ``merge``.
        controls: extra ranks (scorer names) run at the same layers and ``keep``, e.g. ``"random"`` or ``"grid"``;
            need ``keep != 0``. A rank that cannot rank before the decoder has no point at layer 0 (:func:`ranks_at`).
        search: ``"full"`` (every layer) or ``"bisect"``.
        tolerance: the cliff tolerance in points of the main metric (1 point = 0.01 of a ratio).
    """

    layers: str | Sequence[int] = "all"
    prune: PruneSpec = field(default_factory=PruneSpec)
    controls: tuple[str, ...] = ()
    search: str = "full"
    tolerance: float = 1.0


@dataclass
class SweepResult:
    """What :func:`run_sweep` produced (rank 0; other ranks get the same ``cliff`` and ``curve``)."""

    out: Path
    baseline: float | None
    curve: dict[int, float]
    controls: dict[str, dict[int, float]]
    cliff: dict[str, Any]
    points: list[dict[str, Any]]
    generated: int
    seconds: float
    files: dict[str, Path] = field(default_factory=dict)


def parse_layer_spec(spec: str | Sequence[int], num_layers: int) -> list[int]:
    """Sorted distinct 0-based layers from ``"all"``, ``"0-31"``, ``"0,2,4,8-12"`` or a list of ints.

    Raises:
        SweepUsageError: a malformed spec or a layer outside ``[0, num_layers)``.
    """
    if not isinstance(spec, str):
        layers = [int(x) for x in spec]
    elif spec.strip().lower() == "all":
        return list(range(num_layers))
    else:
        layers = []
        for part in spec.split(","):
            part = part.strip()
            if not part:
                continue
            lo, sep, hi = part.partition("-")
            try:
                a = int(lo)
                b = int(hi) if sep else a
            except ValueError:
                raise SweepUsageError(f"--layers {spec!r}: expected 'all' or comma-separated layers and ranges "
                                      f"such as 0-31 or 0,2,4,8-12") from None
            if b < a:
                raise SweepUsageError(f"--layers {spec!r}: range {part} goes backwards")
            layers.extend(range(a, b + 1))
    if not layers:
        raise SweepUsageError(f"--layers {spec!r}: no layer given")
    bad = [x for x in layers if not 0 <= x < num_layers]
    if bad:
        raise SweepUsageError(f"--layers: layer {bad[0]} is out of range; the model has {num_layers} decoder layers "
                              f"(0..{num_layers - 1})")
    return sorted(set(layers))



def check_config(config: SweepConfig) -> None:
    """Refuse bad options before any work.

    Raises:
        SweepUsageError: an unknown task, search, rank or control (any registered scorer name is known), a bad
            tolerance, controls with ``keep == 0``, a schedule (a sweep varies its one pruning layer).
    """
    from flowkern.eval import TASKS
    from flowkern.scorers import get_scorer

    if config.task not in TASKS:
        raise SweepUsageError(f"--task: unknown task {config.task!r} (choose from {', '.join(TASKS)})")
    if config.search not in ("full", "bisect"):
        raise SweepUsageError(f"--search {config.search!r}: expected full or bisect")
    if isinstance(config.tolerance, bool) or not isinstance(config.tolerance, int | float) or not (
            config.tolerance >= 0 and math.isfinite(config.tolerance)):
        raise SweepUsageError(f"--tolerance {config.tolerance!r}: expected a number of points >= 0")
    if config.prune.schedule is not None:
        raise SweepUsageError("--prune-schedule: a sweep varies the one layer it prunes from (one point per layer of "
                              "--layers), so it takes no schedule; compare schedules with flowkern compare")
    if config.prune.layer is not None or config.prune.when != "prefill":
        raise SweepUsageError("prune: the sweep sets the layer of each point and prunes at prefill; pass a PruneSpec "
                              f"with layer=None and when='prefill', got {config.prune}")
    names = _rank_names()
    if not isinstance(config.prune.rank, str):
        raise SweepUsageError(f"--rank {config.prune.rank!r}: a sweep names its points after the scorer, so it takes "
                              f"a registered name ({', '.join(names)}; flowkern.scorers.register makes one)")
    for flag, r in [("--control", r) for r in config.controls] + [("--rank", config.prune.rank)]:
        if r not in names:
            raise SweepUsageError(f"{flag} {r!r}: expected one of {', '.join(names)}")
        try:
            get_scorer(r)
        except ValueError as exc:  # a registered scorer whose parameters have no defaults (union)
            raise SweepUsageError(f"{flag} {r!r}: {exc}; register a scorer with default parameters for it") from None
    if config.controls and config.prune.keep == 0:
        raise SweepUsageError("--control needs --keep K (K != 0): with k = 0 every rank drops the same tokens")
    if config.prune.keep != 0 and config.prune.rank in config.controls:
        raise SweepUsageError(f"--control {config.prune.rank} is the main --rank already")
    if len(set(config.controls)) != len(config.controls):
        raise SweepUsageError(f"--control {','.join(config.controls)}: a rank is given twice")


def _rank_names() -> tuple[str, ...]:
    """The names ``--rank`` and ``--control`` take: the registered scorers (:func:`flowkern.scorers.scorer_names`)."""
    from flowkern.plan import RANKS
    from flowkern.scorers import scorer_names

    return tuple(dict.fromkeys(RANKS + scorer_names()))


def ranks_at(rank: str, layer: int, keep: int | float) -> bool:
    """Whether a sweep has a point of ``rank`` at ``layer``: every layer, except layer 0 for a scorer that cannot
    rank before the decoder (:attr:`flowkern.scorers.Scorer.before_decoder` False: it reads layer ``L-1``'s
    attention) when it ranks at all (``keep != 0``)."""
    from flowkern.scorers import get_scorer

    return layer != 0 or keep == 0 or get_scorer(rank).before_decoder


def check_inputs(config: SweepConfig, plan: EvalPlan, *, progress: bool = False,
                 keeps: Sequence[int | float] | None = None, flag: str = "--keep") -> None:
    """The checks of a sweep's inputs that need its questions, before a model is loaded and before anything is
    written: every selected question's image decoded fully (:func:`flowkern.hf.inputs.check_images`: any point may
    still need it), and ``--keep`` against the image tokens the model sees (:func:`flowkern.plan.check_keep`),
    counted on the first question by the model's processor alone (config and processor files, no weights; skipped
    when those cannot be read, which the model load then reports).

    Args:
        plan: the baseline point's :class:`flowkern.eval.run.EvalPlan` (the selected questions).
        keeps, flag: the keeps to check and their option (default ``config.prune.keep``, ``--keep``).

    Raises:
        SweepUsageError: an image that is not fully decodable; a ``--keep`` that keeps every image token.
    """
    from flowkern.eval.tasks.parquet import EmbeddedImage
    from flowkern.eval.tasks.parquet import check_images as check_embedded
    from flowkern.hf.inputs import check_images

    images = [s.image for s in plan.samples if s.image is not None]
    try:
        check_images([im for im in images if not isinstance(im, EmbeddedImage)], what="--images", progress=progress)
        check_embedded([im for im in images if isinstance(im, EmbeddedImage)])  # table cells (parquet data)
    except ValueError as exc:
        raise SweepUsageError(str(exc)) from None
    keeps = [k for k in (keeps if keeps is not None else [config.prune.keep]) if k != 0]
    if not keeps or not plan.samples:
        return
    count = _image_tokens(config.model, plan.samples[0])
    if count is not None:
        try:
            for keep in keeps:
                check_keep(keep, count, what=flag)
        except ValueError as exc:
            raise SweepUsageError(f"{exc} (counted on question {plan.samples[0].id!r})") from None


def _image_tokens(model: str, sample: Any) -> int | None:
    """Image tokens of ``sample``'s prompt for ``model`` from its config and processor (no weights), or None when
    they cannot be read."""
    import transformers

    from flowkern.eval.tasks.parquet import open_images
    from flowkern.hf.inputs import image_token_counts

    try:
        config = transformers.AutoConfig.from_pretrained(model, local_files_only=True)
        processor = transformers.AutoProcessor.from_pretrained(model, local_files_only=True)
        return image_token_counts(processor, config, open_images([sample.image]), [sample.prompt])[0]
    except Exception:  # noqa: BLE001 - any failure here is the model loader's to report, with its own message
        return None


def sweep_settings(config: SweepConfig, plan: EvalPlan) -> dict[str, Any]:
    """The :data:`SWEEP_SETTINGS` of a sweep (``plan``: the baseline point's, with the resolved defaults)."""
    pruning = {"keep": config.prune.keep, "rank": config.prune.rank if config.prune.keep != 0 else None,
               "seed": config.prune.seed, "prune_merge": config.prune.merge}
    return {k: pruning[k] if k in pruning else plan.settings[k] for k in SWEEP_SETTINGS}


def main_rank(config: SweepConfig) -> str:
    """The main series' rank: ``config.prune.rank``, or ``"none"`` when ``keep == 0`` (every image token is dropped)."""
    return config.prune.rank if config.prune.keep != 0 else "none"


def series(config: SweepConfig) -> list[tuple[str, str]]:
    """``(rank, "main" | "control")`` of each series: the main one first, then the controls."""
    return [(main_rank(config), "main")] + [(r, "control") for r in config.controls]


def series_points(config: SweepConfig, layers: Sequence[int]) -> list[Point]:
    """Every series' point at each of ``layers`` where its rank has one (:func:`ranks_at`)."""
    return [Point(x, r, s, config.prune.keep) for r, s in series(config) for x in layers
            if ranks_at(r, x, config.prune.keep)]
