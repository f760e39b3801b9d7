"""The figures of ``flowkern demo``'s report (matplotlib Agg figures, never ``pyplot``; see :mod:`flowkern.viz`).

:func:`draw_figures` draws every figure of a run into ``figures/`` and returns their
:class:`flowkern.demo.report.records.FigureRecord`. The multi-task figures (:func:`shares_by_task`,
:func:`image_share_by_task`, :func:`example_grid`, :func:`truncation_deltas`, :func:`speed_bars`) draw from plain
numbers and save a PNG at ``path``; figures, colours, saving, overlays and single-sweep plots come from
:mod:`flowkern.viz`.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from flowkern import viz
from flowkern.demo.report import flow
from flowkern.demo.report.config import TASKS, DemoTask
from flowkern.demo.report.records import DemoSummary, FigureRecord, SpeedRow
from flowkern.demo.report.stages import AttentionResult, CamResult, question_text

__all__ = ["draw_figures", "shares_by_task", "image_share_by_task", "example_grid", "truncation_deltas",
           "speed_bars", "lens_by_task", "heads_by_task", "head_shares_by_task", "segment_flow_by_task"]

_TASK_COLORS = ("C0", "C1", "C2", "C3", "C4", "C5")
_DPI = 110


def draw_figures(fdir: Path, summary: DemoSummary, attention: Mapping[str, AttentionResult],
                 cams: Mapping[str, Sequence[CamResult]]) -> list[FigureRecord]:
    """Draw every figure of a run into ``fdir`` (the report's ``figures/``), in report order.

    Args:
        fdir: the folder to write (created).
        summary: the run's records (tasks, settings, model, speed rows).
        attention, cams: per task world, the attention and LLaVA-CAM stage results (their samples' images are
            drawn under the maps).

    Returns:
        the figures' records, files relative to the report folder.
    """
    fdir.mkdir(parents=True, exist_ok=True)
    out = _attention_figures(fdir, attention)
    for t in TASKS:
        out += _example_figures(fdir, summary, t, attention[t.world], cams[t.world])
    out += _truncation_figures(fdir, summary)
    if all(summary.tasks[t.world].flow is not None for t in TASKS):
        out += _flow_figures(fdir, summary, attention)
    if summary.speed:
        speed_bars(summary.speed, fdir / "speed.png")
        out.append(_record("speed", "speed", "Speed: pruned at the cliff layer vs unpruned",
                           "Median prefill time and decode speed over the timed runs of each row (same prompts, same "
                           "run)."))
    return out


def _record(fid: str, section: str, title: str, caption: str, half: bool = False) -> FigureRecord:
    return FigureRecord(id=fid, file=f"figures/{fid}.png", section=section, title=title, caption=caption, half=half)


def _attention_figures(fdir: Path, attention: Mapping[str, AttentionResult]) -> list[FigureRecord]:
    labels = {t.world: t.label for t in TASKS}
    names = attention[TASKS[0].world].segment_names
    shares_by_task({labels[w]: a.shares for w, a in attention.items()}, names, fdir / "attention_shares.png",
                   counts={labels[w]: a.n for w, a in attention.items()})
    image_share_by_task({labels[w]: a.shares[:, names.index("image")] for w, a in attention.items()},
                        fdir / "image_share.png", spread={labels[w]: a.image_sd for w, a in attention.items()})
    return [
        _record("attention_shares", "attention",
                "Attention share of the answer per layer, by task (Figure 2A analogue)",
                "Each panel: the mean over the task's traced questions of the share of the answer's attention (head "
                "mean, every answer row) that falls on the system prompt, the image tokens, the user's question and "
                "the tokens generated so far, per decoder layer."),
        _record("image_share", "attention", "Image share per layer, tasks overlaid",
                "The image column of the panels above, one line per task; the band is one standard deviation over "
                "the questions.")]


def _example_figures(fdir: Path, summary: DemoSummary, t: DemoTask, attention: AttentionResult,
                     cams: Sequence[CamResult]) -> list[FigureRecord]:
    """A task's answer -> image attention maps and LLaVA-CAM grids (where there are examples)."""
    out = []
    cols = [f"layer {i}" for i in range(summary.model.num_layers)]
    ex = attention.examples[:summary.settings.sizes.map_examples]
    if ex:
        imgs = [_open_rgb(e.sample.image) for e in ex]
        rows = [f"Q: {question_text(e.sample, t)}  |  model: {e.answer or '(empty)'}" for e in ex]
        example_grid(imgs, [e.maps for e in ex], rows, cols, fdir / f"attention_maps_{t.world}.png",
                     suptitle=f"{t.label}: the answer's attention to each image token, per layer "
                              "(each map scaled to its own maximum)")
        out.append(_record(
            f"attention_maps_{t.world}", "maps", f"{t.label}: answer -> image attention maps (Figure 2B analogue)",
            "One row per question, one column per decoder layer: the attention each image token receives from "
            "the answer rows (head mean, averaged over the answer's tokens), over the image; each map is "
            "scaled to its own maximum, so compare where, not how much (the image share above says how much)."))
    done = [c for c in cams if c.heatmaps is not None]
    if done:
        imgs = [_open_rgb(c.sample.image) for c in done]
        rows = [f"Q: {question_text(c.sample, t)}  |  model: {c.answer}" for c in done]
        example_grid(imgs, [list(c.heatmaps) for c in done], rows, cols, fdir / f"cam_{t.world}.png",
                     normalize=None, suptitle=f"{t.label}: LLaVA-CAM per layer")
        out.append(_record(
            f"cam_{t.world}", "cam", f"{t.label}: LLaVA-CAM grid (Figures 3/4 analogue)",
            "One row per question, one column per decoder layer: LLaVA-CAM of the model's own answer "
            "(gradient-weighted image-token features after each layer's post-attention norm, SmoothGrad over "
            f"{summary.settings.sizes.cam_samples} noisy copies, max-normalised per layer). The last "
            "layer's map is always 0: after its attention the image tokens cannot reach the answer."))
    return out


def _truncation_figures(fdir: Path, summary: DemoSummary) -> list[FigureRecord]:
    """One Figure-5 sweep plot per task (:func:`flowkern.viz.plot_sweep`) and all tasks' k = 0 curves together."""
    out = []
    k = summary.settings.keep
    tasks = summary.tasks
    for t in TASKS:
        s = tasks[t.world]
        viz.plot_sweep(dict(s.curve), s.baseline, controls={f"attention top-{k}": dict(s.attention_k),
                                                            f"random {k}": dict(s.random_k)},
                       cliff=s.cliff_layer, tolerance=round(s.tolerance, 2), metric=s.metric,
                       title=f"{t.label} (n = {s.n}): image dropped from layer L on",
                       path=fdir / f"truncation_{t.world}.png")
        out.append(_record(
            f"truncation_{t.world}", "truncation", f"{t.label}: truncation sweep (Figure 5 analogue)",
            f"{s.metric} with every image token dropped from decoder layer L on (k = 0, blue), and with "
            f"{k} image tokens kept, chosen by attention or at random (dashed); the grey "
            f"band is the baseline \u00b1 {s.tolerance:.3g} points, the red arrow the cliff layer.", half=True))
    labels = {t.world: t.label for t in TASKS}
    truncation_deltas({labels[w]: dict(s.curve) for w, s in tasks.items()},
                      {labels[w]: s.baseline for w, s in tasks.items()},
                      {labels[w]: s.higher_is_better for w, s in tasks.items()}, fdir / "truncation_all.png",
                      cliffs={labels[w]: s.cliff_layer for w, s in tasks.items()},
                      tolerances={labels[w]: s.tolerance for w, s in tasks.items()})
    out.append(_record(
        "truncation_all", "truncation", "All tasks: change from the baseline when the image is dropped from layer L on",
        "k = 0 curves of the four sweeps as the change from each baseline in points, signed so that below 0 is "
        "worse (CHAIR_S, lower is better, is flipped); stars mark the cliff layers."))
    return out


def _flow_figures(fdir: Path, summary: DemoSummary, attention: Mapping[str, AttentionResult]) -> list[FigureRecord]:
    """The causal-flow section: the logit lens of the answer per layer, image share over all vs unguided heads, and
    per task the per-head image shares, the segment x segment flow and one example's image lens."""
    from flowkern.viz_flow import plot_lens_grid

    tasks = {t.label: summary.tasks[t.world] for t in TASKS}
    guided = flow.head_mask(summary.model)
    lens_by_task({k: s.flow for k, s in tasks.items()}, fdir / "lens_answer.png")
    heads_by_task({k: s.flow.head_image for k, s in tasks.items()}, guided, fdir / "unguided_share.png")
    out = [
        _record("lens_answer", "lens", "Logit lens: when the answer becomes decodable",
                "The last prompt position's hidden state after each decoder layer, through the model's final norm "
                "and LM head (flowkern.lens): the probability of the model's own first answer token (solid) and the "
                f"fraction of questions whose top-1 token is that answer (dashed); a star marks the first layer from "
                f"which at least {flow.DECODABLE:.0%} of them are."),
        _record("unguided_share", "heads", "Image share of the answer's attention: all heads vs unguided heads",
                "Solid: mean over every head (the Figure 2A image share); dashed: mean over the heads that no "
                "attention guide trained (missing where every head of a layer was guided).")]
    names = summary.tasks[TASKS[0].world].segment_names
    head_shares_by_task({k: s.flow.head_image for k, s in tasks.items()}, guided, fdir / "head_shares.png")
    out.append(_record("head_shares", "heads", "Image share per head, every task",
                       "Per task, decoder layer (rows) and head (columns), the share of the answer's attention on "
                       "image tokens in percent (mean over the traced questions); outlined cells are heads trained "
                       "with an attention guide."))
    segment_flow_by_task({k: np.asarray(s.flow.segment_flow, dtype=float) for k, s in tasks.items()}, names,
                         fdir / "segment_flow.png")
    out.append(_record("segment_flow", "segflow", "Segment x segment flow, every task and layer",
                       "Per task (row) and decoder layer (block), the mean attention mass every query row of a segment "
                       "(rows of the block) puts on each key segment (columns of the block, in the same order: "
                       + ", ".join(names) + "), head mean, over all the rows the model ran (prompt rows at prefill, "
                       "generated rows while decoding); blank: no row of that segment."))
    # one example's image lens (each panel labels 64+ cells: one figure keeps the report's drawing time small)
    for t in TASKS:
        ex = next((e for e in attention[t.world].examples if len(e.lens_maps)), None)
        if ex is None:
            continue
        depth = summary.model.num_layers
        layers = sorted({0, depth // 3, (2 * depth) // 3, depth - 1})
        words = dict(ex.words or {})
        plot_lens_grid([ex.lens_maps[i] for i in layers], [f"layer {i}" for i in layers],
                       lambda i, w=words: w.get(int(i), str(i)), image=_open_rgb(ex.sample.image),
                       path=fdir / f"lens_grid_{t.world}.png")
        out.append(_record(f"lens_grid_{t.world}", "lensmaps", f"{t.label}: what each image patch says",
                           f"Q: {question_text(ex.sample, t)} | model: {ex.answer or '(empty)'}. The logit lens "
                           "of every image token: each patch coloured and labelled by its top-1 word after the "
                           "layer."))
        break
    return out


def head_shares_by_task(head_image: Mapping[str, Any], guided: Any, path: str | os.PathLike[str]) -> Any:
    """One panel per task: the image share per layer (rows) and head (columns), in percent, guided heads outlined
    (``head_image``: task label -> ``[layers, heads]``; ``guided``: bool ``[layers, heads]``)."""
    from matplotlib.patches import Rectangle

    mask = np.asarray(guided, dtype=bool)
    fig = viz.new_figure((2.1 * len(head_image) + 0.8, 3.6))
    for i, (task, h) in enumerate(head_image.items()):
        v = np.asarray(h, dtype=float)
        ax = fig.add_subplot(1, len(head_image), i + 1)
        im = ax.imshow(v, cmap="magma", vmin=0.0, vmax=1.0, aspect="auto")
        for (r, c), x in np.ndenumerate(v):
            ax.text(c, r, f"{100 * x:.0f}", ha="center", va="center", fontsize=7,
                    color="white" if x < 0.55 else "black")
            if mask.shape == v.shape and mask[r, c]:
                ax.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, edgecolor="cyan", linewidth=1.5))
        ax.set_xticks(range(v.shape[1]), [f"h{j}" for j in range(v.shape[1])], fontsize="small")
        ax.set_yticks(range(v.shape[0]), [str(j) for j in range(v.shape[0])] if i == 0 else [], fontsize="small")
        ax.set_title(task, fontsize="small")
        if i == 0:
            ax.set_ylabel("decoder layer")
    fig.colorbar(im, ax=fig.axes, label="image share", shrink=0.8)
    viz.save_figure(fig, path, _DPI)
    return fig


def segment_flow_by_task(tables: Mapping[str, Any], segment_names: Sequence[str], path: str | os.PathLike[str]) -> Any:
    """Every task's segment x segment flow in one figure: one row per task, one ``S x S`` block per layer
    (``tables``: task label -> ``[layers, S, S]``, NaN blank)."""
    names = list(segment_names)
    n = len(names)
    fig = viz.new_figure((8.0, 0.9 + 1.45 * len(tables)))
    for i, (task, table) in enumerate(tables.items()):
        t = np.asarray(table, dtype=float)
        layers = t.shape[0]
        mosaic = np.full((n, layers * (n + 1) - 1), np.nan)
        for layer in range(layers):
            mosaic[:, layer * (n + 1):layer * (n + 1) + n] = t[layer]
        ax = fig.add_subplot(len(tables), 1, i + 1)
        im = ax.imshow(np.ma.masked_invalid(mosaic), cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_xticks([layer * (n + 1) + (n - 1) / 2 for layer in range(layers)],
                      [f"layer {layer}" for layer in range(layers)], fontsize="small")
        ax.set_yticks(range(n), names, fontsize="x-small")
        ax.set_title(task, fontsize="medium", loc="left")
    fig.colorbar(im, ax=fig.axes, label="mass", shrink=0.8)
    viz.save_figure(fig, path, _DPI)
    return fig


def lens_by_task(flows: Mapping[str, Any], path: str | os.PathLike[str]) -> Any:
    """Per task the logit-lens probability of the answer (solid) and the top-1 agreement (dashed) per layer; stars
    at the decodable layers (``flows``: task label -> :class:`flowkern.demo.report.records.FlowResult`)."""
    fig = viz.new_figure((6.4, 3.6))
    ax = fig.add_subplot()
    for i, (task, f) in enumerate(flows.items()):
        color = _TASK_COLORS[i % len(_TASK_COLORS)]
        layers = np.arange(len(f.answer_prob))
        ax.plot(layers, f.answer_prob, marker="o", markersize=3, color=color, label=task)
        ax.plot(layers, f.answer_top1, linestyle="--", color=color, alpha=0.7)
        if f.decodable_layer is not None:
            ax.plot([f.decodable_layer], [f.answer_top1[f.decodable_layer]], marker="*", markersize=12,
                    color=color, gid="decodable")
        ax.set_xticks(layers)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("lens p(answer) / top-1 = answer")
    ax.set_ylim(0, 1.05)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    viz.save_figure(fig, path, _DPI)
    return fig


def heads_by_task(head_image: Mapping[str, Any], guided: Any, path: str | os.PathLike[str]) -> Any:
    """Per task the image share per layer over all heads (solid) and over the unguided heads (dashed)
    (``head_image``: task label -> ``[layers, heads]``; ``guided``: bool ``[layers, heads]``)."""
    fig = viz.new_figure((6.4, 3.6))
    ax = fig.add_subplot()
    for i, (task, h) in enumerate(head_image.items()):
        color = _TASK_COLORS[i % len(_TASK_COLORS)]
        every = flow.share_over_heads(h, guided, unguided=False)
        free = np.array([np.nan if v is None else v for v in flow.share_over_heads(h, guided, unguided=True)])
        layers = np.arange(len(every))
        ax.plot(layers, every, marker="o", markersize=3, color=color, label=f"{task}: all heads")
        ax.plot(layers, free, marker="s", markersize=4, linestyle="--", color=color, alpha=0.8,
                label=f"{task}: unguided heads")
        ax.set_xticks(layers)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("image share of the answer's attention")
    ax.set_ylim(0, 1)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize="x-small", ncols=2)
    viz.save_figure(fig, path, _DPI)
    return fig


def _open_rgb(path: Any) -> Any:
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def shares_by_task(shares: Mapping[str, Any], segment_names: Sequence[str], path: str | os.PathLike[str], *,
                   counts: Mapping[str, int] | None = None) -> Any:
    """Figure 2A side by side: one panel per task, the answer's attention share per layer and segment.

    Args:
        shares: task label -> ``[num_layers, len(segment_names)]`` mean share per layer (rows sum to 1).
        segment_names: the columns (system / image / user / generated).
        path: PNG to write.
        counts: task label -> number of questions averaged (shown in the panel titles).

    Returns:
        the ``matplotlib.figure.Figure`` (one axes per task, shared y axis).
    """
    if not shares:
        raise ValueError("shares_by_task needs at least one task")
    fig = viz.new_figure((3.3 * len(shares), 3.4))
    axes = fig.subplots(1, len(shares), sharey=True, squeeze=False)[0]
    top = max(float(np.nanmax(np.asarray(s, dtype=float))) for s in shares.values())
    for ax, (task, s) in zip(axes, shares.items(), strict=True):
        s = np.asarray(s, dtype=float)
        if s.ndim != 2 or s.shape[1] != len(segment_names):
            raise ValueError(f"shares[{task!r}] must be [layers, {len(segment_names)}], got {s.shape}")
        layers = np.arange(s.shape[0])
        for i, name in enumerate(segment_names):
            ax.plot(layers, s[:, i], marker="o", markersize=3, label=name,
                    color=viz.SEGMENT_COLORS.get(name, f"C{i}"))
        n = (counts or {}).get(task)
        ax.set_title(task + (f" ({n} questions)" if n else ""), fontsize="medium")
        ax.set_xlabel("decoder layer")
        ax.set_xticks(layers)
        ax.set_ylim(0, min(1.0, top * 1.1 + 0.02))
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("attention share of the answer")
    axes[-1].legend(loc="best", fontsize="small")
    viz.save_figure(fig, path, _DPI)
    return fig


def image_share_by_task(image_shares: Mapping[str, Any], path: str | os.PathLike[str], *,
                        spread: Mapping[str, Any] | None = None) -> Any:
    """The image share per layer, one line per task (with a +-1 standard deviation band over questions).

    Args:
        image_shares: task label -> ``[num_layers]`` mean image share of the answer per layer.
        path: PNG to write.
        spread: task label -> ``[num_layers]`` standard deviation over the questions (a band), optional.

    Returns:
        the ``matplotlib.figure.Figure``.
    """
    fig = viz.new_figure((6.4, 3.6))
    ax = fig.add_subplot()
    for i, (task, values) in enumerate(image_shares.items()):
        v = np.asarray(values, dtype=float)
        layers = np.arange(v.shape[0])
        color = _TASK_COLORS[i % len(_TASK_COLORS)]
        ax.plot(layers, v, marker="o", markersize=3, color=color, label=task)
        if spread is not None and task in spread:
            sd = np.asarray(spread[task], dtype=float)
            ax.fill_between(layers, np.clip(v - sd, 0, 1), np.clip(v + sd, 0, 1), color=color, alpha=0.12)
        ax.set_xticks(layers)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("image share of the answer's attention")
    ax.set_ylim(0, 1)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    viz.save_figure(fig, path, _DPI)
    return fig


def example_grid(images: Sequence[Any], maps: Sequence[Sequence[Any]], row_titles: Sequence[str],
                 col_titles: Sequence[str], path: str | os.PathLike[str], *, normalize: str | None = "each",
                 alpha: float = 0.55, suptitle: str | None = None) -> Any:
    """Rows of heatmaps over their images: one row per example, one column per layer (Figure 2B, Figures 3/4).

    Args:
        images: one PIL image (or ``[H, W, 3]`` array) per row.
        maps: per row, one ``[gh, gw]`` map per column.
        row_titles: a caption per row (question and answer; wrapped).
        col_titles: a title per column (``"layer 3"``).
        path: PNG to write.
        normalize: per-map scaling before colouring (:func:`flowkern.viz.normalize_maps`).
        alpha: heatmap weight in the overlay (:func:`flowkern.viz.overlay`).
        suptitle: a title over the grid.

    Returns:
        the ``matplotlib.figure.Figure`` with ``rows * cols`` image axes.
    """
    if not images:
        raise ValueError("example_grid needs at least one example")
    if not len(images) == len(maps) == len(row_titles):
        raise ValueError(f"got {len(images)} images, {len(maps)} map rows and {len(row_titles)} row titles")
    cols = len(col_titles)
    if any(len(row) != cols for row in maps):
        raise ValueError(f"every row needs {cols} maps (one per column title)")
    rows = len(images)
    panel = 1.45
    fig = viz.new_figure((panel * cols + 0.2, (panel + 0.75) * rows + (0.35 if suptitle else 0.0)))
    subs = fig.subfigures(rows, 1, squeeze=False)[:, 0]
    for r in range(rows):
        scaled = viz.normalize_maps(list(maps[r]), normalize)
        axes = subs[r].subplots(1, cols, squeeze=False)[0]
        for c in range(cols):
            ax = axes[c]
            ax.imshow(np.asarray(viz.overlay(images[r], scaled[c], alpha=alpha)))
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(col_titles[c], fontsize="small")
        title = "\n".join(textwrap.wrap(row_titles[r], width=max(50, int(cols * 19)))[:2])
        subs[r].suptitle(title, fontsize="small", x=0.01, ha="left")
    if suptitle:
        fig.suptitle(suptitle, fontsize="medium")
    viz.save_figure(fig, path, 100)
    return fig


def truncation_deltas(curves: Mapping[str, Mapping[int, float]], baselines: Mapping[str, float],
                      higher_is_better: Mapping[str, bool], path: str | os.PathLike[str], *,
                      cliffs: Mapping[str, int | None] | None = None,
                      tolerances: Mapping[str, float] | None = None) -> Any:
    """All tasks' truncation curves on one axes, as the change from each baseline in points, signed so that
    below 0 is worse (CHAIR's lower-is-better metric flipped), cliff layers marked.

    Args:
        curves: task label -> ``{L: metric}`` (k = 0 series).
        baselines: task label -> unpruned metric.
        higher_is_better: task label -> direction of its metric.
        path: PNG to write.
        cliffs: task label -> cliff layer (None: no cliff), marked with a star.
        tolerances: task label -> tolerance in points (drawn as the widest band).

    Returns:
        the ``matplotlib.figure.Figure``.
    """
    fig = viz.new_figure((6.4, 3.8))
    ax = fig.add_subplot()
    for i, (task, curve) in enumerate(curves.items()):
        xs = sorted(curve)
        sign = 1.0 if higher_is_better[task] else -1.0
        ys = [sign * (curve[x] - baselines[task]) * 100.0 for x in xs]
        color = _TASK_COLORS[i % len(_TASK_COLORS)]
        ax.plot(xs, ys, marker="o", markersize=3, color=color, label=task)
        cliff = (cliffs or {}).get(task)
        if cliff is not None and cliff in curve:
            ax.plot([cliff], [sign * (curve[cliff] - baselines[task]) * 100.0], marker="*", markersize=13,
                    color=color, markeredgecolor="black", linestyle="none")
        ax.set_xticks(xs)
    if tolerances:
        tol = max(tolerances.values())
        ax.axhspan(-tol, tol, color="0.5", alpha=0.15, label=f"\u00b1 {tol:g} points")
    ax.axhline(0.0, color="black", linewidth=1)
    ax.set_xlabel("truncation layer L (image dropped from L on; 0-based)")
    ax.set_ylabel("change from baseline (points, < 0 = worse)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize="small", title="\u2605 = cliff layer", title_fontsize="small")
    viz.save_figure(fig, path, _DPI)
    return fig


def speed_bars(rows: Sequence[SpeedRow], path: str | os.PathLike[str]) -> Any:
    """Prefill time and decode speed, unpruned vs pruned at the cliff layer, one bar pair per measured row.

    Args:
        rows: the speed rows (their ``label``, ``unpruned_prefill_ms``, ``pruned_prefill_ms``,
            ``unpruned_decode_tok_s``, ``pruned_decode_tok_s``).
        path: PNG to write.

    Returns:
        the ``matplotlib.figure.Figure`` (two axes).
    """
    if not rows:
        raise ValueError("speed_bars needs at least one row")
    fig = viz.new_figure((max(6.4, 1.3 * len(rows) + 2.5), 3.6))
    ax1, ax2 = fig.subplots(1, 2)
    x = np.arange(len(rows))
    w = 0.38
    labels = [str(r.label) for r in rows]
    for ax, key, unit in ((ax1, "prefill_ms", "prefill (ms, lower is better)"),
                          (ax2, "decode_tok_s", "decode (tokens/s, higher is better)")):
        a = [float(getattr(r, f"unpruned_{key}")) for r in rows]
        b = [float(getattr(r, f"pruned_{key}")) for r in rows]
        ax.bar(x - w / 2, a, w, label="unpruned", color="0.55")
        ax.bar(x + w / 2, b, w, label="pruned at the cliff layer", color="tab:red")
        ax.set_xticks(x, labels, fontsize="small", rotation=20, ha="right")
        ax.set_ylabel(unit)
        ax.grid(True, axis="y", alpha=0.3)
    ax1.legend(loc="best", fontsize="small")
    viz.save_figure(fig, path, _DPI)
    return fig
