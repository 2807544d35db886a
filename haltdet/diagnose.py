"""Where a detector's accuracy goes.

Each prediction is matched to the same-class ground-truth box it overlaps most in BEV
(IoU > 0.1; ignored boxes, with no point, are left out).

* `oracle_table`: one quantity of the matched predictions (centre x/y, z, size or
  heading) is replaced by the ground truth's and the metric recomputed. The rise in AP
  says how much that quantity's error costs.
* `residual_table`: the errors themselves, per class, over matched predictions above a
  score: mean (bias) and standard deviation of the centre error along and across the
  ground-truth box's heading, of z and of l, w, h; the median error of the box axis; and
  how often the heading points the wrong way (more than 90 degrees off).
"""

from __future__ import annotations

import numpy as np

from haltdet import CLASSES
from haltdet.boxes import iou_bev, wrap_angle
from haltdet.evaluate import FrameBoxes, evaluate

COLUMNS = {"xy": [0, 1], "z": [2], "size": [3, 4, 5], "yaw": [6]}
EXPERIMENTS = ("", "xy", "z", "size", "yaw", "xy size", "xy z size yaw")
RESIDUALS = ("along", "across", "z", "l", "w", "h")


def match_to_ground_truth(pred: FrameBoxes, gt: FrameBoxes) -> tuple[np.ndarray, np.ndarray]:
    """(prediction indices, matched ground-truth boxes (K, 7)) of one frame's matched
    predictions."""
    keep = gt.difficulty > 0
    gt_boxes, gt_labels = gt.boxes[keep], gt.labels[keep]
    if not len(pred.boxes) or not len(gt_boxes):
        return np.zeros(0, dtype=np.int64), np.zeros((0, 7))
    overlap = np.asarray(iou_bev(pred.boxes.astype(np.float64), gt_boxes.astype(np.float64)))
    overlap = np.where(pred.labels[:, None] == gt_labels[None], overlap, 0.0)
    matched = np.nonzero(overlap.max(axis=1) > 0.1)[0]
    return matched, gt_boxes[overlap[matched].argmax(axis=1)]


def with_ground_truth(predictions: list[FrameBoxes], ground_truth: list[FrameBoxes],
                      quantities: str) -> list[FrameBoxes]:
    """Copies of the predictions with the named quantities taken from matched GT boxes."""
    columns = [c for q in quantities.split() for c in COLUMNS[q]]
    out = []
    for pred, gt in zip(predictions, ground_truth):
        boxes = pred.boxes.copy()
        if columns:
            index, gt_boxes = match_to_ground_truth(pred, gt)
            boxes[np.ix_(index, columns)] = gt_boxes[:, columns]
        out.append(FrameBoxes(pred.frame_id, boxes, pred.labels, scores=pred.scores))
    return out


def oracle_table(predictions: list[FrameBoxes], ground_truth: list[FrameBoxes]) -> list[dict]:
    """LEVEL_1 AP and APH per class for each experiment of EXPERIMENTS."""
    rows = []
    for quantities in EXPERIMENTS:
        result = evaluate(ground_truth, with_ground_truth(predictions, ground_truth, quantities))
        rows.append({"replaced": quantities or "nothing",
                     **{f"{c} AP": result[c]["LEVEL_1"]["AP"] for c in CLASSES},
                     **{f"{c} APH": result[c]["LEVEL_1"]["APH"] for c in CLASSES}})
    return rows


def residual_table(predictions: list[FrameBoxes], ground_truth: list[FrameBoxes],
                   min_score: float = 0.3) -> dict[str, dict]:
    """Per class: {"matched", "mean": {name: m}, "std": {name: s}, "axis_error_deg",
    "reversed"} over the matched predictions scoring at least min_score (prediction minus
    ground truth; names in RESIDUALS, metres)."""
    errors: dict[int, list[np.ndarray]] = {c: [] for c in range(len(CLASSES))}
    for pred, gt in zip(predictions, ground_truth):
        confident = pred.scores >= min_score
        pred = FrameBoxes(pred.frame_id, pred.boxes[confident], pred.labels[confident],
                          scores=pred.scores[confident])
        index, gt_boxes = match_to_ground_truth(pred, gt)
        boxes = pred.boxes[index].astype(np.float64)
        delta = boxes - gt_boxes
        cos, sin = np.cos(gt_boxes[:, 6]), np.sin(gt_boxes[:, 6])
        along = cos * delta[:, 0] + sin * delta[:, 1]
        across = -sin * delta[:, 0] + cos * delta[:, 1]
        heading = np.abs(wrap_angle(delta[:, 6]))
        rows = np.stack([along, across, delta[:, 2], delta[:, 3], delta[:, 4], delta[:, 5], heading], axis=1)
        for label, row in zip(pred.labels[index], rows):
            errors[int(label)].append(row)
    table = {}
    for c, name in enumerate(CLASSES):
        rows = np.array(errors[c]).reshape(-1, len(RESIDUALS) + 1)
        if not len(rows):
            table[name] = {"matched": 0}
            continue
        heading = rows[:, -1]
        table[name] = {
            "matched": len(rows),
            "mean": dict(zip(RESIDUALS, rows[:, :-1].mean(axis=0).tolist())),
            "std": dict(zip(RESIDUALS, rows[:, :-1].std(axis=0).tolist())),
            "axis_error_deg": float(np.degrees(np.median(np.minimum(heading, np.pi - heading)))),
            "reversed": float((heading > np.pi / 2).mean()),
        }
    return table
