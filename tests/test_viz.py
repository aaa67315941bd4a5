"""The family-agnostic drawing of kept tokens: every record shape lands where it came from."""

import numpy as np
import torch
from matplotlib.patches import Rectangle

from zooprune.record import ImageSelection
from zooprune.viz import plot_regions, regions_figure


def selection(crops, cells, patch_grids, boxes=None, scores=None, num_tokens=40):
    k = len(crops)
    return ImageSelection(
        image=0,
        prompt=0,
        num_tokens=num_tokens,
        indices=torch.arange(k),
        scores=scores,
        grid=(1, num_tokens),
        positions=torch.arange(k),
        crops=torch.tensor(crops),
        cells=torch.tensor(cells),
        patch_grids=tuple(patch_grids),
        boxes=boxes,
    )


def rectangles(ax):
    return sorted(
        (round(p.get_y() + 0.5, 6), round(p.get_x() + 0.5, 6), p.get_height(), p.get_width())
        for p in ax.patches
        if isinstance(p, Rectangle)
    )


def test_known_boxes_outline_each_kept_region_on_the_original_image():
    image = np.ones((60, 90, 3))
    # A base crop over the whole image (2 x 3 cells) and a sub-crop over its right half.
    sel = selection(
        crops=[0, 1, 1],
        cells=[[1, 2], [0, 0], [2, 1]],
        patch_grids=[(2, 3), (3, 3)],
        boxes=((0.0, 0.0, 60.0, 90.0), (0.0, 45.0, 60.0, 90.0)),
    )
    fig = regions_figure(image, sel)
    (ax,) = fig.axes
    # (top, left, height, width): base cell (1, 2) is 30 x 30 px; sub-crop cells 20 x 15 px.
    assert rectangles(ax) == [
        (0.0, 45.0, 20.0, 15.0),
        (30.0, 60.0, 30.0, 30.0),
        (40.0, 60.0, 20.0, 15.0),
    ]
    shown = ax.images[0].get_array()
    assert shown[10, 50, 0] == 1.0  # inside a kept region: full brightness
    assert shown[10, 5, 0] < 0.5  # outside: dimmed


def test_one_crop_without_boxes_stretches_its_grid_and_shows_the_scores(tmp_path):
    image = np.zeros((40, 80, 3))
    scores = torch.linspace(0, 1, 8)
    sel = selection(
        crops=[0, 0], cells=[[0, 3], [1, 0]], patch_grids=[(2, 4)], scores=scores, num_tokens=8
    )
    fig = regions_figure(image, sel, title="zoo")
    assert len(fig.axes) == 2
    assert rectangles(fig.axes[0]) == [(0.0, 60.0, 20.0, 20.0), (20.0, 0.0, 20.0, 20.0)]
    heat = fig.axes[1].images[1].get_array()
    np.testing.assert_allclose(heat, scores.numpy().reshape(2, 4))
    assert plot_regions(image, sel, tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


def test_several_crops_without_boxes_get_a_panel_each():
    sel = selection(
        crops=[0, 2, 2, 1],
        cells=[[0, 0], [1, 1], [0, 1], [1, 0]],
        patch_grids=[(2, 2), (2, 2), (2, 3)],
    )
    fig = regions_figure(np.zeros((10, 10, 3)), sel)
    assert len(fig.axes) == 3
    kept = [np.argwhere(ax.images[0].get_array() > 0).tolist() for ax in fig.axes]
    assert kept == [[[0, 0]], [[1, 0]], [[0, 1], [1, 1]]]
    assert fig.axes[2].images[0].get_array().shape == (2, 3)


def test_a_video_gets_a_panel_per_frame_over_its_pictures():
    # Two frames of 2 x 2 tokens: frame 0 keeps (0, 1), frame 1 keeps (1, 0) and (1, 1).
    sel = ImageSelection(
        image=0,
        prompt=0,
        num_tokens=8,
        indices=torch.tensor([1, 6, 7]),
        scores=None,
        grid=(2, 2),
        positions=torch.arange(3),
        crops=torch.tensor([0, 1, 1]),
        cells=torch.tensor([[0, 1], [1, 0], [1, 1]]),
        patch_grids=((2, 2), (2, 2)),
        kind="video",
    )
    frames = [np.ones((20, 40, 3)), np.ones((20, 40, 3))]
    fig = regions_figure(frames, sel, title="zoo")
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 2
    # (top, left, height, width): cells of 10 x 20 px.
    assert rectangles(panels[0]) == [(0.0, 20.0, 10.0, 20.0)]
    assert rectangles(panels[1]) == [(10.0, 0.0, 10.0, 20.0), (10.0, 20.0, 10.0, 20.0)]
    shown = panels[0].images[0].get_array()
    assert shown[5, 30, 0] == 1.0 and shown[15, 5, 0] < 0.5  # kept lit, dropped dimmed
    # Without pictures: each frame's grid with its kept cells filled.
    grids = [ax.images[0].get_array() for ax in regions_figure(None, sel).axes if ax.images]
    assert [np.argwhere(g > 0).tolist() for g in grids] == [[[0, 1]], [[1, 0], [1, 1]]]
