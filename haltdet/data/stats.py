"""What a dataset holds: points, pillars and labelled objects per frame (`haltdet data stats`).

Works on any data spec (a haltdet dataset directory or ``FORMAT:PATH``), so a user can
compare the synthetic frames with real ones before training on either.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from haltdet import CLASSES
from haltdet.config import ModelConfig
from haltdet.data.frames import IGNORED, LEVEL_2, Frame


def frame_statistics(frame: Frame, point_cloud_range=None, pillar_size: float | None = None) -> dict:
    """Counts of one frame: points, non-empty pillars within the range (default: the
    model's default `point_cloud_range` and `pillar_size`), points inside the labelled
    boxes (the sum of the labels' `num_points`), and labels per class and difficulty."""
    defaults = ModelConfig()
    point_cloud_range = defaults.point_cloud_range if point_cloud_range is None else point_cloud_range
    pillar_size = defaults.pillar_size if pillar_size is None else pillar_size
    points = frame.points
    lo, hi = np.asarray(point_cloud_range[:3]), np.asarray(point_cloud_range[3:])
    in_range = np.all((points[:, :3] >= lo) & (points[:, :3] < hi), axis=1)
    cells = np.floor((points[in_range, :2] - lo[:2]) / pillar_size).astype(np.int64)
    width = int(round((hi[0] - lo[0]) / pillar_size))
    pillars = int(np.unique(cells[:, 0] * width + cells[:, 1]).size)
    stats = {"points": int(len(points)), "pillars": pillars, "points_in_boxes": int(frame.num_points.sum()),
             "labels": int(len(frame.labels)), "ignored": int((frame.difficulty == IGNORED).sum()),
             "level_2": int((frame.difficulty == LEVEL_2).sum())}
    for index, name in enumerate(CLASSES):
        stats[name] = int((frame.labels == index).sum())
    return stats


def dataset_statistics(frames: Iterable[Frame], **kwargs) -> dict:
    """Per-frame means (and min / max of points and pillars) over `frames`, and the
    fractions of labels that are ignored (0 points) or LEVEL_2, and of points in boxes."""
    rows = [frame_statistics(frame, **kwargs) for frame in frames]
    if not rows:
        raise ValueError("no frames")
    table = {key: np.array([row[key] for row in rows], dtype=np.float64) for key in rows[0]}
    out = {"frames": len(rows)}
    for key in ("points", "pillars"):
        out[key] = {"mean": float(table[key].mean()), "min": int(table[key].min()), "max": int(table[key].max())}
    for name in CLASSES:
        out[f"{name}_per_frame"] = float(table[name].mean())
    labels = max(table["labels"].sum(), 1.0)
    out["ignored_fraction"] = float(table["ignored"].sum() / labels)
    out["level_2_fraction"] = float(table["level_2"].sum() / labels)
    out["points_in_boxes_fraction"] = float(table["points_in_boxes"].sum() / max(table["points"].sum(), 1.0))
    return out


def format_statistics(stats: dict) -> str:
    points, pillars = stats["points"], stats["pillars"]
    objects = ", ".join(f"{stats[f'{name}_per_frame']:.1f} {name}" for name in CLASSES)
    return (f"{stats['frames']} frames\n"
            f"points per frame: {points['mean']:,.0f} (min {points['min']:,}, max {points['max']:,})\n"
            f"non-empty pillars in range: {pillars['mean']:,.0f} (min {pillars['min']:,}, max {pillars['max']:,})\n"
            f"objects per frame: {objects}\n"
            f"labels with 0 points (ignored): {stats['ignored_fraction']:.1%}; "
            f"LEVEL_2: {stats['level_2_fraction']:.1%}\n"
            f"points inside labelled boxes: {stats['points_in_boxes_fraction']:.1%}")
