"""flowkern.viz: share plot with the cliff marker, heatmap grids (bilinear overlays), single heatmaps."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from flowkern import viz

NAMES = ["system", "image", "user", "generated"]


def _shares(image: list[float]) -> np.ndarray:
    image = np.asarray(image)
    rest = 1.0 - image
    return np.stack([rest * 0.5, image, rest * 0.4, rest * 0.1], axis=1)


def _line(fig, gid):
    found = [line for line in fig.axes[0].get_lines() if line.get_gid() == gid]
    return found[0] if found else None


def test_cliff_layer_definition():
    s = _shares([0.6, 0.3, 0.12, 0.08, 0.05, 0.2])
    assert viz.cliff_layer(s, threshold=0.1) == 3
    assert viz.cliff_layer(s, threshold=0.15) == 2
    assert viz.cliff_layer(s, threshold=0.7) == 0
    assert viz.cliff_layer(s, threshold=0.01) is None
    assert viz.cliff_layer(torch.tensor(s), threshold=0.1) == 3  # tensors too
    assert viz.cliff_layer(s, threshold=0.1, segment="system") is None  # system = (1 - image) / 2 >= 0.2
    assert viz.cliff_layer(s, threshold=0.3, segment="system") == 0
    with pytest.raises(ValueError, match="shares must be"):
        viz.cliff_layer(s[:, :3])
    with pytest.raises(ValueError, match="segment"):
        viz.cliff_layer(s, segment="audio")


@pytest.mark.parametrize("stacked", [False, True])
def test_plot_shares_marks_cliff(tmp_path, stacked):
    s = _shares([0.6, 0.3, 0.12, 0.08, 0.05, 0.2])
    fig = viz.plot_shares(s, NAMES, threshold=0.1, title="LLaVA", path=tmp_path / "s.png", stacked=stacked)
    assert isinstance(fig, matplotlib.figure.Figure) and len(fig.axes) == 1
    ax = fig.axes[0]
    assert ax.get_title() == "LLaVA"
    cliff = _line(fig, "cliff")
    assert cliff is not None and list(cliff.get_xdata()) == [3, 3]
    assert "layer 3" in cliff.get_label()
    assert list(_line(fig, "threshold").get_ydata()) == [0.1, 0.1]
    if not stacked:
        for i, name in enumerate(NAMES):
            line = _line(fig, f"share:{name}")
            np.testing.assert_allclose(line.get_ydata(), s[:, i])
            np.testing.assert_allclose(line.get_xdata(), np.arange(6))
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert all(n in legend for n in NAMES)
    with Image.open(tmp_path / "s.png") as im:
        assert im.width > 600 and im.height > 300


def test_plot_shares_threshold_moves_marker():
    s = _shares([0.6, 0.3, 0.12, 0.08, 0.05, 0.2])
    assert list(_line(viz.plot_shares(s, threshold=0.2), "cliff").get_xdata()) == [2, 2]
    fig = viz.plot_shares(s, threshold=0.01)
    assert _line(fig, "cliff") is None and _line(fig, "threshold") is not None
    fig = viz.plot_shares(s, threshold=None)
    assert _line(fig, "cliff") is None and _line(fig, "threshold") is None


def test_upsample_is_bilinear():
    m = np.array([[0.0, 1.0], [2.0, 3.0]])
    up = viz.upsample(m, (4, 4))
    assert up.shape == (4, 4) and up.dtype == np.float32
    # pixel-centre aligned: the corners keep the corner values, edges are clamped
    assert (up[0, 0], up[0, -1], up[-1, 0], up[-1, -1]) == (0.0, 1.0, 2.0, 3.0)
    # interpolated (nearest would give 0 at [0, 1]), and monotone along rows and columns
    np.testing.assert_allclose(up[0], [0.0, 0.25, 0.75, 1.0])
    np.testing.assert_allclose(up[:, 0], [0.0, 0.5, 1.5, 2.0])
    assert (np.diff(up, axis=0) > 0).all() and (np.diff(up, axis=1) > 0).all()
    ref = torch.nn.functional.interpolate(torch.tensor(m)[None, None], size=(5, 7), mode="bilinear",
                                          align_corners=False)[0, 0]
    np.testing.assert_allclose(viz.upsample(m, (5, 7)), ref.numpy(), atol=1e-6)
    np.testing.assert_array_equal(viz.upsample(np.array([[np.nan, 1.0]]), (1, 2)), [[0.0, 1.0]])


def test_normalize_maps():
    a, b = np.array([[0.0, 2.0]]), np.array([[1.0, 4.0]])
    each = viz.normalize_maps([a, b], "each")
    np.testing.assert_allclose(each[0], [[0.0, 1.0]])
    np.testing.assert_allclose(each[1], [[0.25, 1.0]])
    glob = viz.normalize_maps([a, b], "global")
    np.testing.assert_allclose(glob[0], [[0.0, 0.5]])
    np.testing.assert_allclose(viz.normalize_maps([np.array([[0.5, 3.0]])], None)[0], [[0.5, 1.0]])  # clipped
    zero = viz.normalize_maps([np.array([[0.0, np.nan]])], "each")[0]
    assert zero[0, 0] == 0 and np.isnan(zero[0, 1])
    with pytest.raises(ValueError, match="normalize"):
        viz.normalize_maps([a], "minmax")


def test_overlay_colours_and_alpha():
    image = Image.new("RGB", (40, 20), (10, 200, 30))
    heat = np.array([[1.0, 0.0], [0.0, 0.0]])
    assert np.array_equal(np.asarray(viz.overlay(image, heat, alpha=0.0)), np.asarray(image))
    full = np.asarray(viz.overlay(image, heat, alpha=1.0, cmap="jet")).astype(int)
    assert full.shape == (20, 40, 3)
    jet = matplotlib.colormaps["jet"]
    np.testing.assert_allclose(full[0, 0], np.round(np.array(jet(1.0)[:3]) * 255), atol=1)  # hot corner: dark red
    np.testing.assert_allclose(full[-1, -1], np.round(np.array(jet(0.0)[:3]) * 255), atol=1)  # cold: dark blue
    half = np.asarray(viz.overlay(np.asarray(image), heat, alpha=0.5)).astype(int)
    np.testing.assert_allclose(half[-1, -1], np.round((np.array([10, 200, 30]) + full[-1, -1]) / 2), atol=1)
    with pytest.raises(ValueError, match="alpha"):
        viz.overlay(image, heat, alpha=1.5)


def test_heatmap_grid_panels_titles_and_overlay(tmp_path):
    rng = np.random.default_rng(0)
    maps = torch.rand(5, 3, 3, generator=torch.Generator().manual_seed(0))
    image = Image.fromarray(rng.integers(0, 256, (30, 60, 3), dtype=np.uint8))
    titles = [f"layer {i}" for i in range(5)]
    fig = viz.heatmap_grid(image, maps, titles, ncols=3, alpha=0.4, path=tmp_path / "g.png")
    assert len(fig.axes) == 5
    assert [ax.get_title() for ax in fig.axes] == titles
    rows = {ax.get_subplotspec().rowspan.start for ax in fig.axes}
    assert rows == {0, 1}  # 3 + 2 panels
    for ax, m in zip(fig.axes, maps, strict=True):
        shown = ax.get_images()[0].get_array()
        assert shown.shape == (30, 60, 3)  # upsampled to the image size
        expect = viz.overlay(image, (m / m.max()).numpy(), alpha=0.4)
        np.testing.assert_array_equal(np.asarray(shown), np.asarray(expect))
    with Image.open(tmp_path / "g.png") as im:
        assert im.width >= 3 * 250 and im.height >= 2 * 100


def test_heatmap_grid_without_image_and_options():
    maps = [np.array([[0.0, 1.0], [2.0, np.nan]]), np.ones((1, 6))]  # shapes may differ
    fig = viz.heatmap_grid(None, maps, ["a", "b"], normalize="global")
    assert len(fig.axes) == 2 and [ax.get_title() for ax in fig.axes] == ["a", "b"]
    first = fig.axes[0].get_images()[0].get_array()
    np.testing.assert_allclose(first.filled(-1), [[0.0, 0.5], [1.0, -1]])  # NaN masked, global max = 2
    assert fig.axes[0].get_images()[0].get_interpolation() == "nearest"
    assert len(viz.heatmap_grid(None, np.zeros((3, 2, 2)), ["x", "y", "z"]).axes) == 3
    big = Image.new("RGB", (2000, 1000))
    shown = viz.heatmap_grid(big, [np.eye(2)], ["x"]).axes[0].get_images()[0].get_array()
    assert max(shown.shape[:2]) <= 768 and shown.shape[1] == 2 * shown.shape[0]  # downsized, aspect kept
    with pytest.raises(ValueError, match="titles"):
        viz.heatmap_grid(None, maps, ["only one"])
    with pytest.raises(ValueError, match="2D"):
        viz.heatmap_grid(None, [np.zeros(4)], ["x"])


def test_save_heatmap(tmp_path):
    image = Image.new("RGB", (24, 16), (255, 255, 255))
    out = viz.save_heatmap(image, np.array([[0.0, 3.0]]), tmp_path / "h.png", alpha=0.5)
    with Image.open(tmp_path / "h.png") as im:
        assert im.size == (24, 16) and np.array_equal(np.asarray(im), np.asarray(out))
    raw = viz.save_heatmap(None, np.array([[0.0, 1.0], [1.0, 0.0]]), tmp_path / "raw.png")
    assert raw.size[0] == raw.size[1] and raw.size[0] >= 256 and raw.size[0] % 2 == 0


def test_new_figure_and_save_figure(tmp_path):
    fig = viz.new_figure((2.0, 1.5))
    fig.add_subplot().plot([0, 1], [0, 1], color=viz.SEGMENT_COLORS["image"])
    viz.save_figure(fig, tmp_path / "f.png", 50)
    viz.save_figure(fig, None, 50)  # no path: nothing written
    with Image.open(tmp_path / "f.png") as im:
        assert im.size == (100, 75)
    assert list(tmp_path.iterdir()) == [tmp_path / "f.png"]


# ----------------------------------------------------------------------------------------------------------
# flowkern.viz_flow: segment flow, per-head shares, the logit lens on the grid


def test_plot_segment_flow(tmp_path):
    from flowkern.viz_flow import plot_segment_flow

    flow = np.random.default_rng(0).dirichlet(np.ones(4), size=(12, 4))
    flow[:, 3] = np.nan  # no generated rows
    fig = plot_segment_flow(flow, NAMES, path=tmp_path / "flow.png")
    assert len(fig.axes) == 8  # 8 panels spread over 12 layers
    assert [ax.get_title() for ax in fig.axes][0] == "layer 0" and fig.axes[-1].get_title() == "layer 11"
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert len(texts) == 12 and texts[0] == f"{100 * flow[0, 0, 0]:.0f}"  # NaN row not annotated
    assert Image.open(tmp_path / "flow.png").size[0] > 0
    assert len(plot_segment_flow(flow, NAMES, layers=[2, -1]).axes) == 2
    with pytest.raises(ValueError, match="flow must be"):
        plot_segment_flow(flow[:, :3], NAMES)
    with pytest.raises(ValueError, match="layers"):
        plot_segment_flow(flow, NAMES, layers=[12])


def test_plot_head_shares_marks_cells():
    from flowkern.viz_flow import plot_head_shares

    shares = np.random.default_rng(1).dirichlet(np.ones(4), size=(3, 4))  # [L=3, H=4, 4]
    marked = np.zeros((3, 4), dtype=bool)
    marked[1:, :2] = True
    fig = plot_head_shares(shares, NAMES, marked=marked, marked_label="guided")
    ax = fig.axes[0]
    assert len([p for p in ax.patches if p.get_gid() == "marked"]) == 4
    assert ax.texts[5].get_text() == f"{100 * shares[1, 1, 1]:.0f}"
    with pytest.raises(ValueError, match="marked"):
        plot_head_shares(shares, NAMES, marked=marked[:2])
    with pytest.raises(ValueError, match="segment"):
        plot_head_shares(shares, NAMES, segment="audio")


def test_plot_lens_grid_colours_and_words(tmp_path):
    from flowkern.viz_flow import plot_lens_grid

    a = np.array([[1, 1, 2], [3, -1, 1]])
    b = np.array([[2, 2, 2], [2, 4, -1]])
    words = {1: "red", 2: "circle", 3: "blue", 4: "star"}
    image = Image.new("RGB", (30, 20), (10, 200, 10))
    fig = plot_lens_grid([a, b], ["layer 0", "layer 1"], words, image=image, colors=2, path=tmp_path / "l.png")
    assert len(fig.axes) == 2 and fig.axes[1].get_title() == "layer 1"
    assert [t.get_text() for t in fig.axes[0].texts] == ["red", "red", "circle", "blue", "red"]
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["circle", "red", "other"]  # the two most frequent words, then the rest
    assert Image.open(tmp_path / "l.png").size[0] > 0
    with pytest.raises(ValueError, match="one 2D map per title"):
        plot_lens_grid([a], ["x", "y"], words)
