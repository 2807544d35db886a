"""BEV pictures: figures returned, the view fitted to the objects, discrete halting depths."""

import numpy as np
from matplotlib.figure import Figure

from haltdet.config import ModelConfig
from haltdet.viz import draw_bev, draw_halting, fitted_extent


def test_fitted_extent_by_hand():
    boxes = np.array([[10.0, -25.0, 0, 4, 2, 1.5, 0], [3.0, 4.0, 0, 4, 2, 1.5, 0]])
    assert fitted_extent(boxes) == 25.0 + 8.0
    assert fitted_extent(boxes[1:]) == 20.0  # at least 20 m
    assert fitted_extent(np.array([[90.0, 0, 0, 4, 2, 1.5, 0]])) == 62.0  # at most 62 m
    assert fitted_extent(None, np.zeros((0, 7))) == 62.0  # nothing to fit


def test_pictures_return_figures_and_write_files(tmp_path):
    points = np.random.default_rng(0).uniform(-30, 30, (500, 4)).astype(np.float32)
    boxes = np.array([[5.0, 5.0, 0, 4, 2, 1.5, 0.3]])
    figure = draw_bev(tmp_path / "bev.png", points, boxes, np.array([0]), boxes, np.array([0]), np.array([0.9]))
    assert isinstance(figure, Figure) and (tmp_path / "bev.png").stat().st_size > 10_000
    assert figure.axes[0].get_xlim() == (-20.0, 20.0)  # fitted: the box at 5 m, 8 m margin, 20 m at least
    config = ModelConfig(halting_layers=[2, 4])
    coords = np.stack([np.zeros(300, int), np.arange(300) % 200 + 100, np.arange(300) // 2 + 100], 1)
    depth = np.array([2, 4, 6])[np.arange(300) % 3]
    figure = draw_halting(None, coords, depth, config, extent=30.0)
    labels = [t.get_text() for t in figure.axes[0].get_legend().get_texts()]
    assert labels[:3] == ["halted after layer 2", "halted after layer 4", "all 6 layers"]
    assert len(figure.axes) == 1  # a legend, no colour bar
