"""Figures of the flow analyses: segment x segment flow, per-head shares and the logit lens on the image grid.

Same conventions as :mod:`flowkern.viz` (matplotlib ``Figure`` objects on the Agg canvas, never ``pyplot``; inputs
may be NumPy arrays, lists or CPU torch tensors).

.. code-block:: python

    with flowkern.trace(model, per_head=True, segment_flow=True) as flow:
        model.generate(**inputs, max_new_tokens=8, do_sample=False)
    plot_segment_flow(flow.segment_flow, flow.segment_names, path="flow.png")
    plot_head_shares(flow.head_shares, flow.segment_names, path="heads.png")

    with flowkern.lens(model, positions="image", top_k=1, image_inputs=inputs) as lens:
        model(**inputs)
    plot_lens_grid([lens.image_map(l) for l in (0, 4, 7)], ["layer 0", "layer 4", "layer 7"],
                   words=tokenizer.convert_ids_to_tokens, image=image, path="lens.png")
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from flowkern.viz import DEFAULT_SEGMENT_NAMES, _array, _image_array, new_figure, save_figure

__all__ = ["plot_segment_flow", "plot_head_shares", "plot_lens_grid"]


def _spread(n: int, k: int) -> list[int]:
    return list(range(n)) if n <= k else sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def _annotate(ax: Any, values: np.ndarray, fontsize: float) -> None:
    """Percent in each finite cell, white on dark cells."""
    for (r, c), v in np.ndenumerate(values):
        if np.isfinite(v):
            ax.text(c, r, f"{100 * v:.0f}", ha="center", va="center", fontsize=fontsize,
                    color="white" if v < 0.55 else "black")


def plot_segment_flow(
    flow: Any,
    segment_names: Sequence[str] = DEFAULT_SEGMENT_NAMES,
    *,
    layers: Sequence[int] | None = None,
    title: str | None = None,
    path: str | os.PathLike | None = None,
) -> Any:
    """Segment x segment attention flow (:attr:`flowkern.trace.Flow.segment_flow`), one panel per layer.

    Args:
        flow: ``[L, S, S]``: mean mass the query rows of segment ``q`` (row) put on the keys of segment ``c``
            (column); NaN rows (no query row of that segment) are left blank.
        segment_names: the S names.
        layers: which layers get a panel (default: all, or 8 spread over the depth when there are more).
        title, path: figure title; also save the figure there (150 dpi).

    Returns:
        the ``matplotlib.figure.Figure``, one axes per panel (cells annotated in percent).
    """
    f = _array(flow)
    names = list(segment_names)
    if f.ndim != 3 or f.shape[1:] != (len(names), len(names)):
        raise ValueError(f"flow must be [layers, {len(names)}, {len(names)}], got {f.shape}")
    layers = _spread(f.shape[0], 8) if layers is None else [int(x) for x in layers]
    if not layers or any(not -f.shape[0] <= x < f.shape[0] for x in layers):
        raise ValueError(f"layers must be a non-empty list in [0, {f.shape[0]}), got {layers}")
    ncols = min(4, len(layers))
    nrows = math.ceil(len(layers) / ncols)
    fig = new_figure((3.1 * ncols, 3.0 * nrows + 0.4))
    for i, layer in enumerate(layers):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        ax.imshow(np.ma.masked_invalid(f[layer]), cmap="viridis", vmin=0.0, vmax=1.0)
        _annotate(ax, f[layer], 8)
        ax.set_title(f"layer {layer % f.shape[0]}", fontsize="medium")
        ax.set_xticks(range(len(names)), names, rotation=45, fontsize="small")
        ax.set_yticks(range(len(names)), names if i % ncols == 0 else [""] * len(names), fontsize="small")
        if i % ncols == 0:
            ax.set_ylabel("query segment")
        if i >= len(layers) - ncols:
            ax.set_xlabel("key segment")
    fig.suptitle(title or "attention mass from each query segment to each key segment (%)", fontsize="medium")
    save_figure(fig, path, 150)
    return fig


def plot_head_shares(
    head_shares: Any,
    segment_names: Sequence[str] = DEFAULT_SEGMENT_NAMES,
    *,
    segment: str = "image",
    marked: Any = None,
    marked_label: str = "marked",
    title: str | None = None,
    path: str | os.PathLike | None = None,
) -> Any:
    """One segment's share of the answer rows' attention per layer and head (:attr:`flowkern.trace.Flow.head_shares`).

    Args:
        head_shares: ``[L, H, S]``.
        segment_names, segment: the S names and the one to draw.
        marked: optional bool ``[L, H]``: cells outlined (e.g. heads trained with an attention guide).
        marked_label: what the outline means, for the legend.
        title, path: axes title; also save the figure there (150 dpi).

    Returns:
        the ``matplotlib.figure.Figure`` (one axes: layers down, heads across, percent in each cell).
    """
    h = _array(head_shares)
    names = list(segment_names)
    if h.ndim != 3 or h.shape[2] != len(names):
        raise ValueError(f"head_shares must be [layers, heads, {len(names)}], got {h.shape}")
    if segment not in names:
        raise ValueError(f"segment {segment!r} is not one of {names}")
    values = h[:, :, names.index(segment)]
    L, H = values.shape
    fig = new_figure((1.2 + 0.75 * H, 1.2 + 0.42 * L))
    ax = fig.add_subplot()
    im = ax.imshow(values, cmap="magma", vmin=0.0, vmax=1.0, aspect="auto")
    _annotate(ax, values, 8)
    if marked is not None:
        from matplotlib.patches import Rectangle

        m = _array(marked, dtype=bool)
        if m.shape != (L, H):
            raise ValueError(f"marked must be [layers={L}, heads={H}], got {m.shape}")
        for r, c in zip(*np.nonzero(m), strict=True):
            ax.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, edgecolor="cyan", linewidth=2,
                                   gid="marked"))
        ax.plot([], [], color="cyan", linewidth=2, label=marked_label)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), fontsize="small", frameon=False)
    ax.set_xticks(range(H), [f"h{i}" for i in range(H)])
    ax.set_yticks(range(L), [str(i) for i in range(L)])
    ax.set_xlabel("head")
    ax.set_ylabel("decoder layer")
    fig.colorbar(im, ax=ax, label=f"{segment} share", shrink=0.8)
    ax.set_title(title or f"{segment} share of the answer's attention per head (%)", fontsize="medium")
    save_figure(fig, path, 150)
    return fig


def _word_of(words: Mapping[int, str] | Sequence[str] | Callable[[int], str]) -> Callable[[int], str]:
    if callable(words):
        return lambda i: str(words(int(i)))
    return lambda i: str(words[int(i)])


def plot_lens_grid(
    maps: Sequence[Any],
    titles: Sequence[str],
    words: Mapping[int, str] | Sequence[str] | Callable[[int], str],
    *,
    image: Any = None,
    alpha: float = 0.55,
    colors: int = 9,
    ncols: int | None = None,
    path: str | os.PathLike | None = None,
) -> Any:
    """The logit lens on the image grid: which word each patch "says" at each layer (:meth:`flowkern.lens.Lens.
    image_map`).

    Args:
        maps: ``[rows, cols]`` top-1 token ids per panel (-1 = no token there).
        titles: one per panel (``"layer 3"``).
        words: id -> word (a mapping, a list, or a function such as ``tokenizer.convert_ids_to_tokens``).
        image: drawn under the maps (PIL image or array), or None.
        alpha: weight of the colours over the image.
        colors: the most frequent words over all panels get their own colour; the rest are grey ("other").
        ncols: panels per row (default ``min(N, 4)``).
        path: also save the figure there (100 dpi).

    Returns:
        the ``matplotlib.figure.Figure`` with one axes per map and a legend of the coloured words; each cell is
        labelled with its word when the grid has at most 16 columns.
    """
    grids = [_array(m, dtype=np.int64) for m in maps]
    titles = list(titles)
    if not grids or len(titles) != len(grids) or any(g.ndim != 2 for g in grids):
        raise ValueError(f"need one 2D map per title, got {len(grids)} maps and {len(titles)} titles")
    word = _word_of(words)
    counts = Counter(int(v) for g in grids for v in g.ravel() if v >= 0)
    top = [i for i, _ in counts.most_common(max(0, int(colors)))]
    from matplotlib import colormaps

    palette = [tuple(c) for c in colormaps["tab10"](np.arange(10))[:, :3]]
    color_of = {tid: palette[k % 10] for k, tid in enumerate(top)}
    other = (0.6, 0.6, 0.6)
    n = len(grids)
    ncols = min(n, 4) if ncols is None else max(1, int(ncols))
    nrows = math.ceil(n / ncols)
    img = None if image is None else _image_array(image)
    fig = new_figure((3.0 * ncols, 3.0 * nrows + 0.8))
    for i, (g, title) in enumerate(zip(grids, titles, strict=True)):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        rgba = np.zeros(g.shape + (4,))
        for (r, c), v in np.ndenumerate(g):
            if v >= 0:
                rgba[r, c] = (*color_of.get(int(v), other), alpha if img is not None else 1.0)
        extent = (-0.5, g.shape[1] - 0.5, g.shape[0] - 0.5, -0.5)
        if img is not None:
            ax.imshow(img, extent=extent)
        ax.imshow(rgba, extent=extent, interpolation="nearest")
        if g.shape[1] <= 16:
            for (r, c), v in np.ndenumerate(g):
                if v >= 0:
                    ax.text(c, r, word(v)[:6], ha="center", va="center", fontsize=max(4.0, 9 - 0.3 * g.shape[1]))
        ax.set_title(title, fontsize="medium")
        ax.set_axis_off()
    from matplotlib.patches import Patch

    handles = [Patch(color=color_of[t], label=word(t)) for t in top]
    if len(counts) > len(top):
        handles.append(Patch(color=other, label="other"))
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 6), fontsize="small")
    save_figure(fig, path, 100)
    return fig
