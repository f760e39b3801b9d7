"""The report's pruning-methods section: the built-in scorers (:mod:`flowkern.scorers`) compared on every task at a
few budgets, through ``flowkern compare``'s engine (:class:`flowkern.eval.sweep.compare_engine.CompareEngine`), with
the kept-token maps and the verdicts computed from the numbers.

**The experiment.** Each task answers a small set of its own, drawn from the report's seed (:data:`IMAGES` images,
the first images of the report's sets; ``--quick``: fewer), unpruned (the baseline) and under every built-in scorer
at each of :data:`BUDGETS` (keep fractions of the image tokens). A scorer that can rank before the decoder
(:attr:`flowkern.scorers.Scorer.before_decoder`) prunes at layer 0: the tokens are removed before the first decoder
layer and the whole language model runs on the shorter sequence. The attention family, which ranks by the attention
of layer ``L - 1``, prunes at :data:`ATTENTION_LAYER`. Each point's uncertainty is the binomial standard error of its
metric over its ``n`` questions with the add-one estimate (:func:`standard_error`), so that 0 % and 100 % on a few
questions do not claim certainty.

**The verdicts.** :func:`methods_conclusions`: which method loses the least of the unpruned score at the smallest
budget, averaged over the tasks (and which are within two standard errors of it); and whether the attention
ranking's kept tokens lie lower on the image grid than the spatially uniform ``grid`` control's by more than two
standard errors and :data:`BIAS_MARGIN` (the FEATHER finding: FastV's criterion, through the rotary embedding,
favours the tokens that come last in the sequence, the image's last rows).

The compare folders go to ``sweeps/<task>-methods/`` beside the truncation sweeps (``points/<method>-keep<b>/``,
``results.jsonl``).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from flowkern.demo.report.config import TASKS
from flowkern.demo.report.records import Conclusion, FigureRecord, MethodsResult, MethodsTask, SpatialBias

__all__ = ["BUILT_INS", "ATTENTION_LAYER", "BUDGETS", "IMAGES", "SECTION", "TOPIC", "BIAS_TOPIC", "BIAS_MARGIN",
           "MethodsSection", "methods_stage", "describe", "method_layer", "standard_error", "spatial_bias", "losses",
           "methods_conclusions", "draw", "budget_curves", "keep_maps_grid", "methods_rows", "section_html"]

BUILT_INS = ("attention", "text-attention", "prerope-attention", "grid+attention", "diversity", "duplicates", "cls",
             "random", "grid", "none")
"""The scorers compared, in figure order (``union`` is left out: it combines two others)."""

ATTENTION_LAYER = 2
"""The decoder layer of the scorers that rank by the previous layer's attention (FastV's K = 2)."""

BUDGETS = (0.5, 0.125)
"""Keep fractions of the image tokens (the demo model's 64: 32 and 8 tokens); the maps are drawn at the smallest."""

IMAGES = {"full": {"pope": 3, "sqa": 20, "textvqa": 20, "caption": 8},
          "quick": {"pope": 2, "sqa": 8, "textvqa": 8, "caption": 4}}
"""Images per task world of the comparison's sets (POPE asks 6 questions per image; a caption costs up to 48 new
tokens, an answer 3 or 4)."""

SECTION = "methods"
"""The report section (and figure section)."""

TOPIC = "pruning methods"
BIAS_TOPIC = "spatial bias of attention ranking"
"""The topics of the verdict sentences among the report's conclusions."""

BIAS_MARGIN = 0.05
"""Fractions of the image height by which attention's kept tokens must lie lower than grid's to count as a bias."""

_LAST = 0.75
"""Rows whose centre lies below this fraction of the image height are its "last quarter"."""


@dataclass
class MethodsSection:
    """What the methods stage produced: the record, its figures and its sentences."""

    result: MethodsResult
    figures: list[FigureRecord] = field(default_factory=list)
    conclusions: list[Conclusion] = field(default_factory=list)


def standard_error(value: float, n: int) -> float:
    """The binomial standard error, in points, of a ratio metric ``value`` measured on ``n`` questions, with the
    add-one estimate ``p = (value * n + 1) / (n + 2)``: ``100 * sqrt(p (1 - p) / n)`` (for F1 an approximation)."""
    n = max(1, int(n))
    p = (min(1.0, max(0.0, float(value))) * n + 1.0) / (n + 2.0)
    return 100.0 * math.sqrt(p * (1.0 - p) / n)


def method_layer(rank: str, num_layers: int) -> int:
    """The decoder layer a built-in scorer prunes at: 0 when it can rank before the decoder, else
    :data:`ATTENTION_LAYER` (the last layer on a model with fewer layers)."""
    from flowkern.scorers import get_scorer

    return 0 if get_scorer(rank).before_decoder else min(ATTENTION_LAYER, num_layers - 1)


def _folder_name(rank: str) -> str:
    return rank.replace("+", "_")


def describe(quick: bool) -> str:
    """The sets' sizes in words (the stage's progress line)."""
    sizes = IMAGES["quick" if quick else "full"]
    return (f"{sizes['pope']} POPE images ({6 * sizes['pope']} questions), {sizes['sqa']} SQA problems, "
            f"{sizes['textvqa']} TextVQA labels, {sizes['caption']} captions")


def methods_stage(model: Any, processor: Any, *, scratch: Path, seed: int, tmp: Path, model_id: str, quick: bool,
                  max_new_tokens: Mapping[str, int], device: str, progress: bool) -> MethodsSection:
    """Draw the comparison's shapes sets into ``scratch``, compare the built-in scorers on each into
    ``tmp / "sweeps"`` and draw the figures into ``tmp / "figures"``.

    Args:
        seed: the shapes seed (the sets are the first :data:`IMAGES` images of the report's sets).
        max_new_tokens: per task loader, the answer length limit.
    """
    from flowkern import shapes as world
    from flowkern.eval import get_task
    from flowkern.eval.sweep.compare import Method
    from flowkern.hf.models import get_adapter
    from flowkern.plan import PruneSpec
    from flowkern.prune import prune

    start = time.perf_counter()
    num_layers = len(get_adapter(model).decoder_layers(model))
    methods, specs, skipped = [], {}, {}
    for rank in BUILT_INS:
        layer = method_layer(rank, num_layers)
        try:  # the model may refuse a scorer (cls on a tower without [CLS]): said in the section, not fatal
            prune(model, PruneSpec(layer=layer, keep=BUDGETS[-1], rank=rank))
        except (ValueError, NotImplementedError) as exc:
            skipped[rank] = str(exc)
            continue
        methods.append(Method(_folder_name(rank), rank, layer))
        specs[rank] = f"{rank}@{layer}"
    sizes = IMAGES["quick" if quick else "full"]
    tasks, grids = {}, {}
    for t in TASKS:
        # a set of its own, not a prefix of the report's: the engine reads its task file at every point
        folder = scratch / f"methods-{t.world}"
        world.write_task(t.world, folder, seed=seed, num=sizes[t.world])
        images = folder / "images" if t.loader == "pope" else None
        n = len(get_task(t.loader, folder, images).samples)
        tasks[t.world], grids[t.world] = _compare_task(
            model, processor, t, methods, model_id=model_id, data=folder, images=images,
            out=tmp / "sweeps" / f"{t.world}-methods", n=n, max_new_tokens=max_new_tokens[t.loader], device=device,
            progress=progress)
    bias = {m.rank: spatial_bias([g for per_task in grids.values() for g in per_task.get(m.rank, [])])
            for m in methods}
    result = MethodsResult(methods=specs, budgets=BUDGETS, map_budget=min(BUDGETS), tasks=tasks,
                           bias={k: v for k, v in bias.items() if v is not None}, skipped=skipped)
    section = MethodsSection(result=result)
    section.figures = draw(tmp / "figures", result)
    section.conclusions = methods_conclusions(result)
    section.result = replace(result, seconds=round(time.perf_counter() - start, 2))
    return section


def _compare_task(model: Any, processor: Any, t: Any, methods: Sequence[Any], *, model_id: str, data: Path,
                  images: Path | None, out: Path, n: int, max_new_tokens: int, device: str,
                  progress: bool) -> tuple[MethodsTask, dict[str, list[dict[str, Any]]]]:
    """One task's comparison on its ``n`` questions: the baseline and every method at every budget, one batch per
    point. Scorers that read the vision tower run without the shared image encoding
    (:class:`flowkern.hf.reuse.ImageCache` answers the later points from a memo, so the tower they listen to would
    not run); the others share it and the layers below their stage. Returns the task's record and, per scorer, the
    kept grids of its answers at the map budget."""
    from flowkern.eval.sweep.compare import CompareConfig, keep_maps, point_of
    from flowkern.eval.sweep.compare_engine import CompareEngine
    from flowkern.eval.sweep.dist import Dist
    from flowkern.eval.sweep.files import POINTS_DIR
    from flowkern.eval.sweep.points import MAIN_METRIC, Point
    from flowkern.scorers import get_scorer

    config = CompareConfig(model=model_id, task=t.loader, data=data, images=images, out=out,
                           methods=tuple(methods), budgets=BUDGETS, batch_size=n,
                           max_new_tokens=max_new_tokens, device=device, reuse=True)
    grid = {(m.rank, b): point_of(m, b, config.seed) for m in methods for b in BUDGETS}
    tower = {m.rank for m in methods if "cls_attention" in get_scorer(m.rank).needs}
    baseline = Point(None)
    done: dict[str, dict[str, Any]] = {}
    dist = Dist(device)
    try:
        for reuse, ranks in ((True, [m.rank for m in methods if m.rank not in tower]),
                             (False, [m.rank for m in methods if m.rank in tower])):
            points = ([baseline] if reuse else []) + [grid[r, b] for r in ranks for b in BUDGETS]
            if not points:
                continue
            engine = CompareEngine(replace(config, reuse=reuse), dist, model, processor)
            engine.methods = {grid[m.rank, b].name: m.name for m in methods for b in BUDGETS}
            engine.run_points(points, progress)
            done.update(engine.finish(points))
    finally:
        dist.close()
    metric, higher = MAIN_METRIC[t.loader]
    base = done[baseline.name]
    files = {m.rank: out / POINTS_DIR / grid[m.rank, min(BUDGETS)].name / "answers.jsonl" for m in methods}
    maps = keep_maps(files).get("maps", {})
    record = MethodsTask(
        label=t.label, metric=metric, higher_is_better=higher, n=int(base["n"]), baseline=base["value"],
        values={m.rank: {b: done[grid[m.rank, b].name]["value"] for b in BUDGETS} for m in methods},
        kept={m.rank: {b: done[grid[m.rank, b].name].get("kept_image_tokens") for b in BUDGETS} for m in methods},
        maps=maps)
    return record, {rank: _grids(path) for rank, path in files.items()}


def _grids(path: Path) -> list[dict[str, Any]]:
    """The ``grid`` field of each answer line of ``path`` (those that have one)."""
    out = []
    for raw in path.read_bytes().split(b"\n") if path.is_file() else []:
        g = json.loads(raw).get("grid") if raw.strip() else None
        if g:
            out.append(g)
    return out


def _cells(text: str, rows: int, cols: int) -> np.ndarray:
    """Hex bits (:func:`flowkern.eval.sweep.compare.bits`) as a bool ``[rows, cols]`` array."""
    return np.unpackbits(np.frombuffer(bytes.fromhex(text), dtype=np.uint8))[: rows * cols].reshape(rows, cols) > 0


def spatial_bias(grids: Sequence[Mapping[str, Any]]) -> SpatialBias | None:
    """Where the kept tokens lie, per answer then averaged (see :class:`flowkern.demo.report.records.SpatialBias`).

    Args:
        grids: answer lines' ``grid`` fields: ``{"shape": [rows, cols], "kept": hex bits, "present": hex bits}``.

    Returns:
        the record, or None when no answer kept a token.
    """
    offsets, last, uniform = [], [], []
    for g in grids:
        rows, cols = (int(x) for x in g["shape"])
        kept, present = _cells(g["kept"], rows, cols), _cells(g["present"], rows, cols)
        centre = (np.arange(rows)[:, None] + 0.5) / rows * np.ones((1, cols))  # each cell's row centre, [0, 1]
        if not kept.any() or not present.any():
            continue
        offsets.append(float(centre[kept].mean()) - 0.5)
        last.append(float((centre[kept] > _LAST).mean()))
        uniform.append(float((centre[present] > _LAST).mean()))
    if not offsets:
        return None

    def se(xs: list[float]) -> float:
        return float(np.std(xs, ddof=1) / math.sqrt(len(xs))) if len(xs) > 1 else 0.0

    return SpatialBias(row_offset=float(np.mean(offsets)), row_offset_se=se(offsets), last_rows=float(np.mean(last)),
                       last_rows_se=se(last), uniform=float(np.mean(uniform)), answers=len(offsets))


# ----------------------------------------------------------------------------------------------------------
# verdicts


def losses(result: MethodsResult, budget: float) -> dict[str, tuple[float, float]]:
    """Per method: the points of the unpruned score it loses at ``budget``, averaged over the tasks where it has a
    value (signed so that > 0 is worse: CHAIR's lower-is-better metric flipped), and the standard error of that mean
    (the points' binomial errors combined)."""
    out = {}
    for rank in result.methods:
        lost, var = [], []
        for t in result.tasks.values():
            v = t.values.get(rank, {}).get(budget)
            if v is None or t.baseline is None:
                continue
            sign = 1.0 if t.higher_is_better else -1.0
            lost.append(sign * (t.baseline - v) * 100.0)
            var.append(standard_error(v, t.n) ** 2)
        if lost:
            out[rank] = (sum(lost) / len(lost), math.sqrt(sum(var)) / len(var))
    return out


def _layer(result: MethodsResult, rank: str) -> str:
    """The decoder layer a method prunes at, from its ``SCORER@LAYER``."""
    return result.methods[rank].rpartition("@")[2]


def _fmt_loss(x: tuple[float, float]) -> str:
    return f"{x[0]:+.1f} \u00b1 {2 * x[1]:.1f} points"


def methods_conclusions(result: MethodsResult) -> list[Conclusion]:
    """The verdict sentences: the ranking at the smallest budget (a note) and the spatial bias of the attention
    ranking against the grid control (FEATHER's claim)."""
    return [_ranking(result), _bias(result)]


def _ranking(result: MethodsResult) -> Conclusion:
    budget = min(result.budgets)
    lost = losses(result, budget)
    if not lost:
        return Conclusion(TOPIC, "cannot tell", "No method has a score at the smallest budget.")
    order = sorted(lost, key=lambda r: lost[r][0])
    best = order[0]

    def close(r: str) -> bool:
        return lost[r][0] - lost[best][0] <= 2 * math.hypot(lost[r][1], lost[best][1])

    tied = [r for r in order[1:] if close(r)]
    image_tokens = next((k for t in result.tasks.values() for k in (t.kept.get(best, {}).get(budget),) if k), None)
    kept = "" if image_tokens is None else f", {image_tokens:.0f} image tokens"
    text = (f"At the smallest budget (keep {budget:g}{kept}), averaged over {len(result.tasks)} tasks, {best} "
            f"({result.methods[best]}) loses the least of the unpruned score ({_fmt_loss(lost[best])}, two standard "
            "errors; < 0: above it)" + "".join(f"; then {r} ({_fmt_loss(lost[r])})" for r in order[1:3])
            + f"; {order[-1]} loses the most ({_fmt_loss(lost[order[-1]])}). "
            + (f"Within two standard errors of {best}: {', '.join(tied)}. " if tied else
               f"Every other method is more than two standard errors behind {best}. "))
    pre = [r for r in order if _layer(result, r) == "0"]
    late = [r for r in order if not _layer(result, r) == "0"]
    if pre and late:
        a, b = pre[0], late[0]
        gap = lost[a][0] - lost[b][0]
        sure = abs(gap) > 2 * math.hypot(lost[a][1], lost[b][1])
        than = (f"{abs(gap):.1f} points {'more' if gap > 0 else 'less'} than" if round(gap, 1) else "as much as")
        text += (f"The best method that prunes before the decoder, {a}, loses {than} the best at layer "
                 f"{_layer(result, b)}, {b} (a difference {'beyond' if sure else 'within'} two standard errors). ")
    per_task = []
    for t in result.tasks.values():
        vals = {r: v[budget] for r, v in t.values.items() if v.get(budget) is not None}
        if vals and t.baseline is not None:
            top = (max if t.higher_is_better else min)(vals, key=lambda r: vals[r])
            ties = sum(v == vals[top] for v in vals.values()) - 1
            per_task.append(f"{t.label} {top}{f' and {ties} more' if ties else ''} ({vals[top] * 100:.1f} % vs "
                            f"{t.baseline * 100:.1f} % unpruned, n = {t.n})")
    text += "Best per task: " + "; ".join(per_task) + "."
    return Conclusion(TOPIC, "note", text)


def _bias(result: MethodsResult) -> Conclusion:
    att, grid = result.bias.get("attention"), result.bias.get("grid")
    budget = f"keep {result.map_budget:g}"
    if att is None or grid is None:
        return Conclusion(BIAS_TOPIC, "cannot tell", f"The attention ranking or the grid control kept no tokens "
                                                     f"at {budget}.")
    diff = att.row_offset - grid.row_offset
    se = math.hypot(att.row_offset_se, grid.row_offset_se)
    needed = max(2 * se, BIAS_MARGIN)
    lower = diff > needed
    verdict = "matches" if lower else "does not match"
    where = ("lower on the image (towards its last rows)" if lower else "higher on the image" if diff < -needed else
             "no lower on the image")

    def pos(b: SpatialBias) -> str:
        return (f"centre {b.row_offset * 100:+.1f} \u00b1 {2 * b.row_offset_se * 100:.1f} % of the height from the "
                f"middle, {b.last_rows * 100:.0f} % in the last quarter of the rows")

    others = [f"{r} {pos(result.bias[r])}" for r in ("prerope-attention", "text-attention", "grid+attention")
              if r in result.bias]
    text = (f"At {budget}, over {att.answers} answers, the tokens kept by attention (FastV) lie {where} than the grid "
            f"control's: attention {pos(att)}; grid {pos(grid)} (evenly spread: {grid.uniform * 100:.0f} %). The "
            f"difference, {diff * 100:+.1f} % of the height, {'exceeds' if lower else 'does not exceed'} two standard "
            f"errors and {BIAS_MARGIN * 100:g} % (FEATHER, ICCV 2025: through the rotary embedding, FastV's "
            "criterion favours the tokens that come last, the image's bottom rows)."
            + (" For comparison: " + "; ".join(others) + "." if others else ""))
    return Conclusion(BIAS_TOPIC, verdict, text)


# ----------------------------------------------------------------------------------------------------------
# figures, table, page


def draw(fdir: Path, result: MethodsResult) -> list[FigureRecord]:
    """The metric-against-budget figure and the kept-token maps (tasks x methods) into ``fdir``; their records."""
    fdir.mkdir(parents=True, exist_ok=True)
    budget_curves(result, fdir / "methods_budget.png")
    n = ", ".join(f"{t.label} {t.n}" for t in result.tasks.values())
    out = [FigureRecord(
        id="methods_budget", file="figures/methods_budget.png", section=SECTION,
        title="Pruning methods: the task metric against the budget",
        caption=f"Per task, each method's metric at each keep fraction of the image tokens (questions: {n}); error "
                "bars: two binomial standard errors (cut at 0 and 100 %); the dotted line and the star: the unpruned "
                "model on the same questions. Solid lines prune at layer 0 (before the decoder), dashed ones at layer "
                f"{ATTENTION_LAYER} (they rank by layer {ATTENTION_LAYER - 1}'s attention).")]
    if any(t.maps for t in result.tasks.values()):
        keep_maps_grid(result, fdir / "methods_maps.png")
        out.append(FigureRecord(
            id="methods_maps", file="figures/methods_maps.png", section=SECTION, title="Kept-token maps",
            caption=f"Per task (rows) and method (columns), the fraction of the task's answers that kept each cell "
                    f"of the image grid at keep {result.map_budget:g}. The grid is read row by row, "
                    "so its last rows come last in the sequence."))
    return out


def _figure(size: tuple[float, float]) -> Any:
    """A figure on its own Agg canvas without a layout engine (placed by hand: many small axes lay out slowly)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig


def keep_maps_grid(result: MethodsResult, path: Path) -> Any:
    """Tasks x methods heat maps of the kept-cell frequency (:attr:`MethodsTask.maps`, 0 to 1, NaN: no token), one
    colour bar; saved to ``path``. Returns the figure."""
    tasks = [t for t in result.tasks.values() if t.maps]
    ranks = [r for r in result.methods if any(r in t.maps for t in tasks)]
    fig = _figure((1.15 * len(ranks) + 1.6, 1.25 * len(tasks) + 0.7))
    axes = fig.subplots(len(tasks), len(ranks), squeeze=False)
    fig.subplots_adjust(left=0.06, right=0.9, top=0.86, bottom=0.02, wspace=0.08, hspace=0.12)
    image = None
    for i, t in enumerate(tasks):
        for j, rank in enumerate(ranks):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            grid = t.maps.get(rank)
            if grid is None:
                ax.set_visible(False)
                continue
            values = np.array([[np.nan if v is None else v for v in row] for row in grid], dtype=float)
            image = ax.imshow(np.ma.masked_invalid(values), vmin=0.0, vmax=1.0, cmap="viridis",
                              interpolation="nearest")
            if i == 0:
                ax.set_title(f"{rank}\n@ L{_layer(result, rank)}", fontsize=7)
            if j == 0:
                ax.set_ylabel(t.label, fontsize=7)
    if image is not None:
        bar = fig.add_axes((0.92, 0.1, 0.012, 0.7))
        fig.colorbar(image, cax=bar).set_label("fraction of answers keeping the cell", fontsize=7)
        bar.tick_params(labelsize=6)
    fig.suptitle(f"Where the kept image tokens lie, keep {result.map_budget:g}", fontsize=9)
    fig.savefig(path, dpi=100)
    return fig


def budget_curves(result: MethodsResult, path: Path) -> Any:
    """Per task (one axes each) the metric in percent against the keep fraction (log 2 axis), one line per method
    with two binomial standard errors as error bars, the unpruned score as a dotted line and a star at 1; saved to
    ``path``. Returns the figure (lines labelled by scorer)."""
    tasks = list(result.tasks.values())
    fig = _figure((3.0 * len(tasks) + 0.5, 3.9))
    axes = fig.subplots(1, len(tasks), squeeze=False)[0]
    fig.subplots_adjust(left=0.06, right=0.99, top=0.9, bottom=0.3, wspace=0.32)
    budgets = sorted(result.budgets)
    ranks = list(result.methods)
    for ax, t in zip(axes, tasks, strict=True):
        for i, rank in enumerate(ranks):
            vals = t.values.get(rank, {})
            pts = [(b, vals[b]) for b in budgets if vals.get(b) is not None]
            if not pts:
                continue
            shift = 2.0 ** ((i - (len(ranks) - 1) / 2) * 0.04)  # spread the points so that the error bars show
            ax.errorbar([b * shift for b, _ in pts], [v * 100 for _, v in pts],
                        yerr=_bars([v for _, v in pts], t.n), marker="o", markersize=3,
                        capsize=2, linewidth=1, color=f"C{i % 10}", label=f"{rank} @ L{_layer(result, rank)}",
                        linestyle="-" if _layer(result, rank) == "0" else "--")
        if t.baseline is not None:
            ax.axhline(t.baseline * 100, color="black", linewidth=0.8, linestyle=":")
            ax.plot([1.0], [t.baseline * 100], marker="*", markersize=10, color="black", linestyle="none",
                    label="unpruned")
        ax.set_xscale("log", base=2)
        ax.set_xticks([*budgets, 1.0], [f"{b:g}" for b in [*budgets, 1.0]])
        ax.minorticks_off()
        ax.set_title(f"{t.label} (n = {t.n})", fontsize="medium")
        ax.set_xlabel("keep fraction of the image tokens", fontsize="small")
        ax.set_ylabel(f"{t.metric} % ({'higher' if t.higher_is_better else 'lower'} is better)", fontsize="small")
        ax.grid(True, alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=6, fontsize="small", frameon=False)
    fig.savefig(path, dpi=100)
    return fig


def _bars(values: Sequence[float], n: int) -> list[list[float]]:
    """Error bars of two standard errors in points, below and above each value, cut at 0 and 100 %."""
    two = [2 * standard_error(v, n) for v in values]
    return [[min(e, v * 100) for v, e in zip(values, two, strict=True)],
            [min(e, 100 - v * 100) for v, e in zip(values, two, strict=True)]]


def methods_rows(result: MethodsResult) -> list[list[Any]]:
    """The ``methods`` table: per task, method and budget the metric, its binomial standard error and change from the
    unpruned score in points, and the image tokens kept (the baseline as method ``unpruned`` at budget 1)."""
    rows: list[list[Any]] = [["task", "method", "scorer_at_layer", "budget", "kept_image_tokens", "n", "metric",
                              "value", "se_points", "delta_points"]]
    for t in result.tasks.values():
        base = t.baseline
        if base is not None:
            rows.append([t.label, "unpruned", "", 1.0, None, t.n, t.metric, base, standard_error(base, t.n),
                         0.0])
        for rank, vals in t.values.items():
            for b in result.budgets:
                v = vals.get(b)
                rows.append([t.label, rank, result.methods.get(rank, ""), b, t.kept.get(rank, {}).get(b), t.n,
                             t.metric, v, None if v is None else standard_error(v, t.n),
                             None if v is None or base is None else (v - base) * 100.0])
    return rows


def section_html(result: MethodsResult | None, figures_html: str, found: Sequence[Conclusion], esc: Any,
                 table: Any) -> list[str]:
    """The report section (empty when the comparison did not run): the protocol, the figures, a table per budget
    and the verdicts (``esc``: the page's HTML escape; ``table(header, rows, left=, caption=)``: its table)."""
    if result is None:
        return []
    own = [c for c in found if c.topic in (TOPIC, BIAS_TOPIC)]
    ranks = list(result.methods)
    tasks = list(result.tasks.values())
    pre = ", ".join(r for r in ranks if _layer(result, r) == "0")
    late = ", ".join(r for r in ranks if not _layer(result, r) == "0")
    out = [f'<section id="{SECTION}"><h2>Pruning methods: the metric against the budget</h2>',
           "<p>Computed with <code>flowkern compare</code>'s engine on a small set per task, drawn from the "
           "report's seed (its first images; questions: " + esc(", ".join(f"{t.label} {t.n}" for t in tasks))
           + "), answered unpruned and under each built-in scorer at keep fractions "
           + esc(", ".join(f"{b:g}" for b in result.budgets)) + " of the image tokens. Before the decoder (layer 0: "
           f"the tokens are removed from the language model's input): {esc(pre)}. At layer {ATTENTION_LAYER} (ranked "
           f"by the attention of the layer before): {esc(late)}. Each value carries two binomial standard errors "
           "(\u00b1 2 SE, add-one estimate; for F1 an approximation): with this few questions only large differences "
           "are real. Every point's answers: <code>sweeps/&lt;task&gt;-methods/</code>.</p>"]
    if result.skipped:
        out.append("<p>Not run on this model: " + esc("; ".join(f"{r}: {why}" for r, why in result.skipped.items()))
                   + ".</p>")
    out.append(figures_html)
    for b in result.budgets:
        header = ["method", "layer", *(f"{t.label} {t.metric} %" for t in tasks)]
        rows = [["unpruned", "\u2013", *(_cell(t.baseline, t.n) for t in tasks)]]
        rows += [[r, _layer(result, r), *(_cell(t.values.get(r, {}).get(b), t.n) for t in tasks)]
                 for r in ranks]
        out.append(table(header, rows, left=1, caption=f"Keep {b:g} of the image tokens: metric \u00b1 two "
                                                       "standard errors, in percent."))
    if result.bias:
        out.append(table(["method", "layer", "centre below the middle, % of height", "in the last quarter of rows %",
                          "answers"],
                         [[r, _layer(result, r),
                           f"{b.row_offset * 100:+.1f} \u00b1 {2 * b.row_offset_se * 100:.1f}",
                           f"{b.last_rows * 100:.0f} \u00b1 {2 * b.last_rows_se * 100:.0f} (even: "
                           f"{b.uniform * 100:.0f})", b.answers] for r, b in result.bias.items()],
                         left=1, caption=f"Where the kept tokens lie at keep {result.map_budget:g}, over the answers "
                                         "of every task (\u00b1 two standard errors over the answers)."))
    out += ["<ul>" + "".join(f"<li><b>{esc(c.verdict)}</b>: {esc(c.text)}</li>" for c in own) + "</ul>",
            "</section>"]
    return out


def _cell(v: float | None, n: int) -> str:
    return "\u2013" if v is None else f"{v * 100:.1f} \u00b1 {2 * standard_error(v, n):.1f}"
