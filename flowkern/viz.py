"""Figures: attention share per layer (paper Figure 2A) and heatmaps over the image (Figure 2B, LLaVA-CAM).

Pure matplotlib + Pillow + NumPy: figures are ``matplotlib.figure.Figure`` objects rendered by the Agg canvas,
never through ``pyplot``, so nothing needs a display and the global backend of the caller is left alone (in a
notebook a returned figure still shows). Inputs may be NumPy arrays, lists or CPU torch tensors.

.. code-block:: python

    with flowkern.trace(model) as flow:
        model.generate(**inputs, max_new_tokens=16, do_sample=False)
    plot_shares(flow.shares, flow.segment_names, threshold=0.1, path="shares.png")
    layers = [0, 2, 8, 16, 31]
    heatmap_grid(image, [flow.image_attention(l) for l in layers], [f"layer {l}" for l in layers],
                 path="image_attention.png")

**Cliff layer** (:func:`cliff_layer`): the first decoder layer whose image share (the answer rows' attention
mass on image tokens, :attr:`flowkern.trace.Flow.shares`) is below ``threshold``; None if no layer is. It is an
attention-side marker of the paper's "information-flow cliff" (after which image tokens barely matter); the
paper's own cliff layer is found by truncation (``flowkern.prune``), which this does not replace.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "DEFAULT_SEGMENT_NAMES",
    "cliff_layer",
    "plot_shares",
    "plot_sweep",
    "normalize_maps",
    "upsample",
    "overlay",
    "heatmap_grid",
    "save_heatmap",
    "new_figure",
    "save_figure",
    "SEGMENT_COLORS",
]

DEFAULT_SEGMENT_NAMES: tuple[str, ...] = ("system", "image", "user", "generated")
"""The segment order of :attr:`flowkern.trace.Flow.shares` (``flowkern.hf.segments.SEGMENT_NAMES``)."""

SEGMENT_COLORS: dict[str, str] = {"system": "tab:blue", "image": "tab:red", "user": "tab:green",
                                  "generated": "tab:gray"}
"""The matplotlib colour of each segment in every share figure."""
_NORMALIZE = ("each", "global", None)
_MAX_PANEL_PIXELS = 768


def _array(x: Any, dtype: Any = np.float64) -> np.ndarray:
    """A NumPy array from an array-like or a (CPU or CUDA) torch tensor."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def new_figure(figsize: tuple[float, float]) -> Any:
    """A ``matplotlib.figure.Figure`` of ``figsize`` inches with constrained layout on its own Agg canvas (no
    ``pyplot``, no global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Any, path: str | os.PathLike | None, dpi: int) -> None:
    """Write ``fig`` to ``path`` at ``dpi`` (format by suffix); nothing when ``path`` is None."""
    if path is not None:
        fig.savefig(os.fspath(path), dpi=dpi)


# ----------------------------------------------------------------------------------------------------------
# Figure 2A


def cliff_layer(
    shares: Any,
    *,
    threshold: float = 0.1,
    segment: str = "image",
    segment_names: Sequence[str] = DEFAULT_SEGMENT_NAMES,
) -> int | None:
    """The first layer whose ``segment`` share is below ``threshold`` (see the module docstring), or None.

    Args:
        shares: ``[L, len(segment_names)]`` attention share per layer and segment (rows sum to 1).
        threshold: the share below which the segment counts as dropped out, in ``[0, 1]``.
        segment: which column (default ``"image"``).
        segment_names: names of the columns.

    Returns:
        a layer index in ``[0, L)``, or None when every layer's share is at or above ``threshold``.
    """
    s = _check_shares(shares, segment_names)
    if segment not in segment_names:
        raise ValueError(f"segment {segment!r} is not one of {list(segment_names)}")
    below = np.nonzero(s[:, list(segment_names).index(segment)] < threshold)[0]
    return int(below[0]) if below.size else None


def _check_shares(shares: Any, segment_names: Sequence[str]) -> np.ndarray:
    s = _array(shares)
    if s.ndim != 2 or s.shape[1] != len(segment_names):
        raise ValueError(f"shares must be [layers, {len(segment_names)}] (one column per segment), got {s.shape}")
    if s.shape[0] == 0:
        raise ValueError("shares has no layers")
    return s


def plot_shares(
    shares: Any,
    segment_names: Sequence[str] = DEFAULT_SEGMENT_NAMES,
    *,
    threshold: float | None = 0.1,
    title: str | None = None,
    path: str | os.PathLike | None = None,
    stacked: bool = False,
) -> Any:
    """Attention share of the answer tokens per layer and segment (paper Figure 2A), cliff layer marked.

    Args:
        shares: ``[L, S]`` array-like (e.g. ``flow.shares``): share of segment ``s`` at decoder layer ``l``.
        segment_names: the S column names (default system / image / user / generated).
        threshold: image share below which a layer counts as past the cliff (:func:`cliff_layer`); the first such
            layer gets a dashed vertical line (gid ``"cliff"``) and the threshold a dotted horizontal one
            (gid ``"threshold"``). None: no marker. Needs an ``"image"`` segment.
        title: axes title.
        path: also save the figure there (PNG, PDF, SVG... by suffix; 150 dpi).
        stacked: stacked areas instead of one line per segment.

    Returns:
        the ``matplotlib.figure.Figure`` (one axes).
    """
    s = _check_shares(shares, segment_names)
    layers = np.arange(s.shape[0])
    fig = new_figure((8.0, 4.5))
    ax = fig.add_subplot()
    colors = [SEGMENT_COLORS.get(n, f"C{i}") for i, n in enumerate(segment_names)]
    if stacked:
        ax.stackplot(layers, s.T, labels=list(segment_names), colors=colors, alpha=0.85)
    else:
        for i, name in enumerate(segment_names):
            ax.plot(layers, s[:, i], marker="o", markersize=3, label=name, color=colors[i], gid=f"share:{name}")
    if threshold is not None and "image" in segment_names:
        ax.axhline(threshold, color=SEGMENT_COLORS["image"], linestyle=":", linewidth=1, gid="threshold")
        cliff = cliff_layer(s, threshold=threshold, segment_names=segment_names)
        if cliff is not None:
            ax.axvline(cliff, color="black", linestyle="--", linewidth=1.2, gid="cliff",
                       label=f"cliff: layer {cliff} (image < {threshold:g})")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("attention share of the answer tokens")
    ax.set_xlim(-0.5, s.shape[0] - 0.5)
    ax.set_ylim(0, 1 if stacked else max(1e-6, float(np.nanmax(s))) * 1.05)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    if title:
        ax.set_title(title)
    save_figure(fig, path, 150)
    return fig


def plot_sweep(
    curve: dict[int, float],
    baseline: float,
    *,
    controls: dict[str, dict[int, float]] | None = None,
    cliff: int | None = None,
    tolerance: float | None = 1.0,
    metric: str = "metric",
    scale: float = 100.0,
    title: str | None = None,
    path: str | os.PathLike | None = None,
) -> Any:
    """A truncation sweep like the paper's Figure 5: the task metric with image tokens dropped from layer L on.

    Args:
        curve: ``{L: metric}`` of the main series (0-based decoder layer L = first layer without the image).
        baseline: the unpruned metric: a horizontal line (gid ``"baseline"``), with the ``tolerance`` band around it
            (gid ``"tolerance"``) when given.
        controls: ``{rank: {L: metric}}`` control series (e.g. ``"random"``, ``"grid"``), dashed.
        cliff: the cliff layer: a red arrow down onto the curve (gid ``"cliff"``) and a dotted vertical line.
        tolerance: in points (``tolerance / scale`` metric units); None: no band.
        metric: y-axis label; values are shown times ``scale`` (points).
        title, path: axes title; also save the figure there.

    Returns:
        the ``matplotlib.figure.Figure``.
    """
    fig = new_figure((8.0, 4.5))
    ax = fig.add_subplot()
    xs = sorted(curve)
    ys = [curve[x] * scale for x in xs]
    ax.plot(xs, ys, marker="o", markersize=4, color="C0", label="image dropped from layer L on", gid="curve")
    for i, (name, c) in enumerate(sorted((controls or {}).items())):
        cx = sorted(c)
        ax.plot(cx, [c[x] * scale for x in cx], marker="s", markersize=3, linestyle="--", color=f"C{i + 2}",
                label=f"control: rank {name}", gid=f"control:{name}")
    ax.axhline(baseline * scale, color="black", linewidth=1.2, label=f"baseline {baseline * scale:.2f}", gid="baseline")
    if tolerance is not None and tolerance > 0:
        ax.axhspan(baseline * scale - tolerance, baseline * scale + tolerance, color="0.5", alpha=0.15,
                   label=f"baseline \u00b1 {tolerance:g}", gid="tolerance")
    if cliff is not None and cliff in curve:
        y = curve[cliff] * scale
        lo, hi = ax.get_ylim()
        ax.annotate(f"cliff: layer {cliff}", xy=(cliff, y), xytext=(cliff, y + 0.18 * (hi - lo)), color="red",
                    ha="center", arrowprops=dict(arrowstyle="-|>", color="red", linewidth=2), gid="cliff")
        ax.axvline(cliff, color="red", linestyle=":", linewidth=1)
        ax.set_ylim(lo, max(hi, y + 0.25 * (hi - lo)))
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("truncation layer L (0-based; the paper's layer L+1)")
    ax.set_ylabel(f"{metric} (points)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    if title:
        ax.set_title(title)
    save_figure(fig, path, 150)
    return fig


# ----------------------------------------------------------------------------------------------------------
# heatmaps


def normalize_maps(heatmaps: Sequence[Any], mode: str | None = "each") -> list[np.ndarray]:
    """Scale maps for display, NaN cells kept.

    Args:
        heatmaps: 2D maps (any shapes).
        mode: ``"each"``: divide every map by its own maximum (the paper's max-normalisation); ``"global"``: divide
            all maps by the largest value of any map (keeps magnitudes comparable across layers); None: as given.
            Maps with no positive value become 0. Results are clipped to ``[0, 1]``.

    Returns:
        float64 maps with values in ``[0, 1]`` (or NaN).
    """
    if mode not in _NORMALIZE:
        raise ValueError(f"normalize must be 'each', 'global' or None, got {mode!r}")
    maps = [_array(h) for h in heatmaps]

    def peak(a: np.ndarray) -> float:
        finite = a[np.isfinite(a)]
        return float(finite.max()) if finite.size else 0.0

    if mode == "global":
        top = max((peak(a) for a in maps), default=0.0)
        maps = [a / top if top > 0 else np.zeros_like(a) for a in maps]
    elif mode == "each":
        maps = [a / peak(a) if peak(a) > 0 else np.where(np.isnan(a), np.nan, 0.0) for a in maps]
    return [np.clip(a, 0.0, 1.0) for a in maps]


def upsample(heatmap: Any, size: tuple[int, int]) -> np.ndarray:
    """Resize a map with bilinear interpolation (pixel-centre aligned, edges clamped, like
    ``F.interpolate(mode="bilinear", align_corners=False)``); NaN cells count as 0.

    Args:
        heatmap: ``[gh, gw]``.
        size: ``(height, width)`` of the output.

    Returns:
        float32 ``[height, width]``.
    """
    from PIL import Image

    h = np.nan_to_num(_array(heatmap, np.float32), nan=0.0)
    if h.ndim != 2:
        raise ValueError(f"a heatmap must be 2D [rows, cols], got shape {h.shape}")
    height, width = int(size[0]), int(size[1])
    return np.asarray(Image.fromarray(h).resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32)


def _image_array(image: Any) -> np.ndarray:
    """uint8 ``[H, W, 3]`` from a PIL image or an array (``[H, W]``, ``[H, W, 3|4]``; floats in [0, 1])."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    a = np.asarray(image.detach().cpu().numpy() if hasattr(image, "detach") else image)
    if a.ndim == 2:
        a = np.stack([a] * 3, axis=-1)
    if a.ndim != 3 or a.shape[2] not in (3, 4):
        raise ValueError(f"image must be a PIL image or an [H, W], [H, W, 3] or [H, W, 4] array, got {a.shape}")
    a = a[..., :3]
    if a.dtype != np.uint8:
        a = np.clip(a.astype(np.float64) * (255.0 if a.max(initial=0) <= 1.0 else 1.0), 0, 255).round()
    return a.astype(np.uint8)


def _colormap(cmap: Any) -> Any:
    import matplotlib

    return matplotlib.colormaps[cmap] if isinstance(cmap, str) else cmap


def overlay(image: Any, heatmap: Any, *, alpha: float = 0.5, cmap: Any = "jet") -> Any:
    """One heatmap over an image: bilinear upsampling to the image size, colormap, alpha blending.

    Args:
        image: PIL image or ``[H, W(, 3)]`` array.
        heatmap: ``[gh, gw]`` with values in ``[0, 1]`` (see :func:`normalize_maps`); NaN counts as 0.
        alpha: weight of the colormapped heatmap (0: the image only, 1: the heatmap only).
        cmap: a matplotlib colormap or its name.

    Returns:
        an RGB ``PIL.Image`` of the image's size.
    """
    from PIL import Image

    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    img = _image_array(image)
    heat = np.clip(upsample(heatmap, img.shape[:2]), 0.0, 1.0)
    colored = _colormap(cmap)(heat)[..., :3]
    blend = (1.0 - alpha) * img.astype(np.float64) / 255.0 + alpha * colored
    return Image.fromarray(np.clip(blend * 255.0, 0, 255).round().astype(np.uint8))


def _as_map_list(heatmaps: Any) -> list[np.ndarray]:
    if hasattr(heatmaps, "detach") or isinstance(heatmaps, np.ndarray):
        a = _array(heatmaps)
        if a.ndim == 2:
            return [a]
        if a.ndim != 3:
            raise ValueError(f"heatmaps must be [N, rows, cols] or a sequence of [rows, cols], got {a.shape}")
        return list(a)
    maps = [_array(h) for h in heatmaps]
    for m in maps:
        if m.ndim != 2:
            raise ValueError(f"every heatmap must be 2D [rows, cols], got shape {m.shape}")
    return maps


def heatmap_grid(
    image: Any,
    heatmaps: Any,
    titles: Sequence[str],
    *,
    alpha: float = 0.5,
    cmap: Any = "jet",
    ncols: int | None = None,
    normalize: str | None = "each",
    path: str | os.PathLike | None = None,
) -> Any:
    """One panel per heatmap, each overlaid on the image (paper Figure 2B; LLaVA-CAM figures).

    Args:
        image: PIL image, ``[H, W(, 3)]`` array, or None to show the maps alone (cells drawn as-is, NaN blank).
        heatmaps: a sequence of ``[gh, gw]`` maps (shapes may differ) or an ``[N, gh, gw]`` array / tensor.
        titles: N panel titles (e.g. ``"layer 3"``), drawn above the panels.
        alpha: heatmap weight in the overlay.
        cmap: matplotlib colormap (name).
        ncols: panels per row (default ``min(N, 4)``).
        normalize: ``"each"``, ``"global"`` or None, see :func:`normalize_maps`; colours span ``[0, 1]`` after it.
        path: also save the figure there (100 dpi).

    Returns:
        the ``matplotlib.figure.Figure``, with exactly N axes (row-major, ``fig.axes[i]`` shows ``heatmaps[i]``).
        Each map is upsampled to the image size with bilinear interpolation before colouring.
    """
    maps = normalize_maps(_as_map_list(heatmaps), normalize)
    titles = list(titles)
    if len(titles) != len(maps):
        raise ValueError(f"got {len(maps)} heatmaps but {len(titles)} titles")
    if not maps:
        raise ValueError("heatmap_grid needs at least one heatmap")
    n = len(maps)
    ncols = min(n, 4) if ncols is None else int(ncols)
    if ncols < 1:
        raise ValueError(f"ncols must be >= 1, got {ncols}")
    nrows = math.ceil(n / ncols)
    img = None if image is None else _image_array(image)
    if img is not None and max(img.shape[:2]) > _MAX_PANEL_PIXELS:  # panels are ~300 px wide: no need for more
        from PIL import Image

        f = _MAX_PANEL_PIXELS / max(img.shape[:2])
        size = (max(1, round(img.shape[1] * f)), max(1, round(img.shape[0] * f)))
        img = np.asarray(Image.fromarray(img).resize(size, Image.Resampling.LANCZOS))
    if img is not None:
        aspect = img.shape[0] / img.shape[1]
    else:
        aspect = max(m.shape[0] / m.shape[1] for m in maps)
    panel_w = 3.0
    panel_h = max(0.6, panel_w * aspect) + 0.4
    fig = new_figure((panel_w * ncols, panel_h * nrows))
    cm = _colormap(cmap)
    for i, (m, title) in enumerate(zip(maps, titles, strict=True)):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        if img is not None:
            ax.imshow(np.asarray(overlay(img, m, alpha=alpha, cmap=cm)))
        else:
            ax.imshow(np.ma.masked_invalid(m), cmap=cm, vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(title, fontsize="medium")
        ax.set_axis_off()
    save_figure(fig, path, 100)
    return fig


def save_heatmap(
    image: Any,
    heatmap: Any,
    path: str | os.PathLike,
    *,
    alpha: float = 0.5,
    cmap: Any = "jet",
    normalize: str | None = "each",
) -> Any:
    """Write one heatmap (overlaid on the image, at the image's resolution) to an image file; no axes or title.

    Args:
        image: PIL image, array, or None (the colormapped map alone, each cell an equal square block, NaN black).
        heatmap: ``[gh, gw]``.
        path: output file (format by suffix, e.g. ``.png``).
        alpha, cmap, normalize: as in :func:`heatmap_grid`.

    Returns:
        the written RGB ``PIL.Image``.
    """
    from PIL import Image

    (m,) = normalize_maps(_as_map_list([heatmap]), normalize)
    if image is not None:
        out = overlay(image, m, alpha=alpha, cmap=cmap)
    else:
        colored = _colormap(cmap)(np.nan_to_num(m, nan=0.0))[..., :3]
        colored[np.isnan(m)] = 0.0
        scale = max(1, math.ceil(256 / min(m.shape)))
        block = np.kron(colored, np.ones((scale, scale, 1)))
        out = Image.fromarray((block * 255).round().astype(np.uint8))
    out.save(os.fspath(path))
    return out
