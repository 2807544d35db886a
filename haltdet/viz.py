"""Bird's-eye-view pictures: points, ground truth and predicted boxes."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Polygon  # noqa: E402

from haltdet import CLASSES  # noqa: E402
from haltdet.boxes import bev_corners  # noqa: E402

CLASS_COLOURS = {"Vehicle": "#ff4d4d", "Pedestrian": "#ffd11a", "Cyclist": "#33ccff"}


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
                ax.text(quad[0, 0], quad[0, 1], f"{scores[i]:.2f}", color=colour, fontsize=5)


def draw_bev(path: str | Path, points: np.ndarray, gt_boxes=None, gt_labels=None,
             pred_boxes=None, pred_labels=None, pred_scores=None, extent: float = 62.0,
             title: str = "", point_colours: np.ndarray | None = None,
             colour_label: str = "height z (m)", point_size: float = 0.5) -> Path:
    """Write a BEV picture: points coloured by height (or by `point_colours`), ground
    truth in solid green, predictions dashed in their class colour with a heading tick."""
    fig, ax = plt.subplots(figsize=(10, 10), dpi=120)
    ax.set_facecolor("black")
    keep = (np.abs(points[:, 0]) < extent) & (np.abs(points[:, 1]) < extent)
    colours = points[keep, 2] if point_colours is None else point_colours[keep]
    scatter = ax.scatter(points[keep, 0], points[keep, 1], c=colours, s=point_size, cmap="viridis",
                         linewidths=0)
    fig.colorbar(scatter, ax=ax, fraction=0.03, pad=0.01, label=colour_label)
    if gt_boxes is not None:
        _draw_boxes(ax, gt_boxes, gt_labels, "gt")
    if pred_boxes is not None:
        _draw_boxes(ax, pred_boxes, pred_labels, "pred", pred_scores)
    handles = [plt.Line2D([], [], color="#66ff66", lw=1.6, label="ground truth")]
    handles += [plt.Line2D([], [], color=c, lw=1.0, ls="--", label=f"predicted {n}")
                for n, c in CLASS_COLOURS.items()]
    ax.legend(handles=handles, loc="upper right", fontsize=7, facecolor="#222", labelcolor="white")
    ax.set_xlim(-extent, extent)
    ax.set_ylim(-extent, extent)
    ax.set_aspect("equal")
    ax.set_xlabel("x (m, forward)")
    ax.set_ylabel("y (m, left)")
    ax.set_title(title, fontsize=9)
    path = Path(path)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def draw_halting(path: str | Path, pillar_coords: np.ndarray, halted_at: np.ndarray, model_config,
                 gt_boxes=None, gt_labels=None, pred_boxes=None, pred_labels=None,
                 extent: float = 62.0) -> Path:
    """BEV picture of the pillars coloured by the number of encoder layers that processed
    them (the layer at which they halted), with the boxes on top.

    pillar_coords: (T, 3) (frame, iy, ix) of frame 0's tokens; halted_at: (T,).
    """
    import torch

    from haltdet.model.pillars import pillar_centres

    xy = pillar_centres(torch.as_tensor(pillar_coords), model_config.point_cloud_range,
                        model_config.pillar_size).numpy()
    centres = np.concatenate([xy, np.zeros((len(xy), 1))], axis=1)
    layers = model_config.num_layers
    return draw_bev(path, centres, gt_boxes, gt_labels, pred_boxes, pred_labels, extent=extent,
                    point_colours=halted_at.astype(np.float64), colour_label=f"layers processed (of {layers})",
                    title=f"pillars by the layer at which they halted (halting after layers "
                          f"{model_config.halting_layers}; {layers} = never halted)", point_size=1.5)
