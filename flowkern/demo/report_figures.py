"""The figures of ``flowkern demo``'s report (matplotlib Agg figures, never ``pyplot``; see :mod:`flowkern.viz`).

Every function draws from plain numbers (lists, NumPy arrays, the report's summary) and saves a PNG at ``path``;
the single-model figures of :mod:`flowkern.viz` (:func:`flowkern.viz.plot_sweep`, :func:`flowkern.viz.overlay`,
:func:`flowkern.viz.normalize_maps`) are reused, not redrawn.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from flowkern import viz

__all__ = ["shares_by_task", "image_share_by_task", "example_grid", "truncation_deltas", "speed_bars"]

_SEGMENT_COLORS = {"system": "tab:blue", "image": "tab:red", "user": "tab:green", "generated": "tab:gray"}
_TASK_COLORS = ("C0", "C1", "C2", "C3", "C4", "C5")


def _figure(figsize: tuple[float, float]) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | os.PathLike[str], dpi: int = 110) -> None:
    fig.savefig(os.fspath(path), dpi=dpi)


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
    fig = _figure((3.3 * len(shares), 3.4))
    axes = fig.subplots(1, len(shares), sharey=True, squeeze=False)[0]
    top = max(float(np.nanmax(np.asarray(s, dtype=float))) for s in shares.values())
    for ax, (task, s) in zip(axes, shares.items(), strict=True):
        s = np.asarray(s, dtype=float)
        if s.ndim != 2 or s.shape[1] != len(segment_names):
            raise ValueError(f"shares[{task!r}] must be [layers, {len(segment_names)}], got {s.shape}")
        layers = np.arange(s.shape[0])
        for i, name in enumerate(segment_names):
            ax.plot(layers, s[:, i], marker="o", markersize=3, label=name,
                    color=_SEGMENT_COLORS.get(name, f"C{i}"))
        n = (counts or {}).get(task)
        ax.set_title(task + (f" ({n} questions)" if n else ""), fontsize="medium")
        ax.set_xlabel("decoder layer")
        ax.set_xticks(layers)
        ax.set_ylim(0, min(1.0, top * 1.1 + 0.02))
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("attention share of the answer")
    axes[-1].legend(loc="best", fontsize="small")
    _save(fig, path)
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
    fig = _figure((6.4, 3.6))
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
    _save(fig, path)
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
    fig = _figure((panel * cols + 0.2, (panel + 0.75) * rows + (0.35 if suptitle else 0.0)))
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
    _save(fig, path, dpi=100)
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
    fig = _figure((6.4, 3.8))
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
    _save(fig, path)
    return fig


def speed_bars(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> Any:
    """Prefill time and decode speed, unpruned vs pruned at the cliff layer, one bar pair per measured row.

    Args:
        rows: the speed table rows (``label``, ``unpruned_prefill_ms``, ``pruned_prefill_ms``,
            ``unpruned_decode_tok_s``, ``pruned_decode_tok_s``).
        path: PNG to write.

    Returns:
        the ``matplotlib.figure.Figure`` (two axes).
    """
    if not rows:
        raise ValueError("speed_bars needs at least one row")
    fig = _figure((max(6.4, 1.3 * len(rows) + 2.5), 3.6))
    ax1, ax2 = fig.subplots(1, 2)
    x = np.arange(len(rows))
    w = 0.38
    labels = [str(r["label"]) for r in rows]
    for ax, key, unit in ((ax1, "prefill_ms", "prefill (ms, lower is better)"),
                          (ax2, "decode_tok_s", "decode (tokens/s, higher is better)")):
        a = [float(r[f"unpruned_{key}"]) for r in rows]
        b = [float(r[f"pruned_{key}"]) for r in rows]
        ax.bar(x - w / 2, a, w, label="unpruned", color="0.55")
        ax.bar(x + w / 2, b, w, label="pruned at the cliff layer", color="tab:red")
        ax.set_xticks(x, labels, fontsize="small", rotation=20, ha="right")
        ax.set_ylabel(unit)
        ax.grid(True, axis="y", alpha=0.3)
    ax1.legend(loc="best", fontsize="small")
    _save(fig, path)
    return fig
