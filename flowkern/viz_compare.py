"""Figures of ``flowkern compare`` (:mod:`flowkern.eval.sweep.compare`): the accuracy / cost trade-off of pruning
methods and where their kept image tokens lie.

Same style as :mod:`flowkern.viz`: ``matplotlib.figure.Figure`` objects on their own Agg canvas (no ``pyplot``, no
display needed), metrics shown in points (times 100).

.. code-block:: python

    plot_pareto({"fastv": [(flops, kept, f1), ...], "random": [...]}, baseline=(flops0, kept0, f1_0), metric="f1")
    plot_keep_maps({"fastv": freq_grid, "random": freq_grid}, budget=0.25)
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from flowkern.viz import new_figure, save_figure

__all__ = ["plot_pareto", "plot_keep_maps"]


def plot_pareto(
    methods: Mapping[str, Sequence[tuple[float, float, float]]],
    baseline: tuple[float, float, float] | None,
    *,
    metric: str = "metric",
    higher_is_better: bool = True,
    scale: float = 100.0,
    title: str | None = None,
    path: str | os.PathLike | None = None,
) -> Any:
    """Two panels: the task metric against the estimated FLOPs per answer (left) and against the mean image tokens
    kept (right); one line per method through its budgets, the unpruned baseline as a black star and a line.

    Args:
        methods: method name -> its points ``(flops per answer, image tokens kept, metric)``, any order (drawn sorted
            by FLOPs). A point with a None metric is left out.
        baseline: ``(flops, image tokens, metric)`` of the unpruned model, or None.
        metric, higher_is_better: the y-axis label (an arrow says which way is better).
        scale: metric values are shown times ``scale`` (points).
        title, path: the figure's title; also save it there.

    Returns:
        the ``matplotlib.figure.Figure`` (lines have gid ``"method:<name>"``, the baseline ``"baseline"``).
    """
    fig = new_figure((11.0, 4.5))
    left, right = fig.subplots(1, 2, sharey=True)
    for i, (name, points) in enumerate(methods.items()):
        pts = sorted((p for p in points if p[2] is not None), key=lambda p: p[0])
        if not pts:
            continue
        style = dict(marker="o", markersize=4, color=f"C{i % 10}", label=name, gid=f"method:{name}")
        left.plot([p[0] for p in pts], [p[2] * scale for p in pts], **style)
        right.plot([p[1] for p in pts], [p[2] * scale for p in pts], **style)
    if baseline is not None and baseline[2] is not None:
        y = baseline[2] * scale
        for ax, x in ((left, baseline[0]), (right, baseline[1])):
            ax.axhline(y, color="black", linewidth=0.8, linestyle=":")
            ax.plot([x], [y], marker="*", markersize=12, color="black", linestyle="none",
                    label=f"unpruned {y:.2f}", gid="baseline")
    left.set_xlabel("estimated FLOPs per answer (language model)")
    left.ticklabel_format(axis="x", style="sci", scilimits=(0, 0))
    right.set_xlabel("image tokens kept (mean per answer)")
    left.set_ylabel(f"{metric} (points, {'higher' if higher_is_better else 'lower'} is better)")
    for ax in (left, right):
        ax.grid(True, alpha=0.3)
    right.legend(loc="best", fontsize="small")
    if title:
        fig.suptitle(title)
    save_figure(fig, path, 150)
    return fig


def plot_keep_maps(
    maps: Mapping[str, Any],
    *,
    budget: float | None = None,
    title: str | None = None,
    path: str | os.PathLike | None = None,
) -> Any:
    """One small heat map per method: how often each cell of the image grid was kept, averaged over the task.

    Args:
        maps: method name -> float ``[rows, cols]`` keep frequency in [0, 1] (NaN: no token there).
        budget: the keep fraction the maps are at, for the titles.
        title, path: the figure's title; also save it there.

    Returns:
        the ``matplotlib.figure.Figure`` (one axes per method, a shared colour bar from 0 to 1).
    """
    if not maps:
        raise ValueError("maps: no method to draw")
    n = len(maps)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig = new_figure((2.6 * cols + 0.8, 2.6 * rows + (0.4 if title else 0.0)))
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    image = None
    for ax, (name, grid) in zip(axes, maps.items(), strict=False):
        values = np.asarray(grid, dtype=np.float64)
        image = ax.imshow(np.ma.masked_invalid(values), vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest")
        mean = float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
        ax.set_title(f"{name}\nmean {mean:.2f}" if budget is None else f"{name} @ {budget:g}\nmean {mean:.2f}",
                     fontsize="small")
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[n:]:
        ax.set_visible(False)
    if image is not None:
        fig.colorbar(image, ax=list(axes[:n]), shrink=0.8, label="fraction of answers keeping the cell")
    if title:
        fig.suptitle(title)
    save_figure(fig, path, 150)
    return fig
