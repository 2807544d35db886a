"""Bird's-eye-view pictures: points, ground truth and predicted boxes."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.patches import Polygon  # noqa: E402

from haltdet import CLASSES  # noqa: E402
from haltdet.boxes import bev_corners  # noqa: E402

CLASS_COLOURS = {"Vehicle": "#ff4d4d", "Pedestrian": "#ffd11a", "Cyclist": "#33ccff"}
# Discrete levels (e.g. halting depth), deepest last: muted to bright, none a class colour.
LEVEL_COLOURS = ("#4f6d9a", "#9b6fd1", "#f4f4f4")


def _draw_boxes(ax, boxes: np.ndarray, labels: np.ndarray, style: str, scores=None) -> None:
    if len(boxes) == 0:
        return
    corners = bev_corners(np.asarray(boxes, dtype=np.float64))
    for i, (quad, label) in enumerate(zip(corners, labels)):
        colour = CLASS_COLOURS[CLASSES[int(label)]]
        if style == "gt":
            ax.add_patch(Polygon(quad, closed=True, fill=False, edgecolor="#66ff66", lw=1.6))
        else:
            ax.add_patch(Polygon(quad, closed=True, fill=False, edgecolor=colour, lw=1.0, ls="--"))
            front = quad[[0, 3]].mean(axis=0)  # heading tick: centre of the front edge
            centre = quad.mean(axis=0)
            ax.plot([centre[0], front[0]], [centre[1], front[1]], color=colour, lw=1.0)
            if scores is not None:
                ax.text(quad[0, 0], quad[0, 1], f"{scores[i]:.2f}", color=colour, fontsize=7)


def fitted_extent(*box_sets, margin: float = 8.0, smallest: float = 20.0, largest: float = 62.0) -> float:
    """Half-width (m) of a square view around the sensor that holds every box centre
    with `margin` to spare, within [smallest, largest]; `largest` when there is no box."""
    centres = [np.abs(np.asarray(b, dtype=np.float64).reshape(-1, 7)[:, :2]) for b in box_sets if b is not None]
    centres = [c for c in centres if len(c)]
    if not centres:
        return largest
    return float(np.clip(np.concatenate(centres).max() + margin, smallest, largest))


def draw_bev(path: str | Path | None, points: np.ndarray, gt_boxes=None, gt_labels=None,
             pred_boxes=None, pred_labels=None, pred_scores=None, extent: float | None = None,
             title: str = "", point_colours: np.ndarray | None = None,
             colour_label: str = "height z (m)", point_size: float = 0.5, levels=None):
    """A BEV picture: points coloured by height (or by `point_colours`), ground truth in
    solid green, predictions dashed in their class colour with a heading tick.

    extent: half-width of the view in metres (default: fitted to the boxes).
    levels: optional list of (value, label): `point_colours` takes only these values and
      each gets its own colour in a legend instead of a colour bar.
    Writes the picture to `path` when given; returns the matplotlib figure.
    """
    if extent is None:
        extent = fitted_extent(gt_boxes, pred_boxes)
    fig, ax = plt.subplots(figsize=(10, 10), dpi=120)
    ax.set_facecolor("#101010")
    keep = (np.abs(points[:, 0]) < extent) & (np.abs(points[:, 1]) < extent)
    colours = points[keep, 2] if point_colours is None else point_colours[keep]
    # Points in the brighter part of the colour map: its darkest end vanishes on the background.
    point_size = point_size * (62.0 / extent)
    if levels is None:
        cmap = ListedColormap(plt.get_cmap("turbo")(np.linspace(0.15, 1.0, 256)))
        scatter = ax.scatter(points[keep, 0], points[keep, 1], c=colours, s=point_size, cmap=cmap, linewidths=0)
        fig.colorbar(scatter, ax=ax, fraction=0.03, pad=0.01, label=colour_label)
        handles = []
    else:
        handles = []
        palette = (LEVEL_COLOURS[-len(levels):] if len(levels) <= len(LEVEL_COLOURS)
                   else plt.get_cmap("cool")(np.linspace(0, 1, len(levels))))
        for (value, label), colour in zip(levels, palette):  # later levels drawn on top
            chosen = colours == value
            ax.scatter(points[keep][chosen, 0], points[keep][chosen, 1], color=colour, s=point_size, linewidths=0)
            handles.append(plt.Line2D([], [], color=colour, marker="o", ls="", label=label))
    if gt_boxes is not None:
        _draw_boxes(ax, gt_boxes, gt_labels, "gt")
    if pred_boxes is not None:
        _draw_boxes(ax, pred_boxes, pred_labels, "pred", pred_scores)
    handles += [plt.Line2D([], [], color="#66ff66", lw=1.6, label="ground truth")]
    handles += [plt.Line2D([], [], color=c, lw=1.0, ls="--", label=f"predicted {n}")
                for n, c in CLASS_COLOURS.items()]
    ax.legend(handles=handles, loc="upper right", fontsize=8, facecolor="#222", labelcolor="white")
    ax.set_xlim(-extent, extent)
    ax.set_ylim(-extent, extent)
    ax.set_aspect("equal")
    ax.set_xlabel("x (m, forward)")
    ax.set_ylabel("y (m, left)")
    ax.set_title(title, fontsize=10)
    if path is not None:
        fig.savefig(Path(path), bbox_inches="tight")
    plt.close(fig)
    return fig


def draw_halting(path: str | Path | None, pillar_coords: np.ndarray, halted_at: np.ndarray, model_config,
                 gt_boxes=None, gt_labels=None, pred_boxes=None, pred_labels=None,
                 extent: float | None = None):
    """BEV picture of the pillars coloured by the number of encoder layers that processed
    them (the layer at which they halted: one colour per halting stage, one for never
    halted), with the boxes on top. Writes to `path` when given; returns the figure.

    pillar_coords: (T, 3) (frame, iy, ix) of frame 0's tokens; halted_at: (T,).
    """
    import torch

    from haltdet.model.pillars import pillar_centres

    xy = pillar_centres(torch.as_tensor(pillar_coords), model_config.point_cloud_range,
                        model_config.pillar_size).numpy()
    centres = np.concatenate([xy, np.zeros((len(xy), 1))], axis=1)
    layers = model_config.num_layers
    levels = [(float(n), f"halted after layer {n}") for n in model_config.halting_layers]
    levels.append((float(layers), f"all {layers} layers"))
    return draw_bev(path, centres, gt_boxes, gt_labels, pred_boxes, pred_labels, extent=extent,
                    point_colours=halted_at.astype(np.float64), levels=levels,
                    title="pillars by the number of encoder layers that processed them", point_size=4.0)
